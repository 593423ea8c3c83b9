"""The adaptive step (quadratic model, Levenberg–Marquardt), the norm
constraint, and training small models to lower losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from _transform_helpers import (CE, cnn_apply, cnn_init, kfac_state,
                                loss_grads_blocks, make_kfac, mlp_apply,
                                mlp_init, run, standard_problem, toy_data,
                                train)
from kronjax import _adaptive
from _transform_helpers import kfac, scale_by_kfac
from kronjax.transform import scale_by_adaptive_kfac

F64 = dict(factor_dtype=jnp.float64, decay=0.0, inverse_every=1)
EXACT = dict(F64, exact_damping=True)


def _problem(dtype=jnp.float64):
  x, y = toy_data(jax.random.key(0), n=16, d=4, dtype=dtype)
  params = mlp_init(jax.random.key(1), [4, 5, 3], dtype=dtype)
  return params, x, y


def _dense_model(params, x, y, grads, vectors):
  """``VᵀFV``, ``VᵀV`` and ``Vᵀg`` with the dense Fisher ``JᵀΛJ / N``."""
  fisher = _dense_fisher(params, x)
  v = np.stack([ravel_pytree(u)[0] for u in vectors], axis=1)
  return (v.T @ fisher @ v, v.T @ v, v.T @ ravel_pytree(grads)[0], fisher)


@jax.jit
def _dense_fisher(params, x):
  flat, unravel = ravel_pytree(params)
  jac = jax.jacobian(lambda w: mlp_apply(unravel(w), x))(flat)  # (N, C, P)
  p = jax.nn.softmax(mlp_apply(params, x))
  lam = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)  # (N, C, C)
  return jnp.einsum("nip,nij,njq->pq", jac, lam, jac) / x.shape[0]


def _updater(tx, x, y):
  """A jitted update with every extra argument."""

  @jax.jit
  def run(params, state):
    value, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
    out, state = tx.update(grads, state, params, curvature=blocks,
                           output_fn=lambda p: mlp_apply(p, x), targets=y)
    return value, grads, blocks, out, state

  return run


def _precondition(grads, blocks, damping=1e-3):
  return _jitted_precondition(damping)(grads, blocks)


@functools.lru_cache
def _jitted_precondition(damping):
  tx = scale_by_kfac(damping=damping, **EXACT)
  return jax.jit(lambda g, b: tx.update(g, tx.init(g), curvature=b)[0])


def test_quadratic_model_step_matches_dense_fisher():
  params, x, y = _problem()
  lam = 0.05
  tx = scale_by_adaptive_kfac(CE, damping=lam, damping_adaptation_interval=0,
                              **EXACT)
  state, update = tx.init(params), _updater(tx, x, y)
  # Step 1: no previous step, so only α (the singular 2×2 system is guarded).
  _, grads, blocks, out, state = update(params, state)
  delta = jax.tree.map(jnp.negative, _precondition(grads, blocks, damping=lam))
  f, gram, b, _ = _dense_model(params, x, y, grads, [delta])
  alpha = -b[0] / (f[0, 0] + lam * gram[0, 0])
  np.testing.assert_allclose(kfac_state(state).coefficients, [alpha, 0.0],
                             rtol=1e-9)
  assert alpha > 0
  # Step 2: α and μ from the full 2×2 model.
  params = optax.apply_updates(params, jax.tree.map(jnp.negative, out))
  prev = kfac_state(state).prev_step
  _, grads, blocks, out, state = update(params, state)
  delta = jax.tree.map(jnp.negative, _precondition(grads, blocks, damping=lam))
  f, gram, b, _ = _dense_model(params, x, y, grads, [delta, prev])
  c = f + lam * gram
  w = -np.linalg.solve(c, b)
  if not 0 <= w[1] <= _adaptive.MOMENTUM_MAX:  # the minimiser on the strip
    mu = np.clip(w[1], 0, _adaptive.MOMENTUM_MAX)
    w = np.array([-(b[0] + c[0, 1] * mu) / c[0, 0], mu])
  np.testing.assert_allclose(kfac_state(state).coefficients, w, rtol=1e-8)
  expected = jax.tree.map(lambda d, m: -(w[0] * d + w[1] * m), delta, prev)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-8,
                                                       atol=1e-12),
               out, expected)


def test_levenberg_marquardt_uses_the_undamped_model_ratio():
  params, x, y = _problem()
  lam, interval = 0.05, 1
  tx = scale_by_adaptive_kfac(CE, damping=lam,
                              damping_adaptation_interval=interval, **EXACT)
  value, grads, _, out, state = _updater(tx, x, y)(params, tx.init(params))
  step = jax.tree.map(jnp.negative, out)
  _, _, b, fisher = _dense_model(params, x, y, grads, [step])
  d = ravel_pytree(step)[0]
  predicted = b[0] + 0.5 * d @ fisher @ d
  new_loss = CE(mlp_apply(optax.apply_updates(params, step), x), y)
  rho = (new_loss - value) / predicted
  omega = (19 / 20) ** interval
  expected = lam / omega if rho < 0.25 else lam * omega if rho > 0.75 else lam
  np.testing.assert_allclose(kfac_state(state).damping, expected, rtol=1e-12)


@pytest.mark.parametrize("rho,factor", [(0.1, 1 / 0.95), (0.9, 0.95),
                                        (0.5, 1.0), (np.nan, 1 / 0.95)])
def test_levenberg_marquardt_rule(rho, factor):
  new = _adaptive.levenberg_marquardt(jnp.asarray(1.0), jnp.asarray(rho), 1,
                                       (1e-8, 1e3))
  np.testing.assert_allclose(new, factor, rtol=1e-12)
  capped = _adaptive.levenberg_marquardt(jnp.asarray(1e3), jnp.asarray(0.0),
                                          1, (1e-8, 1e3))
  assert float(capped) == 1e3


def test_norm_constraint_fixed_step():
  params, x, y = _problem()
  _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  precond = _precondition(grads, blocks)
  sq = sum(jnp.vdot(p, g) for p, g in zip(jax.tree.leaves(precond),
                                          jax.tree.leaves(grads)))
  lr, c = 0.5, float(0.25 * 0.25 * sq * 0.1)  # active: scale sqrt(0.4)
  tx = scale_by_kfac(1e-3, norm_constraint=c, learning_rate=lr, **EXACT)
  out, state = jax.jit(tx.update)(grads, tx.init(params), curvature=blocks)
  scale = np.sqrt(c / (lr * lr * sq))
  jax.tree.map(lambda o, p: np.testing.assert_allclose(o, scale * p,
                                                       rtol=1e-10),
               out, precond)
  # Inactive for a large bound.
  tx = scale_by_kfac(1e-3, norm_constraint=1e9, learning_rate=lr, **EXACT)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), curvature=blocks)
  jax.tree.map(lambda o, p: np.testing.assert_allclose(o, p, rtol=1e-12),
               out, precond)


def test_norm_constraint_adaptive_bounds_the_fisher_norm():
  params, x, y = _problem()
  c = 1e-4
  tx = scale_by_adaptive_kfac(CE, damping=0.05, norm_constraint=c, **F64)
  _, grads, _, out, _ = _updater(tx, x, y)(params, tx.init(params))
  _, _, _, fisher = _dense_model(params, x, y, grads, [out])
  d = ravel_pytree(out)[0]
  np.testing.assert_allclose(d @ fisher @ d, c, rtol=1e-8)


def test_alias_learning_rate_schedule_is_evaluated_at_the_kfac_count():
  params, x, y = _problem()
  schedule = lambda count: 0.1 / (1.0 + count)
  tx = kfac(schedule, fallback=optax.sgd(0.0), **F64)
  inner = scale_by_kfac(exact_damping=False, **F64)  # the alias's default
  state, inner_state = tx.init(params), inner.init(params)
  update, inner_update = jax.jit(tx.update), jax.jit(inner.update)
  for step in range(3):
    _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
    out, state = update(grads, state, params, curvature=blocks)
    ref, inner_state = inner_update(grads, inner_state, curvature=blocks)
    lr = schedule(step)
    jax.tree.map(lambda o, r, lr=lr: np.testing.assert_allclose(
        o, -lr * r, rtol=1e-12), out, ref)
    params = optax.apply_updates(params, out)


# Training: jit, float32 ----------------------------------------------------


@pytest.mark.parametrize("learning_rate", [0.3, None],
                         ids=["fixed", "adaptive"])
def test_mlp_with_fallback_parameters_trains(learning_rate):
  tx, step, params, _, _ = standard_problem(learning_rate)  # Norm_0 → Adam
  new, state, losses = run(step, params, tx.init(params), 20)
  assert new["Dense_0"]["kernel"].dtype == jnp.float32
  assert losses[-1] < 0.6 * losses[0]
  assert not np.allclose(new["Norm_0"]["scale"], 1.0)  # Adam moved it
  assert int(optax.tree_utils.tree_get(state, "skipped")) == 0


@pytest.mark.parametrize("learning_rate", [0.2, None],
                         ids=["fixed", "adaptive"])
def test_cnn_trains(learning_rate):
  key = jax.random.key(2)
  x = jax.random.normal(key, (64, 6, 6, 1), jnp.float32)
  y = (jnp.mean(x[:, :3], axis=(1, 2, 3)) > 0).astype(jnp.int32)
  params = cnn_init(jax.random.key(3), classes=2)
  tx = make_kfac(learning_rate, inverse_every=2)
  _, _, losses = train(tx, cnn_apply, params, x, y, 20)
  assert losses[-1] < 0.6 * losses[0]


def test_adaptive_beats_tuned_first_order_steps_on_mlp():
  tx, step, params, x, y = standard_problem(None)
  _, _, adaptive = run(step, params, tx.init(params), 20)
  _, _, adam = train(optax.adam(0.05), mlp_apply, params, x, y, 20)
  assert adaptive[-1] < 0.5 * adam[-1]


def test_no_predicted_change_leaves_the_damping_alone():
  # Zero gradients: the step is zero and so are the actual and predicted
  # changes of the loss; ρ = 0/0 must not count as a bad step.
  params, x, y = _problem()
  tx = scale_by_adaptive_kfac(CE, damping=0.05, damping_adaptation_interval=1,
                              **F64)
  _, _, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, state = jax.jit(lambda s: tx.update(
      zeros, s, params, curvature=blocks, targets=y,
      output_fn=lambda p: mlp_apply(p, x)))(tx.init(params))
  assert int(state.skipped) == 0
  assert float(kfac_state(state).damping) == 0.05
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(out))
