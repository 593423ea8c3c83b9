"""Tests for nearest Kronecker products and Kronecker-sum solves (float64).

References are built independently in NumPy: the rearrangement block by block
with explicit loops, Kronecker sums from np.kron and identities.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronjax.linalg import (Kron, KronSumEigh, kron_rearrange, kron_sum_eigh,
                            kron_sum_solve, nearest_kronecker_product)

SHAPE_PAIRS = {
    "square": ((3, 3), (4, 4)),
    "rect": ((3, 2), (2, 5)),
    "tall_wide": ((4, 1), (1, 3)),
}


# Helpers ---------------------------------------------------------------------


def _rearrange_loops(m, a_shape, b_shape):
  """R(M) block by block: row i·ac + j is vec(block (i, j)), row-major."""
  (ar, ac), (br, bc) = a_shape, b_shape
  return np.stack([m[i * br:(i + 1) * br, j * bc:(j + 1) * bc].reshape(-1)
                   for i in range(ar) for j in range(ac)])


def _nkp_dense(terms):
  return sum(np.asarray(t.to_dense()) for t in terms)


def _spd(rng, n, cond=10.0):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return (q * np.logspace(0, -np.log10(cond), n)) @ q.T


def _second_difference(n):
  """Dirichlet 1-D -d²/dx² on n interior points, h = 1/(n+1)."""
  t = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
  return t * (n + 1) ** 2


def _kron_sum_dense(mats):
  mats = [np.diag(a) if np.ndim(a) == 1 else np.asarray(a) for a in mats]
  sizes = [a.shape[0] for a in mats]
  total = np.zeros((np.prod(sizes),) * 2)
  for i, a in enumerate(mats):
    term = [np.eye(n) for n in sizes]
    term[i] = a
    total += functools.reduce(np.kron, term)
  return total


# Nearest Kronecker product ---------------------------------------------------


@pytest.mark.parametrize("a_shape, b_shape", SHAPE_PAIRS.values(),
                         ids=SHAPE_PAIRS.keys())
def test_rearrangement(a_shape, b_shape):
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
  m = rng.standard_normal((a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]))
  np.testing.assert_array_equal(kron_rearrange(m, a_shape, b_shape),
                                _rearrange_loops(m, a_shape, b_shape))
  np.testing.assert_allclose(kron_rearrange(np.kron(a, b), a_shape, b_shape),
                             np.outer(a, b), atol=1e-14)


@pytest.mark.parametrize("a_shape, b_shape", SHAPE_PAIRS.values(),
                         ids=SHAPE_PAIRS.keys())
def test_nkp_recovers_exact_products(a_shape, b_shape):
  rng = np.random.default_rng(1)
  a1, a2 = rng.standard_normal((2,) + a_shape)
  b1, b2 = rng.standard_normal((2,) + b_shape)
  m = np.kron(a1, b1)
  (term,) = nearest_kronecker_product(m, a_shape, b_shape)
  assert isinstance(term, Kron) and term.factors[0].shape == a_shape
  np.testing.assert_allclose(term.to_dense(), m, atol=1e-12)
  if min(np.prod(a_shape), np.prod(b_shape)) >= 2:
    m2 = m + np.kron(a2, b2)
    terms = nearest_kronecker_product(m2, a_shape, b_shape, rank=2)
    np.testing.assert_allclose(_nkp_dense(terms), m2, atol=1e-12)


@pytest.mark.parametrize("a_shape, b_shape", SHAPE_PAIRS.values(),
                         ids=SHAPE_PAIRS.keys())
def test_nkp_is_optimal(a_shape, b_shape):
  rng = np.random.default_rng(2)
  m = rng.standard_normal((a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]))
  s = np.linalg.svd(_rearrange_loops(m, a_shape, b_shape), compute_uv=False)
  for rank in range(1, len(s) + 1):
    terms = nearest_kronecker_product(m, a_shape, b_shape, rank=rank)
    assert len(terms) == rank
    error = np.linalg.norm(m - _nkp_dense(terms))
    np.testing.assert_allclose(error, np.sqrt(np.sum(s[rank:] ** 2)),
                               atol=1e-12)
    for i, t in enumerate(terms):  # √σ in each factor, largest first
      for f in t.factors:
        np.testing.assert_allclose(np.linalg.norm(f), np.sqrt(s[i]),
                                   rtol=1e-12)
    if rank == 1:
      a, b = (np.asarray(f) for f in terms[0].factors)
      for trial in range(20):
        if trial < 10:  # nearby competitors
          da, db = (0.1 * rng.standard_normal(f.shape) for f in (a, b))
          competitor = np.kron(a + da, b + db)
        else:  # random ones, scaled for the best fit
          ka = np.kron(rng.standard_normal(a_shape),
                       rng.standard_normal(b_shape))
          competitor = ka * np.sum(ka * m) / np.sum(ka * ka)
        assert error <= np.linalg.norm(m - competitor) + 1e-12


def test_nkp_of_symmetric_kfac_block_under_jit_and_vmap():
  rng = np.random.default_rng(3)
  a, g = _spd(rng, 3), _spd(rng, 4)
  noise = 1e-3 * rng.standard_normal((12, 12))
  ms = np.stack([np.kron(a, g), np.kron(_spd(rng, 3), _spd(rng, 4)) + noise
                 + noise.T])
  fit = jax.jit(jax.vmap(
      lambda m: nearest_kronecker_product(m, (3, 3), (4, 4))[0].to_dense()))
  out = fit(ms)
  np.testing.assert_allclose(out[0], ms[0], atol=1e-12)
  for i in range(2):
    expected = nearest_kronecker_product(ms[i], (3, 3), (4, 4))[0].to_dense()
    np.testing.assert_allclose(out[i], expected, atol=1e-12)


def test_nkp_bad_input():
  m = np.ones((12, 10))
  with pytest.raises(ValueError, match=r"m has shape \(12, 10\).*need m of "
                     r"shape \(12, 12\)"):
    nearest_kronecker_product(m, (3, 3), (4, 4))
  with pytest.raises(ValueError, match=r"rank=5 .* between 1 and 4.*"
                     r"rearranged matrix \(6, 4\)"):
    nearest_kronecker_product(np.ones((6, 4)), (3, 2), (2, 2), rank=5)
  with pytest.raises(ValueError, match=r"rank=0"):
    nearest_kronecker_product(np.ones((6, 4)), (3, 2), (2, 2), rank=0)
  with pytest.raises(ValueError, match=r"a_shape must be \(rows, cols\)"):
    nearest_kronecker_product(np.ones((6, 6)), (6,), (1, 6))


# Kronecker sums --------------------------------------------------------------

SUM_CASES = {
    "2d_spd": lambda rng: [_spd(rng, 4), _spd(rng, 5)],
    "2d_poisson": lambda rng: [_second_difference(6), _second_difference(5)],
    "3d_poisson": lambda rng: [_second_difference(n) for n in (3, 4, 5)],
    "3d_symmetric_diag": lambda rng: [_spd(rng, 3), rng.uniform(1, 2, 4),
                                      _spd(rng, 2)],
    "1d": lambda rng: [_spd(rng, 7)],
}


@pytest.mark.parametrize("shift", [0.0, 0.7])
@pytest.mark.parametrize("case", SUM_CASES.values(), ids=SUM_CASES.keys())
def test_kron_sum_solve_matches_dense(case, shift):
  rng = np.random.default_rng(4)
  mats = case(rng)
  sizes = tuple(np.shape(a)[0] for a in mats)
  f = rng.standard_normal(sizes)
  dense = _kron_sum_dense(mats) + shift * np.eye(np.prod(sizes))
  expected = np.linalg.solve(dense, f.reshape(-1)).reshape(sizes)
  x = kron_sum_solve(mats, f, shift=shift)
  assert x.shape == sizes
  cond = np.linalg.cond(dense)
  np.testing.assert_allclose(x, expected, rtol=0,
                             atol=1e3 * cond * 2e-16 * np.abs(expected).max())


def test_kron_sum_eigh_reused_for_several_shifts():
  rng = np.random.default_rng(5)
  mats = [_spd(rng, 3), _spd(rng, 4)]
  decomposition = kron_sum_eigh(mats)
  assert isinstance(decomposition, KronSumEigh)
  f = rng.standard_normal((3, 4))
  solve = jax.jit(lambda d, f, s: d.solve(f, s))
  for shift in [0.0, 0.5, 2.0]:
    dense = _kron_sum_dense(mats) + shift * np.eye(12)
    np.testing.assert_allclose(solve(decomposition, f, shift),
                               np.linalg.solve(dense, f.reshape(-1))
                               .reshape(3, 4), atol=1e-12)


def test_kron_sum_vmap_and_grad():
  rng = np.random.default_rng(6)
  a, b = _spd(rng, 3), _spd(rng, 4)
  fs = rng.standard_normal((5, 3, 4))
  xs = jax.vmap(lambda f: kron_sum_solve([a, b], f, 0.2))(fs)
  dense = _kron_sum_dense([a, b]) + 0.2 * np.eye(12)
  np.testing.assert_allclose(xs.reshape(5, 12),
                             np.linalg.solve(dense, fs.reshape(5, 12).T).T,
                             atol=1e-12)
  w = rng.standard_normal((3, 4))

  def loss(a, b, shift):
    return jnp.sum(w * kron_sum_solve([a, b], fs[0], shift))

  def dense_loss(a, b, shift):
    total = (jnp.kron(a, jnp.eye(4)) + jnp.kron(jnp.eye(3), b)
             + shift * jnp.eye(12))
    return jnp.sum(w.reshape(-1) * jnp.linalg.solve(total, fs[0].reshape(-1)))

  got = jax.jit(jax.grad(loss, (0, 1, 2)))(a, b, 0.2)
  ref = jax.grad(dense_loss, (0, 1, 2))(a, b, 0.2)
  for g, r in zip(got[:2], ref[:2]):  # eigh sees the symmetric part only
    np.testing.assert_allclose((g + g.T) / 2, (r + r.T) / 2, atol=1e-10)
  np.testing.assert_allclose(got[2], ref[2], rtol=1e-10)


def test_kron_sum_float32():
  mats = [_second_difference(8), _second_difference(6)]
  f = np.random.default_rng(7).standard_normal((8, 6))
  x = kron_sum_solve([jnp.asarray(a, jnp.float32) for a in mats],
                     jnp.asarray(f, jnp.float32), shift=jnp.float32(1.0))
  assert x.dtype == jnp.float32
  dense = _kron_sum_dense(mats) + np.eye(48)
  expected = np.linalg.solve(dense, f.reshape(-1)).reshape(8, 6)
  np.testing.assert_allclose(x, expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


def test_kron_sum_bad_input():
  a, b = np.eye(4), np.eye(5)
  with pytest.raises(ValueError, match=r"expected f of shape \(4, 5\).*got "
                     r"shape \(5, 4\)"):
    kron_sum_solve([a, b], np.ones((5, 4)))
  with pytest.raises(ValueError, match=r"expected f of shape \(4, 5\)"):
    jax.jit(lambda f: kron_sum_solve([a, b], f))(np.ones(20))
  with pytest.raises(ValueError, match=r"needs square factors; factor 1 has "
                     r"shape \(5, 3\)"):
    kron_sum_solve([a, np.ones((5, 3))], np.ones((4, 5)))
  with pytest.raises(ValueError, match=r"mats\[0\] must be .* got shape "
                     r"\(2, 2, 2\)"):
    kron_sum_solve([np.ones((2, 2, 2))], np.ones(2))
  with pytest.raises(ValueError, match="mats is empty"):
    kron_sum_solve([], np.ones(()))
