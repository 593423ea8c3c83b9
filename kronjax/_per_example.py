"""Per-example gradients of a layer's ``W̄`` from its tape, kept factored.

A tapped layer's per-example gradient is a sum over its *uses* of
``Σ_t r_{nt} c_{nt}ᵀ`` (``(d_A, d_G)``, positions ``t`` summed): for a dense or
convolution layer ``r = ā`` (its input, with the 1 of a bias) and ``c = g``
(the gradient at its output); for an embedding ``r`` is the one-hot row of
the id; a tied embedding used as a head (``h ↦ E h``) adds a use with
``r = g`` and ``c = h``. Three things are computed from uses without forming
more than they need:

* :func:`gradients`: the per-example matrices, ``(N, d_A, d_G)``, for a few
  examples (queries), optionally in a Kronecker eigenbasis;
* :func:`eigenbasis_squares`: ``Σ_n Σ_s ((U_Aᵀ G_n U_G))²``, EK-FAC's
  eigenvalues times ``N`` (per-example matrices are formed only where they
  must be: several positions and no shortcut);
* :func:`scorer`: ``⟨M_q, G_n⟩`` for every query ``q`` and example ``n``,
  by the factored sum ``Σ_t r_{nt}ᵀ M_q c_{nt}`` or through ``G_n``,
  whichever needs the smaller temporaries.

Samples ``S`` (the tape's Fisher draws) lead every ``c`` (and ``r`` of a head
use); uses are never stacks of layers (those have summed tapes).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kronjax._summed import SummedTape, TiedTape

HI = jax.lax.Precision.HIGHEST


class Use(NamedTuple):
  """One use of a layer: its per-example gradient is ``Σ_t r cᵀ``.

  Attributes:
    rows: ``(S|1, N, T, d_A)`` floats, or ``(N, T)`` integer ids (one-hot
      rows of an embedding).
    cols: ``(S|1, N, T, d_G)``.
  """

  rows: jax.Array
  cols: jax.Array

  @property
  def ids(self) -> bool:
    return self.rows.ndim == 2


def layer_uses(entry, path, what: str) -> list[Use]:
  """The uses of one tape entry (``LayerTape``, ``TiedTape``).

  ``what`` names the computation for the error a summed tape raises.
  """
  if isinstance(entry, SummedTape):
    raise ValueError(
        f"Layer {path} runs inside a JAX transformation nested in the model "
        "(nn.scan, nn.remat, jax.vmap, a kronjax.nn stack with index=...), "
        f"where kronjax keeps only its summed statistics; {what} needs its "
        "per-example inputs and output gradients. Unroll the layer, or leave "
        "it out of the tape function with layers=[...].")
  if isinstance(entry, TiedTape):
    head = entry.head
    uses = [] if entry.lookup is None else layer_uses(entry.lookup, path, what)
    return uses + [Use(head.output_grads, head.inputs[None])]
  g = entry.output_grads
  if entry.kind == "embed":
    return [Use(entry.inputs.reshape(g.shape[1], -1), g)]
  a = entry.inputs
  if entry.has_bias:
    a = jnp.concatenate([a, jnp.ones_like(a[..., :1])], axis=-1)
  return [Use(a[None], g)]


def _rotated(use: Use, ua: jax.Array | None, ug: jax.Array | None,
             d_a: int) -> tuple[jax.Array, jax.Array]:
  """``(r U_A, c U_G)`` as ``(S|1, N, T, d)`` floats (one-hot ids rotated)."""
  c = use.cols if ug is None else jnp.matmul(use.cols, ug, precision=HI)
  if use.ids:
    if ua is None or ua.ndim == 1:
      r = jax.nn.one_hot(use.rows, d_a, dtype=c.dtype)
    else:
      r = jnp.take(ua, use.rows, axis=0)  # row id of U_A
    return r[None], c
  r = use.rows if ua is None or ua.ndim == 1 else jnp.matmul(
      use.rows, ua, precision=HI)
  return r, c


def _scatter(ids: jax.Array, cols: jax.Array, d_a: int) -> jax.Array:
  """``(S, N, d_A, d_G)``: per-example gradients of an embedding use."""
  s, n, t, d = cols.shape
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], (n, t))
  out = jnp.zeros((s, n, d_a, d), cols.dtype)
  return out.at[:, rows, ids].add(cols)


def gradients(uses: list[Use], d_a: int, ua: jax.Array | None = None,
              ug: jax.Array | None = None) -> jax.Array:
  """``(S, N, d_A, d_G)`` per-example gradients (rotated if ``ua, ug``)."""
  total = 0
  for use in uses:
    if use.ids and (ua is None or ua.ndim == 1):
      c = use.cols if ug is None else jnp.matmul(use.cols, ug, precision=HI)
      total = total + _scatter(use.rows, c, d_a)
    else:
      r, c = _rotated(use, ua, ug, d_a)
      s = max(r.shape[0], c.shape[0])
      r = jnp.broadcast_to(r, (s,) + r.shape[1:])
      c = jnp.broadcast_to(c, (s,) + c.shape[1:])
      total = total + jnp.einsum("snta,sntg->snag", r, c, precision=HI)
  return total


def eigenbasis_squares(uses: list[Use], d_a: int, ua: jax.Array,
                       ug: jax.Array) -> jax.Array:
  """``Σ_s Σ_n (U_Aᵀ G_{sn} U_G)²``, ``(d_A, d_G)``, for EK-FAC.

  One dense use at one position squares the rotated factors (``(r ⊗ c)² =
  r² ⊗ c²``); one embedding use sums, per id ``v``, ``(Σ_{t: id=v} c_t)²`` as
  ``Σ_t c_t ⊙ Σ_{t': id_t' = id_t} c_t'`` added at row ``id_t`` (``N T²``
  comparisons, no per-example matrices); anything else forms the rotated
  per-example matrices one Fisher sample at a time.
  """
  if len(uses) == 1 and not uses[0].ids and uses[0].rows.shape[2] == 1:
    r, c = _rotated(uses[0], ua, ug, d_a)
    r2 = jnp.sum(r[:, :, 0] ** 2, axis=0)  # (N, d_A); S is 1 for inputs
    return jnp.matmul(r2.T, jnp.sum(c[:, :, 0] ** 2, axis=0), precision=HI)
  if len(uses) == 1 and uses[0].ids and ua.ndim == 1:
    ids = uses[0].rows
    c = jnp.matmul(uses[0].cols, ug, precision=HI)  # (S, N, T, d_G)
    same = (ids[:, :, None] == ids[:, None, :]).astype(c.dtype)
    terms = c * jnp.einsum("ntu,snud->sntd", same, c, precision=HI)
    return jnp.zeros((d_a, c.shape[-1]), c.dtype).at[ids].add(
        jnp.sum(terms, axis=0))
  samples = max(u.cols.shape[0] for u in uses)

  def one_sample(s):
    pick = lambda x: jax.lax.dynamic_index_in_dim(x, jnp.minimum(
        s, x.shape[0] - 1), keepdims=True)
    picked = [Use(u.rows if u.ids else pick(u.rows), pick(u.cols))
              for u in uses]
    return jnp.sum(gradients(picked, d_a, ua, ug)[0] ** 2, axis=0)

  return jnp.sum(jax.lax.map(one_sample, jnp.arange(samples)), axis=0)


def scorer(uses: list[Use], q: int, d_a: int, d_g: int):
  """``m ↦ (Q, N)`` scores ``⟨M_q, G_n⟩`` for ``m`` shaped ``(q, d_A, d_G)``.

  Uses must have one sample (``S = 1``). A use goes through its per-example
  matrices (``N d_A d_G`` floats, formed once here, outside the loop over
  query blocks; the fewer FLOPs when ``T > 1``) when they are no more memory
  than the factored products ``Σ_t r_{nt}ᵀ M_q c_{nt}`` (``q N T min(d_A,
  d_G)`` floats, or ``q N T d_G`` gathered rows of ``M`` for an embedding),
  else it is factored.
  """
  parts = []
  for use in uses:
    if max(d_a, d_g) <= q * use.cols.shape[2]:
      parts.append(("grads", gradients([use], d_a)[0]))
    else:
      parts.append(("ids" if use.ids else "rows" if d_a >= d_g else "cols",
                    use))

  def scores(m: jax.Array) -> jax.Array:
    total = 0
    for how, x in parts:
      if how == "grads":
        s = jnp.einsum("nag,qag->qn", x, m, precision=HI)
      elif how == "ids":
        rows = jnp.take(m, x.rows, axis=1)  # (q, N, T, d_G)
        s = jnp.einsum("qntg,ntg->qn", rows, x.cols[0], precision=HI)
      elif how == "rows":
        rm = jnp.einsum("nta,qag->qntg", x.rows[0], m, precision=HI)
        s = jnp.einsum("qntg,ntg->qn", rm, x.cols[0], precision=HI)
      else:
        mc = jnp.einsum("qag,ntg->qnta", m, x.cols[0], precision=HI)
        s = jnp.einsum("qnta,nta->qn", mc, x.rows[0], precision=HI)
      total = total + s
    return total

  return scores
