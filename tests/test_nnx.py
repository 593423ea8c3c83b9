"""Flax NNX models: tapes, exact Fisher blocks, and agreement with linen and JAX.

The NNX networks below name their layers as linen does (``Dense_0``, ...), so
one set of linen-initialised float64 weights runs all three versions of a
network (linen, NNX, pure JAX through ``kronjax.nn``), which must then give
identical losses, gradients and blocks.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kronjax
from kronjax import losses
from kronjax.flax import _nnx
from test_flax_tape import (LOSSES, GeneralNet, _dense_kron, _init, _targets,
                            assert_tape_is_gradient)
from test_pure_jax import (EXACT_CASES, LinenConv, LinenEmbed, LinenMLP,
                           covering_conv, embed_net, exact_block, mlp)

F64 = jnp.float64


def _kw(rngs):
  return dict(rngs=rngs, param_dtype=F64)


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.Dense_0 = nnx.Linear(6, 5, **_kw(rngs))
    self.Dense_1 = nnx.Linear(5, 4, use_bias=False, **_kw(rngs))
    self.Dense_2 = nnx.Linear(4, 3, **_kw(rngs))

  def __call__(self, x):
    x = jnp.tanh(self.Dense_0(x))
    return self.Dense_2(jnp.tanh(self.Dense_1(x)))


class CoveringConv(nnx.Module):
  def __init__(self, rngs):
    self.Conv_0 = nnx.Conv(2, 4, (3, 3), padding="VALID", **_kw(rngs))
    self.Dense_0 = nnx.Linear(4, 3, **_kw(rngs))

  def __call__(self, x):
    h = jnp.tanh(self.Conv_0(x))
    return self.Dense_0(h.reshape(h.shape[0], -1))


class EmbedNet(nnx.Module):
  def __init__(self, rngs):
    self.Embed_0 = nnx.Embed(7, 4, **_kw(rngs))
    self.Dense_0 = nnx.Linear(4, 3, **_kw(rngs))

  def __call__(self, ids):
    return self.Dense_0(jnp.tanh(self.Embed_0(ids)))


class General(nnx.Module):
  def __init__(self, rngs):
    self.DenseGeneral_0 = nnx.LinearGeneral((3, 4), (2, 3), axis=(-2, -1),
                                            **_kw(rngs))
    self.Dense_0 = nnx.Linear(6, 3, **_kw(rngs))

  def __call__(self, x):
    h = self.DenseGeneral_0(x)
    return self.Dense_0(jnp.tanh(h.reshape(h.shape[0], -1)))


# name: (NNX class, linen twin, pure-JAX twin or None, example inputs)
NETS = {
    "mlp": (MLP, LinenMLP(), mlp, lambda k, n=1: jax.random.normal(
        k, (n, 6), F64)),
    "conv": (CoveringConv, LinenConv(), covering_conv,
             lambda k, n=1: jax.random.normal(k, (n, 3, 3, 2), F64)),
    "embed": (EmbedNet, LinenEmbed(), embed_net,
              lambda k, n=1: jax.random.randint(k, (n,), 0, 7)),
    "general": (General, GeneralNet(), None,
                lambda k, n=1: jax.random.normal(k, (n, 3, 4), F64)),
}


def _nnx_model(cls, params):
  """An NNX model holding the given (linen-shaped) parameter dict."""
  graphdef, _, rest = nnx.split(cls(nnx.Rngs(0)), nnx.Param, ...)
  return nnx.merge(graphdef, nnx.State(params), rest)


def _nnx_apply(cls, params):
  graphdef, _, rest = nnx.split(_nnx_model(cls, params), nnx.Param, ...)
  return lambda p, x: nnx.merge(graphdef, nnx.State(p), rest)(x)


@pytest.mark.parametrize("net,loss_name", EXACT_CASES)
def test_one_example_exact_blocks_equal_exact_fisher(net, loss_name):
  cls, twin, _, make_x = NETS[net]
  loss = LOSSES[loss_name]
  x = make_x(jax.random.key(1))
  y = _targets(loss_name, jax.random.key(2), 1, 3)
  params = _init(twin, x)
  model = _nnx_model(cls, params)
  step = nnx.jit(kronjax.flax.value_grad_and_tape(model, loss, "exact"))
  blocks = jax.jit(kronjax.fisher_blocks)(step(model, x, y)[2])
  assert set(blocks) == {(name,) for name in params}
  apply = _nnx_apply(cls, params)
  for path, block in blocks.items():
    want = exact_block(apply, params, x, y, loss, path)
    np.testing.assert_allclose(_dense_kron(block), want, atol=1e-12,
                               err_msg=str(path))


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_linen_nnx_and_pure_jax_give_identical_tapes_and_updates(net):
  cls, twin, pure, make_x = NETS[net]
  x = make_x(jax.random.key(1), 4)
  y = jax.random.randint(jax.random.key(2), (4,), 0, 3)
  params = _init(twin, x)
  model = _nnx_model(cls, params)
  loss, rng = losses.softmax_cross_entropy, jax.random.key(3)
  nnx_step = kronjax.flax.value_grad_and_tape(model, loss, samples=3)
  graphdef, state = nnx.split(model)
  # NNX under jax.jit: split outside, merge inside.
  nnx_jitted = jax.jit(lambda state, *args: nnx_step(
      nnx.merge(graphdef, state), *args))
  results = [
      jax.jit(kronjax.flax.value_grad_and_tape(twin, loss, samples=3))(
          params, x, y, rng),
      nnx_jitted(state, x, y, rng),
      jax.jit(kronjax.nn.value_grad_and_tape(pure, loss, samples=3))(
          params, x, y, rng)]
  grads = [jax.tree.map(np.asarray, nnx.to_pure_dict(g) if
                        isinstance(g, nnx.State) else g)
           for _, g, _ in results]
  blocks = [jax.jit(kronjax.fisher_blocks)(t) for _, _, t in results]
  for value, _, _ in results[1:]:
    np.testing.assert_allclose(value, results[0][0], rtol=1e-13)
  for g, b in zip(grads[1:], blocks[1:]):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-13),
                 g, grads[0])
    assert set(b) == set(blocks[0])
    for path in b:
      for u, v in zip(b[path].factors, blocks[0][path].factors):
        np.testing.assert_allclose(u, v, atol=1e-13, err_msg=str(path))
  # One K-FAC step each: optax for linen and pure JAX, nnx.Optimizer for NNX.
  tx = kronjax.kfac(learning_rate=0.5, damping=1e-2, inverse_every=1,
            factor_dtype=F64)
  updates = [tx.update(grads[i], tx.init(params), params,
                       curvature=blocks[i])[0] for i in (0, 2)]
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx_updates = optimizer.update(model, results[1][1], curvature=blocks[1])
  updates.append(nnx.to_pure_dict(nnx_updates))
  for u in updates[1:]:
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-12),
                 u, updates[0])
  jax.tree.map(lambda p, u, q: np.testing.assert_allclose(p + u, q,
                                                          atol=1e-12),
               params, updates[0], nnx.to_pure_dict(nnx.state(model)))
  sgd = jax.tree.map(lambda g: -0.5 * g, grads[0])
  assert not np.allclose(updates[0]["Dense_0"]["kernel"],
                         sgd["Dense_0"]["kernel"])  # really preconditioned


class Shared(nnx.Module):
  """A list of layers, a module shared by two attributes, a LayerNorm.

  NNX stores a shared module's parameters under one of its paths (the first in
  its sorted traversal: here "encoder", not "reused"); its tape uses the same.
  """

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(5, 5, **_kw(rngs)),
                            nnx.LinearGeneral(3, 4, axis=1, **_kw(rngs))])
    self.encoder = nnx.Linear(5, 5, use_bias=False, **_kw(rngs))
    self.reused = self.encoder
    self.norm = nnx.LayerNorm(4, **_kw(rngs))

  def __call__(self, x):                           # x: (N, 3, 5)
    h = jnp.tanh(self.layers[0](x))
    h = jnp.tanh(self.reused(self.encoder(h)))
    h = self.layers[1](h)                          # contracts axis 1: (N, 5, 4)
    return self.norm(h).mean(axis=1)


class Convs(nnx.Module):
  def __init__(self, rngs, **conv_kwargs):
    self.conv = nnx.Conv(2, 3, (2, 3), **conv_kwargs, **_kw(rngs))
    self.embed = nnx.Embed(9, 2, **_kw(rngs))

  def __call__(self, x):                           # x: (N, H, W) ids
    h = jnp.tanh(self.conv(self.embed(x)))
    return h.reshape(h.shape[0], -1)[:, :4]


MODELS = {
    "shared": (lambda r: Shared(r), lambda k: jax.random.normal(
        k, (3, 3, 5), F64)),
    # Flax pads CIRCULAR inputs itself: the patches must come from its call.
    "conv_circular_strided_dilated": (
        lambda r: Convs(r, padding="CIRCULAR", strides=(2, 1),
                        kernel_dilation=(1, 2)),
        lambda k: jax.random.randint(k, (3, 5, 6), 0, 9)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tape_reproduces_the_gradient_under_nnx_jit(name):
  make, make_x = MODELS[name]
  model, x = make(nnx.Rngs(0)), make_x(jax.random.key(1))
  y = jax.random.normal(jax.random.key(2), (x.shape[0], 4), F64)
  step = kronjax.flax.value_grad_and_tape(model, losses.squared_error,
                                          fisher="empirical")
  value, grads, tape = nnx.jit(step)(model, x, y)
  want_value, want = nnx.value_and_grad(
      lambda m: losses.squared_error(m(x), y))(model)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  assert jax.tree.structure(grads) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-12),
               grads, want)
  assert_tape_is_gradient(nnx.to_pure_dict(grads), tape, x.shape[0])
  if name == "shared":
    assert set(tape) == {("layers", 0), ("layers", 1), ("encoder",)}
    assert tape[("encoder",)].inputs.shape == (3, 6, 5)  # 2 calls x 3 tokens


def test_layers_filter_uncovered_parameters_and_errors():
  model = Shared(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 5), F64)
  y = jax.random.normal(jax.random.key(2), (2, 4), F64)
  sq = losses.squared_error
  step = kronjax.flax.value_grad_and_tape(
      model, sq, fisher="exact", layers=["layers/7", ("encoder",)])
  with pytest.raises(ValueError, match=r"'layers/7'.*never called"):
    step(model, x, y)
  # A path, or its "/"-joined key as everywhere in kronjax.
  for layers in ([("layers", 1), ("encoder",)], ["layers/1", "encoder"]):
    step = kronjax.flax.value_grad_and_tape(model, sq, fisher="exact",
                                            layers=layers)
    _, grads, tape = step(model, x, y)
    assert set(tape) == {("layers", 1), ("encoder",)}
  assert kronjax.uncovered_parameters(grads, tape) == [
      ("layers", 0, "bias"), ("layers", 0, "kernel"), ("norm", "bias"),
      ("norm", "scale")]
  assert kronjax.uncovered_parameters(nnx.state(model, nnx.Param), tape) == (
      kronjax.uncovered_parameters(grads, tape))
  with pytest.raises(ValueError, match=r"'norm', a nnx.LayerNorm"):
    kronjax.flax.value_grad_and_tape(model, sq, fisher="exact",
                                     layers=["norm"])(model, x, y)
  with pytest.raises(TypeError, match="takes the NNX module"):
    step(nnx.state(model), x, y)


class Boom(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 2, (2,), **_kw(rngs))
    self.dense = nnx.Linear(2, 2, **_kw(rngs))

  def __call__(self, x):
    self.dense(self.conv(x).mean(axis=1))
    raise RuntimeError("boom inside the model")


def test_layer_classes_are_restored_after_an_exception():
  originals = {cls: cls.__dict__["__call__"] for cls in _nnx.CLASSES}
  model = Boom(nnx.Rngs(0))
  x = jnp.ones((2, 3, 1), F64)
  step = kronjax.flax.value_grad_and_tape(model, losses.squared_error)
  with pytest.raises(RuntimeError, match="boom inside the model"):
    step(model, x, x[:, 0, :], jax.random.key(0))
  for cls, original in originals.items():
    assert cls.__dict__["__call__"] is original, cls
  # Inside a tapped run the classes are patched; outside, plain calls work.
  seen = []

  class Spy(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(2, 2, **_kw(rngs))

    def __call__(self, x):
      seen.append(type(self.dense).__dict__["__call__"] is
                  originals[nnx.Linear])
      return self.dense(x)

  spy = Spy(nnx.Rngs(0))
  kronjax.flax.value_grad_and_tape(spy, losses.squared_error, "exact")(
      spy, x[:, 0].repeat(2, 1), x[:, 0].repeat(2, 1))
  assert seen and not any(seen)
  assert nnx.Linear.__dict__["__call__"] is originals[nnx.Linear]
  np.testing.assert_allclose(spy(jnp.ones((1, 2), F64)),
                             spy.dense(jnp.ones((1, 2), F64)))


class Stateful(nnx.Module):
  """float32, like most NNX models (BatchNorm keeps float32 statistics)."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(self.norm(self.dense(x))))


