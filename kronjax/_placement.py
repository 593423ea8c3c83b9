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
``lax.all_gather`` lower to XLA collectives on any backend (CPU, GPU, TPU; one
host or many after ``jax.distributed.initialize()``). The exchange carries
only what a refresh derives (eigenvectors and eigenvalues, or inverses); the
moving averages it reads are the same on every device and stay where they
are. Factors stored split over the devices (``shard_factors=True``) are
refreshed by ``kronjax._sharded`` with the same :class:`Plan`.

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
from jax.sharding import Mesh, PartitionSpec

from kronjax import _precondition

__all__ = ["Plan", "assign", "axis_size", "factor_costs",
           "refresh_distributed", "refresh_eighs"]

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


def written(f: Factors, keep: bool = False) -> Factors:
  """``f`` without the accumulators, or (``keep``) with only them.

  ``None`` is an empty pytree; a refresh reads only the accumulators.
  """
  drop = (set(f._fields) - set(_ACCUMULATORS)) if keep else _ACCUMULATORS
  return f._replace(**{name: None for name in drop})


def refresh_distributed(
    factors: dict[str, Factors],
    refresh_fn: Callable[[Factors], Factors],
    mesh: Mesh | None,
    axis_name: AxisNames = "data",
) -> dict[str, Factors]:
  """``{k: refresh_fn(f)}``, each factor computed on one device of an axis.

  Every device of the mesh gets every result. Works eagerly, inside
  ``jax.jit`` and under ``lax.cond``; the factors are taken as replicated (as
  an optimizer state is under data parallelism; for factors split by rows see
  ``kronjax._sharded.refresh``). Along the mesh's other axes (if any) the
  devices with the same index on ``axis_name`` repeat the same work; pass a
  tuple of axis names to spread it over them too.

  Args:
    factors: ``{layer_key: factors}``, the NamedTuples of
      ``kronjax._precondition``.
    refresh_fn: one layer's refresh; it must not change the accumulators
      ``a``, ``g`` and ``weight`` (they are not exchanged).
    mesh: the devices; ``None`` refreshes every layer here, in a plain loop.
    axis_name: the mesh axis (or axes) whose devices share the work.

  Returns:
    ``{layer_key: refreshed factors}``, equal to the plain loop's.

  References:
    Pauloski et al. 2021 (KAISA).
  """
  n = 1 if mesh is None else axis_size(mesh, axis_name)
  if n == 1 or not factors:
    return {k: refresh_fn(f) for k, f in factors.items()}
  names = axis_names(axis_name)
  plan = Plan(factors, n)
  # Only the accumulators go in.
  inputs = {k: written(f, keep=True) for k, f in factors.items()}

  def per_device(fs):
    # Traced here, where the axis is bound, as refresh_fn may use it.
    shapes = {k: written(jax.eval_shape(refresh_fn, f)) for k, f in fs.items()}
    outputs = fields(shapes)
    computed = lambda mine, fs: plan.computed(mine, fs, refresh_fn, outputs)
    index = plan.branch_of[jax.lax.axis_index(names)]
    return from_fields(shapes, _all_gather_fields(
        computed, index, plan, outputs, fs, names))

  # check_vma=False: jax types an all-gather's result as varying over the
  # axis, though every device holds the same (out_specs P() says so).
  written_ = jax.shard_map(per_device, mesh=mesh,
                           in_specs=(PartitionSpec(),),
                           out_specs=PartitionSpec(), axis_names=set(names),
                           check_vma=False)(inputs)
  return with_accumulators(written_, factors)


class Plan:
  """The static placement of a refresh: who computes which factor.

  Attributes:
    owners: ``{(layer_key, "a" | "g"): device}`` (:func:`assign`).
    owned: per device, the frozenset of factors it computes.
    groups: the distinct sets among ``owned`` (idle devices share one): one
      ``lax.switch`` branch each.
    branch_of: per device, the index of its branch (an int32 array).
  """

  def __init__(self, factors: dict[str, Factors], n: int):
    self.owners = assign({(k, side): c for k, f in factors.items()
                          for side, c in factor_costs(f).items()}, n)
    self.owned = [frozenset(item for item, i in self.owners.items()
                            if i == device) for device in range(n)]
    self.groups = sorted(set(self.owned), key=sorted)
    self.branch_of = jnp.asarray([self.groups.index(o) for o in self.owned],
                                 jnp.int32)

  @staticmethod
  def layers(mine) -> list[str]:
    """The layers with a factor in ``mine``, sorted."""
    return sorted({k for k, _ in mine})

  @staticmethod
  def computed(mine, fs, refresh_fn, fields):
    """``{(key, field): array}`` of the factors in ``mine``.

    A layer's refresh, of which only this device's factors are kept: XLA
    drops the other factor's (unused) decomposition.
    """
    out = {}
    for k in Plan.layers(mine):
      done = written(refresh_fn(fs[k]))
      out.update({(kk, name): getattr(done, name) for kk, name in fields
                  if kk == k and (k, name[0]) in mine})
    return out


def axis_names(axis_name: AxisNames) -> tuple[str, ...]:
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def fields(factors: dict[str, Factors]) -> dict[tuple[str, str], Any]:
  """``{(layer_key, field name): value}`` of the fields that are not None."""
  return {(k, name): x for k, f in factors.items()
          for name, x in f._asdict().items() if x is not None}


def from_fields(like: dict[str, Factors],
                values: dict[tuple[str, str], Any]) -> dict[str, Factors]:
  """``like`` with each field of :func:`fields` taken from ``values``."""
  return {k: f._replace(**{name: values[(k, name)]
                           for name, x in f._asdict().items() if x is not None})
          for k, f in like.items()}


def with_accumulators(refreshed: dict[str, Factors],
                      factors: dict[str, Factors]) -> dict[str, Factors]:
  """``refreshed`` with the accumulators of ``factors`` put back."""
  return {k: w._replace(**{name: getattr(factors[k], name)
                           for name in _ACCUMULATORS})
          for k, w in refreshed.items()}


def pack(arrays, length: int, dtype) -> jax.Array:
  """The arrays flattened into one ``(length,)`` buffer, zero-padded."""
  flat = [x.astype(dtype).ravel() for x in arrays]
  used = sum(x.size for x in flat)
  return jnp.concatenate(flat + [jnp.zeros(length - used, dtype)])


def _all_gather_fields(computed, index, plan, fields, fs, names):
  """Every device's computed fields, exchanged by one all-gather.

  Each device packs what it computed into one flat buffer (as long as the
  busiest device's); after the all-gather every device unpacks every
  device's buffer by the (static) placement. Each result crosses the network
  once: half the traffic of summing zero-padded results.
  """
  dtype = jnp.result_type(*fields.values())
  order = {mine: sorted(item for item in fields
                        if (item[0], item[1][0]) in mine)
           for mine in plan.groups}
  size = lambda item: math.prod(fields[item].shape)
  length = max(sum(map(size, items)) for items in order.values())

  def branch(mine):
    def run(fs):
      done = computed(mine, fs)
      return pack([done[i] for i in order[mine]], length, dtype)
    return run

  buffers = jax.lax.all_gather(
      jax.lax.switch(index, [branch(g) for g in plan.groups], fs), names)
  out = {}
  for device, mine in enumerate(plan.owned):
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
