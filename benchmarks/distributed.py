"""Data-parallel K-FAC, placed refreshes and sharded factors on 1-8 devices.

For each device count a fresh process (``XLA_FLAGS`` must be set before jax
starts) builds a 1-D ``"data"`` mesh and measures, for an MLP
64-192-128-96-64-48-10 (12 factors of sizes 10 to 193), batch sharded:

- the placement (``kronjax._distributed.Plan``, factor by factor):
  decompositions and ``Σ d³`` of the busiest device, against one device
  doing all of them;
- a whole ``kronjax.kfac`` train step (tape, blocks, fixed step) in three
  layouts: ``replicated`` (every device refreshes every layer, as plain data
  parallelism does), ``placed`` (``placement=kronjax.Placement(mesh)``:
  each factor's refresh on one device, results all-gathered) and
  ``sharded`` (``Placement(mesh, sharded=True)``: factors stored split by
  rows, rows exchanged by all-to-all); each with a refresh on every step (``inverse_every=1``,
  the refresh's cost made visible) and with none (``inverse_every`` off: the
  layouts' per-step overhead);
- memory per device from ``Compiled.memory_analysis()``: the K-FAC state
  (the step's outputs minus the params) and the step's temporaries, for this
  MLP and a wide one, 1024-2048-2048-10 (compiled, not run).

On a machine with fewer cores than simulated devices, the devices share the
cores: the timings then show the overheads of partitioning and collectives,
not speed-ups, whereas the per-device work and memory are what a real
multi-device run divides. Medians of repeats after compilation, the six
steps timed round robin; float32, CPU, one OpenBLAS thread per process.

Usage: python benchmarks/distributed.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results"
DEVICE_COUNTS = (1, 2, 4, 8)
WIDTHS = (192, 128, 96, 64, 48)
WIDE = (1024, 2048, 2048)  # memory only
BATCH = 256


LAYOUTS = {"replicated": None, "placed": False, "sharded": True}  # sharded=


def worker(n: int, repeats: int) -> dict:
  """Measures one device count; jax sees ``n`` devices."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import kronjax
  from kronjax import _distributed

  assert jax.device_count() == n, (jax.device_count(), n)
  ce = kronjax.losses.softmax_cross_entropy

  class Mlp(nn.Module):
    widths: tuple[int, ...] = WIDTHS

    @nn.compact
    def __call__(self, x):
      for width in self.widths:
        x = jnp.tanh(nn.Dense(width)(x))
      return nn.Dense(10)(x)

  mesh = jax.make_mesh((n,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  model = Mlp()
  x = jax.random.normal(jax.random.key(0), (BATCH, 64))
  y = jnp.arange(BATCH) % 10
  params = jax.device_put(model.init(jax.random.key(1), x)["params"], rep)
  tape_fn = kronjax.flax.value_grad_and_tape(model, ce, fisher="mc")
  x, y = jax.device_put((x, y), data)

  def make_tx(layout, every):
    sharded = LAYOUTS[layout]
    placement = (None if sharded is None
                 else kronjax.Placement(mesh, "data", sharded=sharded))
    return kronjax.kfac(0.1, damping=1e-2, inverse_every=every,
                        placement=placement)

  def step_fn(tx, tape_fn):
    # The batch is an argument: closed over, jit would take it as a constant
    # and every device would compute the whole batch.
    def step(params, state, x, y, rng):
      loss, grads, tape = tape_fn(params, x, y, rng)
      updates, state = tx.update(grads, state, params, curvature=tape)
      return optax.apply_updates(params, updates), state, loss
    return step

  out = {"devices": n}
  runs = {}
  for layout in LAYOUTS:
    for every, label in ((1, "refresh"), (10 ** 9, "no_refresh")):
      tx = make_tx(layout, every)
      state = jax.jit(tx.init)(params)
      compiled = jax.jit(step_fn(tx, tape_fn)).lower(
          params, state, x, y, jax.random.key(2)).compile()
      p, s, _ = compiled(params, state, x, y, jax.random.key(2))  # refresh
      runs[f"{layout}_{label}"] = (compiled, p, s)
      if label == "refresh":
        mem = compiled.memory_analysis()
        params_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
        out[f"{layout}_state_kib"] = (mem.output_size_in_bytes
                                      - params_bytes) / 2 ** 10
        out[f"{layout}_temp_kib"] = mem.temp_size_in_bytes / 2 ** 10
  # Round robin, so that the machine's load drifts over all alike.
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, (compiled, p, s) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(p, s, x, y, jax.random.key(3)))
      times[name].append(time.perf_counter() - start)
  for name, ts in times.items():
    out[f"{name}_ms"] = 1e3 * sorted(ts)[len(ts) // 2]
  # Memory of a wide MLP's step (compiled, not run), a refresh every step.
  wide = Mlp(WIDE[1:])
  wide_x = jax.device_put(jnp.zeros((BATCH, WIDE[0])), data)
  wide_params = jax.device_put(
      wide.init(jax.random.key(0), wide_x[:1])["params"], rep)
  wide_tape_fn = kronjax.flax.value_grad_and_tape(wide, ce, fisher="mc")
  params_mib = sum(a.nbytes for a in jax.tree.leaves(wide_params)) / 2 ** 20
  for layout in LAYOUTS:
    tx = make_tx(layout, 1)
    mem = jax.jit(step_fn(tx, wide_tape_fn)).lower(
        wide_params, jax.jit(tx.init)(wide_params), wide_x, y,
        jax.random.key(0)).compile().memory_analysis()
    out[f"wide_{layout}_state_mib"] = (mem.output_size_in_bytes / 2 ** 20
                                       - params_mib)
    out[f"wide_{layout}_temp_mib"] = mem.temp_size_in_bytes / 2 ** 20

  state = jax.jit(make_tx("placed", 10).init)(params)
  (state,) = [z for z in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, kronjax.KfacState))
              if isinstance(z, kronjax.KfacState)]
  factors = state.factors
  costs = {(k, side): _distributed.factor_cost(getattr(f, side).ema)
           for k, f in factors.items() for side in "ag"}
  owners = _distributed.Plan(factors, n).owners
  per_device = [[k for k in costs if owners[k] == i] for i in range(n)]
  busiest = max(range(n), key=lambda i: sum(costs[k] for k in per_device[i]))
  dense = lambda item: getattr(factors[item[0]], item[1]).ema.ndim == 2
  out["eigh_total"] = sum(map(dense, costs))
  out["eigh_busiest"] = sum(map(dense, per_device[busiest]))
  out["cost_total"] = sum(costs.values())
  out["cost_busiest"] = sum(costs[k] for k in per_device[busiest])
  out["factors_per_device"] = [len(ks) for ks in per_device]
  out["jax"] = jax.__version__
  return out


