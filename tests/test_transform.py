"""scale_by_kfac preconditions as the dense (A ⊗ G + λI)⁻¹ g does (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _transform_helpers import (CE, dense_solve, kfac, kfac_state, random_spd,
                                scale_by_kfac)
from kronjax.linalg import Kron
from kronjax.transform import KfacState

F64 = dict(factor_dtype=jnp.float64)


def _layer(rng, kernel_shape, bias_shape):
  layer = {"kernel": jnp.asarray(rng.normal(size=kernel_shape))}
  if bias_shape is not None:
    layer["bias"] = jnp.asarray(rng.normal(size=bias_shape))
  return layer


def _matrix(layer, d_out):
  rows = [np.asarray(layer["kernel"]).reshape(-1, d_out)]
  if "bias" in layer:
    rows.append(np.asarray(layer["bias"]).reshape(1, d_out))
  return np.concatenate(rows)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "pi_split"])
@pytest.mark.parametrize("kernel_shape,bias_shape", [
    ((4, 3), (3,)),  # dense
    ((4, 3), None),  # dense without bias
    ((2, 2, 3, 5), (5,)),  # convolution (kh, kw, c_in, c_out)
    ((4, 2, 3), (2, 3)),  # DenseGeneral, features (2, 3)
], ids=["dense", "no_bias", "conv", "dense_general"])
def test_dense_like_layers_match_dense_solve(kernel_shape, bias_shape, exact):
  rng = np.random.default_rng(0)
  d_out = math.prod(bias_shape) if bias_shape else kernel_shape[-1]
  d_a = math.prod(kernel_shape) // d_out + (bias_shape is not None)
  params = {"Encoder_0": {"Dense_1": _layer(rng, kernel_shape, bias_shape)}}
  grads = {"Encoder_0": {"Dense_1": _layer(rng, kernel_shape, bias_shape)}}
  a, g = random_spd(rng, d_a), random_spd(rng, d_out, 3.0)
  tx = scale_by_kfac(damping=0.1, decay=0.0, exact_damping=exact, **F64)
  out, _ = tx.update(grads, tx.init(params), params,
                     curvature={("Encoder_0", "Dense_1"): Kron(a, g)})
  layer = out["Encoder_0"]["Dense_1"]
  expected = dense_solve(a, g, _matrix(grads["Encoder_0"]["Dense_1"], d_out),
                         0.1, exact)
  np.testing.assert_allclose(_matrix(layer, d_out), expected, rtol=1e-10,
                             atol=1e-12)
  assert layer["kernel"].shape == kernel_shape


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "pi_split"])
def test_embedding_has_a_diagonal_input_factor(exact):
  rng = np.random.default_rng(1)
  params = {"Embed_0": {"embedding": jnp.asarray(rng.normal(size=(6, 4)))}}
  grads = {"Embed_0": {"embedding": jnp.asarray(rng.normal(size=(6, 4)))}}
  a = rng.uniform(size=6) * np.array([1, 1, 0, 1, 1, 1])  # an unseen token
  g = random_spd(rng, 4)
  tx = scale_by_kfac(damping=0.05, decay=0.0, exact_damping=exact, **F64)
  state = tx.init(params)
  a_factor = kfac_state(state).factors["Embed_0"].a
  assert all(x.shape == (6,) for x in a_factor)  # diagonal: vectors only
  out, _ = tx.update(grads, state, params,
                     curvature={("Embed_0",): Kron(jnp.asarray(a), g)})
  np.testing.assert_allclose(
      out["Embed_0"]["embedding"],
      dense_solve(a, g, grads["Embed_0"]["embedding"], 0.05, exact),
      rtol=1e-10, atol=1e-12)


def _two_layer_problem(seed=2):
  rng = np.random.default_rng(seed)
  params = {"a": _layer(rng, (3, 2), (2,)), "b": _layer(rng, (2, 2), None),
            "norm": {"scale": jnp.ones(2)}}
  return rng, params


def _blocks(rng):
  return {("a",): Kron(random_spd(rng, 4), random_spd(rng, 2)),
          ("b",): Kron(random_spd(rng, 2), random_spd(rng, 2))}


def test_bias_corrected_moving_average_over_three_steps():
  rng, params = _two_layer_problem()
  decay, damping = 0.5, 0.1
  tx = jax.jit(scale_by_kfac(damping=damping, decay=decay, inverse_every=1,
                             exact_damping=True, **F64).update)
  state = scale_by_kfac(exact_damping=True, **F64).init(params)
  acc_a = acc_g = weight = 0.0
  for _ in range(3):
    blocks = _blocks(rng)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)),
                         params)
    out, state = tx(grads, state, params, curvature=blocks)
    a, g = blocks[("a",)].factors
    acc_a = decay * acc_a + (1 - decay) * np.asarray(a)
    acc_g = decay * acc_g + (1 - decay) * np.asarray(g)
    weight = decay * weight + (1 - decay)
  assert weight == pytest.approx(1 - decay ** 3)
  np.testing.assert_allclose(
      _matrix(out["a"], 2),
      dense_solve(acc_a / weight, acc_g / weight, _matrix(grads["a"], 2),
                  damping), rtol=1e-10)
  # Uncovered parameters pass through unchanged.
  np.testing.assert_array_equal(out["norm"]["scale"], grads["norm"]["scale"])
  assert int(kfac_state(state).count) == 3


def test_stale_eigenbases_between_refreshes_with_current_damping():
  rng, params = _two_layer_problem(3)
  schedule = lambda count: 0.1 * (count + 1)  # damping changes every step
  tx = scale_by_kfac(damping=schedule, decay=0.0, inverse_every=3,
                     exact_damping=True, **F64)
  update = jax.jit(tx.update)
  state = tx.init(params)
  history = []
  for step in range(4):
    blocks = _blocks(rng)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)),
                         params)
    out, state = update(grads, state, params, curvature=blocks)
    history.append(blocks)
    # Eigenbases from steps 0, 0, 0, 3: the block of the last refresh.
    used = history[0 if step < 3 else 3][("a",)].factors
    np.testing.assert_allclose(
        _matrix(out["a"], 2),
        dense_solve(*used, _matrix(grads["a"], 2), schedule(step)),
        rtol=1e-9)
    # The moving average itself follows every block (decay=0: the latest).
    np.testing.assert_allclose(kfac_state(state).factors["a"].a.ema,
                               blocks[("a",)].factors[0])


def test_factor_every_ignores_blocks_in_between():
  rng, params = _two_layer_problem(4)
  tx = scale_by_kfac(decay=0.5, factor_every=2, **F64)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, s1 = tx.update(grads, state, params, curvature=_blocks(rng))
  _, s2 = tx.update(grads, s1, params, curvature=_blocks(rng))
  _, s3 = tx.update(grads, s2, params, curvature=_blocks(rng))
  chex_equal = lambda x, y: jax.tree.map(np.testing.assert_array_equal, x, y)
  chex_equal(kfac_state(s2).factors, kfac_state(s1).factors)
  # updated at steps 0 and 2
  assert float(kfac_state(s3).factors["a"].weight) == 0.75


def test_layers_without_blocks_keep_their_factors_and_gradients():
  rng, params = _two_layer_problem(5)
  tx = scale_by_kfac(**F64)
  state = tx.init(params)
  assert set(kfac_state(state).factors) == {"a", "b"}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
  blocks = {("a",): _blocks(rng)[("a",)]}
  out, new = tx.update(grads, state, params, curvature=blocks)
  jax.tree.map(np.testing.assert_array_equal, out["b"], grads["b"])
  jax.tree.map(np.testing.assert_array_equal, kfac_state(new).factors["b"],
               kfac_state(state).factors["b"])
  assert not np.allclose(out["a"]["kernel"], grads["a"]["kernel"])


def test_dead_layer_gives_finite_updates():
  # All-zero inputs: A = 0 (and G = 0); damping keeps every solve finite.
  _, params = _two_layer_problem(6)
  zero = {("a",): Kron(jnp.zeros((4, 4)), jnp.zeros((2, 2))),
          ("b",): Kron(jnp.zeros((2, 2)), jnp.ones((2, 2)))}
  grads = jax.tree.map(jnp.ones_like, params)
  for exact in (True, False):
    tx = scale_by_kfac(damping=0.01, exact_damping=exact)
    out, state = tx.update(grads, tx.init(params), params, curvature=zero)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
    np.testing.assert_allclose(out["a"]["kernel"], 100.0, rtol=1e-5)


# Bad input ------------------------------------------------------------------


def test_missing_curvature_says_what_to_pass():
  _, params = _two_layer_problem()
  tx = scale_by_kfac()
  with pytest.raises(ValueError, match=r"curvature=kronjax\.fisher_blocks"):
    tx.update(params, tx.init(params), params)


def test_block_for_unknown_layer_names_it_and_the_known_ones():
  rng, params = _two_layer_problem()
  tx = scale_by_kfac()
  blocks = {("Decoder", "Dense_9"): _blocks(rng)[("a",)]}
  with pytest.raises(ValueError, match=r"\('Decoder', 'Dense_9'\).*\('a',\)"):
    tx.update(params, tx.init(params), params, curvature=blocks)


def test_block_with_wrong_shapes_names_layer_and_both_shapes():
  rng, params = _two_layer_problem()
  tx = scale_by_kfac()
  blocks = {("a",): Kron(random_spd(rng, 3), random_spd(rng, 2))}
  message = r"\('a',\).*A \(3, 3\).*kernel \(3, 2\).*A \(4, 4\)"
  with pytest.raises(ValueError, match=message):
    tx.update(params, tx.init(params), params, curvature=blocks)


def test_adaptive_without_output_fn_or_targets_says_what_to_pass():
  rng, params = _two_layer_problem()
  tx = kfac(loss=CE)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"output_fn=.*targets="):
    tx.update(params, state, params, curvature=_blocks(rng),
              output_fn=lambda p: p)


def test_constructor_errors():
  with pytest.raises(ValueError, match="learning_rate.*loss"):
    kfac()
  with pytest.raises(ValueError, match="not both"):
    kfac(0.1, loss=CE)
  with pytest.raises(TypeError, match="kronjax.losses"):
    kfac(loss=lambda outputs, targets: 0.0)
  with pytest.raises(ValueError, match="initial value as damping="):
    kfac(loss=CE, damping=lambda count: 0.1)
  with pytest.raises(ValueError, match="inverse_every"):
    scale_by_kfac(inverse_every=0)


def test_state_is_a_namedtuple_with_string_keys():
  _, params = _two_layer_problem()
  state = kfac(learning_rate=0.1).init(params)
  (kstate,) = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, KfacState))
               if isinstance(s, KfacState)]
  assert sorted(kstate.factors) == ["a", "b"]
  assert kstate.count.dtype == jnp.int32 and kstate.curvature_due.shape == ()
  # Users can read K-FAC's fields out of the alias's nested state.
  assert int(optax.tree_utils.tree_get(state, "skipped")) == 0
