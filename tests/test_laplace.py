"""The Laplace posterior against dense matrices.

References: the precision ``H = n·F + τI`` of each K-FAC layer formed densely
(``F = U diag(Λ) Uᵀ``), its ``slogdet`` for the evidence and its inverse for
the samples' covariance; the prior precision chosen must be a maximum of the
evidence. Parameters outside the K-FAC layers (a LayerNorm) stay put.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
from test_curvature import CE, _get, _init, _wbar, data, dense_block, split

N_DATA = 1000.0


@pytest.fixture(scope="module", params=[False, True], ids=["kfac", "ekfac"])
def posterior(request):
  model, x, y = data("mlp", n=12)
  params = _init(model, x)
  tape_fn = kronjax.flax.value_grad_and_tape(model, CE, fisher="empirical")
  curv = kronjax.fit_curvature(tape_fn, params, split(x, y, [6, 6]),
                               eigenvalue_correction=request.param)
  return model, x, kronjax.laplace(curv, params, n_data=N_DATA,
                                   prior_precision=0.5)


def _dense(post, tau):
  return {k: N_DATA * dense_block(post.curvature, k)
          + tau * jnp.eye(post.curvature.eigenvalues[k].size)
          for k in post.curvature.specs}


def test_the_evidence_is_the_dense_formula(posterior):
  _, _, post = posterior
  nll = 12.5
  theta = jnp.concatenate([_wbar(_get(post.params, s.path)).reshape(-1)
                           for s in post.curvature.specs.values()])
  logdet = sum(jnp.linalg.slogdet(h)[1] for h in _dense(post, 0.5).values())
  want = (-nll - 0.5 / 2 * theta @ theta + theta.size / 2 * jnp.log(0.5)
          - logdet / 2)
  np.testing.assert_allclose(post.log_marginal_likelihood(nll), want,
                             rtol=1e-12)


def test_the_chosen_prior_precision_is_the_maximum(posterior):
  _, _, post = posterior
  best = post.optimize_prior_precision(3.0)
  tau = float(best.prior_precision)
  assert tau != 0.5
  evidence = lambda t: float(kronjax.laplace(
      post.curvature, post.params, n_data=N_DATA,
      prior_precision=t).log_marginal_likelihood(3.0))
  top = evidence(tau)
  np.testing.assert_allclose(top, float(best.log_marginal_likelihood(3.0)))
  for factor in (1 - 1e-3, 1 + 1e-3, 0.5, 2.0, 0.01, 100.0):
    assert evidence(tau * factor) < top, factor


def test_samples_have_the_dense_inverse_as_covariance(posterior):
  _, _, post = posterior
  n = 20000
  draws = post.sample(jax.random.key(0), n)
  # The LayerNorm is not a K-FAC layer: its draws are the MAP values.
  jax.tree.map(lambda d, p: np.testing.assert_array_equal(d, p[None] + 0 * d),
               draws["LayerNorm_0"], post.params["LayerNorm_0"])
  for key, h in _dense(post, 0.5).items():
    spec = post.curvature.specs[key]
    w = jax.vmap(lambda d: _wbar(_get(d, spec.path)).reshape(-1))(draws)
    mean = _wbar(_get(post.params, spec.path)).reshape(-1)
    cov = jnp.linalg.inv(h)
    sd = jnp.sqrt(jnp.diag(cov))
    # Sample means within 5 standard errors; correlations within 0.04
    # (their standard error is below 1/sqrt(n) = 0.007).
    assert np.all(np.abs(w.mean(0) - mean) < 5 * sd / np.sqrt(n)), key
    got = jnp.cov(w.T) / jnp.outer(sd, sd)
    np.testing.assert_allclose(got, cov / jnp.outer(sd, sd), atol=0.04,
                               err_msg=key)


def test_the_predictive_averages_probabilities(posterior):
  model, x, post = posterior
  if request_is_ekfac(post):
    pytest.skip("the predictive does not depend on the eigenvalues' fit")
  apply = lambda p, x: model.apply({"params": p}, x)
  map_probs = jax.nn.softmax(apply(post.params, x))
  for linearized in (False, True):
    probs = post.predictive(apply, x, jax.random.key(1), 8,
                            linearized=linearized)
    assert probs.shape == (12, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    assert not np.allclose(probs, map_probs, atol=1e-3)
  # A tight prior leaves the MAP network's probabilities.
  tight = kronjax.laplace(post.curvature, post.params, n_data=N_DATA,
                          prior_precision=1e12)
  np.testing.assert_allclose(
      tight.predictive(apply, x, jax.random.key(1), 4), map_probs, atol=1e-5)


def request_is_ekfac(post):
  e = post.curvature.factors
  return any(not np.allclose(
      post.curvature.eigenvalues[k],
      e[k].eigenvalues[0][:, None] * e[k].eigenvalues[1][None, :]) for k in e)
