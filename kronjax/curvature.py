"""The curvature of a trained model over a data set, for use beyond training.

:func:`fit_curvature` averages a tape function's Kronecker blocks over a data
set and eigendecomposes them once; the :class:`Curvature` it returns solves
``(F + λI) x = v`` and gives ``log det(s F + λI)`` layer by layer in the
Kronecker eigenbasis, never forming ``A ⊗ G``. It is what influence functions
(:func:`kronjax.influence_scores`) and the Laplace approximation
(:func:`kronjax.laplace`) are built on.

Per layer, with ``A = U_A diag(λ_A) U_Aᵀ`` and ``G = U_G diag(λ_G) U_Gᵀ``,

.. math::

  F_l = (U_A ⊗ U_G) \\operatorname{diag}(Λ) (U_A ⊗ U_G)^\\top, \\qquad
  Λ = λ_A λ_G^\\top \\ \\text{(K-FAC)} \\quad \\text{or} \\quad
  Λ = \\frac{1}{N}\\sum_n \\big(U_A^\\top G_n U_G\\big)^{\\circ 2}
  \\ \\text{(EK-FAC)},

``G_n = Σ_t ā_{nt} g_{nt}ᵀ`` the per-example gradient of ``W̄`` (positions
summed, Fisher draws summed over), so EK-FAC's ``Λ`` is the exact diagonal of
the Fisher in K-FAC's eigenbasis (George et al. 2018; Grosse et al. 2023).

``F`` is the Fisher of the tape's mean loss: per example for the losses
with one term per example, per term (token) for a loss over sequences.

Examples:
  >>> import jax, jax.numpy as jnp, kronjax
  >>> def apply(p, x):
  ...   return kronjax.nn.dense(x, p["out"]["kernel"], p["out"]["bias"])
  >>> params = {"out": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> x, y = jnp.arange(12.0).reshape(4, 3) / 10, jnp.array([0, 1, 0, 1])
  >>> tape_fn = kronjax.nn.value_grad_and_tape(
  ...     apply, kronjax.losses.softmax_cross_entropy, fisher="exact")
  >>> curv = kronjax.fit_curvature(tape_fn, params, [(x[:2], y[:2]),
  ...                                                 (x[2:], y[2:])])
  >>> curv.eigenvalues["out"].shape    # (d_in + 1, d_out)
  (4, 2)
  >>> jax.tree.map(jnp.shape, curv.solve(params, damping=1e-3))
  {'out': {'bias': (2,), 'kernel': (3, 2)}}

References:
  Martens & Grosse 2015 (K-FAC). George et al. 2018, Fast approximate natural
  gradient descent in a Kronecker-factored eigenbasis (EK-FAC). Grosse et al.
  2023, Studying large language model generalization with influence
  functions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from kronjax import _ekfac, _per_example
from kronjax._params import (LayerSpec, find_layers, float_dtype, layer_key,
                             map_layers, owner, tree_paths)
from kronjax.blocks import WeightSharing, fisher_blocks
from kronjax.linalg import Kron, KronEigh

HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Curvature:
  """K-FAC or EK-FAC curvature of a model over a data set, eigendecomposed.

  A pytree of arrays (it jits, checkpoints and shards like optimizer state)
  with the layers as static data. Made by :func:`fit_curvature`.

  Attributes:
    factors: ``{layer_key: KronEigh}``: each layer's ``A`` and ``G``
      eigendecomposed, eigenvalues clipped at 0, eigenvectors
      ``Kron(U_A, U_G)`` (``U_A`` is ``ones(vocab)``, the identity, for an
      embedding's diagonal ``A``); leading stack axes for a stack of layers.
    eigenvalues: ``{layer_key: (*stack, d_A, d_G)}``: the block ``F_l`` in
      the basis ``U_A ⊗ U_G``: ``λ_A λ_Gᵀ`` (K-FAC) or EK-FAC's fitted
      eigenvalues.
    num_examples: the number of examples fitted on (a scalar).
    layers: ``((layer_key, LayerSpec), ...)``, static.
  """

  factors: dict[str, KronEigh]
  eigenvalues: dict[str, jax.Array]
  num_examples: jax.Array
  layers: tuple[tuple[str, LayerSpec], ...] = dataclasses.field(
      metadata=dict(static=True))

  @property
  def specs(self) -> dict[str, LayerSpec]:
    """``{layer_key: LayerSpec}`` of the layers."""
    return dict(self.layers)

  def blocks(self) -> dict[str, Kron]:
    """``{layer_key: Kron(A, G)}``, the averaged factors (clipped at 0)."""
    out = {}
    for key, eigh in self.factors.items():
      a, g = (_compose(v, u) for v, u in zip(eigh.eigenvalues,
                                               eigh.eigenvectors.factors))
      out[key] = jax.tree_util.tree_unflatten(
          jax.tree_util.tree_structure(Kron(jnp.ones(1), jnp.ones(1))), [a, g])
    return out

  def to_eigenbasis(self, tree: Any) -> dict[str, jax.Array]:
    """``{layer_key: U_Aᵀ W̄ U_G}`` of a params-shaped ``tree``."""
    mats = layer_matrices(tree, self.specs, self._dtype(tree))
    return {k: rotate(self.factors[k], mats[k]) for k in self.factors}

  def from_eigenbasis(self, coords: dict[str, jax.Array], like: Any) -> Any:
    """``like`` with each layer's leaves set to ``U_A C U_Gᵀ`` (``C =
    coords[key]``); the other leaves of ``like`` stay as they are."""
    specs = self.specs
    return map_layers(
        lambda key, leaves: specs[key].from_matrix(
            rotate(self.factors[key], coords[key], back=True), leaves),
        like, specs)

  def solve(self, tree: Any, damping: Any) -> Any:
    """``(F + damping·I)⁻¹ v`` for a params-shaped ``v`` (``tree``).

    Exact for the block-diagonal ``F`` of the K-FAC layers, in each layer's
    Kronecker eigenbasis. ``F`` is zero outside those layers, so their other
    leaves (normalisation scales, untapped layers) come back divided by
    ``damping``.
    """
    return _solve(self, tree, damping)

  def logdet(self, damping: Any, scale: Any = 1.0) -> jax.Array:
    """``Σ_l log det(scale·F_l + damping·I)`` over the K-FAC layers."""
    return _logdet(self, damping, scale)

  @property
  def num_parameters(self) -> int:
    """``P``: the number of entries of the K-FAC layers' ``W̄``."""
    return sum(int(lam.size) for lam in self.eigenvalues.values())

  def _dtype(self, tree: Any) -> jnp.dtype:
    return jnp.result_type(float_dtype(tree), *self.eigenvalues.values())


