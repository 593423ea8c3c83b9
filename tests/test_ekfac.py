"""EK-FAC as an optimizer (``eigenvalue_correction=True``) against brute force.

References: the update is ``U (diag(s) + λI)⁻¹ Uᵀ vec(Γ)`` with ``U = U_A ⊗
U_G`` from ``jnp.linalg.eigh`` of the bias-corrected averaged blocks, and
``s`` the bias-corrected moving average of ``mean_n (Uᵀ vec ∇ℓ_n)²``
(``∇ℓ_n`` from ``jax.vmap(jax.grad)`` of each example's loss, empirical
Fisher; George et al. 2018), carried into each refreshed basis as the
diagonal of the old dense ``U diag(s) Uᵀ`` there; the dense solve is
``jnp.linalg.solve``. Layers whose per-example gradients
``test_curvature`` checks through ``fit_curvature`` (embeddings, attention,
tied heads, the exact Fisher) are compared with it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import kronjax
from kronjax._params import find_layers, layer_key
from kronjax.curvature import layer_matrices
from test_curvature import CE, _init, data, per_example_grads
from test_flax_tape import _get, _wbar

F64 = jnp.float64
LAM = 1e-2


def _tx(decay, inverse_every, **kwargs):
  return kronjax.scale_by_kfac(LAM, decay=decay, inverse_every=inverse_every,
                               eigenvalue_correction=True,
                               norm_constraint=None, **kwargs)


def _eigh(m):
  return jnp.linalg.eigh(m) if m.ndim == 2 else (m, jnp.ones_like(m))


def _basis(a, g):
  """``(λ_A λ_Gᵀ flattened, U_A ⊗ U_G)`` of two averaged factors."""
  (va, ua), (vg, ug) = _eigh(a), _eigh(g)
  ua = jnp.diag(ua) if ua.ndim == 1 else ua
  return (jnp.maximum(va, 0)[:, None] * jnp.maximum(vg, 0)[None]).reshape(
      -1), jnp.kron(ua, ug)


def _dense_update(u, s, grad):
  """``(U diag(s) Uᵀ + λI)⁻¹ vec(Γ)`` by a dense solve."""
  f = (u * s) @ u.T
  return jnp.linalg.solve(f + LAM * jnp.eye(f.shape[0]), grad)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_one_step_is_the_dense_solve_of_the_squared_per_example_gradients(
    name):
  model, x, y = data(name, n=12)
  params = _init(model, x)
  tape_fn = kronjax.flax.value_grad_and_tape(model, CE, fisher="empirical")
  _, grads, tape = jax.jit(tape_fn)(params, x, y)
  tx = _tx(decay=0.0, inverse_every=1)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      curvature=tape)
  per_example = per_example_grads(model, params, x, y)
  blocks = {layer_key(p): b for p, b in kronjax.fisher_blocks(tape).items()}
  for key, spec in find_layers(params).items():
    kfac, u = _basis(*blocks[key].factors)
    s = jnp.mean((per_example[key] @ u) ** 2, axis=0)
    assert not np.allclose(s, kfac, rtol=1e-3)  # corrected: not K-FAC's
    want = _dense_update(u, s, _wbar(_get(grads, spec.path)).reshape(-1))
    np.testing.assert_allclose(_wbar(_get(updates, spec.path)).reshape(-1),
                               want, rtol=1e-8, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(
        state.inner_state.factors[key].corrections.reshape(-1), s, rtol=1e-9,
        atol=1e-14, err_msg=key)
  if "LayerNorm_0" in grads:  # parameters outside the layers pass through
    jax.tree.map(np.testing.assert_allclose, updates["LayerNorm_0"],
                 grads["LayerNorm_0"])


def test_moving_average_carried_into_each_new_basis_over_four_steps():
  # β = 0.5, a refresh every 2 steps. s is a bias-corrected moving average
  # (accumulator S, weight 1 − β^k) of the batches' squares in the basis of
  # the last refresh; a refresh replaces S by the diagonal of the old
  # U diag(S) Uᵀ in the new basis (built densely here).
  beta = 0.5
  model, x, y = data("mlp", n=24, seed=1)
  params = _init(model, x)
  tape_fn = jax.jit(kronjax.flax.value_grad_and_tape(model, CE,
                                                     fisher="empirical"))
  tx = _tx(decay=beta, inverse_every=2)
  state = tx.init(params)
  layers = find_layers(params)
  update = jax.jit(tx.update)
  per_example_fn = jax.jit(lambda p, xb, yb: per_example_grads(model, p, xb,
                                                               yb))
  acc = {k: (0.0, 0.0) for k in layers}
  basis = {k: jnp.eye(np.prod(s.factor_sizes)) for k, s in layers.items()}
  big_s = {k: jnp.zeros(np.prod(s.factor_sizes)) for k, s in layers.items()}
  for step in range(4):
    xb, yb = x[6 * step:6 * step + 6], y[6 * step:6 * step + 6]
    _, grads, tape = tape_fn(params, xb, yb)
    updates, state = update(grads, state, params, curvature=tape)
    per_example = per_example_fn(params, xb, yb)
    weight = 1 - beta ** (step + 1)
    for key, spec in layers.items():
      block = kronjax.fisher_blocks(tape)[spec.path].factors
      acc[key] = tuple(beta * o + (1 - beta) * f
                       for o, f in zip(acc[key], block))
      if step % 2 == 0:
        old = (basis[key] * big_s[key]) @ basis[key].T
        basis[key] = _basis(*(m / weight for m in acc[key]))[1]
        big_s[key] = jnp.diag(basis[key].T @ old @ basis[key])
      squares = jnp.mean((per_example[key] @ basis[key]) ** 2, axis=0)
      big_s[key] = beta * big_s[key] + (1 - beta) * squares
      want = _dense_update(basis[key], big_s[key] / weight,
                           _wbar(_get(grads, spec.path)).reshape(-1))
      np.testing.assert_allclose(
          _wbar(_get(updates, spec.path)).reshape(-1), want, rtol=1e-7,
          atol=1e-12, err_msg=f"step {step}, {key}")
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.5 * u,
                                                      updates))


@pytest.mark.parametrize("name", ["transformer", "tied"])
def test_embeddings_attention_and_tied_heads_match_fit_curvature(name):
  # One batch, no averaging: the optimizer's eigenvalues are fit_curvature's
  # EK-FAC eigenvalues (brute-forced in test_curvature), exact Fisher.
  model, x, y = data(name, n=8)
  params = _init(model, x)
  tape_fn = kronjax.flax.value_grad_and_tape(model, CE, fisher="exact")
  _, grads, tape = jax.jit(tape_fn)(params, x, y)
  layers = tape_fn.layers(params, x)
  tx = _tx(decay=0.0, inverse_every=1, layers=layers)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      curvature=tape)
  curv = kronjax.fit_curvature(tape_fn, params, [(x, y)],
                               eigenvalue_correction=True)
  assert set(curv.eigenvalues) == set(state.inner_state.factors)
  for key, want in curv.eigenvalues.items():
    np.testing.assert_allclose(state.inner_state.factors[key].corrections,
                               want, rtol=1e-8, atol=1e-13, err_msg=key)
  got, want = (layer_matrices(t, curv.specs, F64)
               for t in (updates, curv.solve(grads, LAM)))
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-7, atol=1e-12,
                               err_msg=key)


def test_adaptive_ekfac_trains_and_checkpoints():
  model, x, y = data("conv", n=32)
  x = x.astype(jnp.float32)
  params = jax.tree.map(lambda p: p.astype(jnp.float32), _init(model, x))
  tape_fn = kronjax.flax.value_grad_and_tape(model, CE, fisher="mc")
  tx = kronjax.kfac(loss=CE, eigenvalue_correction=True)

  @jax.jit
  def step(params, state, key):
    loss, grads, tape = tape_fn(params, x, y, key)
    updates, state = tx.update(
        grads, state, params, curvature=tape, targets=y,
        output_fn=lambda p: model.apply({"params": p}, x))
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for i in range(25):
    params, state, loss = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < 0.3 * losses[0], losses
  restored = serialization.from_bytes(state, serialization.to_bytes(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_clear_errors():
  model, x, y = data("mlp", n=6)
  params = _init(model, x)
  _, grads, tape = jax.jit(kronjax.flax.value_grad_and_tape(
      model, CE, fisher="empirical"))(params, x, y)
  tx = _tx(decay=0.9, inverse_every=1)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"needs this batch's tapes"):
    jax.eval_shape(lambda s, b: tx.update(grads, s, params, curvature=b),
                   state, kronjax.fisher_blocks(tape))
  kfac = kronjax.scale_by_kfac(LAM, exact_damping=True)
  with pytest.raises(ValueError, match=r"holds factors for EK-FAC, but this "
                     r"optimizer uses exact damping"):
    jax.eval_shape(lambda s: kfac.update(grads, s, params, curvature=tape),
                   state)
  from test_lifted import Stack, _data
  xs, _ = _data()
  stacked = Stack("scan")
  p = jax.eval_shape(stacked.init, jax.random.key(0), xs)["params"]
  layers = kronjax.flax.value_grad_and_tape(stacked, CE).layers(p, xs)
  with pytest.raises(ValueError, match=r"stacks of layers .*unroll"):
    _tx(decay=0.9, inverse_every=1, layers=layers).init(p)
