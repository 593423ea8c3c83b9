"""influence_scores against dense per-example gradients and a dense solve.

Reference: ``∇ℓ(q)ᵀ (F + λI)⁻¹ ∇ℓ(z)`` with ``∇ℓ`` from ``jax.vmap(jax.grad)``
of each example's NLL (summed over its tokens), flattened layer by layer as
``vec(W̄)``, and ``F`` the curvature's blocks formed densely.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kronjax
from kronjax import _per_example
from test_curvature import (CE, data, dense_block, fitted, per_example_grads,
                            split)

DAMPING = 1e-2


def dense_scores(curv, model, params, queries, x, y):
  @jax.jit
  def scores(curv, g):
    total = 0
    for key in curv.specs:
      f = dense_block(curv, key)
      gq, gz = g[key][:len(queries[1])], g[key][len(queries[1]):]
      pre = jnp.linalg.solve(f + DAMPING * jnp.eye(f.shape[0]), gq.T)
      total = total + pre.T @ gz.T
    return total

  both = [jnp.concatenate([q, t]) for q, t in zip(queries, (x, y))]
  return scores(curv, per_example_grads(model, params, *both))


# The curvatures of test_curvature.py (K-FAC and EK-FAC, K-FAC's blocks
# being exact or empirical: the scores do not care), and a tied embedding.
CASES = {"mlp": ("exact", False, (5, 5, 2)), "conv": ("empirical", True, (6, 6)),
         "transformer": ("exact", True, (6, 6)), "tied": ("exact", True, (6, 6))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scores_equal_the_dense_computation(name):
  model, x, y, params, _, curv = fitted(name, *CASES[name])
  queries = data(name, n=5, seed=1)[1:]
  want = dense_scores(curv, model, params, queries, x, y)
  # Any Fisher mode, given the loss; blocks of 2 queries (3 blocks, padded).
  exact = kronjax.flax.value_grad_and_tape(model, CE, fisher="exact")
  got = kronjax.influence_scores(curv, exact, params, queries,
                                 split(x, y, [5, 5, 2]), damping=DAMPING,
                                 loss=CE, query_block=2)
  assert got.shape == (5, 12)
  np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
  if name == "mlp":  # an empirical tape function needs no loss
    empirical = kronjax.flax.value_grad_and_tape(model, CE,
                                                 fisher="empirical")
    got = kronjax.influence_scores(curv, empirical, params, queries,
                                   split(x, y, [6, 6]), damping=DAMPING)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


class NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(4, 5, rngs=rngs, param_dtype=jnp.float64)
    self.b = nnx.Linear(5, 3, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


def test_nnx_tape_functions_score_with_the_empirical_fisher():
  _, x, y = data("mlp", n=8)
  module = NnxMlp(nnx.Rngs(0))
  tape_fn = kronjax.flax.value_grad_and_tape(module, CE, fisher="empirical")
  curv = kronjax.fit_curvature(tape_fn, module, [(x, y)])
  got = kronjax.influence_scores(curv, tape_fn, module, (x[:3], y[:3]),
                                 [(x, y)], damping=DAMPING, loss=CE)
  params = nnx.state(module, nnx.Param)

  def nll(p, xi, yi):
    return CE(nnx.merge(nnx.graphdef(module), p)(xi[None]), yi[None])

  grads = jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))(params, x, y)
  flat = {k: jnp.concatenate([grads[k]["kernel"][...],
                              grads[k]["bias"][...][:, None]],
                             axis=1).reshape(8, -1) for k in "ab"}
  want = sum(flat[k][:3] @ jnp.linalg.solve(
      dense_block(curv, k) + DAMPING * jnp.eye(flat[k].shape[1]), flat[k].T)
             for k in "ab")
  np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
  for fisher in ("mc", "exact"):  # switched to "empirical" by with_fisher
    tape_fn = kronjax.flax.value_grad_and_tape(module, CE, fisher=fisher)
    np.testing.assert_allclose(kronjax.influence_scores(
        curv, tape_fn, module, (x[:3], y[:3]), [(x, y)], damping=DAMPING),
                               want, rtol=1e-8, atol=1e-10)

    def bare(*args, tape_fn=tape_fn, **kwargs):  # it cannot switch itself
      return tape_fn(*args, **kwargs)

    bare.fisher, bare.layers = fisher, tape_fn.layers
    with pytest.raises(ValueError, match="loss=kronjax.losses"):
      kronjax.influence_scores(curv, bare, module, (x, y), [(x, y)],
                               damping=DAMPING)


def test_pure_jax_model_and_per_token_scaling():
  # kronjax.nn, a squared-error loss over 2 terms per example: each
  # example's loss is the sum of its terms.
  def apply(p, x):
    h = jnp.tanh(kronjax.nn.dense(x, p["a"]["kernel"], p["a"]["bias"]))
    return kronjax.nn.dense(h, p["b"]["kernel"], p["b"]["bias"])

  keys = jax.random.split(jax.random.key(3), 4)
  params = {"a": {"kernel": jax.random.normal(keys[0], (3, 4)),
                  "bias": jnp.zeros(4)},
            "b": {"kernel": jax.random.normal(keys[1], (4, 2)),
                  "bias": jnp.ones(2)}}
  x = jax.random.normal(keys[2], (8, 2, 3))
  y = jax.random.normal(keys[3], (8, 2, 2))
  loss = kronjax.losses.squared_error
  tape_fn = kronjax.nn.value_grad_and_tape(apply, loss, fisher="exact")
  curv = kronjax.fit_curvature(tape_fn, params, [(x, y)])
  got = kronjax.influence_scores(curv, tape_fn, params, (x[:3], y[:3]),
                                 [(x, y)], damping=DAMPING, loss=loss)

  def nll(p, xi, yi):
    return jnp.sum(loss.per_term(apply(p, xi[None]), yi[None]))

  grads = jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))(params, x, y)
  flat = {k: jnp.concatenate([grads[k]["kernel"], grads[k]["bias"][:, None]],
                             axis=1).reshape(8, -1) for k in "ab"}
  want = sum(flat[k][:3] @ jnp.linalg.solve(
      dense_block(curv, k) + DAMPING * jnp.eye(flat[k].shape[1]), flat[k].T)
             for k in "ab")
  np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("d_a,d_g,t,q,ids", [
    (6, 3, 4, 2, False),    # the per-example matrices (d <= q T)
    (9, 3, 1, 2, False),    # factored, rows first (d_A >= d_G)
    (3, 9, 1, 2, False),    # factored, columns first
    (20, 3, 2, 2, True),    # an embedding: rows of M looked up by id
    (4, 3, 3, 2, True)])    # an embedding's per-example matrices
def test_every_way_to_score_is_the_inner_product(d_a, d_g, t, q, ids):
  k = jax.random.split(jax.random.key(0), 3)
  n = 5
  rows = (jax.random.randint(k[0], (n, t), 0, d_a) if ids
          else jax.random.normal(k[0], (1, n, t, d_a)))
  use = _per_example.Use(rows, jax.random.normal(k[1], (1, n, t, d_g)))
  m = jax.random.normal(k[2], (q, d_a, d_g))
  dense = jax.nn.one_hot(rows, d_a)[None] if ids else rows
  grads = jnp.einsum("snta,sntg->nag", dense, use.cols)
  got = jax.jit(lambda u, m: _per_example.scorer([u, u], q, d_a, d_g)(m))(
      use, m)
  np.testing.assert_allclose(got, 2 * jnp.einsum("nag,qag->qn", grads, m),
                             rtol=1e-12)