@jax.jit
def _solve(curv: Curvature, tree: Any, damping: Any) -> Any:
  coords = {k: c / (curv.eigenvalues[k] + damping)
            for k, c in curv.to_eigenbasis(tree).items()}
  return curv.from_eigenbasis(coords,
                              jax.tree.map(lambda v: v / damping, tree))


@jax.jit
def _logdet(curv: Curvature, damping: Any, scale: Any) -> jax.Array:
  return sum(jnp.sum(jnp.log(scale * lam + damping))
             for lam in curv.eigenvalues.values())


def _compose(values: jax.Array, vectors: jax.Array) -> jax.Array:
  if vectors.ndim == values.ndim:  # a diagonal factor
    return values
  return jnp.matmul(vectors * values[..., None, :],
                    jnp.swapaxes(vectors, -1, -2), precision=HI)


def rotate(eigh: KronEigh, w: jax.Array, back: bool = False) -> jax.Array:
  """``U_Aᵀ W U_G`` (or ``U_A W U_Gᵀ`` with ``back``) for ``W`` of shape
  ``(..., d_A, d_G)``; stack axes of the eigenvectors broadcast."""
  ua, ug = eigh.eigenvectors.factors
  diagonal = ua.ndim == eigh.eigenvalues[0].ndim
  tr = lambda m: jnp.swapaxes(m, -1, -2)
  if not diagonal:
    w = jnp.matmul(ua if back else tr(ua), w, precision=HI)
  return jnp.matmul(w, tr(ug) if back else ug, precision=HI)


