"""Parameter paths: one spelling of "where a parameter lives" for every model.

Linen params are nested dicts, NNX params are ``nnx.State`` (whose leaves are
``nnx.Variable`` objects that flatten to their ``value``), pure-JAX params are
any pytree (lists, tuples, equinox-style modules). All of them name a parameter
by the tuple of keys leading to it: dict keys and attribute names as they are,
list and tuple positions as ints, e.g. ``("layers", 0, "kernel")``. A layer's
path is its kernel's path without the last key.
"""

from __future__ import annotations

from typing import Any

import jax

Path = tuple[Any, ...]


def key_name(key: Any) -> Any:
  """The name of one pytree key: a dict key, attribute name or list index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _is_variable(x: Any) -> bool:
  # An NNX Variable (a pytree node around one array): its path should end at
  # the variable's name, not at its ``value`` attribute. Duck-typed so that the
  # core does not import Flax.
  return hasattr(type(x), "get_value") and hasattr(type(x), "set_value")


def tree_paths(tree: Any) -> list[tuple[Path, Any]]:
  """``(path, leaf)`` for every parameter array of ``tree``, in tree order.

  NNX Variables count as leaves; use :func:`leaf_value` to get their arrays.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]
  return [(tuple(key_name(k) for k in kp), leaf) for kp, leaf in flat]


def leaf_value(leaf: Any) -> Any:
  """The array of a leaf from :func:`tree_paths` (unwraps NNX Variables)."""
  return leaf.get_value() if _is_variable(leaf) else leaf
