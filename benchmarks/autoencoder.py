"""Deep sigmoid autoencoder: optax.adam vs kfac-jax vs kronjax.kfac, one process.

The problem (data, model, loss, batches) is in ``_autoencoder.py``: 8x8 digits,
64-256-128-32-128-256-64 sigmoid MLP with a linear code layer, sigmoid binary
cross-entropy summed over pixels and averaged over the batch, minibatches of
256, float32, CPU.

Optimizers, each with its best of a few learning rates (chosen by the mean
minibatch loss over the last 10 steps, averaged over seeds):

* ``adam``: ``optax.adam(lr)``.
* ``kfac-jax fixed``: ``kfac_jax.Optimizer`` with constant learning-rate,
  momentum and damping schedules.
* ``kfac-jax adaptive``: ``kfac_jax.Optimizer`` with
  ``use_adaptive_learning_rate=True, use_adaptive_momentum=True,
  use_adaptive_damping=True`` (the quadratic model of Martens & Grosse 2015,
  section 7, and Levenberg-Marquardt damping).
* ``kronjax fixed`` / ``kronjax adaptive``: ``kronjax.kfac`` with a fixed
  learning rate, and with ``learning_rate=None`` (adaptive, given ``loss=``,
  ``output_fn=`` and ``targets=``). Skipped, with the reason recorded, while
  ``kronjax.kfac`` or ``kronjax.flax.value_grad_and_tape`` cannot be imported.

Per-step work is kept comparable: the same batches (and order), float32, one
Monte-Carlo Fisher sample per example (kfac-jax ``estimation_mode=
"fisher_gradients"``, kronjax ``fisher="mc"``), factor moving-average decay
0.95, factors updated every step, inverses (kfac-jax) / eigendecompositions
(kronjax ``inverse_every``) refreshed every 5 steps, no burn-in steps, no L2;
kronjax uses the π-corrected split like kfac-jax. The ``factor_every=5`` rows
update kronjax's factors every 5th step only and skip the tape's extra
backward pass in between (``with_tape=kronjax.curvature_due(opt_state)``).
The ``EK-FAC`` rows are kronjax with ``eigenvalue_correction=True`` (George
et al. 2018: the same eigenbases, eigenvalues fitted to the squared
per-example gradients, exact damping), otherwise as the K-FAC rows; the
``exact damping`` row is K-FAC with EK-FAC's (exact) damping, to tell the
two changes apart.
kfac-jax's step is compiled by kfac-jax itself (its ``step`` must not be
wrapped in ``jax.jit``); we pass ``global_step_int`` so its Python wrapper does
not synchronise with the device every step. Adam's and kronjax's whole steps
(loss, gradients, tape, update, apply) are one ``jax.jit``.

Step time: after the sweep, a fresh run of each optimizer's best configuration
is warmed up (compiled, and run through every variant of its step), then timed
for ``--timed-steps`` steps (a multiple of 5, so inverse refreshes and damping
updates are amortised alike) with ``block_until_ready``, ``--repeats`` times,
with the optimizers interleaved (and their order rotated) so machine noise hits
all of them alike; we report the median milliseconds per step. The
"wall-clock" axis of the plot is step x that median step time (compilation
excluded).

Usage (the kfac-jax comparison needs its own environment; see
``benchmarks/requirements-kfac-jax.txt``)::

  /work/venv-kfacjax/bin/python benchmarks/autoencoder.py --steps 300 --seeds 0 1 --repeats 5
  /work/venv-kfacjax/bin/python benchmarks/autoencoder.py --quick   # smoke run

Writes ``benchmarks/results/autoencoder.{json,md,png}`` (``--out`` to change).
Runs without kfac-jax too (its rows are then skipped with the reason).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
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

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# Settings shared by both K-FAC implementations (stated in the results).
INVERSE_EVERY = 5        # kfac-jax inverse_update_period; kronjax inverse_every
FACTOR_DECAY = 0.95      # kfac-jax curvature_ema; kronjax decay
FIXED_MOMENTUM = 0.9     # fixed variants
# The fixed variants sweep (learning rate, damping) over this grid (the damping
# is on the scale of the loss, which is summed over 64 pixels).
FIXED_LRS = (1e-3, 1e-2, 1e-1)
FIXED_DAMPINGS = (1e-2, 1e-1, 1.0)
ADAPTIVE_INITIAL_DAMPING = 1.0
LAST = 10                # "final loss" = mean minibatch loss over the last 10 steps

try:
  import kfac_jax
  KFAC_JAX_ERROR = None
except Exception as e:  # pylint: disable=broad-except
  kfac_jax = None
  KFAC_JAX_ERROR = f"kfac-jax not importable: {e!r}"

# --- kronjax plug-in: imported if the modules have landed ---------------------
# kronjax is being written alongside this script; its configurations are
# skipped (with the reason in the results) until these names import.
try:
  import kronjax
  import kronjax.flax
  _ = (kronjax.kfac, kronjax.fisher_blocks, kronjax.flax.value_grad_and_tape,
       kronjax.losses.sigmoid_binary_cross_entropy)
  KRONJAX_ERROR = None
except Exception as e:  # pylint: disable=broad-except  (ImportError, AttributeError)
  kronjax = None
  KRONJAX_ERROR = f"kronjax.kfac / kronjax.flax.value_grad_and_tape not importable yet: {e!r}"


# A runner turns (hyperparameter, seed) into an initial state and a step
# function ``step(state, x, rng) -> (state, loss)``; ``params_of(state)`` gives
# the model parameters back.
@dataclasses.dataclass
class Runner:
  init: Callable[[Any, int], Any]
  step: Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array]]
  params_of: Callable[[Any], Any]
  settings: dict


@dataclasses.dataclass
class Optimizer:
  name: str
  grid: list            # hyperparameters to sweep (learning rates, or labels)
  make: Callable[[Any], Runner] | None
  skip: str | None = None


MODEL = ae.Autoencoder()


def _apply(params, x):
  return MODEL.apply({"params": params}, x)


def _loss(params, x):
  return ae.sigmoid_bce(_apply(params, x), x)


# --- optax.adam ---------------------------------------------------------------
def make_adam(lr) -> Runner:
  tx = optax.adam(lr)

  @jax.jit
  def step(state, x, rng):
    del rng
    params, opt_state = state
    loss, grads = jax.value_and_grad(_loss)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return Runner(init=lambda params, seed: (params, tx.init(params)),
                step=step, params_of=lambda s: s[0],
                settings=dict(learning_rate=lr))


# --- kfac-jax ------------------------------------------------------------------
def _kfac_jax_loss(params, x):
  logits = _apply(params, x)
  kfac_jax.register_sigmoid_cross_entropy_loss(logits, x)
  return ae.sigmoid_bce(logits, x)


def make_kfac_jax(lr) -> Runner:
  """lr: (learning rate, damping), with fixed momentum, or "adaptive"."""
  common = dict(
      value_and_grad_func=jax.value_and_grad(_kfac_jax_loss),
      l2_reg=0.0,
      estimation_mode="fisher_gradients",   # one MC sample, like kronjax "mc"
      curvature_ema=FACTOR_DECAY,
      curvature_update_period=1,
      inverse_update_period=INVERSE_EVERY,
      num_burnin_steps=0,
      multi_device=False,
  )
  if lr == "adaptive":
    extra = dict(use_adaptive_learning_rate=True, use_adaptive_momentum=True,
                 use_adaptive_damping=True,
                 initial_damping=ADAPTIVE_INITIAL_DAMPING,
                 damping_adaptation_interval=INVERSE_EVERY,
                 min_damping=1e-5)
  else:
    lr, damping = lr
    extra = dict(learning_rate_schedule=optax.constant_schedule(lr),
                 momentum_schedule=optax.constant_schedule(FIXED_MOMENTUM),
                 damping_schedule=optax.constant_schedule(damping))
  opt = kfac_jax.Optimizer(**common, **extra)
  settings = {k: v for k, v in {**common, **extra}.items()
              if isinstance(v, (int, float, str, bool))}
  if lr != "adaptive":
    settings.update(learning_rate=lr, momentum=FIXED_MOMENTUM,
                    damping=damping)

  def init(params, seed):
    x0 = jnp.zeros((ae.BATCH_SIZE, 64), jnp.float32)
    state = opt.init(params, jax.random.key(seed + 10_000), x0)
    return [params, state, 0]

  def step(s, x, rng):
    params, state, i = s
    params, state, stats = opt.step(params, state, rng, batch=x,
                                    global_step_int=i)
    return [params, state, i + 1], stats["loss"]

  return Runner(init=init, step=step, params_of=lambda s: s[0],
                settings=settings)


# --- kronjax plug-in -------------------------------------------------------------
# The contract in ../shared/DESIGN.md:
#   step_fn = kronjax.flax.value_grad_and_tape(model, loss, fisher="mc")
#   loss, grads, tape = step_fn(params, x, y, rng)
#   updates, opt_state = tx.update(grads, opt_state, params,
#                                  curvature=kronjax.fisher_blocks(tape))
# and, for the adaptive alias (learning_rate=None, loss=...), also
#   output_fn=lambda p: model.apply({"params": p}, x), targets=y.
# Options that kronjax.kfac does not (yet) accept are left out and recorded.
def _kronjax_kwargs(fn, wanted: dict) -> tuple[dict, dict]:
  params = inspect.signature(fn).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return dict(wanted), {}
  used = {k: v for k, v in wanted.items() if k in params}
  return used, {k: v for k, v in wanted.items() if k not in params}


def _kronjax_fixed_tx(wanted: dict):
  """``kronjax.kfac(learning_rate=lr, damping=..., momentum=...)``.

  Should the alias not take ``momentum``, the same optimizer is built as
  ``optax.chain(kronjax.scale_by_kfac(damping=...), optax.sgd(lr, momentum))``
  (heavy-ball momentum on the preconditioned gradient, as kfac-jax's fixed
  variant does) and the results say so.
  """
  kwargs, dropped = _kronjax_kwargs(kronjax.kfac, wanted)
  if "momentum" in dropped and hasattr(kronjax, "scale_by_kfac"):
    inner = {k: v for k, v in wanted.items()
             if k not in ("learning_rate", "momentum")}
    kwargs, dropped = _kronjax_kwargs(kronjax.scale_by_kfac, inner)
    tx = optax.chain(kronjax.scale_by_kfac(**kwargs),
                     optax.sgd(wanted["learning_rate"],
                               momentum=wanted["momentum"]))
    kwargs = dict(kwargs, learning_rate=wanted["learning_rate"],
                  momentum=wanted["momentum"])
    return tx, kwargs, dropped, "optax.chain(kronjax.scale_by_kfac, optax.sgd)"
  return kronjax.kfac(**kwargs), kwargs, dropped, "kronjax.kfac"


def make_kronjax(lr, factor_every: int = 1, ekfac: bool = False,
                 exact: bool = False) -> Runner:
  """lr: (learning rate, damping), or "adaptive" (learning_rate=None, loss=...).

  Both use the π-corrected split (kfac-jax's default, and kronjax.kfac's).
  The tapes go to the update as ``curvature`` (their blocks are computed only
  on factor-update steps), and with ``factor_every > 1`` the steps in between
  skip the Fisher's backward pass (``with_tape=kronjax.curvature_due``).
  ``ekfac``: EK-FAC (``eigenvalue_correction=True``) instead of K-FAC;
  ``exact`` (adaptive only): K-FAC with exact damping, EK-FAC's damping, as
  ``optax.chain(kronjax.scale_by_adaptive_kfac(exact_damping=True),
  optax.scale(-1))`` (``kronjax.kfac`` has only the π-split).
  """
  loss_obj = kronjax.losses.sigmoid_binary_cross_entropy
  tape_fn = kronjax.flax.value_grad_and_tape(MODEL, loss_obj, fisher="mc")
  adaptive = lr == "adaptive"
  if adaptive:
    wanted = dict(learning_rate=None, loss=loss_obj,
                  inverse_every=INVERSE_EVERY, decay=FACTOR_DECAY,
                  factor_every=factor_every)
  else:
    wanted = dict(learning_rate=lr[0], damping=lr[1],
                  momentum=FIXED_MOMENTUM, inverse_every=INVERSE_EVERY,
                  decay=FACTOR_DECAY, factor_every=factor_every)
  if ekfac:
    wanted["eigenvalue_correction"] = True
  if adaptive and exact:
    inner = {k: v for k, v in wanted.items() if k not in ("learning_rate",
                                                          "loss")}
    kwargs = dict(inner, loss=loss_obj, exact_damping=True)
    dropped = {}
    tx = optax.chain(kronjax.scale_by_adaptive_kfac(**kwargs),
                     optax.scale(-1.0))
    built_as = "optax.chain(kronjax.scale_by_adaptive_kfac, optax.scale(-1))"
  elif adaptive:
    kwargs, dropped = _kronjax_kwargs(kronjax.kfac, wanted)
    tx, built_as = kronjax.kfac(**kwargs), "kronjax.kfac"
  else:
    tx, kwargs, dropped, built_as = _kronjax_fixed_tx(wanted)

  @jax.jit
  def step(state, x, rng):
    params, opt_state = state
    due = kronjax.curvature_due(opt_state) if factor_every > 1 else True
    loss, grads, tape = tape_fn(params, x, x, rng, with_tape=due)
    blocks = tape
    if adaptive:
      updates, opt_state = tx.update(
          grads, opt_state, params, curvature=blocks,
          output_fn=lambda p: _apply(p, x), targets=x)
    else:
      updates, opt_state = tx.update(grads, opt_state, params,
                                     curvature=blocks)
    return (optax.apply_updates(params, updates), opt_state), loss

  settings = {k: (v if isinstance(v, (int, float, str, bool, type(None)))
                  else type(v).__name__) for k, v in kwargs.items()}
  settings.update(fisher="mc", built_as=built_as,
                  options_not_accepted=sorted(dropped))
  return Runner(init=lambda params, seed: (params, tx.init(params)),
                step=step, params_of=lambda s: s[0], settings=settings)
# --- end of kronjax plug-in ------------------------------------------------------


def optimizers(quick: bool) -> list[Optimizer]:
  if quick:
    adam_lrs, kfac_lrs = [3e-3], [(1e-1, 1.0)]
  else:
    adam_lrs = [1e-3, 3e-3, 1e-2]
    kfac_lrs = [(lr, d) for d in FIXED_DAMPINGS for lr in FIXED_LRS]
  kj = None if kfac_jax is not None else KFAC_JAX_ERROR
  kr = None if kronjax is not None else KRONJAX_ERROR
  return [
      Optimizer("adam", adam_lrs, make_adam),
      Optimizer("kfac-jax fixed", kfac_lrs, make_kfac_jax, kj),
      Optimizer("kfac-jax adaptive", ["adaptive"], make_kfac_jax, kj),
      Optimizer("kronjax fixed", kfac_lrs, make_kronjax, kr),
      Optimizer("kronjax adaptive", ["adaptive"], make_kronjax, kr),
      Optimizer("kronjax fixed, factor_every=5", kfac_lrs,
                functools.partial(make_kronjax, factor_every=5), kr),
      Optimizer("kronjax adaptive, factor_every=5", ["adaptive"],
                functools.partial(make_kronjax, factor_every=5), kr),
      Optimizer("kronjax fixed, EK-FAC", kfac_lrs,
                functools.partial(make_kronjax, ekfac=True), kr),
      Optimizer("kronjax adaptive, EK-FAC", ["adaptive"],
                functools.partial(make_kronjax, ekfac=True), kr),
      Optimizer("kronjax adaptive, exact damping", ["adaptive"],
                functools.partial(make_kronjax, exact=True), kr),
  ]


def train(runner: Runner, seed: int, xs: list, keys: list, data) -> dict:
  params = ae.init_params(seed, MODEL)
  state = runner.init(params, seed)
  losses = []
  start = time.perf_counter()
  for x, k in zip(xs, keys):
    state, loss = runner.step(state, x, k)
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses), np.float64)
  seconds = time.perf_counter() - start
  final = float(np.mean(losses[-LAST:]))
  full = ae.full_loss(MODEL, runner.params_of(state), data)
  bad = lambda v: v if math.isfinite(v) else None
  return dict(seed=seed, losses=[bad(float(v)) for v in losses],
              final_loss=bad(final), full_data_loss=bad(full),
              train_seconds_incl_compile=seconds)


def time_steps(runners: dict, xs: list, keys: list, timed_steps: int,
               repeats: int, warmup: int) -> dict:
  """Median ms/step per optimizer, interleaved and rotated across repeats."""
  states, counters = {}, {}
  for name, runner in runners.items():
    state = runner.init(ae.init_params(0, MODEL), 0)
    for i in range(warmup):       # compile every variant of the step
      state, loss = runner.step(state, xs[i % len(xs)], keys[i % len(keys)])
    jax.block_until_ready((state, loss))
    states[name], counters[name] = state, warmup
  times = {name: [] for name in runners}
  names = list(runners)
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      runner, state, c = runners[name], states[name], counters[name]
      start = time.perf_counter()
      for i in range(c, c + timed_steps):
        state, loss = runner.step(state, xs[i % len(xs)], keys[i % len(keys)])
      jax.block_until_ready((state, loss))
      times[name].append((time.perf_counter() - start) / timed_steps * 1e3)
      states[name], counters[name] = state, c + timed_steps
  return {name: dict(median_ms=statistics.median(t), min_ms=min(t), all_ms=t)
          for name, t in times.items()}


def _fmt_lr(hp):
  if isinstance(hp, str):
    return hp
  if isinstance(hp, (tuple, list)):
    return f"{hp[0]:g} / {hp[1]:g}"
  return f"{hp:g}"


def environment() -> dict:
  return ae.environment(("jax", "jaxlib", "flax", "optax", "chex", "numpy",
                         "kfac_jax", "kronjax", "sklearn"))


def write_markdown(path: pathlib.Path, res: dict) -> None:
  rows = res["summary"]
  adam = next((r for r in rows if r["optimizer"] == "adam"), None)
  lines = [
      "# Deep sigmoid autoencoder: Adam vs kfac-jax vs kronjax",
      "",
      f"Command (in the environment of `benchmarks/requirements-kfac-jax.txt`): "
      f"`{res['command']}`",
      "",
      f"8x8 digits (1,797 images), 64-256-128-32-128-256-64 sigmoid MLP with a "
      f"linear code layer, sigmoid BCE summed over pixels / mean over batch, "
      f"batch {ae.BATCH_SIZE}, float32, {res['steps']} steps, seeds "
      f"{res['seeds']}. Final loss = mean minibatch loss over the last {LAST} "
      f"steps, then mean over seeds; full-data loss = loss on all 1,797 images "
      f"after the last step. Step time = median ms/step over {res['repeats']} "
      f"repeats of {res['timed_steps']} steps after compilation, optimizers "
      f"interleaved; the last column is the fastest repeat (least disturbed "
      f"by other jobs on the machine).",
      "",
      "| optimizer | best lr (/ damping) | final loss | full-data loss | median step ms | ratio to Adam | fastest repeat ms (ratio) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if r.get("skipped"):
      lines.append(f"| {r['optimizer']} | skipped | | | | | |")
      continue
    ratio = (r["median_step_ms"] / adam["median_step_ms"]
             if adam and not adam.get("skipped") else float("nan"))
    min_ratio = (r["min_step_ms"] / adam["min_step_ms"]
                 if adam and not adam.get("skipped") else float("nan"))
    fl = lambda v: "diverged" if v is None else f"{v:.2f}"
    lines.append(
        f"| {r['optimizer']} | {_fmt_lr(r['best_lr'])} | {fl(r['final_loss'])} | "
        f"{fl(r['full_data_loss'])} | {r['median_step_ms']:.2f} | {ratio:.2f}x | "
        f"{r['min_step_ms']:.2f} ({min_ratio:.2f}x) |")
  lines += ["", "Sweep (final loss per learning rate, mean over seeds):", ""]
  for r in rows:
    if not r.get("skipped"):
      sweep = ", ".join(
          f"{_fmt_lr(s['lr'])}: " + ("diverged" if s["final_loss"] is None
                                     else f"{s['final_loss']:.2f}")
          for s in r["sweep"])
      lines.append(f"- {r['optimizer']}: {sweep}")
  skipped = [r for r in rows if r.get("skipped")]
  if skipped:
    lines += ["", "Skipped:", ""]
    lines += [f"- {r['optimizer']}: {r['skipped']}" for r in skipped]
  env = res["environment"]
  lines += [
      "", "Settings:", "",
      f"- Both K-FAC implementations: one Monte-Carlo Fisher sample "
      f"(kfac-jax `estimation_mode=\"fisher_gradients\"`, kronjax "
      f"`fisher=\"mc\"`), factor decay {FACTOR_DECAY}, factors every step, "
      f"inverses / eigendecompositions every {INVERSE_EVERY} steps "
      f"(kfac-jax `inverse_update_period`, kronjax `inverse_every`), no burn-in, "
      f"no L2. kfac-jax keeps its default pi-adjusted factored damping "
      f"(`use_exact_inverses=False`).",
      f"- Fixed variants: momentum {FIXED_MOMENTUM}; learning rate in "
      f"{list(FIXED_LRS)} x damping in {list(FIXED_DAMPINGS)} swept (the "
      f"'best lr' column shows `lr / damping`).",
      f"- kfac-jax adaptive: adaptive learning rate, momentum and "
      f"Levenberg-Marquardt damping (initial damping "
      f"{ADAPTIVE_INITIAL_DAMPING}, adapted every {INVERSE_EVERY} steps, "
      f"min 1e-5).",
      f"- Wall-clock axis of the plot: step x median step time.",
  ] + [
      f"- {r['optimizer']}: built as `{r['settings'].get('built_as')}` with "
      f"{ {k: v for k, v in r['settings'].items() if k not in ('built_as', 'options_not_accepted')} }"
      + (f"; options it does not accept yet, left out: "
         f"{r['settings']['options_not_accepted']}"
         if r['settings'].get('options_not_accepted') else "")
      for r in rows if r["optimizer"].startswith("kronjax") and not r.get("skipped")
  ] + [
      "",
      f"Environment: Python {env['python']}, " + ", ".join(
          f"{k} {v}" for k, v in env["versions"].items() if v) +
      f"; {env['backend']} backend, {env['cpus']} CPU cores; whole run "
      f"{res['total_seconds']:.0f} s. The machine is "
      f"shared (other jobs, e.g. test suites, run at the same time), so "
      f"absolute times are noisy; the interleaved timing keeps the ratios "
      f"fairer than the absolute numbers (1-minute load average "
      f"{env['load_average_at_start'][0]:.1f} at the start, "
      f"{env['load_average'][0]:.1f} at the end).",
      "",
  ]
  path.write_text("\n".join(lines))


def plot(path: pathlib.Path, res: dict) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in res["summary"]:
    if r.get("skipped"):
      continue
    curve = np.asarray([np.nan if v is None else v for v in r["mean_curve"]])
    steps = np.arange(1, len(curve) + 1)
    label = (r["optimizer"] if r["best_lr"] == "adaptive"
             else f"{r['optimizer']} (lr {_fmt_lr(r['best_lr'])})")
    ax1.plot(steps, curve, label=label, lw=1.2)
    ax2.plot(steps * r["median_step_ms"] / 1e3, curve, label=label, lw=1.2)
  for ax, xl in ((ax1, "step"), (ax2, "seconds (step x median step time)")):
    ax.set_xlabel(xl)
    ax.set_ylabel("minibatch loss (BCE summed over pixels)")
    ax.set_ylim(10, 45)
    ax.grid(alpha=0.3)
  ax1.legend(fontsize=8)
  fig.suptitle("Deep sigmoid autoencoder, 8x8 digits, batch 256 "
               "(best lr each, mean over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--repeats", type=int, default=5, help="timing repeats")
  p.add_argument("--timed-steps", type=int, default=50)
  p.add_argument("--only", nargs="*", default=None,
                 help="optimizer names to run (e.g. adam 'kfac-jax fixed')")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: 30 steps, one lr each, 2 short timing repeats")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="output folder (default benchmarks/results; a temp folder "
                 "for --quick)")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.repeats, args.timed_steps = 30, 2, 10
  if args.timed_steps % INVERSE_EVERY:
    p.error(f"--timed-steps must be a multiple of {INVERSE_EVERY}")

  t_start, load_start = time.perf_counter(), os.getloadavg()
  data = jnp.asarray(ae.load_digits_01())
  summary, runs, best_runners = [], {}, {}
  for opt in optimizers(args.quick):
    if args.only is not None and opt.name not in args.only:
      continue
    if opt.skip:
      print(f"[skip] {opt.name}: {opt.skip}", flush=True)
      summary.append(dict(optimizer=opt.name, skipped=opt.skip))
      continue
    sweep = []
    for hp in opt.grid:
      per_seed = []
      runner = opt.make(hp)   # compiled once, reused for every seed
      for seed in args.seeds:
        xs = [jnp.asarray(b) for b in ae.batches(np.asarray(data), args.steps, seed)]
        keys = list(jax.random.split(jax.random.key(seed + 1), args.steps))
        try:
          out = train(runner, seed, xs, keys, data)
        except Exception as e:  # pylint: disable=broad-except
          print(f"[fail] {opt.name} lr={_fmt_lr(hp)} seed={seed}: {e!r}", flush=True)
          out = dict(seed=seed, error=repr(e), losses=None, final_loss=None,
                     full_data_loss=None)
        out["settings"] = runner.settings
        per_seed.append(out)
        print(f"{opt.name:18s} lr={_fmt_lr(hp):>8s} seed={seed} "
              f"final={out['final_loss']} full={out['full_data_loss']}", flush=True)
      finals = [o["final_loss"] for o in per_seed]
      mean_final = (None if any(v is None for v in finals)
                    else float(np.mean(finals)))
      sweep.append(dict(lr=hp, final_loss=mean_final, runs=per_seed))
    runs[opt.name] = sweep
    ok = [s for s in sweep if s["final_loss"] is not None]
    if not ok:
      errors = [r["error"] for s in sweep for r in s["runs"] if r.get("error")]
      summary.append(dict(optimizer=opt.name, skipped=(
          "every setting diverged or failed" +
          (f" (first error: {errors[0]})" if errors else "")),
                          sweep=[dict(lr=s["lr"], final_loss=None) for s in sweep]))
      continue
    best = min(ok, key=lambda s: s["final_loss"])
    curves = np.asarray([r["losses"] for r in best["runs"]], np.float64)
    summary.append(dict(
        optimizer=opt.name, best_lr=best["lr"], final_loss=best["final_loss"],
        full_data_loss=float(np.mean([r["full_data_loss"] for r in best["runs"]])),
        mean_curve=[float(v) for v in curves.mean(0)],
        settings=best["runs"][0]["settings"],
        sweep=[dict(lr=s["lr"], final_loss=s["final_loss"]) for s in sweep]))
    best_runners[opt.name] = opt.make(best["lr"])

  if best_runners:
    print(f"timing {list(best_runners)}: {args.repeats} x {args.timed_steps} steps",
          flush=True)
    xs = [jnp.asarray(b) for b in ae.batches(np.asarray(data), 50, 0)]
    keys = list(jax.random.split(jax.random.key(1), 50))
    timing = time_steps(best_runners, xs, keys, args.timed_steps, args.repeats,
                        warmup=2 * INVERSE_EVERY)
    for row in summary:
      if row["optimizer"] in timing:
        row["median_step_ms"] = timing[row["optimizer"]]["median_ms"]
        row["min_step_ms"] = timing[row["optimizer"]]["min_ms"]
        row["step_ms_repeats"] = timing[row["optimizer"]]["all_ms"]
    adam_ms = timing.get("adam", {}).get("median_ms")
    for row in summary:
      if adam_ms and "median_step_ms" in row:
        row["ratio_to_adam"] = row["median_step_ms"] / adam_ms

  env = environment()
  env["load_average_at_start"] = load_start
  res = dict(command="python benchmarks/autoencoder.py " + " ".join(
                 sys.argv[1:] if argv is None else argv),
             steps=args.steps, seeds=args.seeds, repeats=args.repeats,
             timed_steps=args.timed_steps, quick=args.quick,
             inverse_every=INVERSE_EVERY, factor_decay=FACTOR_DECAY,
             fixed_momentum=FIXED_MOMENTUM, fixed_lrs=FIXED_LRS,
             fixed_dampings=FIXED_DAMPINGS,
             environment=env, summary=summary, runs=runs,
             total_seconds=time.perf_counter() - t_start)
  out = ae.output_dir(args.out, args.quick, RESULTS)
  stem = "autoencoder_quick" if args.quick else "autoencoder"
  ae.write_report(out, stem, res, write_markdown, plot)
  ae.print_report(out, stem)


if __name__ == "__main__":
  main()