def layer_matrices(tree: Any, layers: dict[str, LayerSpec],
                   dtype: Any) -> dict[str, jax.Array]:
  """``{layer_key: W̄}`` of the layers' leaves in a params-shaped tree."""
  leaves: dict[str, dict[str, jax.Array]] = {}
  for path, leaf in tree_paths(tree)[0]:
    key = owner(path, layers)
    if key is not None:
      leaves.setdefault(key, {})[path[-1]] = leaf
  for key, spec in layers.items():
    if set(leaves.get(key, {})) != {
        n for n, s in zip(spec.names, (spec.kernel, spec.bias))
        if s is not None}:
      raise ValueError(
          f"The tree has {sorted(leaves.get(key, {}))} for layer {key}, which "
          f"needs {spec.names[:1 + (spec.bias is not None)]}: pass a tree "
          "shaped like the params the curvature was fitted on.")
  return {k: layers[k].to_matrix(leaves[k], dtype) for k in layers}


def _pairs(batches: Iterable) -> Iterable[tuple[Any, Any]]:
  for i, batch in enumerate(batches):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
      raise ValueError(
          f"batches must be an iterable of (x, y) pairs; item {i} is a "
          f"{type(batch).__name__}. For one batch pass [(x, y)].")
    yield batch


def batch_size(x: Any) -> int:
  leaves = jax.tree.leaves(x)
  if not leaves or not jnp.shape(leaves[0]):
    raise ValueError("x must hold arrays with a leading batch axis.")
  return int(jnp.shape(leaves[0])[0])


def tape_layers(tape_fn: Callable, params: Any, x: Any,
                keys: Iterable[str]) -> dict[str, LayerSpec]:
  """The ``LayerSpec``s of the tapped layers ``keys``, as the tape sees them
  (``tape_fn.layers``), or guessed from the params."""
  layers_fn = getattr(tape_fn, "layers", None)
  found = layers_fn(params, x) if layers_fn else find_layers(params)
  specs = {}
  for key in keys:
    if key not in found:
      raise ValueError(
          f"The tape has layer {key}, which is not a layer of the params "
          f"given ({sorted(found)}): pass the params tape_fn was called on.")
    specs[key] = found[key]
  return specs


def _key(rng: Any, *indices: int) -> Any:
  if rng is None:
    return None
  for i in indices:
    rng = jax.random.fold_in(rng, i)
  return rng


@functools.partial(jax.jit, static_argnums=(1,))
def _decompose(sums: dict[str, Any], stacks: tuple[tuple[str, int], ...],
               total: Any) -> tuple[dict[str, KronEigh], dict[str, Any]]:
  """The mean factors' eigendecompositions (eigenvalues clipped at 0) and
  K-FAC's eigenvalues ``λ_A λ_Gᵀ``, per layer."""
  factors = {}
  for key, stack in stacks:
    sym = lambda m: m / total if m.ndim == 1 + stack else (
        m + jnp.swapaxes(m, -1, -2)) / (2 * total)
    fn = lambda a, g: Kron(a, g).eigh_factors()
    for _ in range(stack):
      fn = jax.vmap(fn)
    eigh = fn(*(sym(m) for m in sums[key]))
    factors[key] = eigh._replace(eigenvalues=tuple(
        jnp.maximum(v, 0) for v in eigh.eigenvalues))
  eigenvalues = {
      k: e.eigenvalues[0][..., :, None] * e.eigenvalues[1][..., None, :]
      for k, e in factors.items()}
  return factors, eigenvalues


@functools.lru_cache(maxsize=8)
def _factors_fn(tape_fn: Callable, weight_sharing: str) -> Callable:
  """A batch's factors times its size, jitted (kept for the next fit)."""
  def batch_factors(p, x, y, r):
    blocks = fisher_blocks(tape_fn(p, x, y, r)[2], weight_sharing)
    n = batch_size(x)
    return {layer_key(path): tuple(f * n for f in b.factors)
            for path, b in blocks.items()}

  return jax.jit(batch_factors)


