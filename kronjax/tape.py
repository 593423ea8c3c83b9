"""Per-layer tapes: what K-FAC needs to know about one layer on one batch.

A tape holds, for one tapped layer, its inputs and the gradients of the
per-example negative log-likelihood at its outputs. The adapters
(``kronjax.flax``, ``kronjax.nn``) record tapped layers with a
:class:`Recorder` during one tapped forward pass; :func:`kronjax.fisher_blocks`
turns tapes into Kronecker factors. Nothing here knows about Flax.

Shapes (``N`` examples, ``T`` weight-sharing positions, ``S`` Fisher samples):

* ``inputs``: ``(N, T, d_in)`` for dense-like layers (a convolution's input is
  stored as its patches, ordered ``(kh, kw, c_in)``, so a convolution *is* a
  dense layer with ``T`` output positions); ``(N, T)`` integer ids for
  embeddings.
* ``output_grads``: ``(S, N, T, d_out)``, scaled so that the output factor is
  ``G = sum_s mean_n sum_t g g^T`` (K-FAC-expand): for ``fisher="mc"`` each
  draw carries ``1/sqrt(S)``; for ``"exact"`` the ``S`` rows are the columns
  of a square root of the output Fisher.
* ``mask``: ``None``, or ``(N, T)`` weights (1 counts, 0 does not) when the
  loss masks terms (``ignore_index``): a position aligned with a masked term
  (or, for a layer whose positions are not the loss's terms, an example with
  no unmasked term) is left out of ``A``, as it is of ``G``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Literal

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from kronjax import _summed
from kronjax._batch import Tape
from kronjax._params import ATTEND, layer_key, layer_specs, warn_untapped
from kronjax._summed import SummedTape, TiedTape

LayerPath = tuple[str | int, ...]  # module names; list indices are ints
FISHER_MODES = ("mc", "empirical", "exact")

# jax >= 0.10 has it in jax.extend.core; jax 0.9 in jax.core.
_opaque_trace_state = getattr(jax.extend.core, "get_opaque_trace_state", None)
if _opaque_trace_state is None:  # pragma: no cover - older jax
  _opaque_trace_state = jax.core.get_opaque_trace_state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerTape:
  """Inputs and output gradients of one layer on one batch.

  Attributes:
    inputs: ``(N, T, d_in)`` float inputs (patches for convolutions), or
      ``(N, T)`` integer ids for an embedding.
    output_grads: ``(S, N, T, d_out)`` per-example output gradients, scaled as
      described in the module docstring.
    kind: ``"dense"`` (dense, dense-general and convolution layers) or
      ``"embed"``. Static.
    has_bias: whether the layer has a bias; its input then gets a constant 1
      appended (last). Static.
    num_embeddings: vocabulary size of an embedding (0 otherwise). Static.
    mask: ``None``, or ``(N, T)`` weights of the positions that count.
  """

  inputs: jax.Array
  output_grads: jax.Array
  kind: Literal["dense", "embed"] = dataclasses.field(
      default="dense", metadata=dict(static=True))
  has_bias: bool = dataclasses.field(default=False, metadata=dict(static=True))
  num_embeddings: int = dataclasses.field(
      default=0, metadata=dict(static=True))
  mask: jax.Array | None = None






@dataclasses.dataclass(frozen=True)
class LayerMeta:
  """What an adapter learns about a tapped layer while tracing (static)."""

  kind: Literal["dense", "embed"]
  has_bias: bool
  num_embeddings: int
  d_out: int  # the number of outputs (columns of W̄)
  output_shapes: tuple[jax.ShapeDtypeStruct, ...]  # one per direct call
  d_a: int = 0  # rows of W̄ (inputs, plus one for a bias)
  out_axes: int = 1  # trailing kernel axes that are outputs
  kernel_ndim: int = 2  # the kernel's rank as the layer sees it
  summed: bool = False  # called inside a transformation: a SummedTape


def wanted_layers(
    layers: Iterable[LayerPath | str] | None) -> dict[str, Any] | None:
  """Normalises ``layers=``: ``{layer_key: the path as given}``.

  A path is a tuple (``("layers", 0)``) or its ``"/"``-joined key
  (``"layers/0"``), as everywhere in kronjax (``kronjax._params.layer_key``).
  """
  if layers is None:
    return None
  if isinstance(layers, str):
    raise TypeError(f"layers={layers!r} must be a collection of paths, e.g. "
                    f"layers=[{layers!r}].")
  return {layer_key(p if isinstance(p, str) else tuple(p)): p for p in layers}


class Recorder:
  """Inputs and metadata of the tapped layers in one trace of a model.

  Create it inside the tapped run (``run(params, perturbations)``): layers
  called under a JAX transformation nested inside the model (``lax.scan``,
  ``vmap``, ``checkpoint``, ...) are found by comparing traces with the one
  the recorder was created in, because their values cannot leave it.
  """

  def __init__(self, perturbations, layers: dict[str, Any] | None,
               probes: dict | None = None):
    self.perturbations = perturbations
    self.layers = layers
    self.probes = probes or {}  # used where the layer holds none itself
    self.inputs: dict[LayerPath, list[jax.Array]] = {}
    self.metas: dict[LayerPath, LayerMeta] = {}
    self.seen: dict[LayerPath, str] = {}  # every layer-like call, for errors
    self._trace = _opaque_trace_state(convention="kronjax")

  def wants(self, path: LayerPath, what: str) -> bool:
    """Notes a call of ``path`` (a ``what``); whether to tap it."""
    self.seen.setdefault(path, what)
    return self.layers is None or layer_key(path) in self.layers

  def record(self, path: LayerPath, inputs: jax.Array, out: jax.Array, *,
             kind: Literal["dense", "embed"], has_bias: bool,
             num_embeddings: int = 0, out_axes: int = 1, kernel_ndim: int = 2,
             probe: dict | None = None, index: Any = None) -> jax.Array:
    """Records one call of a layer; returns ``out`` plus its perturbation.

    ``inputs`` are ``(N, ..., d_in)`` in tape layout (or integer ids); the
    last ``out_axes`` axes of ``out`` are the features. A call inside a
    transformation nested in the model is summed in its backward pass
    instead (:class:`SummedTape`), through ``probe``, the zero probe the
    adapter found beside the layer's parameters; so is a call of layer
    ``index`` of a stack of kernels (``kronjax.nn``'s ``index=``), through
    that layer's slice of the stack's probe.
    """
    summed = self.nested() or index is not None
    if summed and kind == "embed":
      self.check_trace(f"Embedding {path}")
    d_out = int(np.prod(out.shape[len(out.shape) - out_axes:]))
    d_a = (num_embeddings if kind == "embed"
           else inputs.shape[-1] + bool(has_bias))
    old = self.metas.get(path)
    if old is not None and old.summed != summed:
      raise ValueError(
          f"Layer {path} is called both inside and outside a JAX "
          "transformation nested in the model; kronjax taps one or the other.")
    shapes = old.output_shapes if old is not None else ()
    if not summed:
      shapes += (jax.ShapeDtypeStruct(out.shape, out.dtype),)
    self.metas[path] = LayerMeta(
        kind=kind, has_bias=bool(has_bias), num_embeddings=int(num_embeddings),
        d_out=d_out, output_shapes=shapes, d_a=d_a, out_axes=out_axes,
        kernel_ndim=kernel_ndim, summed=summed)
    if summed:
      if probe is None and path in self.probes:
        probe = self.probes[path]
        if index is not None:
          probe = jax.tree.map(lambda p: p[index], probe)
      if probe is None:  # the discovering pass, or no probe (an error below)
        if self.perturbations is not None:
          raise ValueError(f"Layer {path}: no probe found beside its "
                           "parameters inside the transformation.")
        return out
      if has_bias:
        inputs = jnp.concatenate([inputs, jnp.ones_like(inputs[..., :1])], -1)
      return _summed.summed(out, jax.lax.stop_gradient(inputs), probe)
    calls = self.inputs.setdefault(path, [])
    calls.append(inputs)
    if self.perturbations is None:
      return out
    return out + self.perturbations[path][len(calls) - 1]

  def nested(self) -> bool:
    """Whether this runs inside a transformation nested in the model."""
    return _opaque_trace_state(convention="kronjax") != self._trace

  def check_trace(self, what: str) -> None:
    """Raises if ``what`` runs under a transformation nested in the model."""
    if self.nested():
      raise ValueError(
          f"{what} is called inside a JAX transformation nested in the "
          "model (nn.scan, nn.remat, nnx.scan, jax.lax.scan, jax.vmap, "
          "jax.checkpoint, ...), where kronjax cannot tap it (dense and "
          "convolution layers of Flax can be tapped there; embeddings and "
          "kronjax.nn layers given a copy of their kernel cannot). Call it "
          "outside the transformation, or leave it out with layers=[...]: "
          "its parameters then go to the fallback optimizer.")

  def check_layers(self, called: str, kinds: str) -> None:
    """Raises if ``layers=`` names a layer that was not tapped."""
    tapped = {layer_key(p) for p in self.metas}
    seen = {layer_key(p): what for p, what in self.seen.items()}
    for key, given in (self.layers or {}).items():
      if key in tapped:
        continue
      if key in seen:
        raise ValueError(f"layers= names {given!r}, a {seen[key]}; only "
                         f"{kinds} layers can be tapped.")
      raise ValueError(f"layers= names {given!r}, which the model never "
                       f"called; {called} are {sorted(self.seen, key=str)}.")


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


def check_fisher_mode(fisher: str, samples: int) -> None:
  """Raises a ``ValueError`` for an unknown Fisher mode or sample count."""
  if fisher not in FISHER_MODES:
    raise ValueError(
        f"fisher={fisher!r} is not a Fisher mode; use one of {FISHER_MODES}: "
        '"mc" samples targets from the model, "empirical" uses the given '
        'labels, "exact" sums over all output directions.')
  if not isinstance(samples, int) or samples < 1:
    raise ValueError(f"samples must be a positive int, got {samples!r}.")


# A tapped forward pass: ``run(params, perturbations, probes)`` computes the
# model's outputs; every tapped layer adds ``perturbations[path][call]`` (zeros)
# to its output, and a layer inside a nested transformation finds
# ``probes[path]`` beside its parameters. It returns the outputs,
# ``Recorder.inputs`` and ``Recorder.metas``, and may return a fourth item,
# the model's non-parameter state after the pass (NNX batch statistics, RNG
# counts). ``perturbations=None`` adds nothing (run once, abstractly, to
# learn the layers).
Run = Callable[[Any, Any, Any], tuple]


def discover(run: Run, params) -> tuple[Any, dict[LayerPath, LayerMeta]]:
  """The output shape and the tapped layers of ``run``, without FLOPs."""
  metas: dict[LayerPath, LayerMeta] = {}

  def trace(p):
    out, _, seen = run(p, None, None)[:3]
    metas.update(seen)
    return out

  return jax.eval_shape(trace, params), metas


def value_grad_and_tape_from_run(
    run: Run, loss, fisher: str, samples: int, params, y, rng,
    return_state: bool = False, with_tape: bool | jax.Array = True,
    warn: bool = False, model: Any = None) -> tuple:
  """Loss, gradients and tapes from one forward pass and two backward passes.

  The forward pass is linearised once (``jax.vjp``); the loss gradient and the
  Fisher's output gradients are both pulled back through it. ``with_tape``
  (a bool or a traced boolean scalar) false skips the Fisher's pass (under
  ``lax.cond``) and leaves zero output gradients, for steps whose curvature
  the optimizer ignores (``kronjax.curvature_due``).

  Returns:
    ``(loss_value, grads, tape)`` (+ the run's state if ``return_state``);
    ``tape``, a ``kronjax.Tape``, carries ``model = (build, inputs)``.
  """
  out_shape, metas = discover(run, params)
  if warn:
    warn_untapped(metas, params, "value_grad_and_tape")
  if not hasattr(out_shape, "shape") or len(out_shape.shape) < 2:
    raise ValueError(
        "The model must return one array of outputs shaped (N, ..., C); got "
        f"{jax.tree_util.tree_map(lambda s: s.shape, out_shape)}.")
  n = out_shape.shape[0]
  y_leaves = jax.tree_util.tree_leaves(y)
  if y_leaves and jnp.shape(y_leaves[0])[:1] != (n,):
    raise ValueError(
        f"Batch sizes disagree: the model's outputs have {n} examples "
        f"(shape {out_shape.shape}) but y has shape {jnp.shape(y_leaves[0])}.")
  _check_labels(y, out_shape.shape, getattr(loss, "ignore_index", None))
  if fisher == "mc" and rng is None:
    raise ValueError('fisher="mc" samples targets: pass rng=jax.random.key(..).')
  nested = [path for path, m in metas.items() if m.summed]
  if nested and loss.masks_terms:
    raise ValueError(
        f"Layers {nested} run inside a JAX transformation nested in the "
        "model, where kronjax sums their statistics without knowing which "
        "positions a masked loss (ignore_index) leaves out. Use a loss "
        "without ignore_index, or unroll those layers.")

  perts = {path: [jnp.zeros(s.shape, s.dtype) for s in m.output_shapes]
           for path, m in metas.items() if not m.summed}
  zero_probes = _summed.probes(metas, layer_specs(metas, params),
                               params) if nested else {}

  def forward(p, e, q):
    result = run(p, e, q)
    return result[0], (result[1], result[3] if return_state else None)

  out, pullback, (inputs, state) = jax.vjp(forward, params, perts,
                                           zero_probes,
                                           has_aux=True)
  num_terms = loss.num_terms(y)
  loss_value = loss(out, y)
  grads, out_grads, loss_stats = pullback(
      (loss.output_grad(out, y) / num_terms).astype(out.dtype))
  # Per-example gradients carry sqrt(N / M) so that G = sum_s mean_n g g^T is
  # the Fisher of the mean loss over M terms (M = N without extra dims).
  scale = jnp.sqrt(n / num_terms)

  def fisher_output_grads():
    if fisher == "empirical":  # the loss pass's, times M
      c = num_terms * scale
      return jax.tree_util.tree_map(lambda g: (g * c)[None], out_grads), {
          p: {**st, "gg": st["gg"] * c**2} for p, st in
          jax.tree_util.tree_map(lambda x: x[None], loss_stats).items()}
    if fisher == "mc":
      draws = loss.sample_targets(rng, out, samples)
      cot = jax.vmap(lambda t: loss.output_grad(out, t))(draws)
      # Drawn targets are never the ignore value: mask the terms here.
      cot = cot * (loss.mask(y)[None, ..., None] * scale / jnp.sqrt(samples))
    else:
      cot = loss.fisher_sqrt(out, y) * scale
    return jax.vmap(lambda c: pullback(c.astype(out.dtype))[1:])(cot)

  zeros = lambda: jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(fisher_output_grads))
  if isinstance(with_tape, jax.core.Tracer):
    fisher_grads, stats = jax.lax.cond(with_tape, fisher_output_grads, zeros)
  else:
    fisher_grads, stats = (fisher_output_grads() if bool(with_tape)
                           else zeros())
  mask = loss.mask(y).reshape(n, -1) if loss.masks_terms else None
  tape = {}
  for path, m in metas.items():
    if m.summed:
      st = stats[path]  # A's sums and counts are the same in every draw
      tape[path] = SummedTape(st["aa"][0], st["gg"], st["count"][0], n)
    else:
      tape[path] = _layer_tape(m, inputs[path], fisher_grads[path], n, mask)
  for path in [p for p in tape if p and p[-1] == ATTEND]:
    tape[path[:-1]] = TiedTape(tape.pop(path[:-1], None), tape.pop(path))
  tape = Tape(tape, model, y, loss_value)
  return (loss_value, grads, tape) + ((state,) if return_state else ())


def _check_labels(y, out_shape, ignore_index) -> None:
  """Refuses concrete integer labels outside [0, C) (wrong grads and blocks)."""
  if (isinstance(y, jax.core.Tracer) or not hasattr(y, "dtype")
      or not jnp.issubdtype(y.dtype, jnp.integer)
      or jnp.ndim(y) != len(out_shape) - 1):
    return
  labels = np.asarray(y)
  bad = ((labels >= out_shape[-1]) | (labels < 0)) & (labels != ignore_index)
  if bad.any():
    raise ValueError(
        f"y holds labels {sorted(set(labels[bad].tolist()))[:5]} outside "
        f"[0, {out_shape[-1]}) for outputs of shape {tuple(out_shape)}.")


def _layer_tape(meta: LayerMeta, inputs, out_grads, n: int,
                mask: jax.Array | None) -> LayerTape:
  """Stacks the calls of one layer along the weight-sharing axis."""
  if meta.kind == "embed":
    calls = [i.reshape(n, -1) for i in inputs]
  else:
    calls = [i.reshape(n, -1, i.shape[-1]) for i in inputs]
  grads = jnp.concatenate(
      [g.reshape(g.shape[0], n, -1, meta.d_out) for g in out_grads], axis=2)
  weights = None
  if mask is not None:
    # A call with one position per loss term takes the terms' mask; any other
    # keeps the examples with at least one unmasked term.
    per_example = jnp.any(mask > 0, axis=1, keepdims=True).astype(mask.dtype)
    weights = jnp.concatenate(
        [mask if c.shape[1] == mask.shape[1]
         else jnp.broadcast_to(per_example, c.shape[:2]) for c in calls],
        axis=1)
  return LayerTape(jnp.concatenate(calls, axis=1), grads, meta.kind,
                   meta.has_bias, meta.num_embeddings, weights)
