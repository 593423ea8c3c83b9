"""Plumbing of the ``kfac`` alias: labels, full params and atomic skips.

``optax.partition`` routes the K-FAC layers and the other parameters to
different transformations and masks the other group's leaves
(``optax.MaskedNode``) in what each one sees. The wrappers here restore what
the masking hides: the adaptive step's ``output_fn`` needs every parameter, and
a step with a non-finite gradient anywhere must be skipped by every group.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kronjax import _precondition as pre


def all_finite(tree: Any) -> jax.Array:
  """Whether every leaf of ``tree`` is finite (``True`` for no leaves)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def param_labels(params: Any) -> Any:
  """``"kfac"`` for the parameters of candidate layers, else ``"fallback"``."""
  flat, treedef = pre.tree_paths(params)
  layers = pre.find_layers(params)
  labels = ["kfac" if pre.owner(path, layers) is not None else "fallback"
            for path, _ in flat]
  return jax.tree_util.tree_unflatten(treedef, labels)


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def with_full_params(output_fn: Callable[[Any], Any],
                     params: Any) -> Callable[[Any], Any]:
  """``output_fn`` for a masked view: masked leaves come from ``params``."""

  def masked_output_fn(view):
    full = jax.tree.map(lambda v, p: p if _is_masked(v) else v, view, params,
                        is_leaf=_is_masked)
    return output_fn(full)

  return masked_output_fn


def full_params_view(
    inner: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
  """Wraps a partition so its groups see full params and skip together.

  ``output_fn`` is rewritten with :func:`with_full_params`. When a gradient or
  a ``curvature`` block is not finite, every gradient is replaced by NaN, so
  each group's own guard skips the step (K-FAC counts it).
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, *, curvature=None,
                output_fn=None, **extra_args):
    ok = all_finite(updates) & all_finite(curvature)
    updates = jax.tree.map(
        lambda u: jnp.where(ok, u, jnp.full_like(u, jnp.nan)), updates)
    if output_fn is not None and params is not None:
      output_fn = with_full_params(output_fn, params)
    return inner.update(updates, state, params, curvature=curvature,
                        output_fn=output_fn, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def skip_if_not_finite(
    inner: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
  """``inner``; a non-finite gradient gives zero updates and no state change.

  Unlike ``optax.apply_if_finite`` it keeps ``inner``'s state as it is and
  never gives up skipping.
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    ok = all_finite(updates)
    zero_if_bad = lambda x: jnp.where(ok, x, jnp.zeros_like(x))
    new_updates, new_state = inner.update(
        jax.tree.map(zero_if_bad, updates), state, params, **extra_args)
    new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
    return jax.tree.map(zero_if_bad, new_updates), new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
