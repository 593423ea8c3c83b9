"""Tapping pure-JAX models: layer functions that K-FAC can see.

Write the model as ``apply(params, x)`` with the layers below in place of the
matrix products; ``value_grad_and_tape(apply, loss)`` then gives the loss, its
gradients and a tape for every layer, like ``kronjax.flax.value_grad_and_tape``
does for Flax. Outside a tapped step the layers are the plain maths.

Example::

  def apply(params, x):
    h = jnp.tanh(kronjax.nn.dense(x, params["hidden"]["kernel"],
                                  params["hidden"]["bias"]))
    return kronjax.nn.dense(h, params["out"]["kernel"], params["out"]["bias"])

  step = kronjax.nn.value_grad_and_tape(apply, kronjax.losses.squared_error)
  loss, grads, tape = jax.jit(step)(params, x, y, jax.random.key(0))
  blocks = kronjax.fisher_blocks(tape)   # {("hidden",): Kron, ("out",): Kron}

A layer's path is found from its kernel: the kernel must be passed as the very
array taken from ``params`` (not transformed first), and the path is the
kernel's path in ``params`` without its last key, so
``params["out"]["kernel"]`` is layer ``("out",)`` and
``params["blocks"][0]["kernel"]`` is layer ``("blocks", 0)``. The bias, if any,
must live beside the kernel. Name the arrays ``kernel``, ``bias`` and
``embedding`` so that ``kronjax.uncovered_parameters`` and the optimizer
recognise them. Kernels are ``(*in_dims, d_out)`` as in Flax. Layers called
inside ``jax.checkpoint`` or ``jax.vmap`` (over examples) in ``apply`` are
tapped when they are given the params' own arrays (closed over, or passed
with ``in_axes=None``): their statistics are summed in their backward pass
(``SummedTape``). A layer given a kernel with no path (a transformed copy, a
slice of stacked kernels in ``lax.scan``) raises a ``ValueError`` when every
layer is tapped, and is left untapped when ``layers=`` names the layers to
tap.

Equinox-style models (params are a module pytree) work the same way: call the
layers on the module's own arrays, e.g. ``kronjax.nn.dense(x, layer.kernel,
layer.bias)`` in the model's ``__call__``, and tap ``lambda m, x: m(x)``. An
``eqx.nn.Linear`` keeps its ``weight`` as ``(out, in)``, the transpose of a
kernel: write the layer as a small module holding ``kernel = weight.T`` (or
initialise it so), so that paths, blocks and updates follow the convention.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp

from kronjax import losses
from kronjax._batch import Build
from kronjax._params import layer_specs, tree_paths
from kronjax.tape import (LayerPath, Recorder, Tape, check_fisher_mode,
                          conv_patches, discover,
                          value_grad_and_tape_from_run, wanted_layers)

__all__ = ["conv", "dense", "embed", "value_grad_and_tape"]

# (recorder, {id(params leaf): path}) of the tapped run in this context.
_ACTIVE: contextvars.ContextVar[tuple[Recorder, dict[int, tuple]] | None] = (
    contextvars.ContextVar("kronjax_nn_tap", default=None))

Padding = str | int | Sequence[int | tuple[int, int]]


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
          index: Any = None,
          precision: jax.lax.PrecisionLike = None) -> jax.Array:
  """A dense layer: ``x`` contracted with ``kernel``, plus ``bias``.

  Args:
    x: ``(N, ..., *in_dims)`` inputs.
    kernel: ``(*in_dims, d_out)``: its leading axes contract the trailing axes
      of ``x`` (``(d_in, d_out)`` for an ordinary dense layer); with
      ``index``, a stack of such kernels, ``(L, *in_dims, d_out)``.
    bias: ``(d_out,)`` or ``None`` (``(L, d_out)`` with ``index``).
    index: the layer of a stack to apply (an int or a traced int, e.g. the
      step of a ``jax.lax.scan`` over ``jnp.arange(L)``): pass the stacked
      params themselves and the index, not a slice, so that the tape knows
      the layer (one block per layer of the stack).
    precision: passed to ``jax.lax.dot_general``.

  Returns:
    ``(N, ..., d_out)`` outputs.
  """
  stacked = kernel, bias
  if index is not None:
    kernel = kernel[index]
    bias = None if bias is None else bias[index]
  k = kernel.ndim - 1
  if k < 1 or x.shape[x.ndim - k:] != kernel.shape[:-1]:
    raise ValueError(
        f"kronjax.nn.dense: kernel of shape {kernel.shape} does not fit inputs "
        f"of shape {x.shape}; the kernel must be (*in_dims, d_out) with "
        "in_dims the trailing axes of x.")
  contract = (tuple(range(x.ndim - k, x.ndim)), tuple(range(k)))
  out = jax.lax.dot_general(x, kernel, (contract, ((), ())),
                            precision=precision)
  if bias is not None:
    out = out + bias
  inputs = lambda: x.reshape(x.shape[:x.ndim - k] + (-1,))
  return _record("kronjax.nn.dense", *stacked, inputs, out, kind="dense",
                 index=index, kernel_ndim=kernel.ndim)


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
         strides: int | Sequence[int] = 1, padding: Padding = "SAME",
         input_dilation: int | Sequence[int] = 1,
         kernel_dilation: int | Sequence[int] = 1,
         precision: jax.lax.PrecisionLike = None) -> jax.Array:
  """A channels-last convolution, as ``flax.linen.Conv`` computes it.

  Args:
    x: ``(N, *spatial, c_in)`` inputs.
    kernel: ``(*window, c_in, c_out)``.
    bias: ``(c_out,)`` or ``None``.
    strides: window strides, one int or one per spatial axis.
    padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``,
      ``"CAUSAL"`` (1-D only), an int, or one int or ``(low, high)`` pair per
      spatial axis, as in ``flax.linen.Conv``.
    input_dilation: dilation of the inputs (transposed-convolution style).
    kernel_dilation: dilation of the kernel (atrous convolution).
    precision: passed to ``jax.lax.conv_general_dilated``.

  Returns:
    ``(N, *out_spatial, c_out)`` outputs.
  """
  nd = kernel.ndim - 2
  if nd < 1 or x.ndim != nd + 2 or x.shape[-1] != kernel.shape[-2]:
    raise ValueError(
        f"kronjax.nn.conv: kernel of shape {kernel.shape} does not fit inputs "
        f"of shape {x.shape}; expected x (N, *spatial, c_in) and kernel "
        "(*window, c_in, c_out) with as many spatial axes as window axes.")
  each = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)
  strides, input_dilation = each(strides), each(input_dilation)
  kernel_dilation = each(kernel_dilation)
  x, padding = _pad(x, kernel.shape[:-2], kernel_dilation, padding)
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                      _channels_last(nd))
  args = (strides, padding, input_dilation, kernel_dilation, dn)
  out = jax.lax.conv_general_dilated(
      x, kernel, strides, padding, lhs_dilation=input_dilation,
      rhs_dilation=kernel_dilation, dimension_numbers=dn, precision=precision)
  if bias is not None:
    out = out + bias
  inputs = lambda: conv_patches(x, kernel.shape, *args)
  return _record("kronjax.nn.conv", kernel, bias, inputs, out, kind="dense")


def embed(ids: jax.Array, embedding: jax.Array) -> jax.Array:
  """An embedding lookup: row ``ids`` of ``embedding`` (``(vocab, features)``)."""
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"kronjax.nn.embed takes integer ids; got {ids.dtype}.")
  out = jnp.take(embedding, ids, axis=0)
  return _record("kronjax.nn.embed", embedding, None, lambda: ids, out,
                 kind="embed", num_embeddings=embedding.shape[0])


def _channels_last(nd: int) -> tuple[str, str, str]:
  spatial = "DHW"[3 - nd:] if nd <= 3 else "".join(
      chr(ord("a") + i) for i in range(nd))  # any letters but N, C, I, O
  return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


def _pad(x, window, kernel_dilation, padding):
  """Flax's padding rules: the modes that jax.lax does not have become pads."""
  nd = len(window)
  if isinstance(padding, str):
    mode = padding.upper()
    if mode in ("SAME", "VALID"):
      return x, mode
    span = [(k - 1) * d + 1 for k, d in zip(window, kernel_dilation)]
    if mode in ("CIRCULAR", "REFLECT"):
      pads = [(0, 0)] + [((s - 1) // 2, s // 2) for s in span] + [(0, 0)]
      return jnp.pad(x, pads, mode={"CIRCULAR": "wrap",
                                    "REFLECT": "reflect"}[mode]), "VALID"
    if mode == "CAUSAL":
      if nd != 1:
        raise ValueError("kronjax.nn.conv: CAUSAL padding is for 1-D "
                         f"convolutions; this one has {nd} spatial axes.")
      return jnp.pad(x, [(0, 0), (span[0] - 1, 0), (0, 0)]), "VALID"
    raise ValueError(f"kronjax.nn.conv: unknown padding {padding!r}.")
  if isinstance(padding, int):
    return x, [(padding, padding)] * nd
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  if len(pads) != nd:
    raise ValueError(f"kronjax.nn.conv: padding {padding!r} needs one entry "
                     f"per spatial axis ({nd}).")
  return x, pads


def _record(name: str, kernel, bias, inputs: Callable[[], jax.Array], out, *,
            kind: str, num_embeddings: int = 0, index: Any = None,
            kernel_ndim: int | None = None):
  active = _ACTIVE.get()
  if active is None:
    return out
  rec, paths = active
  kernel_path = paths.get(id(kernel))
  if kernel_path is None and rec.layers is not None:
    return out  # no path, so not one of the layers asked for
  if kernel_path is None:
    # Transformations inside apply_fn (jax.checkpoint, lax.scan, vmap) pass
    # params in as new arrays: say that rather than "not a parameter".
    rec.check_trace(f"A {name} layer (kernel of shape {kernel.shape})")
    raise ValueError(
        f"{name} was given a kernel of shape {kernel.shape} that is not an "
        "array of the params being tapped, so its layer has no path. Pass "
        "the array as it is in params (e.g. params['out']['kernel']), not a "
        "transformed copy (astype, .T, reshape, ...). For a layer of stacked "
        "kernels (a jax.lax.scan over layers) pass the stack and the layer's "
        "index: kronjax.nn.dense(h, params['blocks']['kernel'], "
        "params['blocks']['bias'], index=i), scanning over jnp.arange(L). A "
        "layer whose kernel is computed rather than a parameter cannot be "
        "tapped: write it with plain jax.numpy instead.")
  path = kernel_path[:-1]
  if bias is not None and paths.get(id(bias), (None,))[:-1] != path:
    raise ValueError(
        f"{name}: the bias of layer {path} must be an array of params that "
        f"lives beside its kernel (at {path + ('bias',)}); got one at "
        f"{paths.get(id(bias), 'no path in params')}.")
  if not rec.wants(path, name):
    return out
  return rec.record(path, inputs(), out, kind=kind,
                    has_bias=bias is not None, num_embeddings=num_embeddings,
                    kernel_ndim=kernel.ndim if kernel_ndim is None
                    else kernel_ndim, index=index)


@contextlib.contextmanager
def _tapping(rec: Recorder, params) -> Iterator[None]:
  paths = {id(leaf): path for path, leaf in tree_paths(params)[0]}
  token = _ACTIVE.set((rec, paths))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def _run_on(apply_fn, wanted, inputs):
  """The tapped forward pass ``run(params, perturbations, probes)``."""
  x, kwargs = inputs

  def run(p, perturbations, probes):
    rec = Recorder(perturbations, wanted, probes)
    with _tapping(rec, p):
      out = apply_fn(p, x, **kwargs)
    rec.check_layers("the tapped layers it called", "kronjax.nn")
    return out, rec.inputs, rec.metas

  return run


def value_grad_and_tape(
    apply_fn: Callable[..., jax.Array],
    loss,
    fisher: str = "mc",
    samples: int = 1,
    layers: Iterable[LayerPath | str] | None = None,
) -> Callable[..., tuple[jax.Array, Any, Tape]]:
  """Builds ``fn(params, x, y, rng=None, **kwargs) -> (loss, grads, tape)``.

  The pure-JAX counterpart of ``kronjax.flax.value_grad_and_tape``: every
  ``kronjax.nn.dense``, ``conv`` and ``embed`` that ``apply_fn(params, x,
  **kwargs)`` calls on arrays of ``params`` gets a tape (a kernel used twice
  is a shared layer: its calls become weight-sharing positions).

  Args:
    apply_fn: ``apply_fn(params, x, **kwargs)`` returning outputs shaped
      ``(N, ..., C)``.
    loss: a ``kronjax.losses`` negative log-likelihood.
    fisher: ``"mc"``, ``"empirical"`` or ``"exact"``.
    samples: Monte-Carlo draws for ``fisher="mc"``.
    layers: which layers to tap (paths, or their ``"/"``-joined keys such as
      ``"blocks/0"``); ``None`` taps all.

  Returns:
    ``fn(params, x, y, rng=None, **kwargs)`` returning the mean loss, its
    gradients w.r.t. ``params`` (same structure) and ``{layer_path:
    LayerTape}``. ``with_tape=False`` (or a traced false) skips the Fisher's
    backward pass, as in ``kronjax.flax.value_grad_and_tape``.
  """
  check_fisher_mode(fisher, samples)
  losses.check(loss)
  given, wanted = layers, wanted_layers(layers)

  build = Build(_run_on, apply_fn, wanted)  # static: the batch is in inputs
  run_on = lambda x, kwargs: build((x, kwargs))

  def fn(params, x, y, rng=None, *, with_tape=True, **kwargs):
    return value_grad_and_tape_from_run(run_on(x, kwargs), loss, fisher,
                                        samples, params, y, rng,
                                        with_tape=with_tape,
                                        warn=wanted is None,
                                        model=(build, (x, kwargs)))

  def layers(params, x, **kwargs):
    return layer_specs(discover(run_on(x, kwargs), params)[1], params)

  fn.layers, fn.loss, fn.fisher = layers, loss, fisher
  fn.with_fisher = lambda mode: value_grad_and_tape(  # e.g. influence
      apply_fn, loss, mode, samples, given)
  return fn
