"""Layers inside lifted transforms (scan, vmap, remat) in linen, NNX and JAX.

A tape records a layer's inputs from the Python side of the forward pass; a
layer run inside a JAX transformation nested in the model has inputs that
never leave that transformation. Such layers are refused at trace time with an
error that names the layer and says what to do, and ``layers=`` can leave
them out so that the rest of the model is still tapped.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import kronjax
import kronjax.nn as knn
from kronjax import losses

F64 = jnp.float64
NESTED = r"inside a JAX transformation nested in the model.*unroll"


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(4)(x))


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return jnp.tanh(nn.Dense(4)(c)), None


class Linen(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4)(x)
    if self.kind == "remat":
      x = nn.remat(Block)()(x)
    elif self.kind == "scan":
      x, _ = nn.scan(ScanBlock, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=3)()(x, None)
    else:
      x = nn.vmap(nn.Dense, variable_axes={"params": 0},
                  split_rngs={"params": True}, in_axes=0, out_axes=0,
                  axis_size=x.shape[0])(4)(x[:, None])[:, 0]
    return nn.Dense(3)(x)


LIFTED = {"remat": ("CheckpointBlock_0", "Dense_0"),
          "scan": ("ScanScanBlock_0", "Dense_0"),
          "vmap": ("VmapDense_0",)}


@pytest.mark.parametrize("kind", sorted(LIFTED))
def test_linen_lifted_layers_are_refused_or_left_out(kind):
  model = Linen(kind)
  x = jax.random.normal(jax.random.key(0), (2, 4), F64)
  y = jax.random.normal(jax.random.key(1), (2, 3), F64)
  params = jax.tree.map(lambda p: p.astype(F64),
                        model.init(jax.random.key(2), x)["params"])
  step = kronjax.flax.value_grad_and_tape(model, losses.squared_error,
                                          fisher="exact")
  with pytest.raises(ValueError, match=str(LIFTED[kind]).replace(
      "(", r"\(").replace(")", r"\)") + ".*" + NESTED):
    jax.jit(step)(params, x, y)
  plain = [("Dense_0",), ("Dense_1",)]
  step = kronjax.flax.value_grad_and_tape(model, losses.squared_error,
                                          fisher="exact", layers=plain)
  _, grads, tape = step(params, x, y)
  assert set(tape) == set(plain)
  uncovered = kronjax.uncovered_parameters(grads, tape)
  assert uncovered and all(p[0] == LIFTED[kind][0] for p in uncovered)


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


class NnxStack(nnx.Module):
  """Three stacked blocks run by nnx.scan (or one block under nnx.remat)."""

  def __init__(self, rngs, kind):
    self.kind = kind
    if kind == "scan":
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(rngs):
        return NnxBlock(rngs)
      self.blocks = create(rngs)
    else:
      self.blocks = NnxBlock(rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    if self.kind == "scan":
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(h, block):
        return block(h)
      x = body(x, self.blocks)
    else:
      x = nnx.remat(lambda block, h: block(h))(self.blocks, x)
    return self.head(x)


@pytest.mark.parametrize("kind", ["scan", "remat"])
def test_nnx_scan_and_remat_are_refused_or_left_out(kind):
  model = NnxStack(nnx.Rngs(0), kind)
  x = jax.random.normal(jax.random.key(0), (2, 4), F64)
  y = jax.random.normal(jax.random.key(1), (2, 3), F64)
  step = kronjax.flax.value_grad_and_tape(model, losses.squared_error,
                                          fisher="exact")
  with pytest.raises(ValueError, match=r"An nnx.Linear layer.*" + NESTED):
    nnx.jit(step)(model, x, y)
  step = kronjax.flax.value_grad_and_tape(model, losses.squared_error,
                                          fisher="exact", layers=[("head",)])
  _, grads, tape = step(model, x, y)
  assert set(tape) == {("head",)}
  assert kronjax.uncovered_parameters(grads, tape) == [
      ("blocks", "linear", "bias"), ("blocks", "linear", "kernel")]


def test_pure_jax_checkpoint_scan_and_stacked_kernels_are_refused():
  params = {"stack": {"kernel": jnp.ones((3, 4, 4), F64) / 4},
            "head": {"kernel": jnp.ones((4, 3), F64)}}
  x = jnp.ones((2, 4), F64)
  y = jnp.ones((2, 3), F64)
  head = lambda p, h: knn.dense(h, p["head"]["kernel"])

  def remat(p, x):
    return jax.checkpoint(head)(p, x)

  def scanned(p, x):
    step = lambda h, _: (jnp.tanh(head(p, h) @ jnp.ones((3, 4))), None)
    return head(p, jax.lax.scan(step, x, None, length=2)[0])

  def stacked(p, x):
    for i in range(3):
      x = knn.dense(x, p["stack"]["kernel"][i])
    return head(p, x)

  sq = losses.squared_error
  for apply in (remat, scanned):
    with pytest.raises(ValueError, match=r"(\('head',\)|kronjax.nn.dense "
                       r"layer \(kernel of shape \(4, 3\)\)).*" + NESTED):
      knn.value_grad_and_tape(apply, sq, fisher="exact")(params, x, y)
  # Layers with no path are skipped when layers= names the ones to tap.
  tape = knn.value_grad_and_tape(stacked, sq, fisher="exact",
                                 layers=[("head",)])(params, x, y)[2]
  assert set(tape) == {("head",)}
  with pytest.raises(ValueError, match="not an array of the params.*slice"):
    knn.value_grad_and_tape(stacked, sq, fisher="exact")(params, x, y)
