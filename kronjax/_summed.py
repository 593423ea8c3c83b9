"""Statistics of layers the tape cannot see directly, and tied embeddings.

A layer called inside a JAX transformation nested in the model (``nn.scan``,
``nn.remat``, ``nnx.scan``, ``jax.checkpoint``, ``jax.vmap``...) has inputs
that never leave the transformation. :func:`summed` wraps its output in a
``custom_vjp`` whose backward pass sums the layer's statistics and emits them
as the cotangent of a zero *probe* that the adapter placed beside the layer's
parameters, so JAX's own transpose rules carry them out: stacked along the
stack's axis for a stack of layers, summed over a ``vmap``. Only the ``d²``
sums are kept, never the layer's inputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kronjax._params import float_dtype, layer_key

PROBE = "__kronjax_probe__"  # the probe's name beside the layer's params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SummedTape:
  """The tape of a layer inside a nested transformation: summed statistics.

  Attributes:
    aa: ``(*stack, d_A, d_A)``: ``Σ ā āᵀ`` over the layer's input rows.
    gg: ``(S, *stack, d_G, d_G)``: ``Σ g gᵀ`` over the rows of its output
      gradients, scaled as ``LayerTape.output_grads``.
    count: ``(*stack,)``: the number of input rows summed.
    num_examples: ``N``. Static.
  """

  aa: jax.Array
  gg: jax.Array
  count: jax.Array
  num_examples: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TiedTape:
  """An embedding whose matrix is also a dense head (``embed.attend(h)``).

  Attributes:
    lookup: the lookups' tape (``kind="embed"``), or ``None`` if the matrix
      is only used as a head.
    head: the head's tape, a dense layer whose kernel is ``embedding.T``.
  """

  lookup: "kronjax.tape.LayerTape | None"  # noqa: F821
  head: "kronjax.tape.LayerTape"  # noqa: F821


@jax.custom_vjp
def summed(out: jax.Array, a: jax.Array, probe: dict) -> jax.Array:
  """``out``; its backward pass sums ``a``'s rows and ``out``'s gradients."""
  del a, probe
  return out


def _summed_fwd(out, a, probe):
  return out, (a, probe)


def _summed_bwd(res, ct):
  a, probe = res
  dtype = probe["aa"].dtype
  rows = a.reshape(-1, a.shape[-1]).astype(dtype)
  g = ct.reshape(-1, probe["gg"].shape[-1]).astype(dtype)
  hi = jax.lax.Precision.HIGHEST
  stats = {"aa": jnp.matmul(rows.T, rows, precision=hi),
           "gg": jnp.matmul(g.T, g, precision=hi),
           # Computed from the rows (ones_like would be a constant there) so
           # that a vmap over examples sums it, as it sums the products.
           "count": jnp.sum(rows[:, 0] * 0 + 1)}
  return ct, jnp.zeros_like(a), stats


summed.defvjp(_summed_fwd, _summed_bwd)


def probes(metas, specs, params) -> dict[tuple, dict[str, jax.Array]]:
  """Zero probes of the layers in nested transformations, stacked as they."""
  dtype = float_dtype(params)
  probes = {}
  for path, m in metas.items():
    if m.summed:
      stack = specs[layer_key(path)].stack_shape
      probes[path] = {"aa": jnp.zeros(stack + (m.d_a,) * 2, dtype),
                      "gg": jnp.zeros(stack + (m.d_out,) * 2, dtype),
                      "count": jnp.zeros(stack, dtype)}
  return probes
