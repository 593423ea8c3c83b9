"""Influence scores from a fitted curvature, without per-example gradients.

The influence of a training example ``z`` on a query ``q`` (Koh & Liang 2017;
Grosse et al. 2023) is

.. math::

  s(q, z) = \\nabla ℓ(q)^\\top (F + λ I)^{-1} \\nabla ℓ(z),

with ``ℓ`` an example's negative log-likelihood (not divided by the batch
size) and ``F`` a :class:`kronjax.Curvature`. Positive: a gradient step on
``z`` lowers the loss on ``q`` (``z`` is *helpful*); negative: *harmful*.

Per layer, the query's preconditioned gradient ``M_q = (F_l + λI)⁻¹ G_q`` is
formed once (a ``d_A × d_G`` matrix per query), and a training example's
gradient ``G_n = Σ_t ā_{nt} g_{nt}ᵀ`` enters only through
``⟨M_q, G_n⟩ = Σ_t ā_{nt}ᵀ M_q g_{nt}``, contracted over query blocks,
examples and positions at once (an embedding looks up the rows of ``M_q``
at its ids). Memory is a block of queries times a batch of training
examples, plus the queries' ``M``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from kronjax import _per_example
from kronjax._params import float_dtype, layer_key
from kronjax.curvature import Curvature, batch_size, layer_matrices, rotate
from kronjax.tape import value_grad_and_tape_from_run

__all__ = ["influence_scores"]

# |Σ_n G_n − c ḡ| / |Σ_n G_n| above this: the tape's output gradients are not
# the loss's at the given labels (a Monte-Carlo or exact Fisher tape).
_MISMATCH = 1e-2


def _example_gradients(tape_fn: Callable, loss: Any, layers: dict[str, Any],
                       params: Any, x: Any, y: Any):
  """``({key: uses}, scale, mismatch)``: per-example gradients at the labels.

  ``scale`` times a use's ``Σ_t r cᵀ`` is the gradient of the example's NLL
  (the tapes carry ``sqrt(N/M)`` for a mean over ``M`` terms). With the loss
  (and a linen or ``kronjax.nn`` model) an empirical tape is made here from
  the tape's model, whatever ``tape_fn``'s Fisher mode. Otherwise the tape
  must be an empirical one: ``scale`` is then ``c/N`` with ``c`` the
  multiple of the mean gradient that the sum of the per-example gradients
  is, and ``mismatch`` how far from such a multiple that sum is.
  """
  n = batch_size(x)
  _, grads, tape = tape_fn(params, x, y, jax.random.key(0),
                           with_tape=loss is None)
  derive = (loss is not None and tape.model is not None and
            jax.tree.structure(grads) == jax.tree.structure(params))
  if loss is not None and not derive:  # an NNX module: take the tape as is
    _, grads, tape = tape_fn(params, x, y, jax.random.key(0))
  if derive:
    build, inputs = tape.model
    _, _, tape = value_grad_and_tape_from_run(
        build(inputs), loss, "empirical", 1, params, y, None, model=tape.model)
  uses = {}
  for path, entry in tape.items():
    if layer_key(path) in layers:
      uses[layer_key(path)] = _per_example.layer_uses(
          entry, path, "influence_scores")
  missing = sorted(set(layers) - set(uses))
  if missing:
    raise ValueError(f"tape_fn's tape has no layers {missing}, which the "
                     "curvature has: fit it with the same tape function.")
  if derive:
    return uses, jnp.sqrt(loss.num_terms(y) / n), jnp.zeros(())
  samples = {k: u.cols.shape[0] for k, us in uses.items() for u in us}
  if any(s != 1 for s in samples.values()):
    raise ValueError(_NOT_EMPIRICAL.format(
        f"its tapes hold {max(samples.values())} output gradients per "
        "example (a Monte-Carlo or exact Fisher)"))
  mean = layer_matrices(grads, layers, float_dtype(grads))
  total = {k: _per_example.gradients(us, layers[k].factor_sizes[0])[0].sum(0)
           for k, us in uses.items()}
  dot = lambda a, b: sum(jnp.vdot(a[k], b[k]) for k in a)
  tiny = jnp.finfo(jnp.float32).tiny
  c = dot(total, mean) / jnp.maximum(dot(mean, mean), tiny)
  resid = {k: total[k] - c * mean[k] for k in total}
  mismatch = jnp.sqrt(dot(resid, resid) / jnp.maximum(dot(total, total), tiny))
  return uses, c / n, mismatch


_NOT_EMPIRICAL = (
    "influence_scores needs each example's gradient at its own label, but "
    "tape_fn gives no loss to take it from and {}. Pass the model's loss, "
    "influence_scores(..., loss=kronjax.losses.softmax_cross_entropy) (the "
    "loss tape_fn was made with), or a tape function made with "
    'fisher="empirical".')


def _check(mismatch: jax.Array) -> None:
  if float(mismatch) > _MISMATCH:
    raise ValueError(_NOT_EMPIRICAL.format(
        "its output gradients are not the loss's at the given labels "
        f"(relative mismatch {float(mismatch):.2g}): it was made with "
        'fisher="mc" or "exact"'))


@functools.lru_cache(maxsize=8)
def _compiled(tape_fn: Callable, loss: Any, layer_items: tuple, block: int,
              q: int):
  """The jitted query and training passes, kept for the next call."""
  layers = dict(layer_items)

  def precondition(p, x, y, curv, damping):
    uses, scale, mismatch = _example_gradients(tape_fn, loss, layers, p, x, y)
    out = {}
    for key, us in uses.items():
      d_a, d_g = layers[key].factor_sizes
      e = curv.factors[key]
      positions = sum(u.cols.shape[2] for u in us)
      if positions * (d_a + d_g) < d_a * d_g:  # rotate the factors, not G_q
        ua, ug = e.eigenvectors.factors
        g = _per_example.gradients(us, d_a, ua, ug)[0]
      else:
        g = rotate(e, _per_example.gradients(us, d_a)[0])
      out[key] = rotate(e, g * scale / (curv.eigenvalues[key] + damping),
                        back=True)
    return out, mismatch

  def score(p, x, y, m):
    uses, scale, mismatch = _example_gradients(tape_fn, loss, layers, p, x, y)
    fns = {k: _per_example.scorer(us, block, *layers[k].factor_sizes)
           for k, us in uses.items()}
    s = jax.lax.map(lambda mb: sum(fns[k](mb[k]) for k in fns), m)
    return s.reshape(-1, s.shape[-1])[:q] * scale, mismatch

  return jax.jit(precondition), jax.jit(score)


def influence_scores(curv: Curvature, tape_fn: Callable, params: Any,
                     queries: tuple[Any, Any], train: Iterable, *,
                     damping: Any, loss: Any = None,
                     query_block: int = 64) -> jax.Array:
  """``(n_queries, n_train)`` influence scores ``∇ℓ(q)ᵀ (F + λI)⁻¹ ∇ℓ(z)``.

  Over the parameters of the curvature's layers (the K-FAC layers; others
  do not count). ``ℓ`` is an example's negative log-likelihood, summed over
  its terms (a sequence's tokens), not divided by any batch size.

  Args:
    curv: from :func:`kronjax.fit_curvature`.
    tape_fn: the tape function the curvature was fitted with. With ``loss``
      (and a linen or ``kronjax.nn`` model) any Fisher mode: each example's
      gradient at its label is taken from the tape's model. Otherwise (and
      for NNX modules) it must have been made with ``fisher="empirical"``,
      which is checked. A tape function with a ``with_fisher(mode)`` method
      is switched to ``"empirical"`` by it.
    params: the parameters the curvature was fitted at.
    queries: one ``(x, y)`` batch of query examples.
    train: an iterable of ``(x, y)`` training batches, iterated once.
    damping: ``λ``, added to every eigenvalue of ``F``.
    loss: the ``kronjax.losses`` NLL ``tape_fn`` was made with (default:
      ``tape_fn.loss`` if it has one).
    query_block: queries scored at once (memory: ``query_block`` times a
      training batch times the layers' widths).

  Returns:
    A float array, one row per query, one column per training example in
    the order of ``train``.
  """
  if hasattr(tape_fn, "with_fisher"):  # the same tape function, empirical
    tape_fn = tape_fn.with_fisher("empirical")
  loss = getattr(tape_fn, "loss", None) if loss is None else loss
  if loss is None and getattr(tape_fn, "fisher", "empirical") != "empirical":
    raise ValueError(_NOT_EMPIRICAL.format(
        f'it was made with fisher="{tape_fn.fisher}"'))
  if not isinstance(query_block, int) or query_block < 1:
    raise ValueError(f"query_block must be a positive int: {query_block!r}.")
  xq, yq = queries
  q = batch_size(xq)
  block = min(query_block, q)
  precondition, score = _compiled(tape_fn, loss, curv.layers, block, q)
  m, mismatch = precondition(params, xq, yq, curv, damping)
  _check(mismatch)
  blocks = -(-q // block)
  m = {k: jnp.pad(v, [(0, blocks * block - q)] + [(0, 0)] * 2).reshape(
      (blocks, block) + v.shape[1:]) for k, v in m.items()}
  out = []
  for x, y in train:
    s, mismatch = score(params, x, y, m)
    _check(mismatch)
    out.append(s)
  if not out:
    raise ValueError("train is empty: influence_scores needs examples.")
  return jnp.concatenate(out, axis=1)
