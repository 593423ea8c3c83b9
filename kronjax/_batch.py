"""One batch's curvature: per-layer tapes or blocks, with the batch's model.

The tape functions return their tapes as a :class:`Tape`, a ``dict``
``{layer_path: tape}`` that also carries what the optimizers need to know
about the batch: the model on it (``params -> outputs``, for the adaptive
step's exact Fisher products and its loss at the moved params), its targets
and its loss value (a non-finite loss skips the step as non-finite gradients
do). So ``tx.update(grads, state, params, curvature=tape)`` is the whole
call, for linen, NNX and ``kronjax.nn`` models alike. (``fisher_blocks``
returns plain dicts: blocks of batches of any size can be averaged.)

The model is ``(build, inputs)``: ``build``, made once per tape function, is
static; the batch's arrays in ``inputs`` (``x``, keyword arguments, an NNX
model's other state) are pytree leaves with the targets and the loss. So a
``Tape`` crosses ``jit`` and ``jax.tree.map`` (a running mean of blocks)
like any pytree, and a jitted update never reuses another batch's inputs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


class Tape(dict):
  """``{layer_path: LayerTape or Kron}`` of one batch, plus the batch's model.

  Attributes:
    model: ``(build, inputs)`` with ``build(inputs)`` the tapped forward pass
      ``run(params, perturbations, probes)`` of the tape functions, or
      ``None``.
    targets: the batch's targets, or ``None``.
    value: the batch's loss at the params it was taken at, or ``None``.
  """

  def __init__(self, layers: dict, model: tuple[Callable, Any] | None = None,
               targets: Any = None, value: Any = None):
    super().__init__(layers)
    self.model, self.targets, self.value = model, targets, value

  @property
  def model_fn(self) -> Callable[[Any], Any] | None:
    """``params -> outputs`` on this batch (dropout masks and batch
    statistics as in the loss pass), or ``None``."""
    if self.model is None:
      return None
    build, inputs = self.model
    return lambda params: build(inputs)(params, None, None)[0]

  def __repr__(self) -> str:
    return f"Tape({dict.__repr__(self)})"


class Build:
  """``build(inputs) = fn(*parts, inputs)``, static and equal by its parts.

  Equal when made from the same ``fn`` and equal parts (the model, the tapped
  layers): a tape function made afresh in every trace gives equal ones.
  """

  def __init__(self, fn: Callable, *parts: Any):
    self.fn, self.parts = fn, parts

  def __call__(self, inputs: Any):
    return self.fn(*self.parts, inputs)

  def __eq__(self, other: Any) -> bool:
    return (type(other) is Build and self.fn is other.fn
            and len(self.parts) == len(other.parts)
            and all(_same(a, b) for a, b in zip(self.parts, other.parts)))

  def __hash__(self) -> int:
    return hash(self.fn)


def _same(a: Any, b: Any) -> bool:
  if a is b:
    return True
  try:
    return bool(a == b)
  except Exception:  # e.g. arrays: compare by identity only
    return False


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _flatten(c: Tape):
  keys = tuple(c)
  build, inputs = c.model if c.model is not None else (None, None)
  leaves, treedef = jax.tree.flatten(inputs)
  arrays = [x if _is_array(x) else None for x in leaves]
  static = tuple(None if _is_array(x) else x for x in leaves)
  children = (tuple(c[k] for k in keys), c.targets, c.value, arrays)
  return children, (keys, build, treedef, static)


def _unflatten(aux, children) -> Tape:
  keys, build, treedef, static = aux
  values, targets, value, arrays = children
  model = None
  if build is not None:
    leaves = [a if s is None else s for a, s in zip(arrays, static)]
    model = (build, jax.tree.unflatten(treedef, leaves))
  return Tape(dict(zip(keys, values)), model, targets, value)


jax.tree_util.register_pytree_node(Tape, _flatten, _unflatten)


def loss_value(curvature: Any) -> Any:
  """The batch's loss that ``curvature`` carries, or ``None``."""
  return getattr(curvature, "value", None)


def model_and_targets(curvature: Any, output_fn: Any, targets: Any):
  """``output_fn`` and ``targets``, from the curvature where not given."""
  if isinstance(curvature, Tape):
    output_fn = curvature.model_fn if output_fn is None else output_fn
    targets = curvature.targets if targets is None else targets
  return output_fn, targets
