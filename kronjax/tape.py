"""Per-layer tapes: what K-FAC needs to know about one layer on one batch.

A tape holds, for one tapped layer, its inputs and the gradients of the
per-example negative log-likelihood at its outputs. Adapters (``kronjax.flax``,
``kronjax.nn``) fill tapes; :func:`kronjax.fisher_blocks` turns them into
Kronecker factors. Nothing here knows about Flax.

Shapes (``N`` examples, ``T`` weight-sharing positions, ``S`` Fisher samples):

* ``inputs``: ``(N, T, d_in)`` for dense-like layers (a convolution's input is
  stored as its patches, ordered ``(kh, kw, c_in)``, so a convolution *is* a dense
  layer with ``T`` output positions); ``(N, T)`` integer ids for embeddings.
* ``output_grads``: ``(S, N, T, d_out)``, already scaled so that the output factor
  is ``G = sum_s mean_n sum_t g g^T`` (K-FAC-expand): for ``fisher="mc"`` each
  draw carries ``1/sqrt(S)``; for ``"exact"`` the ``S`` rows are the columns of a
  square root of the output Fisher.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

LayerPath = tuple[str | int, ...]  # module names; list indices (NNX, pure JAX) are ints


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerTape:
  """Inputs and output gradients of one layer on one batch.

  Attributes:
    inputs: ``(N, T, d_in)`` float inputs (patches for convolutions), or
      ``(N, T)`` integer ids for an embedding.
    output_grads: ``(S, N, T, d_out)`` per-example output gradients, scaled as
      described in the module docstring.
    kind: ``"dense"`` (dense, dense-general and convolution layers) or
      ``"embed"``. Static.
    has_bias: whether the layer has a bias; its input then gets a constant 1
      appended (last). Static.
    num_embeddings: vocabulary size of an embedding (0 otherwise). Static.
  """

  inputs: jax.Array
  output_grads: jax.Array
  kind: Literal["dense", "embed"] = dataclasses.field(
      default="dense", metadata=dict(static=True))
  has_bias: bool = dataclasses.field(default=False, metadata=dict(static=True))
  num_embeddings: int = dataclasses.field(
      default=0, metadata=dict(static=True))


Tape = dict[LayerPath, LayerTape]


@dataclasses.dataclass(frozen=True)
class LayerMeta:
  """What an adapter learns about a tapped layer while tracing (static).

  Attributes:
    kind: ``"dense"`` or ``"embed"``.
    has_bias: whether the layer adds a bias.
    num_embeddings: vocabulary size of an embedding, else 0.
    d_out: the number of outputs (columns of ``W̄``).
    output_shapes: one ``jax.ShapeDtypeStruct`` per call of the layer in the
      forward pass (a shared layer is called more than once).
  """

  kind: Literal["dense", "embed"]
  has_bias: bool
  num_embeddings: int
  d_out: int
  output_shapes: tuple[jax.ShapeDtypeStruct, ...]


FISHER_MODES = ("mc", "empirical", "exact")

# A tapped forward pass. ``run(params, perturbations)`` computes the model's
# outputs; for every tapped layer it adds ``perturbations[path][call]`` (zeros)
# to the layer's output and returns the layer's inputs in tape layout, plus the
# static metadata it saw. With ``perturbations=None`` it adds nothing (used once,
# abstractly, to learn the output shapes). A run may return a fourth item, the
# model's non-parameter state after the pass (NNX batch statistics, RNG counts),
# which ``value_grad_and_tape_from_run(..., return_state=True)`` hands back.
Run = Callable[[Any, "dict[LayerPath, list[jax.Array]] | None"],
               tuple[jax.Array, "dict[LayerPath, list[jax.Array]]",
                     "dict[LayerPath, LayerMeta]"]]


def check_fisher_mode(fisher: str, samples: int) -> None:
  """Raises a ``ValueError`` for an unknown Fisher mode or sample count."""
  if fisher not in FISHER_MODES:
    raise ValueError(
        f"fisher={fisher!r} is not a Fisher mode; use one of {FISHER_MODES}: "
        '"mc" samples targets from the model, "empirical" uses the given '
        'labels, "exact" sums over all output directions.')
  if not isinstance(samples, int) or samples < 1:
    raise ValueError(f"samples must be a positive int, got {samples!r}.")


def value_grad_and_tape_from_run(
    run: Run, loss, fisher: str, samples: int, params, y, rng,
    return_state: bool = False, with_tape: bool | jax.Array = True,
) -> tuple[jax.Array, Any, Tape] | tuple[jax.Array, Any, Tape, Any]:
  """Loss, gradients and tapes from one forward pass and two backward passes.

  The forward pass is linearised once (``jax.vjp``); the loss gradient and the
  Fisher's output gradients are both pulled back through it.

  Args:
    run: the tapped forward pass (see ``Run``).
    loss: a ``kronjax.losses`` negative log-likelihood.
    fisher: ``"mc"``, ``"empirical"`` or ``"exact"``.
    samples: number of Monte-Carlo target draws for ``"mc"``.
    params: the parameters that ``run`` differentiates.
    y: the batch's targets, leading axis the batch.
    rng: a PRNG key (required for ``"mc"``).
    return_state: also return the fourth item of ``run``'s result from the
      linearised pass.
    with_tape: a bool or a traced boolean scalar; when false, the Fisher's
      backward pass is skipped (under ``lax.cond``) and the tapes' output
      gradients are zeros: for steps whose curvature the optimizer ignores
      (see ``kronjax.curvature_due``), which then cost a plain
      ``value_and_grad``.

  Returns:
    ``(loss_value, grads, tape)``, plus the run's state if ``return_state``.
  """
  metas: dict[LayerPath, LayerMeta] = {}

  def discover(p):
    out, _, seen = run(p, None)[:3]
    metas.update(seen)
    return out

  out_shape = jax.eval_shape(discover, params)
  if not hasattr(out_shape, "shape") or len(out_shape.shape) < 2:
    raise ValueError(
        "The model must return one array of outputs shaped (N, ..., C); got "
        f"{jax.tree_util.tree_map(lambda s: s.shape, out_shape)}.")
  n = out_shape.shape[0]
  y_leaves = jax.tree_util.tree_leaves(y)
  if y_leaves and jnp.shape(y_leaves[0])[:1] != (n,):
    raise ValueError(
        f"Batch sizes disagree: the model's outputs have {n} examples "
        f"(shape {out_shape.shape}) but y has shape {jnp.shape(y_leaves[0])}.")
  _check_labels(y, out_shape.shape, getattr(loss, "ignore_index", None))
  if fisher == "mc" and rng is None:
    raise ValueError('fisher="mc" samples targets: pass rng=jax.random.key(..).')

  perts = {path: [jnp.zeros(s.shape, s.dtype) for s in m.output_shapes]
           for path, m in metas.items()}
  def forward(p, e):
    result = run(p, e)
    return result[0], (result[1], result[3] if return_state else None)

  out, pullback, (inputs, state) = jax.vjp(forward, params, perts,
                                           has_aux=True)

  num_terms = loss.num_terms(y)
  per_term_grad = loss.output_grad(out, y)
  loss_value = loss(out, y)
  grads, out_grads = pullback((per_term_grad / num_terms).astype(out.dtype))
  # Per-example gradients carry sqrt(N / M) so that G = sum_s mean_n g g^T is
  # the Fisher of the mean loss over M terms (M = N without extra dims).
  scale = jnp.sqrt(n / num_terms)

  def fisher_output_grads():
    if fisher == "empirical":
      # Reuse the loss pass: its output gradients are the per-term gradients
      # / M.
      return jax.tree_util.tree_map(
          lambda g: (g * (num_terms * scale))[None], out_grads)
    if fisher == "mc":
      draws = loss.sample_targets(rng, out, samples)
      cot = jax.vmap(lambda t: loss.output_grad(out, t))(draws)
      # Drawn targets are never the ignore value: mask the terms here.
      cot = cot * (loss.mask(y)[None, ..., None] * scale / jnp.sqrt(samples))
    else:
      cot = loss.fisher_sqrt(out, y) * scale
    return jax.vmap(lambda c: pullback(c.astype(out.dtype))[1])(cot)

  if with_tape is True:
    fisher_grads = fisher_output_grads()
  else:
    zeros = lambda: jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(fisher_output_grads))
    fisher_grads = jax.lax.cond(jnp.asarray(with_tape, bool),
                                fisher_output_grads, zeros)
  tape = {path: _layer_tape(metas[path], inputs[path], fisher_grads[path], n)
          for path in metas}
  if return_state:
    return loss_value, grads, tape, state
  return loss_value, grads, tape


def _check_labels(y, out_shape, ignore_index) -> None:
  """Integer labels outside [0, C) (concrete ones only: traced values can't be
  inspected) would silently give wrong gradients and Fisher blocks."""
  if (isinstance(y, jax.core.Tracer) or not hasattr(y, "dtype")
      or not jnp.issubdtype(y.dtype, jnp.integer)
      or jnp.ndim(y) != len(out_shape) - 1):
    return
  labels = np.asarray(y)
  bad = ((labels >= out_shape[-1]) | (labels < 0)) & (labels != ignore_index)
  if bad.any():
    raise ValueError(
        f"y holds labels {sorted(set(labels[bad].tolist()))[:5]} outside "
        f"[0, {out_shape[-1]}) for outputs of shape {tuple(out_shape)}.")


def _layer_tape(meta: LayerMeta, inputs, out_grads, n: int) -> LayerTape:
  """Stacks the calls of one layer along the weight-sharing axis."""
  if meta.kind == "embed":
    ins = jnp.concatenate([i.reshape(n, -1) for i in inputs], axis=1)
  else:
    ins = jnp.concatenate(
        [i.reshape(n, -1, i.shape[-1]) for i in inputs], axis=1)
  grads = jnp.concatenate(
      [g.reshape(g.shape[0], n, -1, meta.d_out) for g in out_grads], axis=2)
  return LayerTape(ins, grads, meta.kind, meta.has_bias, meta.num_embeddings)
