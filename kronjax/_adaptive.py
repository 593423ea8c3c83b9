"""K-FAC's adaptive step: a 2-D quadratic model and Levenberg–Marquardt.

Given the K-FAC direction ``Δ = −(F̂ + λI)⁻¹ g`` and the previous step ``δ``,
the step is ``d = αΔ + μδ`` with ``(α, μ)`` minimising the damped quadratic
model of the loss with the *exact* Fisher ``F`` (Martens & Grosse 2015, §7),

.. math::

  q_λ(d) = g^\\top d + \\tfrac12 d^\\top (F + λI) d, \\qquad
  \\begin{pmatrix} α \\\\ μ \\end{pmatrix}
  = -\\begin{pmatrix} Δ^\\top C Δ & Δ^\\top C δ \\\\
                      δ^\\top C Δ & δ^\\top C δ \\end{pmatrix}^{-1}
    \\begin{pmatrix} g^\\top Δ \\\\ g^\\top δ \\end{pmatrix},
  \\qquad C = F + λI.

The products ``vᵢᵀ F vⱼ = (1/M) ⟨J vᵢ, Λ J vⱼ⟩`` come from one forward-mode
pass of the model's outputs with both tangents batched (``J`` the outputs'
Jacobian, ``Λ`` the loss's output Fisher, ``M`` its number of terms). ``λ`` is
in the model that picks ``(α, μ)`` but not in the one that judges the step:
the reduction ratio

.. math::

  ρ = \\frac{L(θ + d) − L(θ)}{g^\\top d + \\tfrac12 d^\\top F d}

(§6.5) drives Levenberg–Marquardt: every ``T`` steps ``λ ← λ/ω`` if
``ρ < 1/4`` and ``λ ← ωλ`` if ``ρ > 3/4``, ``ω = (19/20)^T``.

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature, §6.5 and §7.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kronjax import (_batch, _damping, _distributed, _factors, _params, _trees,
                     losses)

DAMPING_BOUNDS = (1e-5, 1e3)  # (min, max) of the adapted λ
INTERVAL = 5  # the default T of Levenberg–Marquardt
REJECT = 1e-2  # a step is rejected if this batch's loss rises by more (relative):
# 1e-4 rejected the MNIST autoencoder's plateau-escaping steps (206 vs 126)
# λ's factor after a rejected step: one Levenberg–Marquardt increase at the
# default interval, whatever the interval (with 0, LM never raises λ). ×10
# kept the MNIST autoencoder 45 steps on its plateau while λ came back down.
BOOST = (20 / 19) ** INTERVAL
MOMENTUM_MAX = 0.99  # μ is kept in [0, MOMENTUM_MAX]
INITIAL = 0.1  # the default first λ, relative to the curvature's scale


class AdaptiveKfacState(NamedTuple):
  """State of ``kronjax.scale_by_adaptive_kfac``; a pytree of arrays."""

  count: jax.Array  # () int32: updates applied.
  curvature_due: jax.Array  # () bool: the next update reads its curvature.
  factors: dict[str, _factors.LayerFactors]  # per layer, by layer_key.
  damping: jax.Array  # () factor dtype: λ, adapted by Levenberg–Marquardt.
  prev_step: Any  # params-shaped, ≥ factor dtype: the last step d.
  coefficients: jax.Array  # (2,) factor dtype: (α, μ) of the last step.


class QuadraticModel(NamedTuple):
  """The loss around ``θ`` restricted to ``span(Δ, δ)``."""

  fisher: jax.Array  # (2, 2): vᵢᵀ F vⱼ.
  gram: jax.Array  # (2, 2): vᵢᵀ vⱼ.
  grad: jax.Array  # (2,): gᵀ vᵢ.
  loss: jax.Array  # (): L(θ) on this batch.


def quadratic_model(output_fn: Callable[[Any], jax.Array], loss: Any,
                    targets: Any, params: Any, grads: Any,
                    vectors: tuple[Any, Any], dtype: Any) -> QuadraticModel:
  """Builds :class:`QuadraticModel` from one forward-mode pass of
  ``output_fn`` with both tangents batched."""
  # jvp, not linearize: the primal is computed once either way (it is not
  # batched) and the speed is the same (MNIST autoencoder, transformer), but
  # linearize keeps the whole forward's residuals alive for the tangents.
  outputs, jv = jax.vmap(lambda v: jax.jvp(output_fn, (params,), (v,)),
                         out_axes=(None, 0))(
                             jax.tree.map(lambda *v: jnp.stack(v), *vectors))
  fjv = jax.vmap(lambda t: loss.fisher_vp(outputs, targets, t))(jv)
  fisher = jnp.einsum("i...,j...->ij", jv.astype(dtype), fjv.astype(dtype))
  fisher = (fisher + fisher.T) / (2 * loss.num_terms(targets).astype(dtype))
  gram = jnp.array([[_trees.vdot(u, v, dtype) for v in vectors]
                    for u in vectors])
  grad = jnp.stack([_trees.vdot(grads, v, dtype) for v in vectors])
  return QuadraticModel(fisher, gram, grad,
                        loss(outputs, targets).astype(dtype))


def solve(model: QuadraticModel, damping: jax.Array) -> jax.Array:
  """``(α, μ)`` minimising ``q_λ``, kept sane: ``α > 0``, ``0 ≤ μ < 1``.

  On the first step ``δ = 0`` and the 2×2 system is singular; then, whenever
  ``δ`` is numerically parallel to ``Δ``, only ``α`` is solved for. Else
  ``μ`` is clipped to ``[0, MOMENTUM_MAX]`` and ``α`` re-solved for it: the
  model's minimiser over that strip (a noisy ``δ`` can make the 2-D model
  ask for μ = −68); a step with ``α ≤ 0`` is none.
  """
  c = model.fisher + damping * model.gram
  b = model.grad
  tiny = jnp.finfo(c.dtype).tiny
  positive = c[0, 0] > tiny
  alpha_only = jnp.where(positive, -b[0] / jnp.where(positive, c[0, 0], 1), 0)
  det = c[0, 0] * c[1, 1] - c[0, 1] * c[1, 0]
  eps = 10 * jnp.finfo(c.dtype).eps
  well_posed = (model.gram[1, 1] > 0) & (det > eps * c[0, 0] * c[1, 1])
  safe_det = jnp.where(well_posed, det, 1)
  both = -jnp.stack([c[1, 1] * b[0] - c[0, 1] * b[1],
                     c[0, 0] * b[1] - c[1, 0] * b[0]]) / safe_det
  # The minimiser over μ in [0, MOMENTUM_MAX]: min over α is a convex
  # quadratic in μ, so μ clipped, α re-solved for it.
  mu = jnp.clip(both[1], 0, MOMENTUM_MAX)
  alpha = -(b[0] + c[0, 1] * mu) / jnp.where(positive, c[0, 0], 1)
  sane = well_posed & positive & (alpha > 0)
  return jnp.where(sane, jnp.stack([alpha, mu]),
                   jnp.stack([jnp.maximum(alpha_only, 0),
                              jnp.zeros_like(alpha_only)]))


def flip_first(model: QuadraticModel) -> QuadraticModel:
  """The model with its first direction ``v₀`` replaced by ``−v₀``."""
  sign = jnp.array([-1, 1], model.grad.dtype)
  return model._replace(fisher=model.fisher * jnp.outer(sign, sign),
                        gram=model.gram * jnp.outer(sign, sign),
                        grad=model.grad * sign)


def predicted_change(model: QuadraticModel, w: jax.Array) -> jax.Array:
  """``gᵀd + ½ dᵀFd`` for ``d = w₀Δ + w₁δ`` (undamped, for ``ρ``)."""
  return model.grad @ w + 0.5 * w @ model.fisher @ w


def norm_constraint_scale(fisher_norm_sq: jax.Array,
                          norm_constraint: Any) -> jax.Array:
  """``min(1, sqrt(c / |s|))`` with ``s`` the step's squared Fisher norm.

  Ba, Grosse & Martens 2017: keeps ``sᵀ F s`` (twice the KL divergence the
  step causes, to second order) at most ``c``. 1 when ``s = 0``.
  """
  s = jnp.abs(fisher_norm_sq)
  c = jnp.asarray(norm_constraint, s.dtype)
  return jnp.where(s > c, jnp.sqrt(c / jnp.where(s > c, s, 1)), 1)


def initial_damping(factors: dict, dtype: Any) -> jax.Array:
  """``INITIAL · mean_l (tr Ā_l / d_A)(tr Ḡ_l / d_G)``: the first λ, relative
  to the curvature's scale (``_damping.DAMPING`` if that is zero)."""
  scale = jnp.mean(_damping.scales(factors)).astype(dtype)  # stacks: by layer
  return jnp.where(scale > 0, INITIAL * scale, _damping.DAMPING).astype(dtype)


