"""Tapes and Fisher blocks of Flax linen models against brute force.

The reference for one example is the exact Fisher block of a layer,
``J^T Λ J`` with ``J`` the Jacobian of the outputs w.r.t. the row-major
``vec(W̄)`` and ``Λ`` the Hessian of the NLL w.r.t. the outputs (the output
Fisher of these exponential-family losses). For N examples the reference is the
K-FAC formula computed by hand from per-example Jacobians.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
from kronjax import losses

F64 = jnp.float64
LOSSES = {
    "softmax": losses.softmax_cross_entropy,
    "sigmoid": losses.sigmoid_binary_cross_entropy,
    "squared": losses.squared_error,
}


def _targets(name, key, n, c, extra=()):
  if name == "softmax":
    return jax.random.randint(key, (n, *extra), 0, c)
  if name == "sigmoid":
    return jax.random.uniform(key, (n, *extra, c), F64)
  return jax.random.normal(key, (n, *extra, c), F64)


def _init(model, x, seed=0):
  params = model.init(jax.random.key(seed), x)["params"]
  return jax.tree_util.tree_map(lambda p: p.astype(F64), params)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _wbar(node):
  """The combined (d_in [+1], d_out) matrix of DESIGN.md."""
  if "embedding" in node:
    return node["embedding"]
  d_out = node["bias"].size if "bias" in node else node["kernel"].shape[-1]
  w = node["kernel"].reshape(-1, d_out)
  if "bias" in node:
    w = jnp.concatenate([w, node["bias"].reshape(1, d_out)])
  return w


def _with_wbar(node, wbar):
  if "embedding" in node:
    return {**node, "embedding": wbar}
  out = dict(node)
  has_bias = "bias" in node
  kernel = wbar[:-1] if has_bias else wbar
  out["kernel"] = kernel.reshape(node["kernel"].shape)
  if has_bias:
    out["bias"] = wbar[-1].reshape(node["bias"].shape)
  return out


def assert_tape_is_gradient(grads, tape, n):
  """With the empirical Fisher, mean_n sum_t ā gᵀ must be the W̄ gradient."""
  assert tape, "nothing tapped"
  for path, t in tape.items():
    if t.kind == "embed":
      a = jax.nn.one_hot(t.inputs, t.num_embeddings, dtype=F64)
    else:
      a = t.inputs
      if t.has_bias:
        a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,))], axis=-1)
    got = jnp.einsum("nti,ntj->ij", a, t.output_grads[0]) / n
    np.testing.assert_allclose(got, _wbar(_get(grads, path)), atol=1e-12,
                               err_msg=str(path))


def exact_fisher_block(model, params, x, y, loss, path):
  """J^T Λ J for the layer at ``path``, from jax.jacobian and jax.hessian."""
  node = _get(params, path)
  w0 = _wbar(node)

  def outputs(wflat):
    p = _set(params, path, _with_wbar(node, wflat.reshape(w0.shape)))
    return model.apply({"params": p}, x)

  out = outputs(w0.reshape(-1))
  jac = jax.jacobian(outputs)(w0.reshape(-1)).reshape(out.size, -1)
  hess = jax.hessian(lambda o: loss(o, y))(out).reshape(out.size, out.size)
  return jac.T @ hess @ jac


def _dense_kron(block):
  a, g = block.factors
  a = jnp.diag(a) if a.ndim == 1 else a
  return jnp.kron(a, g)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(5)(x))
    x = jnp.tanh(nn.Dense(4, use_bias=False)(x))
    return nn.Dense(3)(x)


class CoveringConv(nn.Module):
  """A conv whose kernel covers its input: one output position."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), padding="VALID")(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class EmbedNet(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Dense(3)(jnp.tanh(nn.Embed(7, 4)(ids)))


class GeneralNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 3), axis=(-2, -1))(x)
    return nn.Dense(3)(jnp.tanh(h.reshape(h.shape[0], -1)))


ONE_EXAMPLE = {
    "mlp": (MLP(), lambda k: jax.random.normal(k, (1, 6), F64)),
    "conv": (CoveringConv(), lambda k: jax.random.normal(k, (1, 3, 3, 2), F64)),
    "embed": (EmbedNet(), lambda k: jax.random.randint(k, (1,), 0, 7)),
    "general": (GeneralNet(), lambda k: jax.random.normal(k, (1, 3, 4), F64)),
}


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("net", sorted(ONE_EXAMPLE))
def test_one_example_exact_blocks_equal_exact_fisher(net, loss_name):
  model, make_x = ONE_EXAMPLE[net]
  loss = LOSSES[loss_name]
  x = make_x(jax.random.key(1))
  y = _targets(loss_name, jax.random.key(2), 1, 3)
  params = _init(model, x)
  step = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
  _, _, tape = step(params, x, y)
  blocks = kronjax.fisher_blocks(tape)
  assert len(blocks) == (3 if net == "mlp" else 2)
  for path, block in blocks.items():
    want = exact_fisher_block(model, params, x, y, loss, path)
    np.testing.assert_allclose(_dense_kron(block), want, atol=1e-12,
                               err_msg=str(path))


def _mlp_by_hand(params, x):
  """The MLP's layer inputs and pre-activations, written out."""
  p = [params[f"Dense_{i}"] for i in range(3)]
  a0 = x
  s0 = a0 @ p[0]["kernel"] + p[0]["bias"]
  a1 = jnp.tanh(s0)
  s1 = a1 @ p[1]["kernel"]
  a2 = jnp.tanh(s1)
  return [a0, a1, a2]


