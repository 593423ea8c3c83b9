"""K-FAC's factor state: moving averages, refreshes and damped solves.

Each layer keeps one :class:`LayerFactors`: per Kronecker factor its moving
average and the cached, expensive part of its damped solve, refreshed every
``inverse_every`` steps and applied cheaply every step (lineax's split between
a factorisation and its application):

* exact damping keeps each factor's eigendecomposition, and the solve is
  ``kronjax.linalg.KronEigh.solve``,

  .. math::

    (A \\otimes G + λI)^{-1} \\operatorname{vec}(Γ)
    = (U_A \\otimes U_G)\\,(Λ_A \\otimes Λ_G + λI)^{-1}
      (U_A \\otimes U_G)^\\top \\operatorname{vec}(Γ);

* the π-corrected split keeps each factor's damped inverse, made (by
  Cholesky) with the damping of its refresh, and the solve is one
  ``kronjax.linalg.Kron`` product,

  .. math::

    \\big((A + π\\sqrt{λ} I) \\otimes (G + \\tfrac{\\sqrt{λ}}{π} I)\\big)^{-1}
    \\operatorname{vec}(Γ),
    \\qquad π = \\sqrt{\\frac{\\operatorname{tr} A / d_A}
                              {\\operatorname{tr} G / d_G}}.

* EK-FAC (``eigenvalue_correction``) keeps the eigenbases too, and replaces
  K-FAC's eigenvalues ``λ_A λ_Gᵀ`` by ``s``, a bias-corrected moving average
  of each batch's mean squared per-example gradient in the Kronecker
  eigenbasis (George et al. 2018). A refresh carries the average into the
  new basis as the diagonal of the old ``U diag(s) Uᵀ`` there,
  ``(Q_A ∘ Q_A) s (Q_G ∘ Q_G)ᵀ`` with ``Q = U_newᵀ U_old`` per factor:

  .. math::

    U\\,\\big(\\operatorname{diag}(\\operatorname{vec} s) + λI\\big)^{-1} U^\\top
    \\operatorname{vec}(Γ), \\qquad U = U_A \\otimes U_G.

``Γ`` is the gradient of ``W̄`` (kernel rows, then the bias row); ``A ⊗ G`` is
never formed. ``λ`` is a number, or relative to each layer's scale
(``kronjax._damping``).

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature (§6.3, the π-corrected damping). George et al. 2018,
  Fast approximate natural gradient descent in a Kronecker-factored
  eigenbasis (EK-FAC).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kronjax import _distributed, _ekfac, _params
from kronjax._damping import (average as _ema, layer_damping,
                              shifts as _shifts, weight as _weight)
from kronjax.blocks import check_state, checked as checked_blocks
from kronjax._params import LayerSpec, compute_dtype, map_layers
from kronjax.linalg import Kron, KronEigh
from kronjax.linalg import _factors as _linalg


class EighFactor(NamedTuple):
  """One Kronecker factor with exact damping: average and eigenbasis."""

  ema: jax.Array  # (d, d), or (d,) diagonal: moving-average accumulator.
  eigvals: jax.Array  # (d,): eigenvalues of the average, clipped at 0.
  eigvecs: jax.Array  # like ema: eigenvectors (ones for a diagonal factor).


class InverseFactor(NamedTuple):
  """One Kronecker factor with the π-split: average and damped inverse."""

  ema: jax.Array  # (d, d), or (d,) diagonal: moving-average accumulator.
  inverse: jax.Array  # like ema: (average + shift·I)⁻¹ at the last refresh.


Factor = EighFactor | InverseFactor


class LayerFactors(NamedTuple):
  """The factor state of one layer."""

  a: Factor  # inputs: (d_A, d_A), or (vocab,) for an embedding's diagonal.
  g: Factor  # outputs: (d_G, d_G).
  weight: jax.Array  # () factor dtype: accumulated EMA weight, 1 - decay^k.
  # EK-FAC only (else None): (d_A, d_G) moving-average accumulator (weighted
  # by `weight` as the factors) of the block's eigenvalues in U_A ⊗ U_G.
  corrections: jax.Array | None = None


class Settings(NamedTuple):
  """Static options of both K-FAC transformations; the defaults are theirs."""

  decay: float = 0.95
  factor_every: int = 1
  inverse_every: int = 10
  exact_damping: bool = False
  factor_dtype: Any = None  # None: the params' float dtype, at least float32
  placement: Any = None  # a kronjax.Placement over more than one device
  layers: Any = None  # {layer_key: LayerSpec} from the tape; None: guessed
  routed: bool = False  # kfac routes params by layer: all need curvature
  eigenvalue_correction: bool = False  # EK-FAC (eigenbases, always exact)

  @property
  def eigenbases(self) -> bool:
    """Whether the factors keep eigendecompositions (not damped inverses)."""
    return self.exact_damping or self.eigenvalue_correction


def _init_factor(d: int, diagonal: bool, dtype: Any, exact: bool,
                 stack: tuple[int, ...] = ()) -> Factor:
  shape = stack + ((d,) if diagonal else (d, d))
  identity = jnp.broadcast_to(
      jnp.ones(d, dtype) if diagonal else jnp.eye(d, dtype=dtype), shape)
  if exact:
    return EighFactor(jnp.zeros(shape, dtype), jnp.zeros(stack + (d,), dtype),
                      identity)
  return InverseFactor(jnp.zeros(shape, dtype), identity)


def factor_dtype(params: Any, settings: Settings) -> jnp.dtype:
  """``factor_dtype``, or by default the params' float dtype (≥ float32)."""
  if settings.factor_dtype is not None:
    return jnp.dtype(settings.factor_dtype)
  return _params.float_dtype(params)


