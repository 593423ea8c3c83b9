"""MNIST deep autoencoder against the clock: held-out loss per second,
compilation included.

The protocol of issue 15: the 784-1000-500-250-30 autoencoder of
``mnist_autoencoder.py`` (sigmoid units, linear code, logits out, sigmoid BCE
summed over pixels, mean over the batch), batch 500, float32, CPU. Each
optimizer trains in a fresh Python process for ``--budget`` seconds of wall
clock, counted from its first call of the (not yet compiled) train step, so
tracing and compiling are part of its time. Every ``--eval-every`` seconds
the clock is stopped and the loss on the 10,000 held-out test images is
measured.

* ``adam``: ``optax.adam(lr)`` for each lr of ``--adam-lrs``; the best is
  the one with the lowest held-out loss at the end of the budget. Its value
  is the target.
* ``kronjax adaptive``: ``kronjax.kfac(loss=...)``, kronjax's defaults.
* ``kfac-jax adaptive``: as in ``mnist_autoencoder.py`` (only where
  ``kfac_jax`` imports: ``/work/venv-kfacjax``-style environments).

Headline: the seconds each optimizer needs to reach Adam's best held-out loss
(the first evaluation at or below it), and its held-out loss at half the
budget and at the end.

Usage::

  OPENBLAS_NUM_THREADS=1 /work/venv-kfacjax/bin/python benchmarks/mnist_wallclock.py
  python benchmarks/mnist_wallclock.py --budget 20 --out /tmp/w   # a quick look
  python benchmarks/mnist_wallclock.py --only "kronjax adaptive" --target 124.06 --seed 1

Writes ``benchmarks/results/mnist_wallclock.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _autoencoder as ae  # pylint: disable=wrong-import-position

BATCH = 500
ADAM_LRS = (3e-4, 1e-3, 3e-3)


def _names(adam_lrs) -> list[str]:
  return ([f"adam {lr:g}" for lr in adam_lrs]
          + ["kronjax adaptive", "kfac-jax adaptive"])


def run_one(name: str, budget: float, eval_every: float, seed: int) -> dict:
  """Trains one optimizer for ``budget`` seconds in this (fresh) process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import mnist_autoencoder as mb

  prob = mb.load_problem()
  if prob.test is None:
    return {"skipped": prob.name}
  if name.startswith("adam"):
    lr = float(name.split()[1])
    cfg = mb.make_optax(prob, "adam", optax.adam(lr), lr, {})
  elif name.startswith("kronjax"):
    cfg = mb.make_kronjax(prob)
  else:
    if mb.kfac_jax is None:
      return {"skipped": mb.aeb.KFAC_JAX_ERROR}
    cfg = mb.make_kfac_jax(prob, BATCH)
  params0 = prob.model.init(jax.random.key(seed),
                            jnp.zeros((1, prob.dim), jnp.float32))["params"]
  train = jnp.asarray(prob.train)
  test = jnp.asarray(prob.test)
  held_out = jax.jit(lambda p: ae.sigmoid_bce(
      prob.model.apply({"params": p}, test), test))
  jax.block_until_ready(held_out(params0))  # compiled outside the clock
  state = cfg.init(params0)
  jax.block_until_ready(state)
  chunk = 2000  # steps per drawn block of batch indices and MC keys
  rng = np.random.default_rng(seed)
  curve = [dict(seconds=0.0, step=0, held_out=float(held_out(params0)))]
  clock, steps, first_step_s, last_eval = 0.0, 0, None, 0.0
  while clock < budget:
    idx = ae.batch_indices(len(prob.train), chunk, int(rng.integers(1 << 30)),
                           BATCH)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed + 1),
                                               steps), chunk)
    for i in range(chunk):
      x = train[idx[i]]
      jax.block_until_ready(x)  # the batch gather is outside the clock
      t = time.perf_counter()
      state, loss = cfg.step(state, x, keys[i])
      jax.block_until_ready((state, loss))
      clock += time.perf_counter() - t
      steps += 1
      if first_step_s is None:
        first_step_s = clock
      if clock - last_eval >= eval_every or clock >= budget:
        last_eval = clock
        params = state[0]
        curve.append(dict(seconds=clock, step=steps,
                          train_loss=float(loss),
                          held_out=float(held_out(params))))
        if not np.isfinite(curve[-1]["held_out"]):
          return dict(curve=curve, first_step_s=first_step_s, diverged=True)
      if clock >= budget:
        break
  return dict(curve=curve, first_step_s=first_step_s, steps=steps,
              step_ms=(1e3 * (clock - first_step_s) / (steps - 1)
                       if steps > 1 else None))  # none after the first


