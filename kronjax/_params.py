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
import warnings
from typing import Any, Callable, Iterable, Literal, NamedTuple

import jax
import jax.numpy as jnp

Path = tuple[Any, ...]
ATTEND = "@attend"  # in a tape path: the head use (attend) of an embedding
LayerKind = Literal["dense", "embed", "tied"]

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
  """A layer: where its parameters live and how they form ``W̄`` (static).

  The tape functions know every layer's structure (``fn.layers(...)``);
  :func:`find_layers` guesses it from the params alone, which is ambiguous for
  bias-free kernels of rank > 2 and for stacked layers.

  Attributes:
    path: the layer's path, e.g. ``("Encoder_0", "Dense_1")``.
    kind: ``"dense"`` (dense, dense-general, convolution), ``"embed"`` (an
      embedding lookup) or ``"tied"`` (an embedding whose matrix is also
      used as a dense layer, ``embed.attend``: its input factor is dense).
    kernel: shape of the ``kernel`` (``(*stack, *in_dims, *out_dims)``) or
      of the ``embedding`` (``(vocab, d)``).
    bias: shape of the ``bias`` (``(*stack, *out_dims)``), or ``None``.
    out_axes: how many trailing kernel axes are outputs.
    stack: how many leading axes index a stack of layers (``nn.scan``): one
      Kronecker block per layer of the stack.
  """

  path: Path
  kind: LayerKind
  kernel: tuple[int, ...]
  bias: tuple[int, ...] | None
  out_axes: int = 1
  stack: int = 0

  @property
  def names(self) -> tuple[str, ...]:
    """The parameter names the layer owns."""
    return ("kernel", "bias") if self.kind == "dense" else ("embedding",)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return self.kernel[:self.stack]

  @property
  def d_out(self) -> int:
    return math.prod(self.kernel[len(self.kernel) - self.out_axes:])

  @property
  def factor_sizes(self) -> tuple[int, int]:
    """``(d_A, d_G)``: rows of ``W̄`` (inputs, plus one for a bias), columns."""
    rows = math.prod(self.kernel[self.stack:]) // self.d_out
    return rows + (self.bias is not None), self.d_out

  def to_matrix(self, leaves: dict[str, jax.Array], dtype: Any) -> jax.Array:
    """``W̄``, ``(*stack, d_A, d_G)``, from the layer's leaves (bias last)."""
    if self.kind != "dense":
      return leaves["embedding"].astype(dtype)
    lead = self.stack_shape
    rows = [leaves["kernel"].reshape(lead + (-1, self.d_out))]
    if self.bias is not None:
      rows.append(leaves["bias"].reshape(lead + (1, self.d_out)))
    return jnp.concatenate([r.astype(dtype) for r in rows], axis=-2)

  def from_matrix(self, matrix: jax.Array,
                  like: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Splits a ``W̄``-shaped matrix into leaves shaped and typed ``like``."""
    if self.kind != "dense":
      return {"embedding": matrix.astype(like["embedding"].dtype)}
    kernel = like["kernel"]
    rows = matrix.shape[-2] - (self.bias is not None)
    out = {"kernel": matrix[..., :rows, :].reshape(kernel.shape).astype(
        kernel.dtype)}
    if self.bias is not None:
      out["bias"] = matrix[..., -1, :].reshape(like["bias"].shape).astype(
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
          None if bias is None else tuple(bias.shape),
          1 if bias is None else max(len(bias.shape), 1))
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


def param_labels(params: Any, layers: dict[str, LayerSpec] | None = None
                 ) -> Any:
  """``"kfac"`` for the parameters of ``layers`` (default: every layer
  :func:`find_layers` guesses), ``"fallback"`` for the rest."""
  flat, treedef = tree_paths(params)
  layers = find_layers(params) if layers is None else layers
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


# Which layers the optimizer has: as the tape sees them (layers=), or guessed.

CURVATURE_HINT = (
    "pass curvature=kronjax.fisher_blocks(tape) (or the tape itself) to "
    "tx.update(grads, opt_state, params, curvature=...)")

LAYERS_HINT = (
    "Pass the layers as the tape function sees them: "
    "kfac(..., layers=tape_fn.layers(params, x)) (or scale_by_kfac / "
    "scale_by_adaptive_kfac), with tape_fn from "
    "kronjax.flax.value_grad_and_tape or kronjax.nn.value_grad_and_tape")


def float_dtype(tree: Any) -> jnp.dtype:
  """The float dtype of ``tree``'s float leaves, at least float32."""
  return jnp.result_type(jnp.float32, *[
      x.dtype for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.floating)])


def compute_dtype(dtype: Any) -> jnp.dtype:
  """The dtype of the maths on factors stored in ``dtype``: at least float32
  (LAPACK has no half-precision decompositions)."""
  return jnp.promote_types(dtype, jnp.float32)


