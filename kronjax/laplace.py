"""The Kronecker-factored Laplace approximation of a trained network.

Around the trained parameters ``θ`` (a MAP estimate under the prior
``N(0, τ⁻¹ I)``), the posterior over the K-FAC layers' parameters is
approximated by

.. math::

  p(θ' | D) ≈ N\\big(θ, (n F + τ I)^{-1}\\big),

with ``F`` the mean Fisher of a :class:`kronjax.Curvature` (K-FAC or EK-FAC)
and ``n`` the number of training examples. Every layer's precision is
diagonal in its Kronecker eigenbasis (eigenvalues ``n Λ + τ``), so samples,
the log-determinant and the evidence cost what the curvature's solve costs
(Ritter et al. 2018; Immer et al. 2021). Parameters outside the K-FAC layers
stay at their values (a subnetwork Laplace, as laplace-torch's): ``|θ|²``
and ``P``, the number of parameters, count the K-FAC layers' only.

References:
  Ritter, Botev & Barber 2018, A scalable Laplace approximation for neural
  networks. Immer et al. 2021, Scalable marginal likelihood estimation for
  model selection in deep learning. MacKay 1992, Bayesian interpolation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kronjax.curvature import Curvature, layer_matrices

__all__ = ["Laplace", "laplace"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Laplace:
  """The posterior ``N(θ, (n_data·F + τI)⁻¹)`` over the K-FAC layers.

  A pytree; made by :func:`laplace`.

  Attributes:
    curvature: the :class:`kronjax.Curvature` ``F``.
    params: ``θ``, the trained parameters (the posterior mean).
    n_data: ``n``, the number of training examples (terms) ``F`` averages.
    prior_precision: ``τ``, a scalar.
  """

  curvature: Curvature
  params: Any
  n_data: jax.Array
  prior_precision: jax.Array

  def _precisions(self, tau: Any = None) -> list[jax.Array]:
    tau = self.prior_precision if tau is None else tau
    return [self.n_data * lam + tau
            for lam in self.curvature.eigenvalues.values()]

  def _theta_sq(self) -> jax.Array:
    mats = layer_matrices(self.params, self.curvature.specs,
                          self.prior_precision.dtype)
    return sum(jnp.sum(m ** 2) for m in mats.values())

  def log_marginal_likelihood(self, nll_sum: Any) -> jax.Array:
    """The Laplace evidence ``log p(D)``, up to no constant.

    .. math::

      -\\sum_n ℓ_n - \\frac{τ}{2} |θ|^2 + \\frac{P}{2} \\log τ
      - \\frac12 \\log\\det(n F + τ I)

    Args:
      nll_sum: ``Σ_n ℓ_n``, the training set's summed negative
        log-likelihood at ``θ`` (``n_data`` times the mean loss).
    """
    tau = self.prior_precision
    p = self.curvature.num_parameters
    logdet = sum(jnp.sum(jnp.log(m)) for m in self._precisions())
    return (-nll_sum - tau / 2 * self._theta_sq() + p / 2 * jnp.log(tau)
            - logdet / 2)

  def optimize_prior_precision(self, nll_sum: Any = None, *,
                               iterations: int = 100) -> Laplace:
    """The posterior with the ``τ`` that maximises the evidence.

    The evidence is concave in ``τ`` (its second derivative is ``Σ_i
    ((nΛ_i + τ)⁻² − τ⁻²)/2 ≤ 0``); its maximum solves MacKay's fixed point
    ``τ |θ|² = γ(τ) = Σ_i nΛ_i / (nΛ_i + τ)``, the effective number of
    parameters, whose two sides cross once. It is bracketed in ``(0,
    P/|θ|²]`` and found by bisection on ``log τ``.

    Args:
      nll_sum: the training set's summed NLL; it does not move the
        maximum, which is why it may be left out.
      iterations: bisection steps (each halves the bracket in ``log τ``).
    """
    del nll_sum  # constant in τ
    lam = jnp.concatenate([self.n_data * v.reshape(-1)
                           for v in self.curvature.eigenvalues.values()])
    theta_sq = self._theta_sq()
    hi = jnp.log(lam.size / jnp.maximum(theta_sq, jnp.finfo(lam.dtype).tiny))
    lo = hi - jnp.log(1e12)

    def step(_, bracket):
      lo, hi = bracket
      mid = (lo + hi) / 2
      tau = jnp.exp(mid)
      more = jnp.sum(lam / (lam + tau)) > tau * theta_sq  # γ above: τ higher
      return jnp.where(more, mid, lo), jnp.where(more, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, step, (lo, hi))
    tau = jnp.exp((lo + hi) / 2).astype(self.prior_precision.dtype)
    return dataclasses.replace(self, prior_precision=tau)

  def _one_sample(self, key: jax.Array) -> Any:
    coords = {}
    for i, (k, lam) in enumerate(self.curvature.eigenvalues.items()):
      z = jax.random.normal(jax.random.fold_in(key, i), lam.shape, lam.dtype)
      coords[k] = z / jnp.sqrt(self.n_data * lam + self.prior_precision)
    zeros = jax.tree.map(jnp.zeros_like, self.params)
    delta = self.curvature.from_eigenbasis(coords, zeros)
    return jax.tree.map(lambda p, d: p + d.astype(p.dtype), self.params,
                        delta)

  def sample(self, key: jax.Array, n: int) -> Any:
    """``n`` draws from the posterior: a params-shaped tree, leading axis n.

    Per layer ``W̄ + U_A (Z ⊘ sqrt(nΛ + τ)) U_Gᵀ`` with ``Z`` standard normal
    (``⊘`` elementwise); the other parameters repeat ``θ``.
    """
    return jax.vmap(self._one_sample)(jax.random.split(key, n))

  def predictive(self, apply_fn: Callable[[Any, Any], jax.Array], x: Any,
                 key: jax.Array, n_samples: int, *, linearized: bool = False,
                 link: Callable[[jax.Array], jax.Array] = jax.nn.softmax
                 ) -> jax.Array:
    """The Monte-Carlo predictive: the mean of ``link(f(θ', x))`` over draws.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``, e.g. ``lambda p, x:
        model.apply({"params": p}, x)``.
      x: the inputs.
      key: a ``jax.random.key``.
      n_samples: posterior draws, evaluated one at a time.
      linearized: use the network linearised at ``θ`` (the GLM predictive
        of Immer et al. 2021), ``f(θ) + J (θ' − θ)``, which is often better
        calibrated than the network at the draws.
      link: outputs to predictions; the default gives mean class
        probabilities.

    Returns:
      ``link``'s output averaged over the draws, e.g. ``(N, C)``.
    """
    f = lambda p: apply_fn(p, x)

    def one(k):
      draw = self._one_sample(k)
      if not linearized:
        return link(f(draw))
      delta = jax.tree.map(jnp.subtract, draw, self.params)
      out, tangent = jax.jvp(f, (self.params,), (delta,))
      return link(out + tangent)

    return jnp.mean(jax.lax.map(one, jax.random.split(key, n_samples)),
                    axis=0)


def laplace(curv: Curvature, params: Any, *, n_data: Any,
            prior_precision: Any) -> Laplace:
  """The Laplace posterior ``N(params, (n_data·F + τI)⁻¹)`` of the K-FAC layers.

  Args:
    curv: the curvature ``F`` at ``params``, from
      :func:`kronjax.fit_curvature` (its mean Fisher per example).
    params: the trained (MAP) parameters.
    n_data: the number of training examples ``F`` stands for (terms, for a
      loss over sequences).
    prior_precision: ``τ`` of the prior ``N(0, τ⁻¹ I)``; choose it with
      :meth:`Laplace.optimize_prior_precision`.

  Returns:
    A :class:`Laplace`.
  """
  dtype = jnp.result_type(float, *curv.eigenvalues.values())
  return Laplace(curv, params, jnp.asarray(n_data, dtype),
                 jnp.asarray(prior_precision, dtype))
