"""The ``curvature`` argument of ``scale_by_kfac``: checks, factors, solves.

Turns the blocks (or tapes) an update is given into moving averages of each
layer's factors, refreshes their eigendecompositions or damped inverses under
``lax.cond`` (optionally placed over a mesh, see ``_placement``), and
preconditions the gradient tree layer by layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kronjax import _placement
from kronjax import _precondition as pre
from kronjax.blocks import fisher_blocks
from kronjax.tape import LayerTape

CURVATURE_HINT = (
    "pass curvature=kronjax.fisher_blocks(tape) to "
    "tx.update(grads, opt_state, params, curvature=...)")


def checked_blocks(curvature, layers, factors):
  """A function computing ``{key: (A, G)}``, and the keys; checked at trace.

  ``curvature`` holds blocks, or tapes whose blocks are computed only when the
  factors are updated (inside that ``lax.cond``: ``factor_every > 1`` then
  skips the factors' einsums too).
  """
  if not isinstance(curvature, dict):
    raise ValueError(f"curvature must be a dict {{layer_path: Kron(A, G)}}; "
                     f"got {type(curvature).__name__}: {CURVATURE_HINT}.")
  tapes = [isinstance(v, LayerTape) for v in curvature.values()]
  if any(tapes) and not all(tapes):
    raise ValueError("curvature must hold only Kron blocks or only "
                     "LayerTapes, not both.")
  compute = ((lambda: fisher_blocks(curvature)) if any(tapes)
             else (lambda: curvature))
  shapes = jax.eval_shape(compute) if any(tapes) else curvature
  keys = {}  # state key -> the key of its block in compute()'s dict
  for given, block in shapes.items():
    path = tuple(given.split("/")) if isinstance(given, str) else tuple(given)
    a, g = block.factors
    spec = pre.check_block(path, layers, a, g)
    key = pre.layer_key(spec.path)
    if key not in factors:
      raise ValueError(f"Layer {path} has a block but was not in the params "
                       f"given to init; known layers: {list(factors)}.")
    keys[key] = given

  def blocks_fn():
    blocks = compute()
    return {key: blocks[given].factors for key, given in keys.items()}

  return blocks_fn, list(keys)


def maintain_factors(factors, blocks_fn, keys, decay, min_eigenvalue,
                      damping, update_now, refresh_now, inverse_mesh=None,
                      inverse_axis="data"):
  """Moving averages and eigendecompositions of the layers with blocks."""
  sub = {key: factors[key] for key in keys}

  def update(fs):
    blocks = blocks_fn()
    return {k: pre.update_factors(f, *blocks[k], decay) for k, f in fs.items()}

  sub = jax.lax.cond(update_now, update, lambda fs: fs, sub)
  sub = jax.lax.cond(
      refresh_now,
      lambda fs: _placement.refresh_distributed(
          fs, lambda f: pre.refresh(f, min_eigenvalue, damping),
          inverse_mesh, inverse_axis),
      lambda fs: fs, sub)
  return {**factors, **sub}


def precondition_tree(grads, covered, factors, damping):
  def layer(key, leaves):
    gamma = pre.to_matrix(covered[key], leaves,
                          jnp.result_type(*leaves.values()))
    p = pre.precondition(factors[key], gamma, damping)
    return pre.from_matrix(covered[key], p, leaves)

  return pre.map_layers(layer, grads, covered)
