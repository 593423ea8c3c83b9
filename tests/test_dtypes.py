"""Half-precision factors (bfloat16, float16) and bfloat16 params.

Factors may be stored in half precision; their decompositions and the solve
run in at least float32 (LAPACK has no half precision), so an update is the
float32-factor one up to the storage's round-off.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _transform_helpers import CE, kfac_state, random_spd, toy_data

import kronjax
from kronjax._factors import compute_dtype
from kronjax.linalg import Kron

HALF = ["bfloat16", "float16"]
RELATIVE_ERROR = {"bfloat16": 2e-2, "float16": 2e-3}  # ~ a few ulps


def _problem(seed=0):
  """float32 params and grads of a dense layer and an embedding, and three
  steps' blocks (the embedding's input factor is diagonal)."""
  rng = np.random.default_rng(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  params = {"Dense_0": {"kernel": f32(rng.normal(size=(4, 3))),
                        "bias": f32(rng.normal(size=(3,)))},
            "Embed_0": {"embedding": f32(rng.normal(size=(6, 4)))}}
  grads = jax.tree.map(lambda p: f32(rng.normal(size=p.shape)), params)
  curvatures = [{
      ("Dense_0",): Kron(f32(random_spd(rng, 5)), f32(random_spd(rng, 3, 3.))),
      ("Embed_0",): Kron(f32(rng.uniform(size=6)), f32(random_spd(rng, 4)))}
                for _ in range(3)]
  return params, grads, curvatures


def _last_update(factor_dtype, exact):
  params, grads, curvatures = _problem()
  tx = kronjax.scale_by_kfac(damping=0.1, inverse_every=2, norm_constraint=None,
                             exact_damping=exact, factor_dtype=factor_dtype)
  state = tx.init(params)
  for curvature in curvatures:  # refreshed at steps 0 and 2
    updates, state = tx.update(grads, state, params, curvature=curvature)
  return updates, kfac_state(state).factors


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "pi_split"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_factors_are_stored_half_and_precondition_as_float32(dtype,
                                                                  exact):
  updates, factors = _last_update(dtype, exact)
  expected, _ = _last_update(jnp.float32, exact)
  stored = {x.dtype for x in jax.tree.leaves(factors)}
  assert stored == {jnp.dtype(dtype)}  # averages, eigenbases or inverses
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    assert got.dtype == jnp.float32  # the params' dtype
    error = jnp.linalg.norm(got - want) / jnp.linalg.norm(want)
    assert error < RELATIVE_ERROR[dtype], error


def test_compute_dtype_is_at_least_float32():
  assert compute_dtype(jnp.bfloat16) == compute_dtype(jnp.float16) == (
      jnp.float32)
  assert compute_dtype(jnp.float64) == jnp.float64


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(16)(x)))


@pytest.mark.parametrize("factor_dtype", [None] + HALF,
                         ids=["default", *HALF])
@pytest.mark.parametrize("learning_rate", [0.1, None],
                         ids=["fixed", "adaptive"])
def test_a_bfloat16_linen_mlp_trains_and_stays_bfloat16(learning_rate,
                                                         factor_dtype):
  x, y = toy_data(jax.random.key(0), n=64, d=6, dtype=jnp.bfloat16)
  model = _Mlp()
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16),
                        model.init(jax.random.key(1), x)["params"])
  tape_fn = kronjax.flax.value_grad_and_tape(model, CE)
  tx = kronjax.kfac(learning_rate, loss=None if learning_rate else CE,
                    factor_dtype=factor_dtype)

  @jax.jit
  def step(params, state, rng):
    loss, grads, tape = tape_fn(params, x, y, rng)
    updates, state = tx.update(
        grads, state, params, curvature=kronjax.fisher_blocks(tape),
        output_fn=lambda p: model.apply({"params": p}, x), targets=y)
    return optax.apply_updates(params, updates), state, loss, updates

  state, losses = tx.init(params), []
  for i in range(10):
    params, state, loss, updates = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
  for tree in (params, updates):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype("bfloat16")}
    assert all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree))
  # By default the factors are the params' float dtype, at least float32.
  stored = {x.dtype for x in jax.tree.leaves(kfac_state(state).factors)}
  assert stored == {jnp.dtype(factor_dtype or jnp.float32)}
  assert all(jnp.all(jnp.isfinite(x))
             for x in jax.tree.leaves(kfac_state(state).factors))
