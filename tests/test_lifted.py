"""Layers inside lifted transforms (scan, remat, vmap) in linen, NNX and JAX.

A layer run inside a JAX transformation nested in the model sums its
statistics in its own backward pass and hands them out through a zero probe
beside its parameters (``kronjax._summed``). The reference is the same model
written without the transformation: a scanned stack's block ``i`` equals the
block of the ``i``-th layer unrolled, and K-FAC's updates agree too.
"""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kronjax
import kronjax.nn as knn
from kronjax import losses

F64 = jnp.float64
L = 3  # layers in a stack


def _assert_blocks(got, want, atol=1e-12):
  for g, w in zip(got.factors, want.factors):
    np.testing.assert_allclose(g, w, atol=atol)


def _layer(block, i):
  return kronjax.linalg.Kron(*(f[i] for f in block.factors))


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(4, param_dtype=F64)(h)), None


class Block(nn.Module):
  @nn.compact
  def __call__(self, h):
    return jnp.tanh(nn.Dense(4, param_dtype=F64)(h))


class Stack(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, param_dtype=F64, name="inp")(x)
    if self.kind == "unrolled":
      for i in range(L):
        h = Block(name=f"b{i}")(h)
    elif self.kind in ("scan", "scan_remat"):
      body = nn.remat(ScanBlock) if self.kind == "scan_remat" else ScanBlock
      h, _ = nn.scan(body, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=L)(name="blocks")(
                         h, None)
    elif self.kind == "plain":
      h = Block(name="block")(h)
    elif self.kind == "remat":
      h = nn.remat(Block)(name="block")(h)
    else:  # vmap over examples, parameters shared
      h = nn.vmap(Block, variable_axes={"params": None},
                  split_rngs={"params": False})(name="block")(h)
    return nn.Dense(3, param_dtype=F64, name="head")(h)


def _data(n=6):
  x = jax.random.normal(jax.random.key(0), (n, 5), F64)
  y = jax.random.normal(jax.random.key(1), (n, 3), F64)
  return x, y


def _unrolled_params(params):
  stacked = params["blocks"]["Dense_0"]
  return {"inp": params["inp"], "head": params["head"],
          **{f"b{i}": {"Dense_0": jax.tree.map(lambda a: a[i], stacked)}
             for i in range(L)}}


@pytest.mark.parametrize("kind", ["scan", "scan_remat"])
def test_linen_scan_blocks_equal_the_unrolled_layers(kind):
  x, y = _data()
  model, loss = Stack(kind), losses.squared_error
  params = model.init(jax.random.key(2), x)["params"]
  step = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
  spec = step.layers(params, x)["blocks/Dense_0"]
  assert (spec.stack, spec.factor_sizes) == (1, (5, 4))
  value, grads, tape = jax.jit(step)(params, x, y)
  assert isinstance(tape[("blocks", "Dense_0")], kronjax.tape.SummedTape)
  blocks = kronjax.fisher_blocks(tape)
  unrolled = Stack("unrolled")
  uvalue, ugrads, utape = kronjax.flax.value_grad_and_tape(
      unrolled, loss, fisher="exact")(_unrolled_params(params), x, y)
  ublocks = kronjax.fisher_blocks(utape)
  np.testing.assert_allclose(value, uvalue, rtol=1e-13)
  for i in range(L):
    _assert_blocks(_layer(blocks[("blocks", "Dense_0")], i),
                   ublocks[(f"b{i}", "Dense_0")])
  for name in ("inp", "head"):
    _assert_blocks(blocks[(name,)], ublocks[(name,)])
  jax.tree.map(np.testing.assert_allclose, _unrolled_params(grads), ugrads)


@pytest.mark.parametrize("mode", ["fixed", "adaptive", "exact"])
def test_kfac_updates_of_a_scanned_stack_equal_the_unrolled_ones(mode):
  x, y = _data()
  loss = losses.squared_error
  models = Stack("scan_remat"), Stack("unrolled")
  params = models[0].init(jax.random.key(2), x)["params"]
  params = params, _unrolled_params(params)
  updates = []
  for model, p in zip(models, params):
    step = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
    layers = step.layers(p, x)
    if mode == "exact":
      tx = optax.chain(kronjax.scale_by_kfac(
          1e-2, exact_damping=True, inverse_every=1, layers=layers),
                       optax.sgd(0.3))
    else:
      kw = dict(loss=loss) if mode == "adaptive" else dict(learning_rate=0.3)
      tx = kronjax.kfac(**kw, layers=layers, inverse_every=1)
    state = tx.init(p)
    for _ in range(2):
      _, grads, tape = step(p, x, y)
      u, state = tx.update(grads, state, p, curvature=tape, targets=y,
                           output_fn=lambda q, m=model: m.apply(
                               {"params": q}, x))
      p = optax.apply_updates(p, u)
    updates.append(u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-10),
               _unrolled_params(updates[0]), updates[1])


