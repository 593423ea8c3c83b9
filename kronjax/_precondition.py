"""Layers of a params tree, their Kronecker-factor state and preconditioning.

The expensive, cached part of K-FAC (moving averages of the factors and their
eigendecompositions, or their damped inverses) lives in one small NamedTuple
per layer; the cheap part is :func:`precondition`. With exact damping it is a
solve in the factors' eigenbases (four matmuls),

.. math::

  (A \\otimes G + λ I)^{-1} \\operatorname{vec}(Γ)
  = \\operatorname{vec}\\Big(U_A \\Big[\\frac{U_A^\\top Γ U_G}
    {λ_A λ_G^\\top + λ}\\Big] U_G^\\top\\Big),

with ``Γ`` the gradient of the layer's combined matrix ``W̄`` (kernel rows, then
the bias row; see ``../shared/DESIGN.md``) and the division elementwise. With
the π-corrected split it is two matmuls with inverses cached at refresh time
(by Cholesky, a third of the cost of ``eigh``),

.. math::

  \\big((A + π\\sqrt{λ} I) \\otimes (G + \\tfrac{\\sqrt{λ}}{π} I)\\big)^{-1}
  \\operatorname{vec}(Γ)
  = \\operatorname{vec}\\big((A + π\\sqrt{λ} I)^{-1}\\, Γ\\,
    (G + \\tfrac{\\sqrt{λ}}{π} I)^{-1}\\big).

``A ⊗ G`` is never formed.

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature. George et al. 2018, Fast approximate natural gradient
  descent in a Kronecker-factored eigenbasis.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from kronjax._paths import key_name

LayerPath = tuple[Any, ...]
LayerKind = Literal["dense", "embed"]


class LayerSpec(NamedTuple):
  """A candidate layer found in a params tree (static, from shapes only).

  Attributes:
    path: the layer's path, e.g. ``("Encoder_0", "Dense_1")``.
    kind: ``"dense"`` (dense, dense-general, convolution) or ``"embed"``.
    kernel: shape of the ``kernel`` (``(*in_dims, *out_dims)``) or of the
      ``embedding`` (``(vocab, d)``).
    bias: shape of the ``bias`` (``out_dims``), or ``None``.
  """

  path: LayerPath
  kind: LayerKind
  kernel: tuple[int, ...]
  bias: tuple[int, ...] | None

  @property
  def d_out(self) -> int:
    if self.kind == "embed":
      return self.kernel[-1]
    return math.prod(self.bias) if self.bias is not None else self.kernel[-1]

  @property
  def d_in(self) -> int:
    """Rows of ``W̄``: inputs, plus one for the bias."""
    rows = math.prod(self.kernel) // self.d_out
    return rows + (self.bias is not None)

  @property
  def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, int]]:
    """The shapes that ``A`` and ``G`` must have."""
    a = (self.d_in,) if self.kind == "embed" else (self.d_in, self.d_in)
    return a, (self.d_out, self.d_out)


class LayerFactors(NamedTuple):
  """Factor state of a dense-like layer (dense ``A``)."""

  a: jax.Array  # (d_in, d_in) factor_dtype: EMA accumulator of A.
  g: jax.Array  # (d_out, d_out) factor_dtype: EMA accumulator of G.
  weight: jax.Array  # () factor_dtype: accumulated EMA weight, 1 - decay^k.
  a_eigvals: jax.Array  # (d_in,) factor_dtype: clipped eigenvalues of A.
  a_eigvecs: jax.Array  # (d_in, d_in) factor_dtype: eigenvectors of A.
  g_eigvals: jax.Array  # (d_out,) factor_dtype: clipped eigenvalues of G.
  g_eigvecs: jax.Array  # (d_out, d_out) factor_dtype: eigenvectors of G.


class EmbeddingFactors(NamedTuple):
  """Factor state of an embedding (diagonal ``A``: its own eigenvalues)."""

  a: jax.Array  # (vocab,) factor_dtype: EMA accumulator of diag(A).
  g: jax.Array  # (d, d) factor_dtype: EMA accumulator of G.
  weight: jax.Array  # () factor_dtype: accumulated EMA weight, 1 - decay^k.
  a_eigvals: jax.Array  # (vocab,) factor_dtype: clipped diag(A).
  g_eigvals: jax.Array  # (d,) factor_dtype: clipped eigenvalues of G.
  g_eigvecs: jax.Array  # (d, d) factor_dtype: eigenvectors of G.


class InverseFactors(NamedTuple):
  """Factor state for the π-corrected split: cached damped inverses.

  Embeddings keep ``a`` and ``a_inv`` as vectors (diagonal ``A``).
  """

  a: jax.Array  # (d_in, d_in) or (vocab,) factor_dtype: EMA accumulator of A.
  g: jax.Array  # (d_out, d_out) factor_dtype: EMA accumulator of G.
  weight: jax.Array  # () factor_dtype: accumulated EMA weight, 1 - decay^k.
  a_inv: jax.Array  # like a: (Ā + π√λ I)⁻¹ at the last refresh.
  g_inv: jax.Array  # (d_out, d_out): (Ḡ + √λ/π I)⁻¹ at the last refresh.


Factors = LayerFactors | EmbeddingFactors | InverseFactors


def layer_key(path: LayerPath) -> str:
  """The state key of a layer: its path joined by ``/`` (msgpack-safe)."""
  return "/".join(str(p) for p in path)


def tree_paths(tree: Any) -> tuple[list[tuple[LayerPath, Any]], Any]:
  """``[(path, leaf)]`` of a pytree and its treedef.

  NNX Variables flatten to their ``value`` attribute; that key is dropped so a
  path ends at the parameter's name, as for linen's nested dicts.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for key_path, leaf in flat:
    keys = [k for k in key_path if not (
        isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")]
    out.append((tuple(key_name(k) for k in keys), leaf))
  return out, treedef


def find_layers(tree: Any) -> dict[str, LayerSpec]:
  """Candidate layers of a params (or updates) tree, keyed by :func:`layer_key`.

  A node holding a ``kernel`` of rank >= 2 is dense-like (its sibling ``bias``,
  if any, belongs to it); a node holding a 2-D ``embedding`` is an embedding.
  """
  leaves = {path: leaf for path, leaf in tree_paths(tree)[0]}
  layers = {}
  for path, leaf in leaves.items():
    if not path or not hasattr(leaf, "shape"):
      continue
    parent, name = path[:-1], path[-1]
    if name == "kernel" and len(leaf.shape) >= 2:
      bias = leaves.get(parent + ("bias",))
      layers[layer_key(parent)] = LayerSpec(
          parent, "dense", tuple(leaf.shape),
          None if bias is None else tuple(bias.shape))
    elif name == "embedding" and len(leaf.shape) == 2:
      layers[layer_key(parent)] = LayerSpec(
          parent, "embed", tuple(leaf.shape), None)
  return layers


def owner(path: LayerPath, layers: dict[str, LayerSpec]) -> str | None:
  """The key of the layer that owns the parameter at ``path``, if any."""
  if not path:
    return None
  key = layer_key(path[:-1])
  spec = layers.get(key)
  if spec is None:
    return None
  names = ("embedding",) if spec.kind == "embed" else ("kernel", "bias")
  return key if path[-1] in names else None


def _layer_index(tree: Any, layers: dict[str, LayerSpec]):
  """Treedef, flat leaves and ``{key: {name: leaf_index}}`` of ``layers``."""
  flat, treedef = tree_paths(tree)
  index: dict[str, dict[str, int]] = {}
  for i, (path, _) in enumerate(flat):
    key = owner(path, layers)
    if key is not None:
      index.setdefault(key, {})[path[-1]] = i
  return treedef, [leaf for _, leaf in flat], index


def map_layers(fn, tree: Any, layers: dict[str, LayerSpec]) -> Any:
  """Replaces each layer's leaves by ``fn(key, {name: leaf})``; others stay."""
  treedef, leaves, index = _layer_index(tree, layers)
  for key, names in index.items():
    new = fn(key, {n: leaves[i] for n, i in names.items()})
    for n, i in names.items():
      leaves[i] = new[n]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def layer_leaves(tree: Any, layers: dict[str, LayerSpec]) -> list[jax.Array]:
  """The leaves of ``tree`` that belong to ``layers``."""
  _, leaves, index = _layer_index(tree, layers)
  return [leaves[i] for names in index.values() for i in names.values()]


def init_factors(spec: LayerSpec, dtype: Any, exact_damping: bool = True
                 ) -> Factors:
  """Zero factors and identity eigenbases (or inverses) for one layer."""
  a_shape, (d_g, _) = spec.factor_shapes
  d_a = a_shape[0]
  zeros = lambda *shape: jnp.zeros(shape, dtype)
  if not exact_damping:
    a_eye = (jnp.ones(d_a, dtype) if spec.kind == "embed"
             else jnp.eye(d_a, dtype=dtype))
    return InverseFactors(zeros(*a_shape), zeros(d_g, d_g), zeros(), a_eye,
                          jnp.eye(d_g, dtype=dtype))
  g_parts = (zeros(d_g), jnp.eye(d_g, dtype=dtype))
  if spec.kind == "embed":
    return EmbeddingFactors(zeros(d_a), zeros(d_g, d_g), zeros(), zeros(d_a),
                            *g_parts)
  return LayerFactors(zeros(d_a, d_a), zeros(d_g, d_g), zeros(), zeros(d_a),
                      jnp.eye(d_a, dtype=dtype), *g_parts)


def check_block(path: LayerPath, layers: dict[str, LayerSpec],
                a: jax.Array, g: jax.Array) -> LayerSpec:
  """Checks one block against the parameters at trace time.

  Returns:
    The layer's spec.

  Raises:
    ValueError: the path is not a layer of ``params``, or the factor shapes
      disagree with the parameter shapes.
  """
  spec = layers.get(layer_key(path))
  if spec is None:
    raise ValueError(
        f"curvature has a block for layer {path}, which is not a layer of the "
        f"params (a node with a 'kernel' of rank >= 2 or a 2-D 'embedding'). "
        f"Known layers: {[s.path for s in layers.values()]}.")
  expected = spec.factor_shapes
  if (tuple(a.shape), tuple(g.shape)) != expected:
    params = (f"embedding {spec.kernel}" if spec.kind == "embed" else
              f"kernel {spec.kernel}, bias {spec.bias}")
    raise ValueError(
        f"The block for layer {path} has factors A {tuple(a.shape)} and G "
        f"{tuple(g.shape)}, but the layer's parameters ({params}) need A "
        f"{expected[0]} and G {expected[1]}.")
  return spec


def update_factors(f: Factors, a: jax.Array, g: jax.Array,
                   decay: jax.Array) -> Factors:
  """One step of the moving averages, tracking their accumulated weight.

  .. math::

    \\bar A_k = β \\bar A_{k-1} + (1 - β) A, \\qquad
    w_k = β w_{k-1} + (1 - β) = 1 - β^k,

  and ``Ā_k / w_k`` is the bias-corrected average (exact from the first step).
  """
  decay = jnp.asarray(decay, f.a.dtype)

  def ema(old, new):  # a stored factor may be zero-padded (_placement)
    new = jnp.pad(new.astype(old.dtype),
                  [(0, s - d) for d, s in zip(new.shape, old.shape)])
    return decay * old + (1 - decay) * new

  return f._replace(a=ema(f.a, a), g=ema(f.g, g),
                    weight=decay * f.weight + (1 - decay))


def refresh_eigh(f: Factors, min_eigenvalue: jax.Array) -> Factors:
  """Eigendecompositions of the bias-corrected factors, eigenvalues clipped."""
  a, g = _corrected(f)
  floor = jnp.asarray(min_eigenvalue, f.a.dtype)
  g_vals, g_vecs = jnp.linalg.eigh(g)
  f = f._replace(g_eigvals=jnp.maximum(g_vals, floor), g_eigvecs=g_vecs)
  if isinstance(f, EmbeddingFactors):
    return f._replace(a_eigvals=jnp.maximum(a, floor))
  a_vals, a_vecs = jnp.linalg.eigh(a)
  return f._replace(a_eigvals=jnp.maximum(a_vals, floor), a_eigvecs=a_vecs)


def refresh(f: Factors, min_eigenvalue: jax.Array,
            damping: jax.Array) -> Factors:
  """The cached part of preconditioning: eigendecompositions or inverses.

  ``damping`` is used only by :class:`InverseFactors`, whose inverses include
  it; it is the damping of the refresh step until the next refresh.
  """
  if isinstance(f, InverseFactors):
    return refresh_inverse(f, min_eigenvalue, damping)
  return refresh_eigh(f, min_eigenvalue)


def _corrected(f: Factors) -> tuple[jax.Array, jax.Array]:
  """The bias-corrected averages ``Ā, Ḡ`` (zeros before the first update)."""
  weight = jnp.where(f.weight > 0, f.weight, jnp.ones_like(f.weight))
  return f.a / weight, f.g / weight


def _damped_inverse(m: jax.Array, shift: jax.Array,
                    floor: jax.Array) -> jax.Array:
  """``(M + shift·I)⁻¹`` of a PSD ``M`` (a vector: diagonal) by Cholesky.

  Cholesky costs a third of ``eigh``; when it fails (``M`` indefinite beyond
  the shift, from round-off) the eigenvalues are clipped at ``floor`` instead.
  """
  if m.ndim == 1:
    return 1 / (jnp.maximum(m, floor) + shift)
  eye = jnp.eye(m.shape[0], dtype=m.dtype)
  chol = jnp.linalg.cholesky(m + shift * eye)
  inv = jax.scipy.linalg.cho_solve((chol, True), eye)

  def by_eigh(_):
    vals, vecs = jnp.linalg.eigh(m)
    return (vecs / (jnp.maximum(vals, floor) + shift)) @ vecs.T

  ok = jnp.all(jnp.isfinite(inv)) & (jnp.min(jnp.diagonal(chol)) > 0)
  return jax.lax.cond(ok, lambda _: (inv + inv.T) / 2, by_eigh, None)


def refresh_inverse(f: InverseFactors, min_eigenvalue: jax.Array,
                    damping: jax.Array) -> InverseFactors:
  """``(Ā + π√λ I)⁻¹`` and ``(Ḡ + √λ/π I)⁻¹`` (Martens & Grosse 2015, §6.3)."""
  a, g = _corrected(f)
  dtype = g.dtype
  root = jnp.sqrt(jnp.asarray(damping, dtype))
  a_diag = a if a.ndim == 1 else jnp.diagonal(a)
  pi = pi_correction(a_diag, jnp.diagonal(g))
  floor = jnp.asarray(min_eigenvalue, dtype)
  return f._replace(a_inv=_damped_inverse(a, pi * root, floor),
                    g_inv=_damped_inverse(g, root / pi, floor))


def pi_correction(a_vals: jax.Array, g_vals: jax.Array) -> jax.Array:
  """``π = sqrt((tr A / dim A) / (tr G / dim G))``; 1 when either trace is 0.

  Takes the eigenvalues (or the diagonals) of ``A`` and ``G``. Martens &
  Grosse 2015, §6.3: the factored damping ``(A + π√λ I) ⊗ (G + √λ/π I)`` that
  minimises the norm of the error terms.
  """
  mean_a, mean_g = jnp.mean(a_vals), jnp.mean(g_vals)
  ok = (mean_a > 0) & (mean_g > 0)
  ratio = jnp.where(ok, mean_a, 1) / jnp.where(ok, mean_g, 1)
  return jnp.sqrt(ratio)


def precondition(f: Factors, grad: jax.Array, damping: jax.Array) -> jax.Array:
  """``(A ⊗ G + λI)⁻¹ vec(Γ)`` (or the π-split) as a ``(d_in, d_out)`` matrix.

  Eigendecomposed factors give the exact damping, in four matmuls;
  :class:`InverseFactors` the π-corrected split with the damping of their last
  refresh, in two.

  Args:
    f: the layer's factor state.
    grad: ``Γ``, the gradient of ``W̄``, shaped ``(d_in, d_out)``.
    damping: ``λ``, a scalar (unused by :class:`InverseFactors`).

  Returns:
    The preconditioned gradient, shaped and typed like ``grad``.
  """
  if isinstance(f, InverseFactors):
    x = grad.astype(f.g_inv.dtype)
    x = f.a_inv[:, None] * x if f.a_inv.ndim == 1 else f.a_inv @ x
    return (x @ f.g_inv).astype(grad.dtype)
  dtype = f.g_eigvecs.dtype
  x = grad.astype(dtype) @ f.g_eigvecs
  if isinstance(f, LayerFactors):
    x = f.a_eigvecs.T @ x
  x = x / (f.a_eigvals[:, None] * f.g_eigvals[None, :]
           + jnp.asarray(damping, dtype))
  if isinstance(f, LayerFactors):
    x = f.a_eigvecs @ x
  return (x @ f.g_eigvecs.T).astype(grad.dtype)


def to_matrix(spec: LayerSpec, leaves: dict[str, jax.Array],
              dtype: Any) -> jax.Array:
  """``W̄``-shaped ``(d_in, d_out)`` matrix from a layer's parameter leaves."""
  if spec.kind == "embed":
    return leaves["embedding"].astype(dtype)
  d_out = spec.d_out
  rows = [leaves["kernel"].reshape(-1, d_out)]
  if spec.bias is not None:
    rows.append(leaves["bias"].reshape(1, d_out))
  return jnp.concatenate([r.astype(dtype) for r in rows], axis=0)


def from_matrix(spec: LayerSpec, matrix: jax.Array,
                like: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Splits a ``W̄``-shaped matrix into leaves shaped and typed ``like``."""
  if spec.kind == "embed":
    return {"embedding": matrix.astype(like["embedding"].dtype)}
  kernel = like["kernel"]
  out = {"kernel": matrix[:matrix.shape[0] - (spec.bias is not None)]
                   .reshape(kernel.shape).astype(kernel.dtype)}
  if spec.bias is not None:
    out["bias"] = matrix[-1].reshape(like["bias"].shape).astype(
        like["bias"].dtype)
  return out