def levenberg_marquardt(damping: jax.Array, rho: jax.Array, interval: Any,
                        bounds: tuple[Any, Any]) -> jax.Array:
  """Damping after a step with reduction ratio ``ρ`` (NaN counts as bad)."""
  omega = jnp.asarray(19 / 20, damping.dtype) ** interval
  bad, good = ~(rho >= 0.25), rho > 0.75
  damping = jnp.where(bad, damping / omega,
                      jnp.where(good, damping * omega, damping))
  lo, hi = (jnp.asarray(b, damping.dtype) for b in bounds)
  return jnp.clip(damping, lo, hi)


def adaptive_step(loss: Any, damping: Any, norm_constraint: Any,
                  interval: int, settings: _factors.Settings
                  ) -> optax.GradientTransformationExtraArgs:
  """The adaptive K-FAC transformation without its non-finite guard.

  See ``kronjax.scale_by_adaptive_kfac``; its output is ``−d``.
  """
  losses.check(loss)
  if callable(damping):
    raise ValueError(
        "The adaptive step adapts the damping itself: pass its initial value "
        f"as damping= (a float), not a schedule ({damping!r}). For a damping "
        "schedule use a fixed step (kronjax.kfac(learning_rate=...)).")
  if isinstance(interval, float) or (isinstance(interval, int)
                                     and interval < 0):
    raise ValueError("damping_adaptation_interval must be an int >= 0 (0: "
                     f"no adaptation); got {interval!r}.")

  def init_fn(params):
    factors = _factors.init(params, _params.optimizer_layers(params, settings),
                            settings)
    dtype = _factors.compute_dtype(_factors.factor_dtype(params, settings))
    prev = jax.tree.map(lambda p: jnp.zeros(
        p.shape, jnp.promote_types(p.dtype, dtype)), params)
    return AdaptiveKfacState(
        count=jnp.zeros([], jnp.int32), curvature_due=jnp.asarray(True),
        factors=factors, prev_step=prev,
        damping=jnp.asarray(jnp.nan if damping is None else damping, dtype),
        coefficients=jnp.zeros((2,), dtype))

  def update_fn(updates, state, params=None, *, curvature=None,
                output_fn=None, targets=None, finite=True, **extra_args):
    del extra_args
    output_fn, targets = _batch.model_and_targets(curvature, output_fn,
                                                  targets)
    if not isinstance(state, AdaptiveKfacState):
      raise ValueError(
          f"scale_by_adaptive_kfac was given a {type(state).__name__}, the "
          "state of another transformation: pass the state its own init made.")
    if curvature is None:
      raise ValueError(f"The adaptive K-FAC step needs this batch's Fisher "
                       f"blocks: {_params.CURVATURE_HINT}.")
    if output_fn is None or targets is None or params is None:
      raise ValueError(
          "The adaptive K-FAC step needs params and the batch's model: pass "
          "the tape function's tape (or its fisher_blocks), which carries "
          "them, as curvature=, or give output_fn= (params -> the model's "
          "outputs on this batch) and targets=: tx.update(grads, opt_state, "
          "params, curvature=tape). For a fixed step size use "
          "kronjax.kfac(learning_rate=...) instead.")
    if not getattr(output_fn, "fills_masked", False):
      _refuse_masked(params)
    output_fn = _explained(output_fn)
    dtype, count, lam = state.damping.dtype, state.count, state.damping
    precond, factors, _, lam = _factors.precondition_step(
        updates, state.factors, curvature, settings, count,
        lambda fs: jnp.where(jnp.isnan(lam), initial_damping(fs, dtype), lam),
        finite)
    precond = optax.tree.cast_like(precond, params)
    prev = optax.tree.cast_like(state.prev_step, params)
    # The model of span(P, δ), turned into that of span(Δ, δ) with Δ = −P
    # by flipping the signs of Δ's entries: no negated copy of P.
    model = flip_first(quadratic_model(output_fn, loss, targets, params,
                                       updates, (precond, prev), dtype))
    w = solve(model, lam)
    if norm_constraint is not None:
      w = w * norm_constraint_scale(w @ model.fisher @ w, norm_constraint)
    combine = lambda w: jax.tree.map(  # d = w₀Δ + w₁δ, in δ's dtype
        lambda p, b, d: -w[0] * p.astype(d.dtype) + w[1] * b.astype(d.dtype),
        precond, prev, state.prev_step)

    moved = jax.tree.map(lambda p, d: p + d.astype(p.dtype), params,
                         combine(w))
    change = loss(output_fn(moved), targets).astype(dtype) - model.loss
    predicted = predicted_change(model, w)
    rho = change / jnp.where(predicted != 0, predicted, 1)
    # No predicted change (a zero step): nothing to judge λ by.
    due = ((interval > 0) & (count % jnp.maximum(interval, 1) == 0)
           & (predicted != 0))
    adapted = jnp.where(due, levenberg_marquardt(lam, rho, interval,
                                                 DAMPING_BOUNDS), lam)
    # A step that raises this batch's loss (or makes it non-finite) is
    # rejected at once: no move, no momentum, λ raised.
    reject = finite & ~(change <= REJECT * jnp.abs(model.loss))
    lam = jnp.where(reject, jnp.minimum(lam * BOOST, DAMPING_BOUNDS[1]),
                    adapted)
    w = jnp.where(reject, 0, w)
    step = combine(w)  # exactly zero if rejected (and the inputs finite)
    count = optax.safe_int32_increment(count)
    out = jax.tree.map(lambda d, g: -d.astype(g.dtype), step, updates)
    if settings.placement is not None:  # neither may inherit a factor split
      out, step = _distributed.replicate((out, step), settings.placement)
    return out, AdaptiveKfacState(
        count=count, curvature_due=count % settings.factor_every == 0,
        factors=factors, damping=lam, prev_step=step, coefficients=w)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _explained(output_fn: Callable) -> Callable:
  """``output_fn``, whose Flax trace-context errors say what to do."""

  def call(params):
    try:
      return output_fn(params)
    except Exception as e:
      if type(e).__name__ != "TraceContextError":
        raise
      raise ValueError(
          "output_fn mutates a variable of the model from another trace (NNX "
          "BatchNorm statistics, Dropout RNG counts): the adaptive step calls "
          "it inside jax.linearize. Drop output_fn= and targets= and pass the "
          "tape function's tape as curvature= (it carries the batch's model), "
          "or merge a copy: nnx.merge(graphdef, p, rest, copy=True)(x).") from e

  return call


