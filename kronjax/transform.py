"""K-FAC as optax transformations.

* :func:`scale_by_kfac` preconditions gradients with the layers' Kronecker
  factors (a fixed step: chain it with any optax transformation);
* :func:`scale_by_adaptive_kfac` takes the adaptive step of Martens & Grosse
  (2015): step size and momentum from a quadratic model, Levenberg–Marquardt
  damping (``kronjax._adaptive``);
* :func:`kfac` is the alias: one of them for the layers, a first-order
  optimizer for the other parameters, one atomic skip of non-finite steps.

Both share one core (``kronjax._factors``); each ``update`` takes the
batch's blocks or tapes as the extra argument ``curvature=``.

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature. Ba, Grosse & Martens 2017, Distributed second-order
  optimization using Kronecker-factored approximations.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import GradientTransformationExtraArgs, ScalarOrSchedule

from kronjax import (_adaptive, _batch, _damping, _distributed, _factors,
                     _params, _trees)
from kronjax._adaptive import AdaptiveKfacState
from kronjax._params import LayerSpec, layer_leaves, map_layers, param_labels

__all__ = ["AdaptiveKfacState", "KfacState", "SkipNonFiniteState",
           "curvature_due", "kfac", "scale_by_adaptive_kfac", "scale_by_kfac",
           "skip_non_finite"]

_D = _factors.Settings()  # the defaults both factories share
NORM_CONSTRAINT = 1e-2  # the fixed step's default bound on η²<P, g>
RELATIVE_DAMPING = 0.1  # default λ_l / ((tr Ā_l / d_A)(tr Ḡ_l / d_G))


class KfacState(NamedTuple):
  """State of :func:`scale_by_kfac`; a pytree of arrays."""

  count: jax.Array  # () int32: updates applied.
  curvature_due: jax.Array  # () bool: the next update reads its curvature.
  factors: dict[str, _factors.LayerFactors]  # per layer, by layer_key.


class SkipNonFiniteState(NamedTuple):
  """State of :func:`skip_non_finite`."""

  skipped: jax.Array  # () int32: updates skipped for non-finite values.
  inner_state: Any  # the wrapped transformation's state.


def curvature_due(opt_state: Any) -> jax.Array:
  """Whether the next K-FAC update uses the curvature it is given.

  With ``factor_every=k`` only every k-th update reads its ``curvature``; pass
  this as ``with_tape=`` to the tape function so that the steps in between
  skip the Fisher's backward pass and cost about a plain ``value_and_grad``.

  Args:
    opt_state: a state of ``kfac``, ``scale_by_kfac``, ``scale_by_adaptive_kfac``
      or any chain or wrapper holding one.

  Returns:
    ``True`` if any K-FAC state in ``opt_state`` is due (a bool scalar).
  """
  flags = [flag for _, flag in optax.tree.get_all_with_path(
      opt_state, "curvature_due")]
  if not flags:
    raise ValueError("curvature_due found no K-FAC state in opt_state: pass "
                     "the state of kronjax.kfac / scale_by_kfac (or of a chain "
                     "holding one).")
  return jnp.any(jnp.stack(flags))


def skip_non_finite(
    inner: optax.GradientTransformation) -> GradientTransformationExtraArgs:
  """``inner``, with steps that are not finite skipped atomically.

  As ``optax.apply_if_finite``, extended to K-FAC's inputs: when the
  gradients, the ``curvature`` or ``value`` (the batch's loss) extra
  arguments or ``inner``'s updates are not finite, the update is zero,
  ``inner``'s state stays (step counts and schedules do not advance) and
  ``skipped`` counts the step. A bad refresh shows in the updates it
  preconditions, so the new state is not scanned (that reads it all).
  ``inner`` gets the inputs' verdict as the extra argument ``finite``: the
  K-FAC transformations then skip their factor work, which over a mesh also
  orders the check's collective before theirs (otherwise XLA:CPU deadlocks).
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SkipNonFiniteState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, *args, **extra_args):
    if args:
      raise TypeError("Pass this batch's curvature as a keyword: "
                      "tx.update(grads, opt_state, params, curvature=tape).")
    curvature = extra_args.get("curvature")
    given = _trees.all_finite((updates, curvature,
                               _batch.loss_value(curvature),
                               extra_args.get("value")))
    new_updates, new_inner = inner.update(updates, state.inner_state, params,
                                          finite=given, **extra_args)
    ok = given & _trees.all_finite(new_updates)
    new_inner = _trees.select(ok, new_inner, state.inner_state)
    # A jnp.where per leaf, not _trees.select: it fuses with the update's
    # last op and the user's apply_updates (30 fewer kernels to compile on
    # the digits autoencoder; a cond would copy them out and back).
    new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)),
                               new_updates)
    return new_updates, SkipNonFiniteState(
        state.skipped + (~ok).astype(jnp.int32), new_inner)

  return GradientTransformationExtraArgs(init_fn, update_fn)


