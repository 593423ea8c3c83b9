"""Cost of one tape step relative to ``jax.value_and_grad``.

A tape step is one forward pass, the loss's backward pass and the Fisher's
backward pass (``samples`` cotangents), plus the Kronecker factors. Measured on
an MLP and a small CNN, float32, CPU; medians over repeats after compilation.

Usage: python benchmarks/bench_tape.py [--quick]
"""

import argparse
import json
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import kronjax

RESULTS = pathlib.Path(__file__).parent / "results"


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in (512, 512, 256):
      x = jax.nn.relu(nn.Dense(width)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = jax.nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = jax.nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def _median_ms(fn, args, steps, repeats):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / steps * 1e3)
  return statistics.median(times)


def measure(name, model, x_shape, batch, steps, repeats):
  loss = kronjax.losses.softmax_cross_entropy
  x = jax.random.normal(jax.random.key(0), (batch, *x_shape), jnp.float32)
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  params = model.init(jax.random.key(2), x)["params"]
  rng = jax.random.key(3)

  plain = jax.jit(jax.value_and_grad(
      lambda p, x, y: loss(model.apply({"params": p}, x), y)))
  rows = {"value_and_grad": _median_ms(plain, (params, x, y), steps, repeats)}
  for fisher in ("empirical", "mc", "exact"):
    step = kronjax.flax.value_grad_and_tape(model, loss, fisher=fisher)

    def tape_step(p, x, y, rng, step=step):
      value, grads, tape = step(p, x, y, rng)
      return value, grads, kronjax.fisher_blocks(tape)

    rows[f"tape+blocks ({fisher})"] = _median_ms(
        jax.jit(tape_step), (params, x, y, rng), steps, repeats)
  base = rows["value_and_grad"]
  return [{"model": name, "batch": batch, "step": k, "ms": round(v, 3),
           "ratio": round(v / base, 2)} for k, v in rows.items()]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  steps, repeats = (3, 2) if args.quick else (20, 7)
  rows = measure("MLP 784-512-512-256-10", MLP(), (784,), 128, steps, repeats)
  rows += measure("CNN 28x28x1 conv32-conv64-128-10", CNN(), (28, 28, 1), 64,
                  steps, repeats)
  table = ["| model | batch | step | ms | × value_and_grad |",
           "|---|---|---|---|---|"]
  table += [f"| {r['model']} | {r['batch']} | {r['step']} | {r['ms']} | "
            f"{r['ratio']} |" for r in rows]
  print("\n".join(table))
  if not args.quick:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tape.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "tape.md").write_text(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, float32; "
        "median of repeats after compilation\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
  main()