@functools.lru_cache(maxsize=8)
def _squares_fn(tape_fn: Callable, layers: tuple) -> Callable:
  """A batch's EK-FAC squares summed over its examples, jitted."""
  specs = dict(layers)

  def batch_squares(p, x, y, r, factors):
    tape = tape_fn(p, x, y, r)[2]
    out = {}
    for path, entry in tape.items():
      key = layer_key(path)
      uses = _per_example.layer_uses(entry, path, "eigenvalue_correction")
      ua, ug = factors[key].eigenvectors.factors
      out[key] = _per_example.eigenbasis_squares(
          uses, specs[key].factor_sizes[0], ua, ug)
    return out

  return jax.jit(batch_squares)


def fit_curvature(tape_fn: Callable, params: Any, batches: Iterable, *,
                  rng: Any = None, eigenvalue_correction: bool = False,
                  weight_sharing: WeightSharing = "expand") -> Curvature:
  """Fits K-FAC (or EK-FAC) curvature of ``params`` over a data set.

  One pass over ``batches`` averages each layer's factors ``A`` and ``G``
  (``kronjax.fisher_blocks`` of each batch's tape, weighted by the batch's
  size, so the result is the mean over all examples), then eigendecomposes
  them. With ``eigenvalue_correction`` a second pass fits EK-FAC's
  eigenvalues, the mean over examples of the squared per-example gradient in
  the Kronecker eigenbasis. Each pass compiles once per batch shape.

  Args:
    tape_fn: ``tape_fn(params, x, y, rng)`` returning ``(loss, grads,
      tape)``, e.g. ``kronjax.flax.value_grad_and_tape(model, loss,
      fisher="exact")`` (linen) or ``kronjax.nn.value_grad_and_tape``; any
      Fisher mode.
    params: the (trained) parameters.
    batches: an iterable of ``(x, y)`` batches; re-iterable (a list, not a
      generator) with ``eigenvalue_correction``.
    rng: a ``jax.random.key`` for ``fisher="mc"`` (one key per batch is
      folded in).
    eigenvalue_correction: fit EK-FAC's eigenvalues (George et al. 2018).
    weight_sharing: ``"expand"`` or ``"reduce"``, as in ``fisher_blocks``.

  Returns:
    A :class:`Curvature`.
  """
  if eigenvalue_correction and iter(batches) is batches:
    raise ValueError(
        "eigenvalue_correction=True takes two passes over batches, which is "
        "an iterator: pass a list of (x, y) batches (or another iterable "
        "that can be iterated twice).")

  factors_fn = _factors_fn(tape_fn, weight_sharing)
  sums, total, specs = None, 0, None
  for i, (x, y) in enumerate(_pairs(batches)):
    n = batch_size(x)
    f = factors_fn(params, x, y, _key(rng, 0, i))
    if specs is None:
      specs = tape_layers(tape_fn, params, x, f)
    sums = f if sums is None else jax.tree.map(jnp.add, sums, f)
    total += n
  if not total:
    raise ValueError("batches is empty: fit_curvature needs examples.")
  factors, eigenvalues = _decompose(
      sums, tuple((k, specs[k].stack) for k in sums), float(total))
  if eigenvalue_correction:
    eigenvalues = _corrected_eigenvalues(tape_fn, params, batches, rng,
                                         factors, specs, total)
  return Curvature(factors, eigenvalues, jnp.asarray(float(total)),
                   tuple(specs.items()))


def _corrected_eigenvalues(tape_fn, params, batches, rng, factors, specs,
                           total) -> dict[str, jax.Array]:
  """EK-FAC: ``mean_n Σ_s (U_Aᵀ G_{sn} U_G)²`` per layer, a second pass."""
  _ekfac.refuse_stacks(specs)

  squares_fn = _squares_fn(tape_fn, tuple(specs.items()))
  sums = None
  for i, (x, y) in enumerate(_pairs(batches)):
    s = squares_fn(params, x, y, _key(rng, 1, i), factors)
    sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
  return {k: v / total for k, v in sums.items()}
