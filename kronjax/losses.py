"""Negative log-likelihood losses with what K-FAC needs from them.

Each loss is the negative log-likelihood ``ℓ(f, y) = −log p(y | f)`` of an
exponential-family predictive distribution with natural parameters ``f``, the
model's outputs. Outputs are shaped ``(N, *extra, C)``; a *term* is one
position ``(n, *extra)`` and the loss value is the mean over the ``M``
(unmasked) terms,

.. math::

  L = \\frac{1}{M} \\sum_{\\text{terms } i} m_i \\, \\ell(f_i, y_i),
  \\qquad M = \\max\\Big(1, \\sum_i m_i\\Big),

with ``m_i ∈ {0, 1}`` the mask (all ones unless the loss masks labels).

Besides the value, K-FAC needs per-term output gradients
``g_i = ∂ℓ(f_i, y_i)/∂f_i``, targets drawn from the model's predictive
distribution (for the Monte-Carlo Fisher, Martens & Grosse 2015 §5), a square
root of the output Fisher (for the exact Fisher) and output-Fisher-vector
products (for the quadratic model of Martens & Grosse 2015 §7). Per term, the
output Fisher is

.. math::

  Λ_i = \\mathbb{E}_{y \\sim p(\\cdot | f_i)}[g_i(y) g_i(y)^\\top]
      = \\nabla^2_{f_i} \\ell(f_i, y_i),

and the two are equal (independently of ``y_i``) because ``f`` is the natural
parameter of an exponential family, so the Fisher of the outputs equals the
Hessian of the loss and the Fisher of the parameters equals the generalised
Gauss-Newton matrix (Martens 2020, §9). ``Λ`` is block-diagonal over terms.

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature. Martens 2020, New insights and perspectives on the
  natural gradient method (JMLR 21).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar, final

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "check",
    "NegativeLogLikelihood",
    "SigmoidBinaryCrossEntropy",
    "SoftmaxCrossEntropy",
    "SquaredError",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "squared_error",
]


class NegativeLogLikelihood(abc.ABC):
  """A per-term negative log-likelihood, averaged over (unmasked) terms.

  Subclasses define the per-position maths on unmasked arrays (``_nll``,
  ``_grad``, ``_sample``, ``_sqrt_fisher``, ``_fisher_vp``); this class does
  the shape checks, masking, averaging and the per-position layout of the
  Fisher square root. All methods are pure and jit/vmap-friendly.
  """

  name: ClassVar[str]
  # True: targets are integer labels shaped outputs.shape[:-1]; False: targets
  # are shaped like the outputs.
  _labels: ClassVar[bool] = False

  def __call__(self, outputs: jax.Array, targets: Any = None) -> Any:
    """Mean NLL over the unmasked terms, in the outputs' dtype (0: none).

    ``outputs`` are ``(N, *extra, C)`` (natural parameters), ``targets``
    ``(N, *extra)`` integer labels or ``(N, *extra, C)`` targets.

    On a step count alone it is a constant schedule of itself, for
    ``optax.inject_hyperparams`` (which takes callables for schedules).
    """
    if targets is None:
      if jnp.ndim(outputs) == 0 and jnp.issubdtype(jnp.result_type(outputs),
                                                   jnp.integer):
        return self
      raise TypeError(f"{self.name} takes (outputs, targets); got no targets.")
    per_term = self.per_term(outputs, targets)
    total = jnp.sum(per_term) / self.num_terms(targets)
    return total.astype(per_term.dtype)

  def per_term(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``ℓ(f_i, y_i)`` for every term, shape ``(N, *extra)``, 0 where masked."""
    outputs, targets = self._check(outputs, targets)
    return self._masked(self._nll(outputs, targets), targets, 0)

  def num_terms(self, targets: jax.Array) -> jax.Array:
    """``M``: the number of unmasked terms (at least 1), a float scalar."""
    if not self.masks_terms:  # a constant, not a sum over the batch
      shape = self._term_shape(self._check_targets(targets))
      return jnp.asarray(math.prod(shape), jnp.result_type(float))
    return jnp.maximum(jnp.sum(self.mask(targets)), 1)

  @property
  def masks_terms(self) -> bool:
    """Whether some targets can mask their terms out (e.g. ``ignore_index``)."""
    return False

  def mask(self, targets: jax.Array) -> jax.Array:
    """``(N, *extra)`` float mask: 1 for terms that count, 0 for masked ones."""
    targets = self._check_targets(targets)
    mask = self._mask(targets)
    if mask is None:
      return jnp.ones(self._term_shape(targets), jnp.result_type(float))
    return mask.astype(jnp.result_type(float))

  def output_grad(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``g_i = ∂ℓ(f_i, y_i)/∂f_i`` per term (not divided by ``M``), shaped like
    ``outputs``, 0 at masked terms."""
    outputs, targets = self._check(outputs, targets)
    return self._masked(self._grad(outputs, targets), targets, 1)

  def sample_targets(self, rng: jax.Array, outputs: jax.Array,
                     num_samples: int) -> jax.Array:
    """``(num_samples, *targets_shape)`` draws from ``p(y | f)``.

    With ``y`` drawn this way, ``output_grad(outputs, y)`` has mean zero and
    covariance ``Λ_i`` per term, which makes the Monte-Carlo Fisher unbiased.
    ``num_samples`` is a static positive int.
    """
    outputs = self._check_outputs(outputs)
    if type(num_samples) is not int or num_samples < 1:
      raise ValueError(f"num_samples must be a positive int: {num_samples!r}.")
    return self._sample(rng, outputs, num_samples)

  def fisher_sqrt(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Columns ``b_k`` with ``Σ_k b_k b_kᵀ = Λ``, the output Fisher.

    Per position, rows ``s_k`` of a ``C × C`` matrix with ``Σ_k s_k s_kᵀ =
    Λ_i``. Column ``(t, k)`` holds ``s_k`` of position ``t`` of every example
    (examples may share a column: K-FAC forms per-example products only) and
    is zero elsewhere, so per example ``Σ_k b_k[n] b_k[n]ᵀ`` is block-diagonal
    with blocks ``Λ_{n,t}``. ``targets`` give the mask only.

    Returns:
      ``(T·C, N, *extra, C)`` with ``T = prod(extra)``; zero at masked terms.
    """
    outputs, targets = self._check(outputs, targets)
    n, *extra, c = outputs.shape
    num_positions = math.prod(extra)
    roots = self._masked(self._sqrt_fisher(outputs), targets, 2)
    roots = roots.reshape(n, num_positions, c, c)  # (n, t, k, c)
    eye = jnp.eye(num_positions, dtype=roots.dtype)
    # Column (t, k) is s_k at position t and zero at the other positions s.
    columns = jnp.einsum("ntkc,ts->tknsc", roots, eye)
    return columns.reshape(num_positions * c, n, *extra, c)

  def fisher_vp(self, outputs: jax.Array, targets: jax.Array,
                v: jax.Array) -> jax.Array:
    """``Λ_i v_i`` per term (not divided by ``M``) for a tangent ``v`` shaped
    like ``outputs``; 0 at masked terms (``targets`` give the mask only)."""
    outputs, targets = self._check(outputs, targets)
    v = jnp.asarray(v)
    if v.shape != outputs.shape:
      raise ValueError(
          f"v must have the outputs' shape {outputs.shape}; got {v.shape}.")
    return self._masked(self._fisher_vp(outputs, v), targets, 1)

  # Per-position maths, on unmasked arrays.
  @abc.abstractmethod
  def _nll(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``(N, *extra)`` negative log-likelihood, ignoring the mask."""

  @abc.abstractmethod
  def _grad(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``∂ℓ/∂f`` shaped like ``outputs``, ignoring the mask."""

  @abc.abstractmethod
  def _sample(self, rng: jax.Array, outputs: jax.Array,
              num_samples: int) -> jax.Array:
    """``(num_samples, *targets_shape)`` draws from ``p(y | f)``."""

  @abc.abstractmethod
  def _sqrt_fisher(self, outputs: jax.Array) -> jax.Array:
    """``(N, *extra, K=C, C)``: rows ``s_k`` with ``Σ_k s_k s_kᵀ = Λ_i``."""

  @abc.abstractmethod
  def _fisher_vp(self, outputs: jax.Array, v: jax.Array) -> jax.Array:
    """``Λ_i v_i`` shaped like ``outputs``, ignoring the mask."""

  def _mask(self, targets: jax.Array) -> jax.Array | None:
    """``(N, *extra)`` boolean mask of the terms that count; None: all do."""
    del targets
    return None

  def _term_shape(self, targets: jax.Array) -> tuple[int, ...]:
    return targets.shape if self._labels else targets.shape[:-1]

  def _masked(self, x: jax.Array, targets: jax.Array, trailing: int
              ) -> jax.Array:
    """Zeroes masked terms of ``x`` shaped ``(N, *extra, *trailing_dims)``."""
    mask = self._mask(targets)
    if mask is None:
      return x
    mask = mask.reshape(mask.shape + (1,) * trailing)
    return jnp.where(mask, x, jnp.zeros((), x.dtype))

  def _check_outputs(self, outputs: jax.Array) -> jax.Array:
    outputs = jnp.asarray(outputs)
    if outputs.ndim < 2 or not jnp.issubdtype(outputs.dtype, jnp.floating):
      raise ValueError(
          f"{self.name}: outputs must be floats shaped (N, ..., C); got "
          f"{outputs.dtype} of shape {outputs.shape}.")
    return outputs

  def _check_targets(self, targets: jax.Array) -> jax.Array:
    targets = jnp.asarray(targets)
    if self._labels:
      if not jnp.issubdtype(targets.dtype, jnp.integer) or targets.ndim < 1:
        raise ValueError(
            f"{self.name}: targets must be integer class labels shaped "
            f"(N, ...); got dtype {targets.dtype} with shape {targets.shape}.")
    elif targets.ndim < 2:
      raise ValueError(
          f"{self.name}: targets must be shaped (N, ..., C) like the outputs; "
          f"got shape {targets.shape}.")
    return targets

  def _check(self, outputs: jax.Array, targets: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """Validates shapes at trace time; returns ``(outputs, targets)``."""
    outputs = self._check_outputs(outputs)
    targets = self._check_targets(targets)
    want = outputs.shape[:-1] if self._labels else outputs.shape
    if targets.shape != want:
      kind = "labels" if self._labels else "targets"
      raise ValueError(
          f"{self.name}: targets of shape {targets.shape} do not match outputs "
          f"of shape {outputs.shape}; expected {kind} of shape {want}.")
    if not self._labels:
      targets = targets.astype(outputs.dtype)
    return outputs, targets


def check(loss: Any, argument: str = "loss") -> None:
  """Raises a ``TypeError`` unless ``loss`` is a kronjax negative log-likelihood."""
  if not isinstance(loss, NegativeLogLikelihood):
    raise TypeError(
        f"{argument} must be a kronjax.losses negative log-likelihood "
        "(kronjax.losses.softmax_cross_entropy, sigmoid_binary_cross_entropy "
        "or squared_error), which also knows its Fisher; got "
        f"{getattr(loss, '__name__', None) or type(loss).__name__}. An optax "
        "loss such as softmax_cross_entropy_with_integer_labels is "
        "kronjax.losses.softmax_cross_entropy.")


def _register(cls):
  """A final frozen dataclass, and a leafless pytree so it can cross ``jit``."""
  cls = final(dataclasses.dataclass(frozen=True)(cls))
  return jax.tree_util.register_static(cls)


@_register
class SoftmaxCrossEntropy(NegativeLogLikelihood):
  """Categorical negative log-likelihood with integer labels.

  With ``p = softmax(f)``, per term

  .. math::

    ℓ = -\\log p_y, \\qquad g = p - e_y, \\qquad Λ = \\operatorname{diag}(p)
    - p p^\\top = \\sum_k b_k b_k^\\top, \\quad b_k = \\sqrt{p_k}\\,(e_k - p),

  since ``Σ_k p_k (e_k − p)(e_k − p)ᵀ = diag(p) − ppᵀ`` (``Σ_k p_k = 1``).

  Attributes:
    ignore_index: labels equal to it are masked out (e.g. padding tokens):
      they contribute nothing and are not counted in ``M``.
  """

  ignore_index: int | None = None

  name: ClassVar[str] = "softmax_cross_entropy"
  _labels: ClassVar[bool] = True

  @property
  def masks_terms(self) -> bool:
    return self.ignore_index is not None

  def _mask(self, targets):
    return None if self.ignore_index is None else targets != self.ignore_index

  def _safe_labels(self, targets):
    # Masked labels (e.g. -100) must not index out of range.
    mask = self._mask(targets)
    return targets if mask is None else jnp.where(mask, targets, 0)

  def _nll(self, outputs, targets):
    return optax.losses.softmax_cross_entropy_with_integer_labels(
        outputs, self._safe_labels(targets))

  def _grad(self, outputs, targets):
    return jax.nn.softmax(outputs, axis=-1) - jax.nn.one_hot(
        self._safe_labels(targets), outputs.shape[-1], dtype=outputs.dtype)

  def _sample(self, rng, outputs, num_samples):
    return jax.random.categorical(
        rng, outputs, axis=-1, shape=(num_samples, *outputs.shape[:-1]))

  def _sqrt_fisher(self, outputs):
    p = jax.nn.softmax(outputs, axis=-1)
    eye = jnp.eye(outputs.shape[-1], dtype=outputs.dtype)
    # Row k: sqrt(p_k) (e_k - p).
    return jnp.sqrt(p)[..., :, None] * (eye - p[..., None, :])

  def _fisher_vp(self, outputs, v):
    p = jax.nn.softmax(outputs, axis=-1)
    return p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)


@_register
class SigmoidBinaryCrossEntropy(NegativeLogLikelihood):
  """Independent Bernoulli negative log-likelihood, summed over the outputs.

  With ``σ = sigmoid(f)`` and targets ``y ∈ [0, 1]`` (soft targets allowed),
  per term

  .. math::

    ℓ = -\\sum_c \\big[y_c \\log σ_c + (1 - y_c) \\log(1 - σ_c)\\big], \\qquad
    g = σ - y, \\qquad Λ = \\operatorname{diag}(σ (1 - σ)),

  with square root ``b_k = \\sqrt{σ_k (1 - σ_k)}\\, e_k``.
  """

  name: ClassVar[str] = "sigmoid_binary_cross_entropy"

  def _nll(self, outputs, targets):
    return jnp.sum(optax.losses.sigmoid_binary_cross_entropy(outputs, targets),
                   axis=-1)

  def _grad(self, outputs, targets):
    return jax.nn.sigmoid(outputs) - targets

  def _sample(self, rng, outputs, num_samples):
    return jax.random.bernoulli(rng, jax.nn.sigmoid(outputs), shape=(
        num_samples, *outputs.shape)).astype(outputs.dtype)

  def _variance(self, outputs):
    # σ(f) σ(−f) = σ(1 − σ) without cancellation for large |f|.
    return jax.nn.sigmoid(outputs) * jax.nn.sigmoid(-outputs)

  def _sqrt_fisher(self, outputs):
    eye = jnp.eye(outputs.shape[-1], dtype=outputs.dtype)
    return jnp.sqrt(self._variance(outputs))[..., :, None] * eye

  def _fisher_vp(self, outputs, v):
    return self._variance(outputs) * v


@_register
class SquaredError(NegativeLogLikelihood):
  """Gaussian negative log-likelihood with unit variance (up to a constant).

  Per term

  .. math::

    ℓ = \\tfrac12 \\lVert y - f \\rVert^2, \\qquad g = f - y, \\qquad Λ = I,

  with square root ``b_k = e_k``; targets are drawn as ``f + N(0, I)``.
  """

  name: ClassVar[str] = "squared_error"

  def _nll(self, outputs, targets):
    return jnp.sum(optax.losses.l2_loss(outputs, targets), axis=-1)

  def _grad(self, outputs, targets):
    return outputs - targets

  def _sample(self, rng, outputs, num_samples):
    return outputs + jax.random.normal(rng, (num_samples, *outputs.shape),
                                       outputs.dtype)

  def _sqrt_fisher(self, outputs):
    eye = jnp.eye(outputs.shape[-1], dtype=outputs.dtype)
    return jnp.broadcast_to(eye, outputs.shape + outputs.shape[-1:])

  def _fisher_vp(self, outputs, v):
    return v  # Λ = I


softmax_cross_entropy = SoftmaxCrossEntropy()
sigmoid_binary_cross_entropy = SigmoidBinaryCrossEntropy()
squared_error = SquaredError()
