"""Tests for kronjax.linalg.Kron against dense NumPy references.

Every operation is checked against the materialised product (np.kron) on
rectangular, square, diagonal (1-D) and mixed factors, 1 to 3 of them, in
float64 on well- and ill-conditioned (condition 1e8) SPD inputs, and in float32
with looser tolerances. Tolerances for ill-conditioned solves scale with the
condition number (forward error ≲ cond·eps); backward errors do not.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronjax.linalg import Kron, KronEigh

EPS64 = np.finfo(np.float64).eps

# Factor shapes: (r, c) a dense matrix, (n,) a diagonal.
RECT_CASES = {
    "rect2": [(3, 4), (2, 5)],
    "rect3": [(2, 3), (3, 2), (2, 2)],
    "diag_dense": [(4,), (2, 3)],
    "dense_diag_dense": [(3, 2), (4,), (2, 3)],
    "one_dense": [(3, 5)],
    "one_diag": [(6,)],
}
SQUARE_CASES = {
    "two": [4, 3],
    "three": [3, 2, 4],
    "diag_dense": [(5,), 3],
    "dense_diag_dense": [3, (4,), 2],
    "one": [6],
    "all_diag": [(3,), (4,)],
}
CONDITIONS = [10.0, 1e8]


# Helpers ---------------------------------------------------------------------


def _dense(f):
  f = np.asarray(f)
  return np.diag(f) if f.ndim == 1 else f


def _kron_dense(factors):
  return functools.reduce(np.kron, [_dense(f) for f in factors])


def _random_factors(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s) for s in shapes]


def _spd(rng, n, cond):
  """Random SPD n×n with eigenvalues log-spaced in [1/cond, 1]."""
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return (q * np.logspace(0, -np.log10(cond), n)) @ q.T


def _spd_factors(spec, cond, seed=0):
  """SPD factors whose product has condition number about `cond`.

  `spec` lists sizes: an int n is a dense n×n factor, a tuple (n,) a diagonal.
  """
  rng = np.random.default_rng(seed)
  per_factor = cond ** (1.0 / len(spec))
  factors = []
  for s in spec:
    if isinstance(s, tuple):
      diagonal = np.logspace(0, -np.log10(per_factor), s[0])
      factors.append(rng.permutation(diagonal))
    else:
      factors.append(_spd(rng, s, per_factor))
  return factors


def _size(spec):
  return int(np.prod([s[0] if isinstance(s, tuple) else s for s in spec]))


def _assert_solution(dense, x, v, cond, x_ref):
  """x solves dense x = v: small backward error, forward error ≲ cond·eps."""
  x, v = np.asarray(x), np.asarray(v)
  residual = np.linalg.norm(dense @ x - v)
  scale = np.linalg.norm(dense, 2) * np.linalg.norm(x)
  assert residual <= 1e3 * EPS64 * scale
  np.testing.assert_allclose(x, x_ref, rtol=0,
                             atol=1e3 * cond * EPS64 * np.abs(x_ref).max())


# Structure, products ---------------------------------------------------------


@pytest.mark.parametrize("shapes", RECT_CASES.values(), ids=RECT_CASES.keys())
def test_products_match_dense(shapes):
  factors = _random_factors(shapes)
  k, dense = Kron(*factors), _kron_dense(factors)
  rows, cols = dense.shape
  rng = np.random.default_rng(1)
  v, m, w = (rng.standard_normal(s)
             for s in [(cols,), (cols, 3), (2, rows)])
  assert k.shape == (rows, cols) and isinstance(k.shape[0], int)
  np.testing.assert_allclose(k.to_dense(), dense, atol=1e-14)
  np.testing.assert_allclose(k @ v, dense @ v, atol=1e-12)
  np.testing.assert_allclose(k @ m, dense @ m, atol=1e-12)
  np.testing.assert_allclose(w @ k, w @ dense, atol=1e-12)
  np.testing.assert_allclose(w[0] @ k, w[0] @ dense, atol=1e-12)
  np.testing.assert_allclose(jnp.asarray(w) @ k, w @ dense, atol=1e-12)
  np.testing.assert_allclose(k.T.to_dense(), dense.T, atol=1e-14)
  np.testing.assert_allclose(k.transpose() @ w[0], dense.T @ w[0], atol=1e-12)


def test_row_major_vec_convention():
  a, b, x = _random_factors([(3, 4), (2, 5), (4, 5)])
  expected = (a @ x @ b.T).reshape(-1)
  np.testing.assert_allclose(Kron(a, b) @ x.reshape(-1), expected, atol=1e-12)
  np.testing.assert_allclose(jnp.kron(a, b) @ x.reshape(-1), expected,
                             atol=1e-12)


def test_diagonal_factor_is_never_densified():
  # A 50,000-long diagonal: a dense square would need 20 GB.
  n = 50_000
  d = jnp.linspace(1.0, 2.0, n)
  g = jnp.asarray(_spd(np.random.default_rng(0), 3, 10.0))
  k = Kron(d, g)
  v = jnp.ones(3 * n)
  x = jax.jit(lambda k, v: k.solve(v, damping=1e-3))(k, v)
  np.testing.assert_allclose(k @ x + 1e-3 * x, v, rtol=1e-10)
  lam, q = k.eigh()
  assert q.factors[0].shape == (n,) and lam.shape == (3 * n,)
  assert k.inverse().factors[0].shape == (n,)
  np.testing.assert_allclose(k.diagonal()[:3], d[0] * jnp.diagonal(g))


@pytest.mark.parametrize("left, right", [
    ([(3, 4), (2, 5)], [(4, 2), (5, 3)]),
    ([(4,), (2, 3)], [(4, 2), (3,)]),
    ([(3,), (2,)], [(3,), (2,)]),
])
def test_mixed_product(left, right):
  lf, rf = _random_factors(left, 0), _random_factors(right, 1)
  product = Kron(*lf) @ Kron(*rf)
  assert isinstance(product, Kron)
  np.testing.assert_allclose(product.to_dense(),
                             _kron_dense(lf) @ _kron_dense(rf), atol=1e-12)
  if all(len(s) == 1 for s in left + right):
    assert all(f.ndim == 1 for f in product.factors)


def test_repr_shows_factor_shapes():
  text = repr(Kron(np.ones((3, 4)), np.ones(5)))
  assert "3x4" in text and "diag(5" in text and "shape=(15, 20)" in text


# Solves, inverse, eigh, determinants -----------------------------------------


@pytest.mark.parametrize("cond", CONDITIONS)
@pytest.mark.parametrize("spec", SQUARE_CASES.values(),
                         ids=SQUARE_CASES.keys())
def test_solve_without_damping(spec, cond):
  factors = _spd_factors(spec, cond)
  k, dense = Kron(*factors), _kron_dense(factors)
  rng = np.random.default_rng(2)
  v = rng.standard_normal(dense.shape[0])
  _assert_solution(dense, k.solve(v), v, cond, np.linalg.solve(dense, v))
  m = rng.standard_normal((dense.shape[0], 2))
  np.testing.assert_allclose(
      k.solve(m), np.linalg.solve(dense, m), rtol=0,
      atol=1e3 * cond * EPS64 * np.abs(np.linalg.solve(dense, m)).max())


def test_solve_without_damping_nonsymmetric():
  a, b = _random_factors([(4, 4), (3, 3)])
  a, b = a + 4 * np.eye(4), b + 4 * np.eye(3)  # invertible, not symmetric
  v = np.random.default_rng(3).standard_normal(12)
  np.testing.assert_allclose(Kron(a, b).solve(v),
                             np.linalg.solve(np.kron(a, b), v), atol=1e-12)


@pytest.mark.parametrize("damping", [1e-3, 1.0])
@pytest.mark.parametrize("cond", CONDITIONS)
@pytest.mark.parametrize("spec", SQUARE_CASES.values(),
                         ids=SQUARE_CASES.keys())
def test_solve_with_damping(spec, cond, damping):
  factors = _spd_factors(spec, cond)
  k, dense = Kron(*factors), _kron_dense(factors) + damping * np.eye(
      _size(spec))
  v = np.random.default_rng(2).standard_normal((_size(spec), 2))
  damped_cond = (1 + damping) / (1 / cond + damping)
  x_ref = np.linalg.solve(dense, v)
  x = k.solve(v, damping=damping)
  _assert_solution(dense, x, v, damped_cond, x_ref)
  np.testing.assert_allclose(k.eigh_factors().solve(v, damping), x,
                             atol=1e-12 * np.abs(x).max())


@pytest.mark.parametrize("cond", CONDITIONS)
def test_traced_zero_damping_uses_eigenbasis_exactly(cond):
  factors = _spd_factors([4, (3,), 2], cond)
  dense = _kron_dense(factors)
  v = np.random.default_rng(4).standard_normal(24)
  x = _solve_jit(Kron(*factors), v, jnp.float64(0.0))
  _assert_solution(dense, x, v, cond, np.linalg.solve(dense, v))


@functools.partial(jax.jit)
def _solve_jit(k, v, damping):
  return k.solve(v, damping=damping)


@pytest.mark.parametrize("cond", CONDITIONS)
@pytest.mark.parametrize("spec", SQUARE_CASES.values(),
                         ids=SQUARE_CASES.keys())
def test_inverse(spec, cond):
  factors = _spd_factors(spec, cond)
  inv = Kron(*factors).inverse()
  assert [f.ndim for f in inv.factors] == [np.ndim(f) for f in factors]
  expected = np.linalg.inv(_kron_dense(factors))
  np.testing.assert_allclose(inv.to_dense(), expected, rtol=0,
                             atol=1e3 * cond * EPS64 * np.abs(expected).max())


@pytest.mark.parametrize("cond", CONDITIONS)
@pytest.mark.parametrize("spec", SQUARE_CASES.values(),
                         ids=SQUARE_CASES.keys())
def test_eigh(spec, cond):
  factors = _spd_factors(spec, cond)
  dense = _kron_dense(factors)
  lam, q = Kron(*factors).eigh()
  q_dense = q.to_dense()
  atol = 1e2 * EPS64 * dense.shape[0]
  np.testing.assert_allclose((q_dense * lam) @ q_dense.T, dense, atol=atol)
  np.testing.assert_allclose(q_dense.T @ q_dense, np.eye(dense.shape[0]),
                             atol=atol)
  np.testing.assert_allclose(np.sort(lam), np.linalg.eigvalsh(dense),
                             atol=atol)
  for f, qf in zip(factors, q.factors):
    assert qf.ndim == np.ndim(f)  # a diagonal's eigenvectors: ones(n)
  decomposition = Kron(*factors).eigh_factors()
  assert isinstance(decomposition, KronEigh)
  np.testing.assert_array_equal(decomposition.flat_eigenvalues(), lam)


@pytest.mark.parametrize("cond", CONDITIONS)
@pytest.mark.parametrize("spec", SQUARE_CASES.values(),
                         ids=SQUARE_CASES.keys())
def test_logdet_trace_diagonal(spec, cond):
  factors = _spd_factors(spec, cond)
  k, dense = Kron(*factors), _kron_dense(factors)
  _, expected = np.linalg.slogdet(dense)
  np.testing.assert_allclose(k.logdet(), expected, rtol=1e-12, atol=1e-10)
  np.testing.assert_allclose(k.trace(), np.trace(dense), rtol=1e-12)
  np.testing.assert_allclose(k.diagonal(), np.diagonal(dense), rtol=1e-12)


@pytest.mark.parametrize("spec", [[(3, 3), (2, 2)], [(3, 3), (3,)],
                                  [(2, 2), (3, 3), (2,)]])
def test_slogdet_sign_of_general_factors(spec):
  factors = _random_factors(spec, seed=5)
  k, dense = Kron(*factors), _kron_dense(factors)
  sign, logabsdet = k.slogdet()
  expected_sign, expected = np.linalg.slogdet(dense)
  assert sign == expected_sign
  np.testing.assert_allclose(logabsdet, expected, rtol=1e-12)
  assert np.isnan(k.logdet()) == (expected_sign < 0)


# Transformations: jit, vmap, grad, float32 -----------------------------------


def test_pytree_and_jit():
  factors = _spd_factors([3, (2,)], 10.0)
  k = Kron(*factors)
  leaves, treedef = jax.tree.flatten(k)
  assert len(leaves) == 2
  rebuilt = jax.tree.unflatten(treedef, leaves)
  np.testing.assert_array_equal(rebuilt.to_dense(), k.to_dense())
  v = np.ones(6)
  np.testing.assert_allclose(jax.jit(lambda k, v: k @ v)(k, v), k @ v)
  np.testing.assert_allclose(jax.jit(lambda k: k.logdet())(k), k.logdet())
  doubled = jax.jit(lambda k: jax.tree.map(lambda f: 2 * f, k))(k)
  assert isinstance(doubled, Kron)


def test_vmap_over_factors_and_vectors():
  rng = np.random.default_rng(6)
  a = np.stack([_spd(rng, 3, 10.0) for _ in range(4)])
  b = rng.uniform(1.0, 2.0, (4, 2))
  v = rng.standard_normal((4, 6))
  batched = jax.vmap(Kron)(a, b)  # a Kron of stacked factors
  x = jax.vmap(lambda k, v: k.solve(v, damping=0.1))(batched, v)
  y = jax.vmap(lambda k, v: k @ v)(batched, v)
  for i in range(4):
    dense = np.kron(a[i], np.diag(b[i]))
    np.testing.assert_allclose(x[i], np.linalg.solve(dense + 0.1 * np.eye(6),
                                                     v[i]), atol=1e-12)
    np.testing.assert_allclose(y[i], dense @ v[i], atol=1e-12)
  k = Kron(a[0], b[0])
  np.testing.assert_allclose(jax.vmap(k.solve)(v),
                             np.linalg.solve(k.to_dense(), v.T).T, atol=1e-12)


def _sym(g):
  return (g + g.T) / 2


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_grad_of_solve_matches_dense(damping):
  rng = np.random.default_rng(7)
  a, b = _spd(rng, 3, 10.0), _spd(rng, 4, 10.0)
  v, w = rng.standard_normal(12), rng.standard_normal(12)

  def kron_loss(a, b, damping):
    return w @ Kron(a, b).solve(v, damping=damping)

  def dense_loss(a, b, damping):
    return w @ jnp.linalg.solve(jnp.kron(a, b) + damping * jnp.eye(12), v)

  # A Python-float damping picks the per-factor path (0) or the eigenbasis.
  got = jax.grad(kron_loss, (0, 1))(a, b, damping)
  ref = jax.grad(dense_loss, (0, 1))(a, b, damping)
  for g, r in zip(got, ref):
    # jnp.linalg.eigh sees only the symmetric part of its input.
    np.testing.assert_allclose(_sym(g) if damping else g,
                               _sym(r) if damping else r, atol=1e-10)
  # A traced damping always takes the eigenbasis path.
  got = jax.grad(kron_loss, (0, 1, 2))(a, b, jnp.float64(damping))
  ref = jax.grad(dense_loss, (0, 1, 2))(a, b, damping)
  for g, r in zip(got[:2], ref[:2]):
    np.testing.assert_allclose(_sym(g), _sym(r), atol=1e-10)
  np.testing.assert_allclose(got[2], ref[2], rtol=1e-10)


def test_grad_of_logdet_matches_dense():
  rng = np.random.default_rng(8)
  a, d = _spd(rng, 3, 10.0), rng.uniform(0.5, 2.0, 4)
  got = jax.grad(lambda a, d: Kron(a, d).logdet(), (0, 1))(a, d)
  ref = jax.grad(lambda a, d: jnp.linalg.slogdet(jnp.kron(a, jnp.diag(d)))[1],
                 (0, 1))(a, d)
  np.testing.assert_allclose(got[0], ref[0], atol=1e-12)
  np.testing.assert_allclose(got[1], ref[1], atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_float32(damping):
  factors = _spd_factors([4, (3,), 2], 100.0)
  f32 = [jnp.asarray(f, jnp.float32) for f in factors]
  k = Kron(*f32)
  dense = _kron_dense(factors) + damping * np.eye(24)
  v = np.random.default_rng(9).standard_normal(24)
  v32 = jnp.asarray(v, jnp.float32)
  x = k.solve(v32, damping=damping)
  assert x.dtype == jnp.float32 and (k @ v32).dtype == jnp.float32
  np.testing.assert_allclose(x, np.linalg.solve(dense, v), rtol=1e-3,
                             atol=1e-3 * np.abs(x).max())
  np.testing.assert_allclose(k @ v32, _kron_dense(factors) @ v, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(k.logdet(),
                             np.linalg.slogdet(_kron_dense(factors))[1],
                             rtol=1e-5)
  lam, q = k.eigh()
  q_dense = q.to_dense()
  np.testing.assert_allclose((q_dense * lam) @ q_dense.T, _kron_dense(factors),
                             atol=1e-5)


# Bad input -------------------------------------------------------------------


def test_bad_construction():
  with pytest.raises(ValueError, match="at least one factor"):
    Kron()
  with pytest.raises(ValueError, match=r"factor 1 .* got shape \(2, 2, 2\)"):
    Kron(np.eye(2), np.ones((2, 2, 2)))
  with pytest.raises(ValueError, match=r"factor 0 .* got shape \(\)"):
    Kron(np.float64(1.0))


@pytest.mark.parametrize("v_shape", [(7,), (19, 2), (20, 2, 1)])
def test_bad_matmul_shapes(v_shape):
  k = Kron(np.ones((3, 4)), np.ones((5, 5)))
  with pytest.raises(ValueError, match=r"expected v of shape \(20,\) or "
                     r"\(20, m\).*got shape " + str(v_shape).replace("(", r"\(")
                     .replace(")", r"\)")):
    k @ np.ones(v_shape)
  with pytest.raises(ValueError, match=r"v @ Kron: expected v of shape \(15,"):
    np.ones(7) @ k
  with pytest.raises(ValueError, match=r"Kron @ v"):  # at trace time, too
    jax.jit(lambda v: k @ v)(np.ones(v_shape))


def test_bad_kron_matmul():
  with pytest.raises(ValueError, match=r"factor shapes \[\(3, 4\), \(2, 2\)\]"):
    Kron(np.ones((3, 4)), np.eye(2)) @ Kron(np.ones((3, 3)), np.eye(2))
  with pytest.raises(ValueError, match="same number of factors"):
    Kron(np.eye(6)) @ Kron(np.eye(2), np.eye(3))


def test_bad_solve_rhs():
  k = Kron(np.eye(3), np.ones(4))
  for damping in [0.0, 0.5]:
    with pytest.raises(ValueError, match=r"Kron.solve: expected v of shape "
                       r"\(12,\).*got shape \(11,\)"):
      k.solve(np.ones(11), damping=damping)
  with pytest.raises(ValueError, match=r"KronEigh.solve: expected v .*\(12,\)"):
    k.eigh_factors().solve(np.ones(13), 0.1)


@pytest.mark.parametrize("method", [
    "inverse", "eigh", "eigh_factors", "logdet", "slogdet", "trace",
    "diagonal", "solve", "solve_damped"])
def test_non_square_factors_rejected(method):
  k = Kron(np.eye(2), np.ones((2, 3)))
  call = {"solve": lambda: k.solve(np.ones(6)),
          "solve_damped": lambda: k.solve(np.ones(6), damping=0.1)}.get(
              method, lambda: getattr(k, method)())
  name = {"eigh_factors": "eigh", "slogdet": "logdet",
          "solve_damped": "solve"}.get(method, method)
  with pytest.raises(ValueError, match=rf"Kron.{name} needs square factors; "
                     r"factor 1 has shape \(2, 3\)"):
    call()
