"""Character-level GPT: kronjax.kfac (adaptive and fixed step) vs optax.adamw.

Data: the Python standard library's own ``.py`` sources, which every Python
installation ships (the folder of ``os.__file__``; no download). The files are
read in sorted order (by their path relative to that folder; the folders
``test``, ``tests``, ``site-packages``, ``idlelib``, ``encodings`` and
``__pycache__`` are skipped) until ``--max-bytes`` are read; every 10th file is
held out for validation. Characters are bytes: the vocabulary is the distinct
ASCII bytes (< 128) of the training files plus one "unknown" id that every
other byte maps to. Minibatches are random windows of ``--seq`` + 1 bytes of
the training text (inputs: the first ``--seq``, labels: the last ``--seq``),
drawn with ``np.random.default_rng(seed)``, the same for every optimizer.

Model (Flax linen), GPT-style, float32: token embedding ``nn.Embed(vocab,
width)`` plus a learned position embedding; ``--layers`` pre-LayerNorm blocks
(causal ``nn.MultiHeadDotProductAttention(num_heads=4, use_bias=False)``, MLP
``width -> 4 width -> width`` with gelu, no biases) stacked with
``nn.scan(nn.remat(Block))``; a final LayerNorm; logits from the tied head
``embed.attend(h)`` (``--no-tied``: an untied ``nn.Dense(vocab,
use_bias=False)``). Loss: ``kronjax.losses.softmax_cross_entropy``, the mean
over all batch x sequence positions (nats per character).

Optimizers (the same initial parameters, minibatches and step budget):

* ``kfac adaptive``: ``kronjax.kfac(loss=softmax_cross_entropy, layers=...,
  fallback=adamw)``, each update given ``output_fn=`` and ``targets=``: step
  size, momentum and damping chosen by the quadratic model.
* ``kfac fixed``: ``kronjax.kfac(learning_rate=--kfac-lr,
  damping=--kfac-damping, norm_constraint=--kfac-norm-constraint, layers=...,
  fallback=adamw)``; the defaults (0.03, 1e-3, 1e-3) were the best of a few
  20-step runs of the default model (learning rates 0.01-0.1, dampings
  1e-3-1e-1, with and without the norm constraint; without it the first steps
  blow the loss up to 15-100 nats before it recovers).
* ``adamw``: ``optax.adamw(lr, weight_decay=0.01)`` with a linear warm-up over
  the first ``--warmup`` steps, then constant; learning rates ``--adamw-lrs``
  (best = lowest final held-out loss; all are reported).

Both K-FACs: ``layers=tape_fn.layers(params, x)`` (every Dense, attention
projection and the tied embedding; the LayerNorms and the position embedding
go to the fallback, ``optax.adamw(--fallback-lr, weight_decay=0.01)``), the
tape of ``kronjax.flax.value_grad_and_tape(model, loss)`` passed as
``curvature`` with ``with_tape=kronjax.curvature_due(state)``,
``factor_every=--factor-every``, ``inverse_every=--inverse-every``. Every
optimizer's whole step (loss, gradients, tape, update, apply) is one
``jax.jit``.

Timing: each step function is compiled ahead of time (``jit(...).lower(...)
.compile()``, timed: the compile time); the wall-clock axis starts there, so
it *includes compilation*. Then every run trains in blocks of
``--eval-every`` steps (a multiple of ``--inverse-every``, so each block holds
the same number of refreshes), round robin over the runs with the order
rotated every round, so machine noise hits all alike; each block ends with
``jax.block_until_ready`` and its ``time.perf_counter()`` time is added to
that run's clock. After every block the held-out loss is evaluated (one jitted
forward pass over ``--eval-windows`` fixed held-out windows) outside the
clock. Step time = the median over blocks of block time / block steps.

Summary: held-out loss at equal steps (a few checkpoints and the last step),
and at equal wall-clock: each run's held-out loss at the time budget of the
run that finished first (compilation included), interpolated linearly along
its eval curve; compile time and median step time of every run.

Usage::

  /work/venv/bin/python benchmarks/transformer_lm.py            # ~10-15 min on 2 cores
  /work/venv/bin/python benchmarks/transformer_lm.py --quick    # smoke run

Writes ``benchmarks/results/transformer_lm.{json,md,png}`` (``--out`` to
change; ``--quick`` writes to a temporary folder unless ``--out`` is given).
The plot is skipped, with a note, when matplotlib is not importable.
"""