def init(params: Any, layers: dict[str, LayerSpec],
         settings: Settings) -> dict[str, LayerFactors]:
  """Zero averages and identity eigenbases (or inverses) for every layer."""
  dtype = factor_dtype(params, settings)
  if settings.layers is not None:
    _params.check_given(params, layers)
  if settings.eigenvalue_correction:
    _ekfac.check(layers, settings.placement)
  factors = {}
  for key, spec in layers.items():
    d_a, d_g = spec.factor_sizes
    stack, exact = spec.stack_shape, settings.eigenbases
    factors[key] = LayerFactors(
        _init_factor(d_a, spec.kind == "embed", dtype, exact, stack),
        _init_factor(d_g, False, dtype, exact, stack),
        jnp.zeros(stack, dtype),
        jnp.zeros(stack + (d_a, d_g), dtype)
        if settings.eigenvalue_correction else None)
  if settings.placement is not None:
    stacked = [k for k, spec in layers.items() if spec.stack]
    if stacked:
      raise ValueError(f"Stacked layers {stacked} (nn.scan) cannot be placed "
                       "over devices yet; leave placement=None.")
    factors = _distributed.init(factors, settings.placement)
  return factors


def update(f: LayerFactors, a: jax.Array, g: jax.Array,
           decay: Any) -> LayerFactors:
  """One step of the moving averages, tracking their accumulated weight.

  ``Ā_k = β Ā_{k-1} + (1 - β) A`` and ``w_k = β w_{k-1} + (1 - β) = 1 - β^k``:
  ``Ā_k / w_k`` is the bias-corrected average, exact from the first step.
  """
  decay = jnp.asarray(decay, compute_dtype(f.weight.dtype))
  step = lambda old, new: (decay * old + (1 - decay) * new).astype(old.dtype)

  def ema(side: Factor, new: jax.Array) -> Factor:
    # Stored averages may be zero-padded (a split layout): pad the block.
    new = jnp.pad(new.astype(decay.dtype),
                  [(0, s - d) for d, s in zip(new.shape, side.ema.shape)])
    return side._replace(ema=step(side.ema, new))

  return f._replace(a=ema(f.a, a), g=ema(f.g, g), weight=step(f.weight, 1))


def _stored(factor: Factor, result: Any, weight: jax.Array) -> Factor:
  """A factor with its refreshed part, from the decomposition of its
  accumulator (the average times ``weight``). LAPACK has no float16:
  results come in :func:`compute_dtype`, stored in the factor's dtype."""
  store = lambda x: x.astype(factor.ema.dtype)
  times = lambda x: x * weight.reshape(weight.shape + (1,) * (
      x.ndim - weight.ndim))
  if isinstance(factor, InverseFactor):  # (M / w + sI)⁻¹ = w (M + wsI)⁻¹
    return factor._replace(inverse=store(times(result)))
  vals, vecs = result if isinstance(result, tuple) else (result, None)
  return factor._replace(eigvals=store(jnp.maximum(vals, 0) / times(
      jnp.ones_like(vals))), eigvecs=factor.eigvecs if vecs is None
                         else store(vecs))


