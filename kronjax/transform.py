"""K-FAC as an optax transformation: :func:`scale_by_kfac`, :func:`kfac`.

All curvature state (moving averages of each layer's Kronecker factors, their
eigendecompositions, the damping, the previous step) lives in the optax state;
each ``update`` takes the batch's blocks as the extra argument
``curvature=kronjax.fisher_blocks(tape)``.

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature. Ba, Grosse & Martens 2017, Distributed second-order
  optimization using Kronecker-factored approximations. Grosse & Martens 2016,
  A Kronecker-factored approximate Fisher matrix for convolution layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import GradientTransformationExtraArgs, ScalarOrSchedule

from kronjax import _curvature
from kronjax import _placement
from kronjax import _sharded
from kronjax import _precondition as pre
from kronjax import _quadratic as quad
from kronjax._routing import all_finite, full_params_view, param_labels
from kronjax._routing import skip_if_not_finite

__all__ = ["KfacState", "curvature_due", "kfac", "scale_by_kfac"]

class KfacState(NamedTuple):
  """State of :func:`scale_by_kfac`; a pytree of arrays (msgpack/orbax-safe)."""

  count: jax.Array  # () int32: updates applied (skipped ones not counted).
  skipped: jax.Array  # () int32: updates skipped for non-finite inputs.
  damping: jax.Array  # () factor_dtype: λ of the last update (adaptive: LM's).
  factors: dict[str, pre.Factors]  # per candidate layer, key "/".join(path).
  prev_step: Any  # adaptive: params-shaped last step d (≥ factor_dtype); ().
  coefficients: jax.Array  # (2,) factor_dtype: (α, μ) of the last step;
  # fixed step: (norm-constraint scale, 0).
  curvature_due: jax.Array  # () bool: the next update uses its curvature
  # (count % factor_every == 0); see curvature_due().


def curvature_due(opt_state: Any) -> jax.Array:
  """Whether the next K-FAC update uses the curvature it is given.

  Finds the :class:`KfacState` (s) inside any optax state. With
  ``factor_every=k`` only every k-th update reads its ``curvature``; pass this
  as ``with_tape=`` to the tape function so the steps in between skip the
  Fisher's backward pass (and ``fisher_blocks``, given the tapes as
  ``curvature``) and cost about a plain ``value_and_grad``::

    loss, grads, tape = step(params, x, y, rng,
                             with_tape=kronjax.curvature_due(opt_state))
    updates, opt_state = tx.update(grads, opt_state, params, curvature=tape)

  Args:
    opt_state: the state of ``scale_by_kfac``, ``kfac`` or any chain or
      wrapper holding them.

  Returns:
    A boolean scalar (``True`` if any K-FAC state in ``opt_state`` is due).

  Raises:
    ValueError: ``opt_state`` holds no K-FAC state.
  """
  is_kfac = lambda x: isinstance(x, KfacState)
  flags = [s.curvature_due for s in jax.tree.leaves(opt_state, is_leaf=is_kfac)
           if is_kfac(s)]
  if not flags:
    raise ValueError("curvature_due found no KfacState in opt_state: pass the "
                     "state of kronjax.kfac / scale_by_kfac (or of a chain "
                     "holding one).")
  return jnp.any(jnp.stack(flags))


def _value(x: ScalarOrSchedule, count: jax.Array) -> Any:
  return x(count) if callable(x) else x


def scale_by_kfac(
    damping: ScalarOrSchedule = 1e-3,
    decay: float = 0.95,
    inverse_every: int = 10,
    factor_every: int = 1,
    exact_damping: bool = True,
    norm_constraint: float | None = None,
    learning_rate: ScalarOrSchedule | None = None,
    min_eigenvalue: float = 0.0,
    factor_dtype: Any = "float32",
    loss: Any = None,
    damping_adaptation_interval: int = 5,
    damping_bounds: tuple[float, float] = (1e-5, 1e3),
    inverse_mesh: jax.sharding.Mesh | None = None,
    inverse_axis: str | tuple[str, ...] = "data",
    shard_factors: bool = False,
) -> GradientTransformationExtraArgs:
  """Preconditions gradients with K-FAC (Martens & Grosse 2015).

  Each layer ``l`` with a block ``Kron(A, G)`` in ``curvature`` gets its
  combined gradient ``Γ = ∂L/∂W̄`` (kernel rows, then the bias row) replaced by

  .. math::

    P_l = (\\bar A \\otimes \\bar G + λ I)^{-1} \\operatorname{vec}(Γ)
    \\quad\\text{or}\\quad
    \\big((\\bar A + π\\sqrt{λ} I) \\otimes (\\bar G + \\tfrac{\\sqrt{λ}}{π} I)
    \\big)^{-1} \\operatorname{vec}(Γ),

  with ``Ā``, ``Ḡ`` bias-corrected exponential moving averages of the blocks
  (updated every ``factor_every`` steps; on the other steps the blocks are
  ignored) and their eigendecompositions refreshed every ``inverse_every``
  steps, always on the first (both under ``lax.cond``). The π-split instead
  caches the two damped inverses at refresh time, with that step's ``λ``, and
  costs two matmuls per layer instead of four. Embeddings have a diagonal
  ``A``. Parameters that no block covers pass through unchanged.

  ``curvature`` may hold the tapes themselves (``{path: LayerTape}``) instead
  of their blocks: they are turned into blocks (K-FAC-expand) inside the
  factor update's ``lax.cond``, so with ``factor_every > 1`` the steps in
  between skip the factors' einsums.

  **Fixed step** (``loss=None``): the output is ``s·P`` with the norm
  constraint's ``s = min(1, sqrt(c / (η²·|⟨P, g⟩|)))`` (1 without it), ``η``
  the learning rate that follows in the chain (Ba et al. 2017: ``η²⟨P, g⟩ ≈
  ‖ηP‖²_F``, the step's KL divergence to second order, times 2).

  **Adaptive step** (``loss`` given; Martens & Grosse 2015 §6–7, see
  ``kronjax._quadratic``): the step ``d = αΔ + μδ``, with ``Δ = −P`` (``−g`` on
  uncovered parameters) and ``δ`` the previous step, minimises the damped
  quadratic model with exact Fisher products from ``output_fn``; the norm
  constraint bounds ``dᵀFd``; every ``damping_adaptation_interval`` steps
  Levenberg–Marquardt adapts ``λ`` (``0`` turns it off). The output is ``−d``:
  gradient-signed like every ``scale_by_*``, so follow it with
  ``optax.scale(-1.0)`` (a unit learning rate).

  ``output_fn`` receives the params as this transform sees them: under
  ``optax.partition`` the other group's leaves are ``optax.MaskedNode``
  (:func:`kfac` fills them in for you).

  A step whose gradients or blocks are not finite outputs zeros and leaves the
  state as it was, except ``skipped``. Parameter dtypes are kept (bfloat16
  stays bfloat16); factor maths runs in ``factor_dtype``.

  Examples:
    >>> import jax.numpy as jnp, optax, kronjax
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    >>> tx = optax.chain(scale_by_kfac(damping=1e-2), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> blocks = {("Dense_0",): kronjax.linalg.Kron(jnp.eye(3), jnp.eye(3))}
    >>> updates, state = tx.update(params, state, params, curvature=blocks)
    >>> round(float(updates["Dense_0"]["bias"][0]), 4)  # -0.1 / (1 + 0.01)
    -0.099

  Args:
    damping: ``λ`` (float or schedule of the step count); the initial value in
      adaptive mode.
    decay: moving-average decay of the factors (0: the latest block only).
    inverse_every: period of the eigendecompositions (static int).
    factor_every: period of the factor updates (static int).
    exact_damping: ``A ⊗ G + λI`` exactly; ``False``: the π-corrected split.
    norm_constraint: ``c``, a bound on the step's squared Fisher norm, or
      ``None``.
    learning_rate: the learning rate the chain applies after this transform;
      used only by ``norm_constraint`` in fixed-step mode.
    min_eigenvalue: eigenvalues of the factors are clipped below at this.
    factor_dtype: dtype of the factors and of the preconditioning maths (a
      name such as ``"float32"`` stays static under ``inject_hyperparams``).
    loss: a ``kronjax.losses`` NLL: turns on the adaptive step, which then
      needs the extra arguments ``output_fn`` and ``targets``.
    damping_adaptation_interval: ``T`` of Levenberg–Marquardt (adaptive mode).
    damping_bounds: ``(min, max)`` of the adapted damping. The floor matters:
      on the digits autoencoder Levenberg–Marquardt drove ``λ`` down to a
      floor of 1e-8 and a later step blew up (1 of 4 seeds); with 1e-5 every
      seed stayed stable and ended lower (13.98 against 14.3).
    inverse_mesh: refresh each factor's eigendecomposition (or inverse) on
      one device of this mesh's ``inverse_axis`` and share the results (KAISA
      placement, Pauloski et al. 2021); ``None``: every device refreshes all.
    inverse_axis: the mesh axis (or axes) over which refreshes are placed.
    shard_factors: store every factor matrix (moving averages, eigenvectors
      or inverses) split by rows over ``inverse_axis`` of ``inverse_mesh``
      (zero-padded to a multiple of its size), as ZeRO does with Adam's
      moments: each device holds ``1/n`` of the curvature state, a refresh
      sends each factor's rows to the one device that refreshes it and the
      results' rows back (two all-to-alls), and XLA partitions the
      preconditioning matmuls. For layers whose factors do not fit
      replicated; it adds collectives to every step. The padded shapes
      depend on ``n``: restore a checkpoint onto the same axis size.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword arguments ``curvature`` (``{layer_path: Kron(A, G)}`` or
    ``{layer_path: LayerTape}``, required),
    and in adaptive mode ``output_fn`` (params → outputs on this batch) and
    ``targets``; other keyword arguments are ignored.

  References:
    Martens & Grosse 2015; Ba, Grosse & Martens 2017.
  """
  for name, period in (("inverse_every", inverse_every),
                       ("factor_every", factor_every)):
    if isinstance(period, int) and period < 1:
      raise ValueError(f"{name} must be a positive int, got {period!r}.")
  if norm_constraint is not None and loss is None and learning_rate is None:
    raise ValueError(
        "norm_constraint bounds learning_rate² · |<P, g>|: pass the "
        "learning_rate that follows in the chain (or use kronjax.kfac).")
  if shard_factors and inverse_mesh is None:
    raise ValueError("shard_factors=True splits the factors over "
                     "inverse_axis of inverse_mesh: pass inverse_mesh=mesh.")
  adaptive = loss is not None
  factor_dtype = jnp.dtype(factor_dtype)
  # Checks the axis name now; one device along it: nothing to split.
  n_inverse = (1 if inverse_mesh is None
               else _placement.axis_size(inverse_mesh, inverse_axis))
  shard_factors = shard_factors and n_inverse > 1
  placement = dict(mesh=inverse_mesh, axis=inverse_axis, shard=shard_factors)

  def init_fn(params):
    factors = _curvature.init_factors(pre.find_layers(params), factor_dtype,
                                      exact_damping, **placement)
    prev_step = ()
    if adaptive:
      prev_step = jax.tree.map(lambda p: jnp.zeros(
          p.shape, jnp.promote_types(p.dtype, factor_dtype)), params)
    return KfacState(
        count=jnp.zeros([], jnp.int32), skipped=jnp.zeros([], jnp.int32),
        damping=jnp.asarray(_value(damping, jnp.zeros([], jnp.int32)),
                            factor_dtype),
        factors=factors, prev_step=prev_step,
        coefficients=jnp.zeros((2,), factor_dtype),
        curvature_due=jnp.asarray(True))

  def update_fn(updates, state, params=None, *, curvature=None,
                output_fn=None, targets=None, **extra_args):
    del extra_args
    if curvature is None:
      raise ValueError(f"scale_by_kfac needs this batch's Fisher blocks: "
                       f"{_curvature.CURVATURE_HINT}.")
    if adaptive and (output_fn is None or targets is None or params is None):
      raise ValueError(
          "The adaptive K-FAC step (loss given, learning_rate=None) needs "
          "params, output_fn= (params -> the model's outputs on this batch) "
          "and targets= (the batch's targets): tx.update(grads, opt_state, "
          "params, curvature=..., output_fn=..., targets=...). Or give a "
          "learning_rate for a fixed step.")
    layers = pre.find_layers(updates)
    blocks_fn, keys = _curvature.checked_blocks(curvature, layers,
                                                state.factors)
    # A non-finite step must leave the state alone: the factors' lax.conds
    # are not taken, and the few other fields are selected below.
    ok = all_finite(updates) & all_finite(curvature)
    count, grads = state.count, updates
    lam = state.damping if adaptive else jnp.asarray(
        _value(damping, count), factor_dtype)
    factors = _curvature.maintain_factors(
        state.factors, blocks_fn, keys, decay, min_eigenvalue, lam,
        ok & (count % factor_every == 0), ok & (count % inverse_every == 0),
        layers, **placement)
    covered = {key: layers[key] for key in keys}
    precond = _curvature.precondition_tree(grads, covered, factors, lam,
                                           **placement)
    new = state._replace(damping=lam.astype(state.damping.dtype))
    if adaptive:
      step, new = _adaptive_step(grads, precond, params, new, output_fn,
                                 targets, count)
      out = jax.tree.map(lambda d, g: -d.astype(g.dtype), step, grads)
    else:
      out, scale = _norm_constrained(grads, precond, covered, count)
      new = new._replace(coefficients=jnp.stack(
          [scale, jnp.zeros_like(scale)]).astype(factor_dtype))
    if shard_factors:  # the updates must not inherit the factors' split
      out, prev = _sharded.replicate((out, new.prev_step), inverse_mesh)
      new = new._replace(prev_step=prev)
    keep = lambda n, o: jnp.where(ok, n, o)
    out = jax.tree.map(lambda u: keep(u, jnp.zeros_like(u)), out)
    new_count = keep(optax.safe_int32_increment(count), count)
    return out, KfacState(
        count=new_count,
        skipped=state.skipped + (~ok).astype(jnp.int32),
        damping=keep(new.damping, state.damping), factors=factors,
        prev_step=jax.tree.map(keep, new.prev_step, state.prev_step),
        coefficients=keep(new.coefficients, state.coefficients),
        curvature_due=new_count % factor_every == 0)

  def _norm_constrained(grads, precond, covered, count):
    scale = jnp.ones([], factor_dtype)
    if norm_constraint is not None:
      lr = jnp.asarray(_value(learning_rate, count), factor_dtype)
      sq = quad.tree_dot(pre.layer_leaves(precond, covered),
                         pre.layer_leaves(grads, covered), factor_dtype)
      scale = quad.norm_constraint_scale(lr * lr * sq, norm_constraint)
      precond = pre.map_layers(
          lambda _, leaves: {n: x * scale.astype(x.dtype)
                             for n, x in leaves.items()}, precond, covered)
    return precond, scale

  def _adaptive_step(grads, precond, params, state, output_fn, targets,
                     count):
    delta = jax.tree.map(lambda p, x: -p.astype(x.dtype), precond, params)
    prev = jax.tree.map(lambda d, x: d.astype(x.dtype), state.prev_step,
                        params)
    model = quad.quadratic_model(output_fn, loss, targets, params, grads,
                                 (delta, prev), factor_dtype)
    w = quad.solve(model, state.damping)
    if norm_constraint is not None:
      w = w * quad.norm_constraint_scale(w @ model.fisher @ w, norm_constraint)
    step = jax.tree.map(
        lambda a, b, d: (w[0] * a.astype(d.dtype) + w[1] * b.astype(d.dtype)),
        delta, prev, state.prev_step)
    lam = _adapt_damping(model, w, step, params, state.damping, output_fn,
                         targets, count)
    return step, state._replace(damping=lam, prev_step=step, coefficients=w)

  def _adapt_damping(model, w, step, params, lam, output_fn, targets, count):
    interval = damping_adaptation_interval

    def lm(lam):
      moved = jax.tree.map(lambda p, d: (p + d.astype(p.dtype)), params, step)
      new_loss = loss(output_fn(moved), targets).astype(lam.dtype)
      rho = (new_loss - model.loss) / quad.predicted_change(model, w)
      return quad.levenberg_marquardt(lam, rho, interval, damping_bounds)

    due = (count % jnp.maximum(interval, 1) == 0) & (interval > 0)
    return jax.lax.cond(due, lm, lambda lam: lam, lam)

  return GradientTransformationExtraArgs(init_fn, update_fn)


def kfac(
    learning_rate: ScalarOrSchedule | None = None,
    damping: ScalarOrSchedule = 1e-3,
    decay: float = 0.95,
    inverse_every: int = 10,
    factor_every: int = 1,
    norm_constraint: float | None = None,
    exact_damping: bool = False,
    loss: Any = None,
    fallback: optax.GradientTransformation = optax.adam(1e-3),
    factor_dtype: Any = "float32",
    inverse_mesh: jax.sharding.Mesh | None = None,
    inverse_axis: str | tuple[str, ...] = "data",
    shard_factors: bool = False,
) -> GradientTransformationExtraArgs:
  """K-FAC with a fixed or adaptive step; a first-order optimizer for the rest.

  Layers (nodes with a ``kernel`` of rank >= 2, or an ``embedding``) get
  :func:`scale_by_kfac` followed by ``−learning_rate`` (evaluated at the K-FAC
  step count, so skipped steps do not advance a schedule), or, with
  ``learning_rate=None``, the adaptive step of Martens & Grosse 2015
  (``loss`` required; ``output_fn=`` and ``targets=`` each update) followed by
  ``optax.scale(-1.0)``. All other parameters (normalisation scales, ...) go
  to ``fallback`` through ``optax.partition``.

  ``optax.partition`` hides the other group's parameters from each group
  (``optax.MaskedNode``), but ``output_fn`` needs them all: a thin outer
  wrapper hands the K-FAC group an ``output_fn`` that fills the masked leaves
  in from the full ``params`` of this update (as constants: the adaptive step
  moves only the K-FAC parameters). The same wrapper makes a step atomic:
  when any gradient or block is not finite, every group skips it (K-FAC counts
  it in ``KfacState.skipped``; ``fallback`` keeps its state).

  A layer that is in ``params`` but has no block in ``curvature`` gets plain
  gradient steps with the K-FAC step size: tap every layer.

  The returned updates are to be added to the params, as with every optax
  alias. Under ``optax.inject_hyperparams`` results are identical to the
  plain alias; a ``loss`` is callable, so mark it static
  (``optax.inject_hyperparams(kronjax.kfac, static_args="loss")``), and note
  that in adaptive mode ``damping`` only sets the initial damping. With
  ``optax.MultiSteps`` (gradient accumulation) the extra arguments are not
  accumulated: the inner update runs on every mini-step with that call's
  ``curvature`` and its state is kept only on the emitting call, so pass the
  running mean of the mini-batches' blocks (``jax.tree.map`` over the
  ``Kron`` pytrees) to get factors accumulated like the gradients.

  Examples:
    >>> import jax.numpy as jnp, kronjax
    >>> tx = kronjax.kfac(learning_rate=0.1, damping=1e-2)
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
    ...           "LayerNorm_0": {"scale": jnp.ones(3)}}
    >>> state = tx.init(params)
    >>> blocks = {("Dense_0",): kronjax.linalg.Kron(jnp.eye(3), jnp.eye(3))}
    >>> updates, state = tx.update(params, state, params, curvature=blocks)

  Args:
    learning_rate: step size (float or schedule) of the K-FAC layers; ``None``
      for the adaptive step (needs ``loss``).
    damping: initial (adaptive) or fixed damping ``λ``, float or schedule.
    decay: moving-average decay of the factors.
    inverse_every: period of the eigendecompositions.
    factor_every: period of the factor updates.
    norm_constraint: bound on the step's squared Fisher norm (KL clipping).
    exact_damping: exact ``A ⊗ G + λI``, or (default) the π-corrected split:
      its damped inverses are cached at refresh time (half the matmuls of
      the exact eigenbasis solve), and on the digits autoencoder and CNN of
      ``python -m kronjax.demo`` the adaptive step was faster and more stable
      with it (the exact damping stalled on 1 of 2 autoencoder seeds and
      diverged on 1 of 3 CNN seeds at the default initial damping).
    loss: the model's ``kronjax.losses`` NLL, for the adaptive step.
    fallback: optimizer of the parameters outside K-FAC layers.
    factor_dtype: dtype of the factors.
    inverse_mesh: see :func:`scale_by_kfac` (distributed refreshes).
    inverse_axis: see :func:`scale_by_kfac`.
    shard_factors: see :func:`scale_by_kfac` (factor storage split by rows).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`scale_by_kfac`
    for the extra arguments of ``update``.
  """
  if learning_rate is None and loss is None:
    raise ValueError(
        "kfac needs a learning_rate (fixed step) or a loss (adaptive step, "
        "e.g. loss=kronjax.losses.softmax_cross_entropy, with output_fn= and "
        "targets= passed to each update).")
  adaptive = learning_rate is None
  inner = scale_by_kfac(
      damping=damping, decay=decay, inverse_every=inverse_every,
      factor_every=factor_every, exact_damping=exact_damping,
      norm_constraint=norm_constraint, learning_rate=learning_rate,
      factor_dtype=factor_dtype, loss=loss if adaptive else None,
      inverse_mesh=inverse_mesh, inverse_axis=inverse_axis,
      shard_factors=shard_factors)
  if adaptive:
    kfac_group = optax.chain(inner, optax.scale(-1.0))
  else:
    kfac_group = _descend_at_kfac_count(inner, learning_rate)
  groups = {"kfac": kfac_group, "fallback": skip_if_not_finite(fallback)}
  return full_params_view(optax.partition(groups, param_labels))


def _descend_at_kfac_count(inner, learning_rate):
  """``−learning_rate(count) · inner``, with ``count`` the K-FAC step count."""

  def update_fn(updates, state, params=None, **extra_args):
    lr = _value(learning_rate, state.count)
    updates, state = inner.update(updates, state, params, **extra_args)
    return jax.tree.map(lambda u: -jnp.asarray(lr, u.dtype) * u, updates), state

  return GradientTransformationExtraArgs(inner.init, update_fn)