@pytest.mark.parametrize("kind", ["remat", "vmap"])
def test_linen_remat_and_vmap_over_examples_equal_the_plain_layer(kind):
  x, y = _data()
  loss = losses.squared_error
  params = Stack("plain").init(jax.random.key(2), x)["params"]
  got = kronjax.fisher_blocks(kronjax.flax.value_grad_and_tape(
      Stack(kind), loss, fisher="exact")(params, x, y)[2])
  want = kronjax.fisher_blocks(kronjax.flax.value_grad_and_tape(
      Stack("plain"), loss, fisher="exact")(params, x, y)[2])
  assert set(got) == set(want)
  for path in want:
    _assert_blocks(got[path], want[path])


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


class NnxStack(nnx.Module):
  """Stacked blocks run by nnx.scan (the scan-over-layers pattern), or the
  same blocks as attributes called in a loop, or one block under remat."""

  def __init__(self, rngs, kind):
    self.kind = kind
    self.inp = nnx.Linear(5, 4, rngs=rngs, param_dtype=F64)
    if kind == "scan":
      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(rngs):
        return NnxBlock(rngs)
      self.blocks = create(rngs)
    elif kind == "unrolled":
      self.blocks = nnx.List([NnxBlock(rngs) for _ in range(L)])
    else:
      self.blocks = NnxBlock(rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    x = self.inp(x)
    if self.kind == "scan":
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(h, block):
        return block(h)
      x = body(x, self.blocks)
    elif self.kind == "unrolled":
      for block in self.blocks:
        x = block(x)
    elif self.kind == "remat":
      x = nnx.remat(lambda block, h: block(h))(self.blocks, x)
    else:
      x = self.blocks(x)
    return self.head(x)


def test_nnx_scan_blocks_and_updates_equal_the_unrolled_layers():
  x, y = _data()
  loss = losses.squared_error
  stacked = NnxStack(nnx.Rngs(0), "scan")
  unrolled = NnxStack(nnx.Rngs(0), "unrolled")
  for name in ("inp", "head"):
    nnx.update(getattr(unrolled, name), nnx.state(getattr(stacked, name)))
  for i in range(L):
    nnx.update(unrolled.blocks[i], jax.tree.map(
        lambda a: a[i], nnx.state(stacked.blocks)))
  step = kronjax.flax.value_grad_and_tape(stacked, loss, fisher="exact")
  assert step.layers(stacked, x)["blocks/linear"].stack == 1
  value, _, tape = nnx.jit(step)(stacked, x, y)
  blocks = kronjax.fisher_blocks(tape)
  uvalue, _, utape = kronjax.flax.value_grad_and_tape(
      unrolled, loss, fisher="exact")(unrolled, x, y)
  ublocks = kronjax.fisher_blocks(utape)
  np.testing.assert_allclose(value, uvalue, rtol=1e-13)
  for i in range(L):
    _assert_blocks(_layer(blocks[("blocks", "linear")], i),
                   ublocks[("blocks", i, "linear")])
  _assert_blocks(blocks[("head",)], ublocks[("head",)])
  updates = []
  for model in (stacked, unrolled):
    step = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
    tx = kronjax.kfac(0.3, layers=step.layers(model, x), inverse_every=1)
    params = nnx.state(model, nnx.Param)
    _, grads, tape = step(model, x, y)
    updates.append(tx.update(grads, tx.init(params), params,
                             curvature=tape)[0])
  got, want = nnx.to_pure_dict(updates[0]), nnx.to_pure_dict(updates[1])
  for i in range(L):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-10),
                 jax.tree.map(lambda a: a[i], got["blocks"]),
                 want["blocks"][i])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-10),
               got["head"], want["head"])


def test_nnx_remat_equals_the_plain_block():
  x, y = _data()
  loss = losses.squared_error
  remat, plain = NnxStack(nnx.Rngs(0), "remat"), NnxStack(nnx.Rngs(0), "plain")
  got = kronjax.fisher_blocks(kronjax.flax.value_grad_and_tape(
      remat, loss, fisher="exact")(remat, x, y)[2])
  want = kronjax.fisher_blocks(kronjax.flax.value_grad_and_tape(
      plain, loss, fisher="exact")(plain, x, y)[2])
  for path in want:
    _assert_blocks(got[path], want[path])


