"""K-FAC state: checkpoint round trips; steps skipped for non-finite input."""

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import kronjax
from _transform_helpers import (CE, kfac_state, loss_grads_blocks, mlp_apply,
                                mlp_init, run, standard_problem, toy_data)
from kronjax.linalg import Kron
from kronjax.transform import AdaptiveKfacState, KfacState, scale_by_kfac

MODES = pytest.mark.parametrize("learning_rate", [0.1, None],
                                ids=["fixed", "adaptive"])


def _checkpoint_round_trip(save_restore, learning_rate):
  tx, step, params, _, _ = standard_problem(learning_rate)
  params, state, _ = run(step, params, tx.init(params), 3)
  restored = save_restore(state, tx.init(params))
  chex.assert_trees_all_equal_structs(restored, state)
  chex.assert_trees_all_equal(restored, state)
  assert isinstance(kfac_state(restored), (KfacState, AdaptiveKfacState))
  p1, s1, l1 = run(step, params, state, 3)
  p2, s2, l2 = run(step, params, restored, 3)
  assert l1 == l2
  chex.assert_trees_all_equal(p1, p2)
  chex.assert_trees_all_equal(s1, s2)


@MODES
def test_flax_msgpack_round_trip_continues_identically(learning_rate):
  def save_restore(state, target):
    data = flax.serialization.to_bytes(state)
    return flax.serialization.from_bytes(target, data)

  _checkpoint_round_trip(save_restore, learning_rate)


@MODES
def test_orbax_round_trip_continues_identically(learning_rate, tmp_path):
  def save_restore(state, target):
    path = tmp_path / f"state_{learning_rate}"
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path, state)
      ckpt.wait_until_finished()
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      return ckpt.restore(path, abstract)

  _checkpoint_round_trip(save_restore, learning_rate)


def _poison(grads, blocks, where):
  nan = jnp.float32(jnp.nan)
  if where == "grads":
    grads = jax.tree.map(lambda g: g, grads)
    grads["Dense_1"]["kernel"] = grads["Dense_1"]["kernel"].at[0, 0].set(nan)
  elif where == "fallback_grads":
    grads = jax.tree.map(lambda g: g, grads)
    grads["Norm_0"]["scale"] = grads["Norm_0"]["scale"].at[0].set(jnp.inf)
  else:
    a, g = blocks[("Dense_0",)].factors
    blocks = {**blocks, ("Dense_0",): Kron(a.at[1, 1].set(nan), g)}
  return grads, blocks


@pytest.mark.parametrize("learning_rate,where", [
    (0.1, "grads"), (None, "fallback_grads"), (None, "factors")])
def test_non_finite_step_changes_nothing_but_the_skip_count(
    learning_rate, where):
  tx, step, params, x, y = standard_problem(learning_rate)
  params, state, losses = run(step, params, tx.init(params), 2)

  @jax.jit
  def bad_step(params, state):
    _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
    grads, blocks = _poison(grads, blocks, where)
    return tx.update(grads, state, params, curvature=blocks,
                     output_fn=lambda p: mlp_apply(p, x), targets=y)

  updates, new_state = bad_step(params, state)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  assert int(optax.tree_utils.tree_get(new_state, "skipped")) == 1
  unskipped = optax.tree_utils.tree_set(new_state, skipped=jnp.int32(0))
  chex.assert_trees_all_equal(unskipped, state)
  chex.assert_tree_all_finite(new_state)
  # Training goes on from where it was.
  params, state, more = run(step, params, new_state, 2)
  assert np.isfinite(more).all() and more[-1] < losses[0]
  assert int(kfac_state(state).count) == 4


def test_scale_by_kfac_alone_skips_non_finite_factors():
  params = mlp_init(jax.random.key(1), [4, 6, 3])
  x, y = toy_data(jax.random.key(0), n=32, d=4)
  tx = scale_by_kfac()
  _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  update = jax.jit(tx.update)
  _, state = update(grads, tx.init(params), curvature=blocks)
  grads, bad = _poison(grads, blocks, "factors")
  out, new = update(grads, state, curvature=bad)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(out))
  chex.assert_trees_all_equal(new._replace(skipped=state.skipped), state)
  assert int(new.skipped) == 1


def test_a_state_of_another_algorithm_is_refused_with_both_named():
  params = mlp_init(jax.random.key(1), [4, 6, 3])
  x, y = toy_data(jax.random.key(0), n=32, d=4)
  _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  exact, split = scale_by_kfac(exact_damping=True), scale_by_kfac()
  with pytest.raises(ValueError, match=r"holds factors for the π-split, but "
                     r"this optimizer uses exact damping"):
    exact.update(grads, split.init(params), params, curvature=blocks)
  with pytest.raises(ValueError, match=r"holds factors for exact damping, "
                     r"but this optimizer uses the π-split"):
    split.update(grads, exact.init(params), params, curvature=blocks)
  adaptive = kronjax.scale_by_adaptive_kfac(CE)
  with pytest.raises(ValueError, match=r"scale_by_kfac was given a "
                     r"AdaptiveKfacState"):
    split.update(grads, adaptive.init(params), params, curvature=blocks)
  with pytest.raises(ValueError, match=r"scale_by_adaptive_kfac was given a "
                     r"KfacState"):
    adaptive.update(grads, split.init(params), params, curvature=blocks,
                    output_fn=lambda p: mlp_apply(p, x), targets=y)


@pytest.mark.parametrize("learning_rate", [0.1, None], ids=["fixed",
                                                            "adaptive"])
def test_a_non_finite_loss_value_skips_the_step(learning_rate):
  tx, step, params, x, y = standard_problem(learning_rate)
  params, state, _ = run(step, params, tx.init(params), 2)

  @jax.jit
  def update(params, state, value):
    _, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
    return tx.update(grads, state, params, curvature=blocks, value=value,
                     output_fn=lambda p: mlp_apply(p, x), targets=y)

  updates, new_state = update(params, state, jnp.float32(jnp.nan))
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  assert int(new_state.skipped) == 1
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  updates, new_state = update(params, state, jnp.float32(1.0))
  assert int(new_state.skipped) == 0
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
