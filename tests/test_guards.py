"""Every user path guarded: sane adaptive coefficients, rejected steps, the
default trust region, non-finite losses, the tape's batch model, NNX
BatchNorm/Dropout, ``optax.inject_hyperparams`` and errors that say what to do.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kronjax
from _transform_helpers import CE, kfac_state, loss_grads_blocks, mlp_apply, \
    mlp_init, toy_data
from kronjax import _adaptive, losses
from kronjax.transform import NORM_CONSTRAINT

F64 = jnp.float64


def _model(fisher, gram, grad):
  return _adaptive.QuadraticModel(jnp.asarray(fisher, F64),
                                  jnp.asarray(gram, F64),
                                  jnp.asarray(grad, F64), jnp.asarray(0.0, F64))


@pytest.mark.parametrize("grad", [[-1.0, 3.0], [-1.0, -0.2], [-1.0, 0.9],
                                  [-2.0, -5.0]])
def test_coefficients_minimise_the_model_over_the_momentum_strip(grad):
  """(α, μ) is the minimiser of q over α free, μ in [0, MOMENTUM_MAX]."""
  fisher, gram = [[2.0, 1.2], [1.2, 1.0]], [[1.0, 0.3], [0.3, 1.0]]
  lam = 0.1
  w = np.asarray(_adaptive.solve(_model(fisher, gram, grad), lam))
  c = np.asarray(fisher) + lam * np.asarray(gram)
  q = lambda a, m: np.dot(grad, [a, m]) + 0.5 * np.array([a, m]) @ c @ [a, m]
  mus = np.linspace(0, _adaptive.MOMENTUM_MAX, 20001)
  alphas = -(grad[0] + c[0, 1] * mus) / c[0, 0]
  values = [q(a, m) for a, m in zip(alphas, mus)]
  best = int(np.argmin(values))
  assert 0 <= w[1] <= _adaptive.MOMENTUM_MAX and w[0] > 0
  np.testing.assert_allclose(w, [alphas[best], mus[best]], atol=1e-3)
  assert q(*w) <= values[best] + 1e-12


def test_a_step_is_none_when_the_direction_does_not_descend():
  w = _adaptive.solve(_model([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]],
                             [1.0, 0.0]), 0.1)  # gᵀΔ > 0: α would be negative
  np.testing.assert_array_equal(w, [0.0, 0.0])


def _problem():
  x, y = toy_data(jax.random.key(0), n=32, d=4)
  return mlp_init(jax.random.key(1), [4, 8, 3]), x, y


def _adaptive_update(tx, params, x, y, output_fn):
  value, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  return tx.update(grads, tx.init(params), params, curvature=blocks,
                   output_fn=output_fn, targets=y)


@pytest.mark.parametrize("after", ["nan", "worse"])
def test_a_step_that_raises_the_loss_is_rejected_with_the_damping_raised(after):
  params, x, y = _problem()
  start = jax.tree.leaves(params)[0]

  def output_fn(p):  # the true model, but broken once the params move
    moved = jnp.any(jax.tree.leaves(p)[0] != start)
    bad = jnp.nan if after == "nan" else 50.0
    return mlp_apply(p, x) - jnp.where(moved, bad, 0.0) * jax.nn.one_hot(y, 3)

  tx = kronjax.scale_by_adaptive_kfac(CE, damping=1e-2)
  out, state = jax.jit(lambda p: _adaptive_update(tx, p, x, y, output_fn))(
      params)
  inner = kfac_state(state)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(out))
  np.testing.assert_allclose(inner.damping, 1e-2 * _adaptive.BOOST, rtol=1e-6)
  assert all(float(jnp.abs(d).max()) == 0
             for d in jax.tree.leaves(inner.prev_step))
  assert int(inner.count) == 1 and int(state.skipped) == 0  # not a NaN input
  assert float(inner.factors["Dense_0"].weight) > 0  # the curvature was kept


def test_a_step_that_lowers_the_loss_is_taken():
  params, x, y = _problem()
  tx = kronjax.scale_by_adaptive_kfac(CE, damping=1e-2)
  out, state = _adaptive_update(tx, params, x, y, lambda p: mlp_apply(p, x))
  assert float(optax.tree.norm(out)) > 0
  assert float(kfac_state(state).damping) <= 1e-2


def test_fixed_steps_default_to_a_trust_region():
  """η²s²⟨P, g⟩ = c by default, for kfac(learning_rate) and scale_by_kfac()."""
  params, x, y = _problem()
  _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  unbounded = kronjax.scale_by_kfac(norm_constraint=None)
  p, _ = unbounded.update(grads, unbounded.init(params), params,
                          curvature=blocks)
  pg = float(optax.tree.vdot(p, grads))
  assert pg > 10 * NORM_CONSTRAINT  # the bound binds
  for tx in [kronjax.kfac(learning_rate=3.0), kronjax.scale_by_kfac()]:
    out, _ = tx.update(grads, tx.init(params), params, curvature=blocks)
    out_g = float(optax.tree.vdot(out, grads))  # ∓η s <P, g>
    np.testing.assert_allclose(out_g**2 / pg, NORM_CONSTRAINT, rtol=1e-4)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


def _linen():
  x, y = toy_data(jax.random.key(0), n=32, d=4)
  model = MLP()
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, x, y, kronjax.flax.value_grad_and_tape(model, CE)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_a_non_finite_loss_skips_the_step(mode):
  model, params, x, y, step = _linen()
  tx = (kronjax.kfac(learning_rate=0.1) if mode == "fixed"
        else kronjax.kfac(loss=CE))

  @jax.jit
  def train(params, state, y):
    value, grads, tape = step(params, x, y, jax.random.key(0))
    updates, state = tx.update(grads, state, params, curvature=tape)
    return value, optax.apply_updates(params, updates), state

  state = tx.init(params)
  bad = y.at[0].set(7)  # out of range inside jit: a NaN loss, finite grads
  value, new, new_state = train(params, state, bad)
  assert not np.isfinite(float(value))
  jax.tree.map(np.testing.assert_array_equal, new, params)
  assert int(new_state.skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.inner_state,
               state.inner_state)
  _, moved, _ = train(params, state, y)
  assert float(optax.tree.norm(optax.tree.sub(moved, params))) > 0


def test_the_tape_carries_the_batch_model_for_the_adaptive_step():
  model, params, x, y, step = _linen()
  tx = kronjax.kfac(loss=CE)
  value, grads, tape = step(params, x, y, jax.random.key(0))
  assert isinstance(tape, kronjax.Tape) and tape.value == value
  blocks = kronjax.fisher_blocks(tape)
  assert type(blocks) is dict  # blocks of batches of any size average
  state = tx.init(params)
  given, _ = tx.update(grads, state, params, curvature=blocks, targets=y,
                       output_fn=lambda p: model.apply({"params": p}, x))
  update = jax.jit(lambda g, t: tx.update(g, state, params, curvature=t))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, update(grads, tape)[0], given)
  # Crossing jit, the batch is data: another batch reuses the trace, not x.
  x2, y2 = toy_data(jax.random.key(5), n=32, d=4)
  _, grads2, tape2 = step(params, x2, y2, jax.random.key(0))
  jax.tree.map(close, update(grads2, tape2)[0],
               tx.update(grads2, state, params, curvature=tape2)[0])
  assert update._cache_size() == 1
  with pytest.raises(ValueError, match="curvature=tape"):
    tx.update(grads, state, params, curvature=blocks)  # blocks: no model


class BNNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(4 * 8 * 8, 10, rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.norm(self.conv(x))))
    return self.out(h.reshape(h.shape[0], -1))


def test_nnx_batchnorm_and_dropout_train_in_adaptive_mode():
  from sklearn.datasets import load_digits
  digits = load_digits()
  x = jnp.asarray(digits.images[:256, :, :, None] / 16, jnp.float32)
  y = jnp.asarray(digits.target[:256])
  model = BNNet(nnx.Rngs(0))
  step = kronjax.flax.value_grad_and_tape(model, CE)
  optimizer = nnx.Optimizer(model, kronjax.kfac(loss=CE), wrt=nnx.Param)

  @nnx.jit
  def train(model, optimizer, x, y, rng):
    value, grads, tape = step(model, x, y, rng)
    optimizer.update(model, grads, curvature=tape)
    return value

  values = [float(train(model, optimizer, x[i % 4 * 64:][:64],
                        y[i % 4 * 64:][:64], jax.random.key(i)))
            for i in range(12)]
  assert np.all(np.isfinite(values)) and values[-1] < 0.5 * values[0]
  assert float(jnp.abs(model.norm.mean[...]).max()) > 0  # statistics moved

  @nnx.jit
  def hand_written(model, optimizer, x, y):  # merges the outer BatchStats
    _, grads, tape = step(model, x, y, jax.random.key(0))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    optimizer.update(model, grads, curvature=kronjax.fisher_blocks(tape),
                     output_fn=lambda p: nnx.merge(graphdef, p, rest)(x),
                     targets=y)

  with pytest.raises(ValueError, match="copy=True"):
    hand_written(model, optimizer, x[:64], y[:64])


@pytest.mark.parametrize("kwargs", [
    dict(loss=CE), dict(loss=CE, damping=1e-2),
    dict(learning_rate=optax.linear_schedule(0.3, 0.03, 10))])
def test_inject_hyperparams_needs_no_static_args(kwargs):
  model, params, x, y, step = _linen()
  tx = optax.inject_hyperparams(kronjax.kfac)(**kwargs)
  state = tx.init(params)

  @jax.jit
  def train(params, state, rng):
    value, grads, tape = step(params, x, y, rng)
    updates, state = tx.update(grads, state, params, curvature=tape)
    return optax.apply_updates(params, updates), state, value

  values = []
  for i in range(8):
    params, state, value = train(params, state, jax.random.key(i))
    values.append(float(value))
  assert values[-1] < values[0] and np.all(np.isfinite(values))
  assert state.hyperparams.get("loss", CE) is CE


def test_wrong_inputs_get_errors_that_say_what_to_pass():
  model, params, x, y, step = _linen()
  optax_loss = optax.losses.softmax_cross_entropy_with_integer_labels
  with pytest.raises(TypeError, match="kronjax.losses.softmax_cross_entropy"):
    kronjax.kfac(loss=optax_loss)
  with pytest.raises(TypeError, match="kronjax.losses"):
    kronjax.flax.value_grad_and_tape(model, optax_loss)
  _, grads, tape = step(params, x, y, jax.random.key(0))
  tx = kronjax.kfac(learning_rate=0.1)
  state = tx.init(params)
  with pytest.raises(ValueError, match="not the gradients"):
    tx.update(grads, state, params, curvature=grads)
  with pytest.raises(TypeError, match="curvature=tape"):
    tx.update(grads, state, params, tape)
  with pytest.raises(ValueError, match="curvature="):
    kronjax.kfac(loss=CE).update(grads, kronjax.kfac(loss=CE).init(params),
                                 params, curvature=dict(tape))
  with pytest.raises(TypeError, match="targets"):
    losses.softmax_cross_entropy(jnp.zeros((2, 3)))
