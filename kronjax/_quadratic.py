"""The adaptive step of K-FAC: a 2-D quadratic model and Levenberg–Marquardt.

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

The four products ``vᵢᵀ F vⱼ = (1/M) ⟨J vᵢ, Λ J vⱼ⟩`` come from one
linearisation of the model's outputs with both tangents batched (``J`` the
outputs' Jacobian, ``Λ`` the loss's output Fisher, ``M`` its number of terms).
``λ`` is in the model that picks ``(α, μ)`` (§7: the damped curvature
``F + (λ + η)I``; weight decay ``η`` is unknown to the transform, so it is 0
here), but not in the model that judges the step: the reduction ratio

.. math::

  ρ = \\frac{L(θ + d) − L(θ)}{g^\\top d + \\tfrac12 d^\\top F d}

(§6.5, also kfac-jax's default) drives Levenberg–Marquardt: every ``T`` steps,
``λ ← λ/ω`` if ``ρ < 1/4`` and ``λ ← ωλ`` if ``ρ > 3/4``, ``ω = (19/20)^T``.

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature, §6.5 and §7.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class QuadraticModel(NamedTuple):
  """The loss around ``θ`` restricted to ``span(Δ, δ)``."""

  fisher: jax.Array  # (2, 2): vᵢᵀ F vⱼ.
  gram: jax.Array  # (2, 2): vᵢᵀ vⱼ.
  grad: jax.Array  # (2,): gᵀ vᵢ.
  loss: jax.Array  # (): L(θ) on this batch.


def tree_dot(x: Any, y: Any, dtype: Any) -> jax.Array:
  """``⟨x, y⟩`` over the leaves of two same-shaped trees, in ``dtype``."""
  parts = [jnp.vdot(a.astype(dtype), b.astype(dtype))
           for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))]
  return sum(parts, jnp.zeros((), dtype))


def quadratic_model(output_fn: Callable[[Any], jax.Array], loss: Any,
                    targets: Any, params: Any, grads: Any,
                    vectors: tuple[Any, Any], dtype: Any) -> QuadraticModel:
  """Builds :class:`QuadraticModel` from one linearisation of ``output_fn``.

  Args:
    output_fn: params → the model's outputs on this batch.
    loss: a ``kronjax.losses`` NLL (``__call__``, ``num_terms``,
      ``fisher_vp``).
    targets: the batch's targets.
    params: the current parameters (the primal of the linearisation).
    grads: ``g``, shaped like ``params``.
    vectors: ``(Δ, δ)``, shaped and typed like ``params``.
    dtype: the dtype of the returned coefficients.
  """
  outputs, jvp = jax.linearize(output_fn, params)
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *vectors)
  jv = jax.vmap(jvp)(stacked)  # (2, *outputs.shape)
  fjv = jax.vmap(lambda t: loss.fisher_vp(outputs, targets, t))(jv)
  num_terms = loss.num_terms(targets).astype(dtype)
  fisher = jnp.einsum("i...,j...->ij", jv.astype(dtype), fjv.astype(dtype))
  fisher = (fisher + fisher.T) / (2 * num_terms)
  gram = jnp.array([[tree_dot(u, v, dtype) for v in vectors] for u in vectors])
  grad = jnp.stack([tree_dot(grads, v, dtype) for v in vectors])
  return QuadraticModel(fisher, gram, grad,
                        loss(outputs, targets).astype(dtype))


def solve(model: QuadraticModel, damping: jax.Array) -> jax.Array:
  """``(α, μ)`` minimising ``q_λ``; ``μ = 0`` when ``δ = 0`` or degenerate.

  On the first step ``δ = 0`` and the 2×2 system is singular; then (and
  whenever ``δ`` is numerically parallel to ``Δ``) only ``α`` is solved for.
  """
  c = model.fisher + damping * model.gram
  b = model.grad
  tiny = jnp.finfo(c.dtype).tiny
  alpha_only = jnp.where(c[0, 0] > tiny, -b[0] / jnp.where(c[0, 0] > tiny,
                                                            c[0, 0], 1), 0)
  det = c[0, 0] * c[1, 1] - c[0, 1] * c[1, 0]
  eps = 10 * jnp.finfo(c.dtype).eps
  well_posed = (model.gram[1, 1] > 0) & (det > eps * c[0, 0] * c[1, 1])
  safe_det = jnp.where(well_posed, det, 1)
  both = -jnp.stack([c[1, 1] * b[0] - c[0, 1] * b[1],
                     c[0, 0] * b[1] - c[1, 0] * b[0]]) / safe_det
  single = jnp.stack([alpha_only, jnp.zeros_like(alpha_only)])
  return jnp.where(well_posed, both, single)


def predicted_change(model: QuadraticModel, w: jax.Array) -> jax.Array:
  """``gᵀd + ½ dᵀFd`` for ``d = w₀Δ + w₁δ`` (undamped, for ``ρ``)."""
  return model.grad @ w + 0.5 * w @ model.fisher @ w


def norm_constraint_scale(fisher_norm_sq: jax.Array,
                          norm_constraint: jax.Array) -> jax.Array:
  """``min(1, sqrt(c / |s|))`` with ``s`` the step's squared Fisher norm.

  Ba, Grosse & Martens 2017: keeps ``sᵀ F s`` (twice the KL divergence the
  step causes, to second order) at most ``c``. 1 when ``s = 0``.
  """
  s = jnp.abs(fisher_norm_sq)
  c = jnp.asarray(norm_constraint, s.dtype)
  return jnp.where(s > c, jnp.sqrt(c / jnp.where(s > c, s, 1)), 1)


def levenberg_marquardt(damping: jax.Array, rho: jax.Array, interval: Any,
                        bounds: tuple[Any, Any]) -> jax.Array:
  """Damping after a step with reduction ratio ``ρ`` (NaN counts as bad)."""
  omega = jnp.asarray(19 / 20, damping.dtype) ** interval
  bad = ~(rho >= 0.25)  # also NaN
  good = rho > 0.75
  damping = jnp.where(bad, damping / omega, jnp.where(good, damping * omega,
                                                      damping))
  lo, hi = (jnp.asarray(b, damping.dtype) for b in bounds)
  return jnp.clip(damping, lo, hi)
