"""One Kronecker factor: a dense matrix, or a 1-D array standing for a diagonal.

Every operation on a Kronecker product reduces to operations on its factors, one
mode (axis) of a reshaped vector at a time. A diagonal factor is never expanded:
an embedding's input factor may be 50,000 long, and its dense square would not
fit in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def _cholesky_inverse(m: jax.Array, shift: jax.Array):
  """``(M + shift·I)⁻¹`` by Cholesky, and whether the Cholesky succeeded.

  Two triangular solves against the identity (``cho_solve``), which keep
  LAPACK's column-major layout throughout: a third less to compile than one
  solve and a product with its transpose, and faster. A failed Cholesky is
  NaN; its diagonal shows it (a finite Cholesky gives a finite inverse
  unless the shift underflows, where clipping would not help).
  """
  eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
  chol = jnp.linalg.cholesky(m + shift[..., None, None] * eye)
  inv = jax.scipy.linalg.cho_solve((chol, True), eye)
  ok = jnp.min(jnp.diagonal(chol, axis1=-2, axis2=-1)) > 0
  return (inv + jnp.swapaxes(inv, -1, -2)) / 2, ok


def _eigh_inverse(m: jax.Array, shift: jax.Array) -> jax.Array:
  """``(M₊ + shift·I)⁻¹``, ``M₊`` with its eigenvalues clipped at 0."""
  vals, vecs = jnp.linalg.eigh(m)
  scaled = vecs / (jnp.maximum(vals, 0)[..., None, :] + shift[..., None, None])
  return scaled @ jnp.swapaxes(vecs, -1, -2)


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
  inv, ok = _cholesky_inverse(m, shift)
  return jax.lax.cond(ok, lambda: inv, lambda: _eigh_inverse(m, shift))


def _groups(sizes: Sequence[int], pad: bool) -> list[list[int]]:
  """Indices of matrices to decompose together, largest sizes first.

  Without ``pad`` a group holds equal sizes; with it, a size joins the
  group of a larger one when padding costs at most 1.5× its cubic work (or
  the group's size is at most 96: such matrices cost little at any size).
  """
  order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
  groups: list[list[int]] = []
  for i in order:
    if groups:
      top = sizes[groups[-1][0]]
      if top == sizes[i] or pad and (top <= 96 or top**3 <= 1.5 * sizes[i]**3):
        groups[-1].append(i)
        continue
    groups.append([i])
  return groups


def _in_turn(fn: Callable, calls: Sequence[tuple[jax.Array, ...]]) -> list:
  """``[fn(*args) for args in calls]``, one batched call each, run one after
  another: each call's first argument depends (by adding zero) on the
  previous call's results.

  jaxlib's batched LAPACK calls on CPU (0.10) split their batch over XLA's
  intra-op thread pool and block their own worker until the batch is done:
  two such calls at once on a 2-thread pool wait on each other forever.
  XLA would run independent calls at once; the dependency orders them
  (``lax.optimization_barrier`` does not). The added zero is computed from a
  comparison, so it stays zero when a result is not finite. Several CPU
  devices share one pool and would run their calls at once: there each
  call is a ``lax.map`` of unbatched calls, which do not use the pool.
  """
  if jax.default_backend() == "cpu" and jax.local_device_count() > 1:
    return [jax.lax.map(lambda a: fn(*a), args) for args in calls]
  results: list = []
  for args in calls:
    if results:
      last = jax.tree.leaves(results[-1])[0].reshape(-1)[0]
      zero = (last != last).astype(args[0].dtype) * 0
      args = (args[0] + zero,) + tuple(args[1:])
    results.append(fn(*args))
  return results


def _flat(m: jax.Array, stack: tuple[int, ...]) -> jax.Array:
  return m.reshape((-1,) + m.shape[len(stack):])


def _split(out: jax.Array, members: list[int], shapes: list[tuple[int, ...]],
           sizes: Sequence[int]) -> dict[int, jax.Array]:
  """The group's stacked results, cut back to each member's stack and size."""
  counts = [math.prod(shapes[i]) for i in members]
  parts = jnp.split(out, np.cumsum(counts)[:-1]) if len(members) > 1 else [out]
  result = {}
  for i, part in zip(members, parts):
    d = sizes[i]
    part = part[(slice(None),) + (slice(0, d),) * (part.ndim - 1)]
    result[i] = part.reshape(shapes[i] + part.shape[1:])
  return result


def damped_inverses(ms: Sequence[jax.Array],
                    shifts: jax.Array) -> list[jax.Array]:
  """``(M_i + s_i I)⁻¹`` for many PSD ``M_i`` (each ``(..., d_i, d_i)``; the
  shifts of all, stacks flattened, in one vector) by Cholesky, in few calls:
  matrices of similar sizes are padded with an identity block (which leaves
  their inverses' leading block exact) and inverted together.

  If a Cholesky fails (``M_i`` indefinite beyond its shift, from
  round-off), all are redone with their eigenvalues clipped at 0, in one
  call over all matrices padded to the largest size: one eigendecomposition
  compiles, and runs only then.
  """
  sizes = [m.shape[-1] for m in ms]
  stacks = [m.shape[:-2] for m in ms]
  starts = np.cumsum([0] + [math.prod(s) for s in stacks])
  groups, inputs = _groups(sizes, pad=True), []
  for members in groups:
    top = sizes[members[0]]
    pad = lambda m, d: jnp.pad(m, [(0, 0)] * (m.ndim - 2) + [(0, top - d)] * 2)
    eye = lambda d, dtype: jnp.diag(jnp.arange(top) >= d).astype(dtype)
    inputs.append((jnp.concatenate([
        _flat(pad(ms[i], sizes[i]) + eye(sizes[i], ms[i].dtype), stacks[i])
        for i in members]), shifts[np.concatenate([
            np.arange(starts[i], starts[i + 1]) for i in members])]))
  tried = _in_turn(_cholesky_inverse, inputs)

  def by_eigh():  # all in one call, padded to the largest size: it is rare
    top = inputs[0][0].shape[-1]
    eye = lambda d: jnp.diag(jnp.arange(top) >= d).astype(inputs[0][0].dtype)
    mats = jnp.concatenate([jnp.pad(m, [(0, 0)] + [(0, top - m.shape[-1])] * 2)
                            + eye(m.shape[-1]) for m, _ in inputs])
    invs, = _in_turn(_eigh_inverse, [
        (mats, jnp.concatenate([s for _, s in inputs]))])
    cuts = np.cumsum([len(shift) for _, shift in inputs])[:-1]
    return [inv[:, :m.shape[-1], :m.shape[-1]] for inv, (m, _) in
            zip(jnp.split(invs, cuts), inputs)]

  invs = jax.lax.cond(jnp.all(jnp.stack([jnp.all(ok) for _, ok in tried])),
                      lambda: [inv for inv, _ in tried], by_eigh)
  out: dict[int, jax.Array] = {}
  for members, inv in zip(groups, invs):
    out.update(_split(inv, members, stacks, sizes))
  return [out[i] for i in range(len(ms))]


def eighs(ms: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
  """``jnp.linalg.eigh`` of many symmetric matrices (each ``(..., d, d)``),
  in one call per size."""
  sizes = [m.shape[-1] for m in ms]
  stacks = [m.shape[:-2] for m in ms]
  groups = _groups(sizes, pad=False)
  results = _in_turn(jnp.linalg.eigh, [
      (jnp.concatenate([_flat(ms[i], stacks[i]) for i in members]),)
      for members in groups])
  out: dict[int, tuple[jax.Array, jax.Array]] = {}
  for members, (vals, vecs) in zip(groups, results):
    vals = _split(vals, members, stacks, sizes)
    vecs = _split(vecs, members, stacks, sizes)
    out.update({i: (vals[i], vecs[i]) for i in members})
  return [out[i] for i in range(len(ms))]
