"""fit_curvature and Curvature against brute force.

References: K-FAC's data-set blocks are the blocks of one tape over all the
examples at once (``fisher="exact"``: no sampling), and the solve is the dense
``(A ⊗ G + λI)⁻¹ vec(W̄)`` from ``jnp.kron``. EK-FAC's eigenvalues are
``mean_n ((U_A ⊗ U_G)ᵀ vec ∇ℓ_n)²`` with ``∇ℓ_n`` from ``jax.vmap(jax.grad)``
of each example's loss (empirical Fisher), and its solve the dense
``(U diag(Λ) Uᵀ + λI)⁻¹ v``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
from kronjax import losses
from kronjax._params import find_layers, layer_key
from test_flax_tape import _get, _wbar

F64 = jnp.float64
CE = losses.softmax_cross_entropy


class Mlp(nn.Module):
  """Two K-FAC layers and a LayerNorm, whose scale and bias are not."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(jnp.tanh(nn.Dense(5)(x)))
    return nn.Dense(3)(h)


class ConvNet(nn.Module):
  """A convolution: nine weight-sharing positions per example."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(3, (2, 2), padding="VALID")(x))
    return nn.Dense(3)(h.reshape(h.shape[0], -1))


class Transformer(nn.Module):
  """Embedding, single-head attention and a per-token head (loss per token)."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(7, 4)(ids)
    h = h + nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=4)(h)
    return nn.Dense(3)(jnp.tanh(h))


class Tied(nn.Module):
  """An embedding that is also the head (``attend``): one dense A."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(7, 4)
    return embed.attend(jnp.tanh(nn.Dense(4)(embed(ids))))


def data(name, n=10, seed=0):
  """``(model, x, y)``: x and labels for one of the three models."""
  kx, ky = jax.random.split(jax.random.key(seed))
  if name == "mlp":
    return Mlp(), jax.random.normal(kx, (n, 4), F64), jax.random.randint(
        ky, (n,), 0, 3)
  if name == "conv":
    return ConvNet(), jax.random.normal(kx, (n, 4, 4, 2), F64), (
        jax.random.randint(ky, (n,), 0, 3))
  model, c = (Tied(), 7) if name == "tied" else (Transformer(), 3)
  return model, jax.random.randint(kx, (n, 3), 0, 7), (
      jax.random.randint(ky, (n, 3), 0, c))


def _init(model, x, seed=0):
  params = jax.jit(model.init)(jax.random.key(seed), x)["params"]
  return jax.tree.map(lambda p: p.astype(F64), params)


def split(x, y, sizes):
  """Batches of the given sizes (ragged on purpose)."""
  edges = np.cumsum([0] + list(sizes))
  return [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]


@functools.lru_cache(maxsize=None)
def fitted(name, fisher, ekfac, sizes):
  """``(model, x, y, params, tape_fn, curv)`` on 12 examples, cached."""
  model, x, y = data(name, n=12)
  params = _init(model, x)
  tape_fn = kronjax.flax.value_grad_and_tape(model, CE, fisher=fisher)
  curv = kronjax.fit_curvature(tape_fn, params, split(x, y, sizes),
                               eigenvalue_correction=ekfac)
  return model, x, y, params, tape_fn, curv


def dense_block(curv, key):
  """``U diag(Λ) Uᵀ`` of one layer, dense."""
  e = curv.factors[key]
  ua, ug = e.eigenvectors.factors
  ua = jnp.diag(ua) if ua.ndim == 1 else ua
  u = jnp.kron(ua, ug)
  return (u * curv.eigenvalues[key].reshape(-1)) @ u.T


def per_example_grads(model, params, x, y, loss=CE):
  """``{key: (N, d_A·d_G)}``: each example's NLL gradient, flat ``vec(W̄)``."""
  def nll(p, xi, yi):
    return jnp.sum(loss.per_term(model.apply({"params": p}, xi[None]),
                                 yi[None]))
  def flat(params, x, y):
    grads = jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))(params, x, y)
    return {k: jax.vmap(lambda g: _wbar(_get(g, s.path)).reshape(-1))(grads)
            for k, s in find_layers(params).items()}

  return jax.jit(flat)(params, x, y)


