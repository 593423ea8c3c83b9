"""Distributed refreshes of the factors' eigendecompositions (KAISA placement).

The refresh is K-FAC's one step whose cost grows as ``d³`` per factor, and
plain data parallelism repeats it on every device. Here each factor's refresh
(``A``'s or ``G``'s of a layer) is assigned to one device of a mesh axis
(greedy: the largest factor first, to the least loaded device), computed only
there, and shared by one all-gather of what each device computed:

.. code-block:: text

  shard_map over axis ──► device i: lax.switch(i) refreshes its own factors,
                                    packs them in one flat buffer
                      ──► all_gather over the axis, unpacked by the placement:
                          every device holds every result

Placing factors rather than layers halves the granularity: a layer's two
decompositions may run on two devices (the π-split's inverses read both
factors' traces, which every device has).

No communication layer of our own: ``jax.shard_map``, ``lax.axis_index`` and
``lax.all_gather`` lower to XLA collectives on any backend (CPU, GPU, TPU; one host
or many after ``jax.distributed.initialize()``). The exchange carries only
what a refresh derives (eigenvectors and eigenvalues, or inverses); the
moving averages it reads are the same on every device and stay where they are.

Where the factors do not fit replicated, they can be stored split by rows
over the axis (``scale_by_kfac(shard_factors=True)``, as ZeRO splits Adam's
moments): each matrix zero-padded to a multiple of the axis size
(:func:`pad_layer`) and constrained to ``P(axis, None)`` (:func:`shard_rows`).
A refresh then gathers the moving averages, crops each layer to its own size,
and returns its results by a reduce-scatter (``lax.psum_scatter``) of
zero-padded results instead: each device keeps its rows only. Preconditioning is left to
XLA's partitioner, whose result is gathered (:func:`replicate`).

References:
  Pauloski et al. 2021, KAISA: an adaptive second-order optimizer framework
  for deep neural networks. Osawa et al. 2019, Large-scale distributed
  second-order optimization using Kronecker-factored approximate curvature for
  deep convolutional neural networks. Ba, Grosse & Martens 2017, Distributed
  second-order optimization using Kronecker-factored approximations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kronjax import _precondition

__all__ = ["assign", "axis_size", "crop_layer", "factor_costs",
           "pad_layer", "pad_like", "refresh_distributed", "refresh_eighs",
           "replicate", "shard_rows"]

Factors = Any  # a NamedTuple of _precondition: LayerFactors, EmbeddingFactors...
AxisNames = str | Sequence[str]

# A refresh reads these (identical on every device: factors are replicated)
# and writes the rest; only what it writes crosses the network.
_ACCUMULATORS = ("a", "g", "weight")


def factor_costs(f: Factors) -> dict[str, int]:
  """Relative cost of refreshing each factor of a layer: ``d³`` if dense.

  ``{"a": ..., "g": ...}``. A diagonal factor (an embedding's ``A``) costs
  ``d``: its "decomposition" is elementwise.
  """
  return {side: x.shape[0] ** 3 if x.ndim == 2 else x.shape[0]
          for side, x in (("a", f.a), ("g", f.g))}


def assign(costs: dict[Any, float], n: int) -> dict[Any, int]:
  """Greedy longest-processing-time placement of work items on ``n`` devices.

  Items (here: factors, keyed ``(layer_key, "a" | "g")``) are taken by
  decreasing cost (ties by key, so every host computes the same placement)
  and each goes to the device with the least work so far (ties: the lowest
  index). The busiest device then has at most 4/3 of the optimal load
  (Graham 1969).

  Args:
    costs: ``{item: cost}``.
    n: number of devices.

  Returns:
    ``{item: device index in [0, n)}``.
  """
  if n < 1:
    raise ValueError(f"assign needs n >= 1 devices, got {n}.")
  load = [0.0] * n
  owners = {}
  for key in sorted(costs, key=lambda k: (-costs[k], k)):
    i = min(range(n), key=lambda j: (load[j], j))
    owners[key] = i
    load[i] += costs[key]
  return owners


def axis_size(mesh: Mesh, axis_name: AxisNames) -> int:
  """Number of devices along ``axis_name`` (a name or a tuple of names)."""
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  missing = [a for a in names if a not in mesh.shape]
  if missing:
    raise ValueError(f"The mesh has axes {tuple(mesh.axis_names)}; it has no "
                     f"axis {missing[0]!r} to place refreshes on.")
  return math.prod(mesh.shape[a] for a in names)


def _written(f: Factors, keep: bool = False) -> Factors:
  """``f`` without the accumulators, or (``keep``) with only them.

  ``None`` is an empty pytree; a refresh reads only the accumulators.
  """
  drop = (set(f._fields) - set(_ACCUMULATORS)) if keep else _ACCUMULATORS
  return f._replace(**{name: None for name in drop})


def _resize(f: Factors, size_a: int, size_g: int) -> Factors:
  """Each array field cropped or zero-padded to ``size_a`` or ``size_g``.

  Fields named ``a*`` are sized like ``A``, ``g*`` like ``G``, along every
  axis; a diagonal ``A`` (a vector: an embedding's) is left as it is.
  """
  def resize(name, x):
    if x is None or x.ndim == 0 or (name[0] == "a" and f.a.ndim == 1):
      return x
    size = size_a if name[0] == "a" else size_g
    x = x[tuple(slice(0, size) for _ in x.shape)]
    return jnp.pad(x, [(0, size - d) for d in x.shape])

  return f._replace(**{name: resize(name, getattr(f, name))
                       for name in f._fields})


def crop_layer(f: Factors, d_a: int, d_g: int) -> Factors:
  """A layer's factors at their own size ``(d_A, d_G)``; see :func:`pad_layer`."""
  return _resize(f, d_a, d_g)


def pad_like(f: Factors, like: Factors) -> Factors:
  """``f`` zero-padded to the stored sizes of ``like``'s ``a`` and ``g``."""
  return _resize(f, like.a.shape[0], like.g.shape[0])


def pad_layer(f: Factors, multiple: int) -> Factors:
  """``f`` with its dense factors zero-padded to a multiple of ``multiple``.

  Rows of a matrix split over ``n`` devices must divide evenly, and ``A``
  (inputs plus a bias row) rarely does. Zero rows and columns change nothing
  that is used: a refresh crops them off first (:func:`crop_layer`), and a
  padded inverse or eigenbasis has zeros there, which meet zero-padded
  gradient rows.
  """
  up = lambda d: -(-d // multiple) * multiple
  return _resize(f, up(f.a.shape[0]), up(f.g.shape[0]))


def shard_rows(factors: dict[str, Factors], mesh: Mesh,
               axis_name: AxisNames) -> dict[str, Factors]:
  """Factor matrices split by rows over ``axis_name``; the rest replicated.

  A sharding constraint under ``jit`` (``jax.sharding.reshard`` on explicit
  mesh axes), a placement when called eagerly.
  """
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  return jax.tree.map(lambda x: _place(x, NamedSharding(
      mesh, PartitionSpec(names, None) if x.ndim == 2 else PartitionSpec())),
                      factors)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every array of ``tree`` replicated over every device of ``mesh``."""
  return jax.tree.map(
      lambda x: _place(x, NamedSharding(mesh, PartitionSpec())), tree)


def _place(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  if sharding.mesh.explicit_axes:
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def refresh_distributed(
    factors: dict[str, Factors],
    refresh_fn: Callable[[Factors], Factors],
    mesh: Mesh | None,
    axis_name: AxisNames = "data",
    sizes: dict[str, tuple[int, int]] | None = None,
) -> dict[str, Factors]:
  """``{k: refresh_fn(f)}``, each factor computed on one device of an axis.

  Every device of the mesh gets every result (or, with ``sizes``, its rows of
  it). Works eagerly, inside ``jax.jit`` and under ``lax.cond``. Along the
  mesh's other axes (if any) the devices with the same index on
  ``axis_name`` repeat the same work; pass a tuple of axis names to spread it
  over them too.

  Args:
    factors: ``{layer_key: factors}``, the NamedTuples of
      ``kronjax._precondition``; replicated, or stored padded and split by
      rows (see :func:`pad_layer`, :func:`shard_rows`).
    refresh_fn: one layer's refresh; it must not change the accumulators
      ``a``, ``g`` and ``weight`` (they are not exchanged).
    mesh: the devices; ``None`` refreshes every layer here, in a plain loop.
    axis_name: the mesh axis (or axes) whose devices share the work.
    sizes: ``{layer_key: (d_A, d_G)}`` when the factors are stored padded:
      each layer is refreshed at its own size (cropped, then padded back) and
      its matrices come back split by rows over ``axis_name`` (a
      reduce-scatter: no device holds every result).

  Returns:
    ``{layer_key: refreshed factors}``, equal to the plain loop's.

  References:
    Pauloski et al. 2021 (KAISA).
  """
  def one(k, f):
    if sizes is None:
      return refresh_fn(f)
    return pad_like(refresh_fn(crop_layer(f, *sizes[k])), f)

  n = 1 if mesh is None else axis_size(mesh, axis_name)
  if n == 1 or not factors:
    return {k: one(k, f) for k, f in factors.items()}
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  owners = assign({(k, side): c for k, f in factors.items()
                   for side, c in factor_costs(f).items()}, n)
  # One branch per distinct set of factors: idle devices share one.
  owned = [frozenset(item for item, i in owners.items() if i == device)
           for device in range(n)]
  groups = sorted(set(owned), key=sorted)
  branch_of = jnp.asarray([groups.index(o) for o in owned], jnp.int32)
  split = lambda x: sizes is not None and x.ndim == 2
  # Only the accumulators go in (gathered, when stored split).
  inputs = {k: _written(f, keep=True) for k, f in factors.items()}
  if sizes is not None:
    inputs = replicate(inputs, mesh)

  def per_device(fs):
    # Traced here, where the axis is bound, as refresh_fn may use it.
    shapes = {k: _written(jax.eval_shape(lambda f, k=k: one(k, f), f))
              for k, f in fs.items()}
    fields = {(k, name): x for k, w in shapes.items()
              for name, x in w._asdict().items() if x is not None}

    def computed(mine, fs):
      """``{(key, field): array}`` of the factors in ``mine``.

      A layer's refresh, of which only this device's factors are kept: XLA
      drops the other factor's (unused) decomposition.
      """
      out = {}
      for k, f in fs.items():
        if {(k, "a"), (k, "g")} & mine:
          done = _written(one(k, f))
          out.update({(kk, name): getattr(done, name) for kk, name in fields
                      if kk == k and (k, name[0]) in mine})
      return out

    index = branch_of[jax.lax.axis_index(names)]
    if sizes is None:
      gathered = _all_gather_fields(computed, index, groups, owned, fields,
                                    fs, names)
    else:
      # Zeros where not computed: a reduce-scatter leaves each device the
      # owner's rows (adding exact zeros), and only them.
      def branch(mine):
        return lambda fs: computed(mine, fs) | {
            item: jnp.zeros(x.shape, x.dtype) for item, x in fields.items()
            if (item[0], item[1][0]) not in mine}

      mine = jax.lax.switch(index, [branch(g) for g in groups], fs)
      gathered = {item: jax.lax.psum_scatter(x, names, scatter_dimension=0,
                                             tiled=True) if split(x)
                  else jax.lax.psum(x, names) for item, x in mine.items()}
    return {k: w._replace(**{name: gathered[(k, name)]
                             for name, x in w._asdict().items()
                             if x is not None})
            for k, w in shapes.items()}

  out_specs = {k: jax.tree.map(
      lambda x: PartitionSpec(names, None) if split(x) else PartitionSpec(),
      _written(f)) for k, f in factors.items()}
  # check_vma=False: jax types an all-gather's result as varying over the
  # axis, though every device holds the same (out_specs P() says so).
  written = jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(),),
                          out_specs=out_specs, axis_names=set(names),
                          check_vma=False)(inputs)
  return {k: w._replace(**{name: getattr(factors[k], name)
                           for name in _ACCUMULATORS})
          for k, w in written.items()}


def _all_gather_fields(computed, index, groups, owned, fields, fs, names):
  """Every device's computed fields, exchanged by one all-gather.

  Each device packs what it computed into one flat buffer (as long as the
  busiest device's); after the all-gather every device unpacks every
  device's buffer by the (static) placement. Each result crosses the network
  once: half the traffic of summing zero-padded results.
  """
  dtype = jnp.result_type(*fields.values())
  order = {mine: sorted(item for item in fields
                        if (item[0], item[1][0]) in mine) for mine in groups}
  size = lambda item: math.prod(fields[item].shape)
  length = max(sum(map(size, items)) for items in order.values())

  def branch(mine):
    def run(fs):
      done = computed(mine, fs)
      flat = [done[item].astype(dtype).ravel() for item in order[mine]]
      used = sum(map(size, order[mine]))
      return jnp.concatenate(flat + [jnp.zeros(length - used, dtype)])
    return run

  buffers = jax.lax.all_gather(
      jax.lax.switch(index, [branch(g) for g in groups], fs), names)
  out = {}
  for device, mine in enumerate(owned):
    offset = 0
    for item in order[mine]:
      x = fields[item]
      out[item] = buffers[device, offset:offset + size(item)].reshape(
          x.shape).astype(x.dtype)
      offset += size(item)
  return out


def refresh_eighs(
    factors: dict[str, Factors],
    min_eigenvalue: Any,
    mesh: Mesh | None,
    axis_name: AxisNames = "data",
) -> dict[str, Factors]:
  """All layers' ``_precondition.refresh_eigh``, placed over a mesh axis.

  ``mesh=None`` is ``{k: refresh_eigh(f, min_eigenvalue) for k, f in ...}``;
  see :func:`refresh_distributed`.
  """
  return refresh_distributed(
      factors, lambda f: _precondition.refresh_eigh(f, min_eigenvalue), mesh,
      axis_name)