from __future__ import annotations

import os

# jaxlib's CPU LAPACK runs on scipy's OpenBLAS, whose threads compete with
# XLA's on a small machine (benchmarks/README.md): one thread, unless set.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=wrong-import-position
import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _autoencoder as ae  # (kronjax_source, output_dir, environment_lines)

try:
  import kronjax
  import kronjax.flax
  _ = (kronjax.kfac, kronjax.curvature_due, kronjax.flax.value_grad_and_tape,
       kronjax.losses.softmax_cross_entropy)
  KRONJAX_ERROR = None
except Exception as e:  # pylint: disable=broad-except
  kronjax = None
  KRONJAX_ERROR = f"kronjax not importable: {e!r}"

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "encodings",
             "__pycache__"}
HOLDOUT_EVERY = 10          # every 10th file is validation text
HEADS = 4
WEIGHT_DECAY = 0.01
DIVERGED = 1e3              # a minibatch loss above this (or not finite) stops a run


# --- data -----------------------------------------------------------------------
@dataclasses.dataclass
class Corpus:
  train: np.ndarray          # uint8 token ids
  valid: np.ndarray
  vocab: int                 # including the "unknown" id (the last)
  chars: str                 # the known characters, id order
  files: int
  valid_files: int
  root: str
  sha256: str


def load_corpus(max_bytes: int) -> Corpus:
  """The standard library's sources as byte-level token ids."""
  root = pathlib.Path(os.path.dirname(os.__file__))
  files = sorted((p for p in root.rglob("*.py")
                  if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])),
                 key=lambda p: p.relative_to(root).as_posix())
  train, valid, total, used, n_valid = [], [], 0, 0, 0
  digest = hashlib.sha256()
  for i, path in enumerate(files):
    if total >= max_bytes:
      break
    data = path.read_bytes()[:max_bytes - total]
    digest.update(data)
    if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
      valid.append(data)
      n_valid += 1
    else:
      train.append(data)
    total += len(data)
    used += 1
  train_b = np.frombuffer(b"".join(train), np.uint8)
  valid_b = np.frombuffer(b"".join(valid), np.uint8)
  known = np.unique(train_b[train_b < 128])
  table = np.full(256, len(known), np.uint8)      # unknown: the last id
  table[known] = np.arange(len(known), dtype=np.uint8)
  return Corpus(train=table[train_b], valid=table[valid_b],
                vocab=len(known) + 1, chars="".join(map(chr, known)),
                files=used, valid_files=n_valid, root=str(root),
                sha256=digest.hexdigest())


def windows(text: np.ndarray, starts: np.ndarray, seq: int) -> np.ndarray:
  """Windows of seq + 1 ids at ``starts`` (any shape): ``starts.shape + (seq+1,)``."""
  return text[starts[..., None] + np.arange(seq + 1)].astype(np.int32)


# --- model ----------------------------------------------------------------------
class Block(nn.Module):
  """Pre-LayerNorm transformer block; ``nn.scan``'s carry in, carry out."""
  width: int
  heads: int = HEADS

  @nn.compact
  def __call__(self, h, _):
    mask = nn.make_causal_mask(jnp.ones(h.shape[:2], jnp.int32))
    a = nn.LayerNorm()(h)
    h = h + nn.MultiHeadDotProductAttention(
        num_heads=self.heads, use_bias=False)(a, a, mask=mask)
    m = nn.LayerNorm()(h)
    m = nn.Dense(4 * self.width, use_bias=False)(m)
    m = nn.Dense(self.width, use_bias=False)(nn.gelu(m))
    return h + m, None


