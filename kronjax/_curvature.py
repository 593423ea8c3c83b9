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
from kronjax import _sharded
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


def init_factors(layers, dtype, exact_damping, mesh=None, axis="data",
                 shard=False):
  """Each layer's initial factor state; with ``shard``, split over ``mesh``."""
  factors = {key: pre.init_factors(spec, dtype, exact_damping)
             for key, spec in layers.items()}
  if not shard:
    return factors
  n = _placement.axis_size(mesh, axis)
  return _sharded.shard_rows(
      {k: _sharded.pad_layer(f, n) for k, f in factors.items()}, mesh, axis)


def maintain_factors(factors, blocks_fn, keys, decay, min_eigenvalue,
                     damping, update_now, refresh_now, layers, mesh=None,
                     axis="data", shard=False):
  """Moving averages and eigendecompositions of the layers with blocks.

  With ``shard`` the factors are stored padded and split by rows over the
  mesh axis (``kronjax._sharded``); they stay so.
  """
  sub = {key: factors[key] for key in keys}
  _sharded.check_layout(sub, layers, keys, _placement.axis_size(mesh, axis)
                        if shard else 1)
  fn = lambda f: pre.refresh(f, min_eigenvalue, damping)
  if shard:
    sizes = {k: (layers[k].factor_shapes[0][0], layers[k].factor_shapes[1][0])
             for k in keys}
    sub = _sharded.shard_rows(sub, mesh, axis)  # were they given otherwise
    refresh = lambda fs: _sharded.refresh(fs, fn, mesh, axis, sizes)
  else:
    refresh = lambda fs: _placement.refresh_distributed(fs, fn, mesh, axis)

  def update(fs):
    blocks = blocks_fn()
    if shard:  # Whole-batch sums before the split. With a batch that jit
      # took as a constant, XLA otherwise split the tapes to match the
      # factors and gathered batch-sized arrays; with a sharded batch it
      # changes nothing (the blocks are all-reduced either way).
      blocks = _sharded.replicate(blocks, mesh)
    return {k: pre.update_factors(f, *blocks[k], decay) for k, f in fs.items()}

  sub = jax.lax.cond(update_now, update, lambda fs: fs, sub)
  sub = jax.lax.cond(refresh_now, refresh, lambda fs: fs, sub)
  if shard:
    sub = _sharded.shard_rows(sub, mesh, axis)
  return {**factors, **sub}


def precondition_tree(grads, covered, factors, damping, mesh=None,
                      axis="data", shard=False):
  """Each covered layer's gradient, preconditioned.

  With ``shard`` the matmuls are partitioned like the factors, and the
  results are gathered (replicated over the mesh): the updates, and so the
  params they are added to, must not inherit the factors' split.
  """
  def layer(key, leaves):
    f = factors[key]
    gamma = pre.to_matrix(covered[key], leaves,
                          jnp.result_type(*leaves.values()))
    # Stored factors may be zero-padded (sharded storage): pad Γ alike.
    rows = f.a.shape[0] if f.a.ndim == 2 else gamma.shape[0]
    padded = jnp.pad(gamma, [(0, rows - gamma.shape[0]),
                             (0, f.g.shape[0] - gamma.shape[1])])
    p = pre.precondition(f, padded, damping)
    if shard:
      p = _sharded.replicate(p, mesh)
    p = p[:gamma.shape[0], :gamma.shape[1]]
    return pre.from_matrix(covered[key], p, leaves)

  return pre.map_layers(layer, grads, covered)
