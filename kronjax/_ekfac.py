"""EK-FAC's eigenvalues in the optimizer (George et al. 2018).

Beside each layer's factors (kept with their eigendecompositions), the
state keeps ``s``, ``(d_A, d_G)``: the layer's block in its Kronecker
eigenbasis ``U_A ⊗ U_G``, a moving average of each batch's mean squared
per-example gradient there, ``mean_n Σ_s (U_Aᵀ ∇_{sn} U_G)²``, from the tape
(``kronjax._per_example``). It is an accumulator stepped with the factors, so
``s / weight`` is unbiased. A refresh of the basis carries it over as the
diagonal of the old ``U diag(s) Uᵀ`` in the new basis,
``(Q_A ∘ Q_A) s (Q_G ∘ Q_G)ᵀ`` with ``Q = U_newᵀ U_old`` per factor. The
solve is ``U (diag(s / weight) + λI)⁻¹ Uᵀ vec(Γ)``.

References:
  George et al. 2018, Fast approximate natural gradient descent in a
  Kronecker-factored eigenbasis.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kronjax import _damping, _per_example
from kronjax._params import LayerSpec, compute_dtype, layer_key
from kronjax._per_example import HI
from kronjax.linalg import Kron
from kronjax.linalg import _factors as _linalg


def refuse_stacks(layers: dict[str, LayerSpec]) -> None:
  """Raises if any layer is a stack (``nn.scan``): its tape is summed."""
  stacked = [k for k, spec in layers.items() if spec.stack]
  if stacked:
    raise ValueError(
        f"eigenvalue_correction=True: layers {stacked} are stacks of layers "
        "(nn.scan) whose tapes hold summed statistics only, and EK-FAC needs "
        "per-example gradients. Use K-FAC (eigenvalue_correction=False), or "
        "unroll the stack.")


def check(layers: dict[str, LayerSpec], placement: Any) -> None:
  """Raises for layouts EK-FAC cannot keep: stacks, placed factors."""
  refuse_stacks(layers)
  if placement is not None:
    raise ValueError("eigenvalue_correction=True cannot place its factors "
                     "over devices yet: leave placement=None (the factors "
                     "are then replicated, and the step data-parallel).")


def batch_estimate(entry: Any, path: Any, f: Any) -> jax.Array:
  """``mean_n Σ_s (U_Aᵀ ∇_{sn} U_G)²`` of one batch's tape of a layer, in
  the layer's current eigenbasis (``∇_{sn}``: positions summed)."""
  uses = _per_example.layer_uses(entry, path, "eigenvalue_correction=True")
  dtype = compute_dtype(f.weight.dtype)
  uses = [u._replace(rows=u.rows if u.ids else u.rows.astype(dtype),
                     cols=u.cols.astype(dtype)) for u in uses]
  return _per_example.eigenbasis_squares(
      uses, f.a.ema.shape[-1], f.a.eigvecs.astype(dtype),
      f.g.eigvecs.astype(dtype)) / uses[0].cols.shape[1]


def updater(curvature: dict, decay: Any) -> Callable:
  """``factors → factors`` with each layer's ``s ← β s + (1 − β) ŝ`` from
  this batch's tapes (``curvature``); raises if it holds blocks."""
  given = [p for p, entry in curvature.items() if isinstance(entry, Kron)]
  if given:
    raise ValueError(
        f"eigenvalue_correction=True needs this batch's tapes (curvature="
        f"tape), but curvature holds Kron blocks (layer {given[0]}): EK-FAC's "
        "eigenvalues come from per-example gradients, which blocks no "
        "longer hold.")
  paths = {layer_key(p): p for p in curvature}

  def update_all(fs):
    out = {}
    for key, f in fs.items():
      new = batch_estimate(curvature[paths[key]], paths[key], f)
      beta = jnp.asarray(decay, new.dtype)
      out[key] = f._replace(corrections=(
          beta * f.corrections.astype(new.dtype)
          + (1 - beta) * new).astype(f.corrections.dtype))
    return out

  return update_all


def carried(old: Any, new: Any) -> Any:
  """``new`` (a refreshed layer) with ``old``'s ``s`` carried into its basis:
  the diagonal of ``U_old diag(s) U_oldᵀ`` in ``U_new`` (exact for a
  Kronecker ``Q``)."""
  dtype = compute_dtype(old.weight.dtype)
  squared = lambda o, n: jnp.square(jnp.matmul(
      n.eigvecs.T.astype(dtype), o.eigvecs.astype(dtype), precision=HI))
  s = old.corrections.astype(dtype)
  if old.a.eigvecs.ndim == 2:  # else a diagonal A: its basis never turns
    s = jnp.matmul(squared(old.a, new.a), s, precision=HI)
  s = jnp.matmul(s, squared(old.g, new.g).T, precision=HI)
  return new._replace(corrections=s.astype(old.corrections.dtype))


def solve(f: Any, grad: jax.Array, damping: Any) -> jax.Array:
  """``U (diag(s / weight) + λI)⁻¹ Uᵀ vec(Γ)`` for ``Γ`` shaped A × G."""
  dtype = compute_dtype(f.weight.dtype)
  f, w = jax.tree.map(lambda x: x.astype(dtype), (f, grad))
  basis = (f.a.eigvecs, f.g.eigvecs)
  lam = jnp.asarray(_damping.layer_damping(f, damping), dtype)
  coords = _linalg.apply_all(basis, w, transpose=True)
  return _linalg.apply_all(basis, coords / (
      f.corrections / _damping.weight(f) + lam))
