"""`Kron`: a lazy Kronecker product A₁ ⊗ A₂ ⊗ … of dense or diagonal factors.

Vectors are flattened row-major, so ``Kron(A, B) @ X.reshape(-1)`` equals
``(A @ X @ B.T).reshape(-1)`` and ``jnp.kron(A, B) @ X.reshape(-1)``: factor i
acts on axis i of the vector reshaped to ``(cols₁, cols₂, …)``. No operation but
`Kron.to_dense` forms the product.

References:
  Van Loan 2000, The ubiquitous Kronecker product. J. Comput. Appl. Math. 123.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kronjax.linalg import _factors


def _is_zero_literal(damping) -> bool:
  # A traced damping (an optax hyperparameter under jit) must not be branched
  # on, so only a Python number or None selects the undamped path statically.
  return damping is None or (
      isinstance(damping, (int, float)) and damping == 0)


def _as_tensor(v: ArrayLike, dims: tuple[int, ...], what: str) -> jax.Array:
  """Reshapes v of shape (N,) or (N, m), N = prod(dims), to (*dims[, m])."""
  v = jnp.asarray(v)
  n = math.prod(dims)
  if v.ndim not in (1, 2) or v.shape[0] != n:
    raise ValueError(
        f"{what}: expected v of shape ({n},) or ({n}, m), the product of the "
        f"factor sizes {dims}; got shape {v.shape}.")
  return v.reshape(dims + v.shape[1:])


@jax.tree_util.register_pytree_node_class
class Kron:
  """The Kronecker product A₁ ⊗ A₂ ⊗ … of its factors, never materialised.

  A factor is a 2-D (possibly rectangular) matrix or a 1-D array standing for
  the diagonal matrix with that diagonal. `Kron` is a pytree whose children are
  the factors, so it passes through `jax.jit`, `jax.vmap` and `jax.grad`.
  Operations needing square factors (solves, inverse, eigh, logdet, trace,
  diagonal) check it at trace time; those using eigh assume symmetric factors.
  A `Kron` of stacked factors, as ``jax.vmap(Kron)(a, b)`` returns, is meant
  for use inside ``jax.vmap`` (its `shape` outside reads the batch axis).

  Examples:
    >>> import jax.numpy as jnp
    >>> k = Kron(jnp.eye(2), jnp.arange(1.0, 4.0))
    >>> k
    Kron(2x2 float32, diag(3, float32); shape=(6, 6))
    >>> k @ jnp.ones(6)
    Array([1., 2., 3., 1., 2., 3.], dtype=float32)

  Attributes:
    factors: the factors, a tuple of 2-D or 1-D arrays.
  """

  __slots__ = ("factors",)
  # NumPy arrays defer `array @ kron` to `Kron.__rmatmul__`.
  __array_ufunc__ = None

  def __init__(self, *factors: ArrayLike):
    if not factors:
      raise ValueError("Kron() needs at least one factor; got none.")
    factors = tuple(jnp.asarray(f) for f in factors)
    for i, f in enumerate(factors):
      _factors.check_factor(f, i)
    self.factors = factors

  def tree_flatten(self):
    return self.factors, None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    # Skips validation: JAX rebuilds pytrees with placeholders and with
    # batched (vmapped) factors.
    k = object.__new__(cls)
    k.factors = tuple(children)
    return k

  @property
  def _factor_shapes(self) -> list[tuple[int, int]]:
    return [_factors.factor_shape(f) for f in self.factors]

  @property
  def shape(self) -> tuple[int, int]:
    """(rows, cols) of the whole product, as Python ints."""
    shapes = self._factor_shapes
    return (math.prod(r for r, _ in shapes), math.prod(c for _, c in shapes))

  @property
  def dtype(self) -> jnp.dtype:
    """The dtype the factors promote to."""
    return jnp.result_type(*self.factors)

  def __repr__(self) -> str:
    inner = ", ".join(_factors.describe(f) for f in self.factors)
    try:
      return f"Kron({inner}; shape={self.shape})"
    except (AttributeError, IndexError, TypeError):  # placeholder leaves
      return f"Kron({inner})"

  def to_dense(self) -> jax.Array:
    """The dense product (rows, cols); only for small products."""
    return functools.reduce(
        jnp.kron, [_factors.to_dense(f) for f in self.factors])

  def transpose(self) -> Kron:
    """(A₁ ⊗ A₂ ⊗ …)ᵀ = A₁ᵀ ⊗ A₂ᵀ ⊗ …."""
    return Kron(*[_factors.transpose(f) for f in self.factors])

  @property
  def T(self) -> Kron:
    """Same as `transpose`."""
    return self.transpose()

  def __matmul__(self, other):
    if isinstance(other, Kron):
      return self._kron_matmul(other)
    shapes = self._factor_shapes
    x = _as_tensor(other, tuple(c for _, c in shapes), "Kron @ v")
    y = _factors.apply_all(self.factors, x)
    return y.reshape((self.shape[0],) + y.shape[len(shapes):])

  def __rmatmul__(self, other):
    # v @ K = (Kᵀ vᵀ)ᵀ, for v of shape (N,) or (m, N) with N = rows.
    v = jnp.asarray(other)
    rows = tuple(r for r, _ in self._factor_shapes)
    if v.ndim == 2:
      v = v.T
    x = _as_tensor(v, rows, "v @ Kron")
    y = _factors.apply_all(self.factors, x, transpose=True)
    y = y.reshape((self.shape[1],) + y.shape[len(rows):])
    return y.T if y.ndim == 2 else y

  def _kron_matmul(self, other: Kron) -> Kron:
    """(A₁ ⊗ A₂ ⊗ …)(B₁ ⊗ B₂ ⊗ …) = A₁B₁ ⊗ A₂B₂ ⊗ … (mixed product)."""
    left, right = self._factor_shapes, other._factor_shapes
    if len(left) != len(right) or any(
        a[1] != b[0] for a, b in zip(left, right)):
      raise ValueError(
          "Kron @ Kron needs the same number of factors with matching inner "
          f"sizes factor by factor; got factor shapes {left} @ {right}. Use "
          "k @ other.to_dense() for a dense product.")
    return Kron(*[_factors.matmul(a, b)
                  for a, b in zip(self.factors, other.factors)])

  def inverse(self) -> Kron:
    """(A₁ ⊗ A₂ ⊗ …)⁻¹ = A₁⁻¹ ⊗ A₂⁻¹ ⊗ …; a diagonal factor stays diagonal."""
    _factors.check_square(self.factors, "Kron.inverse")
    return Kron(*[_factors.inverse(f) for f in self.factors])

  def solve(self, v: ArrayLike, damping: ArrayLike | None = 0.0) -> jax.Array:
    """Solves (A₁ ⊗ A₂ ⊗ … + damping·I) x = v exactly.

    With ``damping`` the literal 0 (or None), each factor is solved in turn,
    which needs only invertible factors. Otherwise (damping may be traced) the
    factors must be symmetric, and

    .. math::

      x = Q (Λ₁ ⊗ Λ₂ ⊗ … + \\text{damping}\\, I)^{-1} Q^\\top v,
      \\qquad Q = Q₁ ⊗ Q₂ ⊗ …,

    from the factors' eigendecompositions Aᵢ = Qᵢ Λᵢ Qᵢᵀ (see `eigh_factors`
    to compute them once and solve many times).

    Args:
      v: ``(N,)`` or ``(N, m)``, N the product of the factor sizes.
      damping: scalar added to the diagonal of the product; may be traced.

    Returns:
      x, shaped like v.
    """
    _factors.check_square(self.factors, "Kron.solve")
    x = _as_tensor(v, tuple(r for r, _ in self._factor_shapes), "Kron.solve")
    if _is_zero_literal(damping):
      for i, f in enumerate(self.factors):
        x = _factors.solve(f, x, i)
    else:
      x = _eigenbasis_solve(self.eigh_factors(), x, damping)
    return x.reshape(jnp.shape(v))

  def eigh_factors(self) -> KronEigh:
    """Eigendecomposes each (symmetric) factor with `jnp.linalg.eigh`.

    Returns:
      ``KronEigh(eigenvalues, eigenvectors)``: per-factor eigenvalues (a tuple
      of vectors, ascending for dense factors; a diagonal factor's are its
      diagonal, in order) and ``Kron(Q₁, Q₂, …)`` with a diagonal factor's Qᵢ
      the diagonal identity ``ones(n)``.
    """
    _factors.check_square(self.factors, "Kron.eigh")
    values, vectors = zip(*[_factors.eigh(f) for f in self.factors])
    return KronEigh(tuple(values), Kron(*vectors))

  def eigh(self) -> tuple[jax.Array, Kron]:
    """Eigendecomposition A₁ ⊗ A₂ ⊗ … = Q diag(λ) Qᵀ of symmetric factors.

    Returns:
      ``(λ, Q)``: λ a flat vector of length N, NOT sorted, in the row-major
      order of Q's columns, ``λ[(i₁, i₂, …)] = λ₁[i₁] λ₂[i₂] …``; Q a `Kron` of
      the factors' eigenvectors (see `eigh_factors`).
    """
    decomposition = self.eigh_factors()
    return decomposition.flat_eigenvalues(), decomposition.eigenvectors

  def slogdet(self) -> tuple[jax.Array, jax.Array]:
    """(sign, log|det|), from det(A ⊗ B) = det(A)^m det(B)^n (A n×n, B m×m)."""
    _factors.check_square(self.factors, "Kron.logdet")
    sizes = [r for r, _ in self._factor_shapes]
    total = math.prod(sizes)
    sign, logabsdet = 1.0, 0.0
    for f, n in zip(self.factors, sizes):
      s, l = _factors.slogdet(f)
      power = total // n
      sign = sign * (s if power % 2 else jnp.abs(s))
      logabsdet = logabsdet + power * l
    return jnp.asarray(sign), jnp.asarray(logabsdet)

  def logdet(self) -> jax.Array:
    """log det; NaN where the determinant is negative, -inf where zero."""
    sign, logabsdet = self.slogdet()
    return jnp.where(sign < 0, jnp.nan, logabsdet)

  def trace(self) -> jax.Array:
    """tr(A₁ ⊗ A₂ ⊗ …) = tr(A₁) tr(A₂) …."""
    _factors.check_square(self.factors, "Kron.trace")
    return math.prod(_factors.trace(f) for f in self.factors)

  def diagonal(self) -> jax.Array:
    """The diagonal, of length N: the Kronecker product of the diagonals."""
    _factors.check_square(self.factors, "Kron.diagonal")
    diagonals = [_factors.diagonal(f) for f in self.factors]
    return _factors.combine(diagonals, jnp.multiply).reshape(-1)


class KronEigh(NamedTuple):
  """A₁ ⊗ A₂ ⊗ … = Q diag(λ₁ ⊗ λ₂ ⊗ …) Qᵀ, factor by factor (a pytree).

  The expensive part of a damped solve, computed once by `Kron.eigh_factors`
  and applied by `solve` as often as needed (K-FAC refreshes it periodically;
  EKFAC rescales in the same basis).

  References:
    Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
    approximate curvature. George et al. 2018, Fast approximate natural
    gradient descent in a Kronecker-factored eigenbasis.
  """

  eigenvalues: tuple[jax.Array, ...]  # (nᵢ,) per factor
  eigenvectors: Kron  # Q₁ ⊗ Q₂ ⊗ …, Qᵢ (nᵢ, nᵢ) or ones(nᵢ) for diagonals

  def flat_eigenvalues(self) -> jax.Array:
    """λ₁ ⊗ λ₂ ⊗ …, length N, in the order of the columns of Q."""
    return _factors.combine(self.eigenvalues, jnp.multiply).reshape(-1)

  def solve(self, v: ArrayLike, damping: ArrayLike | None = 0.0) -> jax.Array:
    """x = Q (Λ₁ ⊗ Λ₂ ⊗ … + damping·I)⁻¹ Qᵀ v for v of shape (N,) or (N, m)."""
    dims = tuple(e.shape[0] for e in self.eigenvalues)
    x = _as_tensor(v, dims, "KronEigh.solve")
    return _eigenbasis_solve(self, x, damping).reshape(jnp.shape(v))


def _eigenbasis_solve(decomposition: KronEigh, x: jax.Array,
                      damping: ArrayLike | None) -> jax.Array:
  """Q (Λ + damping·I)⁻¹ Qᵀ x for x of shape (n₁, …, n_d[, m])."""
  q = decomposition.eigenvectors.factors
  x = _factors.apply_all(q, x, transpose=True)
  scale = _factors.combine(decomposition.eigenvalues, jnp.multiply)
  if damping is not None:
    scale = scale + damping
  x = x / scale.reshape(scale.shape + (1,) * (x.ndim - len(q)))
  return _factors.apply_all(q, x)
