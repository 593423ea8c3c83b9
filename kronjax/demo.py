"""The main job: K-FAC against Adam on a deep autoencoder, on data that ships.

Trains the classic deep sigmoid autoencoder (Hinton & Salakhutdinov 2006;
Martens & Grosse 2015) on scikit-learn's bundled 8×8 digits with
``kronjax.kfac`` (adaptive step size, momentum and damping: no learning rate to
tune) and with ``optax.adam`` at its best of a few learning rates, then prints a
table (loss after the same steps and the same wall-clock, step time) and writes
a loss-curve plot.

Usage: python -m kronjax.demo [--steps 300] [--batch 256] [--out kronjax_demo.png]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax


class Autoencoder(nn.Module):
  """64-256-128-32-128-256-64, sigmoid hidden units, linear code layer."""

  widths: tuple[int, ...] = (256, 128, 32, 128, 256)

  @nn.compact
  def __call__(self, x):
    code = len(self.widths) // 2
    for i, width in enumerate(self.widths):
      x = nn.Dense(width)(x)
      x = x if i == code else jax.nn.sigmoid(x)
    return nn.Dense(64)(x)  # logits of the 64 pixels


def load_digits() -> np.ndarray:
  """scikit-learn's 1,797 8×8 digits, pixels scaled to [0, 1]."""
  try:
    from sklearn.datasets import load_digits as sk_load
  except ImportError as e:  # pragma: no cover
    raise SystemExit('The demo needs scikit-learn: pip install "kronjax[demo]"'
                     ) from e
  return (sk_load().data / 16.0).astype(np.float32)


def batches(data: np.ndarray, batch: int, steps: int, seed: int):
  rng = np.random.default_rng(seed)
  order = np.empty(0, dtype=int)
  for _ in range(steps):
    if order.size < batch:
      order = np.concatenate([order, rng.permutation(len(data))])
    idx, order = order[:batch], order[batch:]
    yield jnp.asarray(data[idx])


def train_adam(model, params, data, args, lr):
  loss = kronjax.losses.sigmoid_binary_cross_entropy
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state, x):
    value, grads = jax.value_and_grad(
        lambda p: loss(model.apply({"params": p}, x), x))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return _run(step, params, tx.init(params), data, args, f"adam {lr:g}")


def train_kfac(model, params, data, args):
  loss = kronjax.losses.sigmoid_binary_cross_entropy
  tx = kronjax.kfac(learning_rate=None, loss=loss)
  tape_step = kronjax.flax.value_grad_and_tape(model, loss, fisher="mc")

  @jax.jit
  def step(params, opt_state, x, rng):
    value, grads, tape = tape_step(params, x, x, rng)
    updates, opt_state = tx.update(
        grads, opt_state, params, curvature=kronjax.fisher_blocks(tape),
        output_fn=lambda p: model.apply({"params": p}, x), targets=x)
    return optax.apply_updates(params, updates), opt_state, value

  return _run(step, params, tx.init(params), data, args, "kronjax.kfac",
              needs_rng=True)


def _run(step, params, opt_state, data, args, label, needs_rng=False):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  rng = jax.random.key(args.seed)
  losses, times = [], []
  stream = batches(data, args.batch, args.steps, args.seed)
  # disable=None: a bar on a terminal, none in logs.
  bar = tqdm(stream, total=args.steps, desc=f"{label:>14}", disable=None,
             mininterval=0.5)
  start = None
  for i, x in enumerate(bar):
    extra = (jax.random.fold_in(rng, i),) if needs_rng else ()
    params, opt_state, value = step(params, opt_state, x, *extra)
    value = float(value)
    if start is None:  # the first step compiles: the clock starts after it
      start = time.perf_counter()
    losses.append(value)
    times.append(time.perf_counter() - start)
    bar.set_postfix(loss=f"{value:.2f}")
  print(f"{label:>14}: loss {np.mean(losses[-10:]):.2f} after {len(losses)} "
        f"steps, {times[-1]:.1f} s after compilation", flush=True)
  return {"label": label, "loss": np.array(losses), "time": np.array(times)}


def _at_time(run, t):
  i = np.searchsorted(run["time"], t, side="right") - 1
  return run["loss"][max(i, 0)]


def report(runs, path):
  tail = lambda r: float(np.mean(r["loss"][-10:]))
  budget = min(r["time"][-1] for r in runs)
  print(f"\n{'optimizer':>14} | loss after {len(runs[0]['loss'])} steps | "
        f"loss after {budget:.1f} s | median step (ms)")
  for r in runs:
    step_ms = 1e3 * float(np.median(np.diff(r["time"])))
    print(f"{r['label']:>14} | {tail(r):>20.2f} | {_at_time(r, budget):>17.2f}"
          f" | {step_ms:>16.2f}")
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('(pip install matplotlib for the plot)')
    return
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for r in runs:
    axes[0].plot(r["loss"], label=r["label"])
    axes[1].plot(r["time"], r["loss"], label=r["label"])
  for ax, xlabel in zip(axes, ("step", "seconds (after compilation)")):
    ax.set(xlabel=xlabel, ylabel="training loss (BCE, summed over pixels)",
           yscale="log")
    ax.legend()
  fig.suptitle("Deep autoencoder on 8×8 digits: kronjax K-FAC vs Adam")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"\nloss curves written to {path}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--adam-lrs", type=float, nargs="+",
                      default=[1e-3, 3e-3, 1e-2])
  parser.add_argument("--out", default="kronjax_demo.png")
  args = parser.parse_args(argv)
  data = load_digits()
  model = Autoencoder()
  params = model.init(jax.random.key(args.seed), data[:1])["params"]
  print(f"deep autoencoder 64-256-128-32-128-256-64 on {len(data)} digits, "
        f"batch {args.batch}, {args.steps} steps, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  adam = [train_adam(model, params, data, args, lr) for lr in args.adam_lrs]
  best_adam = min(adam, key=lambda r: float(np.mean(r["loss"][-10:])))
  runs = [train_kfac(model, params, data, args), best_adam]
  report(runs, args.out)


if __name__ == "__main__":
  main()