def _settings(decay, factor_every, inverse_every, exact_damping, factor_dtype,
              placement, layers, routed=False, eigenvalue_correction=False):
  for name, period in (("factor_every", factor_every),
                       ("inverse_every", inverse_every)):
    # An int, or (under optax.inject_hyperparams) an integer array.
    if isinstance(period, float) or (isinstance(period, int) and period < 1):
      raise ValueError(f"{name} must be a positive int, got {period!r}.")
  return _factors.Settings(
      decay, factor_every, inverse_every, bool(exact_damping),
      None if factor_dtype is None else jnp.dtype(factor_dtype),
      _distributed.resolve(placement), _params.given_layers(layers), routed,
      bool(eigenvalue_correction))


def _relative(damping: Any) -> Any:
  return _damping.Relative(RELATIVE_DAMPING) if damping is None else damping


def _value(x: ScalarOrSchedule, count: jax.Array) -> Any:
  return x(count) if callable(x) else x


def _preconditioner(settings, damping, norm_constraint, learning_rate):
  """:func:`scale_by_kfac` without its non-finite guard."""

  def init_fn(params):
    return KfacState(count=jnp.zeros([], jnp.int32),
                     curvature_due=jnp.asarray(True),
                     factors=_factors.init(
                         params, _params.optimizer_layers(params, settings),
                         settings))

  def update_fn(updates, state, params=None, *, curvature=None, finite=True,
                **extra_args):
    del params, extra_args
    if not isinstance(state, KfacState):
      raise ValueError(
          f"scale_by_kfac was given a {type(state).__name__}, the state of "
          "another transformation: pass the state its own init made.")
    if curvature is None:
      raise ValueError("scale_by_kfac needs this batch's Fisher blocks: "
                       f"{_params.CURVATURE_HINT}.")
    count = state.count
    precond, factors, covered, _ = _factors.precondition_step(
        updates, state.factors, curvature, settings, count,
        _value(damping, count), finite)
    if norm_constraint is not None:
      dtype = _factors.compute_dtype(_factors.factor_dtype(updates, settings))
      lr = jnp.asarray(1.0 if learning_rate is None
                       else _value(learning_rate, count), dtype)
      sq = _trees.vdot(layer_leaves(precond, covered),
                       layer_leaves(updates, covered), dtype)
      scale = _adaptive.norm_constraint_scale(lr * lr * sq, norm_constraint)
      precond = map_layers(lambda _, leaves: {
          n: x * scale.astype(x.dtype) for n, x in leaves.items()}, precond,
                           covered)
    count = optax.safe_int32_increment(count)
    return precond, KfacState(count, count % settings.factor_every == 0,
                              factors)

  return GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_kfac(
    damping: ScalarOrSchedule | None = None,
    *,
    decay: float = _D.decay,
    factor_every: int = _D.factor_every,
    inverse_every: int = _D.inverse_every,
    exact_damping: bool = _D.exact_damping,
    eigenvalue_correction: bool = _D.eigenvalue_correction,
    norm_constraint: float | None = NORM_CONSTRAINT,
    learning_rate: ScalarOrSchedule | None = None,
    factor_dtype: Any = _D.factor_dtype,
    placement: _distributed.Placement | None = _D.placement,
    layers: dict[str, LayerSpec] | None = None,
) -> GradientTransformationExtraArgs:
  """Preconditions gradients with K-FAC (Martens & Grosse 2015).

  Each layer with a block ``Kron(A, G)`` in ``curvature`` gets its combined
  gradient ``Γ = ∂L/∂W̄`` (kernel rows, then the bias row) replaced by

  .. math::

    P = \\big((\\bar A + π\\sqrt{λ} I) \\otimes (\\bar G + \\tfrac{\\sqrt{λ}}{π} I)
    \\big)^{-1} \\operatorname{vec}(Γ)
    \\quad\\text{or, with exact damping,}\\quad
    (\\bar A \\otimes \\bar G + λ I)^{-1} \\operatorname{vec}(Γ),

  with ``Ā``, ``Ḡ`` bias-corrected exponential moving averages of the blocks,
  updated every ``factor_every`` steps (the blocks of the other steps are
  ignored), and their damped inverses (or eigendecompositions) refreshed
  every ``inverse_every`` steps, always on the first; the π-split's inverses
  keep the damping of their refresh. Embeddings have a diagonal ``A``.
  Parameters without a block pass through unchanged.

  ``curvature`` may hold the tapes (blocks are then computed only when due).

  With ``norm_constraint=c`` the output is ``s·P`` with
  ``s = min(1, sqrt(c / (η²⟨P, g⟩)))``, ``η`` the learning rate that follows in
  the chain: ``η²⟨P, g⟩ ≈ ‖ηP‖²_F``, twice the step's KL divergence to second
  order (Ba et al. 2017).

  A non-finite step outputs zeros and keeps the state (:func:`skip_non_finite`).

  Examples:
    >>> import jax.numpy as jnp, optax, kronjax
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    >>> tx = optax.chain(scale_by_kfac(1e-2, exact_damping=True,
    ...                                norm_constraint=None), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> blocks = {("Dense_0",): kronjax.linalg.Kron(jnp.eye(3), jnp.eye(3))}
    >>> updates, state = tx.update(params, state, params, curvature=blocks)
    >>> round(float(updates["Dense_0"]["bias"][0]), 4)  # -0.1 / (1 + 0.01)
    -0.099

  Args:
    damping: ``λ``, a float or a schedule of the step count; ``None``:
      relative to each layer's curvature, ``λ_l = 0.1 (tr Ā_l / d_A)(tr Ḡ_l /
      d_G)``, so that no scale of the loss makes it negligible or dominant.
    decay: moving-average decay of the factors (0: the latest block only).
    factor_every: period of the factor updates (a static int).
    inverse_every: period of the refreshes (a static int).
    exact_damping: ``A ⊗ G + λI`` exactly, in the factors' eigenbases (four
      matmuls a layer); ``False``: the π-corrected split, whose cached damped
      inverses cost two.
    eigenvalue_correction: EK-FAC (``kronjax._ekfac``): ``λ_A λ_Gᵀ`` in the
      eigenbases replaced by a moving average of the squared per-example
      gradients there; damping exact. Needs tapes as ``curvature``.
    norm_constraint: ``c``, a bound on the step's squared Fisher norm, or
      ``None``; needs ``learning_rate``.
    learning_rate: the learning rate (float or schedule) that the chain
      applies after this transformation, for ``norm_constraint``.
    factor_dtype: dtype of the factors and their maths; ``None``: the params'
      float dtype, at least float32.
    placement: a :class:`kronjax.Placement` to spread the refreshes (and, if
      sharded, the factors) over a mesh axis; ``None``: every device does all.
    layers: the layers as the tape function sees them,
      ``tape_fn.layers(params, x)``: needed for bias-free dense-general
      layers (attention projections) and stacked layers (``nn.scan``), whose
      input/output split the params alone do not tell. ``None``: guessed
      from the params (every ``kernel`` of rank >= 2, last axis out unless
      the bias says otherwise, and every 2-D ``embedding``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
    keyword argument ``curvature`` (``{layer_path: Kron(A, G)}`` or
    ``{layer_path: LayerTape}``), takes ``finite`` (from an outer
    :func:`skip_non_finite`) and ignores other keyword arguments.
  """
  settings = _settings(decay, factor_every, inverse_every, exact_damping,
                       factor_dtype, placement, layers, False,
                       eigenvalue_correction)
  return skip_non_finite(_preconditioner(settings, _relative(damping),
                                         norm_constraint, learning_rate))


