"""Weight sharing (sequences, convolutions, shared layers) and layer coverage.

Tapes must reproduce the loss gradient exactly: with the empirical Fisher and
no extra loss dimensions, ``mean_n sum_t ā_nt g_ntᵀ`` is the gradient of ``W̄``.
That identity checks patches, padding, strides, dilation and call stacking for
every tapped layer kind. K-FAC-expand and -reduce are checked against their
definitions and against the exact Fisher where they are exact (deep linear
networks, Eschenhagen et al. 2023).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
from kronjax import losses
from test_flax_tape import (_dense_kron, _init, assert_monte_carlo_converges,
                            assert_tape_is_gradient, exact_fisher_block)

F64 = jnp.float64


def _conv_net(ndim, **conv_kwargs):
  class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(3, (2,) * ndim, **conv_kwargs)(x)
      return nn.Dense(4)(jnp.tanh(h).reshape(h.shape[0], -1))
  return ConvNet()


class Shared(nn.Module):
  def setup(self):
    self.layer = nn.Dense(5)
    self.head = nn.Dense(4)

  def __call__(self, x):
    return self.head(jnp.tanh(self.layer(jnp.tanh(self.layer(x)))))


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(jnp.tanh(nn.Dense(5)(x)))


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = Encoder()(x)
    h = nn.LayerNorm()(h)
    return nn.Dense(4)(h)


class Tokens(nn.Module):
  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(9, 5)(ids)
    h = nn.DenseGeneral(5, axis=-1)(h)
    h = nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=4)(h)
    return nn.Dense(4)(h.mean(axis=1))


def _x(shape, key=0, ints=None):
  if ints:
    return jax.random.randint(jax.random.key(key), shape, 0, ints)
  return jax.random.normal(jax.random.key(key), shape, F64)


NETS = {
    "conv1d_causal": (_conv_net(1, padding="CAUSAL", kernel_dilation=2),
                      (3, 7, 2)),
    "conv1d_reflect": (_conv_net(1, padding="REFLECT", strides=2), (3, 7, 2)),
    "conv2d_same_stride": (_conv_net(2, padding="SAME", strides=(2, 1)),
                           (3, 5, 6, 2)),
    "conv2d_circular_dil": (_conv_net(2, padding="CIRCULAR",
                                      kernel_dilation=(1, 2)), (3, 5, 6, 2)),
    "conv2d_explicit": (_conv_net(2, padding=((1, 0), (2, 1)),
                                  use_bias=False), (3, 4, 4, 2)),
    "conv3d_valid": (_conv_net(3, padding="VALID"), (2, 3, 4, 3, 2)),
    "shared": (Shared(), (3, 5)),
    "nested": (Nested(), (3, 6)),
}


@pytest.mark.parametrize("net", sorted(NETS) + ["tokens"])
def test_tape_reproduces_the_gradient(net):
  if net == "tokens":
    model, x = Tokens(), _x((3, 6), ints=9)
  else:
    model, shape = NETS[net]
    x = _x(shape)
  y = _x((x.shape[0], 4), key=1)
  params = _init(model, x)
  step = kronjax.flax.value_grad_and_tape(model, losses.squared_error,
                                          fisher="empirical")
  _, grads, tape = jax.jit(step)(params, x, y)
  assert_tape_is_gradient(grads, tape, x.shape[0])


def test_nested_and_shared_paths():
  x = _x((2, 6))
  _, _, tape = kronjax.flax.value_grad_and_tape(
      Nested(), losses.squared_error, fisher="exact")(_init(Nested(), x), x,
                                                      _x((2, 4)))
  assert set(tape) == {("Encoder_0", "Dense_0"), ("Encoder_0", "Dense_1"),
                       ("Dense_0",)}
  x = _x((2, 5))
  _, _, tape = kronjax.flax.value_grad_and_tape(
      Shared(), losses.squared_error, fisher="exact")(_init(Shared(), x), x,
                                                      _x((2, 4)))
  assert tape[("layer",)].inputs.shape == (2, 2, 5)  # two calls = 2 positions
  np.testing.assert_allclose(tape[("layer",)].inputs[:, 0], x)


class TokenMLP(nn.Module):
  linear: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x)
    return nn.Dense(3)(h if self.linear else jnp.tanh(h))


class Pooled(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x).mean(axis=1)
    return nn.Dense(3)(h)


def test_expand_and_reduce_match_their_definitions():
  n, t = 3, 4
  x, y = _x((n, t, 5)), _x((n, t, 3), key=1)
  model = TokenMLP()
  params = _init(model, x)
  tape = kronjax.flax.value_grad_and_tape(
      model, losses.squared_error, fisher="exact")(params, x, y)[2]
  expand = kronjax.fisher_blocks(tape)[("Dense_0",)]
  reduce = kronjax.fisher_blocks(tape, weight_sharing="reduce")[("Dense_0",)]
  p = params["Dense_0"]
  a = jnp.concatenate([x, jnp.ones((n, t, 1))], axis=-1)
  # d outputs_n / d s_n: (T*3, T*4), Λ = I/M for the mean squared error.
  w2 = params["Dense_1"]["kernel"]
  s = x @ p["kernel"] + p["bias"]
  rest = lambda sn: (jnp.tanh(sn) @ w2 + params["Dense_1"]["bias"]).reshape(-1)
  jac = jax.vmap(jax.jacobian(rest))(s).reshape(n, t * 3, t, 4)
  gram = jnp.einsum("nktd,nkue->ntdue", jac, jac) / (n * t)  # J^T Λ J per n
  a2 = a.reshape(-1, 5 + 1)
  np.testing.assert_allclose(expand.factors[0], a2.T @ a2 / (n * t), atol=1e-12)
  np.testing.assert_allclose(
      expand.factors[1], jnp.einsum("ntdte->de", gram), atol=1e-12)
  a_hat = a.mean(axis=1)
  np.testing.assert_allclose(reduce.factors[0], a_hat.T @ a_hat / n,
                             atol=1e-12)
  np.testing.assert_allclose(reduce.factors[1],
                             jnp.einsum("ntdue->de", gram), atol=1e-12)


def test_expand_is_exact_for_deep_linear_token_model():
  x, y = _x((3, 4, 5)), _x((3, 4, 3), key=1)
  model = TokenMLP(linear=True)
  params = _init(model, x)
  tape = kronjax.flax.value_grad_and_tape(
      model, losses.squared_error, fisher="exact")(params, x, y)[2]
  for path, block in kronjax.fisher_blocks(tape).items():
    want = exact_fisher_block(model, params, x, y, losses.squared_error, path)
    np.testing.assert_allclose(_dense_kron(block), want, atol=1e-12)


def test_reduce_is_exact_for_deep_linear_pooled_model():
  x, y = _x((3, 4, 5)), _x((3, 3), key=1)
  model = Pooled()
  params = _init(model, x)
  tape = kronjax.flax.value_grad_and_tape(
      model, losses.squared_error, fisher="exact")(params, x, y)[2]
  path = ("Dense_0",)
  want = exact_fisher_block(model, params, x, y, losses.squared_error, path)
  reduce = kronjax.fisher_blocks(tape, weight_sharing="reduce")[path]
  expand = kronjax.fisher_blocks(tape)[path]
  np.testing.assert_allclose(_dense_kron(reduce), want, atol=1e-12)
  assert not np.allclose(_dense_kron(expand), want, atol=1e-6)


def test_one_position_expand_equals_reduce():
  x, y = _x((4, 1, 5)), _x((4, 1, 3), key=1)
  tape = kronjax.flax.value_grad_and_tape(
      TokenMLP(), losses.squared_error, fisher="exact")(
          _init(TokenMLP(), x), x, y)[2]
  e, r = kronjax.fisher_blocks(tape), kronjax.fisher_blocks(tape, "reduce")
  for path in e:
    for fe, fr in zip(e[path].factors, r[path].factors):
      np.testing.assert_allclose(fe, fr, atol=1e-12)


def test_float32_batch_of_one_under_jit():
  x = jax.random.normal(jax.random.key(0), (1, 6), jnp.float32)
  y = jnp.array([2])
  params = Nested().init(jax.random.key(1), x)["params"]
  step = jax.jit(kronjax.flax.value_grad_and_tape(
      Nested(), losses.softmax_cross_entropy, fisher="mc", samples=2))
  value, grads, tape = step(params, x, y, jax.random.key(2))
  blocks = kronjax.fisher_blocks(tape)
  assert value.dtype == jnp.float32
  for block in blocks.values():
    for f in block.factors:
      assert f.dtype == jnp.float32 and bool(jnp.isfinite(f).all())


def test_layers_filter_and_uncovered_parameters():
  x = _x((2, 6))
  params = _init(Nested(), x)
  step = kronjax.flax.value_grad_and_tape(
      Nested(), losses.squared_error, fisher="exact",
      layers=["Encoder_0/Dense_1", ("Dense_0",)])
  tape = step(params, x, _x((2, 4)))[2]
  assert set(tape) == {("Encoder_0", "Dense_1"), ("Dense_0",)}
  assert kronjax.uncovered_parameters(params, tape) == [
      ("Encoder_0", "Dense_0", "bias"), ("Encoder_0", "Dense_0", "kernel"),
      ("LayerNorm_0", "bias"), ("LayerNorm_0", "scale")]


def test_bad_input_is_named():
  x, y = _x((2, 6)), _x((2, 4))
  params = _init(Nested(), x)
  sq = losses.squared_error
  with pytest.raises(ValueError, match=r"LayerNorm_0.*LayerNorm"):
    kronjax.flax.value_grad_and_tape(Nested(), sq, layers=["LayerNorm_0"])(
        params, x, y, jax.random.key(0))
  with pytest.raises(ValueError, match=r"Missing_0.*never called"):
    kronjax.flax.value_grad_and_tape(Nested(), sq, layers=["Missing_0"])(
        params, x, y, jax.random.key(0))
  with pytest.raises(ValueError, match="fisher='fast'"):
    kronjax.flax.value_grad_and_tape(Nested(), sq, fisher="fast")
  with pytest.raises(ValueError, match=r"Batch sizes disagree.*\(2, 6\).*\(3, 4\)"):
    kronjax.flax.value_grad_and_tape(Nested(), sq)(params, x, _x((3, 4)),
                                                   jax.random.key(0))
  with pytest.raises(ValueError, match="rng"):
    kronjax.flax.value_grad_and_tape(Nested(), sq)(params, x, y)
  with pytest.raises(ValueError, match=r"labels \[4, 7\] outside \[0, 4\)"):
    kronjax.flax.value_grad_and_tape(
        Nested(), losses.softmax_cross_entropy, fisher="exact")(
            params, x, jnp.array([7, 4]))


def test_masked_tokens_monte_carlo_converges_to_exact():
  x = _x((3, 4, 5))
  y = jnp.array([[0, 1, -1, 2], [2, -1, -1, 0], [1, 1, 0, -1]])
  loss = losses.SoftmaxCrossEntropy(ignore_index=-1)
  params = _init(TokenMLP(), x)
  assert_monte_carlo_converges(TokenMLP(), loss, params, x, y)


# Masked terms (ignore_index) ----------------------------------------------

IGNORE = -1


class Tagger(nn.Module):
  """Per-token logits: every layer's positions are the loss's terms."""

  @nn.compact
  def __call__(self, ids):
    h = jnp.tanh(nn.Dense(5)(nn.Embed(7, 4)(ids)))
    return nn.Dense(3)(h)


class PooledClassifier(nn.Module):
  """Per-example logits from pooled tokens: the token layer has T positions."""

  @nn.compact
  def __call__(self, ids):
    h = jnp.tanh(nn.Dense(5)(nn.Embed(7, 4)(ids))).mean(axis=1)
    return nn.Dense(3)(h)


def _with_bias(a):
  return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def _masked_tape(model, ids, labels):
  loss = losses.SoftmaxCrossEntropy(ignore_index=IGNORE)
  params = _init(model, ids)
  return jax.jit(kronjax.flax.value_grad_and_tape(model, loss, "exact"))(
      params, ids, labels)[2]


def test_masked_tokens_are_left_out_of_the_input_factors():
  ids = _x((4, 6), ints=7)
  labels = _x((4, 6), key=1, ints=3)
  labels = labels.at[0, :2].set(IGNORE).at[2].set(IGNORE)  # example 2: none
  valid = np.asarray(labels != IGNORE, np.float64)
  tape = _masked_tape(Tagger(), ids, labels)
  expand = kronjax.fisher_blocks(tape)
  reduce = kronjax.fisher_blocks(tape, weight_sharing="reduce")
  for path in (("Dense_0",), ("Dense_1",)):
    a = _with_bias(tape[path].inputs)
    want = np.einsum("nt,nti,ntj->ij", valid, a, a) / valid.sum()
    np.testing.assert_allclose(expand[path].factors[0], want, atol=1e-12)
    counted = valid.sum(1) > 0
    a_hat = np.einsum("nt,nti->ni", valid, a)[counted] / valid.sum(1)[
        counted, None]
    np.testing.assert_allclose(reduce[path].factors[0],
                               a_hat.T @ a_hat / counted.sum(), atol=1e-12)
  # A masked token's output gradients are zero: G leaves it out already.
  assert np.all(np.asarray(tape[("Dense_1",)].output_grads)[:, valid == 0]
                == 0)
  counts = np.zeros(7)
  np.add.at(counts, np.asarray(ids)[valid > 0], 1)
  np.testing.assert_allclose(expand[("Embed_0",)].factors[0],
                             counts / valid.sum(), atol=1e-12)


def test_a_masked_example_is_left_out_of_a_pooled_layer():
  ids = _x((4, 6), ints=7)
  labels = jnp.array([0, IGNORE, 2, 1])
  tape = _masked_tape(PooledClassifier(), ids, labels)
  blocks = kronjax.fisher_blocks(tape)
  keep = np.asarray(labels != IGNORE)
  a = np.asarray(_with_bias(tape[("Dense_0",)].inputs))[keep]
  a = a.reshape(-1, a.shape[-1])
  np.testing.assert_allclose(blocks[("Dense_0",)].factors[0],
                             a.T @ a / len(a), atol=1e-12)
  head = np.asarray(_with_bias(tape[("Dense_1",)].inputs))[keep, 0]
  np.testing.assert_allclose(blocks[("Dense_1",)].factors[0],
                             head.T @ head / len(head), atol=1e-12)
