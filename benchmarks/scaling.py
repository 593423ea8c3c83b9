"""K-FAC step time and optimizer-state memory against Adam, as models grow.

Model: a Flax linen MLP 784-w-w-w-10 (three ReLU hidden layers of width w),
softmax cross-entropy on random inputs and labels, float32, CPU. Two sweeps:

* **width**: w in 128 ... 4096 at a fixed batch (``--width-batch``, 512);
* **batch**: N in 64 ... 4096 at a fixed width (``--batch-width``, 512).

Optimizers, each a whole train step (forward, backward, tape and Fisher
blocks for K-FAC, update, apply):

* ``adam``: ``optax.adam(1e-3)`` on ``jax.value_and_grad``; one ``jax.jit``.
* ``kronjax``: ``kronjax.kfac(learning_rate=1e-3, damping=1e-3)`` (fixed
  step; ``inverse_every=10``, ``decay=0.95``, the π-corrected damping with
  cached damped inverses: kronjax's defaults) on ``kronjax.flax.value_grad_and_tape(model,
  softmax_cross_entropy)`` (one Monte-Carlo sample) and
  ``kronjax.fisher_blocks``; one ``jax.jit``.
* ``kfac-jax`` (where ``kfac_jax`` imports, i.e. in the environment of
  ``benchmarks/requirements-kfac-jax.txt``): ``kfac_jax.Optimizer`` with
  constant learning rate 1e-3, momentum 0 and damping 1e-3,
  ``estimation_mode="fisher_gradients"`` (one MC sample), ``curvature_ema=0.95``,
  factors every step, ``inverse_update_period=10``, its default pi-damped
  factored inverses (``use_exact_inverses=False``); compiled by kfac-jax.

Step time. Both K-FACs refresh their eigendecompositions (kronjax) / inverses
(kfac-jax) on every step whose count is a multiple of 10 (the first one
included), so a step is either a *refresh* step or a *plain* step. After
compilation (kronjax and Adam: ahead of time with ``.lower().compile()``, so
kronjax's first executed step is a timed refresh step; kfac-jax: its first two
steps run untimed), the optimizers run in rounds, interleaved and with the
order rotated each round: a round is each optimizer's plain steps up to its
next refresh (timed together, ``block_until_ready`` at the end) and then, in
full-cycle mode, its refresh step (timed alone). The amortised step time is

    (median refresh time + 9 x median plain-step time) / 10,

what a long run pays per step; the table also gives the plain-step time alone
(what a larger ``inverse_every`` tends to) and the refresh time. Each point
gets as many rounds as fit in ``--point-budget`` seconds (at least one, at
most ``--max-repeats``). Where one cycle would take longer than
``--cycle-cap`` (width 4096 on two cores), a point is measured in partial mode:
a few plain steps and the refresh time of kronjax's first step; kfac-jax's
first refresh is inside its compilation, so it is not timed there (memory is
still reported). Widths above ``--timed-max-width`` get memory only.

Memory: optimizer-state bytes (sum of ``nbytes`` over the leaves of the optax
state, or kfac-jax's state) over parameter bytes, from ``jax.eval_shape``
(nothing is allocated), for every width and batch.

Usage::

  /work/venv-kfacjax/bin/python benchmarks/scaling.py           # full run (~10 min)
  /work/venv-kfacjax/bin/python benchmarks/scaling.py --quick   # smoke run
  /work/venv/bin/python benchmarks/scaling.py                   # without kfac-jax

Writes ``benchmarks/results/scaling.{json,md,png}`` (``--out`` to change;
``--quick`` writes to a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  import kfac_jax
  KFAC_JAX_ERROR = None
except Exception as e:  # pylint: disable=broad-except
  kfac_jax = None
  KFAC_JAX_ERROR = f"kfac-jax not importable: {e!r}"

import kronjax  # pylint: disable=wrong-import-position
import kronjax.flax  # pylint: disable=wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _autoencoder as ae  # pylint: disable=wrong-import-position  (kronjax_source)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
INVERSE_EVERY = 10     # kronjax's default inverse_every; kfac-jax inverse_update_period
LR, DAMPING, DECAY = 1e-3, 1e-3, 0.95
IN_DIM, CLASSES, DEPTH = 784, 10, 3


class MLP(nn.Module):
  """784-w-...-w-10, ReLU, logits."""
  width: int
  depth: int = DEPTH

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = jax.nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(CLASSES)(x)


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def tree_bytes(tree) -> int:
  return int(sum(np.prod(l.shape, dtype=np.int64) * np.dtype(l.dtype).itemsize
                 for l in jax.tree.leaves(tree) if hasattr(l, "shape")))


@dataclasses.dataclass
class Stepper:
  """One optimizer at one point: a step function and its running state."""
  name: str
  step: Callable[..., Any]          # (state, x, y, key) -> (state, loss)
  state: Any
  refresh_every: int | None         # None: every step is a plain step
  count: int = 0
  compile_s: float | None = None
  plain_ms: list = dataclasses.field(default_factory=list)
  refresh_ms: list = dataclasses.field(default_factory=list)

  def is_refresh(self) -> bool:
    return self.refresh_every is not None and self.count % self.refresh_every == 0

  def run(self, n, x, y, keys) -> float:
    """Runs n steps, returns seconds (block_until_ready at the end)."""
    t0 = time.perf_counter()
    state, loss = self.state, None
    for i in range(n):
      state, loss = self.step(state, x, y, keys[(self.count + i) % len(keys)])
    jax.block_until_ready((state, loss))
    dt = time.perf_counter() - t0
    self.state, self.count = state, self.count + n
    return dt


def make_adam(model, params, x, y) -> Stepper:
  tx = optax.adam(LR)

  def step(state, x, y, key):
    del key
    p, s = state
    loss, g = jax.value_and_grad(lambda p: _ce(model.apply({"params": p}, x), y))(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), loss

  return Stepper("adam", step, (params, tx.init(params)), None)


def kronjax_tx():
  return kronjax.kfac(learning_rate=LR, damping=DAMPING)


def make_kronjax(model, params, x, y) -> Stepper:
  tx = kronjax_tx()
  tape_fn = kronjax.flax.value_grad_and_tape(model, kronjax.losses.softmax_cross_entropy)

  def step(state, x, y, key):
    p, s = state
    loss, g, tape = tape_fn(p, x, y, key)
    u, s = tx.update(g, s, p, curvature=kronjax.fisher_blocks(tape))
    return (optax.apply_updates(p, u), s), loss

  return Stepper("kronjax", step, (params, tx.init(params)), INVERSE_EVERY)


def kfac_jax_optimizer(model):
  def loss_fn(p, batch):
    x, y = batch
    logits = model.apply({"params": p}, x)
    kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    return _ce(logits, y)

  return kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
      learning_rate_schedule=optax.constant_schedule(LR),
      momentum_schedule=optax.constant_schedule(0.0),
      damping_schedule=optax.constant_schedule(DAMPING),
      estimation_mode="fisher_gradients", curvature_ema=DECAY,
      curvature_update_period=1, inverse_update_period=INVERSE_EVERY,
      num_burnin_steps=0, multi_device=False)


def make_kfac_jax(model, params, x, y) -> Stepper:
  opt = kfac_jax_optimizer(model)
  state = opt.init(params, jax.random.key(1), (x, y))

  def step(s, x, y, key):
    p, st, i = s
    p, st, stats = opt.step(p, st, key, batch=(x, y), global_step_int=i)
    return (p, st, i + 1), stats["loss"]

  return Stepper("kfac-jax", step, (params, state, 0), INVERSE_EVERY)


def state_bytes(model, params, x, y) -> dict:
  """Optimizer-state bytes per optimizer, from abstract evaluation."""
  out = dict(params=tree_bytes(params))
  out["adam"] = tree_bytes(jax.eval_shape(optax.adam(LR).init, params))
  out["kronjax"] = tree_bytes(jax.eval_shape(kronjax_tx().init, params))
  if kfac_jax is not None:
    opt = kfac_jax_optimizer(model)
    try:
      out["kfac-jax"] = tree_bytes(jax.eval_shape(
          lambda p, b: opt.init(p, jax.random.key(1), b), params, (x, y)))
    except Exception as e:  # pylint: disable=broad-except
      out["kfac-jax"] = None
      out["kfac-jax error"] = repr(e)
  return out


def _point(width: int, batch: int):
  model = MLP(width)
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (batch, IN_DIM), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, CLASSES)
  params = model.init(jax.random.key(2), x[:1])["params"]
  return model, params, x, y


def memory_row(width: int, batch: int) -> dict:
  """A result row with the memory filled in and no timing yet."""
  model, params, x, y = _point(width, batch)
  return dict(width=width, batch=batch,
              n_params=int(sum(l.size for l in jax.tree.leaves(params))),
              memory=state_bytes(model, params, x, y), timing=None,
              mode="not timed", rounds=0, notes=[])


def measure_point(row: dict, args, with_kfac_jax: bool) -> dict:
  """Times every optimizer at the row's (width, batch); fills the row in."""
  width, batch = row["width"], row["batch"]
  model, params, x, y = _point(width, batch)
  keys = list(jax.random.split(jax.random.key(3), 4 * INVERSE_EVERY))

  steppers = [make_adam(model, params, x, y), make_kronjax(model, params, x, y)]
  for s in steppers:             # ahead-of-time compilation: no step runs
    t0 = time.perf_counter()
    s.step = jax.jit(s.step).lower(s.state, x, y, keys[0]).compile()
    s.compile_s = time.perf_counter() - t0
  for s in steppers:             # first step: adam plain, kronjax refresh
    (s.refresh_ms if s.is_refresh() else s.plain_ms).append(
        s.run(1, x, y, keys) * 1e3)
  notes = []
  if with_kfac_jax:
    kj = make_kfac_jax(model, params, x, y)
    t0 = time.perf_counter()
    kj.run(2, x, y, keys)        # compiles (and refreshes at step 0): untimed
    kj.compile_s = time.perf_counter() - t0
    steppers.append(kj)

  # one plain step each, to size the run
  for s in steppers:
    s.plain_ms.append(s.run(1, x, y, keys) * 1e3)
  plain = {s.name: s.plain_ms[-1] / 1e3 for s in steppers}
  kr = steppers[1]
  # One cycle of every optimizer (kfac-jax's refresh is not known yet).
  cycle_s = sum(plain[s.name] * (INVERSE_EVERY - 1) for s in steppers) + \
      kr.refresh_ms[0] / 1e3
  full = cycle_s <= args.cycle_cap
  if full:
    rounds = int(np.clip(args.point_budget // max(cycle_s, 1e-9), 1,
                         args.max_repeats))
  else:
    rounds = 1
    k = int(np.clip(args.point_budget / 2 // max(sum(plain.values()), 1e-9), 1,
                    INVERSE_EVERY - 2))
    if with_kfac_jax:
      notes.append("kfac-jax: partial mode (one cycle too long): its refresh "
                   "is not timed, so no amortised time")
  for r in range(rounds):
    rot = r % len(steppers)
    for s in steppers[rot:] + steppers[:rot]:
      if full:
        if s.refresh_every is None:
          n = INVERSE_EVERY - 1
        else:
          n = (-s.count) % s.refresh_every   # plain steps before the next refresh
        if n:
          s.plain_ms.append(s.run(n, x, y, keys) / n * 1e3)
        if s.refresh_every is None:
          s.plain_ms.append(s.run(1, x, y, keys) * 1e3)
        else:
          assert s.is_refresh()
          s.refresh_ms.append(s.run(1, x, y, keys) * 1e3)
      else:
        n = k if s.refresh_every is None else min(k, (-s.count) % s.refresh_every)
        if n:
          s.plain_ms.append(s.run(n, x, y, keys) / n * 1e3)

  res = {}
  for s in steppers:
    p = statistics.median(s.plain_ms)
    if s.refresh_every is None:
      amort, ref = p, None
    elif s.refresh_ms:
      ref = statistics.median(s.refresh_ms)
      amort = (ref + (s.refresh_every - 1) * p) / s.refresh_every
    else:
      amort, ref = None, None
    res[s.name] = dict(amortised_ms=amort, plain_ms=p, refresh_ms=ref,
                       compile_s=s.compile_s, plain_samples=s.plain_ms,
                       refresh_samples=s.refresh_ms)
  adam = res["adam"]["amortised_ms"]
  for name, v in res.items():
    v["ratio_to_adam"] = None if v["amortised_ms"] is None else v["amortised_ms"] / adam
    v["plain_ratio_to_adam"] = v["plain_ms"] / adam
  row.update(timing=res, mode="full cycles" if full else "partial",
             rounds=rounds, notes=notes)
  if not with_kfac_jax and kfac_jax is not None:
    row["notes"].append(f"kfac-jax not timed above width {args.kfac_jax_max_width}")
  mem = row["memory"]
  print(f"width {width:5d} batch {batch:5d} ({row['mode']}, {rounds} rounds): " +
        "  ".join(f"{n} {v['amortised_ms'] or float('nan'):.1f} ms "
                  f"(x{v['ratio_to_adam'] or float('nan'):.2f}, plain "
                  f"x{v['plain_ratio_to_adam']:.2f})" for n, v in res.items()) +
        "  state/params: " + "  ".join(
            f"{n} {mem[n] / mem['params']:.2f}" for n in ("adam", "kronjax", "kfac-jax")
            if mem.get(n) is not None), flush=True)
  return row