class GPT(nn.Module):
  """Character GPT: logits ``(N, T, vocab)`` for ids ``(N, T)``."""
  vocab: int
  width: int = 128
  layers: int = 4
  seq: int = 64
  tied: bool = True

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, self.width)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.width))
    h = embed(ids) + pos[:ids.shape[1]]
    blocks = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=self.layers)
    h, _ = blocks(self.width, name="blocks")(h, None)
    h = nn.LayerNorm()(h)
    if self.tied:
      return embed.attend(h)
    return nn.Dense(self.vocab, use_bias=False)(h)


# --- optimizers -------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """One optimizer: ``step(params, state, x, y, rng) -> (params, state, loss)``."""
  name: str
  label: str
  optimizer: str             # "kfac adaptive", "kfac fixed", "adamw"
  hp: Any
  settings: dict
  make: Callable[[], tuple[Callable, Callable]]   # -> (init(params), step)
  error: str | None = None


def adamw_schedule(lr: float, warmup: int):
  if warmup <= 0:
    return lr
  return optax.join_schedules(
      [optax.linear_schedule(lr / warmup, lr, warmup - 1),
       optax.constant_schedule(lr)], [warmup])


def make_adamw(model, lr: float, warmup: int) -> Run:
  tx = optax.adamw(adamw_schedule(lr, warmup), weight_decay=WEIGHT_DECAY)
  loss = kronjax.losses.softmax_cross_entropy if kronjax else _xent

  def make():
    def step(params, state, x, y, rng):
      del rng
      value, grads = jax.value_and_grad(
          lambda p: loss(model.apply({"params": p}, x), y))(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, value
    return tx.init, step

  return Run(f"adamw lr={lr:g}", f"adamw lr={lr:g}", "adamw", lr,
             dict(call=f"optax.adamw({lr:g} with {warmup} warm-up steps, "
                  f"weight_decay={WEIGHT_DECAY})"), make)


def _xent(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def make_kfac(model, args, x_example, adaptive: bool) -> Run:
  name = "kfac adaptive" if adaptive else "kfac fixed"
  fallback = optax.adamw(args.fallback_lr, weight_decay=WEIGHT_DECAY)
  common = dict(factor_every=args.factor_every, inverse_every=args.inverse_every)
  if adaptive:
    call = (f"kronjax.kfac(loss=softmax_cross_entropy, layers=..., "
            f"factor_every={args.factor_every}, inverse_every="
            f"{args.inverse_every}, fallback=optax.adamw({args.fallback_lr:g}, "
            f"weight_decay={WEIGHT_DECAY}))")
    hp = None
  else:
    call = (f"kronjax.kfac(learning_rate={args.kfac_lr:g}, damping="
            f"{args.kfac_damping:g}, norm_constraint={args.kfac_norm_constraint}, "
            f"layers=..., factor_every={args.factor_every}, inverse_every="
            f"{args.inverse_every}, fallback=optax.adamw({args.fallback_lr:g}, "
            f"weight_decay={WEIGHT_DECAY}))")
    hp = args.kfac_lr
  settings = dict(call=call, tape="kronjax.flax.value_grad_and_tape(model, "
                  "softmax_cross_entropy) (MC Fisher), tapes passed as "
                  "curvature, with_tape=kronjax.curvature_due(state)")

  def make():
    loss = kronjax.losses.softmax_cross_entropy
    tape_fn = kronjax.flax.value_grad_and_tape(model, loss)

    def init(params):
      layers = tape_fn.layers(params, x_example)
      settings["layers"] = {k: f"{v.kind} {tuple(v.kernel)}"
                            for k, v in layers.items()}
      if adaptive:
        tx = kronjax.kfac(loss=loss, layers=layers, fallback=fallback, **common)
      else:
        tx = kronjax.kfac(learning_rate=args.kfac_lr, damping=args.kfac_damping,
                          norm_constraint=args.kfac_norm_constraint,
                          layers=layers, fallback=fallback, **common)
      holder["tx"] = tx
      return tx.init(params)

    def step(params, state, x, y, rng):
      tx = holder["tx"]
      value, grads, tape = tape_fn(params, x, y, rng,
                                   with_tape=kronjax.curvature_due(state))
      updates, state = tx.update(
          grads, state, params, curvature=tape,
          output_fn=lambda p: model.apply({"params": p}, x), targets=y)
      return optax.apply_updates(params, updates), state, value

    holder = {}
    return init, step

  return Run(name, name, name, hp, settings, make)


# --- training -----------------------------------------------------------------------
def train_all(runs: list[Run], params0, corpus: Corpus, args) -> dict:
  """Compiles every run, then trains them interleaved in blocks of eval_every."""
  seq, batch, steps, k = args.seq, args.batch, args.steps, args.eval_every
  rng = np.random.default_rng(args.seed)
  starts = rng.integers(0, len(corpus.train) - seq - 1, size=(steps, batch))
  eval_starts = np.random.default_rng(args.seed + 7).integers(
      0, len(corpus.valid) - seq - 1, size=args.eval_windows)
  ev = jnp.asarray(windows(corpus.valid, eval_starts, seq))
  keys = jax.random.split(jax.random.key(args.seed + 1), steps)
  w0 = jnp.asarray(windows(corpus.train, starts[0], seq))
  model = args.model_obj
  loss = kronjax.losses.softmax_cross_entropy if kronjax else _xent
  evaluate = jax.jit(lambda p: loss(model.apply({"params": p}, ev[:, :-1]),
                                    ev[:, 1:]))
  loss0 = float(evaluate(params0))     # compiles the eval, outside any clock
  print(f"held-out loss at initialisation: {loss0:.4f} "
        f"(log vocab = {math.log(corpus.vocab):.4f})", flush=True)

  out = {}
  for r in runs:
    rec = dict(eval_steps=[0], eval_loss=[loss0], eval_wall_s=[None],
               train_loss=[], block_s=[], block_steps=[], diverged_at=None,
               error=r.error)
    out[r.label] = rec
    if r.error:
      continue
    try:
      t0 = time.perf_counter()
      init, step = r.make()
      state = init(params0)
      jax.block_until_ready(state)
      rec["init_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
          params0, state, w0[:, :-1], w0[:, 1:], keys[0]).compile()
      rec["compile_s"] = time.perf_counter() - t0
      rec["eval_wall_s"][0] = rec["compile_s"]
      rec["clock"] = rec["compile_s"]
      # donate_argnums: the run gets its own copy of the initial parameters.
      rec["params"] = jax.tree.map(jnp.copy, params0)
      rec["state"], rec["step"] = state, compiled
      print(f"  {r.label}: compiled in {rec['compile_s']:.1f} s "
            f"(setup {rec['init_s']:.1f} s)", flush=True)
    except Exception:  # pylint: disable=broad-except
      rec["error"] = traceback.format_exc()
      print(f"  {r.label}: FAILED to set up:\n{rec['error']}", flush=True)

  live = [r for r in runs if not out[r.label]["error"]]
  for b, start in enumerate(range(0, steps, k)):
    stop = min(start + k, steps)
    data = windows(corpus.train, starts[start:stop], seq)
    xs = [jnp.asarray(w[:, :-1]) for w in data]   # on device, outside the timing
    ys = [jnp.asarray(w[:, 1:]) for w in data]
    ks = [keys[i] for i in range(start, stop)]
    jax.block_until_ready((xs, ys, ks))
    rot = b % max(1, len(live))
    for r in live[rot:] + live[:rot]:
      rec = out[r.label]
      if rec["diverged_at"] is not None or rec["error"]:
        continue
      params, state, losses = rec["params"], rec["state"], []
      try:
        t0 = time.perf_counter()
        for i in range(start, stop):
          params, state, value = rec["step"](params, state, xs[i - start],
                                             ys[i - start], ks[i - start])
          losses.append(value)
        jax.block_until_ready((params, state, losses))
        dt = time.perf_counter() - t0
      except Exception:  # pylint: disable=broad-except
        rec["error"] = traceback.format_exc()
        print(f"  {r.label}: FAILED at steps {start}-{stop}:\n{rec['error']}",
              flush=True)
        continue
      rec["params"], rec["state"] = params, state
      rec["clock"] += dt
      rec["block_s"].append(dt)
      rec["block_steps"].append(stop - start)
      rec["train_loss"] += [float(v) for v in jax.device_get(losses)]
      held = float(evaluate(params))          # outside the clock
      rec["eval_steps"].append(stop)
      rec["eval_loss"].append(held)
      rec["eval_wall_s"].append(rec["clock"])
      last = rec["train_loss"][-1]
      if not (math.isfinite(last) and math.isfinite(held)) or last > DIVERGED:
        rec["diverged_at"] = stop
        print(f"  {r.label}: diverged by step {stop} (loss {last:g})", flush=True)
    print(f"step {stop:5d}  " + "  ".join(
        f"{r.label}={out[r.label]['eval_loss'][-1]:.3f}"
        f"@{out[r.label].get('clock', 0):.0f}s" for r in live), flush=True)
  for rec in out.values():
    for key in ("params", "state", "step", "clock"):
      rec.pop(key, None)
  return out


# --- summary --------------------------------------------------------------------
def checkpoints(steps: int, k: int) -> list[int]:
  """Eval steps near 1/4, 1/2, 3/4 of the run, and the last step."""
  evals = sorted(set(list(range(k, steps, k)) + [steps]))
  marks = {min(evals, key=lambda s: abs(s - f * steps)) for f in (0.25, 0.5, 0.75)}
  return sorted(marks | {steps})


def at_time(rec: dict, t: float) -> float | None:
  """Held-out loss at wall-clock ``t``, linear along the eval curve."""
  ts, ls = rec["eval_wall_s"], rec["eval_loss"]
  if ts[0] is None or t > ts[-1] + 1e-9:
    return None
  return float(np.interp(t, ts, ls))     # before compilation ends: the initial loss


def time_to(rec: dict, target: float) -> tuple[float, float] | None:
  """(step, seconds) at which the eval curve first reaches ``target`` (linear)."""
  s, t, l = rec["eval_steps"], rec["eval_wall_s"], rec["eval_loss"]
  for i in range(1, len(l)):
    if l[i] <= target:
      f = 1.0 if l[i - 1] == l[i] else (l[i - 1] - target) / (l[i - 1] - l[i])
      f = min(max(f, 0.0), 1.0)
      return (s[i - 1] + f * (s[i] - s[i - 1]), t[i - 1] + f * (t[i] - t[i - 1]))
  return None


def summarise(runs: list[Run], out: dict, steps: int, k: int) -> dict:
  rows = []
  for r in runs:
    rec = out[r.label]
    done = (not rec["error"] and rec["diverged_at"] is None
            and rec["eval_steps"][-1] == steps)
    per_step = [s / n for s, n in zip(rec["block_s"], rec["block_steps"])]
    rows.append(dict(
        label=r.label, optimizer=r.optimizer, hp=r.hp, settings=r.settings,
        final_loss=rec["eval_loss"][-1] if done else None,
        error=rec["error"], diverged_at=rec["diverged_at"],
        compile_s=rec.get("compile_s"), init_s=rec.get("init_s"),
        median_step_ms=statistics.median(per_step) * 1e3 if per_step else None,
        min_step_ms=min(per_step) * 1e3 if per_step else None,
        train_seconds=sum(rec["block_s"]),
        wall_s=rec["eval_wall_s"][-1] if done else None,
        final_train_loss=(float(np.mean(rec["train_loss"][-k:]))
                          if rec["train_loss"] else None)))
  adamw = [r for r in rows if r["optimizer"] == "adamw"]
  ok = [r for r in adamw if r["final_loss"] is not None]
  best_adamw = min(ok, key=lambda r: r["final_loss"]) if ok else None
  for r in rows:
    r["best_adamw"] = r is best_adamw
  compared = [r for r in rows if r["optimizer"] != "adamw"] + (
      [best_adamw] if best_adamw else [])
  finished = [r for r in compared if r["wall_s"] is not None]
  budget = min((r["wall_s"] for r in finished), default=None)
  marks = checkpoints(steps, k)
  for r in rows:
    rec = out[r["label"]]
    r["at_steps"] = {m: (rec["eval_loss"][rec["eval_steps"].index(m)]
                         if m in rec["eval_steps"] else None) for m in marks}
    r["at_budget"] = None if budget is None else at_time(rec, budget)
    if best_adamw is not None:
      hit = time_to(rec, best_adamw["final_loss"])
      r["to_adamw_final"] = None if hit is None else dict(step=hit[0], seconds=hit[1])
  return dict(rows=rows, best_adamw=best_adamw["label"] if best_adamw else None,
              budget_s=budget,
              budget_run=next((r["label"] for r in finished
                               if r["wall_s"] == budget), None),
              checkpoints=marks)


def _f(v, fmt="{:.3f}", none="—"):
  return none if v is None else fmt.format(v)


def report_lines(res: dict) -> list[str]:
  s, env = res["summary"], res["environment"]
  c = res["corpus"]
  lines = [
      "# Character-level GPT: kronjax K-FAC vs AdamW", "",
      f"Command: `{res['command']}`", "",
      f"Data: {c['files']} standard-library files from `{c['root']}` "
      f"({c['train_bytes']:,} training and {c['valid_bytes']:,} held-out "
      f"characters, every {HOLDOUT_EVERY}th file held out), vocabulary "
      f"{c['vocab']} (ASCII bytes seen in training + unknown). Model: "
      f"{res['model']}, {res['n_params']:,} parameters. Batch "
      f"{res['batch']} x {res['seq']} characters, {res['steps']} steps, seed "
      f"{res['seed']}, float32, {env['backend']} with {env['cpus']} cores. "
      f"Held-out loss (nats per character) over {res['eval_windows']} fixed "
      f"held-out windows, every {res['eval_every']} steps; initial "
      f"{res['initial_loss']:.3f}.", ""]
  if s["budget_s"] is not None:
    lines += [
        f"Equal wall-clock: {s['budget_s']:.0f} s (compilation included), the "
        f"whole run of the first to finish ({s['budget_run']}); AdamW: the "
        f"best learning rate ({s['best_adamw']}).", ""]
  marks = s["checkpoints"]
  lines += [
      "| optimizer | held-out loss, final | " + " | ".join(
          f"step {m}" for m in marks) + " | at equal wall-clock | compile s | "
      "step ms (median) | run s (compile + steps) | step, seconds to best "
      "AdamW's final loss |",
      "|---|---|" + "---|" * len(marks) + "---|---|---|---|---|"]
  for r in s["rows"]:
    if r["error"]:
      lines.append(f"| {r['label']} | failed (see below) |" + " |" * (len(marks) + 5))
      continue
    hit = r.get("to_adamw_final")
    name = r["label"] + (" (best AdamW)" if r["best_adamw"] else "")
    lines.append(
        f"| {name} | {_f(r['final_loss'], none='diverged')} | " + " | ".join(
            _f(r["at_steps"][m]) for m in marks) +
        f" | {_f(r['at_budget'])} | {_f(r['compile_s'], '{:.1f}')} | "
        f"{_f(r['median_step_ms'], '{:.0f}')} | {_f(r['wall_s'], '{:.0f}')} | "
        + ("—" if s["best_adamw"] is None else "not reached" if hit is None
           else f"{hit['step']:.0f}, {hit['seconds']:.0f} s") + " |")
  lines += ["", "Equal wall-clock = held-out loss interpolated linearly along "
            "the eval curve at that time (before its compilation ends a run "
            "has its initial loss). Step ms = median over blocks of "
            f"{res['eval_every']} steps of block time / steps; the K-FAC "
            f"blocks each hold {res['eval_every'] // res['inverse_every']} "
            "refresh(es).", ""]
  lines += ["Settings:", ""]
  for r in s["rows"]:
    lines.append(f"- {r['label']}: {r['settings'].get('call')}")
  kfac = next((r for r in s["rows"] if r["optimizer"] != "adamw"
               and "layers" in r["settings"]), None)
  if kfac:
    lines.append(f"- K-FAC layers: {kfac['settings']['layers']}; tape: "
                 f"{kfac['settings']['tape']}")
  for r in s["rows"]:
    if r["error"]:
      lines += ["", f"{r['label']} failed:", "", "```", r["error"].rstrip(), "```"]
  lines += ae.environment_lines(env, res["total_seconds"], "interleaving keeps")
  return lines


def plot(path: pathlib.Path, res: dict) -> bool:
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"[note] matplotlib not importable ({e}); no plot written", flush=True)
    return False
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  s = res["summary"]
  for r in s["rows"]:
    c = res["curves"][r["label"]]
    if r["error"] or c["eval_wall_s"][0] is None:
      continue
    style = dict(lw=1.4) if (r["optimizer"] != "adamw" or r["best_adamw"]) else \
        dict(lw=0.8, ls="--", alpha=0.7)
    line, = ax1.plot(c["eval_steps"], c["eval_loss"], label=r["label"], **style)
    ax2.plot([0.0] + c["eval_wall_s"], [c["eval_loss"][0]] + c["eval_loss"],
             color=line.get_color(), label=r["label"], **style)
    ax2.plot([c["eval_wall_s"][0]], [c["eval_loss"][0]], "|",
             color=line.get_color(), ms=10)
  if s["budget_s"] is not None:
    ax2.axvline(s["budget_s"], color="gray", ls=":", lw=0.8)
  finals = [r["final_loss"] for r in s["rows"] if r["final_loss"] is not None]
  for ax, xl in ((ax1, "step"),
                 (ax2, "wall-clock seconds, compilation included (| = compiled)")):
    ax.set_xlabel(xl)
    ax.set_ylabel("held-out loss (nats / character)")
    if finals:
      ax.set_ylim(min(finals) - 0.1, res["initial_loss"] + 0.1)
    ax.grid(alpha=0.3)
  ax1.legend(fontsize=8)
  fig.suptitle(f"char-level GPT {res['model']}, batch {res['batch']}x{res['seq']}, "
               f"{res['environment']['cpus']} CPU cores")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def environment() -> dict:
  return ae.environment(("jax", "jaxlib", "flax", "optax", "numpy", "kronjax"))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True,
                 help="tied head embed.attend(h) (default), or --no-tied: "
                 "nn.Dense(vocab, use_bias=False)")
  p.add_argument("--eval-every", type=int, default=20,
                 help="steps per timed block and between held-out evaluations "
                 "(a multiple of --inverse-every)")
  p.add_argument("--eval-windows", type=int, default=128,
                 help="held-out windows per evaluation")
  p.add_argument("--max-bytes", type=int, default=4_000_000,
                 help="characters of standard-library source read")
  p.add_argument("--adamw-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
  p.add_argument("--warmup", type=int, default=None,
                 help="AdamW linear warm-up steps (default: steps // 10)")
  p.add_argument("--kfac-lr", type=float, default=0.03)
  p.add_argument("--kfac-damping", type=float, default=1e-3)
  p.add_argument("--kfac-norm-constraint", type=float, default=1e-3)
  p.add_argument("--fallback-lr", type=float, default=1e-3,
                 help="AdamW of the K-FACs' non-layer parameters (LayerNorms, "
                 "position embedding)")
  p.add_argument("--factor-every", type=int, default=1)
  p.add_argument("--inverse-every", type=int, default=10)
  p.add_argument("--only", nargs="+", default=None,
                 choices=["kfac-adaptive", "kfac-fixed", "adamw"],
                 help="run only these optimizers")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true",
                 help="smoke run: 30 steps, width 64, 2 layers, batch 16, "
                 "eval every 10 steps over 32 windows")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="output folder (default benchmarks/results; a temporary "
                 "folder for --quick)")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.width, args.layers, args.batch = 30, 64, 2, 16
    args.eval_every, args.eval_windows, args.max_bytes = 10, 32, 1_000_000
  if args.eval_every % args.inverse_every:
    p.error("--eval-every must be a multiple of --inverse-every")
  if args.warmup is None:
    args.warmup = args.steps // 10
  t_start, load_start = time.perf_counter(), os.getloadavg()
  source = ae.kronjax_source()

  corpus = load_corpus(args.max_bytes)
  model = GPT(vocab=corpus.vocab, width=args.width, layers=args.layers,
              seq=args.seq, tied=args.tied)
  args.model_obj = model
  x_example = jnp.zeros((args.batch, args.seq), jnp.int32)
  params0 = model.init(jax.random.key(args.seed), x_example)["params"]
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params0))
  desc = (f"{args.layers} blocks x width {args.width}, {HEADS} heads, context "
          f"{args.seq}, vocab {corpus.vocab}, "
          f"{'tied' if args.tied else 'untied'} head")
  print(f"corpus: {corpus.files} files, {len(corpus.train):,} train / "
        f"{len(corpus.valid):,} held-out characters; model: {desc}, "
        f"{n_params:,} parameters", flush=True)

  only = set(args.only or ["kfac-adaptive", "kfac-fixed", "adamw"])
  runs = []
  for adaptive, key in ((True, "kfac-adaptive"), (False, "kfac-fixed")):
    if key in only:
      r = make_kfac(model, args, x_example, adaptive)
      r.error = KRONJAX_ERROR
      runs.append(r)
  if "adamw" in only:
    runs += [make_adamw(model, lr, args.warmup) for lr in args.adamw_lrs]
  out = train_all(runs, params0, corpus, args)
  summary = summarise(runs, out, args.steps, args.eval_every)

  env = environment()
  env["load_average_at_start"] = load_start
  env["kronjax_source"] = source
  res = dict(
      command="python benchmarks/transformer_lm.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      corpus=dict(root=corpus.root, files=corpus.files,
                  valid_files=corpus.valid_files, train_bytes=len(corpus.train),
                  valid_bytes=len(corpus.valid), vocab=corpus.vocab,
                  chars=corpus.chars, sha256=corpus.sha256,
                  skipped_dirs=sorted(SKIP_DIRS), holdout_every=HOLDOUT_EVERY),
      model=desc, n_params=n_params, tied=args.tied, batch=args.batch,
      seq=args.seq, steps=args.steps, seed=args.seed, quick=args.quick,
      eval_every=args.eval_every, eval_windows=args.eval_windows,
      inverse_every=args.inverse_every, factor_every=args.factor_every,
      warmup=args.warmup,
      initial_loss=out[runs[0].label]["eval_loss"][0] if runs else None,
      summary=summary, curves=out, environment=env,
      total_seconds=time.perf_counter() - t_start)

  dest = ae.output_dir(args.out, args.quick, RESULTS)
  stem = "transformer_lm_quick" if args.quick else "transformer_lm"
  (dest / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
  lines = report_lines(res)
  (dest / f"{stem}.md").write_text("\n".join(lines))
  plotted = plot(dest / f"{stem}.png", res)
  print("\n".join(lines))
  print(f"wrote {dest / stem}.{{json,md{',png' if plotted else ''}}}")


if __name__ == "__main__":
  main()
