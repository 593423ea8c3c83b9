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
from typing import Literal

import jax

LayerPath = tuple[str, ...]


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