def environment() -> dict:
  return ae.environment(("jax", "jaxlib", "flax", "optax", "numpy", "kfac_jax",
                         "kronjax"))


def _f(v, fmt="{:.2f}"):
  return "—" if v is None else fmt.format(v)


def _table(rows, key, names) -> list[str]:
  head = (f"| {key} | params | " + " | ".join(
      f"{n} ms/step" for n in names) + " | " + " | ".join(
          f"{n} / adam (plain)" for n in names if n != "adam") +
          " | kronjax refresh ms | " + " | ".join(
              f"{n} state / params" for n in names) + " |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    t, m = r["timing"] or {"kronjax": {"refresh_ms": None}}, r["memory"]
    lines.append(
        f"| {r[key]} | {r['n_params'] / 1e6:.2f}M | " + " | ".join(
            _f(t.get(n, {}).get("amortised_ms"), "{:.1f}") for n in names) + " | " +
        " | ".join(
            f"{_f(t.get(n, {}).get('ratio_to_adam'))}x "
            f"({_f(t.get(n, {}).get('plain_ratio_to_adam'))}x)"
            for n in names if n != "adam") +
        f" | {_f(t['kronjax']['refresh_ms'], '{:.0f}')} | " + " | ".join(
            _f(m[n] / m["params"] if m.get(n) is not None else None)
            for n in names) + " |")
  return lines


def write_markdown(path: pathlib.Path, res: dict) -> None:
  env = res["environment"]
  names = ["adam", "kronjax"] + (["kfac-jax"] if res["kfac_jax"] else [])
  lines = [
      "# K-FAC scaling: step time and optimizer state against Adam", "",
      f"Command: `{res['command']}`", "",
      f"MLP {IN_DIM}-w-w-w-{CLASSES} (ReLU), softmax cross-entropy, random "
      f"data, float32, {env['backend']} with {env['cpus']} cores. kronjax: "
      f"`kronjax.kfac(learning_rate={LR}, damping={DAMPING})` (inverse_every="
      f"{INVERSE_EVERY}, decay {DECAY}, π-corrected damping: defaults), whole jitted "
      f"step with tape and blocks. Adam: `optax.adam({LR})`. "
      + ("kfac-jax: fixed lr / damping, momentum 0, inverse_update_period "
         f"{INVERSE_EVERY}, curvature_ema {DECAY}, its default pi-damped inverses. "
         if res["kfac_jax"] else f"kfac-jax: skipped ({KFAC_JAX_ERROR}). ") +
      "ms/step = amortised step time, (median refresh-step time + "
      f"{INVERSE_EVERY - 1} x median plain-step time) / {INVERSE_EVERY}; "
      "x Adam = that over Adam's; (plain) = a step without the refresh over "
      "Adam's. State / params = optimizer-state bytes over parameter bytes "
      "(leaf nbytes, from `jax.eval_shape`).", "",
  ] + ([] if res["complete"] else [
      "**Incomplete run** (interrupted, or still running): rows without "
      "times were not measured.", ""]) + [
      f"## Width (batch {res['width_batch']})", "",
  ] + _table(res["width_sweep"], "width", names) + [
      "", f"## Batch (width {res['batch_width']})", "",
  ] + _table(res["batch_sweep"], "batch", names) + ["", "Measurement per point:", ""]
  for r in res["width_sweep"] + res["batch_sweep"]:
    t = r["timing"]
    if t is None:
      lines.append(f"- width {r['width']}, batch {r['batch']}: not timed "
                   f"(memory only)")
      continue
    lines.append(
        f"- width {r['width']}, batch {r['batch']}: {r['mode']}, {r['rounds']} "
        f"round(s); samples (plain / refresh): " + "; ".join(
            f"{n} {len(v['plain_samples'])} / {len(v['refresh_samples'])}"
            for n, v in t.items()) + "; compile s: " + ", ".join(
                f"{n} {v['compile_s']:.1f}" for n, v in t.items()) +
        ("; " + "; ".join(r["notes"]) if r["notes"] else ""))
  lines += ae.environment_lines(env, res["total_seconds"],
                                "the interleaved rounds keep")
  path.write_text("\n".join(lines))


def plot(path: pathlib.Path, res: dict) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  names = ["kronjax"] + (["kfac-jax"] if res["kfac_jax"] else [])
  for ax, rows, key, title in (
      (axes[0], res["width_sweep"], "width", f"batch {res['width_batch']}"),
      (axes[1], res["batch_sweep"], "batch", f"width {res['batch_width']}")):
    rows = [r for r in rows if r["timing"]]
    if not rows:
      ax.set_title(f"step time vs {key}: not measured (yet)")
      continue
    for n, c in zip(names, ("C0", "C1")):
      xs = [r[key] for r in rows]
      amort = [(r["timing"] or {}).get(n, {}).get("ratio_to_adam") for r in rows]
      plain = [(r["timing"] or {}).get(n, {}).get("plain_ratio_to_adam") for r in rows]
      nanify = lambda v: [np.nan if a is None else a for a in v]
      ax.plot(xs, nanify(amort), "o-", color=c, label=f"{n} (amortised)")
      ax.plot(xs, nanify(plain), "x--", color=c, label=f"{n} (plain step)")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")   # the line at 1 keeps the log scale valid
    ax.set_xlabel(key)
    ax.set_ylabel("step time / Adam step time")
    ax.set_title(f"step time vs {key} ({title})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  ax = axes[2]
  rows = res["width_sweep"]
  for n, c in zip(["adam"] + names, ("C2", "C0", "C1")):
    ys = [r["memory"][n] / r["memory"]["params"] if r["memory"].get(n) else np.nan
          for r in rows]
    ax.plot([r["width"] for r in rows], ys, "o-", color=c, label=n)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("width")
  ax.set_ylabel("optimizer-state bytes / parameter bytes")
  ax.set_title("optimizer state vs width")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--widths", type=int, nargs="+",
                 default=[128, 256, 512, 1024, 2048, 4096])
  p.add_argument("--width-batch", type=int, default=512)
  p.add_argument("--batches", type=int, nargs="+",
                 default=[64, 128, 256, 512, 1024, 2048, 4096])
  p.add_argument("--batch-width", type=int, default=512)
  p.add_argument("--kfac-jax-max-width", type=int, default=2048,
                 help="time kfac-jax up to this width (memory at every width)")
  p.add_argument("--timed-max-width", type=int, default=4096,
                 help="time widths up to this (wider: memory only)")
  p.add_argument("--point-budget", type=float, default=20.0,
                 help="seconds of timed rounds per point (roughly; at least "
                 "one round)")
  p.add_argument("--cycle-cap", type=float, default=300.0,
                 help="longest cycle (all optimizers, seconds) measured as a "
                 "whole; longer points are measured in partial mode")
  p.add_argument("--max-repeats", type=int, default=7)
  p.add_argument("--quick", action="store_true",
                 help="smoke run: width 64, batches 64 128, short rounds")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="output folder (default benchmarks/results; a temporary "
                 "folder for --quick)")
  args = p.parse_args(argv)
  if args.quick:
    args.widths, args.batches, args.batch_width = [64], [64, 128], 64
    args.width_batch, args.point_budget, args.max_repeats = 64, 1.0, 2
  t_start, load_start = time.perf_counter(), os.getloadavg()
  source = ae.kronjax_source()   # before measuring: the code that is measured
  if kfac_jax is None:
    print(f"[skip] kfac-jax: {KFAC_JAX_ERROR}", flush=True)
  out = ae.output_dir(args.out, args.quick, RESULTS)
  stem = "scaling_quick" if args.quick else "scaling"
  command = "python benchmarks/scaling.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  width_rows = [memory_row(w, args.width_batch) for w in args.widths]
  batch_rows = [memory_row(args.batch_width, b) for b in args.batches]

  def save(complete: bool) -> None:
    env = environment()
    env["load_average_at_start"] = load_start
    env["kronjax_source"] = source
    res = dict(
        command=command, complete=complete,
        inverse_every=INVERSE_EVERY, learning_rate=LR, damping=DAMPING,
        decay=DECAY, width_batch=args.width_batch, batch_width=args.batch_width,
        kfac_jax=kfac_jax is not None, kfac_jax_error=KFAC_JAX_ERROR,
        kfac_jax_max_width=args.kfac_jax_max_width,
        timed_max_width=args.timed_max_width, point_budget=args.point_budget,
        cycle_cap=args.cycle_cap, width_sweep=width_rows, batch_sweep=batch_rows,
        environment=env, total_seconds=time.perf_counter() - t_start)
    ae.write_report(out, stem, res, write_markdown, plot_or_warn)

  # Cheapest first (the batch sweep, then widths upwards), saving after each
  # point, so that an interrupted run still leaves every finished point.
  done = {}
  for row in batch_rows + width_rows:
    key = (row["width"], row["batch"])
    if row["width"] > args.timed_max_width:
      row["notes"].append(f"not timed: width above --timed-max-width "
                          f"{args.timed_max_width}")
      continue
    if key in done:              # the point both sweeps share: measured once
      row.update({k: v for k, v in done[key].items() if k not in ("width", "batch")})
      continue
    measure_point(row, args, kfac_jax is not None
                  and row["width"] <= args.kfac_jax_max_width)
    done[key] = row
    save(complete=False)
  save(complete=True)
  ae.print_report(out, stem)


def plot_or_warn(path: pathlib.Path, res: dict) -> None:
  """:func:`plot`, reporting a failure instead of stopping the run."""
  try:
    plot(path, res)
  except Exception as e:  # pylint: disable=broad-except  (a plot never stops a run)
    print(f"[plot failed] {e!r}", flush=True)


if __name__ == "__main__":
  main()
