"""The nearest Kronecker product (Van Loan & Pitsianis 1993).

min ‖M - A ⊗ B‖_F is a rank-1 approximation problem in disguise: the
rearrangement R(M), whose row (i, j) (row-major over the blocks) is the
row-major vec of the (i, j) block of M, satisfies R(A ⊗ B) = vec(A) vec(B)ᵀ and
‖R(M)‖_F = ‖M‖_F. So the SVD of R(M) gives the best sum of r Kronecker
products, and the error is the norm of the discarded singular values.

References:
  Van Loan & Pitsianis 1993, Approximation with Kronecker products. In Linear
  Algebra for Large Scale and Real-Time Applications, 293-314.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kronjax.linalg._kron import Kron


def _check_shape(shape, name: str) -> tuple[int, int]:
  shape = tuple(shape)
  if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
    raise ValueError(
        f"nearest_kronecker_product: {name} must be (rows, cols), two positive "
        f"ints; got {shape}.")
  return shape


def kron_rearrange(m: jax.Array, a_shape: tuple[int, int],
              b_shape: tuple[int, int]) -> jax.Array:
  """The rearrangement R(M), with R(A ⊗ B) = vec(A) vec(B)ᵀ.

  Args:
    m: (a_rows·b_rows, a_cols·b_cols).
    a_shape: (a_rows, a_cols).
    b_shape: (b_rows, b_cols).

  Returns:
    R(M) of shape (a_rows·a_cols, b_rows·b_cols).
  """
  (ar, ac), (br, bc) = a_shape, b_shape
  blocks = m.reshape(ar, br, ac, bc).transpose(0, 2, 1, 3)
  return blocks.reshape(ar * ac, br * bc)


def nearest_kronecker_product(m: ArrayLike, a_shape: tuple[int, int],
                              b_shape: tuple[int, int],
                              rank: int = 1) -> list[Kron]:
  """The best approximation of M by a sum of ``rank`` Kronecker products.

  Minimises ‖M - Σᵢ Aᵢ ⊗ Bᵢ‖_F over Aᵢ of shape ``a_shape`` and Bᵢ of shape
  ``b_shape``, from the truncated SVD R(M) = Σᵢ σᵢ uᵢ vᵢᵀ of the rearranged
  matrix: Aᵢ = √σᵢ·uᵢ and Bᵢ = √σᵢ·vᵢ (reshaped), so both factors of a term
  carry the same scale. The Frobenius error is the root sum of squares of the
  discarded singular values. Factors of symmetric M come out symmetric only up
  to the sign each SVD picks (their product is unaffected).

  Args:
    m: matrix of shape (a_rows·b_rows, a_cols·b_cols).
    a_shape: (a_rows, a_cols), Python ints.
    b_shape: (b_rows, b_cols), Python ints.
    rank: number of terms, 1 ≤ rank ≤ min(a_rows·a_cols, b_rows·b_cols).

  Returns:
    A list of ``rank`` `Kron(Aᵢ, Bᵢ)`, largest singular value first.

  References:
    Van Loan & Pitsianis 1993, Approximation with Kronecker products.
  """
  a_shape = _check_shape(a_shape, "a_shape")
  b_shape = _check_shape(b_shape, "b_shape")
  m = jnp.asarray(m)
  expected = (a_shape[0] * b_shape[0], a_shape[1] * b_shape[1])
  if m.shape != expected:
    raise ValueError(
        f"nearest_kronecker_product: m has shape {m.shape}, but a_shape "
        f"{a_shape} and b_shape {b_shape} need m of shape {expected}.")
  max_rank = min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1])
  if not isinstance(rank, int) or not 1 <= rank <= max_rank:
    raise ValueError(
        f"nearest_kronecker_product: rank={rank!r} must be an int between 1 "
        f"and {max_rank}, the smaller dimension of the rearranged matrix "
        f"({a_shape[0] * a_shape[1]}, {b_shape[0] * b_shape[1]}).")
  u, s, vt = jnp.linalg.svd(kron_rearrange(m, a_shape, b_shape),
                            full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return [Kron((root[i] * u[:, i]).reshape(a_shape),
               (root[i] * vt[i]).reshape(b_shape)) for i in range(rank)]
