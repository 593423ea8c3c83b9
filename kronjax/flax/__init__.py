"""Flax adapters: loss, gradients and K-FAC tapes without changing the model."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import numpy as np

from kronjax.flax._linen import TAPPED_CLASSES, linen_run
from kronjax.tape import (LayerPath, Tape, check_fisher_mode,
                          value_grad_and_tape_from_run)

__all__ = ["value_grad_and_tape", "TAPPED_CLASSES"]


def value_grad_and_tape(
    model: nn.Module,
    loss,
    fisher: str = "mc",
    samples: int = 1,
    layers: Iterable[LayerPath | str] | None = None,
    method: Callable[..., Any] | str | None = None,
) -> Callable[..., tuple[jax.Array, Any, Tape]]:
  """Builds ``fn(params, x, y, rng=None, **apply_kwargs) -> (loss, grads, tape)``.

  One forward pass of ``model.apply({"params": params}, x)`` is linearised; the
  gradient of ``loss`` and the Fisher's output gradients are pulled back through
  it. Every ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` and ``nn.Embed`` in
  the module tree is tapped (nested or shared modules included; a shared
  layer's calls become extra weight-sharing positions).

  Args:
    model: a Flax linen module returning outputs shaped ``(N, ..., C)``.
    loss: a ``kronjax.losses`` negative log-likelihood, e.g.
      ``kronjax.losses.softmax_cross_entropy``.
    fisher: ``"mc"`` (targets sampled from the model, ``samples`` draws),
      ``"empirical"`` (the given labels) or ``"exact"`` (every output direction).
    samples: Monte-Carlo draws for ``fisher="mc"``.
    layers: which layers to tap, as paths (``("Encoder_0", "Dense_1")``) or
      ``"/"``-joined strings; ``None`` taps every supported layer.
    method: passed to ``model.apply``.

  Returns:
    ``fn(params, x, y, rng=None, **apply_kwargs)`` returning the mean loss, its
    gradients w.r.t. ``params`` and ``{layer_path: LayerTape}``, ready for
    ``kronjax.fisher_blocks``. ``apply_kwargs`` go to ``model.apply``.

  Example::

    step = kronjax.flax.value_grad_and_tape(model, kronjax.losses.squared_error)
    loss, grads, tape = jax.jit(step)(params, x, y, jax.random.key(0))
    blocks = kronjax.fisher_blocks(tape)
  """
  check_fisher_mode(fisher, samples)
  if not isinstance(model, nn.Module):
    raise TypeError(
        f"value_grad_and_tape takes a Flax linen nn.Module; got "
        f"{type(model).__name__}.")
  wanted = None if layers is None else frozenset(
      tuple(p.split("/")) if isinstance(p, str) else tuple(p) for p in layers)

  def fn(params, x, y, rng=None, **apply_kwargs):
    _check_batch(x, y)
    run = linen_run(model, x, wanted, method=method, **apply_kwargs)
    return value_grad_and_tape_from_run(run, loss, fisher, samples, params, y,
                                        rng)

  return fn


def _check_batch(x, y) -> None:
  xs, ys = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
  if xs and ys and np.shape(xs[0])[:1] != np.shape(ys[0])[:1]:
    raise ValueError(
        f"Batch sizes disagree: x has shape {np.shape(xs[0])} and y has shape "
        f"{np.shape(ys[0])}; their leading (batch) axes must match.")
