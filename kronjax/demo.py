"""The main job: K-FAC against Adam on an autoencoder and a CNN (8×8 digits).

Trains two models on scikit-learn's bundled 8×8 digits with ``kronjax.kfac``
(adaptive step size, momentum and damping: no learning rate to tune) and with
``optax.adam`` (the best of a few learning rates):

* the classic deep sigmoid autoencoder (Hinton & Salakhutdinov 2006; Martens &
  Grosse 2015), sigmoid cross-entropy on the pixels, all 1,797 digits;
* a small CNN classifier (two ``nn.Conv`` layers and an ``nn.Dense``), softmax
  cross-entropy, test accuracy on a held-out fifth of the digits.

Both use ``kronjax.kfac``'s defaults, with the tapes passed as ``curvature``.

K-FAC runs ``--steps`` steps; each Adam learning rate runs as many, and the
best of them (lowest training loss after those steps) then keeps going until it
has used as much wall-clock time as K-FAC did. A table per task gives the
training loss (and test accuracy) after the same number of steps and after the
same time, and the median step time; one plot has the loss curves against steps
and against seconds.

Usage: python -m kronjax.demo [--task all|autoencoder|cnn] [--steps 300]
       [--batch 256] [--seed 0] [--out kronjax_demo.png] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any, Callable, NamedTuple

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


class CNN(nn.Module):
  """8×8×1 → conv 3×3×16 → conv 3×3×32, stride 2 → dense 10, ReLU units."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))  # logits of the classes


