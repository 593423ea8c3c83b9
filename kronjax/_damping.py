"""Each layer's damping and π, resolved for all layers at once.

``λ`` is a number, or :class:`Relative` to each layer's curvature; the
π-corrected split (Martens & Grosse 2015, §6.3) shifts ``A`` by ``π√λ`` and
``G`` by ``√λ/π`` with ``π = sqrt((tr A / d_A) / (tr G / d_G))``. Traces of all
layers are one reduction and the arithmetic runs on vectors over the layers
(a stack's members one by one): XLA:CPU compiles every small kernel on its
own, so a few kernels per layer would cost seconds of compilation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._params import compute_dtype

DAMPING = 1e-3  # λ where a relative damping has no scale (zero factors)


class Relative(NamedTuple):
  """``λ_l = value · (tr Ā_l / d_A)(tr Ḡ_l / d_G)``: damping relative to each
  layer's curvature (mean eigenvalues of its averaged factors)."""

  value: Any


def average(f: Any, side: str) -> jax.Array:
  """A layer's accumulator of factor ``side`` ("a" or "g"), computable."""
  return getattr(f, side).ema.astype(compute_dtype(f.weight.dtype))


def weight(f: Any) -> jax.Array:
  """A layer's accumulated moving-average weight (1 before any update)."""
  return jnp.where(f.weight > 0, f.weight, 1).astype(
      compute_dtype(f.weight.dtype))


def members(factors: dict[str, Any]):
  """Each layer's first index and count in a vector over all layers (a
  stack's members one by one), and the vector's length."""
  sizes = {key: f.weight.size for key, f in factors.items()}
  return dict(zip(sizes, np.cumsum([0, *sizes.values()]))), sizes, sum(
      sizes.values())


def resolved(factors: dict[str, Any], damping: Any):
  """``(π, λ, weight)`` of every layer member, as vectors.

  ``π = sqrt((tr A / d_A) / (tr G / d_G))`` (1 if either is 0); ``λ`` is
  ``damping``, or if :class:`Relative` ``value · (tr Ā/d_A)(tr Ḡ/d_G)`` of
  the bias-corrected averages (``DAMPING`` where that is 0).
  """
  offsets, sizes, total = members(factors)
  diagonals, segments = [], []
  for key, f in factors.items():
    for side in "ag":  # segments: a layer's A members, then its G members
      ema, d = average(f, side), getattr(f, side).ema.shape[-1]
      diagonals.append((ema if ema.ndim == f.weight.ndim + 1 else ema.reshape(
          ema.shape[:-2] + (d * d,))[..., ::d + 1]).reshape(-1) / d)
      segments.append(np.repeat(np.arange(sizes[key]) + 2 * offsets[key]
                                + (side == "g") * sizes[key], d))
  means = jax.ops.segment_sum(jnp.concatenate(diagonals),
                              np.concatenate(segments), 2 * total)
  first = np.concatenate([2 * offsets[k] + np.arange(n)
                          for k, n in sizes.items()])
  mean_a, mean_g = means[first], means[first + np.repeat(
      list(sizes.values()), list(sizes.values()))]
  weights = jnp.concatenate([weight(f).reshape(-1) for f in factors.values()])
  ok = (mean_a > 0) & (mean_g > 0)
  pi = jnp.sqrt(jnp.where(ok, mean_a, 1) / jnp.where(ok, mean_g, 1))
  if isinstance(damping, Relative):
    scale = mean_a * mean_g / weights**2
    damping = jnp.where(scale > 0, damping.value * scale, DAMPING)
  return pi, jnp.broadcast_to(jnp.asarray(damping, means.dtype),
                              (total,)), weights


def scales(factors: dict[str, Any]) -> jax.Array:
  """``(tr Ā / d_A)(tr Ḡ / d_G)`` of every layer member (a vector)."""
  return resolved(factors, Relative(1.0))[1]


def layer_damping(f: Any, damping: Any) -> Any:
  """``λ`` of one layer: ``damping``, or resolved if :class:`Relative`."""
  if not isinstance(damping, Relative):
    return damping
  return resolved({0: f}, damping)[1].reshape(f.weight.shape)


def shifts(factors: dict[str, Any], dense: list, damping: Any) -> jax.Array:
  """The π-split's shifts times the weights, ``π√λ w`` for A, ``√λ w / π``
  for G, of each ``(key, side)`` in ``dense``, members flattened."""
  offsets, sizes, total = members(factors)
  pi, lam, weights = resolved(factors, damping)
  root = jnp.sqrt(lam) * weights
  both = jnp.concatenate([pi * root, root / pi])  # all A's, then all G's
  return both[np.concatenate([offsets[k] + np.arange(sizes[k])
                              + (s == "g") * total for k, s in dense])]
