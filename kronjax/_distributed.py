"""K-FAC over several devices: placed refreshes and split factor storage.

The refresh is K-FAC's one step whose cost grows as ``d³`` per factor, and
plain data parallelism repeats it on every device. With a :class:`Placement`
each factor's refresh (a layer's ``A`` or ``G``) runs on one device of a mesh
axis (greedy: the largest first, to the least loaded device; Pauloski et al.
2021) and the results are exchanged:

* replicated storage: each device packs what it computed into one buffer, and
  one ``all_gather`` gives every device every result (each result crosses the
  network once);
* split storage (``sharded=True``, as ZeRO splits Adam's moments): every
  factor matrix is zero-padded to a multiple of the axis size ``n`` and split
  by rows, ``1/n`` per device. A refresh sends each average's rows to the
  device that refreshes it and the results' rows back (two ``all_to_all``s),
  so no device gathers the whole state. The preconditioning matmuls are left
  to XLA's partitioner; their results are replicated.

No communication layer of our own: ``jax.shard_map``, ``lax.axis_index``,
``lax.all_gather`` and ``lax.all_to_all`` lower to XLA collectives on any
backend. The single-device path never enters this module.

References:
  Pauloski et al. 2021, KAISA: an adaptive second-order optimizer framework
  for deep neural networks. Rajbhandari et al. 2020, ZeRO: memory
  optimizations toward training trillion parameter models.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["Placement", "assign", "resolve"]

SideFn = Callable[[Any, str], Any]  # (layer factors, "a" | "g") -> factor


class Placement(NamedTuple):
  """Where K-FAC refreshes its factors and keeps them, over a mesh axis.

  Attributes:
    mesh: the ``jax.sharding.Mesh`` of the train step.
    axis: the mesh axis (or tuple of axes) over whose devices the factors'
      refreshes are spread, one device per factor (KAISA placement).
    sharded: also store every factor matrix split by rows over ``axis``
      (zero-padded to a multiple of its size): ``1/n`` of the curvature state
      per device, for layers whose factors do not fit replicated. The padded
      shapes tie a checkpoint to the axis size.
  """

  mesh: Mesh
  axis: str | tuple[str, ...] = "data"
  sharded: bool = False


def _names(placement: Placement) -> tuple[str, ...]:
  axis = placement.axis
  return (axis,) if isinstance(axis, str) else tuple(axis)


def axis_size(placement: Placement) -> int:
  """Devices along the placement's axis (or axes); raises for unknown ones."""
  mesh = placement.mesh
  missing = [a for a in _names(placement) if a not in mesh.shape]
  if missing:
    raise ValueError(f"placement: the mesh has axes {tuple(mesh.axis_names)}; "
                     f"it has no axis {missing[0]!r} to place refreshes on.")
  return math.prod(mesh.shape[a] for a in _names(placement))


def resolve(placement: Placement | None) -> Placement | None:
  """The placement to use; ``None`` for none or one device along the axis."""
  if placement is None:
    return None
  if not isinstance(placement, Placement) or not isinstance(placement.mesh,
                                                            Mesh):
    raise TypeError(
        "placement must be a kronjax.Placement(mesh, axis, sharded) with a "
        f"jax.sharding.Mesh; got {placement!r:.200}.")
  return placement if axis_size(placement) > 1 else None