def _per_example_output_jacobians(params, x, layer):
  """d outputs_n / d s_{layer, n}, by jax.jacobian one example at a time."""
  p = [params[f"Dense_{i}"] for i in range(3)]

  def rest(s):
    for i in range(layer + 1, 3):
      s = jnp.tanh(s) @ p[i]["kernel"] + p[i].get("bias", 0.0)
    return s

  a = _mlp_by_hand(params, x)[layer]
  s = a @ p[layer]["kernel"] + p[layer].get("bias", 0.0)
  return jax.vmap(jax.jacobian(rest))(s)


def _kfac_by_hand(params, x, per_example_gram):
  """A and G per layer; per_example_gram(n, J_n) gives E[g g^T] for example n."""
  acts = _mlp_by_hand(params, x)
  out = {}
  for layer in range(3):
    a = acts[layer]
    if layer != 1:
      a = jnp.concatenate([a, jnp.ones((a.shape[0], 1))], axis=1)
    jac = _per_example_output_jacobians(params, x, layer)
    g = jnp.mean(jnp.stack([per_example_gram(n, jac[n])
                            for n in range(x.shape[0])]), axis=0)
    out[(f"Dense_{layer}",)] = (a.T @ a / x.shape[0], g)
  return out


@pytest.fixture(scope="module")
def mlp_batch():
  x = jax.random.normal(jax.random.key(3), (5, 6), F64)
  y = jax.random.randint(jax.random.key(4), (5,), 0, 3)
  return _init(MLP(), x), x, y


def test_exact_and_empirical_blocks_equal_kfac_by_hand(mlp_batch):
  params, x, y = mlp_batch
  loss = losses.softmax_cross_entropy
  logits = MLP().apply({"params": params}, x)
  probs = jax.nn.softmax(logits)

  def exact_gram(n, jac):
    lam = jnp.diag(probs[n]) - jnp.outer(probs[n], probs[n])
    return jac.T @ lam @ jac

  def empirical_gram(n, jac):
    r = probs[n] - jax.nn.one_hot(y[n], 3)
    return jnp.outer(jac.T @ r, jac.T @ r)

  for fisher, gram in [("exact", exact_gram), ("empirical", empirical_gram)]:
    step = kronjax.flax.value_grad_and_tape(MLP(), loss, fisher=fisher)
    blocks = kronjax.fisher_blocks(step(params, x, y)[2])
    for path, (a, g) in _kfac_by_hand(params, x, gram).items():
      np.testing.assert_allclose(blocks[path].factors[0], a, atol=1e-12)
      np.testing.assert_allclose(blocks[path].factors[1], g, atol=1e-12,
                                 err_msg=f"{fisher} {path}")


def assert_monte_carlo_converges(model, loss, params, x, y):
  """G from 20,000 Monte-Carlo draws is within 5% of the exact G."""
  exact = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
  mc = kronjax.flax.value_grad_and_tape(model, loss, fisher="mc",
                                        samples=20_000)
  g_exact = kronjax.fisher_blocks(exact(params, x, y)[2])
  g_mc = kronjax.fisher_blocks(jax.jit(mc)(params, x, y, jax.random.key(0))[2])
  for path in g_exact:
    want, got = g_exact[path].factors[1], g_mc[path].factors[1]
    # Relative to the factor's scale; the Monte-Carlo error is ~1/sqrt(20k).
    assert jnp.abs(got - want).max() < 0.05 * jnp.abs(want).max(), path
    assert jnp.abs(got - want).max() > 0  # really sampled


def test_monte_carlo_blocks_converge_to_exact(mlp_batch):
  params, x, y = mlp_batch
  assert_monte_carlo_converges(MLP(), losses.softmax_cross_entropy, params, x,
                               y)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_loss_and_grads_equal_value_and_grad(loss_name, mlp_batch):
  params, x, _ = mlp_batch
  loss = LOSSES[loss_name]
  y = _targets(loss_name, jax.random.key(5), 5, 3)
  step = kronjax.flax.value_grad_and_tape(MLP(), loss, fisher="mc")
  value, grads, _ = jax.jit(step)(params, x, y, jax.random.key(0))
  want_value, want_grads = jax.value_and_grad(
      lambda p: loss(MLP().apply({"params": p}, x), y))(params)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-12), grads,
      want_grads)


class Doubled(nn.Dense):
  """Overrides __call__ and calls the Dense it is: tapped as that Dense."""

  def __call__(self, x):
    return super().__call__(2 * x)


class Transposed(nn.Dense):
  """Overrides __call__ with other maths: not a Dense to K-FAC."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.features, x.shape[-1]))
    return x @ kernel.T


class Subclassed(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(Transposed(4)(jnp.tanh(Doubled(5)(x)))))


def test_a_subclass_is_tapped_only_where_the_layer_itself_runs():
  x = jax.random.normal(jax.random.key(0), (3, 4), F64)
  y = jax.random.normal(jax.random.key(1), (3, 3), F64)
  model = Subclassed()
  params = _init(model, x)
  _, grads, tape = kronjax.flax.value_grad_and_tape(
      model, losses.squared_error, fisher="empirical")(params, x, y)
  assert set(tape) == {("Doubled_0",), ("Dense_0",)}
  np.testing.assert_allclose(tape[("Doubled_0",)].inputs[:, 0], 2 * x)
  assert_tape_is_gradient({k: grads[k] for k in ("Doubled_0", "Dense_0")},
                          tape, x.shape[0])
