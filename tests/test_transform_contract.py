"""The optax contract (as in optax/contrib/_common_test.py) for K-FAC."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _transform_helpers import (CE, kfac_state, loss_grads_blocks, make_kfac,
                                make_step, mlp_apply, mlp_init, run,
                                standard_problem, toy_data, train)
from kronjax.linalg import Kron
from _transform_helpers import kfac, scale_by_kfac

MODES = pytest.mark.parametrize("learning_rate", [0.3, None],
                                ids=["fixed", "adaptive"])


def _setup(dtype=jnp.float32):
  x, y = toy_data(jax.random.key(0), n=32, d=4, dtype=dtype)
  return mlp_init(jax.random.key(1), [4, 6, 3], dtype=dtype, norm=True), x, y


def _kfac(learning_rate, **kwargs):
  return make_kfac(learning_rate, **kwargs)


@MODES
def test_ignores_unexpected_extra_args(learning_rate):
  params, x, y = _setup()
  tx = _kfac(learning_rate)
  _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  jax.jit(lambda g, s, p, b: tx.update(
      g, s, p, curvature=b, output_fn=lambda q: mlp_apply(q, x), targets=y,
      unexpected_extra_args_your_optimizer_doesnt_expect=1))(
          grads, tx.init(params), params, blocks)


@MODES
def test_no_retrace_on_later_calls(learning_rate):
  params, x, y = _setup()
  tx = _kfac(learning_rate, inverse_every=2)
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(make_step(tx, mlp_apply, x, y), n=1))
  state = tx.init(params)
  for _ in range(3):  # crosses an eigendecomposition refresh
    params, state, _ = step(params, state)


@MODES
def test_state_shapes_and_dtypes_are_stable(learning_rate):
  tx, step, params, _, _ = standard_problem(learning_rate)
  state = tx.init(params)
  _, new, _ = jax.eval_shape(step, params, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(new, state)


@MODES
def test_converges_inside_lax_scan_like_a_python_loop(learning_rate):
  tx, step, params, _, _ = standard_problem(learning_rate)

  def body(carry, _):
    p, s, value = step(*carry)
    return (p, s), value

  (_, state), losses = jax.jit(lambda c: jax.lax.scan(body, c, length=8))(
      (params, tx.init(params)))
  assert losses[-1] < 0.8 * losses[0]
  _, _, loop_losses = run(step, params, tx.init(params), 8)
  np.testing.assert_allclose(losses, loop_losses, rtol=1e-4)
  assert int(kfac_state(state).count) == 8


@MODES
def test_inject_hyperparams_gives_the_same_result(learning_rate):
  tx, step, params, x, y = standard_problem(learning_rate)
  # A loss is callable, so inject_hyperparams takes it for a schedule: a
  # kronjax loss called on the step count is its own constant schedule.
  injected = optax.inject_hyperparams(kfac)(
      learning_rate=learning_rate, damping=1e-2, inverse_every=2,
      loss=None if learning_rate else CE)
  p1, _, l1 = run(step, params, tx.init(params), 3)
  p2, s2, l2 = train(injected, mlp_apply, params, x, y, 3)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-7)
  assert float(s2.hyperparams["damping"]) == pytest.approx(1e-2)


@MODES
def test_bfloat16_params_stay_bfloat16_with_float32_factors(learning_rate):
  params, x, y = _setup(jnp.bfloat16)
  tx = _kfac(learning_rate)
  _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  updates, state = jax.jit(lambda g, s, p, b: tx.update(
      g, s, p, curvature=b, output_fn=lambda q: mlp_apply(q, x), targets=y))(
          grads, tx.init(params), params, blocks)
  chex.assert_trees_all_equal_dtypes(updates, params)
  new_params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal_dtypes(new_params, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  factors = jax.tree.leaves(kfac_state(state).factors)
  assert {f.dtype for f in factors} == {jnp.dtype(jnp.float32)}


def test_chains_with_clipping_weight_decay_schedules_and_momentum():
  params, x, y = _setup()
  params = {k: v for k, v in params.items() if k != "Norm_0"}
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      # Exact damping follows the damping schedule every step (the π-split's
      # inverses keep the damping of their refresh).
      scale_by_kfac(damping=optax.linear_schedule(0.1, 0.01, 10),
                    exact_damping=True),
      optax.add_decayed_weights(1e-4),
      optax.sgd(optax.cosine_decay_schedule(0.1, 20), momentum=0.9))
  _, _, losses = train(tx, mlp_apply, params, x, y, 12)
  assert losses[-1] < 0.8 * losses[0]


def test_multi_steps_uses_the_blocks_of_the_emitting_call():
  # MultiSteps accumulates gradients, not extra arguments: it calls the inner
  # update on every mini-step with that call's extra arguments, and keeps the
  # state only when it emits. So pass the running mean of the blocks: the
  # emitting call then equals one step on the mean gradient and mean blocks.
  params, x, y = _setup(jnp.float64)
  halves = [(x[:16], y[:16]), (x[16:], y[16:])]
  grads, blocks = zip(*[loss_grads_blocks(mlp_apply, params, xi, yi)[1:]
                        for xi, yi in halves])
  mean = lambda *t: jax.tree.map(lambda *z: sum(z) / len(z), *t)
  tx = scale_by_kfac(decay=0.5, factor_dtype=jnp.float64)
  multi = optax.MultiSteps(tx, every_k_schedule=2,
                           accumulator_dtype=jnp.float64)
  state, update = multi.init(params), jax.jit(multi.update)
  u1, state = update(grads[0], state, params, curvature=blocks[0])
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(u1))
  assert float(kfac_state(state.inner_opt_state).factors["Dense_0"].weight) == 0
  u2, state = update(grads[1], state, params, curvature=mean(*blocks))
  ref, ref_state = jax.jit(tx.update)(mean(*grads), tx.init(params), params,
                                      curvature=mean(*blocks))
  chex.assert_trees_all_close(u2, ref, rtol=1e-10)
  chex.assert_trees_all_close(state.inner_opt_state, ref_state, rtol=1e-10)


def test_alias_runs_under_multi_steps_and_jit():
  params, x, y = _setup()
  tx = optax.MultiSteps(_kfac(None), every_k_schedule=2)
  _, state, losses = train(tx, mlp_apply, params, x, y, 6)
  assert int(state.gradient_step) == 3
  assert losses[-1] < losses[0]


def test_curvature_keys_may_be_strings():
  params, x, y = _setup()
  _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  tx = scale_by_kfac()
  update = jax.jit(tx.update)
  ref, _ = update(grads, tx.init(params), curvature=blocks)
  named = {"/".join(k): v for k, v in blocks.items()}
  out, _ = update(grads, tx.init(params), curvature=named)
  chex.assert_trees_all_equal(out, ref)
  assert isinstance(blocks[("Dense_0",)], Kron)