def _pure_apply(p, x):
  h = jnp.tanh(knn.dense(x, p["a"]["kernel"], p["a"]["bias"]))
  return knn.dense(h, p["b"]["kernel"])


def test_pure_jax_checkpoint_and_vmap_over_examples_equal_the_plain_model():
  x, y = _data()
  loss = losses.squared_error
  k = jax.random.split(jax.random.key(3), 3)
  params = {"a": {"kernel": jax.random.normal(k[0], (5, 4), F64),
                  "bias": jax.random.normal(k[1], (4,), F64)},
            "b": {"kernel": jax.random.normal(k[2], (4, 3), F64)}}
  want = kronjax.fisher_blocks(knn.value_grad_and_tape(
      _pure_apply, loss, fisher="exact")(params, x, y)[2])
  variants = {
      "checkpoint": lambda p, x: jax.checkpoint(
          lambda x: _pure_apply(p, x))(x),
      "vmap": lambda p, x: jax.vmap(_pure_apply, in_axes=(None, 0))(p, x),
  }
  for name, apply in variants.items():
    tape = knn.value_grad_and_tape(apply, loss, fisher="exact")(params, x, y)[2]
    assert all(isinstance(t, kronjax.tape.SummedTape) for t in tape.values())
    got = kronjax.fisher_blocks(tape)
    for path in want:
      _assert_blocks(got[path], want[path])


def _stacked_params():
  k = jax.random.split(jax.random.key(4), 4)
  return {"inp": {"kernel": jax.random.normal(k[0], (5, 4), F64) / 2},
          "blocks": {"kernel": jax.random.normal(k[1], (L, 4, 4), F64) / 2,
                     "bias": jax.random.normal(k[2], (L, 4), F64)},
          "head": {"kernel": jax.random.normal(k[3], (4, 3), F64)}}


def _scanned_apply(p, x):
  blocks = p["blocks"]
  body = lambda h, i: (jnp.tanh(knn.dense(h, blocks["kernel"], blocks["bias"],
                                          index=i)), None)
  h = jax.lax.scan(body, knn.dense(x, p["inp"]["kernel"]), jnp.arange(L))[0]
  return knn.dense(h, p["head"]["kernel"])


def _unrolled_apply(p, x):
  h = knn.dense(x, p["inp"]["kernel"])
  for i in range(L):
    h = jnp.tanh(knn.dense(h, p[f"b{i}"]["kernel"], p[f"b{i}"]["bias"]))
  return knn.dense(h, p["head"]["kernel"])


def _unstack(p):
  return {"inp": p["inp"], "head": p["head"], **{
      f"b{i}": jax.tree.map(lambda a: a[i], p["blocks"]) for i in range(L)}}


def test_pure_jax_lax_scan_over_a_stack_equals_the_unrolled_layers():
  x, y = _data()
  loss, params = losses.squared_error, _stacked_params()
  step = knn.value_grad_and_tape(_scanned_apply, loss, fisher="exact")
  assert step.layers(params, x)["blocks"].stack == 1
  value, grads, tape = jax.jit(step)(params, x, y)
  uvalue, ugrads, utape = knn.value_grad_and_tape(
      _unrolled_apply, loss, fisher="exact")(_unstack(params), x, y)
  blocks, ublocks = kronjax.fisher_blocks(tape), kronjax.fisher_blocks(utape)
  np.testing.assert_allclose(value, uvalue, rtol=1e-13)
  for i in range(L):
    _assert_blocks(_layer(blocks[("blocks",)], i), ublocks[(f"b{i}",)])
  jax.tree.map(np.testing.assert_allclose, _unstack(grads), ugrads)
  updates = []
  for apply, p in ((_scanned_apply, params), (_unrolled_apply, _unstack(params))):
    step = knn.value_grad_and_tape(apply, loss, fisher="exact")
    tx = kronjax.kfac(0.3, layers=step.layers(p, x), inverse_every=1)
    _, g, t = step(p, x, y)
    updates.append(tx.update(g, tx.init(p), p, curvature=t)[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-10),
               _unstack(updates[0]), updates[1])


