"""Tapping Flax linen models with a method interceptor, without changing them.

``nn.intercept_methods`` sees every module call. For the layers K-FAC knows
(``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed``), the interceptor
hands the layer's inputs (in tape layout) and output to a ``Recorder``, which
adds a zero perturbation to the output. Convolutions record the exact operands
of their ``conv_general_dilated`` call (after Flax's own padding for
``CIRCULAR``/``CAUSAL``/``REFLECT``), so their patches are right for every
padding, stride and dilation.
"""

from __future__ import annotations

from typing import Collection

import flax.linen as nn
import jax
import jax.numpy as jnp

from kronjax._layers import (Recorder, dense_general_inputs, recording_conv,
                             swapped_attrs)
from kronjax.tape import LayerPath

TAPPED_CLASSES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed)
_KINDS = ", ".join("nn." + c.__name__ for c in TAPPED_CLASSES)


class Interceptor:
  """Feeds the tapped layers of one trace of ``model.apply`` to a Recorder."""

  def __init__(self, rec: Recorder):
    self.rec = rec

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    if not isinstance(module, TAPPED_CLASSES):
      self.rec.seen.setdefault(path, type(module).__name__)
      return next_fun(*args, **kwargs)
    if not self.rec.wants(path, type(module).__name__):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    out_axes = 1
    if isinstance(module, nn.Conv):
      out, inputs = _conv(module, path, next_fun, args, kwargs)
    elif isinstance(module, nn.Embed):
      out, inputs = next_fun(*args, **kwargs), jnp.asarray(x)
    elif isinstance(module, nn.DenseGeneral):
      if _tuple(module.batch_dims):
        raise ValueError(
            f"Layer {path}: nn.DenseGeneral with batch_dims="
            f"{module.batch_dims} has a separate kernel per batch index, which "
            "K-FAC does not cover; leave it out with layers=[...].")
      out = next_fun(*args, **kwargs)
      inputs = dense_general_inputs(x, _tuple(module.axis), path)
      out_axes = len(_tuple(module.features))
    else:
      out, inputs = next_fun(*args, **kwargs), x
    embed = isinstance(module, nn.Embed)
    return self.rec.record(
        path, inputs, out, kind="embed" if embed else "dense",
        has_bias=getattr(module, "use_bias", False),
        num_embeddings=module.num_embeddings if embed else 0,
        out_axes=out_axes)


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _conv(module: nn.Conv, path, next_fun, args, kwargs):
  """Calls a Conv, capturing its convolution's patches ordered (kh, kw, c_in)."""
  if module.feature_group_count != 1:
    raise ValueError(
        f"Layer {path}: grouped convolutions (feature_group_count="
        f"{module.feature_group_count}) are not supported; leave the layer out "
        "with layers=[...].")
  if module.conv_general_dilated_cls is not None:
    inner = module.conv_general_dilated_cls()
  else:
    inner = module.conv_general_dilated or jax.lax.conv_general_dilated
  captured = []
  with swapped_attrs(module, conv_general_dilated=recording_conv(
      inner, captured), conv_general_dilated_cls=None):
    out = next_fun(*args, **kwargs)
  return out, captured[0]


def linen_run(model: nn.Module, x, layers: Collection[LayerPath] | None,
              method=None, **apply_kwargs):
  """The tapped forward pass ``run(params, perturbations)`` of a linen model."""

  def run(params, perturbations):
    rec = Recorder(perturbations, layers)
    with nn.intercept_methods(Interceptor(rec)):
      out = model.apply({"params": params}, x, method=method, **apply_kwargs)
    rec.check_layers("called modules", _KINDS)
    return out, rec.inputs, rec.metas

  return run
