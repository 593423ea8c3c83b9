"""One batch's curvature: per-layer tapes or blocks, with the batch's model.

The tape functions return their tapes as a :class:`Curvature`, a ``dict``
``{layer_path: tape}`` that also carries what the optimizers need to know
about the batch: the model on it (``params -> outputs``, for the adaptive
step's exact Fisher products and its loss at the moved params), its targets
and its loss value (a non-finite loss skips the step as non-finite gradients
do). ``kronjax.fisher_blocks`` keeps them on the blocks it returns. So
``tx.update(grads, state, params, curvature=tape)`` is the whole call, for
linen, NNX and ``kronjax.nn`` models alike.

The targets and the loss are pytree children; the model function is static
(it closes over the batch's traced inputs: use it in the trace that made it,
e.g. one ``jax.jit``ted train step).
"""

from __future__ import annotations

from typing import Any, Callable

import jax


class Curvature(dict):
  """``{layer_path: LayerTape or Kron}`` of one batch, plus the batch's model.

  Attributes:
    model_fn: ``params -> outputs`` on this batch (the same dropout masks and
      batch statistics as the loss pass), or ``None``. Static.
    targets: the batch's targets, or ``None``.
    value: the batch's loss at the params it was taken at, or ``None``.
  """

  def __init__(self, layers: dict, model_fn: Callable[[Any], Any] | None = None,
               targets: Any = None, value: Any = None):
    super().__init__(layers)
    self.model_fn, self.targets, self.value = model_fn, targets, value

  def replace_layers(self, layers: dict) -> Curvature:
    """The same batch with other per-layer entries (e.g. its blocks)."""
    return Curvature(layers, self.model_fn, self.targets, self.value)

  def __repr__(self) -> str:
    return f"Curvature({dict.__repr__(self)})"


def _flatten(c: Curvature):
  keys = tuple(c)
  children = (tuple(c[k] for k in keys), c.targets, c.value)
  return children, (keys, c.model_fn)


def _unflatten(aux, children) -> Curvature:
  keys, model_fn = aux
  values, targets, value = children
  return Curvature(dict(zip(keys, values)), model_fn, targets, value)


jax.tree_util.register_pytree_node(Curvature, _flatten, _unflatten)


def model_and_targets(curvature: Any, output_fn: Any, targets: Any):
  """``output_fn`` and ``targets``, from the curvature where not given."""
  if isinstance(curvature, Curvature):
    output_fn = curvature.model_fn if output_fn is None else output_fn
    targets = curvature.targets if targets is None else targets
  return output_fn, targets
