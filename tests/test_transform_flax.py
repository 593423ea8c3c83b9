"""kronjax.kfac with tapes from Flax models (linen and NNX), end to end."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kronjax
from _transform_helpers import CE, kfac_state, make_kfac, toy_data

MODES = pytest.mark.parametrize("learning_rate", [0.3, None],
                                ids=["fixed", "adaptive"])


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.LayerNorm()(nn.Dense(8)(x)))  # LayerNorm → the fallback
    return nn.Dense(3)(x)


class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.norm(self.hidden(x))))


@MODES
def test_linen_training_loop(learning_rate):
  x, y = toy_data(jax.random.key(0), n=32, d=4)
  model = LinenNet()
  params = model.init(jax.random.key(1), x)["params"]
  tape_fn = kronjax.flax.value_grad_and_tape(model, CE, fisher="mc")
  tx = make_kfac(learning_rate)

  @jax.jit
  def step(params, state, rng):
    loss, grads, tape = tape_fn(params, x, y, rng)
    updates, state = tx.update(
        grads, state, params, curvature=kronjax.fisher_blocks(tape),
        output_fn=lambda p: model.apply({"params": p}, x), targets=y)
    return optax.apply_updates(params, updates), state, loss

  state, losses = tx.init(params), []
  for i in range(12):
    params, state, loss = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]
  assert sorted(kfac_state(state).factors) == ["Dense_0", "Dense_1"]


@MODES
def test_nnx_training_loop(learning_rate):
  x, y = toy_data(jax.random.key(0), n=32, d=4)
  graphdef, params = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param)
  tx = make_kfac(learning_rate)
  output_fn = lambda p: nnx.merge(graphdef, p)(x)

  @jax.jit
  def step(params, state, rng):
    model = nnx.merge(graphdef, params)
    tape_fn = kronjax.flax.value_grad_and_tape(model, CE, fisher="mc")
    loss, grads, tape = tape_fn(model, x, y, rng)
    updates, state = tx.update(grads, state, params,
                               curvature=kronjax.fisher_blocks(tape),
                               output_fn=output_fn, targets=y)
    return optax.apply_updates(params, updates), state, loss

  state, losses = tx.init(params), []
  for i in range(12):
    params, state, loss = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  assert isinstance(params, nnx.State)
  assert losses[-1] < 0.8 * losses[0]
  assert not np.allclose(params["norm"]["scale"][...], 1.0)
