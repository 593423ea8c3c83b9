"""One Kronecker factor: a dense matrix, or a 1-D array standing for a diagonal.

Every operation on a Kronecker product reduces to operations on its factors, one
mode (axis) of a reshaped vector at a time. A diagonal factor is never expanded:
an embedding's input factor may be 50,000 long, and its dense square would not
fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def factor_shape(f: jax.Array) -> tuple[int, int]:
  """The (rows, cols) of the matrix a factor stands for."""
  n = f.shape[0]
  return (n, n) if f.ndim == 1 else (n, f.shape[1])


def describe(f: jax.Array) -> str:
  """A short description of a factor for reprs and error messages."""
  dtype = getattr(getattr(f, "dtype", None), "name", "?")
  shape = getattr(f, "shape", None)
  if shape is None:
    return repr(f)
  if len(shape) == 1:
    return f"diag({shape[0]}, {dtype})"
  return f"{'x'.join(map(str, shape))} {dtype}"


def check_factor(f: jax.Array, index: int) -> None:
  if f.ndim not in (1, 2):
    raise ValueError(
        f"Kron: factor {index} must be a 2-D matrix or a 1-D diagonal; got "
        f"shape {f.shape}. Pass factors as separate arguments, Kron(a, b), "
        "not as one list.")


def check_square(factors: Sequence[jax.Array], what: str) -> None:
  for i, f in enumerate(factors):
    rows, cols = factor_shape(f)
    if rows != cols:
      raise ValueError(
          f"{what} needs square factors; factor {i} has shape {f.shape}.")


def _along(d: jax.Array, ndim: int, axis: int) -> jax.Array:
  """Reshapes the vector d to broadcast along `axis` of an ndim-array."""
  return d.reshape((1,) * axis + (-1,) + (1,) * (ndim - axis - 1))


def apply(f: jax.Array, x: jax.Array, axis: int,
          transpose: bool = False) -> jax.Array:
  """Multiplies `axis` of x by the factor f (or by its transpose)."""
  if f.ndim == 1:
    return x * _along(f, x.ndim, axis)
  y = jnp.tensordot(f, x, axes=(0 if transpose else 1, axis))
  return jnp.moveaxis(y, 0, axis)


def apply_all(factors: Sequence[jax.Array], x: jax.Array,
              transpose: bool = False) -> jax.Array:
  """Applies factor i to axis i of x, for every i; trailing axes ride along.

  The result does not depend on the order, so factors that shrink their axis go
  first: the intermediate tensors then stay as small as possible.
  """
  def growth(i: int) -> float:
    rows, cols = factor_shape(factors[i])
    return (cols / rows) if transpose else (rows / cols)
  for i in sorted(range(len(factors)), key=growth):
    x = apply(factors[i], x, i, transpose)
  return x


def solve(f: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  """Solves f y = x along `axis` of x (f square)."""
  if f.ndim == 1:
    return x / _along(f, x.ndim, axis)
  xm = jnp.moveaxis(x, axis, 0)
  y = jnp.linalg.solve(f, xm.reshape(f.shape[0], -1)).reshape(xm.shape)
  return jnp.moveaxis(y, 0, axis)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """The factor of the product a @ b; diagonal if both are."""
  if a.ndim == 1 and b.ndim == 1:
    return a * b
  if a.ndim == 1:
    return a[:, None] * b
  if b.ndim == 1:
    return a * b[None, :]
  return a @ b


def inverse(f: jax.Array) -> jax.Array:
  return 1.0 / f if f.ndim == 1 else jnp.linalg.inv(f)


def eigh(f: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(eigenvalues, eigenvectors) of a symmetric factor.

  A diagonal factor is its own eigenvalues, with the identity (as a diagonal of
  ones) for eigenvectors; its eigenvalues keep their order, unsorted.
  """
  if f.ndim == 1:
    return f, jnp.ones_like(f)
  return jnp.linalg.eigh(f)


def slogdet(f: jax.Array) -> tuple[jax.Array, jax.Array]:
  if f.ndim == 1:
    return jnp.prod(jnp.sign(f)), jnp.sum(jnp.log(jnp.abs(f)))
  return tuple(jnp.linalg.slogdet(f))


def trace(f: jax.Array) -> jax.Array:
  return jnp.sum(f) if f.ndim == 1 else jnp.trace(f)


def diagonal(f: jax.Array) -> jax.Array:
  return f if f.ndim == 1 else jnp.diagonal(f)


def transpose(f: jax.Array) -> jax.Array:
  return f if f.ndim == 1 else f.T


def to_dense(f: jax.Array) -> jax.Array:
  return jnp.diag(f) if f.ndim == 1 else f


def combine(vectors: Sequence[jax.Array],
            op: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """T[i1, i2, ...] = op(op(v1[i1], v2[i2]), ...), of shape (n1, n2, ...).

  With op = multiply it holds the eigenvalues of a Kronecker product, with op =
  add those of a Kronecker sum, in the row-major order of the flattened tensor.
  """
  d = len(vectors)
  out = None
  for i, v in enumerate(vectors):
    v = _along(v, d, i)
    out = v if out is None else op(out, v)
  return out


def damped_inverse(m: jax.Array, shift: jax.Array) -> jax.Array:
  """``(M + shift·I)⁻¹`` of PSD ``M`` by Cholesky; ``M`` and ``shift`` may
  carry leading stack axes (one matrix per layer of a stack), and ``M`` may
  be a diagonal (then one axis more than ``shift``, not two).

  When a Cholesky fails (``M`` indefinite beyond the shift, from round-off),
  the eigenvalues are clipped at 0 instead (for the whole stack, so that the
  eigendecompositions run only then).
  """
  if m.ndim == shift.ndim + 1:
    return 1 / (jnp.maximum(m, 0) + shift[..., None])
  shift = shift[..., None, None]
  eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
  chol = jnp.linalg.cholesky(m + shift * eye)
  root = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
  inv = jnp.swapaxes(root, -1, -2) @ root

  def by_eigh(_):
    vals, vecs = jnp.linalg.eigh(m)
    scaled = vecs / (jnp.maximum(vals, 0)[..., None, :] + shift)
    return scaled @ jnp.swapaxes(vecs, -1, -2)

  ok = jnp.all(jnp.isfinite(inv)) & (jnp.min(jnp.diagonal(
      chol, axis1=-2, axis2=-1)) > 0)
  return jax.lax.cond(
      ok, lambda _: (inv + jnp.swapaxes(inv, -1, -2)) / 2, by_eigh, None)
