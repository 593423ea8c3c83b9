"""Kronecker-sum solves by fast diagonalization (Lynch, Rice & Thomas 1964).

The Kronecker sum A₁ ⊕ A₂ ⊕ … = A₁ ⊗ I ⊗ … + I ⊗ A₂ ⊗ … + … acts on a tensor
x of shape (n₁, n₂, …) with Aᵢ along axis i (row-major, as `Kron`), e.g. the
finite-difference Laplacian on a tensor grid. With Aᵢ = Qᵢ Λᵢ Qᵢᵀ,

.. math::

  (A_1 \\oplus A_2 \\oplus \\dots + sI)^{-1} f
    = Q\\,\\big[(Q^\\top f) / (λ_1[i_1] + λ_2[i_2] + \\dots + s)\\big],
  \\qquad Q = Q_1 ⊗ Q_2 ⊗ \\dots,

which costs d eigendecompositions of nᵢ×nᵢ matrices and 2d mode products.

References:
  Lynch, Rice & Thomas 1964, Direct solution of partial difference equations
  by tensor product methods. Numer. Math. 6.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kronjax.linalg import _factors
from kronjax.linalg._kron import Kron


def _check_mats(mats: Sequence[ArrayLike]) -> list[jax.Array]:
  mats = [jnp.asarray(a) for a in mats]
  if not mats:
    raise ValueError("kron_sum_solve: mats is empty; pass at least one matrix.")
  for i, a in enumerate(mats):
    if a.ndim not in (1, 2):
      raise ValueError(
          f"kron_sum_solve: mats[{i}] must be a square matrix or a 1-D "
          f"diagonal; got shape {a.shape}.")
  _factors.check_square(mats, "kron_sum_solve")
  return mats


def _check_rhs(f: ArrayLike, dims: tuple[int, ...]) -> jax.Array:
  f = jnp.asarray(f)
  if f.shape != dims:
    raise ValueError(
        f"kron_sum_solve: expected f of shape {dims} (the matrices' sizes); "
        f"got shape {f.shape}.")
  return f


class KronSumEigh(NamedTuple):
  """A₁ ⊕ A₂ ⊕ … = Q diag(λ₁ ⊕ λ₂ ⊕ …) Qᵀ, factor by factor (a pytree).

  The one-off part of `kron_sum_solve`: compute it with `kron_sum_eigh`, then
  `solve` for many right-hand sides or shifts.
  """

  eigenvalues: tuple[jax.Array, ...]  # (nᵢ,) per matrix
  eigenvectors: Kron  # Q₁ ⊗ Q₂ ⊗ …, Qᵢ (nᵢ, nᵢ) or ones(nᵢ) for diagonals

  def solve(self, f: ArrayLike, shift: ArrayLike = 0.0) -> jax.Array:
    """x with (A₁ ⊕ A₂ ⊕ … + shift·I) x = f, f and x of shape (n₁, n₂, …)."""
    f = _check_rhs(f, tuple(e.shape[0] for e in self.eigenvalues))
    q = self.eigenvectors.factors
    x = _factors.apply_all(q, f, transpose=True)
    x = x / (_factors.combine(self.eigenvalues, jnp.add) + shift)
    return _factors.apply_all(q, x)


def kron_sum_eigh(mats: Sequence[ArrayLike]) -> KronSumEigh:
  """Eigendecomposes each symmetric matrix of a Kronecker sum.

  Args:
    mats: symmetric square matrices A₁, A₂, … (nᵢ, nᵢ), or 1-D arrays standing
      for diagonal ones; at least one.

  Returns:
    ``KronSumEigh(eigenvalues, eigenvectors)``, the per-matrix eigenvalues and
    ``Kron(Q₁, Q₂, …)``.
  """
  mats = _check_mats(mats)
  values, vectors = zip(*[_factors.eigh(a) for a in mats])
  return KronSumEigh(tuple(values), Kron(*vectors))


def kron_sum_solve(mats: Sequence[ArrayLike], f: ArrayLike,
                   shift: ArrayLike = 0.0) -> jax.Array:
  """Solves (A₁ ⊕ A₂ ⊕ … + shift·I) x = f by fast diagonalization.

  A ⊕ B = A ⊗ I + I ⊗ B with the row-major convention of `Kron`: A₁ acts on the
  first axis of f. For example, the 2-D Dirichlet Poisson problem -Δu = f on an
  n×n grid is ``kron_sum_solve([t, t], f)`` with ``t`` the n×n second-difference
  matrix tridiag(-1, 2, -1) / h².

  Args:
    mats: symmetric matrices Aᵢ (nᵢ, nᵢ), or 1-D arrays for diagonal ones.
    f: right-hand side of shape (n₁, n₂, …).
    shift: scalar added to the diagonal; may be traced.

  Returns:
    x of shape (n₁, n₂, …).

  References:
    Lynch, Rice & Thomas 1964, Direct solution of partial difference equations
    by tensor product methods. Numer. Math. 6.
  """
  mats = _check_mats(mats)
  # Checks f before the eighs run: a wrong f should fail before any work.
  _check_rhs(f, tuple(a.shape[0] for a in mats))
  return kron_sum_eigh(mats).solve(f, shift)
