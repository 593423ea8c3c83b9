"""Layer structure from the tape: dense-general splits, tied embeddings, routing.

Brute force is the reference: for one example and ``fisher="exact"`` a block
equals ``Jᵀ H J``, the exact Fisher block of the layer's ``W̄`` (kernel rows,
then bias), from ``jax.jacobian`` and ``jax.hessian``.
"""

import pathlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kronjax
from kronjax import losses

F64 = jnp.float64


def _brute_fisher(outputs, w0, loss, y):
  """``Jᵀ H J`` of ``outputs(w)`` (flat ``w``) at ``w0``."""
  out = outputs(w0)
  jac = jax.jacobian(outputs)(w0).reshape(out.size, -1)
  hess = jax.hessian(lambda o: loss(o, y))(out).reshape(out.size, out.size)
  return jac.T @ hess @ jac


def _dense(block):
  a, g = block.factors
  return jnp.kron(jnp.diag(a) if a.ndim == 1 else a, g)


class General(nn.Module):
  """A bias-free DenseGeneral between two plain layers."""

  axis: int | tuple[int, ...]
  features: int | tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral(self.features, axis=self.axis, use_bias=False,
                        param_dtype=F64, name="general")(x)
    return nn.Dense(3, param_dtype=F64, name="head")(
        jnp.tanh(h).reshape(h.shape[0], -1))


# input rank 1 and 2, feature rank 1 and 2
SPLITS = [(-1, 6), (-1, (2, 3)), ((-2, -1), 6), ((-2, -1), (2, 3))]


@pytest.mark.parametrize("axis,features", SPLITS)
def test_a_bias_free_dense_general_block_is_the_exact_fisher(axis, features):
  model = General(axis, features)  # one position: K-FAC is exact there
  x = jax.random.normal(jax.random.key(0), (1, 4) if axis == -1 else (1, 2, 4),
                        F64)
  y = jax.random.normal(jax.random.key(1), (1, 3), F64)
  params = model.init(jax.random.key(2), x)["params"]
  loss = losses.squared_error
  step = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
  spec = step.layers(params, x)["general"]
  kernel = params["general"]["kernel"]
  d_in = int(np.prod(jnp.shape(x)[-len(np.atleast_1d(axis)):]))
  assert spec.factor_sizes == (d_in, kernel.size // d_in)
  block = kronjax.fisher_blocks(step(params, x, y)[2])[("general",)]

  def outputs(w):
    p = {**params, "general": {"kernel": w.reshape(kernel.shape)}}
    return model.apply({"params": p}, x)

  want = _brute_fisher(outputs, kernel.reshape(-1), loss, y)
  np.testing.assert_allclose(_dense(block), want, atol=1e-12)


class NnxGeneral(nnx.Module):

  def __init__(self, in_features, out_features, rngs):
    self.general = nnx.LinearGeneral(in_features, out_features,
                                     axis=tuple(range(-len(in_features), 0)),
                                     use_bias=False, param_dtype=F64,
                                     rngs=rngs)
    self.head = nnx.Linear(int(np.prod(out_features)), 3, param_dtype=F64,
                           rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.general(x))
    return self.head(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("in_features,out_features",
                         [((4,), (2, 3)), ((2, 4), (6,)), ((2, 4), (2, 3))])
def test_a_bias_free_nnx_linear_general_block_is_the_exact_fisher(
    in_features, out_features):
  model = NnxGeneral(in_features, out_features, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1,) + in_features, F64)
  y = jax.random.normal(jax.random.key(1), (1, 3), F64)
  loss = losses.squared_error
  step = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
  assert step.layers(model, x)["general"].factor_sizes == (
      int(np.prod(in_features)), int(np.prod(out_features)))
  block = kronjax.fisher_blocks(step(model, x, y)[2])[("general",)]
  kernel = model.general.kernel[...]
  head_k, head_b = model.head.kernel[...], model.head.bias[...]

  def outputs(w):  # the model written out with jnp
    h = jnp.tensordot(x, w.reshape(kernel.shape), axes=len(in_features))
    return jnp.tanh(h).reshape(1, -1) @ head_k + head_b

  want = _brute_fisher(outputs, kernel.reshape(-1), loss, y)
  np.testing.assert_allclose(_dense(block), want, atol=1e-12)


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, use_bias=False)(x, x)
    return nn.Dense(3)(h.mean(1))


