"""Pure-JAX models tapped through ``kronjax.nn`` layers.

The same checks as for linen: one example's ``"exact"`` blocks are the exact
Fisher blocks (brute force with ``jax.jacobian`` and ``jax.hessian``), and the
empirical tape reproduces the gradient. The networks use linen's parameter
names, so linen-initialised params fit them and ``test_nnx`` can compare the
three frameworks on one set of weights.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
import kronjax.nn as knn
from kronjax import losses
from test_flax_tape import MLP as LinenMLP
from test_flax_tape import CoveringConv as LinenConv
from test_flax_tape import EmbedNet as LinenEmbed
from test_flax_tape import (LOSSES, _dense_kron, _get, _init, _set, _targets,
                            _wbar, _with_wbar, assert_tape_is_gradient)

F64 = jnp.float64


def exact_block(apply, params, x, y, loss, path):
  """J^T Λ J of the layer at ``path`` for ``apply(params, x)``, brute force."""

  @jax.jit  # one compilation instead of one per eager op: keeps tests fast
  def block(params, x, y):
    node = _get(params, path)
    w0 = _wbar(node)

    def outputs(wflat):
      return apply(
          _set(params, path, _with_wbar(node, wflat.reshape(w0.shape))), x)

    out = outputs(w0.reshape(-1))
    jac = jax.jacobian(outputs)(w0.reshape(-1)).reshape(out.size, -1)
    hess = jax.hessian(lambda o: loss(o, y))(out).reshape(out.size, out.size)
    return jac.T @ hess @ jac

  return block(params, x, y)


def _dense(p, x, name):
  return knn.dense(x, p[name]["kernel"], p[name].get("bias"))


def mlp(p, x):
  x = jnp.tanh(_dense(p, x, "Dense_0"))
  x = jnp.tanh(_dense(p, x, "Dense_1"))
  return _dense(p, x, "Dense_2")


def covering_conv(p, x):
  h = jnp.tanh(knn.conv(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"],
                        padding="VALID"))
  return _dense(p, h.reshape(h.shape[0], -1), "Dense_0")


def embed_net(p, ids):
  h = jnp.tanh(knn.embed(ids, p["Embed_0"]["embedding"]))
  return _dense(p, h, "Dense_0")


def general_net(p, x):
  """A dense layer contracting two axes: kernel (3, 4, 6)."""
  h = jnp.tanh(_dense(p, x, "Dense_0"))
  return _dense(p, h, "Dense_1")


def _general_params(key):
  k1, k2 = jax.random.split(key)
  return {"Dense_0": {"kernel": jax.random.normal(k1, (3, 4, 6), F64),
                      "bias": jnp.linspace(-1, 1, 6, dtype=F64)},
          "Dense_1": {"kernel": jax.random.normal(k2, (6, 3), F64) / 3,
                      "bias": jnp.zeros(3, F64)}}


# name: (apply, linen twin for the params, example inputs)
NETS = {
    "mlp": (mlp, LinenMLP(), lambda k: jax.random.normal(k, (1, 6), F64)),
    "conv": (covering_conv, LinenConv(),
             lambda k: jax.random.normal(k, (1, 3, 3, 2), F64)),
    "embed": (embed_net, LinenEmbed(),
              lambda k: jax.random.randint(k, (1,), 0, 7)),
    "general": (general_net, None,
                lambda k: jax.random.normal(k, (1, 3, 4), F64)),
}


def _params(net, x):
  _, twin, _ = NETS[net]
  if twin is None:
    return _general_params(jax.random.key(0))
  return _init(twin, x)


# Every loss once: the losses' own output Fishers are checked with linen.
EXACT_CASES = [("mlp", "softmax"), ("conv", "sigmoid"), ("embed", "squared"),
               ("general", "softmax")]


@pytest.mark.parametrize("net,loss_name", EXACT_CASES)
def test_one_example_exact_blocks_equal_exact_fisher(net, loss_name):
  apply, _, make_x = NETS[net]
  loss = LOSSES[loss_name]
  x = make_x(jax.random.key(1))
  y = _targets(loss_name, jax.random.key(2), 1, 3)
  params = _params(net, x)
  step = jax.jit(knn.value_grad_and_tape(apply, loss, fisher="exact"))
  blocks = jax.jit(kronjax.fisher_blocks)(step(params, x, y)[2])
  assert len(blocks) == (3 if net == "mlp" else 2)
  for path, block in blocks.items():
    want = exact_block(apply, params, x, y, loss, path)
    np.testing.assert_allclose(_dense_kron(block), want, atol=1e-12,
                               err_msg=str(path))


def _conv_stack(strides, padding, kernel_dilation, input_dilation=1):
  """A conv layer used twice (shared) and a dense head, as a list of layers."""

  def apply(p, x):
    kw = dict(strides=strides, padding=padding,
              kernel_dilation=kernel_dilation, input_dilation=input_dilation)
    h = jnp.tanh(knn.conv(x, p[0]["kernel"], p[0]["bias"], **kw))
    h = jnp.tanh(knn.conv(h, p[0]["kernel"], p[0]["bias"], **kw))
    return knn.dense(h.reshape(h.shape[0], -1), p[1]["kernel"], p[1]["bias"])

  return apply


# name: (strides, padding, kernel_dilation, spatial shape, check the tape)
CONVS = {
    "same_stride": ((1, 2), "SAME", 1, (5, 6), False),
    "valid_dilated": (1, "VALID", (1, 2), (6, 7), True),
    "circular": (1, "CIRCULAR", 1, (4, 5), True),
    "reflect": (2, "REFLECT", 1, (5, 5), False),
    "explicit": (1, ((1, 0), (2, 1)), 1, (4, 4), True),
    "int_padding": (1, 1, 1, (4, 4), False),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_matches_linen_and_tape_reproduces_the_gradient(name):
  # The tape's patches come from the same padded operands for every mode, so
  # the tape is checked on a few; the layer's maths on all.
  strides, padding, dilation, spatial, check_tape = CONVS[name]
  x = jax.random.normal(jax.random.key(0), (3, *spatial, 2), F64)
  k = jax.random.normal(jax.random.key(1), (3, 2, 2, 2), F64) / 2
  b = jnp.array([0.1, -0.2], F64)
  linen = nn.Conv(2, (3, 2), strides=strides, padding=padding,
                  kernel_dilation=dilation)
  np.testing.assert_allclose(
      knn.conv(x, k, b, strides=strides, padding=padding,
               kernel_dilation=dilation),
      linen.apply({"params": {"kernel": k, "bias": b}}, x), atol=1e-12)
  if not check_tape:
    return
  apply = _conv_stack(strides, padding, dilation)
  h = jax.eval_shape(lambda: knn.conv(
      knn.conv(x, k, b, strides=strides, padding=padding,
               kernel_dilation=dilation), k, b, strides=strides,
      padding=padding, kernel_dilation=dilation))
  w = jax.random.normal(jax.random.key(2), (int(np.prod(h.shape[1:])), 4), F64)
  params = [{"kernel": k, "bias": b}, {"kernel": w / 4, "bias": jnp.zeros(4)}]
  _check_tape_is_gradient(apply, params, x)


def _check_tape_is_gradient(apply, params, x):
  y = jax.random.normal(jax.random.key(9), (x.shape[0], 4), F64)
  step = knn.value_grad_and_tape(apply, losses.squared_error,
                                 fisher="empirical")
  _, grads, tape = jax.jit(step)(params, x, y)
  assert_tape_is_gradient(grads, tape, x.shape[0])


def test_tokens_general_dense_and_embedding_reproduce_the_gradient():
  def apply(p, ids):
    h = knn.embed(ids, p["embed"]["embedding"])                 # (N, T, 5)
    h = jnp.tanh(knn.dense(h.reshape(*ids.shape[:1], 2, 3, 5),  # 2 axes in
                           p["mix"]["kernel"], p["mix"]["bias"]))
    return knn.dense(h.mean(axis=1), p["head"]["kernel"])

  keys = jax.random.split(jax.random.key(0), 3)
  params = {"embed": {"embedding": jax.random.normal(keys[0], (9, 5), F64)},
            "mix": {"kernel": jax.random.normal(keys[1], (3, 5, 4), F64),
                    "bias": jnp.ones(4, F64)},
            "head": {"kernel": jax.random.normal(keys[2], (4, 4), F64)}}
  ids = jax.random.randint(jax.random.key(1), (3, 6), 0, 9)
  _check_tape_is_gradient(apply, params, ids)


def test_paths_of_lists_and_uncovered_parameters():
  def apply(p, x):
    for layer in p["blocks"]:
      x = jnp.tanh(knn.dense(x, layer["kernel"], layer["bias"]))
    return x * p["scale"]

  keys = jax.random.split(jax.random.key(0), 2)
  params = {"blocks": [{"kernel": jax.random.normal(k, (4, 4), F64),
                        "bias": jnp.zeros(4, F64)} for k in keys],
            "scale": jnp.ones(4, F64)}
  x = jax.random.normal(jax.random.key(1), (2, 4), F64)
  step = knn.value_grad_and_tape(apply, losses.squared_error, fisher="exact",
                                 layers=[("blocks", 1)])
  tape = step(params, x, x)[2]
  assert set(tape) == {("blocks", 1)}
  assert kronjax.uncovered_parameters(params, tape) == [
      ("blocks", 0, "bias"), ("blocks", 0, "kernel"), ("scale",)]
  tape = knn.value_grad_and_tape(apply, losses.squared_error,
                                 fisher="exact")(params, x, x)[2]
  assert set(tape) == {("blocks", 0), ("blocks", 1)}


def test_plain_maths_outside_a_tapped_step():
  x = jax.random.normal(jax.random.key(0), (2, 3), F64)
  k = jax.random.normal(jax.random.key(1), (3, 4), F64)
  np.testing.assert_allclose(knn.dense(x, k, jnp.ones(4)), x @ k + 1)
  np.testing.assert_allclose(knn.embed(jnp.array([2, 0]), k), k[jnp.array([2, 0])])
  # Works under any transformation outside a tapped step.
  np.testing.assert_allclose(jax.vmap(knn.dense, (0, None))(x, k), x @ k)


def test_transformed_kernels_and_misplaced_biases_are_named():
  x = jax.random.normal(jax.random.key(0), (2, 3), F64)
  params = {"a": {"kernel": jnp.ones((4, 3), F64), "bias": jnp.ones(4, F64)},
            "b": {"bias": jnp.ones(3, F64)}}
  sq = losses.squared_error
  transposed = lambda p, x: knn.dense(x, p["a"]["kernel"].T)
  with pytest.raises(ValueError, match=r"not an array of the params.*astype"):
    knn.value_grad_and_tape(transposed, sq, fisher="exact")(
        params, x, jnp.ones((2, 4)))
  p2 = {"a": {"kernel": jnp.ones((3, 3), F64)}, "b": {"bias": jnp.ones(3)}}
  beside = lambda p, x: knn.dense(x, p["a"]["kernel"], p["b"]["bias"])
  with pytest.raises(ValueError, match=r"must be an array of params that "
                     r"lives beside its kernel.*\('b', 'bias'\)"):
    knn.value_grad_and_tape(beside, sq, fisher="exact")(p2, x, x)
  plain = lambda p, x: knn.dense(x, p["a"]["kernel"])
  with pytest.raises(ValueError, match=r"'c'.*never called.*\('a',\)"):
    knn.value_grad_and_tape(plain, sq, fisher="exact", layers=["c"])(
        p2, x, x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
  """An equinox-style layer: a pytree that is its own parameters."""

  kernel: jax.Array
  bias: jax.Array

  def __call__(self, x):
    return knn.dense(x, self.kernel, self.bias)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Net:
  layers: list
  scale: jax.Array

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x) * self.scale


def test_module_pytrees_like_equinox():
  keys = jax.random.split(jax.random.key(0), 2)
  net = Net([Linear(jax.random.normal(keys[0], (4, 5), F64), jnp.zeros(5)),
             Linear(jax.random.normal(keys[1], (5, 3), F64), jnp.ones(3))],
            jnp.ones(3, F64))
  x = jax.random.normal(jax.random.key(1), (6, 4), F64)
  y = jax.random.normal(jax.random.key(2), (6, 3), F64)
  step = knn.value_grad_and_tape(lambda m, x: m(x), losses.squared_error,
                                 fisher="empirical")
  _, grads, tape = step(net, x, y)
  assert isinstance(grads, Net) and set(tape) == {("layers", 0), ("layers", 1)}
  for (_, i), t in tape.items():
    a = jnp.concatenate([t.inputs, jnp.ones(t.inputs.shape[:-1] + (1,))], -1)
    got = jnp.einsum("nti,ntj->ij", a, t.output_grads[0]) / x.shape[0]
    layer = grads.layers[i]
    np.testing.assert_allclose(
        got, jnp.concatenate([layer.kernel, layer.bias[None]]), atol=1e-12)
  assert kronjax.uncovered_parameters(net, tape) == [("scale",)]
