"""Where parameters live in a tree, and which layer owns each.

Linen params are nested dicts, NNX params are ``nnx.State`` (whose leaves are
``nnx.Variable`` nodes around one array), pure-JAX params are any pytree
(lists, tuples, equinox-style modules). All of them name a parameter by the
tuple of keys leading to it: dict keys and attribute names as they are, list
and tuple positions as ints, e.g. ``("layers", 0, "kernel")``; an NNX
Variable's own ``value`` attribute is not part of the path. A layer's path is
its kernel's path without the last key.

The optimizer state keys each layer by :func:`layer_key`, a string (msgpack
and orbax take only string keys) that tells ``("layers", 0)`` from
``("layers", "0")``. The same ownership rule (:func:`owner`) routes
parameters in the optimizer and answers :func:`uncovered_parameters`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Literal, NamedTuple

import jax
import jax.numpy as jnp

Path = tuple[Any, ...]
LayerKind = Literal["dense", "embed"]

__all__ = ["LayerSpec", "find_layers", "layer_key", "layer_leaves",
           "map_layers", "owner", "param_labels", "tree_paths",
           "uncovered_parameters"]


def key_name(key: Any) -> Any:
  """The name of one pytree key: a dict key, attribute name or list index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _is_variable(x: Any) -> bool:
  # An NNX Variable, duck-typed so that the core does not import Flax.
  return hasattr(type(x), "get_value") and hasattr(type(x), "set_value")