def optimizer_layers(tree: Any, settings: Any) -> dict[str, LayerSpec]:
  """The layers: those given (``layers=``), or guessed from ``tree``."""
  return find_layers(tree) if settings.layers is None else settings.layers


def given_layers(layers: Any) -> dict[str, LayerSpec] | None:
  """Checks and normalises ``layers=`` (``{path or key: LayerSpec}``)."""
  if layers is None:
    return None
  if not isinstance(layers, dict) or not all(
      isinstance(v, LayerSpec) for v in layers.values()):
    raise TypeError(f"layers= takes the dict of LayerSpecs that "
                    f"tape_fn.layers(params, x) returns; got {layers!r}.")
  return {layer_key(k): v for k, v in layers.items()}


def check_given(params: Any, layers: dict[str, LayerSpec]) -> None:
  """Raises if ``layers=`` does not describe the arrays of ``params``."""
  found = {}
  for path, leaf in tree_paths(params)[0]:
    found[path] = tuple(getattr(leaf, "shape", ()))
  for key, spec in layers.items():
    for name, want in zip(spec.names, (spec.kernel, spec.bias)):
      have = found.get(tuple(spec.path) + (name,))
      if want is not None and have != want:
        raise ValueError(
            f"layers= describes layer {key} with {name} {want}, but params "
            f"have {'none' if have is None else have} there: the layers "
            "come from another model or params.")


def layer_specs(metas: dict[Any, Any], params) -> dict[str, Any]:
  """``{layer_key: LayerSpec}`` of the tapped layers: what the optimizer needs.

  The tape knows each layer's input/output split (a bias-free dense-general
  kernel does not tell it) and how many leading axes stack layers.
  """
  leaves = {path: leaf for path, leaf in tree_paths(params)[0]}
  specs = {}
  for path, m in metas.items():
    if path and path[-1] == ATTEND:  # an embedding used as a head
      embedding = leaves[tuple(path[:-1]) + ("embedding",)]
      specs[layer_key(path[:-1])] = LayerSpec(
          tuple(path[:-1]), "tied", tuple(embedding.shape), None)
      continue
    if layer_key(path) in specs:  # tied already
      continue
    name = "embedding" if m.kind == "embed" else "kernel"
    kernel = leaves.get(tuple(path) + (name,))
    if kernel is None:
      raise ValueError(f"Layer {path} has no {name!r} at {tuple(path)} in the "
                       "params given.")
    bias = leaves.get(tuple(path) + ("bias",)) if m.has_bias else None
    stack = len(kernel.shape) - (2 if m.kind == "embed" else m.kernel_ndim)
    specs[layer_key(path)] = LayerSpec(
        tuple(path), m.kind, tuple(kernel.shape),
        None if bias is None else tuple(bias.shape), m.out_axes, stack)
  return specs


def warn_untapped(metas: dict[Any, Any], params,
                  adapter: str) -> None:
  """Warns (once per trace) about kernels that no tapped layer owns."""
  tapped = {layer_key(p[:-1] if p and p[-1] == ATTEND else p) for p in metas}
  untapped = [spec.path for key, spec in find_layers(params).items()
              if key not in tapped]
  if not metas:
    warnings.warn(
        f"{adapter} tapped no layer of this model, so K-FAC has no "
        "curvature for it and kronjax.kfac would train it entirely with its "
        "fallback optimizer.", stacklevel=4)
  elif untapped:
    warnings.warn(
        f"{adapter}: the layers {untapped} hold a kernel or embedding but "
        "were not tapped (a module kronjax cannot tap, such as nn.Einsum, "
        "nn.ConvTranspose or one that calls self.param itself). Build the "
        "optimizer with layers=tape_fn.layers(params, x) so that they go to "
        "the fallback optimizer, or pass layers=[...] to the tape function "
        "to choose the tapped layers yourself.", stacklevel=4)


def check_covered(updates, layers: dict[str, LayerSpec], covered,
                  settings: Any) -> None:
  """Raises (``settings.routed``: in :func:`kfac`) or warns about layers
  with parameters in ``updates`` but no block in ``covered``."""
  present = {owner(path, layers) for path, _ in tree_paths(updates)[0]}
  missing = sorted(present - set(covered) - {None})
  if not missing:
    return
  if settings.routed:
    raise ValueError(
        f"curvature has no block for layers {missing}, which kfac routes to "
        "K-FAC: its learning rate would move them as plain gradient steps. "
        + ("They were guessed from the params (every 'kernel' of rank >= 2 "
           "and 'embedding'); a layer the tape function does not tap belongs "
           "to the fallback optimizer. " + LAYERS_HINT
           if settings.layers is None else
           "layers= names them: pass curvature for every layer it names")
        + ".")
  warnings.warn(
      f"K-FAC: curvature has no block for layers {missing}; their "
      "gradients pass through unpreconditioned.", stacklevel=2)
