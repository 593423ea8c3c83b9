"""Defaults that never diverge: K-FAC as a new user runs it, on small models.

Four architectures (a tanh MLP, a sigmoid autoencoder, a strided ReLU CNN, a
transformer language model with a tied head) × three seeds × the settings a
user tries first: the adaptive defaults, a fixed learning rate from 0.01 to
0.3 at the default damping, and ``scale_by_kfac()`` chained with SGD and
momentum. A run diverges when a loss is not finite, exceeds three times the
first loss, or ends above it. ``python tests/test_reliability.py`` prints the
table.
"""

from __future__ import annotations

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import losses

STEPS, BATCH, SEEDS = 30, 64, (0, 1, 2)
RATES = (0.01, 0.03, 0.1, 0.3)


class TanhMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in (128, 64):
      x = jnp.tanh(nn.Dense(width)(x))
    return nn.Dense(10)(x)


class SigmoidAutoencoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in (32, 16, 32):
      x = nn.sigmoid(nn.Dense(width)(x))
    return nn.Dense(64)(x)


class StridedCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x.reshape(-1, 8, 8, 1)))
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class TinyGPT(nn.Module):
  vocab: int = 96
  width: int = 32

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.width)
    h = embed(tokens) + self.param("position", nn.initializers.normal(0.02),
                                   (tokens.shape[-1], self.width))
    mask = nn.make_causal_mask(tokens)
    h = h + nn.MultiHeadDotProductAttention(2, use_bias=False)(
        nn.LayerNorm()(h), mask=mask)
    h = h + nn.Dense(self.width)(nn.relu(nn.Dense(2 * self.width)(
        nn.LayerNorm()(h))))
    return embed.attend(nn.LayerNorm()(h))


@functools.cache
def _digits():
  from sklearn.datasets import load_digits
  digits = load_digits()
  return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)


@functools.cache
def _text():
  source = pathlib.Path(optax.__file__).parent / "_src" / "transform.py"
  codes = np.frombuffer(source.read_bytes(), np.uint8).astype(np.int32)
  return np.clip(codes - 32, 0, 95)  # printable ASCII; newline -> 0


def batches(arch: str, seed: int):
  """(STEPS, BATCH, ...) inputs and targets for one run."""
  rng = np.random.default_rng(seed)
  if arch == "transformer":
    text, context = _text(), 16
    starts = rng.integers(0, len(text) - context - 1, (STEPS, BATCH // 2))
    windows = text[starts[..., None] + np.arange(context + 1)]
    return jnp.asarray(windows[..., :-1]), jnp.asarray(windows[..., 1:])
  pixels, labels = _digits()
  idx = np.stack([rng.choice(len(pixels), BATCH, replace=False)
                  for _ in range(STEPS)])
  x = jnp.asarray(pixels[idx])
  return x, (x if arch == "sigmoid_autoencoder" else jnp.asarray(labels[idx]))


ARCHS = {
    "tanh_mlp": (TanhMLP(), losses.softmax_cross_entropy),
    "sigmoid_autoencoder": (SigmoidAutoencoder(),
                            losses.sigmoid_binary_cross_entropy),
    "strided_cnn": (StridedCNN(), losses.softmax_cross_entropy),
    "transformer": (TinyGPT(), losses.softmax_cross_entropy),
}


def optimizer(mode: str, loss, layers, lr):
  if mode == "adaptive":
    return kronjax.kfac(loss=loss, layers=layers)
  if mode == "fixed":
    return kronjax.kfac(learning_rate=lr, layers=layers)
  return optax.chain(kronjax.scale_by_kfac(layers=layers),
                     optax.sgd(0.1, momentum=0.9))


@functools.cache
def trainer(arch: str, mode: str):
  """A jitted ``(seed, lr) -> losses`` for one architecture and setting."""
  model, loss = ARCHS[arch]
  step = kronjax.flax.value_grad_and_tape(model, loss)
  x0 = batches(arch, 0)[0][0]

  @jax.jit
  def train(params, xs, ys, keys, lr):
    tx = optimizer(mode, loss, step.layers(params, x0), lr)

    def one(carry, batch):
      params, state = carry
      x, y, key = batch
      value, grads, tape = step(params, x, y, key)
      updates, state = tx.update(
          grads, state, params, curvature=tape, targets=y,
          output_fn=lambda p: model.apply({"params": p}, x))
      return (optax.apply_updates(params, updates), state), value

    return jax.lax.scan(one, (params, tx.init(params)),
                        (xs, ys, keys))[1]

  def run(seed: int, lr: float = 0.0) -> np.ndarray:
    xs, ys = batches(arch, seed)
    params = model.init(jax.random.key(seed), xs[0])["params"]
    keys = jax.random.split(jax.random.key(seed + 1000), STEPS)
    return np.asarray(train(params, xs, ys, keys, lr))

  return run


def diverged(curve: np.ndarray) -> bool:
  return bool(not np.all(np.isfinite(curve)) or np.max(curve) > 3 * curve[0]
              or curve[-1] > curve[0])


def runs():
  """Every (arch, setting, seed) of the suite."""
  for arch in ARCHS:
    for seed in SEEDS:
      yield arch, "adaptive", seed, None
      for lr in RATES:
        yield arch, "fixed", seed, lr
      yield arch, "chain", seed, None


@pytest.mark.parametrize("arch", list(ARCHS))
def test_defaults_never_diverge(arch):
  bad = []
  for name, mode, seed, lr in runs():
    if name == arch:
      curve = trainer(arch, mode)(seed, lr or 0.0)
      if diverged(curve):
        bad.append((mode, seed, lr, curve[0], np.max(curve), curve[-1]))
  assert not bad, f"{arch}: (mode, seed, lr, first, max, last) diverged: {bad}"


if __name__ == "__main__":
  import sys
  import time
  only = sys.argv[1:]  # e.g. "adaptive chain strided_cnn": those only
  table = {}
  start = time.perf_counter()
  for arch, mode, seed, lr in runs():
    if only and not ({arch, mode} & set(only)):
      continue
    curve = trainer(arch, mode)(seed, lr or 0.0)
    key = (arch, mode if lr is None else f"lr {lr:g}")
    table.setdefault(key, []).append(
        f"{'DIVERGED ' if diverged(curve) else ''}{curve[0]:.3g}→{curve[-1]:.3g}"
        f" (max {np.max(curve):.3g})")
  for (arch, setting), cells in table.items():
    print(f"{arch:20s} {setting:9s} " + " | ".join(cells))
  bad = sum("DIVERGED" in c for cells in table.values() for c in cells)
  print(f"{bad} of {sum(map(len, table.values()))} diverged; "
        f"{time.perf_counter() - start:.0f} s")
