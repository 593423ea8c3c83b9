"""Helpers for the transform tests: dense references and tiny pure-JAX models.

The models compute their own K-FAC blocks from first principles: each layer's
pre-activation gets a zero perturbation, and the vjp of the outputs with the
columns of the output Fisher's square root as cotangents gives the per-example
output gradients ``g`` (exact Fisher), so ``A = mean ā āᵀ`` and
``G = (1/N) Σ g gᵀ`` (K-FAC-expand for convolutions: positions are extra
examples in ``A`` and summed in ``G``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronjax import losses
from kronjax.linalg import Kron
from kronjax import transform
from kronjax.transform import AdaptiveKfacState, KfacState

# Exactness tests compare steps with dense solves: without the default trust
# region (tests/test_guards.py tests that).
kfac = functools.partial(transform.kfac, norm_constraint=float("inf"))
scale_by_kfac = functools.partial(transform.scale_by_kfac, norm_constraint=None)

CE = losses.softmax_cross_entropy


def random_spd(rng: np.random.Generator, n: int, scale: float = 1.0):
  x = rng.normal(size=(n, 2 * n))
  return scale * x @ x.T / (2 * n)


def dense_solve(a, g, grad_matrix, damping, exact=True):
  """``(A ⊗ G + λI)⁻¹ vec(Γ)`` (or the π-split) densely, reshaped like ``Γ``."""
  a = np.diag(a) if np.ndim(a) == 1 else np.asarray(a)
  g = np.asarray(g)
  if exact:
    m = np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
  else:
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    r = np.sqrt(damping)
    eye_a, eye_g = np.eye(a.shape[0]), np.eye(g.shape[0])
    m = np.kron(a + pi * r * eye_a, g + r / pi * eye_g)
  x = np.linalg.solve(m, np.asarray(grad_matrix).reshape(-1))
  return x.reshape(np.shape(grad_matrix))


def mlp_init(key, sizes, dtype=jnp.float32, norm=False):
  """``{"Dense_i": {"kernel", "bias"}}``, plus a ``"Norm_0"`` scale if asked."""
  params = {}
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"Dense_{i}"] = {
        "kernel": (jax.random.normal(sub, (m, n)) / np.sqrt(m)).astype(dtype),
        "bias": jnp.zeros((n,), dtype)}
  if norm:
    params["Norm_0"] = {"scale": jnp.ones((sizes[1],), dtype)}
  return params


def mlp_apply(params, x, perturbations=None, record=None):
  """tanh MLP; optional per-layer output perturbations and input recording."""
  names = sorted(k for k in params if k.startswith("Dense_"))
  h = x
  for i, name in enumerate(names):
    if record is not None:
      record[name] = h
    s = h @ params[name]["kernel"] + params[name]["bias"]
    if perturbations is not None:
      s = s + perturbations[name]
    if i == 0 and "Norm_0" in params:
      s = s * params["Norm_0"]["scale"]
    h = s if i == len(names) - 1 else jnp.tanh(s)
  return h


def patches(x, k):
  """``(N, H', W', k·k·C)`` patches ordered ``(kh, kw, c_in)`` (VALID)."""
  n, _, _, c = x.shape
  p = jax.lax.conv_general_dilated_patches(
      x, (k, k), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # The patches come ordered (c_in, kh, kw); DESIGN wants (kh, kw, c_in).
  p = p.reshape(p.shape[:3] + (c, k, k))
  return jnp.moveaxis(p, 3, 5).reshape(p.shape[:3] + (k * k * c,))


def cnn_init(key, c_in=1, c_mid=4, classes=3, k=3, hw=6, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  out_hw = hw - k + 1
  return {
      "Conv_0": {"kernel": (jax.random.normal(k1, (k, k, c_in, c_mid))
                            / np.sqrt(k * k * c_in)).astype(dtype),
                 "bias": jnp.zeros((c_mid,), dtype)},
      "Dense_0": {"kernel": (jax.random.normal(k2, (out_hw * out_hw * c_mid,
                                                    classes))
                             / np.sqrt(out_hw * out_hw * c_mid)).astype(dtype),
                  "bias": jnp.zeros((classes,), dtype)}}


def cnn_apply(params, x, perturbations=None, record=None, k=3):
  p = patches(x, k)
  if record is not None:
    record["Conv_0"] = p
  conv = params["Conv_0"]
  s = p @ conv["kernel"].reshape(-1, conv["kernel"].shape[-1]) + conv["bias"]
  if perturbations is not None:
    s = s + perturbations["Conv_0"]
  h = jnp.tanh(s).reshape(x.shape[0], -1)
  if record is not None:
    record["Dense_0"] = h
  s = h @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
  if perturbations is not None:
    s = s + perturbations["Dense_0"]
  return s


@functools.partial(jax.jit, static_argnums=(0, 4))
def loss_grads_blocks(apply, params, x, y, loss=CE):
  """Loss, gradients and exact-Fisher K-FAC blocks of a helper model."""
  record = {}
  apply(params, x, None, record)  # the layers' inputs
  zeros = {name: jnp.zeros(a.shape[:-1] + (params[name]["kernel"].shape[-1],),
                           a.dtype) for name, a in record.items()}
  outputs, pull = jax.vjp(lambda e: apply(params, x, e), zeros)
  sqrt = loss.fisher_sqrt(outputs, y)  # (K, N, C)
  gs = jax.vmap(lambda b: pull(b)[0])(sqrt)
  value, grads = jax.value_and_grad(lambda p: loss(apply(p, x), y))(params)
  n = x.shape[0]
  blocks = {}
  for name, a in record.items():
    a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
    a = a.reshape(-1, a.shape[-1])
    g = gs[name].reshape(-1, gs[name].shape[-1])
    blocks[(name,)] = Kron(a.T @ a / a.shape[0], g.T @ g / n)
  return value, grads, blocks



def toy_data(key, n=128, d=6, classes=3, dtype=jnp.float32):
  """Inputs and labels of a nonlinear teacher."""
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (n, d)).astype(dtype)
  w = jax.random.normal(kw, (d, classes))
  return x, jnp.argmax(jnp.sin(2 * x.astype(jnp.float32) @ w), axis=-1)


def make_step(tx, apply, x, y, loss=CE):
  """``step(params, state) -> (params, state, loss)`` with every extra arg."""

  def step(params, state):
    value, grads, blocks = loss_grads_blocks(apply, params, x, y, loss)
    updates, state = tx.update(grads, state, params, curvature=blocks,
                               output_fn=lambda p: apply(p, x), targets=y)
    return optax.apply_updates(params, updates), state, value

  return step


def train(tx, apply, params, x, y, steps, loss=CE):
  """Runs ``steps`` jitted steps; returns final params, state and losses."""
  step = jax.jit(make_step(tx, apply, x, y, loss))
  return run(step, params, tx.init(params), steps)


def kfac_state(state):
  """The K-FAC state inside a (possibly nested) optax state."""
  is_kfac = lambda z: isinstance(z, (KfacState, AdaptiveKfacState))
  (found,) = [s for s in jax.tree.leaves(state, is_leaf=is_kfac) if is_kfac(s)]
  return found


@functools.lru_cache
def standard_problem(learning_rate):
  """A small MLP problem with ``kfac`` and its jitted step, compiled once.

  Returns:
    ``(tx, step, params, x, y)``: 32 examples, a 4-6-3 MLP with a ``Norm_0``
    scale (routed to the fallback), ``make_kfac(learning_rate,
    inverse_every=2)``.
  """
  x, y = toy_data(jax.random.key(0), n=32, d=4)
  params = mlp_init(jax.random.key(1), [4, 6, 3], norm=True)
  tx = make_kfac(learning_rate, inverse_every=2)
  return tx, jax.jit(make_step(tx, mlp_apply, x, y)), params, x, y


def make_kfac(learning_rate, **kwargs):
  """``kfac`` with a fixed step, or (``None``) adaptive with the CE loss."""
  kwargs.setdefault("damping", 1e-2)
  loss = kwargs.pop("loss", CE) if learning_rate is None else None
  kwargs.pop("loss", None)
  return kfac(learning_rate, loss=loss, **kwargs)


def run(step, params, state, steps):
  """``steps`` calls of ``step``; returns params, state and the losses."""
  values = []
  for _ in range(steps):
    params, state, value = step(params, state)
    values.append(float(value))
  return params, state, values
