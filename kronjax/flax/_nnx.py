"""Tapping Flax NNX models by patching the layers' ``__call__`` while tracing.

NNX has no method interceptor (``Module.sow``/``perturb`` with ``nnx.capture``
need the model's code to call them). So while a tapped forward pass runs,
:func:`tapped_calls` replaces ``__call__`` of ``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Conv`` and ``nnx.Embed`` with a wrapper, and puts
every original back when the block exits, also when the model raises.

The wrapper only taps inside a tapped run of the current thread and context
(a ``ContextVar``); anywhere else it calls the original. The patch is installed
once however many runs are active (a count under a lock), so concurrent or
nested runs cannot leave a wrapper behind by saving another run's wrapper as
"the original".
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from typing import Any, Callable, Collection, Iterator

import jax.numpy as jnp
from flax import nnx

from kronjax._layers import (Recorder, dense_general_inputs, recording_conv,
                             swapped_attrs)
from kronjax.tape import LayerPath

TAPPED_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed)
_KINDS = ", ".join("nnx." + c.__name__ for c in TAPPED_CLASSES)

# (recorder, {id(module): path}) of the tapped run in this context, if any.
_ACTIVE: contextvars.ContextVar[tuple[Recorder, dict[int, LayerPath]] | None] = (
    contextvars.ContextVar("kronjax_nnx_tap", default=None))
_LOCK = threading.Lock()
_installed = {"count": 0, "originals": {}}


@contextlib.contextmanager
def tapped_calls(rec: Recorder, paths: dict[int, LayerPath]) -> Iterator[None]:
  """Taps the NNX layers of this context into ``rec`` inside the block.

  Args:
    rec: the recorder of this run.
    paths: ``{id(module): path}`` for the modules of the model being run.
  """
  token = _ACTIVE.set((rec, paths))
  try:
    _install()
    try:
      yield
    finally:
      _uninstall()
  finally:
    _ACTIVE.reset(token)


def _install() -> None:
  with _LOCK:
    if _installed["count"] == 0:
      originals = _installed["originals"]
      try:
        for cls in TAPPED_CLASSES:
          originals[cls] = cls.__dict__["__call__"]
          cls.__call__ = _tapping_call(originals[cls])
      except BaseException:
        _restore(originals)
        raise
    _installed["count"] += 1


def _uninstall() -> None:
  with _LOCK:
    _installed["count"] -= 1
    if _installed["count"] == 0:
      _restore(_installed["originals"])


def _restore(originals: dict) -> None:
  for cls, original in list(originals.items()):
    cls.__call__ = original
    del originals[cls]


def _tapping_call(original: Callable[..., Any]) -> Callable[..., Any]:

  @functools.wraps(original)
  def __call__(module, *args, **kwargs):
    active = _ACTIVE.get()
    if active is None:
      return original(module, *args, **kwargs)
    rec, paths = active
    path = paths.get(id(module))
    if path is None and rec.layers is None:
      # NNX transforms (nnx.scan, nnx.vmap, nnx.remat) run copies of the
      # modules, which have no path here: refuse rather than skip silently.
      rec.check_trace(f"An nnx.{type(module).__name__} layer")
    if path is None or not rec.wants(path, "nnx." + type(module).__name__):
      return original(module, *args, **kwargs)
    return _tap(rec, path, module, original, args, kwargs)

  return __call__


def _tap(rec: Recorder, path: LayerPath, module, original, args, kwargs):
  """Calls one tapped layer and records it."""
  x = args[0] if args else kwargs["inputs"]
  call = lambda: original(module, *args, **kwargs)
  out_axes = 1
  if isinstance(module, nnx.Conv):
    if module.feature_group_count != 1:
      raise ValueError(
          f"Layer {path}: grouped convolutions (feature_group_count="
          f"{module.feature_group_count}) are not supported; leave the layer "
          "out with layers=[...].")
    captured = []
    with swapped_attrs(module, conv_general_dilated=recording_conv(
        module.conv_general_dilated, captured)):
      out = call()
    inputs = captured[0]
  elif isinstance(module, nnx.Embed):
    out, inputs = call(), jnp.asarray(x)
  elif isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      raise ValueError(
          f"Layer {path}: nnx.LinearGeneral with batch_axis="
          f"{dict(module.batch_axis)} has a separate kernel per batch index, "
          "which K-FAC does not cover; leave it out with layers=[...].")
    out = call()
    inputs = dense_general_inputs(x, module.axis, path)
    out_axes = len(module.out_features)
  else:
    out, inputs = call(), x
  embed = isinstance(module, nnx.Embed)
  return rec.record(
      path, inputs, out, kind="embed" if embed else "dense",
      has_bias=getattr(module, "bias", None) is not None and not embed,
      num_embeddings=module.num_embeddings if embed else 0, out_axes=out_axes)


def nnx_run(graphdef, rest, x, layers: Collection[LayerPath] | None,
            **call_kwargs):
  """The tapped forward pass ``run(params, perturbations)`` of an NNX model.

  ``params`` is the model's ``nnx.Param`` state; ``graphdef`` and ``rest`` (the
  other state) come from ``nnx.split(model, nnx.Param, ...)``. Each run merges a
  fresh copy of the model and returns, as its fourth item, that copy's
  non-parameter state after the pass (batch statistics, RNG counts), for the
  caller to write back.
  """

  # As arrays, so that each run makes its own Variables: NNX refuses to
  # mutate (batch statistics, RNG counts) Variables made in another trace.
  rest = nnx.as_pure(rest)

  def run(params, perturbations):
    model = nnx.merge(graphdef, params, rest)
    # A module shared between parents is visited once, at the path under
    # which nnx.split stores its parameters.
    modules = list(nnx.iter_modules(model))
    paths = {id(m): tuple(p) for p, m in modules}
    rec = Recorder(perturbations, layers)
    for p, m in modules:  # named in errors about layers=
      if not isinstance(m, TAPPED_CLASSES):
        rec.seen[tuple(p)] = "nnx." + type(m).__name__
    with tapped_calls(rec, paths):
      out = model(x, **call_kwargs)
    rec.check_layers("its layer paths", _KINDS)
    return out, rec.inputs, rec.metas, nnx.split(model, nnx.Param, ...)[2]

  return run


def split_params(model: nnx.Module):
  """``(graphdef, params, rest)``: the ``nnx.Param`` state and everything else."""
  if not isinstance(model, nnx.Module):
    raise TypeError(
        "The function from kronjax.flax.value_grad_and_tape(nnx_model, ...) "
        f"takes the NNX module as its first argument; got "
        f"{type(model).__name__}.")
  return nnx.split(model, nnx.Param, ...)