def test_batch_statistics_and_rng_counts_advance_as_with_value_and_grad():
  x = jax.random.normal(jax.random.key(0), (8, 3), jnp.float32)
  y = jax.random.normal(jax.random.key(1), (8, 2), jnp.float32)
  model, twin = Stateful(nnx.Rngs(0)), Stateful(nnx.Rngs(0))
  step = nnx.jit(kronjax.flax.value_grad_and_tape(
      model, losses.squared_error, fisher="empirical"))
  value, grads, _ = step(model, x, y)
  want, want_grads = nnx.value_and_grad(
      lambda m: losses.squared_error(m(x), y))(twin)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               (grads, nnx.state(model, nnx.BatchStat)),
               (want_grads, nnx.state(twin, nnx.BatchStat)))
  assert float(jnp.abs(model.norm.mean[...]).max()) > 0
  assert int(model.drop.rngs.count[...]) == int(twin.drop.rngs.count[...]) == 1
  assert float(step(model, x, y)[0]) != float(value)  # a new dropout mask


class Doubled(nnx.Linear):
  """Overrides __call__ and calls the Linear it is: tapped as that Linear."""

  def __call__(self, x):
    return super().__call__(2 * x)


class Transposed(nnx.Linear):
  """Overrides __call__ with other maths: not a Linear to K-FAC."""

  def __call__(self, x):
    return x @ self.kernel[...].T


class Subclassed(nnx.Module):
  def __init__(self, rngs):
    self.doubled = Doubled(4, 5, **_kw(rngs))
    self.transposed = Transposed(4, 5, **_kw(rngs))
    self.head = nnx.Linear(4, 3, **_kw(rngs))

  def __call__(self, x):
    return self.head(jnp.tanh(self.transposed(jnp.tanh(self.doubled(x)))))


def test_a_subclass_is_tapped_only_where_the_layer_itself_runs():
  model = Subclassed(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 4), F64)
  y = jax.random.normal(jax.random.key(2), (3, 3), F64)
  _, grads, tape = kronjax.flax.value_grad_and_tape(
      model, losses.squared_error, fisher="empirical")(model, x, y)
  assert set(tape) == {("doubled",), ("head",)}
  np.testing.assert_allclose(tape[("doubled",)].inputs[:, 0], 2 * x)
  pure = nnx.to_pure_dict(grads)
  assert_tape_is_gradient({k: pure[k] for k in ("doubled", "head")}, tape,
                          x.shape[0])