def assert_solve_is_dense(curv, params, damping, dense):
  """``curv.solve`` against ``(dense[key] + λI)⁻¹ vec(W̄)`` per layer."""
  got = curv.solve(params, damping)
  for key, spec in curv.specs.items():
    w = _wbar(_get(params, spec.path)).reshape(-1)
    f = dense[key]
    want = jnp.linalg.solve(f + damping * jnp.eye(f.shape[0]), w)
    np.testing.assert_allclose(_wbar(_get(got, spec.path)).reshape(-1), want,
                               rtol=1e-9, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", ["mlp", "conv", "transformer"])
def test_kfac_is_the_data_sets_blocks_and_solves_exactly(name):
  # Ragged batches: the mean must weigh them by their sizes.
  model, x, y, params, tape_fn, curv = fitted(name, "exact", False, (5, 5, 2))
  whole = kronjax.fisher_blocks(jax.jit(tape_fn)(params, x, y)[2])
  assert set(curv.specs) == {layer_key(p) for p in whole}
  for path, block in whole.items():
    got = curv.blocks()[layer_key(path)]
    for g, w in zip(got.factors, block.factors):
      np.testing.assert_allclose(g, w, atol=1e-12, err_msg=str(path))
  dense = {layer_key(p): b.to_dense() for p, b in whole.items()}
  assert_solve_is_dense(curv, params, 1e-2, dense)
  np.testing.assert_allclose(float(curv.num_examples), x.shape[0])
  want = sum(jnp.linalg.slogdet(3.0 * f + 0.1 * jnp.eye(f.shape[0]))[1]
             for f in dense.values())
  np.testing.assert_allclose(curv.logdet(0.1, scale=3.0), want, rtol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_ekfac_eigenvalues_are_the_per_example_gradients_squared(name):
  model, x, y, params, _, curv = fitted(name, "empirical", True, (6, 6))
  grads = per_example_grads(model, params, x, y)
  dense = {}
  for key in curv.specs:
    e = curv.factors[key]
    u = jnp.kron(*e.eigenvectors.factors)
    want = jnp.mean((grads[key] @ u) ** 2, axis=0)
    np.testing.assert_allclose(curv.eigenvalues[key].reshape(-1), want,
                               rtol=1e-9, atol=1e-14, err_msg=key)
    dense[key] = (u * want) @ u.T
    kfac = e.eigenvalues[0][:, None] * e.eigenvalues[1][None, :]
    assert not np.allclose(curv.eigenvalues[key], kfac)  # corrected
  assert_solve_is_dense(curv, params, 1e-3, dense)


def test_ekfac_of_an_embedding_and_the_exact_fisher():
  # Embeddings take the per-id shortcut; the exact Fisher sums its columns.
  model, x, y, params, _, curv = fitted("transformer", "exact", True, (6, 6))
  # Reference: diag(Uᵀ F U) with F the exact Fisher of the mean loss over the
  # M = N·T terms, from per-example Jacobians.
  def outputs(p, xi):
    return model.apply({"params": p}, xi[None])[0]

  @jax.jit
  def fishers(params, x):
    jac = jax.vmap(jax.jacrev(outputs), in_axes=(None, 0))(params, x)
    probs = jax.nn.softmax(jax.vmap(outputs, in_axes=(None, 0))(params, x))
    lam_out = jax.vmap(jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p)))(
        probs)
    out = {}
    for key, spec in curv.specs.items():
      j = jax.vmap(lambda g: jax.vmap(jax.vmap(
          lambda gg: _wbar(_get(gg, spec.path)).reshape(-1)))(g))(jac)
      out[key] = jnp.einsum("ntci,ntcd,ntdj->ij", j, lam_out, j) / y.size
    return out

  for key, fisher in fishers(params, x).items():
    ua, ug = curv.factors[key].eigenvectors.factors
    u = jnp.kron(jnp.diag(ua) if ua.ndim == 1 else ua, ug)
    np.testing.assert_allclose(curv.eigenvalues[key].reshape(-1),
                               jnp.diag(u.T @ fisher @ u), rtol=1e-9,
                               atol=1e-14, err_msg=key)


def test_one_compile_per_batch_shape_and_clear_errors():
  model, x, y = data("mlp", n=12)
  params = _init(model, x)
  step = kronjax.flax.value_grad_and_tape(model, CE, fisher="mc")
  traces = []

  def tape_fn(*args, **kwargs):
    traces.append(1)
    return step(*args, **kwargs)

  tape_fn.layers = step.layers
  kronjax.fit_curvature(tape_fn, params, split(x, y, [4, 4, 4]),
                        rng=jax.random.key(0), eigenvalue_correction=True)
  assert len(traces) == 2  # one per pass
  with pytest.raises(ValueError, match="rng=jax.random.key"):
    kronjax.fit_curvature(step, params, [(x, y)])
  with pytest.raises(ValueError, match="iterated twice"):
    kronjax.fit_curvature(step, params, iter([(x, y)]),
                          rng=jax.random.key(0), eigenvalue_correction=True)
  with pytest.raises(ValueError, match=r"pairs.*\[\(x, y\)\]"):
    kronjax.fit_curvature(step, params, (x, y), rng=jax.random.key(0))


def test_other_leaves_are_divided_by_the_damping():
  _, _, _, params, _, curv = fitted("mlp", "exact", False, (5, 5, 2))
  got = curv.solve(params, 0.5)
  jax.tree.map(lambda g, p: np.testing.assert_allclose(g, p / 0.5),
               got["LayerNorm_0"], params["LayerNorm_0"])
  assert curv.num_parameters == 5 * 5 + 6 * 3
  leaves = jax.tree.leaves(curv)  # a pytree of arrays: it crosses jit
  assert all(isinstance(v, jax.Array) for v in leaves)
  again = jax.jit(lambda c, p: c.solve(p, 0.5))(curv, params)
  jax.tree.map(np.testing.assert_allclose, again, got)


def test_a_scanned_stack_solves_as_its_unrolled_layers():
  from test_lifted import Stack, _data, _unrolled_params
  x, _ = _data()
  y = jnp.arange(x.shape[0]) % 3
  stacked, unrolled = Stack("scan"), Stack("unrolled")
  params = stacked.init(jax.random.key(2), x)["params"]
  curvs = [kronjax.fit_curvature(
      kronjax.flax.value_grad_and_tape(m, CE, fisher="exact"), p,
      split(x, y, [4, 2])) for m, p in ((stacked, params),
                                        (unrolled, _unrolled_params(params)))]
  assert curvs[0].specs["blocks/Dense_0"].stack == 1
  got = _unrolled_params(curvs[0].solve(params, 0.1))
  want = curvs[1].solve(_unrolled_params(params), 0.1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
               got, want)
  np.testing.assert_allclose(curvs[0].logdet(0.1), curvs[1].logdet(0.1),
                             rtol=1e-12)
