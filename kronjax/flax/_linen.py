"""Tapping Flax linen models with a method interceptor, without changing them.

``nn.intercept_methods`` sees every module call. For the layers K-FAC knows
(``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed``), the interceptor
records the layer's inputs in tape layout and adds a zero perturbation to its
output, whose cotangent is the gradient at the layer's output. Convolutions
record the exact arguments of their ``conv_general_dilated`` call (after Flax's
own padding for ``CIRCULAR``/``CAUSAL``/``REFLECT``), so their patches are right
for every padding, stride and dilation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kronjax.tape import LayerMeta, LayerPath

TAPPED_CLASSES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed)


class Interceptor:
  """Records tapped layers during one trace of ``model.apply``."""

  def __init__(self, perturbations, layers: Collection[LayerPath] | None):
    self.perturbations = perturbations
    self.layers = layers
    self.inputs: dict[LayerPath, list[jax.Array]] = {}
    self.metas: dict[LayerPath, LayerMeta] = {}
    self.seen: dict[LayerPath, str] = {}  # every called module, for errors

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    self.seen.setdefault(path, type(module).__name__)
    if not isinstance(module, TAPPED_CLASSES) or (
        self.layers is not None and path not in self.layers):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    if isinstance(module, nn.Conv):
      out, inputs = _conv(module, path, next_fun, args, kwargs)
    elif isinstance(module, nn.Embed):
      out, inputs = next_fun(*args, **kwargs), jnp.asarray(x)
    elif isinstance(module, nn.DenseGeneral):
      out, inputs = next_fun(*args, **kwargs), _dense_general_inputs(
          module, path, x)
    else:
      out, inputs = next_fun(*args, **kwargs), x
    self._record(module, path, inputs, out)
    if self.perturbations is not None:
      out = out + self.perturbations[path][len(self.inputs[path]) - 1]
    return out

  def _record(self, module, path, inputs, out):
    calls = self.inputs.setdefault(path, [])
    calls.append(inputs)
    n_feat = (len(_tuple(module.features))
              if isinstance(module, nn.DenseGeneral) else 1)
    shapes = self.metas[path].output_shapes if path in self.metas else ()
    embed = isinstance(module, nn.Embed)
    self.metas[path] = LayerMeta(
        kind="embed" if embed else "dense",
        has_bias=bool(getattr(module, "use_bias", False)),
        num_embeddings=module.num_embeddings if embed else 0,
        d_out=int(np.prod(out.shape[-n_feat:])),
        output_shapes=shapes + (jax.ShapeDtypeStruct(out.shape, out.dtype),))


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _dense_general_inputs(module: nn.DenseGeneral, path, x):
  """Moves DenseGeneral's contracted axes last and flattens them."""
  if _tuple(module.batch_dims):
    raise ValueError(
        f"Layer {path}: nn.DenseGeneral with batch_dims={module.batch_dims} "
        "has a separate kernel per batch index, which K-FAC does not cover; "
        "leave it out with layers=.")
  axes = tuple(a % x.ndim for a in _tuple(module.axis))
  if 0 in axes:
    raise ValueError(
        f"Layer {path}: nn.DenseGeneral contracts axis 0, the batch axis; "
        "K-FAC needs the examples on axis 0.")
  moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  d_in = int(np.prod([x.shape[a] for a in axes]))
  return moved.reshape(moved.shape[:-len(axes)] + (d_in,))


def _conv(module: nn.Conv, path, next_fun, args, kwargs):
  """Calls a Conv, capturing its convolution's patches ordered (kh, kw, c_in)."""
  if module.feature_group_count != 1:
    raise ValueError(
        f"Layer {path}: grouped convolutions (feature_group_count="
        f"{module.feature_group_count}) are not supported; leave the layer out "
        "with layers=.")
  if module.conv_general_dilated_cls is not None:
    inner = module.conv_general_dilated_cls()
  else:
    inner = module.conv_general_dilated or jax.lax.conv_general_dilated
  captured = []

  def recording_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                     rhs_dilation=None, dimension_numbers=None, **kw):
    captured.append(_patches(lhs, rhs, window_strides, padding, lhs_dilation,
                             rhs_dilation, dimension_numbers))
    return inner(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                 rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                 **kw)

  with _swapped(module, conv_general_dilated=recording_conv,
                conv_general_dilated_cls=None):
    out = next_fun(*args, **kwargs)
  return out, captured[0]


def _patches(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dn):
  """Patches of a channels-last convolution, features ordered (k..., c_in)."""
  spatial = rhs.shape[:-2]
  c_in = lhs.shape[-1]
  p = jax.lax.conv_general_dilated_patches(
      lhs, spatial, strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)
  # p's features are ordered (c_in, k...); the kernel flattens as (k..., c_in).
  k = int(np.prod(spatial))
  p = p.reshape(p.shape[:-1] + (c_in, k))
  return jnp.swapaxes(p, -1, -2).reshape(p.shape[:-2] + (k * c_in,))


@contextlib.contextmanager
def _swapped(module, **attrs: Any):
  """Temporarily sets frozen dataclass fields of one bound module instance."""
  old = {name: getattr(module, name) for name in attrs}
  try:
    for name, value in attrs.items():
      object.__setattr__(module, name, value)
    yield
  finally:
    for name, value in old.items():
      object.__setattr__(module, name, value)


def linen_run(model: nn.Module, x, layers: Collection[LayerPath] | None,
              method=None, **apply_kwargs):
  """The tapped forward pass ``run(params, perturbations)`` of a linen model."""

  def run(params, perturbations):
    rec = Interceptor(perturbations, layers)
    with nn.intercept_methods(rec):
      out = model.apply({"params": params}, x, method=method, **apply_kwargs)
    if layers is not None:
      _check_layers(layers, rec)
    return out, rec.inputs, rec.metas

  return run


def _check_layers(layers, rec: Interceptor) -> None:
  for path in layers:
    if path in rec.metas:
      continue
    if path in rec.seen:
      raise ValueError(
          f"layers= names {path}, a {rec.seen[path]}; only "
          f"{', '.join('nn.' + c.__name__ for c in TAPPED_CLASSES)} layers "
          "can be tapped.")
    raise ValueError(
        f"layers= names {path}, which the model never called; called modules "
        f"are {sorted(rec.seen)}.")
