"""Tests for kronjax.losses against brute-force references (float64).

The output Fisher is computed two independent ways: as E_y[g gᵀ] by summing
over every outcome of the predictive distribution, and as the Hessian of the
per-term loss (equal for these exponential-family losses, Martens 2020).
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from kronjax import losses

SOFTMAX = losses.softmax_cross_entropy
SIGMOID = losses.sigmoid_binary_cross_entropy
SQUARED = losses.squared_error
ALL_LOSSES = [SOFTMAX, SIGMOID, SQUARED]
LOSS_IDS = ["softmax", "sigmoid", "squared"]
FLAT = (4, 3)  # (N, C)
EXTRA = (2, 3, 2, 3)  # (N, T1, T2, C): T = 6 positions
SHAPES = [FLAT, EXTRA]
SHAPE_IDS = ["no_extra", "extra"]
IGNORE = -100
WITH_MASKED = ALL_LOSSES + [losses.SoftmaxCrossEntropy(ignore_index=IGNORE)]
WITH_MASKED_IDS = LOSS_IDS + ["softmax_masked"]


# Helpers ---------------------------------------------------------------------
# References are plain NumPy: independent of the code under test, and cheap
# (no per-shape compilation of eager JAX ops).


def _data(loss, shape, seed=0, dtype=np.float64):
  """Outputs of ``shape`` and matching targets for ``loss``."""
  rng = np.random.default_rng(seed)
  outputs = jnp.asarray(2.0 * rng.standard_normal(shape), dtype)
  if loss is SIGMOID:
    targets = jnp.asarray(rng.uniform(size=shape), dtype)  # soft targets
  elif loss is SQUARED:
    targets = jnp.asarray(rng.standard_normal(shape), dtype)
  else:
    targets = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]))
  return outputs, targets


def _masked_labels(shape):
  """Softmax labels for ``shape`` with about a third of the terms ignored."""
  labels = np.random.default_rng(7).integers(0, shape[-1], shape[:-1])
  labels.reshape(-1)[::3] = IGNORE
  return jnp.asarray(labels)


def _softmax(f):
  e = np.exp(f - f.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _brute_force_fisher(loss, f):
  """E_{y ~ p(.|f)}[g(y) g(y)ᵀ] for one position's outputs ``f`` (C,).

  Sums over every outcome y, weighted by p(y | f), with g(y) = ∂ℓ/∂f: p − e_y
  (softmax), σ − y over all 2^C outcomes (sigmoid); the identity for the
  unit-variance Gaussian.
  """
  f = np.asarray(f, np.float64)
  c = f.shape[-1]
  if loss is SQUARED:
    return np.eye(c)
  if loss is SIGMOID:
    sigma = 1 / (1 + np.exp(-f))
    outcomes = np.array(list(itertools.product([0.0, 1.0], repeat=c)))
    probs = np.prod(np.where(outcomes == 1, sigma, 1 - sigma), axis=-1)
    grads = sigma - outcomes
  else:
    probs = _softmax(f)
    grads = probs - np.eye(c)
  return np.einsum("y,yi,yj->ij", probs, grads, grads)


@jax.jit
def _hessians(loss, f, y):
  """∇²_f ℓ(f_i, y_i) for a stack of positions ``f`` (P, C), ``y`` (P, ...)."""
  per_position = lambda f, y: loss.per_term(f[None], y[None])[0]
  return jax.vmap(jax.hessian(per_position))(f, y)


def _positions(x, shape):
  """Flattens the term axes: (N, *extra, ...) -> (N·T, ...)."""
  return x.reshape(math.prod(shape[:-1]), *x.shape[len(shape) - 1:])


# Values ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("loss", ALL_LOSSES, ids=LOSS_IDS)
def test_value_is_mean_of_reference_nll(loss, shape):
  outputs, targets = _data(loss, shape)
  if loss is SOFTMAX:
    want = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
  elif loss is SIGMOID:
    want = optax.sigmoid_binary_cross_entropy(outputs, targets).sum(-1)
  else:
    want = 0.5 * np.sum((np.asarray(targets) - np.asarray(outputs)) ** 2, -1)
  np.testing.assert_allclose(loss.per_term(outputs, targets), want, rtol=1e-12)
  np.testing.assert_allclose(loss(outputs, targets), want.mean(), rtol=1e-12)
  assert loss.num_terms(targets) == math.prod(shape[:-1])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_masked_value_averages_only_unmasked_terms(shape):
  loss = losses.SoftmaxCrossEntropy(ignore_index=IGNORE)
  outputs, _ = _data(SOFTMAX, shape)
  labels = _masked_labels(shape)
  keep = labels != IGNORE
  nll = optax.softmax_cross_entropy_with_integer_labels(
      outputs[keep], labels[keep])
  np.testing.assert_allclose(loss(outputs, labels), nll.mean(), rtol=1e-12)
  np.testing.assert_allclose(loss.per_term(outputs, labels)[keep], nll,
                             rtol=1e-12)
  assert jnp.all(loss.per_term(outputs, labels)[~keep] == 0)
  assert loss.num_terms(labels) == keep.sum()
  np.testing.assert_array_equal(loss.mask(labels), keep.astype(float))


def test_fully_masked_batch_gives_zero_not_nan():
  loss = losses.SoftmaxCrossEntropy(ignore_index=IGNORE)
  outputs, _ = _data(SOFTMAX, EXTRA)
  labels = jnp.full(EXTRA[:-1], IGNORE)
  value, grad = jax.value_and_grad(loss)(outputs, labels)
  assert value == 0 and jnp.all(grad == 0)
  assert loss.num_terms(labels) == 1
  assert jnp.all(loss.output_grad(outputs, labels) == 0)
  assert jnp.all(loss.fisher_sqrt(outputs, labels) == 0)
  assert jnp.all(loss.fisher_vp(outputs, labels, outputs) == 0)


def test_ignore_index_inside_the_class_range():
  loss = losses.SoftmaxCrossEntropy(ignore_index=0)  # e.g. a padding token
  outputs, _ = _data(SOFTMAX, FLAT)
  labels = jnp.array([0, 1, 2, 0])
  want = optax.softmax_cross_entropy_with_integer_labels(
      outputs[1:3], labels[1:3]).mean()
  np.testing.assert_allclose(loss(outputs, labels), want, rtol=1e-12)


# Output gradients ------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("loss", WITH_MASKED, ids=WITH_MASKED_IDS)
def test_output_grad_matches_autodiff(loss, shape):
  outputs, targets = _data(loss, shape)
  if getattr(loss, "ignore_index", None) is not None:
    targets = _masked_labels(shape)
  got = loss.output_grad(outputs, targets)
  per_term_grad = jax.grad(lambda f: loss.per_term(f, targets).sum())(outputs)
  mean_grad = jax.grad(loss)(outputs, targets)
  np.testing.assert_allclose(got, per_term_grad, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(got, loss.num_terms(targets) * mean_grad,
                             rtol=1e-12, atol=1e-14)


# Output Fisher ---------------------------------------------------------------


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=LOSS_IDS)
def test_fisher_sqrt_without_extra_dims(loss):
  outputs, targets = _data(loss, FLAT)
  roots = loss.fisher_sqrt(outputs, targets)
  assert roots.shape == (FLAT[-1], *FLAT)  # K = C columns
  fishers = jnp.einsum("kni,knj->nij", roots, roots)
  hessians = _hessians(loss, outputs, targets)
  for n in range(FLAT[0]):
    np.testing.assert_allclose(fishers[n],
                               _brute_force_fisher(loss, outputs[n]),
                               atol=1e-12)
    np.testing.assert_allclose(fishers[n], hessians[n], atol=1e-12)


def test_softmax_fisher_sqrt_columns():
  outputs, labels = _data(SOFTMAX, FLAT)
  p = _softmax(np.asarray(outputs))
  roots = SOFTMAX.fisher_sqrt(outputs, labels)
  c = FLAT[-1]
  for k in range(c):
    want = np.sqrt(p[:, k:k + 1]) * (np.eye(c)[k] - p)
    np.testing.assert_allclose(roots[k], want, atol=1e-14)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=LOSS_IDS)
def test_fisher_sqrt_with_extra_dims_is_block_diagonal(loss):
  shape = EXTRA
  outputs, targets = _data(loss, shape)
  num_examples, *extra, c = shape
  t = math.prod(extra)
  roots = loss.fisher_sqrt(outputs, targets)
  assert roots.shape == (t * c, *shape)
  for n in range(num_examples):
    columns = np.asarray(roots[:, n]).reshape(t * c, t * c)  # (K, T·C)
    f_n = outputs[n].reshape(t, c)
    y_n = targets[n].reshape(t, *targets.shape[len(shape) - 1:])
    blocks = [_brute_force_fisher(loss, f) for f in f_n]
    np.testing.assert_allclose(columns.T @ columns,
                               scipy.linalg.block_diag(*blocks), atol=1e-12)
    np.testing.assert_allclose(
        columns.T @ columns,
        scipy.linalg.block_diag(*_hessians(loss, f_n, y_n)), atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fisher_sqrt_is_zero_at_masked_terms(shape):
  loss = losses.SoftmaxCrossEntropy(ignore_index=IGNORE)
  outputs, _ = _data(SOFTMAX, shape)
  labels = _masked_labels(shape)
  roots = jnp.moveaxis(loss.fisher_sqrt(outputs, labels), 0, -2)
  masked = roots[labels == IGNORE]
  unmasked = roots[labels != IGNORE]
  assert jnp.all(masked == 0)
  assert jnp.all(jnp.any(unmasked != 0, axis=(-2, -1)))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("loss", WITH_MASKED, ids=WITH_MASKED_IDS)
def test_fisher_vp_matches_dense_fisher(loss, shape):
  outputs, targets = _data(loss, shape)
  if getattr(loss, "ignore_index", None) is not None:
    targets = _masked_labels(shape)
  v = np.random.default_rng(3).standard_normal(shape)
  got = _positions(loss.fisher_vp(outputs, targets, v), shape)
  mask = _positions(np.asarray(loss.mask(targets)), shape)
  f, v = _positions(np.asarray(outputs), shape), _positions(v, shape)
  want = [m * _brute_force_fisher(loss, f_i) @ v_i
          for f_i, v_i, m in zip(f, v, mask)]
  np.testing.assert_allclose(got, np.stack(want), atol=1e-12)


# Sampling --------------------------------------------------------------------

NUM_SAMPLES = 20_000


def _assert_monte_carlo_close(draws, want):
  """Mean of ``draws`` (leading sample axis) within 5 standard errors."""
  draws = np.asarray(draws, np.float64)
  mean = draws.mean(0)
  stderr = draws.std(0) / math.sqrt(draws.shape[0])
  np.testing.assert_array_less(np.abs(mean - want), 5 * stderr + 1e-3)


@jax.jit
def _monte_carlo_outer(loss, outputs, key):
  """Draws and their (S, positions, C, C) output-gradient outer products."""
  draws = loss.sample_targets(key, outputs, NUM_SAMPLES)
  grads = jax.vmap(lambda y: loss.output_grad(outputs, y))(draws)
  grads = grads.reshape(NUM_SAMPLES, -1, outputs.shape[-1])
  return draws, jnp.einsum("spi,spj->spij", grads, grads)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("loss", ALL_LOSSES, ids=LOSS_IDS)
def test_monte_carlo_fisher_converges_to_exact(loss, shape):
  outputs, _ = _data(loss, shape, seed=1)
  draws, outer = _monte_carlo_outer(loss, outputs, jax.random.key(0))
  target_shape = shape[:-1] if loss is SOFTMAX else shape
  assert draws.shape == (NUM_SAMPLES, *target_shape)
  exact = np.stack([_brute_force_fisher(loss, f)
                    for f in _positions(np.asarray(outputs), shape)])
  _assert_monte_carlo_close(outer, exact)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=LOSS_IDS)
def test_sample_means_match_the_prediction(loss):
  outputs, _ = _data(loss, EXTRA, seed=2)
  draws = _monte_carlo_outer(loss, outputs, jax.random.key(1))[0]
  if loss is SOFTMAX:
    assert jnp.issubdtype(draws.dtype, jnp.integer)
    assert jnp.all((draws >= 0) & (draws < EXTRA[-1]))
    _assert_monte_carlo_close(np.eye(EXTRA[-1])[np.asarray(draws)],
                              _softmax(np.asarray(outputs)))
  elif loss is SIGMOID:
    assert jnp.all((draws == 0) | (draws == 1))
    _assert_monte_carlo_close(draws, 1 / (1 + np.exp(-np.asarray(outputs))))
  else:
    _assert_monte_carlo_close(draws, outputs)


def test_samples_depend_on_the_key_only():
  outputs, _ = _data(SOFTMAX, FLAT)
  a = SOFTMAX.sample_targets(jax.random.key(0), outputs, 8)
  b = SOFTMAX.sample_targets(jax.random.key(0), outputs, 8)
  c = SOFTMAX.sample_targets(jax.random.key(1), outputs, 8)
  np.testing.assert_array_equal(a, b)
  assert jnp.any(a != c)


# Behaviour: jit, dtypes, batch size one --------------------------------------


def _deterministic_methods(loss, outputs, targets):
  return (loss(outputs, targets), loss.per_term(outputs, targets),
          loss.num_terms(targets), loss.output_grad(outputs, targets),
          loss.fisher_sqrt(outputs, targets),
          loss.fisher_vp(outputs, targets, outputs))


def _all_methods(loss, outputs, targets):
  draws = loss.sample_targets(jax.random.key(0), outputs, 2)
  return _deterministic_methods(loss, outputs, targets) + (draws,)


@pytest.mark.parametrize("loss", WITH_MASKED, ids=WITH_MASKED_IDS)
def test_jit_matches_eager_and_loss_can_be_a_jit_argument(loss):
  outputs, targets = _data(loss, EXTRA)
  # Sampling runs under jit in the Monte-Carlo tests.
  eager = _deterministic_methods(loss, outputs, targets)
  jitted = jax.jit(_deterministic_methods)(loss, outputs, targets)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=LOSS_IDS)
def test_vmap_over_a_leading_axis(loss):
  outputs, targets = _data(loss, EXTRA)
  got = jax.vmap(loss.fisher_vp)(outputs, targets, outputs)
  want = jnp.stack([loss.fisher_vp(f, y, f) for f, y in zip(outputs, targets)])
  np.testing.assert_allclose(got, want, atol=1e-14)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=LOSS_IDS)
def test_float32_inputs_keep_float32(loss):
  outputs, targets = _data(loss, EXTRA, dtype=np.float32)
  # eval_shape traces exactly what eager and jit run, without compiling.
  value, per_term, _, grad, roots, fvp, draws = jax.eval_shape(
      _all_methods, loss, outputs, targets)
  for x in (value, per_term, grad, roots, fvp):
    assert x.dtype == jnp.float32
  if loss is not SOFTMAX:
    assert draws.dtype == jnp.float32


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=LOSS_IDS)
def test_batch_size_one(loss):
  outputs, targets = _data(loss, (1, 3))
  value, per_term, num, grad, roots, fvp, draws = jax.eval_shape(
      _all_methods, loss, outputs, targets)
  assert value.shape == () and per_term.shape == (1,) and num.shape == ()
  assert grad.shape == (1, 3) and roots.shape == (3, 1, 3)
  assert fvp.shape == (1, 3) and draws.shape[:2] == (2, 1)
  assert loss.num_terms(targets) == 1
  np.testing.assert_allclose(loss(outputs, targets),
                             loss.per_term(outputs, targets)[0])


def test_names_and_reprs():
  assert SOFTMAX.name == "softmax_cross_entropy"
  assert SIGMOID.name == "sigmoid_binary_cross_entropy"
  assert SQUARED.name == "squared_error"
  assert "ignore_index=-100" in repr(losses.SoftmaxCrossEntropy(IGNORE))
  assert losses.SoftmaxCrossEntropy() == SOFTMAX
  assert hash(losses.SoftmaxCrossEntropy(IGNORE)) == hash(
      losses.SoftmaxCrossEntropy(IGNORE))
  with pytest.raises(AttributeError):
    SOFTMAX.ignore_index = 0  # frozen


# Bad inputs ------------------------------------------------------------------

_F = np.zeros((4, 3))
_KEY = jax.random.key(0)
_BAD_INPUTS = {
    "outputs_1d": (lambda: SOFTMAX(np.zeros(4), np.zeros(4, int)),
                   r"outputs must be floats shaped \(N, ..., C\).*\(4,\)"),
    "labels_nt_vs_nc": (lambda: SOFTMAX(_F, np.zeros((4, 2), int)),
                        r"\(4, 2\).*\(4, 3\).*labels of shape \(4,\)"),
    "labels_batch": (lambda: SOFTMAX(_F, np.zeros(5, int)),
                     r"\(5,\).*\(4, 3\)"),
    "float_labels": (lambda: SOFTMAX(_F, np.zeros(4)),
                     "integer class labels.*float"),
    "scalar_labels": (lambda: SOFTMAX(_F, np.zeros((), int)),
                      r"labels shaped \(N, ...\).*shape \(\)"),
    "integer_outputs": (lambda: SOFTMAX(np.zeros((4, 3), int),
                                        np.zeros(4, int)), "must be floats"),
    "sigmoid_targets_1d": (lambda: SIGMOID(_F, np.zeros(4)),
                           r"\(N, \.\.\., C\).*\(4,\)"),
    "sigmoid_targets_shape": (lambda: SIGMOID(_F, np.zeros((4, 2))),
                              r"\(4, 2\).*\(4, 3\)"),
    "squared_targets_shape": (lambda: SQUARED(_F, np.zeros((3, 3))),
                              r"\(3, 3\).*\(4, 3\)"),
    "squared_outputs_1d": (lambda: SQUARED(np.zeros(3), np.zeros(3)),
                           r"shaped \(N, ..., C\)"),
    "fisher_vp_tangent": (lambda: SQUARED.fisher_vp(_F, _F, np.zeros((4, 2))),
                          r"v must.*\(4, 3\).*\(4, 2\)"),
    "zero_samples": (lambda: SOFTMAX.sample_targets(_KEY, _F, 0),
                     "num_samples.*0"),
    "float_samples": (lambda: SIGMOID.sample_targets(_KEY, _F, 2.0),
                      "num_samples"),
    "bool_samples": (lambda: SQUARED.sample_targets(_KEY, _F, True),
                     "num_samples"),
}


@pytest.mark.parametrize("call,match", _BAD_INPUTS.values(),
                         ids=_BAD_INPUTS.keys())
def test_bad_inputs_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_shape_errors_are_raised_at_trace_time():
  with pytest.raises(ValueError, match="do not match"):
    jax.jit(SOFTMAX)(_F, np.zeros((4, 2), int))