def scale_by_adaptive_kfac(
    loss: Any,
    *,
    damping: float | None = None,
    decay: float = _D.decay,
    factor_every: int = _D.factor_every,
    inverse_every: int = _D.inverse_every,
    exact_damping: bool = _D.exact_damping,
    eigenvalue_correction: bool = _D.eigenvalue_correction,
    norm_constraint: float | None = None,
    damping_adaptation_interval: int = _adaptive.INTERVAL,
    factor_dtype: Any = _D.factor_dtype,
    placement: _distributed.Placement | None = _D.placement,
    layers: dict[str, LayerSpec] | None = None,
) -> GradientTransformationExtraArgs:
  """K-FAC's adaptive step: step size, momentum and damping chosen for you.

  The step ``d = αΔ + μδ``, with ``Δ = −P`` the preconditioned gradient of
  :func:`scale_by_kfac` (``−g`` on parameters without a block) and ``δ`` the
  previous step, minimises the damped quadratic model of the loss with exact
  Fisher products from ``output_fn`` (Martens & Grosse 2015, §7);
  ``norm_constraint`` bounds ``dᵀFd``; every ``damping_adaptation_interval``
  steps Levenberg–Marquardt adapts ``λ`` from the ratio of the loss's actual
  to predicted change (§6.5; ``0`` turns it off), within [1e-5, 1e3]. The
  output is ``−d``, gradient-signed like every ``scale_by_*``: follow it with
  ``optax.scale(-1.0)`` (:func:`kfac` does).

  Args:
    loss: the model's ``kronjax.losses`` negative log-likelihood.
    damping: the initial ``λ``; ``None``: 0.1 × the mean over layers of
      ``(tr Ā_l / d_A)(tr Ḡ_l / d_G)`` at the first step.
    decay, factor_every, inverse_every, exact_damping,
      eigenvalue_correction: see :func:`scale_by_kfac`.
    norm_constraint: ``c``, a bound on ``dᵀFd``, or ``None``.
    damping_adaptation_interval: ``T`` of Levenberg–Marquardt (a static int).
    factor_dtype, placement, layers: see :func:`scale_by_kfac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params`` and the keyword arguments ``curvature``, ``output_fn`` (params
    → the model's outputs on this batch; under ``optax.partition`` the other
    group's leaves are ``optax.MaskedNode``, which :func:`kfac` fills in) and
    ``targets`` (the batch's targets). Steps that are not finite are skipped
    as in :func:`scale_by_kfac`.
  """
  settings = _settings(decay, factor_every, inverse_every, exact_damping,
                       factor_dtype, placement, layers, False,
                       eigenvalue_correction)
  return skip_non_finite(_adaptive.adaptive_step(
      loss, damping, norm_constraint, damping_adaptation_interval, settings))


