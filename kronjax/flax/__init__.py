"""Flax adapters: loss, gradients and K-FAC tapes without changing the model.

Linen models are tapped with a method interceptor (``nn.intercept_methods``),
NNX models by patching their layers' ``__call__`` while a tapped pass runs
(``_nnx.py``). Both hand each call of a tapped layer to one dispatch,
:func:`tap`, which records the layer's inputs in tape layout and adds the
layer's zero perturbation to its output.

A layer is tapped where the tapped class's own ``__call__`` runs: a subclass
that overrides ``__call__`` is tapped only through ``super().__call__``, so a
subclass that computes something else is never taken for the base layer.
Convolutions record the exact operands of their ``conv_general_dilated`` call
(after Flax's own padding for ``CIRCULAR``/``CAUSAL``/``REFLECT``), so their
patches are right for every padding, stride and dilation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kronjax import losses
from kronjax._batch import Build
from kronjax._params import ATTEND, layer_specs
from kronjax._summed import PROBE
from kronjax.flax import _nnx
from kronjax.tape import (LayerPath, Recorder, Tape, check_fisher_mode,
                          conv_patches, discover,
                          value_grad_and_tape_from_run, wanted_layers)

__all__ = ["value_grad_and_tape", "TAPPED_CLASSES", "NNX_TAPPED_CLASSES"]

# The tapped classes and the kind of tap each gets.
_LINEN_KINDS = {nn.Dense: "dense", nn.DenseGeneral: "general",
                nn.Conv: "conv", nn.Embed: "embed"}
_NNX_KINDS = dict(zip(_nnx.CLASSES, ("dense", "general", "conv", "embed")))
TAPPED_CLASSES = tuple(_LINEN_KINDS)
NNX_TAPPED_CLASSES = tuple(_NNX_KINDS)
# Linen wraps every method; the tap runs where a tapped class's own runs.
_LINEN_CALLS = {cls.__call__.__wrapped__: cls for cls in _LINEN_KINDS}
_LINEN_ATTEND = nn.Embed.attend.__wrapped__


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


@contextlib.contextmanager
def swapped_attrs(obj: Any, **attrs: Any) -> Iterator[None]:
  """Sets attributes of one module for the duration of a ``with`` block.

  Bypasses ``__setattr__`` (frozen linen dataclasses, NNX's trace checks): the
  module belongs to the model being traced and changes only for one call.
  """
  old = {name: obj.__dict__[name] for name in attrs if name in obj.__dict__}
  try:
    for name, value in attrs.items():
      object.__setattr__(obj, name, value)
    yield
  finally:
    for name in attrs:
      if name in old:
        object.__setattr__(obj, name, old[name])
      else:
        obj.__dict__.pop(name, None)


def _recording_conv(module, captured: list) -> dict[str, Any]:
  """Attributes that make a Conv append its patches to ``captured``."""
  factory = getattr(module, "conv_general_dilated_cls", None)  # linen only
  inner = factory() if factory is not None else (
      getattr(module, "conv_general_dilated", None)
      or jax.lax.conv_general_dilated)

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None, **kwargs):
    captured.append(conv_patches(lhs, rhs.shape, window_strides, padding,
                                 lhs_dilation, rhs_dilation,
                                 dimension_numbers))
    return inner(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                 rhs_dilation=rhs_dilation,
                 dimension_numbers=dimension_numbers, **kwargs)

  attrs = {"conv_general_dilated": conv}
  if hasattr(module, "conv_general_dilated_cls"):
    attrs["conv_general_dilated_cls"] = None
  return attrs


def _dense_general_inputs(x: jax.Array, axes: Iterable[int],
                          path: LayerPath) -> jax.Array:
  """The contracted axes moved last and flattened, in the kernel's order."""
  axes = tuple(a % x.ndim for a in axes)
  if 0 in axes:
    raise ValueError(
        f"Layer {path} contracts axis 0, the batch axis; K-FAC needs the "
        "examples on axis 0. Leave the layer out with layers=[...].")
  moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  return moved.reshape(moved.shape[:-len(axes)] + (-1,))


def tap(rec: Recorder, path: LayerPath, module, kind: str,
        call: Callable[[], jax.Array], x: jax.Array) -> jax.Array:
  """Calls one tapped layer, linen or NNX, and records it.

  Args:
    rec: the recorder of this tapped pass.
    path: the layer's path.
    module: the layer (one of ``TAPPED_CLASSES`` or ``NNX_TAPPED_CLASSES``).
    kind: ``"dense"``, ``"general"``, ``"conv"`` or ``"embed"``.
    call: runs the layer's own ``__call__`` on its arguments.
    x: the layer's input.
  """
  linen = isinstance(module, nn.Module)
  name = ("nn." if linen else "nnx.") + type(module).__name__
  out_axes, inputs = 1, x
  if kind == "attend":  # the embedding as a dense head: x @ embedding.T
    return rec.record(tuple(path) + (ATTEND,), jnp.asarray(x), call(),
                      kind="dense", has_bias=False)
  if kind == "conv":
    if module.feature_group_count != 1:
      raise ValueError(
          f"Layer {path}: grouped convolutions (feature_group_count="
          f"{module.feature_group_count}) are not supported; leave the layer "
          "out with layers=[...].")
    captured: list = []
    with swapped_attrs(module, **_recording_conv(module, captured)):
      out = call()
    inputs = captured[0]
  elif kind == "general":
    features = module.features if linen else module.out_features
    batch = _tuple(module.batch_dims) if linen else tuple(module.batch_axis)
    if batch:
      raise ValueError(
          f"Layer {path}: {name} with batch axes {batch} has a separate "
          "kernel per batch index, which K-FAC does not cover; leave it out "
          "with layers=[...].")
    out, out_axes = call(), len(_tuple(features))
    inputs = _dense_general_inputs(x, _tuple(module.axis), path)
  else:
    out = call()
  embed = kind == "embed"
  has_bias = not embed and (module.use_bias if linen
                            else getattr(module, "bias", None) is not None)
  name = "embedding" if embed else "kernel"
  if linen:
    kernel, probe = (module.get_variable("params", n) for n in (name, PROBE))
  else:
    kernel, probe = getattr(module, name)[...], _nnx.probe(module)
  return rec.record(
      path, jnp.asarray(inputs), out, kind="embed" if embed else "dense",
      has_bias=has_bias, num_embeddings=module.num_embeddings if embed else 0,
      out_axes=out_axes, kernel_ndim=len(jnp.shape(kernel)), probe=probe)


class _Interceptor:
  """Feeds the tapped layers of one trace of ``model.apply`` to ``tap``."""

  def __init__(self, rec: Recorder):
    self.rec = rec

  def __call__(self, next_fun, args, kwargs, context):
    module, path = context.module, tuple(context.module.path)
    if (context.method_name == "attend" and isinstance(module, nn.Embed)
        and getattr(context.orig_method, "func", None) is _LINEN_ATTEND):
      if not self.rec.wants(path, "nn.Embed"):
        return next_fun(*args, **kwargs)
      return tap(self.rec, path, module, "attend",
                 lambda: next_fun(*args, **kwargs),
                 args[0] if args else kwargs["query"])
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    cls = _LINEN_CALLS.get(getattr(context.orig_method, "func", None))
    if cls is None or not isinstance(module, cls):  # nn.ConvLocal shares Conv's
      self.rec.seen.setdefault(path, type(module).__name__)
      return next_fun(*args, **kwargs)
    if not self.rec.wants(path, type(module).__name__):
      return next_fun(*args, **kwargs)
    return tap(self.rec, path, module, _LINEN_KINDS[cls],
               lambda: next_fun(*args, **kwargs),
               args[0] if args else kwargs["inputs"])


def _linen_run(model: nn.Module, x, layers: dict[str, Any] | None,
               method=None, **apply_kwargs):
  """The tapped forward pass ``run(params, perturbations)`` of a linen model."""
  kinds = ", ".join("nn." + c.__name__ for c in TAPPED_CLASSES)

  def run(params, perturbations, probes):
    rec = Recorder(perturbations, layers)
    for path, probe in (probes or {}).items():
      params = _with_leaf(params, tuple(path) + (PROBE,), probe)
    with nn.intercept_methods(_Interceptor(rec)):
      out = model.apply({"params": params}, x, method=method, **apply_kwargs)
    rec.check_layers("called modules", kinds)
    return out, rec.inputs, rec.metas

  return run


def _linen_build(model, wanted, method, inputs):
  return _linen_run(model, inputs[0], wanted, method=method, **inputs[1])


def _nnx_build(wanted, inputs):
  graphdef, rest, x, call_kwargs = inputs
  return _nnx_run(graphdef, rest, x, wanted, **call_kwargs)


def _with_leaf(tree, path: tuple, leaf):
  """A copy of nested dicts ``tree`` with ``leaf`` at ``path``."""
  if not path:
    return leaf
  tree = dict(tree)
  tree[path[0]] = _with_leaf(tree.get(path[0], {}), path[1:], leaf)
  return tree


def _nnx_run(graphdef, rest, x, layers: dict[str, Any] | None,
             **call_kwargs):
  """The tapped forward pass of an NNX model; its 4th item is the new state.

  Each run merges a fresh copy of the model and returns that copy's
  non-parameter state after the pass (batch statistics, RNG counts).
  """
  kinds = ", ".join("nnx." + c.__name__ for c in NNX_TAPPED_CLASSES)
  # As arrays, so that each run makes its own Variables: NNX refuses to
  # mutate (batch statistics, RNG counts) Variables made in another trace.
  rest = nnx.as_pure(rest)

  def run(params, perturbations, probes):
    model = nnx.merge(graphdef, params, rest)
    # A module shared between parents is visited once, at the path under
    # which nnx.split stores its parameters.
    modules = list(nnx.iter_modules(model))
    for p, m in modules:  # copies made by nnx.scan/vmap/remat keep these
      if isinstance(m, NNX_TAPPED_CLASSES):
        _nnx.attach(m, tuple(p), (probes or {}).get(tuple(p)))

    rec = Recorder(perturbations, layers)
    for p, m in modules:  # named in errors about layers=
      if not isinstance(m, NNX_TAPPED_CLASSES):
        rec.seen[tuple(p)] = "nnx." + type(m).__name__
    on_call = lambda path, module, cls, call, x: tap(
        rec, path, module, cls if cls == "attend" else _NNX_KINDS[cls], call,
        x)
    with _nnx.tapped_calls(rec, {id(m): tuple(p) for p, m in modules},
                           on_call):
      out = model(x, **call_kwargs)
    rec.check_layers("its layer paths", kinds)
    return out, rec.inputs, rec.metas, nnx.split(model, nnx.Param, ...)[2]

  return run


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

  Dense and convolution layers inside a JAX transformation nested in the
  model (``nn.scan`` with or without ``nn.remat``, ``nnx.scan``, ``nn.vmap``
  or ``jax.vmap`` over examples, ``jax.checkpoint``) are tapped too: their
  statistics are summed in their own backward pass (``SummedTape``), one
  block per layer of a stack. Kernels that no tapped layer owns (``nn.Einsum``,
  ``nn.ConvTranspose``, ...) get a warning.

  Args:
    model: a linen ``nn.Module`` or an NNX ``nnx.Module``, returning outputs
      shaped ``(N, ..., C)``.
    loss: a ``kronjax.losses`` negative log-likelihood.
    fisher: ``"mc"`` (targets sampled from the model, ``samples`` draws),
      ``"empirical"`` (the given labels) or ``"exact"`` (every output
      direction).
    samples: Monte-Carlo draws for ``fisher="mc"``.
    layers: which layers to tap, as paths (``("Encoder_0", "Dense_1")``, or
      ``("layers", 0)`` for NNX, whose list indices are ints) or their
      ``"/"``-joined keys (``"Encoder_0/Dense_1"``, ``"layers/0"``); ``None``
      taps every supported layer.
    method: linen only: passed to ``model.apply``.

  Returns:
    For linen, ``fn(params, x, y, rng=None, **apply_kwargs)`` with
    ``params = variables["params"]``; ``apply_kwargs`` go to ``model.apply``.
    For NNX, ``fn(model, x, y, rng=None, **call_kwargs)`` taking the module
    itself; ``call_kwargs`` go to ``model(x, ...)``, ``grads`` is an
    ``nnx.State`` of the ``nnx.Param``s, and the model's other state (batch
    statistics, RNG counts) is updated in place as ``nnx.value_and_grad``
    would. Either returns the mean loss, its gradients and ``{layer_path:
    LayerTape}``, ready for ``kronjax.fisher_blocks`` (a layer inside a
    transformation nested in the model gets a ``SummedTape``). The keyword
    ``with_tape`` (default ``True``; a traced bool works, e.g.
    ``kronjax.curvature_due(opt_state)``) skips the Fisher's backward pass when
    false, leaving zero output gradients in the tapes.

  ``fn.layers(params_or_model, x, **kwargs)`` returns ``{layer_key:
  LayerSpec}``, the layers as the tape sees them (input/output split, stacked
  axes), for ``kronjax.kfac(..., layers=...)``; it traces the model
  abstractly, without FLOPs. ``fn.loss``, ``fn.fisher`` and
  ``fn.with_fisher(mode)`` (this tape function with another Fisher mode, as
  ``kronjax.influence_scores`` needs) describe it.

  Example::

    step = kronjax.flax.value_grad_and_tape(model, kronjax.losses.squared_error)
    loss, grads, tape = jax.jit(step)(params, x, y, jax.random.key(0))
    blocks = kronjax.fisher_blocks(tape)
  """
  check_fisher_mode(fisher, samples)
  losses.check(loss)
  given, wanted = layers, wanted_layers(layers)
  if isinstance(model, nnx.Module):
    if method is not None:
      raise ValueError(
          "method= is for linen models; for an NNX model call the method in "
          "a small nnx.Module wrapper, or pass keyword arguments to fn.")

    nnx_build = Build(_nnx_build, wanted)  # the batch, the state: inputs
    def nnx_fn(module, x, y, rng=None, *, with_tape=True, **call_kwargs):
      if not isinstance(module, nnx.Module):
        raise TypeError(
            "The function from kronjax.flax.value_grad_and_tape(nnx_model, "
            "...) takes the NNX module as its first argument; got "
            f"{type(module).__name__}.")
      _check_batch(x, y)
      graphdef, params, rest = nnx.split(module, nnx.Param, ...)
      inputs = (graphdef, rest, x, call_kwargs)
      value, grads, tape, new_rest = value_grad_and_tape_from_run(
          nnx_build(inputs), loss, fisher, samples, params, y, rng,
          return_state=True, with_tape=with_tape, warn=wanted is None,
          model=(nnx_build, inputs))
      nnx.update(module, new_rest)  # as nnx.value_and_grad: statistics move
      return value, grads, tape

    def nnx_layers(module, x, **call_kwargs):
      graphdef, params, rest = nnx.split(module, nnx.Param, ...)
      run = _nnx_run(graphdef, rest, x, wanted, **call_kwargs)
      return layer_specs(discover(run, params)[1], params)

    nnx_fn.layers = nnx_layers
    nnx_fn.loss, nnx_fn.fisher = loss, fisher
    nnx_fn.with_fisher = lambda mode: value_grad_and_tape(  # e.g. influence
        model, loss, mode, samples, given)
    return nnx_fn
  if not isinstance(model, nn.Module):
    raise TypeError(
        "value_grad_and_tape takes a Flax linen nn.Module or an NNX "
        f"nnx.Module; got {type(model).__name__}. For a plain apply(params, x) "
        "function, use kronjax.nn.value_grad_and_tape with kronjax.nn layers.")

  build = Build(_linen_build, model, wanted, method)  # the batch: inputs

  def fn(params, x, y, rng=None, *, with_tape=True, **apply_kwargs):
    _check_batch(x, y)
    inputs = (x, apply_kwargs)
    return value_grad_and_tape_from_run(build(inputs), loss, fisher, samples,
                                        params, y, rng, with_tape=with_tape,
                                        warn=wanted is None,
                                        model=(build, inputs))

  def layers(params, x, **apply_kwargs):
    run = _linen_run(model, x, wanted, method=method, **apply_kwargs)
    return layer_specs(discover(run, params)[1], params)

  fn.layers, fn.loss, fn.fisher = layers, loss, fisher
  fn.with_fisher = lambda mode: value_grad_and_tape(  # e.g. influence
      model, loss, mode, samples, given, method)
  return fn


def _check_batch(x, y) -> None:
  xs, ys = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
  if xs and ys and np.shape(xs[0])[:1] != np.shape(ys[0])[:1]:
    raise ValueError(
        f"Batch sizes disagree: x has shape {np.shape(xs[0])} and y has shape "
        f"{np.shape(ys[0])}; their leading (batch) axes must match.")