def refresh_side(f: LayerFactors, side: str, damping: Any) -> Factor:
  """The cached part of one factor's solve: eigenbasis or damped inverse.

  ``damping`` is used only by the π-split, whose inverses include it until
  the next refresh. Reads only the accumulators and ``weight``.
  """
  factor, ema, weight = getattr(f, side), _ema(f, side), _weight(f)
  if isinstance(factor, EighFactor):
    diagonal = ema.ndim == f.weight.ndim + 1  # its own eigenvalues
    return _stored(factor, ema if diagonal else jnp.linalg.eigh(ema), weight)
  return _stored(factor, _linalg.damped_inverse(ema, _shifts(
      {0: f}, [(0, side)], damping).reshape(f.weight.shape)), weight)


def _dense(factors: dict[str, LayerFactors]) -> list[tuple[str, str]]:
  """The ``(key, side)`` of every dense (not diagonal) factor."""
  return [(key, side) for key, f in factors.items() for side in "ag"
          if getattr(f, side).ema.ndim != f.weight.ndim + 1]


def dense_shifts(factors: dict[str, LayerFactors], damping: Any) -> Any:
  """The π-split's shifts of the dense factors, for :func:`refresh_all`
  (``None`` for eigenbases, which take no shift)."""
  dense = _dense(factors)
  if not dense or isinstance(factors[dense[0][0]].a, EighFactor):
    return None
  return _shifts(factors, dense, damping)


def refresh_all(factors: dict[str, LayerFactors], damping: Any,
                shifts: Any = None) -> dict[str, LayerFactors]:
  """Every layer's refresh (:func:`refresh_side` of both factors), with the
  dense factors of all layers decomposed together: one batched call per
  size class (``kronjax.linalg._factors.damped_inverses`` / ``eighs``),
  so a model compiles a handful of decompositions, not two per layer.

  ``shifts``: :func:`dense_shifts` of ``factors``, if computed already.
  """
  dense = _dense(factors)
  new = {key: {side: refresh_side(f, side, damping) for side in "ag"
               if (key, side) not in dense} for key, f in factors.items()}
  emas = [_ema(factors[k], s) for k, s in dense]  # weights: in _stored
  weights = [_weight(factors[k]) for k, _ in dense]
  if shifts is None:
    shifts = dense_shifts(factors, damping)
  if shifts is None:
    results = _linalg.eighs(emas)
  else:
    results = _linalg.damped_inverses(emas, shifts)
  for (key, side), result, w in zip(dense, results, weights):
    new[key][side] = _stored(getattr(factors[key], side), result, w)
  return {key: f._replace(**new[key]) if f.corrections is None
          else _ekfac.carried(f, f._replace(**new[key]))
          for key, f in factors.items()}


def solve(f: LayerFactors, grad: jax.Array, damping: Any) -> jax.Array:
  """``(A ⊗ G + λI)⁻¹ vec(Γ)`` (or the π-split) for ``Γ`` shaped like A × G.

  ``grad`` has the stored factors' (possibly padded) sizes; the result is in
  their :func:`compute_dtype`.
  """
  dtype = compute_dtype(f.weight.dtype)
  if f.corrections is not None:
    return _ekfac.solve(f, grad, damping)
  f, v = jax.tree.map(lambda x: x.astype(dtype), (f, grad.reshape(-1)))
  if isinstance(f.a, EighFactor):
    decomposition = KronEigh((f.a.eigvals, f.g.eigvals),
                             Kron(f.a.eigvecs, f.g.eigvecs))
    x = decomposition.solve(v, jnp.asarray(layer_damping(f, damping),
                                           v.dtype))
  else:
    # The inverses are symmetric; contracting G's rows (its transpose) keeps
    # the product legal when both factors are split by rows (Explicit axes).
    x = Kron(f.a.inverse, f.g.inverse.T) @ v
  return x.reshape(grad.shape)