def stored_size(d: int, placement: Placement) -> int:
  """A factor's stored size: ``d`` padded to a multiple of the axis size if
  the placement splits the factors, else ``d``."""
  n = axis_size(placement) if placement.sharded else 1
  return -(-d // n) * n


def assign(costs: dict[Any, float], n: int) -> dict[Any, int]:
  """Greedy longest-processing-time placement of work items on ``n`` devices.

  Items are taken by decreasing cost (ties by key, so every host computes the
  same placement), each to the device with the least work so far (ties: the
  lowest index): the busiest device has at most 4/3 of the optimal load
  (Graham 1969).
  """
  if n < 1:
    raise ValueError(f"assign needs n >= 1 devices, got {n}.")
  load, owners = [0.0] * n, {}
  for key in sorted(costs, key=lambda k: (-costs[k], k)):
    owners[key] = i = min(range(n), key=lambda j: (load[j], j))
    load[i] += costs[key]
  return owners


def factor_cost(average: jax.Array) -> int:
  """Relative cost of a factor's refresh: ``d³``, or ``d`` if diagonal."""
  d = average.shape[0]
  return d ** 3 if average.ndim == 2 else d


class Plan:
  """Who refreshes which factor ``(layer key, "a" | "g")``.

  Attributes:
    owners: ``{item: device}`` by :func:`assign` of :func:`factor_cost`.
    owned: per device, the frozenset of items it refreshes.
    groups: the distinct sets among ``owned``: one ``lax.switch`` branch each.
    branch_of: per device, the index of its branch (an int32 array).
  """

  def __init__(self, factors: dict[str, Any], n: int):
    self.owners = assign({(k, s): factor_cost(getattr(f, s).ema)
                          for k, f in factors.items() for s in "ag"}, n)
    self.owned = [frozenset(i for i, d in self.owners.items() if d == device)
                  for device in range(n)]
    self.groups = sorted(set(self.owned), key=sorted)
    self.branch_of = jnp.asarray([self.groups.index(o) for o in self.owned],
                                 jnp.int32)

  def branch(self, names: tuple[str, ...]) -> jax.Array:
    return self.branch_of[jax.lax.axis_index(names)]


def _derived(factor: Any) -> dict[str, jax.Array]:
  """What a refresh writes: every field but the average."""
  return {k: v for k, v in factor._asdict().items()
          if k != "ema" and v is not None}


def _unraveler(tree: Any) -> tuple[int, Callable]:
  """``(size, unravel)`` of ``ravel_pytree`` for a tree of shapes."""
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  flat, unravel = ravel_pytree(zeros)
  return flat.size, unravel


def _packed(tree: Any, length: int, dtype: Any) -> jax.Array:
  flat = ravel_pytree(tree)[0].astype(dtype)
  return jnp.concatenate([flat, jnp.zeros(length - flat.size, dtype)])


def _with(fs: dict[str, Any], results: dict) -> dict[str, Any]:
  """``fs`` with each refreshed factor's derived fields from ``results``."""
  return {k: f._replace(**{s: getattr(f, s)._replace(**results[(k, s)])
                           for s in "ag"}) for k, f in fs.items()}


def _resize(x: jax.Array | None, size: int, fill: float) -> jax.Array | None:
  if x is None or x.ndim == 0:
    return x
  x = x[tuple(slice(0, size) for _ in x.shape)]
  return jnp.pad(x, [(0, size - d) for d in x.shape], constant_values=fill)


def _resize_side(side: Any, size: int) -> Any:
  """A factor's arrays cropped or padded to ``size``; a diagonal one as is.

  Padding is zero, but for eigenvalues one: the exact damping's division by
  ``λ_A λ_Gᵀ + λ`` then meets ``0 / 1`` there even at ``λ = 0``.
  """
  if side.ema.ndim == 1:
    return side
  return side._replace(**{name: _resize(x, size, 1 if name == "eigvals" else 0)
                          for name, x in side._asdict().items()})


def _resize_layer(f: Any, size_a: int, size_g: int) -> Any:
  return f._replace(a=_resize_side(f.a, size_a), g=_resize_side(f.g, size_g))


def init(factors: dict[str, Any], placement: Placement) -> dict[str, Any]:
  """Initial factors in the placement's layout (padded and split if sharded)."""
  if not placement.sharded:
    return factors
  pad = lambda d: stored_size(d, placement)
  return constrain({k: _resize_layer(f, pad(f.a.ema.shape[0]),
                                     pad(f.g.ema.shape[0]))
                    for k, f in factors.items()}, placement)


def _place(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  if sharding.mesh.explicit_axes:
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def constrain(factors: dict[str, Any], placement: Placement) -> dict[str, Any]:
  """Split storage: matrices split by rows, the rest replicated; else as is.

  A sharding constraint under ``jit`` (``reshard`` on explicit axes), a
  placement when called eagerly.
  """
  if not placement.sharded:
    return factors
  spec = lambda x: (PartitionSpec(_names(placement), None) if x.ndim == 2
                    else PartitionSpec())
  return jax.tree.map(
      lambda x: _place(x, NamedSharding(placement.mesh, spec(x))), factors)


def replicate(tree: Any, placement: Placement) -> Any:
  """With split storage, every array of ``tree`` replicated; else as is.

  Blocks are summed over the whole batch before the split (with a batch that
  jit took as a constant XLA otherwise split the tapes to match the factors
  and gathered batch-sized arrays), and updates must not inherit the split.
  """
  if not placement.sharded:
    return tree
  rep = NamedSharding(placement.mesh, PartitionSpec())
  return jax.tree.map(lambda x: _place(x, rep), tree)


def refresh(factors: dict[str, Any], side_fn: SideFn, placement: Placement,
            sizes: dict[str, tuple[int, int]]) -> dict[str, Any]:
  """Every factor's ``side_fn``, each computed on one device, shared by all.

  Args:
    factors: ``{layer_key: LayerFactors}`` in the placement's layout.
    side_fn: one factor's refresh; it reads only averages and ``weight``.
    placement: the mesh axis to spread the work over.
    sizes: each layer's own ``(d_A, d_G)`` (split storage is padded).

  Returns:
    The refreshed factors in the same layout, equal to a plain loop's.
  """
  if not factors:
    return factors
  run = _refresh_split if placement.sharded else _refresh_replicated
  return run(factors, side_fn, placement, sizes)


def _refresh_replicated(factors, side_fn, placement, sizes):
  del sizes
  names, plan = _names(placement), Plan(factors, axis_size(placement))

  def results(mine, fs):
    return {(k, s): _derived(side_fn(fs[k], s)) for k, s in sorted(mine)}

  def per_device(fs):
    packers = {m: _unraveler(jax.eval_shape(lambda fs, m=m: results(m, fs),
                                            fs)) for m in plan.groups}
    length = max(size for size, _ in packers.values())
    dtype = jax.tree.leaves(fs)[0].dtype
    branches = [lambda fs, m=m: _packed(results(m, fs), length, dtype)
                for m in plan.groups]
    buffers = jax.lax.all_gather(
        jax.lax.switch(plan.branch(names), branches, fs), names)
    out = {}
    for device, mine in enumerate(plan.owned):
      size, unravel = packers[mine]
      out.update(unravel(buffers[device, :size]))
    return _with(fs, out)

  # check_vma=False: an all-gather's result is typed as varying over the
  # axis, though every device holds the same (out_specs P() says so).
  return jax.shard_map(per_device, mesh=placement.mesh,
                       in_specs=(PartitionSpec(),), out_specs=PartitionSpec(),
                       axis_names=set(names), check_vma=False)(factors)


def _refresh_split(factors, side_fn, placement, sizes):
  names, n = _names(placement), axis_size(placement)
  plan = Plan(factors, n)
  rows = lambda x: (x.shape[0] // n,) + x.shape[1:] if x.ndim == 2 else x.shape
  local = lambda x: jax.ShapeDtypeStruct(rows(x), x.dtype)
  # Each owner needs every split average of the layers it touches (the
  # π-split reads both traces of a layer).
  needs = {m: [(k, s) for k in sorted({k for k, _ in m}) for s in "ag"
               if getattr(factors[k], s).ema.ndim == 2] for m in plan.groups}
  emas = lambda fs, m: [getattr(fs[k], s).ema for k, s in needs[m]]

  def one(f, k, s):  # at the layer's own size, padded back
    f = f._replace(**{t: getattr(f, t)._replace(**{
        name: None for name in _derived(getattr(f, t))}) for t in "ag"})
    done = side_fn(_resize_layer(f, *sizes[k]), s)
    return _resize_side(done, getattr(f, s).ema.shape[0])

  def results(mine, fs):
    return {(k, s): _derived(one(fs[k], k, s)) for k, s in sorted(mine)}

  # Shapes only: under Explicit axes a split matrix cannot be cropped.
  unsplit = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         factors)
  full_shapes = {m: jax.eval_shape(lambda fs, m=m: results(m, fs), unsplit)
                 for m in plan.groups}
  to_rows = lambda tree, r: jax.tree.map(
      lambda x: x[r * rows(x)[0]:(r + 1) * rows(x)[0]] if x.ndim == 2 else x,
      tree)
  ins = {m: _unraveler([local(x) for x in emas(factors, m)])
         for m in plan.groups}
  outs = {m: _unraveler(jax.tree.map(local, full_shapes[m]))
          for m in plan.groups}
  length_in = max(1, *(size for size, _ in ins.values()))
  length_out = max(1, *(size for size, _ in outs.values()))
  dtype = jax.tree.leaves(factors)[0].dtype

  def per_device(fs):
    # 1. My rows of each average, to the device that refreshes it.
    send = jnp.stack([_packed(emas(fs, m), length_in, dtype)
                      for m in plan.owned])
    rows_in = jax.lax.all_to_all(send, names, 0, 0, tiled=True)

    def branch(m):
      def run(rows_in, fs):
        size, unravel = ins[m]
        parts = [unravel(rows_in[r, :size]) for r in range(n)]
        full = {item: jnp.concatenate([p[i] for p in parts])
                for i, item in enumerate(needs[m])}
        whole = {k: fs[k]._replace(**{
            s: getattr(fs[k], s)._replace(ema=full[(k, s)])
            for s in "ag" if (k, s) in full}) for k in {k for k, _ in m}}
        done = results(m, whole)
        # 2. Rows r of each result to device r (vectors whole).
        return jnp.stack([_packed(to_rows(done, r), length_out, dtype)
                          for r in range(n)])
      return run

    back = jax.lax.all_to_all(
        jax.lax.switch(plan.branch(names), [branch(m) for m in plan.groups],
                       rows_in, fs), names, 0, 0, tiled=True)
    out = {}
    for source, mine in enumerate(plan.owned):
      size, unravel = outs[mine]
      out.update(unravel(back[source, :size]))
    return _with(fs, out)

  spec = lambda x: (PartitionSpec(names, None) if x.ndim == 2
                    else PartitionSpec())
  specs = jax.tree.map(spec, factors)
  return jax.shard_map(per_device, mesh=placement.mesh, in_specs=(specs,),
                       out_specs=specs, axis_names=set(names),
                       check_vma=False)(constrain(factors, placement))
