"""Kronecker-factored Fisher blocks from per-layer tapes.

For a layer with combined weight matrix ``W̄`` of shape ``(d_in [+1], d_out)``
(see ``../shared/DESIGN.md``), the K-FAC block of the row-major ``vec(W̄)`` is
``A ⊗ G`` with

.. math::

  A = \\frac{1}{N T} \\sum_{n,t} \\bar a_{nt} \\bar a_{nt}^\\top, \\qquad
  G = \\sum_s \\frac{1}{N} \\sum_{n,t} g^s_{nt} {g^s_{nt}}^\\top

(K-FAC-expand), or, with K-FAC-reduce,

.. math::

  A = \\frac{1}{N} \\sum_n \\hat a_n \\hat a_n^\\top, \\quad
  \\hat a_n = \\frac{1}{T}\\sum_t \\bar a_{nt}, \\qquad
  G = \\sum_s \\frac{1}{N} \\sum_n \\hat g^s_n {\\hat g^s_n}^\\top, \\quad
  \\hat g^s_n = \\sum_t g^s_{nt}.

``ā`` is the input with a constant 1 appended when the layer has a bias. An
embedding's input factor is the diagonal of token frequencies (the one-hot
outer products are diagonal), stored as a vector; embeddings always use the
expand rule, since reduce would make their input factor dense. With a loss
that masks terms (``ignore_index``), the means run over the positions that
count (see ``LayerTape.mask``).

:func:`checked` checks a ``curvature=`` argument against an optimizer's
layers at trace time, :func:`check_state` its state.

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature. Grosse & Martens 2016, A Kronecker-factored
  approximate Fisher matrix for convolution layers. Eschenhagen et al. 2023,
  Kronecker-factored approximate curvature for modern neural network
  architectures.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from kronjax import _distributed
from kronjax._params import CURVATURE_HINT, LAYERS_HINT, LayerSpec, layer_key
from kronjax.linalg import Kron
from kronjax.tape import LayerPath, LayerTape, SummedTape, Tape, TiedTape

WeightSharing = Literal["expand", "reduce"]


def fisher_blocks(
    tape: Tape, weight_sharing: WeightSharing = "expand"
) -> dict[LayerPath, Kron]:
  """Turns tapes into K-FAC blocks, one ``Kron(A, G)`` per layer.

  Args:
    tape: ``{layer_path: LayerTape}``, e.g. from
      ``kronjax.flax.value_grad_and_tape``.
    weight_sharing: ``"expand"`` (default) or ``"reduce"``: how positions that
      share the weights (convolution positions, tokens, repeated calls of a
      shared layer) enter the factors (Eschenhagen et al. 2023).

  Returns:
    ``{layer_path: Kron(A, G)}`` (a plain dict: the batch the tape carries
    stays with the tape, so blocks of different batches can be averaged) with ``A`` of shape ``(d_in [+1],) * 2`` (a
    vector, the diagonal, for embeddings) and ``G`` of shape ``(d_out, d_out)``.
  """
  if weight_sharing not in ("expand", "reduce"):
    raise ValueError(
        f'weight_sharing={weight_sharing!r}; use "expand" or "reduce".')
  return {path: layer_block(t, weight_sharing, path)
          for path, t in tape.items()}


def layer_block(
    t: LayerTape, weight_sharing: WeightSharing = "expand",
    path: LayerPath = ()
) -> Kron:
  """The ``Kron(A, G)`` block of one layer's tape (see the module docstring).

  A tape with a ``mask`` leaves its masked positions out of ``A`` (their
  output gradients, and so their part of ``G``, are zero already). A
  :class:`kronjax.tape.SummedTape` (a layer inside ``nn.scan``, ``remat``,
  ``vmap``...) gives the expand rule's factors, with the stack's leading axes
  for a stack of layers (``Kron`` of stacked factors, as ``jax.vmap(Kron)``).
  """
  if isinstance(t, TiedTape):
    return _tied_block(t, weight_sharing, path)
  if isinstance(t, SummedTape):
    if weight_sharing == "reduce":
      raise ValueError(
          f"Layer {path} ran inside a transformation nested in the model; "
          'its statistics are summed as K-FAC-expand needs them, so use '
          'weight_sharing="expand" (the default).')
    count = jnp.maximum(t.count, 1)[..., None, None]
    return _stacked_kron(t.aa / count, t.gg.sum(axis=0) / t.num_examples)
  g = t.output_grads
  if g.ndim != 4:
    raise ValueError(f"Layer {path}: output_grads must be (S, N, T, d_out), "
                     f"got shape {g.shape}.")
  _, n, positions, _ = g.shape
  w = None if t.mask is None else t.mask.astype(g.dtype)
  if t.kind == "embed":
    ids = t.inputs  # any shape: each id adds one (no reshape of a split axis)
    counts = jnp.zeros((t.num_embeddings,), g.dtype).at[ids].add(
        1.0 if w is None else w, out_sharding=_replicated(ids))
    return Kron(counts / (ids.size if w is None else _total(w)), _gram(g) / n)
  a = t.inputs
  if a.ndim != 3 or a.shape[:2] != (n, positions):
    raise ValueError(
        f"Layer {path}: inputs of shape {a.shape} do not match output_grads of "
        f"shape {g.shape}; expected (N, T, d_in) = ({n}, {positions}, d_in).")
  if t.has_bias:
    a = jnp.concatenate([a, jnp.ones_like(a[..., :1])], axis=-1)
  if weight_sharing == "reduce":
    g_hat = g.sum(axis=2)
    if w is None:
      return Kron(_gram(a.mean(axis=1)) / n, _gram(g_hat) / n)
    per_example = w.sum(axis=1)
    a_hat = (a * w[..., None]).sum(axis=1) / jnp.maximum(per_example, 1)[:, None]
    counted = (per_example > 0).astype(a.dtype)
    return Kron(_gram(a_hat, counted) / _total(counted), _gram(g_hat) / n)
  if w is None:
    return Kron(_gram(a) / (n * positions), _gram(g) / n)
  return Kron(_gram(a, w) / _total(w), _gram(g) / n)


def _tied_block(t: TiedTape, weight_sharing: WeightSharing,
                path: LayerPath) -> Kron:
  """One ``Kron(A, G)`` for an embedding ``E`` (``(vocab, d)``) that is also
  the head ``h ↦ E h``.

  The lookups give ``diag(c) ⊗ G_e`` and the head, a dense layer with kernel
  ``Eᵀ``, gives ``G_h ⊗ A_h`` in ``E``'s row-major layout (its input factor
  ``A_h`` is ``d × d``, its output factor ``G_h`` is ``vocab × vocab``). K-FAC
  drops the cross terms between the two uses, as between any two layers, and
  takes the nearest Kronecker product (Frobenius norm; Van Loan & Pitsianis
  1993) of the sum ``X₁ ⊗ Y₁ + X₂ ⊗ Y₂``: ``A = Σ αᵢ Xᵢ``, ``G = Σ βᵢ Yᵢ``
  with ``β`` the top eigenvector of ``Gx Gy`` (the 2 × 2 Gram matrices
  ``⟨Xᵢ, Xⱼ⟩`` and ``⟨Yᵢ, Yⱼ⟩``) and ``α = Gy β / βᵀGyβ``; the sum is never
  formed. ``A`` is dense (``vocab × vocab``).
  """
  a_h, g_h = layer_block(t.head, weight_sharing, path).factors
  if t.lookup is None:
    return Kron(g_h, a_h)
  c, g_e = layer_block(t.lookup, weight_sharing, path).factors
  xs, ys = (jnp.diag(c), g_h), (g_e, a_h)
  gram = lambda ms: jnp.array([[jnp.vdot(p, q) for q in ms] for p in ms])
  gx, gy = gram(xs), gram(ys)
  m = gx @ gy  # a 2 x 2 with entries >= 0: its top eigenvector is >= 0
  half_tr, det = (m[0, 0] + m[1, 1]) / 2, m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
  top = half_tr + jnp.sqrt(jnp.maximum(half_tr**2 - det, 0))
  u, v = jnp.array([m[0, 1], top - m[0, 0]]), jnp.array([top - m[1, 1], m[1, 0]])
  beta = jnp.where(jnp.sum(u * u) >= jnp.sum(v * v), u, v)
  beta = jnp.abs(beta)  # the Perron vector; abs only fixes the sign
  beta = jnp.where(jnp.sum(beta) > 0, beta, jnp.ones(2, beta.dtype))
  beta = beta / jnp.sum(beta)
  alpha = gy @ beta / jnp.maximum(beta @ gy @ beta, jnp.finfo(beta.dtype).tiny)
  return Kron(alpha[0] * xs[0] + alpha[1] * xs[1],
              beta[0] * ys[0] + beta[1] * ys[1])


def _stacked_kron(a: jax.Array, g: jax.Array) -> Kron:
  """``Kron(a, g)``, for factors with leading stack axes too."""
  if a.ndim == 2:
    return Kron(a, g)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(
      Kron(jnp.zeros((1, 1)), jnp.zeros((1, 1)))), [a, g])


def _total(w: jax.Array) -> jax.Array:
  """The number of counted positions (at least 1: all masked gives A = 0)."""
  return jnp.maximum(jnp.sum(w), 1)


def _gram(x: jax.Array, w: jax.Array | None = None) -> jax.Array:
  """``Σ w x xᵀ`` over all leading axes of ``x`` (``xᵀx`` of its rows).

  ``w`` weighs the rows (it has ``x``'s leading shape). Under
  ``jax.sharding.AxisType.Explicit`` axes JAX can neither merge the split
  batch axis with others nor guess a contraction's output sharding
  (replicated: a factor is a sum over the whole batch, an all-reduce): one
  einsum over all leading axes then; elsewhere rows and a matmul, which XLA's
  CPU backend runs faster.
  """
  xw = x if w is None else x * w[..., None]
  out = _replicated(x)
  if out is not None:
    return jnp.einsum("...i,...j->ij", xw, x, out_sharding=out)
  return xw.reshape(-1, x.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def _replicated(x: jax.Array) -> jax.sharding.NamedSharding | None:
  """Replicated over ``x``'s mesh if its axes are explicit, else ``None``."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if getattr(mesh, "explicit_axes", ()):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return None


def checked(curvature: Any, layers: dict[str, LayerSpec],
            factors: dict[str, Any], guessed: bool = True):
  """A function computing ``{key: (A, G)}``, and its keys; checked at trace.

  ``curvature`` holds blocks, or tapes whose blocks are computed only when the
  factors are updated (inside that ``lax.cond``: ``factor_every > 1`` then
  skips the factors' einsums too).
  """
  if not isinstance(curvature, dict):
    raise ValueError(f"curvature must be a dict {{layer_path: Kron(A, G)}}; "
                     f"got {type(curvature).__name__}: {CURVATURE_HINT}.")
  if not curvature:
    raise ValueError(
        "curvature is empty: the tape function tapped no layer of the model "
        "(or no block was given), so K-FAC has nothing to precondition with. "
        "Train such a model with a first-order optimizer.")
  tapes = [isinstance(v, (LayerTape, SummedTape, TiedTape))
           for v in curvature.values()]
  if any(tapes) and not all(tapes):
    raise ValueError("curvature must hold only Kron blocks or only "
                     "LayerTapes, not both.")
  compute = ((lambda: fisher_blocks(curvature)) if any(tapes)
             else (lambda: curvature))
  keys = {}  # state key -> the key of its block in compute()'s dict
  for given, block in (jax.eval_shape(compute) if any(tapes)
                       else curvature).items():
    if not isinstance(block, (Kron, LayerTape, SummedTape, TiedTape)):
      raise ValueError(
          f"curvature[{given!r}] is a {type(block).__name__}, not a Fisher "
          "block or tape: pass this batch's tape (curvature=tape) or its "
          "kronjax.fisher_blocks(tape), not the gradients.")
    key = layer_key(given)
    spec = layers.get(key)
    if spec is None or key not in factors:
      raise ValueError(
          f"curvature has a block for layer {given}, which is not a layer "
          "the optimizer knows (those of layers=, or else nodes of the "
          "params given to init with a 'kernel' of rank >= 2 or a 2-D "
          f"'embedding'): {[s.path for s in layers.values()]}.")
    a, g = block.factors
    stack = spec.stack_shape
    want_a = stack + (spec.factor_sizes[0],) * (1 if spec.kind == "embed"
                                                 else 2)
    want = (want_a, stack + (spec.d_out,) * 2)
    if (tuple(a.shape), tuple(g.shape)) != want:
      params = (f"embedding {spec.kernel}" if spec.kind != "dense" else
                f"kernel {spec.kernel}, bias {spec.bias}")
      how = "guessed from the params" if guessed else "as layers= gives it"
      raise ValueError(
          f"The block for layer {given} has factors A {tuple(a.shape)} and G "
          f"{tuple(g.shape)}, but the layer ({params}, {how}) needs A "
          f"{want[0]} and G {want[1]}. {LAYERS_HINT}.")
    keys[key] = given

  def blocks_fn():
    blocks = compute()
    return {key: blocks[given].factors for key, given in keys.items()}

  return blocks_fn, list(keys)


def _solve_kind(eigenbases: bool, corrections: bool) -> str:
  return ("EK-FAC" if corrections else "exact damping" if eigenbases
          else "the π-split")


def check_state(factors: dict[str, Any], layers, keys, settings: Any) -> None:
  """Raises if the K-FAC state was made for another damping or layout (a
  placement pads and splits the stored factors)."""
  placement = settings.placement
  pad = ((lambda d: d) if placement is None
         else (lambda d: _distributed.stored_size(d, placement)))
  for key in keys:
    f, (d_a, d_g) = factors[key], layers[key].factor_sizes
    made = _solve_kind(hasattr(f.a, "eigvecs"), f.corrections is not None)
    want = _solve_kind(settings.eigenbases, settings.eigenvalue_correction)
    if made != want:
      raise ValueError(
          f"Layer {key}: the optimizer state holds factors for {made}, but "
          f"this optimizer uses {want} (exact_damping="
          f"{settings.exact_damping}, eigenvalue_correction="
          f"{settings.eigenvalue_correction}). Build the optimizer as the "
          "state was made, or re-initialise the state with tx.init(params).")
    stack = layers[key].stack_shape
    want_a = stack + ((d_a,) if layers[key].kind == "embed"
                      else (pad(d_a),) * 2)
    want_g = stack + (pad(d_g),) * 2
    if (f.a.ema.shape, f.g.ema.shape) != (want_a, want_g):
      n = pad(1)  # the multiple the stored sizes are padded to
      layout = (f"split over {n} devices, so padded to a multiple of {n}"
                if n > 1 else "replicated, unpadded")
      raise ValueError(
          f"Layer {key}: the optimizer state has factors A {f.a.ema.shape} "
          f"and G {f.g.ema.shape}, but this optimizer stores A {want_a} and "
          f"G {want_g} ({layout}). The state was made with another "
          "placement: build the optimizer as it was, or re-initialise the "
          "state with tx.init(params).")