def test_bias_free_attention_trains_with_the_tapes_layers():
  model, loss = Attention(), losses.softmax_cross_entropy
  x = jax.random.normal(jax.random.key(0), (16, 5, 8), jnp.float32)
  y = jnp.arange(16) % 3
  params = model.init(jax.random.key(1), x)["params"]
  step = kronjax.flax.value_grad_and_tape(model, loss)
  layers = step.layers(params, x)
  query = layers["MultiHeadDotProductAttention_0/query"]
  assert query.factor_sizes == (8, 8) and query.out_axes == 2
  assert layers["MultiHeadDotProductAttention_0/out"].factor_sizes == (8, 8)
  _, grads, tape = step(params, x, y, jax.random.key(2))
  # Without the tape's layers the split is a guess, and a wrong one is loud.
  tx = kronjax.kfac(loss=loss)
  with pytest.raises(ValueError, match=r"(query|key|value).*layers=tape_fn.layers"):
    tx.update(grads, tx.init(params), params, curvature=tape, targets=y,
              output_fn=lambda p: model.apply({"params": p}, x))
  tx = kronjax.kfac(loss=loss, layers=layers)

  @jax.jit
  def train(params, state, rng):
    value, grads, tape = step(params, x, y, rng)
    updates, state = tx.update(
        grads, state, params, curvature=tape, targets=y,
        output_fn=lambda p: model.apply({"params": p}, x))
    return optax.apply_updates(params, updates), state, value

  state, first = tx.init(params), None
  for i in range(10):
    params, state, value = train(params, state, jax.random.key(i))
    first = value if first is None else first
  assert value < 0.8 * first


class Tied(nn.Module):
  lookup: bool = True

  @nn.compact
  def __call__(self, x):
    embed = nn.Embed(5, 3, param_dtype=F64)
    h = embed(x) if self.lookup else jnp.broadcast_to(
        x[..., None].astype(F64), x.shape + (3,))
    return embed.attend(jnp.tanh(nn.Dense(3, param_dtype=F64)(h)))


@pytest.mark.parametrize("lookup", [True, False])
def test_a_tied_embedding_gets_the_nearest_kronecker_product_of_both_uses(
    lookup):
  model, loss = Tied(lookup), losses.softmax_cross_entropy
  ids, y = jnp.array([[2]]), jnp.array([[1]])  # one example, one position
  params = model.init(jax.random.key(0), ids)["params"]
  step = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
  assert step.layers(params, ids)["Embed_0"].kind == "tied"
  block = kronjax.fisher_blocks(step(params, ids, y)[2])[("Embed_0",)]
  table = params["Embed_0"]["embedding"]

  def outputs(w, use):  # the shared matrix as two copies: one per use
    w = w.reshape(table.shape)
    tables = (w, table) if use == 0 else (table, w)
    emb = tables[0][ids] if lookup else jnp.broadcast_to(
        ids[..., None].astype(F64), ids.shape + (3,))
    dense = params["Dense_0"]
    h = jnp.tanh(emb @ dense["kernel"] + dense["bias"])
    return h @ tables[1].T

  per_use = [_brute_fisher(lambda w: outputs(w, u), table.reshape(-1), loss,
                           y) for u in (0, 1)]
  want = kronjax.linalg.nearest_kronecker_product(
      sum(per_use), (5, 5), (3, 3))[0].to_dense()
  np.testing.assert_allclose(_dense(block), want, atol=1e-12)
  # Each use alone is K-FAC's exact block (one example, one position).
  if not lookup:
    np.testing.assert_allclose(want, per_use[1], atol=1e-12)


