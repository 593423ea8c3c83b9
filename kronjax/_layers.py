"""Recording tapped layers during a forward pass, for every model kind.

The linen interceptor, the NNX call patches and the pure-JAX tag functions
(``kronjax.nn``) all end in :class:`Recorder`: it stores a layer's inputs in tape
layout and adds the layer's zero perturbation to its output, whose cotangent is
the gradient at the layer's output (see ``kronjax.tape.Run``). The helpers here
put inputs into tape layout. Nothing here knows about Flax.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Collection, Iterable, Iterator, Literal

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from kronjax.tape import LayerMeta, LayerPath

# jax >= 0.10 moved it to jax.extend.core; jax 0.9 (kfac-jax's pin) has it in
# jax.core.
_opaque_trace_state = getattr(jax.extend.core, "get_opaque_trace_state", None)
if _opaque_trace_state is None:  # pragma: no cover - older jax
  _opaque_trace_state = jax.core.get_opaque_trace_state


def wanted_layers(
    layers: Iterable[LayerPath | str] | None) -> frozenset | None:
  """Normalises ``layers=``: paths as tuples, ``"a/b"`` strings split at ``/``."""
  if layers is None:
    return None
  if isinstance(layers, str):
    raise TypeError(
        f"layers={layers!r} must be a collection of paths, e.g. "
        f"layers=[{layers!r}].")
  return frozenset(
      tuple(p.split("/")) if isinstance(p, str) else tuple(p) for p in layers)


class Recorder:
  """Inputs and metadata of the tapped layers in one trace of a model.

  Create it inside the tapped run (``run(params, perturbations)``): layers
  called under a JAX transformation nested inside the model (``lax.scan``,
  ``vmap``, ``checkpoint``, ...) are found by comparing traces with the one the
  recorder was created in, because their values cannot leave that
  transformation.
  """

  def __init__(self, perturbations, layers: Collection[LayerPath] | None):
    self.perturbations = perturbations
    self.layers = layers
    self.inputs: dict[LayerPath, list[jax.Array]] = {}
    self.metas: dict[LayerPath, LayerMeta] = {}
    self.seen: dict[LayerPath, str] = {}  # every layer-like call, for errors
    self._trace = _opaque_trace_state(convention="kronjax")

  def wants(self, path: LayerPath, what: str) -> bool:
    """Notes a call of ``path`` (a ``what``); whether to tap it."""
    self.seen.setdefault(path, what)
    return self.layers is None or path in self.layers

  def record(self, path: LayerPath, inputs: jax.Array, out: jax.Array, *,
             kind: Literal["dense", "embed"], has_bias: bool,
             num_embeddings: int = 0, out_axes: int = 1) -> jax.Array:
    """Records one call; returns ``out`` plus its perturbation.

    Args:
      path: the layer's path.
      inputs: ``(N, ..., d_in)`` inputs in tape layout, or integer ids.
      out: the layer's output; its last ``out_axes`` axes are the features.
      kind: ``"dense"`` or ``"embed"``.
      has_bias: whether the layer adds a bias.
      num_embeddings: an embedding's vocabulary size.
      out_axes: how many trailing output axes are features (``d_out`` is
        their product).
    """
    self.check_trace(f"Layer {path}")
    calls = self.inputs.setdefault(path, [])
    calls.append(inputs)
    shapes = self.metas[path].output_shapes if path in self.metas else ()
    self.metas[path] = LayerMeta(
        kind=kind, has_bias=bool(has_bias), num_embeddings=int(num_embeddings),
        d_out=int(np.prod(out.shape[len(out.shape) - out_axes:])),
        output_shapes=shapes + (jax.ShapeDtypeStruct(out.shape, out.dtype),))
    if self.perturbations is None:
      return out
    return out + self.perturbations[path][len(calls) - 1]

  def nested(self) -> bool:
    """Whether the caller runs under a transformation inside the model."""
    here = _opaque_trace_state(convention="kronjax")
    return here != self._trace

  def check_trace(self, what: str) -> None:
    """Raises if ``what`` (a layer) runs under a transformation in the model."""
    if self.nested():
      raise ValueError(
          f"{what} is called inside a JAX transformation nested in the "
          "model (nn.scan, nn.vmap, nn.remat, nnx.scan, nnx.vmap, nnx.remat, "
          "jax.lax.scan, jax.vmap, jax.checkpoint, ...). The tape cannot "
          "see the layer's inputs there: they never leave the transformation. "
          "For the tapped step, unroll scanned or vmapped layers (a Python "
          "loop over layers) and drop remat, or leave the layer out with "
          "layers=[...] and give its parameters another optimizer "
          "(kronjax.uncovered_parameters lists them).")

  def check_layers(self, called: str, kinds: str) -> None:
    """Raises if ``layers=`` names a layer that was not tapped.

    Args:
      called: how to say "the layers the model called" for this framework.
      kinds: the layer kinds that can be tapped, for the message.
    """
    for path in self.layers or ():
      if path in self.metas:
        continue
      if path in self.seen:
        raise ValueError(
            f"layers= names {path}, a {self.seen[path]}; only {kinds} layers "
            "can be tapped.")
      raise ValueError(
          f"layers= names {path}, which the model never called; {called} are "
          f"{sorted(self.seen, key=str)}.")


def dense_general_inputs(x: jax.Array, axes: Iterable[int],
                         path: LayerPath) -> jax.Array:
  """Moves a general dense layer's contracted axes last and flattens them.

  The kernel is ``(*in_dims, *out_dims)`` with ``in_dims`` the contracted axes
  in the order given, so the flattened inputs line up with
  ``kernel.reshape(-1, d_out)``.
  """
  axes = tuple(a % x.ndim for a in axes)
  if 0 in axes:
    raise ValueError(
        f"Layer {path} contracts axis 0, the batch axis; K-FAC needs the "
        "examples on axis 0. Leave the layer out with layers=[...].")
  moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  d_in = int(np.prod([x.shape[a] for a in axes]))
  return moved.reshape(moved.shape[:-len(axes)] + (d_in,))


def recording_conv(inner: Callable[..., jax.Array],
                   captured: list) -> Callable[..., jax.Array]:
  """Wraps a ``conv_general_dilated`` to append its patches to ``captured``.

  Layers pass this in place of their convolution, so the patches come from
  the exact operands the layer convolves (after its own padding), right for
  every padding, stride and dilation.
  """

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None, **kwargs):
    captured.append(conv_patches(lhs, rhs.shape, window_strides, padding,
                                 lhs_dilation, rhs_dilation,
                                 dimension_numbers))
    return inner(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                 rhs_dilation=rhs_dilation,
                 dimension_numbers=dimension_numbers, **kwargs)

  return conv


def conv_patches(lhs, kernel_shape, strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None) -> jax.Array:
  """Patches of a channels-last convolution, features ordered ``(k..., c_in)``.

  ``kernel_shape`` is ``(*k, c_in, c_out)``; the patches line up with
  ``kernel.reshape(-1, c_out)``.
  """
  spatial = tuple(kernel_shape[:-2])
  c_in = lhs.shape[-1]
  p = jax.lax.conv_general_dilated_patches(
      lhs, spatial, strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      precision=jax.lax.Precision.HIGHEST)
  # p's features are ordered (c_in, k...); the kernel flattens as (k..., c_in).
  k = int(np.prod(spatial))
  p = p.reshape(p.shape[:-1] + (c_in, k))
  return jnp.swapaxes(p, -1, -2).reshape(p.shape[:-2] + (k * c_in,))


@contextlib.contextmanager
def swapped_attrs(obj: Any, **attrs: Any) -> Iterator[None]:
  """Sets attributes of one object for the duration of a ``with`` block.

  Bypasses ``__setattr__`` (frozen linen dataclasses, NNX's trace checks): the
  object is a module of the model being traced, changed only during one call.
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