def test_pure_jax_slices_of_stacked_kernels_are_refused_with_advice():
  params = {"stack": {"kernel": jnp.ones((3, 4, 4), F64) / 4},
            "head": {"kernel": jnp.ones((4, 3), F64)}}
  x, y = jnp.ones((2, 4), F64), jnp.ones((2, 3), F64)

  def scanned(p, x):
    body = lambda h, k: (jnp.tanh(knn.dense(h, k)), None)
    return knn.dense(jax.lax.scan(body, x, p["stack"]["kernel"])[0],
                     p["head"]["kernel"])

  with pytest.raises(ValueError, match="nested in the model.*kronjax.nn"):
    knn.value_grad_and_tape(scanned, losses.squared_error)(params, x, y)

  def sliced(p, x):
    for i in range(3):
      x = knn.dense(x, p["stack"]["kernel"][i])
    return knn.dense(x, p["head"]["kernel"])

  with pytest.raises(ValueError, match=r"index=i\), scanning over"):
    knn.value_grad_and_tape(sliced, losses.squared_error)(params, x, y)
  tape = knn.value_grad_and_tape(scanned, losses.squared_error,
                                 layers=["head"])(params, x, y,
                                                  jax.random.key(0))[2]
  assert set(tape) == {("head",)}


class NnxLaxScan(nnx.Module):
  """Stacked NNX blocks run by a hand-written jax.lax.scan over their state."""

  def __init__(self, rngs):
    self.inner = NnxStack(rngs, "scan")

  def __call__(self, x):
    inner = self.inner
    graphdef, state = nnx.split(inner.blocks)

    def body(h, st):
      return nnx.merge(graphdef, st)(h), None

    return inner.head(jax.lax.scan(body, inner.inp(x), state)[0])


def test_nnx_blocks_under_a_hand_written_lax_scan_equal_nnx_scan():
  x, y = _data()
  loss = losses.squared_error
  model = NnxLaxScan(nnx.Rngs(0))
  got = kronjax.fisher_blocks(kronjax.flax.value_grad_and_tape(
      model, loss, fisher="exact")(model, x, y)[2])
  want = kronjax.fisher_blocks(kronjax.flax.value_grad_and_tape(
      model.inner, loss, fisher="exact")(model.inner, x, y)[2])
  assert {p[1:] for p in got} == set(want)
  for path in got:
    _assert_blocks(got[path], want[path[1:]])


def test_masked_losses_and_reduce_are_refused_for_summed_layers():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5), F64)
  model = Stack("scan")
  params = model.init(jax.random.key(1), x)["params"]
  masked = losses.SoftmaxCrossEntropy(ignore_index=0)
  y = jnp.array([[0, 1, 2], [1, 1, 0]])
  with pytest.raises(ValueError, match=r"\('blocks', 'Dense_0'\).*ignore"):
    kronjax.flax.value_grad_and_tape(model, masked, fisher="exact")(
        params, x, y)
  tape = kronjax.flax.value_grad_and_tape(
      model, losses.softmax_cross_entropy, fisher="exact")(params, x, y)[2]
  with pytest.raises(ValueError, match='weight_sharing="expand"'):
    kronjax.fisher_blocks(tape, weight_sharing="reduce")


STACK_REFRESH = textwrap.dedent("""
    import flax.linen as nn, jax, jax.numpy as jnp, optax, kronjax

    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        for _ in range(4):
          h = jnp.tanh(nn.Dense(64)(h))
        return h, None

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        h, _ = nn.scan(Block, variable_axes={"params": 0},
                       split_rngs={"params": True}, length=2)()(x, None)
        return nn.Dense(10)(h)

    model, loss = Net(), kronjax.losses.softmax_cross_entropy
    x, y = jax.random.normal(jax.random.key(0), (32, 64)), jnp.zeros(32, int)
    params = model.init(jax.random.key(1), x)["params"]
    tape_fn = kronjax.flax.value_grad_and_tape(model, loss)
    tx = kronjax.kfac(0.01, layers=tape_fn.layers(params, x))

    @jax.jit
    def step(params, state):
      value, grads, tape = tape_fn(params, x, y, jax.random.key(2))
      updates, state = tx.update(grads, state, params, curvature=tape)
      return optax.apply_updates(params, updates), state, value

    print(float(step(params, tx.init(params))[2]))
""")


def test_refreshing_a_stack_does_not_hang_on_cpu():
  # jaxlib's batched LAPACK calls on CPU, several in one program, could wait
  # on each other forever; this first refresh of eight stacked factors hung.
  run = subprocess.run([sys.executable, "-c", STACK_REFRESH], timeout=300,
                       capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-2000:]
  assert np.isfinite(float(run.stdout.split()[-1]))