class NnxTied(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(5, 3, param_dtype=F64, rngs=rngs)
    self.hidden = nnx.Linear(3, 3, param_dtype=F64, rngs=rngs)

  def __call__(self, ids):
    return self.embed.attend(jnp.tanh(self.hidden(self.embed(ids))))


def test_an_nnx_tied_embedding_matches_linen():
  model, loss = NnxTied(nnx.Rngs(0)), losses.softmax_cross_entropy
  ids, y = jnp.array([[2, 4]]), jnp.array([[1, 3]])
  step = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
  assert step.layers(model, ids)["embed"].kind == "tied"
  got = kronjax.fisher_blocks(step(model, ids, y)[2])[("embed",)]
  linen = Tied()
  params = {"Embed_0": {"embedding": model.embed.embedding[...]},
            "Dense_0": {"kernel": model.hidden.kernel[...],
                        "bias": model.hidden.bias[...]}}
  lstep = kronjax.flax.value_grad_and_tape(linen, loss, fisher="exact")
  want = kronjax.fisher_blocks(lstep(params, ids, y)[2])[("Embed_0",)]
  np.testing.assert_allclose(_dense(got), _dense(want), atol=1e-12)


def test_a_tied_lm_trains_with_kfac():
  model, loss = Tied(), losses.softmax_cross_entropy
  ids = jax.random.randint(jax.random.key(0), (8, 6), 0, 5)
  y = jnp.roll(ids, 1, axis=1)
  params = jax.tree.map(lambda p: p.astype(jnp.float32),
                        model.init(jax.random.key(1), ids)["params"])
  step = kronjax.flax.value_grad_and_tape(model, loss)
  tx = kronjax.kfac(loss=loss, layers=step.layers(params, ids))
  state = tx.init(params)
  assert state.inner_state.inner_states["kfac"].inner_state[0].factors[
      "Embed_0"].a.ema.shape == (5, 5)

  @jax.jit  # as users run it (eager, the eight updates took 30 s)
  def train_step(params, state, key):
    value, grads, tape = step(params, ids, y, key)
    updates, state = tx.update(
        grads, state, params, curvature=tape, targets=y,
        output_fn=lambda p: model.apply({"params": p}, ids))
    return optax.apply_updates(params, updates), state, value

  values = []
  for i in range(8):
    params, state, value = train_step(params, state, jax.random.key(i))
    values.append(value)
  assert values[-1] < values[0]


class PartlyTapped(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4, name="tapped")(x))
    h = jnp.tanh(nn.Dense(4, name="left_out")(h))
    return nn.LayerNorm()(nn.Dense(3, name="head")(h))


def test_a_left_out_layer_gets_the_fallback_update_alone():
  model, loss = PartlyTapped(), losses.squared_error
  x = jax.random.normal(jax.random.key(0), (8, 5), jnp.float32)
  y = jax.random.normal(jax.random.key(1), (8, 3), jnp.float32)
  params = model.init(jax.random.key(2), x)["params"]
  step = kronjax.flax.value_grad_and_tape(model, loss,
                                          layers=["tapped", "head"])
  _, grads, tape = step(params, x, y, jax.random.key(3))
  fallback = optax.adam(1e-2)
  # Guessed layers: the left-out kernel would get K-FAC's learning rate.
  tx = kronjax.kfac(0.5, fallback=fallback)
  with pytest.raises(ValueError, match=r"no block for layers \['left_out'\]"):
    tx.update(grads, tx.init(params), params, curvature=tape)
  tx = kronjax.kfac(0.5, fallback=fallback, layers=step.layers(params, x))
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p,
                                              curvature=tape))(grads, params)
  alone, _ = jax.jit(lambda g, p: fallback.update(g, fallback.init(p), p))(
      grads, params)
  for name in ("left_out", "LayerNorm_0"):  # (XLA may fuse them differently)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 updates[name], alone[name])
  assert not np.allclose(updates["tapped"]["kernel"],
                         alone["tapped"]["kernel"])


class WithEinsum(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Einsum((5, 4), "nd,df->nf", use_bias=False)(x)
    return nn.Dense(3)(jnp.tanh(h))


def test_untapped_kernels_and_untapped_models_warn():
  x = jnp.ones((2, 5), jnp.float32)
  y = jnp.ones((2, 3), jnp.float32)
  loss = losses.squared_error
  model = WithEinsum()
  params = model.init(jax.random.key(0), x)["params"]
  step = kronjax.flax.value_grad_and_tape(model, loss, fisher="exact")
  with pytest.warns(UserWarning, match=r"\[\('Einsum_0',\)\].*not tapped"):
    step(params, x, y)
  assert set(step.layers(params, x)) == {"Dense_0"}
  with warnings.catch_warnings():  # layers= chooses: no warning then
    warnings.simplefilter("error")
    kronjax.flax.value_grad_and_tape(model, loss, fisher="exact",
                                     layers=["Dense_0"])(params, x, y)
  plain = lambda p, x: jnp.tanh(x @ p["w"])[:, :3]
  step = kronjax.nn.value_grad_and_tape(plain, loss, fisher="exact")
  with pytest.warns(UserWarning, match="tapped no layer"):
    _, grads, tape = step({"w": jnp.ones((5, 4))}, x, y)
  tx = kronjax.scale_by_kfac()
  with pytest.raises(ValueError, match="curvature is empty"):
    tx.update(grads, tx.init(grads), curvature=tape)


def test_scale_by_kfac_warns_about_layers_without_blocks():
  params = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((3, 2))}}
  tx = kronjax.scale_by_kfac()
  blocks = {("a",): kronjax.linalg.Kron(jnp.eye(2), jnp.eye(3))}
  with pytest.warns(UserWarning, match=r"no block for layers \['b'\]"):
    updates, _ = tx.update(params, tx.init(params), curvature=blocks)
  np.testing.assert_array_equal(updates["b"]["kernel"], params["b"]["kernel"])