def tree_paths(tree: Any) -> tuple[list[tuple[Path, Any]], Any]:
  """``[(path, array)]`` for every leaf of ``tree`` in order, and its treedef.

  The leaves and treedef are ``jax.tree_util.tree_flatten``'s: NNX Variables
  are flattened to their arrays, but a path stops at the Variable's name.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  paths = []
  for key_path, node in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_variable)[0]:
    count = len(jax.tree_util.tree_leaves(node)) if _is_variable(node) else 1
    paths += [tuple(key_name(k) for k in key_path)] * count
  return list(zip(paths, leaves)), treedef


_INT = re.compile(r"-?\d+")


def _key_part(part: Any) -> str:
  if isinstance(part, int) and not isinstance(part, bool):
    return str(part)
  if (isinstance(part, str) and part and "/" not in part
      and part[0] not in "'\"" and not _INT.fullmatch(part)):
    return part
  return repr(part)  # quoted: "0" and 0, "a/b" and ("a", "b") stay apart


def layer_key(path: Path | str) -> str:
  """A layer's state key: its path's names joined by ``/``.

  Ints stay as written and names as they are, so ``("Encoder_0", "Dense_1")``
  is ``"Encoder_0/Dense_1"`` and ``("layers", 0)`` is ``"layers/0"``; a name
  that could be read otherwise (``"0"``, ``"a/b"``) is quoted. A string is
  taken to be a key already.
  """
  if isinstance(path, str):
    return path
  return "/".join(_key_part(p) for p in path)


class LayerSpec(NamedTuple):
  """A layer found in a params tree (static: shapes only).

  Attributes:
    path: the layer's path, e.g. ``("Encoder_0", "Dense_1")``.
    kind: ``"dense"`` (dense, dense-general, convolution) or ``"embed"``.
    kernel: shape of the ``kernel`` (``(*in_dims, *out_dims)``) or of the
      ``embedding`` (``(vocab, d)``).
    bias: shape of the ``bias`` (``out_dims``), or ``None``.
  """

  path: Path
  kind: LayerKind
  kernel: tuple[int, ...]
  bias: tuple[int, ...] | None

  @property
  def names(self) -> tuple[str, ...]:
    """The parameter names the layer owns."""
    return ("embedding",) if self.kind == "embed" else ("kernel", "bias")

  @property
  def d_out(self) -> int:
    if self.kind == "embed" or self.bias is None:
      return self.kernel[-1]
    return math.prod(self.bias)

  @property
  def factor_sizes(self) -> tuple[int, int]:
    """``(d_A, d_G)``: rows of ``W̄`` (inputs, plus one for a bias), columns."""
    rows = math.prod(self.kernel) // self.d_out
    return rows + (self.bias is not None), self.d_out

  def to_matrix(self, leaves: dict[str, jax.Array], dtype: Any) -> jax.Array:
    """``W̄``, ``(d_A, d_G)``, from the layer's leaves (bias row last)."""
    if self.kind == "embed":
      return leaves["embedding"].astype(dtype)
    rows = [leaves["kernel"].reshape(-1, self.d_out)]
    if self.bias is not None:
      rows.append(leaves["bias"].reshape(1, self.d_out))
    return jnp.concatenate([r.astype(dtype) for r in rows], axis=0)

  def from_matrix(self, matrix: jax.Array,
                  like: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Splits a ``W̄``-shaped matrix into leaves shaped and typed ``like``."""
    if self.kind == "embed":
      return {"embedding": matrix.astype(like["embedding"].dtype)}
    kernel = like["kernel"]
    rows = matrix.shape[0] - (self.bias is not None)
    out = {"kernel": matrix[:rows].reshape(kernel.shape).astype(kernel.dtype)}
    if self.bias is not None:
      out["bias"] = matrix[-1].reshape(like["bias"].shape).astype(
          like["bias"].dtype)
    return out


def find_layers(tree: Any) -> dict[str, LayerSpec]:
  """The layers of a params (or updates) tree, keyed by :func:`layer_key`.

  A node holding a ``kernel`` of rank >= 2 is dense-like (its sibling
  ``bias``, if any, belongs to it); a node holding a 2-D ``embedding`` is an
  embedding.
  """
  leaves = dict(tree_paths(tree)[0])
  layers = {}
  for path, leaf in leaves.items():
    if not path or not hasattr(leaf, "shape"):
      continue
    parent, name = path[:-1], path[-1]
    if name == "kernel" and len(leaf.shape) >= 2:
      bias = leaves.get(parent + ("bias",))
      layers[layer_key(parent)] = LayerSpec(
          parent, "dense", tuple(leaf.shape),
          None if bias is None else tuple(bias.shape))
    elif name == "embedding" and len(leaf.shape) == 2:
      layers[layer_key(parent)] = LayerSpec(parent, "embed", tuple(leaf.shape),
                                            None)
  return layers


def owner(path: Path, layers: dict[str, LayerSpec]) -> str | None:
  """The key of the layer in ``layers`` that owns the parameter at ``path``."""
  if not path:
    return None
  key = layer_key(path[:-1])
  spec = layers.get(key)
  return key if spec is not None and path[-1] in spec.names else None


def map_layers(fn: Callable[[str, dict[str, Any]], dict[str, Any]], tree: Any,
               layers: dict[str, LayerSpec]) -> Any:
  """Replaces each layer's leaves by ``fn(key, {name: leaf})``; others stay."""
  flat, treedef = tree_paths(tree)
  index: dict[str, dict[str, int]] = {}
  for i, (path, _) in enumerate(flat):
    key = owner(path, layers)
    if key is not None:
      index.setdefault(key, {})[path[-1]] = i
  leaves = [leaf for _, leaf in flat]
  for key, names in index.items():
    new = fn(key, {n: leaves[i] for n, i in names.items()})
    for n, i in names.items():
      leaves[i] = new[n]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def layer_leaves(tree: Any, layers: dict[str, LayerSpec]) -> list[Any]:
  """The leaves of ``tree`` that the layers in ``layers`` own, in tree order."""
  return [leaf for path, leaf in tree_paths(tree)[0]
          if owner(path, layers) is not None]


def param_labels(params: Any) -> Any:
  """``"kfac"`` for the parameters of layers, ``"fallback"`` for the rest."""
  flat, treedef = tree_paths(params)
  layers = find_layers(params)
  return jax.tree_util.tree_unflatten(treedef, [
      "fallback" if owner(path, layers) is None else "kfac"
      for path, _ in flat])


def uncovered_parameters(params: Any,
                         layers: Iterable[Path | str]) -> list[Path]:
  """Lists the parameters that no tapped layer covers.

  K-FAC preconditions only the layers it has blocks for; the rest
  (normalisation scales, untapped layers, ...) need another treatment, e.g. a
  first-order optimizer through ``optax.partition``.

  Args:
    params: the parameter tree: nested dicts (linen), an ``nnx.State`` or any
      pytree.
    layers: the tapped layers: a tape, a dict of blocks, or any iterable of
      paths (tuples, or ``"/"``-joined strings such as ``"Encoder_0/Dense_1"``).

  Returns:
    The paths (tuples of keys; list indices as ints) of the parameter arrays
    that no layer in ``layers`` owns, in tree order.
  """
  if isinstance(layers, str):
    raise TypeError(f"layers={layers!r} must be a collection of layer paths, "
                    f"e.g. [{layers!r}].")
  given = {layer_key(p) for p in layers}
  covered = {k: s for k, s in find_layers(params).items() if k in given}
  return [path for path, _ in tree_paths(params)[0]
          if owner(path, covered) is None]
