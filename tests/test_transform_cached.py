"""The cheap paths of scale_by_kfac give what the plain ones give (float64).

Tapes as ``curvature`` (blocks computed only on factor-update steps) and the
π-split's cached damped inverses (Cholesky, with an eigh fallback).
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
import kronjax.flax
from _transform_helpers import dense_solve, kfac_state, random_spd
from kronjax.linalg import Kron
from kronjax.linalg import _factors as _linalg
from _transform_helpers import scale_by_kfac

F64 = dict(factor_dtype=jnp.float64)


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(x)


def _problem():
  model = _Mlp()
  x = jax.random.normal(jax.random.key(0), (16, 4), jnp.float64)
  y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
  params = model.init(jax.random.key(2), x)["params"]
  step = kronjax.flax.value_grad_and_tape(
      model, kronjax.losses.softmax_cross_entropy, fisher="mc")
  return step, params, x, y


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "pi_split"])
def test_tapes_as_curvature_equal_blocks_every_step(exact):
  step, params, x, y = _problem()
  tx = scale_by_kfac(damping=0.1, decay=0.5, inverse_every=2, factor_every=2,
                     exact_damping=exact, **F64)

  @jax.jit
  def both(state_tape, state_blocks, rng):
    _, grads, tape = step(params, x, y, rng)
    out_t, state_tape = tx.update(grads, state_tape, params, curvature=tape)
    out_b, state_blocks = tx.update(grads, state_blocks, params,
                                    curvature=kronjax.fisher_blocks(tape))
    return out_t, out_b, state_tape, state_blocks

  s_tape = s_blocks = tx.init(params)
  for i in range(4):
    out_t, out_b, s_tape, s_blocks = both(s_tape, s_blocks, jax.random.key(i))
    # Same maths; XLA may fuse the einsums differently inside the cond.
    close = lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-12,
                                                    atol=1e-14)
    jax.tree.map(close, out_t, out_b)
    jax.tree.map(close, s_tape, s_blocks)
  # updated at steps 0 and 2
  assert float(kfac_state(s_tape).factors["Dense_0"].weight) == 0.75


def test_tape_with_a_foreign_layer_is_refused_at_trace_time():
  step, params, x, y = _problem()
  _, grads, tape = step(params, x, y, jax.random.key(0))
  tx = scale_by_kfac(**F64)
  other = {"Other": params["Dense_0"], "Dense_1": params["Dense_1"]}
  with pytest.raises(ValueError, match=r"\('Dense_0',\).*not a layer"):
    tx.update({"Other": grads["Dense_0"], "Dense_1": grads["Dense_1"]},
              tx.init(other), other, curvature=tape)
  with pytest.raises(ValueError, match="only Kron blocks or only LayerTapes"):
    tx.update(grads, tx.init(params), params,
              curvature={**tape, ("Dense_1",): kronjax.fisher_blocks(tape)[
                  ("Dense_1",)]})


def test_non_finite_tape_skips_the_step():
  step, params, x, y = _problem()
  _, grads, tape = step(params, x, y, jax.random.key(0))
  tx = scale_by_kfac(**F64)
  state = tx.init(params)
  bad = dict(tape)
  bad[("Dense_0",)] = jax.tree.map(lambda t: t.at[0].set(jnp.nan),
                                   tape[("Dense_0",)])
  out, new = tx.update(grads, state, params, curvature=bad)
  assert int(new.skipped) == 1 and int(kfac_state(new).count) == 0
  jax.tree.map(np.testing.assert_array_equal, kfac_state(new).factors,
               kfac_state(state).factors)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(out))


def test_pi_split_inverses_keep_the_damping_of_their_refresh():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 2))),
                  "bias": jnp.zeros(2)}}
  schedule = lambda count: 0.1 * (count + 1)
  tx = scale_by_kfac(damping=schedule, decay=0.0, inverse_every=3,
                     exact_damping=False, **F64)
  update = jax.jit(tx.update)
  state, used = tx.init(params), None
  for step in range(4):
    block = Kron(random_spd(rng, 4), random_spd(rng, 2))
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)),
                         params)
    out, state = update(grads, state, params, curvature={("a",): block})
    if step % 3 == 0:
      used = (*block.factors, schedule(step))
    matrix = lambda t: np.concatenate([t["kernel"], t["bias"][None]])
    np.testing.assert_allclose(
        matrix(out["a"]),
        dense_solve(*used[:2], matrix(grads["a"]), used[2], exact=False),
        rtol=1e-9)


def test_indefinite_factor_falls_back_to_clipped_eigenvalues():
  # Round-off can make a factor slightly indefinite; Cholesky of A + π√λ I
  # then fails and the eigenvalues are clipped at min_eigenvalue instead.
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  vals = np.array([2.0, 1.0, 0.5, -0.5])
  a = q @ np.diag(vals) @ q.T
  g = random_spd(rng, 2)
  params = {"a": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)),
                       params)
  tx = scale_by_kfac(damping=1e-4, decay=0.0, exact_damping=False, **F64)
  out, _ = tx.update(grads, tx.init(params), params,
                     curvature={("a",): Kron(jnp.asarray(a), g)})
  clipped = q @ np.diag(np.maximum(vals, 0.0)) @ q.T
  # π from the traces of the factors as given (clipping happens after).
  pi = np.sqrt((np.trace(a) / 4) / (np.trace(g) / 2))
  r = np.sqrt(1e-4)
  m = np.kron(clipped + pi * r * np.eye(4), g + r / pi * np.eye(2))
  matrix = np.concatenate([grads["a"]["kernel"], grads["a"]["bias"][None]])
  expected = np.linalg.solve(m, matrix.reshape(-1)).reshape(4, 2)
  got = np.concatenate([out["a"]["kernel"], out["a"]["bias"][None]])
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_with_tape_false_skips_only_the_fisher_pass():
  step, params, x, y = _problem()
  full = jax.jit(step)(params, x, y, jax.random.key(3))
  for flag in (jnp.asarray(True), jnp.asarray(False)):
    value, grads, tape = jax.jit(
        lambda f: step(params, x, y, jax.random.key(3), with_tape=f))(flag)
    np.testing.assert_allclose(value, full[0], rtol=1e-12)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-12),
                 grads, full[1])
    for path, layer in tape.items():
      np.testing.assert_allclose(layer.inputs, full[2][path].inputs)
      expected = full[2][path].output_grads if flag else 0.0
      np.testing.assert_allclose(layer.output_grads, expected, rtol=1e-12,
                                 atol=0)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_skipping_tapes_between_factor_updates_changes_nothing(adaptive):
  step, params, x, y = _problem()
  model, loss = _Mlp(), kronjax.losses.softmax_cross_entropy
  tx = kronjax.kfac(None if adaptive else 0.1,
                    loss=loss if adaptive else None, factor_every=3,
                    inverse_every=2, **F64)

  def train(skip):
    @jax.jit
    def one(p, s, rng):
      due = kronjax.curvature_due(s) if skip else True
      _, grads, tape = step(p, x, y, rng, with_tape=due)
      updates, s = tx.update(
          grads, s, p, curvature=tape, targets=y,
          output_fn=lambda q: model.apply({"params": q}, x))
      return optax.apply_updates(p, updates), s, due

    p, s, flags = params, tx.init(params), []
    for i in range(7):
      p, s, due = one(p, s, jax.random.key(i))
      flags.append(bool(due))
    return p, s, flags

  p_skip, s_skip, flags = train(True)
  p_full, s_full, _ = train(False)
  assert flags == [True, False, False, True, False, False, True]
  close = lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-12)
  jax.tree.map(close, p_skip, p_full)
  jax.tree.map(close, s_skip, s_full)


def test_curvature_due_needs_a_kfac_state():
  with pytest.raises(ValueError, match="no K-FAC state"):
    kronjax.curvature_due(optax.adam(1e-3).init({"w": jnp.ones(2)}))


def test_a_concrete_with_tape_is_decided_when_tracing():
  step, params, x, y = _problem()
  for flag, conds in ((np.True_, 0), (jnp.asarray(False), 0), (True, 0)):
    jaxpr = str(jax.make_jaxpr(
        lambda p: step(p, x, y, jax.random.key(0), with_tape=flag))(params))
    assert jaxpr.count(" cond[") == conds, flag
  traced = str(jax.make_jaxpr(lambda p, f: step(
      p, x, y, jax.random.key(0), with_tape=f))(params, True))
  assert traced.count(" cond[") == 1


@pytest.mark.parametrize("indefinite", [None, 2, 4])
def test_factors_of_many_sizes_are_inverted_together_exactly(indefinite):
  # Sizes that share a padded call (3, 5, 60 and 64) and that do not (100,
  # 130), a stack of two, and one indefinite beyond any shift, in the padded
  # group or alone: its Cholesky fails and the one fallback for all clips
  # eigenvalues at 0.
  rng = np.random.default_rng(4)
  sizes, stacks = [3, 5, 64, 60, 100, 130], [(), (2,), (), (), (), ()]
  ms = [np.stack([random_spd(rng, d) for _ in range(2)]) if s else
        random_spd(rng, d) for d, s in zip(sizes, stacks)]
  if indefinite is not None:
    ms[indefinite] = ms[indefinite] - 2.0 * np.eye(sizes[indefinite])
  shifts = [rng.uniform(0.1, 1, size=s) for s in stacks]
  got = _linalg.damped_inverses([jnp.asarray(m) for m in ms], jnp.asarray(
      np.concatenate([np.reshape(s, -1) for s in shifts])))

  def expected(m, s):
    vals, vecs = np.linalg.eigh(m)
    return (vecs / (np.maximum(vals, 0) + s)) @ vecs.T

  for m, s, inv in zip(ms, shifts, got):
    want = (np.stack([expected(a, b) for a, b in zip(m, s)]) if m.ndim == 3
            else expected(m, s))
    assert inv.shape == m.shape
    np.testing.assert_allclose(inv, want, rtol=1e-8, atol=1e-10)


def _lapack_order(fn, *args):
  """For each LAPACK call in ``fn``'s jaxpr, the earlier calls it waits on."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  after, calls = {}, []
  for eqn in jaxpr.eqns:
    deps = set().union(*(after.get(v, set()) for v in eqn.invars
                         if not isinstance(v, jax.extend.core.Literal)))
    if {eqn.primitive.name, eqn.params.get("name")} & {"cholesky", "eigh"}:
      calls.append(set(deps))
      deps = deps | {len(calls) - 1}
    for v in eqn.outvars:
      after[v] = deps
  return calls