def test_layers_from_another_model_are_refused_at_init():
  model = General(-1, 6)
  x = jnp.ones((1, 2, 4), F64)
  params = model.init(jax.random.key(0), x)["params"]
  layers = kronjax.flax.value_grad_and_tape(
      model, losses.squared_error).layers(params, x)
  other = General(-1, 5).init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"layer general with kernel \(4, 6\)"):
    kronjax.kfac(0.1, layers=layers).init(other)
  with pytest.raises(TypeError, match="tape_fn.layers"):
    kronjax.kfac(0.1, layers=["general"])


def test_the_adaptive_kfac_inside_optax_partition_is_refused_with_advice():
  model, loss = PartlyTapped(), losses.squared_error
  x = jnp.ones((4, 5), jnp.float32)
  y = jnp.ones((4, 3), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  step = kronjax.flax.value_grad_and_tape(model, loss)
  layers = step.layers(params, x)
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "fallback" if "LayerNorm" in str(path) else "kfac",
      params)
  tx = optax.partition(
      {"kfac": kronjax.kfac(loss=loss, layers=layers),
       "fallback": optax.adam(1e-3)}, labels)
  _, grads, tape = step(params, x, y, jax.random.key(1))
  with pytest.raises(ValueError, match=r"kronjax.kfac\(loss=..., fallback="):
    tx.update(grads, tx.init(params), params, curvature=tape, targets=y,
              output_fn=lambda p: model.apply({"params": p}, x))


def test_the_readme_transformer_trains():
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  section = readme[readme.index("## Transformers"):]
  blocks = section.split("```python\n")[1:3]
  code = "\n".join(b[:b.index("```")] for b in blocks)
  assert len(blocks[1][:blocks[1].index("```")].strip().splitlines()) <= 20
  scope = {}
  exec(compile(code.replace("range(20)", "range(12)"), "README.md", "exec"),
       scope)
  first = scope["model"].apply({"params": scope["model"].init(
      jax.random.key(0), scope["x"])["params"]}, scope["x"])
  start = float(losses.softmax_cross_entropy(first, scope["y"]))
  assert float(scope["value"]) < start - 0.5, (start, scope["value"])


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 16, use_bias=False, decode=False,
                                       rngs=rngs)
    self.mlp = nnx.Linear(16, 16, use_bias=False, rngs=rngs)

  def __call__(self, h):
    mask = nnx.make_causal_mask(h[..., 0])
    h = h + self.attn(self.norm(h), mask=mask)
    return h + self.mlp(jax.nn.gelu(h))


class NnxGPT(nnx.Module):
  """The NNX scan-over-layers pattern: blocks made by nnx.vmap, run by
  nnx.scan; bias-free attention; a head tied to the embedding."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 16, rngs=rngs)

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return NnxBlock(rngs)

    self.blocks = create(rngs)

  def __call__(self, ids):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return block(h)

    return self.embed.attend(body(self.embed(ids), self.blocks))


def test_an_nnx_transformer_trains_with_adaptive_kfac():
  model, loss = NnxGPT(nnx.Rngs(0)), losses.softmax_cross_entropy
  ids = jax.random.randint(jax.random.key(0), (8, 7), 0, 11)
  x, y = ids[:, :-1], ids[:, 1:]
  step = kronjax.flax.value_grad_and_tape(model, loss)
  layers = step.layers(model, x)
  assert layers["embed"].kind == "tied"
  query = layers["blocks/attn/query"]
  assert (query.stack, query.factor_sizes) == (1, (16, 16))
  optimizer = nnx.Optimizer(model, kronjax.kfac(loss=loss, layers=layers),
                            wrt=nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  @nnx.jit
  def train_step(model, optimizer, rng):
    value, grads, tape = step(model, x, y, rng)
    optimizer.update(model, grads, curvature=tape, targets=y,
                     output_fn=lambda p: nnx.merge(graphdef, p, rest)(x))
    return value

  values = [float(train_step(model, optimizer, jax.random.key(i)))
            for i in range(10)]
  assert values[-1] < values[0] - 0.5, values
