"""Kronecker linear algebra: lazy products, damped solves, NKP, Kronecker sums.

* `Kron`: A₁ ⊗ A₂ ⊗ … of dense or diagonal (1-D) factors, never materialised;
  products, solves (damped, in the factors' eigenbases), eigh, logdet, trace.
* `nearest_kronecker_product`: best Σᵢ Aᵢ ⊗ Bᵢ to a matrix (Van Loan &
  Pitsianis 1993).
* `kron_sum_solve`: (A₁ ⊕ A₂ ⊕ … + sI) x = f by fast diagonalization (Lynch,
  Rice & Thomas 1964).

All vectors are flattened row-major: ``Kron(A, B) @ X.reshape(-1) ==
(A @ X @ B.T).reshape(-1)``.
"""

from kronjax.linalg._kron import Kron as Kron
from kronjax.linalg._kron import KronEigh as KronEigh
from kronjax.linalg._kron_sum import KronSumEigh as KronSumEigh
from kronjax.linalg._kron_sum import kron_sum_eigh as kron_sum_eigh
from kronjax.linalg._kron_sum import kron_sum_solve as kron_sum_solve
from kronjax.linalg._nkp import kron_rearrange as kron_rearrange
from kronjax.linalg._nkp import (
    nearest_kronecker_product as nearest_kronecker_product)

__all__ = [
    "Kron",
    "KronEigh",
    "KronSumEigh",
    "kron_rearrange",
    "kron_sum_eigh",
    "kron_sum_solve",
    "nearest_kronecker_product",
]