def _refuse_masked(params: Any) -> None:
  masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(masked(x) for x in jax.tree.leaves(params, is_leaf=masked)):
    raise ValueError(
        "The adaptive K-FAC step runs inside optax.partition (or another "
        "wrapper that masks params), so output_fn would see "
        "optax.MaskedNode in place of the other group's params. Use "
        "kronjax.kfac(loss=..., fallback=...) instead: its fallback "
        "optimizer takes the parameters outside K-FAC's layers.")


def with_full_params(inner: optax.GradientTransformation
                     ) -> optax.GradientTransformationExtraArgs:
  """``inner`` (a partition) given an ``output_fn`` that fills masked leaves.

  ``optax.partition`` hides the other group's params (``optax.MaskedNode``),
  but the adaptive step's ``output_fn`` needs them all: they come from this
  update's ``params`` (as constants: the step moves only its own group).
  """
  inner = optax.with_extra_args_support(inner)
  masked = lambda x: isinstance(x, optax.MaskedNode)

  def update_fn(updates, state, params=None, *, output_fn=None, **extra_args):
    output_fn, _ = _batch.model_and_targets(extra_args.get("curvature"),
                                            output_fn, None)
    if output_fn is not None and params is not None:
      _refuse_masked(params)
      fn: Callable[[Any], Any] = output_fn
      output_fn = lambda view: fn(jax.tree.map(
          lambda v, p: p if masked(v) else v, view, params, is_leaf=masked))
      output_fn.fills_masked = True  # the adaptive step may take masked params
    return inner.update(updates, state, params, output_fn=output_fn,
                        **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
