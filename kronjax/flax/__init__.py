"""Flax adapters: loss, gradients and K-FAC tapes without changing the model.

Linen models are tapped with a method interceptor (``_linen.py``), NNX models by
patching their layers' ``__call__`` during the tapped pass (``_nnx.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from kronjax._layers import wanted_layers
from kronjax.flax._linen import TAPPED_CLASSES, linen_run
from kronjax.flax._nnx import TAPPED_CLASSES as NNX_TAPPED_CLASSES
from kronjax.flax._nnx import nnx_run, split_params
from kronjax.tape import (LayerPath, Tape, check_fisher_mode,
                          value_grad_and_tape_from_run)

__all__ = ["value_grad_and_tape", "TAPPED_CLASSES", "NNX_TAPPED_CLASSES"]


def value_grad_and_tape(
    model: nn.Module | nnx.Module,
    loss,
    fisher: str = "mc",
    samples: int = 1,
    layers: Iterable[LayerPath | str] | None = None,
    method: Callable[..., Any] | str | None = None,
) -> Callable[..., tuple[jax.Array, Any, Tape]]:
  """Builds ``fn(params_or_model, x, y, rng=None, **kwargs) -> (loss, grads, tape)``.

  One forward pass of the model is linearised; the gradient of ``loss`` and the
  Fisher's output gradients are pulled back through it. Every tapped layer in
  the model (nested or shared modules included; a shared layer's calls become
  extra weight-sharing positions) gets a tape:

  * linen: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed``;
  * NNX: ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Embed``.

  Layers run inside a JAX transformation nested in the model (``nn.scan``,
  ``nn.vmap``, ``nn.remat``, ``nnx.scan``, ``jax.checkpoint``, ...) cannot be
  tapped, since their inputs never leave that transformation: the call raises
  a ``ValueError`` naming the layer. Unroll such layers for the tapped step, or
  leave them out with ``layers=`` (NNX transforms run copies of the modules,
  which have no path: with ``layers=`` given they are simply not tapped).

  Args:
    model: a linen ``nn.Module`` or an NNX ``nnx.Module``, returning outputs
      shaped ``(N, ..., C)``.
    loss: a ``kronjax.losses`` negative log-likelihood, e.g.
      ``kronjax.losses.softmax_cross_entropy``.
    fisher: ``"mc"`` (targets sampled from the model, ``samples`` draws),
      ``"empirical"`` (the given labels) or ``"exact"`` (every output direction).
    samples: Monte-Carlo draws for ``fisher="mc"``.
    layers: which layers to tap, as paths (``("Encoder_0", "Dense_1")``, or
      ``("layers", 0)`` for NNX, whose list indices are ints) or ``"/"``-joined
      strings of names; ``None`` taps every supported layer.
    method: linen only: passed to ``model.apply``.

  Returns:
    For linen, ``fn(params, x, y, rng=None, **apply_kwargs)`` with
    ``params = variables["params"]``; ``apply_kwargs`` go to ``model.apply``.
    For NNX, ``fn(model, x, y, rng=None, **call_kwargs)`` taking the module
    itself (it is not changed); ``call_kwargs`` go to ``model(x, ...)``, and
    ``grads`` is an ``nnx.State`` of the ``nnx.Param``s, as from ``nnx.grad``;
    the model's other state (batch statistics, RNG counts) is updated in place
    as ``nnx.value_and_grad`` would (use ``nnx.jit``, or split and merge
    around ``jax.jit``, to keep the update).
    Either returns the mean loss, its gradients and ``{layer_path: LayerTape}``,
    ready for ``kronjax.fisher_blocks``. The keyword ``with_tape`` (default
    ``True``; a traced bool works, e.g. ``kronjax.curvature_due(opt_state)``)
    skips the Fisher's backward pass when false, leaving zero output
    gradients in the tapes: with ``factor_every=k`` the steps in between then
    cost a plain ``value_and_grad``. NNX layer paths are the modules'
    paths in the state, e.g. ``("layers", 0)`` for
    ``state["layers"][0]["kernel"]``.

  Example::

    step = kronjax.flax.value_grad_and_tape(model, kronjax.losses.squared_error)
    loss, grads, tape = jax.jit(step)(params, x, y, jax.random.key(0))
    blocks = kronjax.fisher_blocks(tape)
  """
  check_fisher_mode(fisher, samples)
  wanted = wanted_layers(layers)
  if isinstance(model, nnx.Module):
    if method is not None:
      raise ValueError(
          "method= is for linen models; for an NNX model call the method in "
          "a small nnx.Module wrapper, or pass keyword arguments to fn.")

    def nnx_fn(module, x, y, rng=None, *, with_tape=True, **call_kwargs):
      _check_batch(x, y)
      graphdef, params, rest = split_params(module)
      run = nnx_run(graphdef, rest, x, wanted, **call_kwargs)
      value, grads, tape, new_rest = value_grad_and_tape_from_run(
          run, loss, fisher, samples, params, y, rng, return_state=True,
          with_tape=with_tape)
      # Like nnx.value_and_grad: batch statistics and RNG counts advance.
      nnx.update(module, new_rest)
      return value, grads, tape

    return nnx_fn
  if not isinstance(model, nn.Module):
    raise TypeError(
        "value_grad_and_tape takes a Flax linen nn.Module or an NNX "
        f"nnx.Module; got {type(model).__name__}. For a plain apply(params, x) "
        "function, use kronjax.nn.value_grad_and_tape with kronjax.nn layers.")

  def fn(params, x, y, rng=None, *, with_tape=True, **apply_kwargs):
    _check_batch(x, y)
    run = linen_run(model, x, wanted, method=method, **apply_kwargs)
    return value_grad_and_tape_from_run(run, loss, fisher, samples, params, y,
                                        rng, with_tape=with_tape)

  return fn


def _check_batch(x, y) -> None:
  xs, ys = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
  if xs and ys and np.shape(xs[0])[:1] != np.shape(ys[0])[:1]:
    raise ValueError(
        f"Batch sizes disagree: x has shape {np.shape(xs[0])} and y has shape "
        f"{np.shape(ys[0])}; their leading (batch) axes must match.")
