"""Data-parallel K-FAC and placed refreshes on 1, 2, 4 and 8 devices.

For each device count a fresh process (``XLA_FLAGS`` must be set before jax
starts) builds a 1-D ``"data"`` mesh and measures, for an MLP
64-256-192-128-96-64-10 (12 factors of sizes 10 to 257):

- the placement (``kronjax._placement.assign_layers``): refreshes and
  ``Σ d³`` of the busiest device, against one device doing all of them;
- the refresh of all layers' eigendecompositions: a plain loop (every device
  repeats all of it, as plain data parallelism does) and placed
  (``refresh_eighs(..., mesh, "data")``: each device computes its layers,
  one all-reduce shares them);
- a whole train step (tape, blocks, ``kronjax.kfac`` fixed step) with the
  batch sharded over the mesh and an eigendecomposition refresh on every
  step: replicated (``inverse_every=1``) and placed (``inverse_every`` off;
  the step refreshes the state's factors with ``refresh_eighs`` itself, which
  is what ``scale_by_kfac(inverse_mesh=...)`` will do).

On a machine with fewer cores than simulated devices, the devices share the
cores: the timings then show the overheads of partitioning and collectives,
not speed-ups, whereas the per-device work is what a real multi-device run
divides. Best of repeats after compilation, float32, CPU.

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
BATCH = 256


def _median_ms(fn, repeats):
  fn()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)  # the least disturbed by other processes


def worker(n: int, repeats: int) -> dict:
  """Measures one device count; jax sees ``n`` devices."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import kronjax
  from kronjax import _placement

  assert jax.device_count() == n, (jax.device_count(), n)
  ce = kronjax.losses.softmax_cross_entropy

  class Mlp(nn.Module):

    @nn.compact
    def __call__(self, x):
      for width in WIDTHS:
        x = jnp.tanh(nn.Dense(width)(x))
      return nn.Dense(10)(x)

  mesh = jax.make_mesh((n,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  model = Mlp()
  x = jax.random.normal(jax.random.key(0), (BATCH, 64))
  y = jnp.arange(BATCH) % 10
  params = model.init(jax.random.key(1), x)["params"]
  tape_fn = kronjax.flax.value_grad_and_tape(model, ce, fisher="mc")
  is_kfac = lambda s: isinstance(s, kronjax.KfacState)

  def make_step(tx, placed):
    def step(params, state, rng):
      loss, grads, tape = tape_fn(params, x, y, rng)
      updates, state = tx.update(grads, state, params,
                                 curvature=kronjax.fisher_blocks(tape))
      if placed:
        state = jax.tree.map(
            lambda s: s._replace(factors=_placement.refresh_eighs(
                s.factors, 0.0, mesh, "data")) if is_kfac(s) else s,
            state, is_leaf=is_kfac)
      return optax.apply_updates(params, updates), state, loss
    return jax.jit(step)

  x, y = jax.device_put((x, y), data)
  out = {"devices": n}
  steps = {}
  for name, every, placed in (("replicated", 1, False),
                              ("placed", 10 ** 9, True)):
    tx = kronjax.kfac(0.1, damping=1e-2, inverse_every=every)
    p, s = jax.device_put((params, tx.init(params)), rep)
    step = make_step(tx, placed)
    p, s, _ = step(p, s, jax.random.key(2))  # factors to refresh
    steps[name] = (step, p, s)
    out[f"step_{name}_ms"] = _median_ms(
        lambda: jax.block_until_ready(step(p, s, jax.random.key(3))),
        repeats)

  (state,) = [z for z in jax.tree.leaves(steps["placed"][2], is_leaf=is_kfac)
              if is_kfac(z)]
  factors = state.factors
  costs = {k: _placement.layer_cost(f) for k, f in factors.items()}
  owners = _placement.assign_layers(costs, n)
  per_device = [[k for k in costs if owners[k] == i] for i in range(n)]
  busiest = max(range(n), key=lambda i: sum(costs[k] for k in per_device[i]))
  out["eigh_total"] = sum(2 - (f.a.ndim == 1) for f in factors.values())
  out["eigh_busiest"] = sum(2 - (factors[k].a.ndim == 1)
                            for k in per_device[busiest])
  out["cost_total"] = sum(costs.values())
  out["cost_busiest"] = sum(costs[k] for k in per_device[busiest])
  out["layers_per_device"] = [len(ks) for ks in per_device]
  for name, m in (("loop", None), ("placed", mesh)):
    refresh = jax.jit(lambda fs, m=m: _placement.refresh_eighs(fs, 0.0, m))
    out[f"refresh_{name}_ms"] = _median_ms(
        lambda: jax.block_until_ready(refresh(factors)), repeats)
  out["jax"] = jax.__version__
  return out


def _table(rows, cores) -> str:
  lines = [
      f"jax {rows[0]['jax']}, CPU, float32, simulated devices "
      f"(`--xla_force_host_platform_device_count`) on {cores} cores; "
      f"MLP 64-{'-'.join(map(str, WIDTHS))}-10, batch {BATCH}, "
      "best of repeats after compilation.", "",
      "Work per device from the placement (what a real device count "
      "divides):", "",
      "| devices | eigh, busiest device | of all | Σd³, busiest device "
      "| share of Σd³ | layers per device |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['devices']} | {r['eigh_busiest']} | {r['eigh_total']} | "
        f"{r['cost_busiest']:.3g} | {r['cost_busiest'] / r['cost_total']:.2f}"
        f" | {r['layers_per_device']} |")
  lines += [
      "", f"Wall-clock times (ms) on {cores} shared cores: overheads of "
      "partitioning and collectives, not speed-ups.", "",
      "| devices | refresh, loop | refresh, placed | step, replicated refresh "
      "| step, placed refresh |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['devices']} | {r['refresh_loop_ms']:.1f} | "
        f"{r['refresh_placed_ms']:.1f} | {r['step_replicated_ms']:.1f} | "
        f"{r['step_placed_ms']:.1f} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="devices 1 and 4, fewer repeats; no results file")
  parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.repeats)))
    return
  counts = (1, 4) if args.quick else DEVICE_COUNTS
  repeats = 3 if args.quick else args.repeats
  rows = []
  for n in counts:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS":
           f"--xla_force_host_platform_device_count={n}"}
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
            "widths": WIDTHS}
    (RESULTS / "distributed.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / "distributed.md").write_text(table)


if __name__ == "__main__":
  main()