def first_at_or_below(curve: list[dict], target: float):
  for point in curve:
    if point["held_out"] <= target:
      return point
  return None


def value_at(curve: list[dict], seconds: float) -> float | None:
  """The held-out loss of the last evaluation at or before ``seconds``."""
  before = [p for p in curve if p["seconds"] <= seconds + 1e-9]
  return before[-1]["held_out"] if before else None


def report(res: dict) -> list[str]:
  budget, runs = res["budget"], res["runs"]
  finite = lambda r: "curve" in r and not r.get("diverged")
  adam = {n: r for n, r in runs.items() if n.startswith("adam") and finite(r)}
  if adam:  # without Adam (--only): --target's value, if any
    best = min(adam, key=lambda n: adam[n]["curve"][-1]["held_out"])
    target = adam[best]["curve"][-1]["held_out"]
    aim = (f"Target: the best Adam's held-out loss after {budget:g} s: "
           f"**{target:.2f}** ({best}).")
  else:
    target = res.get("target")
    aim = ("No Adam run and no --target: no target." if target is None
           else f"Target: **{target:.2f}** (given as --target).")
  lines = [
      "# MNIST deep autoencoder against the clock (compilation included)", "",
      f"Command: `{res['command']}` (jax {res['jax']}, CPU, "
      f"OPENBLAS_NUM_THREADS={res['openblas_threads']}). Batch {BATCH}, "
      f"budget {budget:g} s of training per optimizer from its first "
      f"(uncompiled) step, held-out loss on the 10,000 test images every "
      f"{res['eval_every']:g} s (the clock stopped while it is measured); "
      "one fresh process per optimizer, run one after the other. "
      + ae.source_line(dict(kronjax_source=res["kronjax_source"])), "",
      aim, "",
      "| optimizer | first step s | step ms | steps | held-out at "
      f"{budget / 2:g} s | held-out at {budget:g} s | seconds to "
      + ("the target" if target is None else f"{target:.2f}") + " |",
      "|---|---|---|---|---|---|---|"]
  for n, r in runs.items():
    if "curve" not in r:
      lines.append(f"| {n} | skipped: {r.get('skipped')} | | | | | |")
      continue
    hit = None if target is None else first_at_or_below(r["curve"], target)
    half = value_at(r["curve"], budget / 2)
    lines.append(
        f"| {n} | {r['first_step_s']:.1f} | "
        + ("—" if r.get("step_ms") is None else f"{r['step_ms']:.0f}")
        + f" | {r.get('steps', '—')} | {half:.2f} | "
        f"{r['curve'][-1]['held_out']:.2f} | "
        + (f"{hit['seconds']:.1f} (step {hit['step']})" if hit
           else "—" if target is None else "not reached")
        + " |")
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--budget", type=float, default=60.0)
  p.add_argument("--eval-every", type=float, default=2.0)
  p.add_argument("--adam-lrs", type=float, nargs="*", default=ADAM_LRS)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--only", nargs="*", default=None)
  p.add_argument("--out", type=pathlib.Path, default=None)
  p.add_argument("--target", type=float, default=None,
                 help="the held-out loss to time when no Adam runs (--only)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(run_one(args.child, args.budget, args.eval_every,
                             args.seed)))
    return
  runs = {}
  start = time.time()
  for n in _names(args.adam_lrs):
    if args.only and n not in args.only:
      continue
    proc = subprocess.run(
        [sys.executable, __file__, "--child", n, "--budget", str(args.budget),
         "--eval-every", str(args.eval_every), "--seed", str(args.seed)],
        capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f"{n} failed:\n{proc.stderr[-3000:]}")
    runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    r = runs[n]
    print(n, {k: v for k, v in r.items() if k != "curve"},
          "final held-out", r["curve"][-1]["held_out"] if "curve" in r else None,
          flush=True)
  import jax
  res = dict(command=" ".join(["python", "benchmarks/mnist_wallclock.py"]
                              + (argv or sys.argv[1:])),
             kronjax_source=ae.kronjax_source(), jax=jax.__version__,
             seconds=time.time() - start,
             openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
             budget=args.budget, eval_every=args.eval_every, runs=runs,
             target=args.target)
  out = args.out or HERE / "results"
  out.mkdir(parents=True, exist_ok=True)
  (out / "mnist_wallclock.json").write_text(json.dumps(res, indent=1))
  lines = report(res)
  (out / "mnist_wallclock.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