def kfac(
    learning_rate: ScalarOrSchedule | None = None,
    *,
    loss: Any = None,
    damping: ScalarOrSchedule | None = None,
    decay: float = _D.decay,
    factor_every: int = _D.factor_every,
    inverse_every: int = _D.inverse_every,
    eigenvalue_correction: bool = _D.eigenvalue_correction,
    norm_constraint: float | None = None,
    fallback: optax.GradientTransformation = optax.adam(1e-3),
    factor_dtype: Any = _D.factor_dtype,
    placement: _distributed.Placement | None = _D.placement,
    layers: dict[str, LayerSpec] | None = None,
) -> GradientTransformationExtraArgs:
  """K-FAC with a fixed or adaptive step; a first-order optimizer for the rest.

  The layers (``layers=tape_fn.layers(params, x)``, or else nodes with a
  ``kernel`` of rank >= 2 or an ``embedding``) get
  :func:`scale_by_kfac` and ``−learning_rate``, or, given ``loss`` instead,
  :func:`scale_by_adaptive_kfac` (``output_fn=`` and ``targets=`` each
  update). Both use the π-corrected damping (EK-FAC's is exact); chain the
  transformations yourself for K-FAC's exact damping. All other parameters (normalisation scales,
  ...) go to ``fallback`` through ``optax.partition``. The whole step is
  skipped, in every group, when anything in it is not finite
  (:func:`skip_non_finite`), so schedules count applied steps only.

  Args:
    learning_rate: step size (float or schedule) of the layers: a fixed step.
    loss: the model's ``kronjax.losses`` NLL instead: the adaptive step.
    damping: ``λ`` (fixed step: float or schedule), or the adaptive step's
      initial ``λ``; ``None``: relative to the curvature's scale (see
      :func:`scale_by_kfac` and :func:`scale_by_adaptive_kfac`).
    decay, factor_every, inverse_every, eigenvalue_correction: see
      :func:`scale_by_kfac`.
    norm_constraint: a bound on the step's squared Fisher norm (KL clipping).
    fallback: the optimizer of the parameters outside layers.
    factor_dtype, placement: see :func:`scale_by_kfac`.
    layers: see :func:`scale_by_kfac`. Every layer must get a block in each
      update's ``curvature`` (else a ``ValueError``): parameters of layers
      the tape function does not tap go to ``fallback``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (updates to add to params).
  """
  if (learning_rate is None) == (loss is None):
    raise ValueError(
        "kfac takes a learning_rate (a fixed step) or a loss (the adaptive "
        "step, e.g. loss=kronjax.losses.softmax_cross_entropy, with "
        "output_fn= and targets= passed to each update)"
        + (", not both." if loss is not None else "."))
  settings = _settings(decay, factor_every, inverse_every, False, factor_dtype,
                       placement, layers, routed=True,
                       eigenvalue_correction=eigenvalue_correction)
  if loss is None:
    bound = NORM_CONSTRAINT if norm_constraint is None else norm_constraint
    group = optax.chain(
        _preconditioner(settings, _relative(damping), bound, learning_rate),
        optax.scale_by_learning_rate(learning_rate))
  else:
    group = optax.chain(_adaptive.adaptive_step(
        loss, damping, norm_constraint, _adaptive.INTERVAL, settings),
                        optax.scale(-1.0))
  labels = functools.partial(param_labels, layers=settings.layers)
  inner = optax.partition({"kfac": group, "fallback": fallback}, labels)
  return skip_non_finite(inner if loss is None
                         else _adaptive.with_full_params(inner))
