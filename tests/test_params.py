"""Where parameters live and which layer owns each (kronjax._params)."""

import jax.numpy as jnp
import pytest
from flax import nnx

import kronjax
from kronjax._params import find_layers, layer_key, param_labels, tree_paths
from kronjax.linalg import Kron


def _layer(d_in=3, d_out=2):
  return {"kernel": jnp.ones((d_in, d_out)), "bias": jnp.zeros(d_out)}


def test_layer_keys_are_readable_and_tell_every_path_apart():
  assert layer_key(("Encoder_0", "Dense_1")) == "Encoder_0/Dense_1"
  assert layer_key(("layers", 0)) == "layers/0"
  paths = [("layers", 0), ("layers", "0"), ("a/b",), ("a", "b"), ("'a",),
           ("-1",), ("layers", -1), ("",)]
  assert len({layer_key(p) for p in paths}) == len(paths)
  assert layer_key("Encoder_0/Dense_1") == "Encoder_0/Dense_1"  # a key


def test_a_block_for_a_string_named_layer_is_not_a_list_index():
  params = {"layers": [_layer()]}  # layer ("layers", 0)
  tx = kronjax.scale_by_kfac()
  state = tx.init(params)
  blocks = lambda path: {path: Kron(jnp.eye(4), jnp.eye(2))}
  tx.update(params, state, params, curvature=blocks(("layers", 0)))
  tx.update(params, state, params, curvature=blocks("layers/0"))
  with pytest.raises(ValueError, match=r"\('layers', '0'\).*not a layer"):
    tx.update(params, state, params, curvature=blocks(("layers", "0")))


def test_uncovered_parameters_takes_paths_and_their_keys():
  params = {"Dense_0": _layer(), "Dense_1": _layer(2, 2),
            "Norm_0": {"scale": jnp.ones(2)}, "layers": [_layer(2, 2)]}
  want = [("Dense_1", "bias"), ("Dense_1", "kernel"), ("Norm_0", "scale"),
          ("layers", 0, "bias"), ("layers", 0, "kernel")]
  assert kronjax.uncovered_parameters(params, ["Dense_0"]) == want
  assert kronjax.uncovered_parameters(params, [("Dense_0",)]) == want
  assert kronjax.uncovered_parameters(params, {("Dense_0",): None}) == want
  assert kronjax.uncovered_parameters(params, ["layers/0", "Dense_0"]) == (
      want[:3])
  assert kronjax.uncovered_parameters(params, [("layers", "0")]) == (
      [p for p, _ in tree_paths(params)[0]])  # a dict key "0": not this list
  with pytest.raises(TypeError, match=r"\['Dense_0'\]"):
    kronjax.uncovered_parameters(params, "Dense_0")


def test_only_nnx_variables_lose_their_value_key():
  # A layer named "value" in plain dicts keeps its name.
  params = {"value": _layer(), "other": {"value": jnp.ones(3)}}
  assert set(find_layers(params)) == {"value"}
  assert [p for p, _ in tree_paths(params)[0]] == [
      ("other", "value"), ("value", "bias"), ("value", "kernel")]

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.value = nnx.Linear(3, 2, rngs=rngs)

  state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  assert [p for p, _ in tree_paths(state)[0]] == [("value", "bias"),
                                                  ("value", "kernel")]
  assert set(find_layers(state)) == {"value"}
  assert jnp.asarray(tree_paths(state)[0][0][1]).shape == (2,)


def test_param_labels_route_layers_and_the_rest():
  params = {"Dense_0": _layer(), "Embed_0": {"embedding": jnp.ones((5, 2))},
            "Norm_0": {"scale": jnp.ones(2)}, "bias_only": {"bias": jnp.ones(2)}}
  assert param_labels(params) == {
      "Dense_0": {"kernel": "kfac", "bias": "kfac"},
      "Embed_0": {"embedding": "kfac"}, "Norm_0": {"scale": "fallback"},
      "bias_only": {"bias": "fallback"}}