class Task(NamedTuple):
  """A model, its loss and its data."""

  name: str
  model: nn.Module
  loss: Any  # a kronjax.losses NLL
  ylabel: str
  train: tuple[np.ndarray, np.ndarray]  # inputs, targets
  test: tuple[np.ndarray, np.ndarray] | None  # for the accuracy
  kfac_options: dict[str, Any]  # kronjax.kfac's keyword arguments


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 8×8 digits, pixels scaled to [0, 1], and labels."""
  try:
    from sklearn.datasets import load_digits as sk_load
  except ImportError as e:  # pragma: no cover
    raise SystemExit('The demo needs scikit-learn: pip install "kronjax[demo]"'
                     ) from e
  digits = sk_load()
  return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)


def make_tasks(names: list[str], seed: int) -> list[Task]:
  """The named tasks; ``seed`` picks the CNN's test fifth."""
  pixels, labels = load_digits()
  order = np.random.default_rng(seed).permutation(len(pixels))
  test, train = order[:len(order) // 5], order[len(order) // 5:]
  images = pixels.reshape(-1, 8, 8, 1)
  tasks = {
      # Unsupervised: its targets are its inputs, and every digit is used.
      "autoencoder": Task(
          "deep autoencoder 64-256-128-32-128-256-64", Autoencoder(),
          kronjax.losses.sigmoid_binary_cross_entropy,
          "training loss (BCE summed over pixels)", (pixels, pixels), None,
          {}),
      "cnn": Task(
          "CNN conv16-conv32/2-dense10", CNN(),
          kronjax.losses.softmax_cross_entropy, "training loss (cross-entropy)",
          (images[train], labels[train]), (images[test], labels[test]),
          {}),
  }
  return [tasks[name] for name in names]


def batches(data: tuple[np.ndarray, np.ndarray], batch: int, seed: int):
  """Endless shuffled mini-batches ``(x, y)``, reshuffled every epoch."""
  rng = np.random.default_rng(seed)
  order = np.empty(0, dtype=int)
  while True:
    if order.size < batch:
      order = np.concatenate([order, rng.permutation(len(data[0]))])
    idx, order = order[:batch], order[batch:]
    yield jnp.asarray(data[0][idx]), jnp.asarray(data[1][idx])


def adam_step(task: Task, lr: float):
  """``optax.adam(lr)`` and its jitted ``step(params, state, x, y, rng)``."""
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    del rng  # Adam needs no sampled targets
    value, grads = jax.value_and_grad(
        lambda p: task.loss(task.model.apply({"params": p}, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return tx, step


def kfac_step(task: Task):
  """Adaptive ``kronjax.kfac`` and its jitted step, as for :func:`adam_step`."""
  tx = kronjax.kfac(learning_rate=None, loss=task.loss, **task.kfac_options)
  tape_step = kronjax.flax.value_grad_and_tape(task.model, task.loss)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    value, grads, tape = tape_step(params, x, y, rng)
    updates, opt_state = tx.update(
        grads, opt_state, params, curvature=tape,
        output_fn=lambda p: task.model.apply({"params": p}, x), targets=y)
    return optax.apply_updates(params, updates), opt_state, value

  return tx, step


def train(label: str, step: Callable, params, opt_state, stream, seed: int,
          steps: int, run: dict | None = None, seconds: float = 0.0):
  """Runs ``step`` until ``steps`` steps and ``seconds`` (after compilation).

  Continues ``run`` (a dict this returns) when given, its clock included.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  run = run or {"label": label, "loss": [], "time": []}
  rng, done = jax.random.key(seed), len(run["loss"])
  # The first step compiles: the clock starts after it, or goes on from `run`.
  start = time.perf_counter() - (run["time"][-1] if done else 0.0)
  # disable=None: a bar on a terminal, none in logs. A bar against the clock
  # when it is the clock that stops the run.
  by_time = seconds > 0.0
  bar = tqdm(total=round(seconds, 1) if by_time else steps - done,
             desc=f"{label:>18}", unit="s" if by_time else "it", disable=None,
             mininterval=0.5, leave=False)
  for i in itertools.count(done):
    elapsed = time.perf_counter() - start if i else 0.0
    # At most 20× K-FAC's steps: on a loaded machine K-FAC's clock can run
    # long (slow eigendecompositions), and the demo should still end soon.
    if i >= steps and (elapsed >= seconds or i >= 20 * steps):
      break
    params, opt_state, value = step(params, opt_state, *next(stream),
                                    jax.random.fold_in(rng, i))
    value = float(value)  # waits for the step: the clock times whole steps
    if not i:
      start = time.perf_counter()
    run["loss"].append(value)
    run["time"].append(time.perf_counter() - start)
    bar.update(run["time"][-1] - elapsed if by_time else 1)
    bar.set_postfix(loss=f"{value:.3g}", refresh=False)
    if i + 1 == steps:
      run["params_at_steps"] = params
  bar.close()
  return {**run, "params": params}, opt_state


def compare(task: Task, args) -> dict[str, Any]:
  """K-FAC's run and the best Adam run, from the same initial params."""
  params = task.model.init(jax.random.key(args.seed),
                           task.train[0][:1])["params"]
  stream = lambda: batches(task.train, args.batch, args.seed)
  tx, step = kfac_step(task)
  kfac, _ = train("kronjax.kfac", step, params, tx.init(params), stream(),
                  args.seed, args.steps)
  adam = []
  for lr in args.adam_lrs:
    tx, step = adam_step(task, lr)
    data = stream()
    run, opt_state = train(f"adam {lr:g}", step, params, tx.init(params), data,
                           args.seed, args.steps)
    adam.append((_tail(run["loss"][:args.steps]), lr, step, data, run,
                 opt_state))
  _, lr, step, data, run, opt_state = min(adam, key=lambda a: a[0])
  label = f"adam {lr:g} (best)" if len(adam) > 1 else f"adam {lr:g}"
  best, _ = train(label, step, run["params"], opt_state, data, args.seed,
                  args.steps, {**run, "label": label}, kfac["time"][-1])
  return {"task": task, "kfac": kfac, "adam": best}


def _tail(losses) -> float:
  """Mean of the last 10 mini-batch losses: less noisy than the last one."""
  return float(np.mean(losses[-10:]))


def report(result: dict[str, Any], steps: int) -> None:
  """Prints the task's table: same steps, same wall-clock, step times."""
  task, kfac, adam = result["task"], result["kfac"], result["adam"]
  budget = kfac["time"][-1]
  accuracy = None
  if task.test is not None:
    x_test, y_test = jnp.asarray(task.test[0]), task.test[1]
    predict = jax.jit(lambda p: task.model.apply({"params": p}, x_test))
    accuracy = lambda p: float(np.mean(np.argmax(predict(p), -1) == y_test))
  cell = lambda losses, p: (f"{_tail(losses):8.3g}" + (
      f" / {accuracy(p):6.1%}" if accuracy else ""))
  what = "training loss / test accuracy" if accuracy else "training loss"
  options = ", ".join(f"{k}={v}" for k, v in task.kfac_options.items())
  print(f"\n{task.name}: {what} (loss: mean of the last 10 batches)"
        + (f"; kronjax.kfac({options})" if options else ""))
  print(f"{'optimizer':>18} | {f'after {steps} steps':>18} | "
        f"{f'after {budget:.1f} s':>18} | {'steps':>6} | median step (ms)")
  step_ms = {}
  for run in (kfac, adam):
    step_ms[run is kfac] = 1e3 * float(np.median(np.diff(run["time"])))
    print(f"{run['label']:>18} | "
          f"{cell(run['loss'][:steps], run['params_at_steps']):>18} | "
          f"{cell(run['loss'], run['params']):>18} | {len(run['loss']):>6} | "
          f"{step_ms[run is kfac]:>10.2f}")
  print(f"same wall-clock: Adam's budget is K-FAC's total time ({budget:.1f} s"
        f" after compilation); median step time K-FAC/Adam: "
        f"{step_ms[True] / step_ms[False]:.1f}×", flush=True)
  if adam["time"][-1] < budget:
    print(f"(Adam stopped at {len(adam['loss'])} steps, {adam['time'][-1]:.1f}"
          f" s: its column is there, not at {budget:.1f} s)")


def plot(results: list[dict[str, Any]], path: str) -> None:
  """Writes the loss curves, against steps and seconds, a row per task."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('(pip install "kronjax[demo]" for the plot)')
    return
  fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)),
                           squeeze=False)
  for row, result in zip(axes, results):
    for run in (result["kfac"], result["adam"]):
      row[0].plot(run["loss"], label=run["label"], lw=1)
      row[1].plot(run["time"], run["loss"], label=run["label"], lw=1)
    for ax, xlabel in zip(row, ("step", "seconds (after compilation)")):
      ax.set(xlabel=xlabel, ylabel=result["task"].ylabel, yscale="log",
             title=result["task"].name)
      ax.legend()
  fig.suptitle("8×8 digits: kronjax K-FAC (adaptive) vs Adam")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"\nloss curves written to {path}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Runs the demo; returns per task the runs (losses, times, params)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", choices=("all", "autoencoder", "cnn"),
                      default="all")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--adam-lrs", type=float, nargs="+",
                      default=[1e-3, 3e-3, 1e-2])
  parser.add_argument("--out", default="kronjax_demo.png")
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run: 60 steps, one Adam learning rate")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.adam_lrs = min(args.steps, 60), [3e-3]
  names = ["autoencoder", "cnn"] if args.task == "all" else [args.task]
  print(f"kronjax.kfac (adaptive) vs optax.adam (best of learning rates "
        f"{', '.join(f'{lr:g}' for lr in args.adam_lrs)}) on 8×8 digits: "
        f"batch {args.batch}, {args.steps} steps, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}", flush=True)
  results = []
  for task in make_tasks(names, args.seed):
    results.append(compare(task, args))
    report(results[-1], args.steps)
  plot(results, args.out)
  return results


if __name__ == "__main__":
  main()
