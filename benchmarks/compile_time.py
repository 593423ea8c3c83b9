"""Time to the first step: tracing and compiling a whole train step.

The digits autoencoder of ``autoencoder.py`` (batch 256, float32, CPU). For
each optimizer, a fresh Python process builds the train step (loss,
gradients, tape, update, apply), takes one step and then ``--steps`` more;
the first step's extra time over the median later step is its compilation
(tracing, lowering, XLA). kronjax's and Adam's steps are one ``jax.jit``, so
for them tracing + lowering and compiling are also timed apart
(``step.lower(...)`` and ``.compile()``). kfac-jax compiles inside its own
``step``, so only its first-step overhead is comparable. Medians over
``--repeats`` processes, the optimizers interleaved. For the ``jax.jit``
steps the compiled program's kernels are counted too (:func:`kernels`): the
compile time follows them at ~7 ms each, and unlike the time they do not
move with the machine's load.

* ``adam``: ``optax.adam(3e-3)``.
* ``kronjax fixed``: ``kronjax.kfac(0.1)``, every other option at its default.
* ``kronjax adaptive``: ``kronjax.kfac(loss=...)``, defaults.
* ``kfac-jax adaptive``: as in ``autoencoder.py`` (skipped without kfac-jax).

Usage::

  /work/venv-kfacjax/bin/python benchmarks/compile_time.py --repeats 5

Writes ``benchmarks/results/compile_time.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import subprocess
import sys
import time

NAMES = ("adam", "kronjax fixed", "kronjax adaptive", "kfac-jax adaptive")


# Instructions that XLA:CPU runs as kernels of their own (outside fusions).
KERNEL_OPS = ("fusion", "dot", "custom-call", "copy", "reduce", "concatenate",
              "slice", "pad", "transpose", "add", "multiply", "select", "and",
              "minimum", "maximum", "sort")


def kernels(hlo: str) -> int:
  """How many kernels a compiled HLO module runs outside fusions: the
  noise-free count behind its compile time (~7 ms each on XLA:CPU)."""
  count = 0
  for block in re.split(r"\n(?=\S)", hlo):  # one computation each
    head = block.split("\n", 1)[0]
    if "fused" in head or "wrapped" in head:  # the bodies of fusions
      continue
    for line in block.split("\n")[1:]:
      op = re.search(r"=\s*(?:\([^=]*?\)|\S+)\s+([\w-]+)\(", line)
      count += bool(op and op.group(1) in KERNEL_OPS)
  return count


def measure(name: str, steps: int) -> dict:
  """One optimizer, in this (fresh) process."""
  import jax
  import jax.numpy as jnp
  import optax
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  import _autoencoder as ae
  import autoencoder as bench

  data = ae.load_digits_01()
  x = jnp.asarray(data[:ae.BATCH_SIZE])
  params = ae.init_params(0)
  if name == "adam":
    runner = bench.make_adam(3e-3)
  elif name.startswith("kfac-jax"):
    if bench.kfac_jax is None:
      return {"skipped": bench.KFAC_JAX_ERROR}
    runner = bench.make_kfac_jax("adaptive")
  else:
    import kronjax
    import kronjax.flax
    loss = kronjax.losses.sigmoid_binary_cross_entropy
    tape_fn = kronjax.flax.value_grad_and_tape(bench.MODEL, loss)
    tx = (kronjax.kfac(loss=loss) if name.endswith("adaptive")
          else kronjax.kfac(0.1))

    @jax.jit
    def step(state, x, rng):
      params, opt_state = state
      value, grads, tape = tape_fn(params, x, x, rng)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     curvature=tape)
      return (optax.apply_updates(params, updates), opt_state), value

    runner = bench.Runner(init=lambda p, seed: (p, tx.init(p)), step=step,
                          params_of=lambda s: s[0], settings={})
  state = runner.init(params, 0)
  out = {}
  if hasattr(runner.step, "lower"):
    t0 = time.perf_counter()
    lowered = runner.step.lower(state, x, jax.random.key(0))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out.update(trace_lower_s=t1 - t0, compile_s=t2 - t1,
               kernels=kernels(compiled.as_text()))
    jax.clear_caches()  # the first step below compiles again, as a user's
  times = []
  for i in range(steps + 1):
    t = time.perf_counter()
    state, value = runner.step(state, x, jax.random.key(i))
    jax.block_until_ready(value)
    times.append(time.perf_counter() - t)
  median = statistics.median(times[1:])
  out.update(first_step_s=times[0], step_ms=1e3 * median,
             first_step_overhead_s=times[0] - median)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--only", nargs="*", default=None)
  p.add_argument("--out", type=pathlib.Path, default=None)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args.child, args.steps)))
    return
  names = [n for n in NAMES if not args.only or n in args.only]
  runs = {n: [] for n in names}
  start = time.time()
  for r in range(args.repeats):
    for n in names[r % len(names):] + names[:r % len(names)]:
      proc = subprocess.run(
          [sys.executable, __file__, "--child", n, "--steps", str(args.steps)],
          capture_output=True, text=True, check=True)
      runs[n].append(json.loads(proc.stdout.strip().splitlines()[-1]))
      print(n, runs[n][-1], flush=True)
  keys = ("trace_lower_s", "compile_s", "first_step_overhead_s", "step_ms",
          "kernels")
  med = {n: {k: statistics.median(r[k] for r in rs) for k in keys
             if all(k in r for r in rs)} for n, rs in runs.items()}
  adam = med.get("adam", {}).get("first_step_overhead_s")
  import jax
  res = dict(command=" ".join(["python", "benchmarks/compile_time.py"]
                              + (argv or sys.argv[1:])),
             jax=jax.__version__, seconds=time.time() - start,
             runs=runs, medians=med)
  out = args.out or pathlib.Path(__file__).parent / "results"
  out.mkdir(parents=True, exist_ok=True)
  (out / "compile_time.json").write_text(json.dumps(res, indent=1))
  lines = [
      "# Time to the first step: digits autoencoder train step",
      "", f"Command: `{res['command']}` (jax {res['jax']}, CPU, "
      f"{args.repeats} fresh processes per optimizer, medians).", "",
      "| optimizer | trace + lower s | compile s | first-step overhead s "
      "| vs Adam | step ms | kernels |", "|---|---|---|---|---|---|---|"]
  for n, m in med.items():
    if not m:
      lines.append(f"| {n} | skipped: {runs[n][0].get('skipped')} | | | | | |")
      continue
    f = lambda k: f"{m[k]:.2f}" if k in m else "n/a"
    ratio = (f"{m['first_step_overhead_s'] / adam:.1f}x" if adam else "")
    lines.append(f"| {n} | {f('trace_lower_s')} | {f('compile_s')} | "
                 f"{f('first_step_overhead_s')} | {ratio} | "
                 f"{m['step_ms']:.2f} | "
                 + (f"{m['kernels']:.0f} |" if "kernels" in m else "n/a |"))
  lines += ["", "First-step overhead = first step's wall time minus the median "
            "of the next steps: what a user waits for before training "
            "starts. kfac-jax compiles inside its step, so it has no "
            "separate trace/compile columns. Kernels: instructions of the "
            "compiled program that run outside fusions (fusions, products, "
            "LAPACK calls, copies), the noise-free count behind the compile "
            "time."]
  (out / "compile_time.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
