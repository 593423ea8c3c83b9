"""Distributed refreshes of the factors' eigendecompositions (KAISA placement).

The refresh is K-FAC's one step whose cost grows as ``d³`` per layer, and
plain data parallelism repeats it on every device. Here each layer's refresh
is assigned to one device of a mesh axis (greedy: the largest layer first, to
the least loaded device), computed only there, and shared by an all-reduce
of the results, the other devices contributing zeros:

.. code-block:: text

  shard_map over axis ──► device i: lax.switch(i) refreshes its own layers,
                                    zeros for the others
                      ──► psum over the axis: every device holds every result

No communication layer of our own: ``jax.shard_map``, ``lax.axis_index`` and
``lax.psum`` lower to XLA collectives on any backend (CPU, GPU, TPU; one host
or many after ``jax.distributed.initialize()``). The exchange carries only
what a refresh derives (eigenvectors and eigenvalues, or inverses); the
moving averages it reads are the same on every device and stay where they are.

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

__all__ = ["assign_layers", "axis_size", "layer_cost", "refresh_distributed",
           "refresh_eighs"]

Factors = Any  # a NamedTuple of _precondition: LayerFactors, EmbeddingFactors...
AxisNames = str | Sequence[str]

# A refresh reads these (identical on every device: factors are replicated)
# and writes the rest; only what it writes crosses the network.
_ACCUMULATORS = ("a", "g", "weight")


def layer_cost(f: Factors) -> int:
  """Relative cost of refreshing one layer: ``d³`` per dense factor.

  A diagonal factor (an embedding's ``A``) costs ``d``: its "decomposition" is
  elementwise.
  """
  return sum(x.shape[0] ** 3 if x.ndim == 2 else x.shape[0]
             for x in (f.a, f.g))


def assign_layers(costs: dict[str, float], n: int) -> dict[str, int]:
  """Greedy longest-processing-time placement of layers on ``n`` devices.

  Layers are taken by decreasing cost (ties by key, so every host computes the
  same placement) and each goes to the device with the least work so far
  (ties: the lowest index). The busiest device then has at most 4/3 of the
  optimal load (Graham 1969).

  Args:
    costs: ``{layer_key: cost}``.
    n: number of devices.

  Returns:
    ``{layer_key: device index in [0, n)}``.
  """
  if n < 1:
    raise ValueError(f"assign_layers needs n >= 1 devices, got {n}.")
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


def _written(f: Factors) -> Factors:
  """``f`` without the accumulators (``None`` is an empty pytree)."""
  return f._replace(**{name: None for name in _ACCUMULATORS})


def refresh_distributed(
    factors: dict[str, Factors],
    refresh_fn: Callable[[Factors], Factors],
    mesh: Mesh | None,
    axis_name: AxisNames = "data",
) -> dict[str, Factors]:
  """``{k: refresh_fn(f)}``, each layer computed on one device of an axis.

  Every device of the mesh gets every result. Works eagerly, inside
  ``jax.jit`` and under ``lax.cond``; the factors are taken as replicated
  (as an optimizer state is under data parallelism). Along the mesh's other
  axes (if any) the devices with the same index on ``axis_name`` repeat the
  same work; pass a tuple of axis names to spread it over them too.

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
  if mesh is None:
    return {k: refresh_fn(f) for k, f in factors.items()}
  n = axis_size(mesh, axis_name)
  if n == 1 or not factors:
    return {k: refresh_fn(f) for k, f in factors.items()}
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  owners = assign_layers({k: layer_cost(f) for k, f in factors.items()}, n)
  # One branch per distinct set of layers: idle devices share one.
  groups = sorted({frozenset(k for k in factors if owners[k] == i)
                   for i in range(n)}, key=sorted)
  branch_of = jnp.asarray([groups.index(frozenset(
      k for k in factors if owners[k] == i)) for i in range(n)], jnp.int32)

  def per_device(fs):
    # Traced here, where the axis is bound, as refresh_fn may use it.
    shapes = {k: _written(jax.eval_shape(refresh_fn, f))
              for k, f in fs.items()}

    def branch(mine):
      return lambda fs: {
          k: _written(refresh_fn(f)) if k in mine else
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[k])
          for k, f in fs.items()}

    index = branch_of[jax.lax.axis_index(names)]
    # Non-owners add exact zeros, so the sum is the owner's result bit for bit.
    return jax.lax.psum(
        jax.lax.switch(index, [branch(g) for g in groups], fs), names)

  spec = PartitionSpec()
  written = jax.shard_map(per_device, mesh=mesh, in_specs=(spec,),
                          out_specs=spec, axis_names=set(names))(factors)
  return {k: w._replace(**{name: getattr(factors[k], name)
                           for name in _ACCUMULATORS})
          for k, w in written.items()}


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