def test_batched_decompositions_run_one_at_a_time():
  # jaxlib's batched LAPACK calls block a worker of XLA's thread pool until
  # their batch is done: two at once on a 2-core machine hang forever. Each
  # size group's call must wait for the previous one.
  rng = np.random.default_rng(0)
  ms = [jnp.asarray(random_spd(rng, d)) for d in (3, 3, 130, 130, 300, 300)]
  shifts = jnp.full(len(ms), 0.1)
  chol = _lapack_order(lambda m: _linalg.damped_inverses(m, shifts), ms)
  eigh = _lapack_order(_linalg.eighs, ms)
  assert chol == [set(), {0}, {0, 1}]  # the eigh fallback: in a cond
  assert eigh == [set(), {0}, {0, 1}]


def test_refresh_of_many_groups_does_not_hang():
  script = """
import jax, jax.numpy as jnp, numpy as np
from kronjax.linalg import _factors
rng = np.random.default_rng(0)
ms = [jnp.asarray(a @ a.T / d + np.eye(d)) for d in (300, 150, 70, 40)
      for a in [rng.normal(size=(d, d)).astype(np.float32)] for _ in range(3)]
shifts = jnp.full(len(ms), 1e-3, jnp.float32)
f = jax.jit(_factors.damped_inverses)
g = jax.jit(_factors.eighs)
for _ in range(40):
  jax.block_until_ready((f(ms, shifts), g(ms)))
print("ok")
"""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.stdout.strip() == "ok", proc.stderr[-3000:]
