"""Kronecker-factored Fisher blocks from per-layer tapes.

For a layer with combined weight matrix ``W̄`` of shape ``(d_in [+1], d_out)``
(see ``../shared/DESIGN.md``), the K-FAC block of the row-major ``vec(W̄)`` is
``A ⊗ G`` with

.. math::

  A = \\frac{1}{N T} \\sum_{n,t} \\bar a_{nt} \\bar a_{nt}^\\top, \\qquad
  G = \\sum_s \\frac{1}{N} \\sum_{n,t} g^s_{nt} {g^s_{nt}}^\\top

(K-FAC-expand), or, with K-FAC-reduce,

.. math::

  A = \\frac{1}{N} \\sum_n \\hat a_n \\hat a_n^\\top, \\quad
  \\hat a_n = \\frac{1}{T}\\sum_t \\bar a_{nt}, \\qquad
  G = \\sum_s \\frac{1}{N} \\sum_n \\hat g^s_n {\\hat g^s_n}^\\top, \\quad
  \\hat g^s_n = \\sum_t g^s_{nt}.

``ā`` is the input with a constant 1 appended when the layer has a bias. An
embedding's input factor is the diagonal of token frequencies (the one-hot
outer products are diagonal), stored as a vector; embeddings always use the
expand rule, since reduce would make their input factor dense.

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature. Grosse & Martens 2016, A Kronecker-factored
  approximate Fisher matrix for convolution layers. Eschenhagen et al. 2023,
  Kronecker-factored approximate curvature for modern neural network
  architectures.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from kronjax._paths import tree_paths
from kronjax.linalg import Kron
from kronjax.tape import LayerPath, LayerTape, Tape

WeightSharing = Literal["expand", "reduce"]

# Parameter names that a tapped layer owns.
LAYER_PARAMS = ("kernel", "bias", "embedding")


def fisher_blocks(
    tape: Tape, weight_sharing: WeightSharing = "expand"
) -> dict[LayerPath, Kron]:
  """Turns tapes into K-FAC blocks, one ``Kron(A, G)`` per layer.

  Args:
    tape: ``{layer_path: LayerTape}``, e.g. from
      ``kronjax.flax.value_grad_and_tape``.
    weight_sharing: ``"expand"`` (default) or ``"reduce"``: how positions that
      share the weights (convolution positions, tokens, repeated calls of a
      shared layer) enter the factors (Eschenhagen et al. 2023).

  Returns:
    ``{layer_path: Kron(A, G)}`` with ``A`` of shape ``(d_in [+1],) * 2`` (a
    vector, the diagonal, for embeddings) and ``G`` of shape ``(d_out, d_out)``.
  """
  if weight_sharing not in ("expand", "reduce"):
    raise ValueError(
        f'weight_sharing={weight_sharing!r}; use "expand" or "reduce".')
  return {path: layer_block(t, weight_sharing, path)
          for path, t in tape.items()}


def layer_block(
    t: LayerTape, weight_sharing: WeightSharing = "expand",
    path: LayerPath = ()
) -> Kron:
  """The ``Kron(A, G)`` block of one layer's tape (see the module docstring)."""
  g = t.output_grads
  if g.ndim != 4:
    raise ValueError(f"Layer {path}: output_grads must be (S, N, T, d_out), "
                     f"got shape {g.shape}.")
  _, n, positions, _ = g.shape
  if t.kind == "embed":
    ids = t.inputs  # any shape: each id adds one (no reshape of a split axis)
    counts = jnp.zeros((t.num_embeddings,), g.dtype).at[ids].add(
        1.0, out_sharding=_replicated(ids))
    return Kron(counts / ids.size, _expand_g(g, n))
  a = t.inputs
  if a.ndim != 3 or a.shape[:2] != (n, positions):
    raise ValueError(
        f"Layer {path}: inputs of shape {a.shape} do not match output_grads of "
        f"shape {g.shape}; expected (N, T, d_in) = ({n}, {positions}, d_in).")
  if t.has_bias:
    a = jnp.concatenate([a, jnp.ones_like(a[..., :1])], axis=-1)
  if weight_sharing == "reduce":
    a_hat = a.mean(axis=1)
    g_hat = g.sum(axis=2)
    return Kron(_gram(a_hat) / n, _gram(g_hat) / n)
  return Kron(_gram(a) / (n * positions), _expand_g(g, n))


def _expand_g(g: jax.Array, n: int) -> jax.Array:
  return _gram(g) / n


def _gram(x: jax.Array) -> jax.Array:
  """``Σ x xᵀ`` over all leading axes of ``x`` (``xᵀx`` of its rows).

  Under ``jax.sharding.AxisType.Explicit`` axes JAX can neither merge the
  split batch axis with others nor guess a contraction's output sharding
  (replicated: a factor is a sum over the whole batch, an all-reduce): one
  einsum over all leading axes then. Elsewhere rows and a matmul, which XLA's
  CPU backend runs twice as fast (7 ms against 15 ms at 25 088 × 145).
  """
  out = _replicated(x)
  if out is not None:
    return jnp.einsum("...i,...j->ij", x, x, out_sharding=out)
  rows = x.reshape(-1, x.shape[-1])
  return rows.T @ rows


def _replicated(x: jax.Array) -> jax.sharding.NamedSharding | None:
  """Replicated over ``x``'s mesh if its axes are explicit, else ``None``."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if getattr(mesh, "explicit_axes", ()):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return None


def uncovered_parameters(params: Any, layers) -> list[tuple[str, ...]]:
  """Lists the parameters that no tapped layer covers.

  K-FAC preconditions only the layers it has blocks for; the rest (normalisation
  scales, untapped layers, ...) need another treatment, e.g. a first-order
  optimizer through ``optax.partition``.

  Args:
    params: the parameter tree: nested dicts (linen), an ``nnx.State`` or any
      pytree (see ``kronjax._paths``).
    layers: the tapped layer paths: a tape, a dict of blocks, or any iterable of
      paths.

  Returns:
    The paths (tuples of keys; list indices as ints) of the uncovered
    parameter arrays, in tree order.
  """
  covered = set(layers)
  return [path for path, _ in tree_paths(params)
          if not (path[:-1] in covered and path[-1] in LAYER_PARAMS)]