def _table(rows, cores) -> str:
  lines = [
      f"jax {rows[0]['jax']}, CPU, float32, simulated devices "
      f"(`--xla_force_host_platform_device_count`) on {cores} cores; "
      f"MLP 64-{'-'.join(map(str, WIDTHS))}-10, batch {BATCH}, "
      "kronjax.kfac fixed step, π-split; medians of repeats after "
      "compilation.", "",
      "Work per device from the placement (what a real device count "
      "divides):", "",
      "| devices | decompositions, busiest device | of all "
      "| Σd³, busiest device | share of Σd³ | factors per device |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['devices']} | {r['eigh_busiest']} | {r['eigh_total']} | "
        f"{r['cost_busiest']:.3g} | {r['cost_busiest'] / r['cost_total']:.2f}"
        f" | {r['factors_per_device']} |")
  lines += [
      "", "Memory per device (`Compiled.memory_analysis()` of the step with "
      "a refresh): the K-FAC state (outputs minus params) and the step's "
      f"temporaries, KiB; the same for MLP {'-'.join(map(str, WIDE))}-10, "
      "MiB.", "",
      "| devices | state: replicated / placed / sharded | temp: replicated / "
      "placed / sharded | wide state | wide temp |", "|---|---|---|---|---|"]
  for r in rows:
    trio = lambda fmt: " / ".join(format(r[fmt.format(l)], ".0f")
                                  for l in LAYOUTS)
    lines.append(
        f"| {r['devices']} | {trio('{}_state_kib')} | {trio('{}_temp_kib')} "
        f"| {trio('wide_{}_state_mib')} | {trio('wide_{}_temp_mib')} |")
  lines += [
      "", f"Step time (ms) on {cores} shared cores: overheads of "
      "partitioning and collectives, not speed-ups.", "",
      "| devices | replicated, refresh | placed, refresh | sharded, refresh "
      "| replicated, no refresh | placed, no refresh | sharded, no refresh |",
      "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append("| " + " | ".join(
        [str(r["devices"])] + [f"{r[f'{l}_{k}_ms']:.1f}"
                               for k in ("refresh", "no_refresh")
                               for l in LAYOUTS]) + " |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="devices 1 and 4, fewer repeats; no results file")
  parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.repeats)))
    return
  counts = (1, 4) if args.quick else DEVICE_COUNTS
  repeats = 5 if args.quick else args.repeats
  rows = []
  for n in counts:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(n), "--repeats",
         str(repeats)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      sys.exit(f"{n} devices failed:\n{proc.stderr}")
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
  cores = os.cpu_count()
  table = _table(rows, cores)
  print(table)
  if not args.quick:
    RESULTS.mkdir(exist_ok=True)
    meta = {"cores": cores, "machine": platform.machine(), "batch": BATCH,
            "widths": WIDTHS, "wide": WIDE}
    (RESULTS / "distributed.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / "distributed.md").write_text(table)


if __name__ == "__main__":
  main()