def maintain(factors: dict[str, LayerFactors], blocks_fn: Callable, keys,
             layers: dict[str, LayerSpec], settings: Settings, damping: Any,
             update_now: jax.Array,
             refresh_now: jax.Array, corrections_fn: Callable | None = None):
  """Moving averages and refreshes of the layers with blocks, under conds.

  ``damping`` may be a function of the updated factors (of the layers with
  blocks), called before the refresh. EK-FAC's ``corrections_fn`` (factors
  → their new corrections) runs after the refresh, in the new basis.
  Returns the factors and the damping.
  """
  placement = settings.placement
  sub = {key: factors[key] for key in keys}

  def update_all(fs):
    blocks = blocks_fn()
    if placement is not None:
      blocks = _distributed.replicate(blocks, placement)
    return {k: update(f, *blocks[k], settings.decay) for k, f in fs.items()}

  if placement is not None:
    sub = _distributed.constrain(sub, placement)
  identity = lambda fs: fs
  sub = jax.lax.cond(update_now, update_all, identity, sub)
  # A damping function (the adaptive step's first damping) takes the same
  # traces as the shifts: outside the cond, XLA computes (and compiles) them
  # once. Otherwise they stay in the cond, off the steps without a refresh.
  shared = callable(damping)
  if shared:
    damping = damping(sub)
  if placement is None:
    shifts = dense_shifts(sub, damping) if shared else None
    refresh_fn = lambda fs: refresh_all(fs, damping, shifts)
  else:
    sizes = {k: layers[k].factor_sizes for k in keys}
    refresh_fn = lambda fs: _distributed.refresh(
        fs, lambda f, side: refresh_side(f, side, damping), placement, sizes)
  sub = jax.lax.cond(refresh_now, refresh_fn, identity, sub)
  if corrections_fn is not None:
    sub = jax.lax.cond(update_now, corrections_fn, identity, sub)
  if placement is not None:
    sub = _distributed.constrain(sub, placement)
  return {**factors, **sub}, damping


def precondition(grads: Any, covered: dict[str, LayerSpec],
                 factors: dict[str, LayerFactors], damping: Any,
                 placement: Any = None) -> Any:
  """Each covered layer's gradient replaced by its damped solve."""

  def layer(key, leaves):
    f, spec = factors[key], covered[key]
    gamma = spec.to_matrix(leaves, jnp.result_type(*leaves.values()))
    rows = f.a.ema.shape[-1] if spec.kind != "embed" else gamma.shape[-2]
    padded = jnp.pad(gamma, [(0, 0)] * spec.stack + [
        (0, rows - gamma.shape[-2]), (0, f.g.ema.shape[-1] - gamma.shape[-1])])
    solve_fn = lambda f, v: solve(f, v, damping)
    for _ in range(spec.stack):  # one solve per layer of a stack
      solve_fn = jax.vmap(solve_fn)
    x = solve_fn(f, padded)
    if placement is not None:  # updates must not inherit a split
      x = _distributed.replicate(x, placement)
    return spec.from_matrix(x[..., :gamma.shape[-2], :gamma.shape[-1]],
                            leaves)

  return map_layers(layer, grads, covered)


def precondition_step(grads: Any, factors: dict[str, LayerFactors],
                      curvature: Any, settings: Settings, count: jax.Array,
                      damping: Any, finite: Any = True):
  """The core of both K-FAC transformations, for one update.

  ``finite`` false (from ``kronjax.skip_non_finite``: the step is discarded)
  leaves the factors alone.

  Returns:
    ``(preconditioned grads, new factors, covered layers, damping used)``;
    parameters of layers without a block pass through unchanged.
  """
  layers = _params.optimizer_layers(grads, settings)
  blocks_fn, keys = checked_blocks(curvature, layers, factors,
                                   settings.layers is None)
  check_state(factors, layers, keys, settings)
  factors, damping = maintain(
      factors, blocks_fn, keys, layers, settings, damping,
      finite & (count % settings.factor_every == 0),
      finite & (count % settings.inverse_every == 0),
      _ekfac.updater(curvature, settings.decay)
      if settings.eigenvalue_correction else None)
  covered = {key: layers[key] for key in keys}
  _params.check_covered(grads, layers, covered, settings)
  return (precondition(grads, covered, factors, damping, settings.placement),
          factors, covered, damping)
