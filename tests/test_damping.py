"""The default damping is relative to each layer's curvature (float64).

``damping=None``: the fixed step's ``λ_l = 0.1 (tr Ā_l / d_A)(tr Ḡ_l / d_G)``
per layer; the adaptive step's first ``λ = 0.1 × mean_l`` of the same. A float
stays an absolute ``λ``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _transform_helpers import (CE, dense_solve, loss_grads_blocks, mlp_apply,
                                mlp_init, random_spd, scale_by_kfac, toy_data)
from kronjax.linalg import Kron
from kronjax.transform import scale_by_adaptive_kfac

F64 = dict(factor_dtype=jnp.float64, decay=0.0, inverse_every=1)


def _scale(a, g):
  return (np.trace(a) / a.shape[0]) * (np.trace(g) / g.shape[0])


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  grads = {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 2))),
                 "bias": jnp.asarray(rng.normal(size=2))},
           "b": {"kernel": jnp.asarray(rng.normal(size=(2, 4)))}}
  blocks = {("a",): (random_spd(rng, 4, 0.01), random_spd(rng, 2, 50.0)),
            ("b",): (random_spd(rng, 2, 3.0), random_spd(rng, 4, 1e-3))}
  return grads, blocks


def _matrix(layer):
  rows = [np.asarray(layer["kernel"])]
  if "bias" in layer:
    rows.append(np.asarray(layer["bias"])[None])
  return np.concatenate(rows)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "pi_split"])
def test_fixed_step_damps_each_layer_relative_to_its_scale(exact):
  grads, blocks = _problem()
  tx = scale_by_kfac(exact_damping=exact, **F64)  # damping=None
  out, _ = tx.update(grads, tx.init(grads), grads, curvature={
      k: Kron(a, g) for k, (a, g) in blocks.items()})
  for (name,), (a, g) in blocks.items():
    expected = dense_solve(a, g, _matrix(grads[name]), 0.1 * _scale(a, g),
                           exact)
    np.testing.assert_allclose(_matrix(out[name]), expected, rtol=1e-10)


def test_relative_damping_uses_the_bias_corrected_averages():
  grads, blocks = _problem()
  tx = scale_by_kfac(exact_damping=True, factor_dtype=jnp.float64,
                     decay=0.5, inverse_every=1)
  state = tx.init(grads)
  for c in (1.0, 3.0):  # averages (after bias correction): 2c/3 + c/3 ...
    out, state = tx.update(grads, state, grads, curvature={
        k: Kron(c * a, g) for k, (a, g) in blocks.items()})
  for (name,), (a, g) in blocks.items():
    mean_a = (0.5 * 1.0 * a + 1.0 * 3.0 * a) / 1.5  # weights 0.25, 0.5 / 0.75
    expected = dense_solve(mean_a, g, _matrix(grads[name]),
                           0.1 * _scale(mean_a, g), True)
    np.testing.assert_allclose(_matrix(out[name]), expected, rtol=1e-10)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "pi_split"])
def test_a_loss_scaled_by_any_constant_takes_the_same_fixed_step(exact):
  # F -> cF and g -> cg: (cF + cλ)⁻¹ cg = (F + λ)⁻¹ g, but only if λ -> cλ.
  grads, blocks = _problem(1)
  tx = scale_by_kfac(exact_damping=exact, **F64)
  steps = []
  for c in (1.0, 1e4, 1e-4):
    out, _ = tx.update(jax.tree.map(lambda x: c * x, grads), tx.init(grads),
                       grads, curvature={k: Kron(a, c * g)
                                         for k, (a, g) in blocks.items()})
    steps.append(out)
  for other in steps[1:]:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-8),
                 steps[0], other)


def test_a_float_damping_stays_absolute():
  grads, blocks = _problem()
  tx = scale_by_kfac(damping=0.3, exact_damping=True, **F64)
  out, _ = tx.update(grads, tx.init(grads), grads, curvature={
      k: Kron(a, g) for k, (a, g) in blocks.items()})
  a, g = blocks[("b",)]
  np.testing.assert_allclose(_matrix(out["b"]),
                             dense_solve(a, g, _matrix(grads["b"]), 0.3),
                             rtol=1e-10)


def test_adaptive_first_damping_is_relative_to_the_mean_scale():
  x, y = toy_data(jax.random.key(0), n=16, d=4, dtype=jnp.float64)
  params = mlp_init(jax.random.key(1), [4, 5, 3], dtype=jnp.float64)
  value, grads, blocks = loss_grads_blocks(mlp_apply, params, x, y)
  scales = [_scale(np.asarray(k.factors[0]), np.asarray(k.factors[1]))
            for k in blocks.values()]
  first = 0.1 * np.mean(scales)
  run = lambda tx: tx.update(
      grads, tx.init(params), params, curvature=blocks,
      output_fn=lambda p: mlp_apply(p, x), targets=y)
  relative, _ = run(scale_by_adaptive_kfac(CE, exact_damping=True, **F64))
  absolute, _ = run(scale_by_adaptive_kfac(CE, damping=first,
                                           exact_damping=True, **F64))
  assert value > 0 and first > 0
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-10),
               relative, absolute)
  nearby, _ = run(scale_by_adaptive_kfac(CE, damping=2 * first,
                                         exact_damping=True, **F64))
  assert not np.allclose(nearby["Dense_0"]["kernel"],
                         relative["Dense_0"]["kernel"], rtol=1e-6)
