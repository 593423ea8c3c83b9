"""Whole-tree reductions and selections, each compiled as one operation.

XLA:CPU compiles every elementwise or reduction kernel separately (tens of
milliseconds each), so a per-leaf ``jnp.all(jnp.isfinite(x))``,
``jnp.vdot`` or ``jnp.where`` over a model's parameters costs a second of
compilation. Here the leaves are concatenated first (XLA fuses the
concatenation into the one reduction that reads it) and a choice between
two trees is one ``lax.cond``. With more than one device the reductions stay
per leaf: concatenating leaves sharded differently would move them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _inexact(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def flat(tree: Any, dtype: Any = None) -> jax.Array:
  """The float leaves of ``tree``, raveled and concatenated (in ``dtype``,
  by default their promoted dtype)."""
  leaves = [x for x in jax.tree.leaves(tree) if _inexact(x)]
  if dtype is None:
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
  if not leaves:
    return jnp.zeros((0,), dtype)
  return jnp.concatenate([jnp.ravel(jnp.asarray(x, dtype)) for x in leaves])


def _per_leaf() -> bool:
  return jax.device_count() > 1


def all_finite(tree: Any) -> jax.Array:
  """Whether every float leaf of ``tree`` is finite (a bool scalar)."""
  if _per_leaf():
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(
        tree) if _inexact(x)] or [jnp.asarray(True)]))
  return jnp.isfinite(jnp.sum(flat(tree) * 0))


def vdot(x: Any, y: Any, dtype: Any) -> jax.Array:
  """``⟨x, y⟩`` over all leaves of two trees of one structure, in ``dtype``."""
  if _per_leaf():
    return sum((jnp.vdot(jnp.asarray(a, dtype), jnp.asarray(b, dtype))
                for a, b in zip(*(jax.tree.leaves(t) for t in (x, y)))),
               jnp.zeros((), dtype))
  return jnp.dot(flat(x, dtype), flat(y, dtype))


def select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """``on_true`` if ``pred`` else ``on_false`` (trees of one structure)."""
  return jax.lax.cond(pred, lambda a, _: a, lambda _, b: b, on_true, on_false)
