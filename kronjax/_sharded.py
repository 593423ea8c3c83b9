"""Factor state split by rows over a mesh axis (``shard_factors=True``).

Replicated factors cost every device ``Σ (d_in² + d_out²)`` numbers twice
(moving averages, then inverses or eigenvectors). Here, as ZeRO splits Adam's
moments, every factor matrix is zero-padded to a multiple of the axis size
``n`` (``A`` is inputs plus a bias row and rarely divides) and split by rows:
``P(axis, None)``, ``1/n`` of it per device. Vectors (eigenvalues, an
embedding's diagonal ``A``) and scalars stay replicated.

A refresh moves only what each device computes or keeps, in two
``all_to_all``s and never a whole factor to a device that does not refresh it:

.. code-block:: text

  device i ──all_to_all──► the owner of each factor (``_placement.Plan``)
    its rows of the averages   gets all rows of the layers it refreshes,
                               crops them to the layer's size, refreshes
  owner ──all_to_all──► device r: rows r of every result (vectors whole)

so a device's peak is its share of the refresh, not the whole state. The
preconditioning matmuls are left to XLA's partitioner, and their result is
replicated (the updates and params must not inherit the split).

References:
  Rajbhandari et al. 2020, ZeRO: memory optimizations toward training
  trillion parameter models. Pauloski et al. 2021, KAISA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kronjax import _placement
from kronjax._placement import AxisNames, Factors

__all__ = ["check_layout", "crop_layer", "pad_layer", "pad_like", "refresh",
           "replicate", "shard_rows"]


def _resize(f: Factors, size_a: int, size_g: int) -> Factors:
  """Each array field cropped or padded to ``size_a`` or ``size_g``.

  Fields named ``a*`` are sized like ``A``, ``g*`` like ``G``, along every
  axis; a diagonal ``A`` (a vector: an embedding's) is left as it is. Padding
  is zero, except eigenvalues: one, so that the exact damping's
  ``x / (λ_A λ_Gᵀ + λ)`` is ``0 / 1`` there even at ``λ = 0``.
  """
  def resize(name, x):
    if x is None or x.ndim == 0 or (name[0] == "a" and f.a.ndim == 1):
      return x
    size = size_a if name[0] == "a" else size_g
    x = x[tuple(slice(0, size) for _ in x.shape)]
    return jnp.pad(x, [(0, size - d) for d in x.shape],
                   constant_values=1 if name.endswith("eigvals") else 0)

  return f._replace(**{name: resize(name, getattr(f, name))
                       for name in f._fields})


def crop_layer(f: Factors, d_a: int, d_g: int) -> Factors:
  """A layer's factors at their own size ``(d_A, d_G)``; see ``pad_layer``."""
  return _resize(f, d_a, d_g)


def pad_like(f: Factors, like: Factors) -> Factors:
  """``f`` padded to the stored sizes of ``like``'s ``a`` and ``g``."""
  return _resize(f, like.a.shape[0], like.g.shape[0])


def padded(d: int, multiple: int) -> int:
  return -(-d // multiple) * multiple


def pad_layer(f: Factors, multiple: int) -> Factors:
  """``f`` with its dense factors padded to a multiple of ``multiple``.

  The padding changes nothing that is used: a refresh crops it off first,
  and a padded inverse or eigenbasis has zeros there, which meet zero-padded
  gradient rows.
  """
  return _resize(f, padded(f.a.shape[0], multiple),
                 padded(f.g.shape[0], multiple))


def check_layout(factors: dict[str, Factors], layers, keys,
                 multiple: int) -> None:
  """Raises if the stored factor shapes are not this optimizer's layout.

  A state made with another ``shard_factors`` or axis size (a checkpoint)
  would otherwise run on with wrong shapes or a wrong π.
  """
  for key in keys:
    f, spec = factors[key], layers[key]
    (d_a, *_), (d_g, _) = spec.factor_shapes
    want_a = (d_a,) if spec.kind == "embed" else (padded(d_a, multiple),) * 2
    want_g = (padded(d_g, multiple),) * 2
    if (f.a.shape, f.g.shape) != (want_a, want_g):
      layout = (f"split over {multiple} devices, so padded to a multiple of "
                f"{multiple}" if multiple > 1 else "replicated, unpadded")
      raise ValueError(
          f"Layer {key}: the optimizer state has factors A {f.a.shape} and G "
          f"{f.g.shape}, but this optimizer stores A {want_a} and G {want_g} "
          f"({layout}). The state was made with another shard_factors or "
          f"mesh axis size: build the optimizer as it was, or re-initialise "
          f"the state with tx.init(params).")


def shard_rows(factors: dict[str, Factors], mesh: Mesh,
               axis_name: AxisNames) -> dict[str, Factors]:
  """Factor matrices split by rows over ``axis_name``; the rest replicated.

  A sharding constraint under ``jit`` (``jax.sharding.reshard`` on explicit
  mesh axes), a placement when called eagerly.
  """
  names = _placement.axis_names(axis_name)
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


def refresh(factors: dict[str, Factors],
            refresh_fn: Callable[[Factors], Factors], mesh: Mesh,
            axis_name: AxisNames,
            sizes: dict[str, tuple[int, int]]) -> dict[str, Factors]:
  """``{k: refresh_fn(f)}`` of factors stored padded and split by rows.

  Each factor is refreshed on one device (``_placement.Plan``), at its
  layer's own size ``sizes[k] = (d_A, d_G)``, and comes back split by rows.
  Equal to the plain loop's results (padded), up to rounding.
  """
  names = _placement.axis_names(axis_name)
  n = _placement.axis_size(mesh, axis_name)
  one = lambda k, f: pad_like(refresh_fn(crop_layer(f, *sizes[k])), f)
  plan = _placement.Plan(factors, n)
  inputs = {k: _placement.written(f, keep=True) for k, f in factors.items()}
  # Shapes only: under Explicit axes a split matrix cannot be cropped.
  shapes = {k: _placement.written(jax.eval_shape(
      lambda f, k=k: one(k, f), jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), f)))
            for k, f in factors.items()}
  # What each group of owners needs (the split averages of every layer it
  # touches) and sends back (its results), in a fixed order.
  split = lambda x: x is not None and x.ndim == 2
  needs = {mine: [(k, s) for k in plan.layers(mine) for s in ("a", "g")
                  if split(getattr(factors[k], s))] for mine in plan.groups}
  gives = {mine: [(k, name) for k, name in _placement.fields(shapes)
                  if (k, name[0]) in mine] for mine in plan.groups}
  block = lambda x: x.size // n if split(x) else x.size  # per destination
  field = lambda item: getattr(shapes[item[0]], item[1])
  accumulator = lambda item: getattr(factors[item[0]], item[1])
  length_in = max(1, *(sum(block(accumulator(i)) for i in items)
                       for items in needs.values()))
  length_out = max(1, *(sum(block(field(i)) for i in items)
                        for items in gives.values()))
  dtype = jnp.result_type(*[x.dtype for w in shapes.values() for x in w
                            if x is not None])

  def per_device(fs):
    # 1. My rows of each averaged factor, to the device that refreshes it.
    send = jnp.stack([_placement.pack(
        [getattr(fs[k], s) for k, s in needs[mine]], length_in, dtype)
                      for mine in plan.owned])
    rows_in = jax.lax.all_to_all(send, names, 0, 0, tiled=True)

    def branch(mine):
      def run(rows_in, fs):
        offset, full = 0, {}
        for item in needs[mine]:  # every device's rows, stacked
          x = accumulator(item)
          rows = rows_in[:, offset:offset + block(x)]
          full[item] = rows.reshape(x.shape).astype(x.dtype)
          offset += block(x)
        done = {}
        for k in plan.layers(mine):
          f = fs[k]._replace(**{s: full[(k, s)] for kk, s in full if kk == k})
          out = _placement.written(one(k, f))
          done.update({(k, name): getattr(out, name) for kk, name in gives[mine]
                       if kk == k})
        # 2. Rows r of each result to device r (vectors whole).
        return jnp.stack([_placement.pack(
            [_rows(done[i], r, n) for i in gives[mine]], length_out, dtype)
                          for r in range(n)])
      return run

    index = plan.branch_of[jax.lax.axis_index(names)]
    back = jax.lax.all_to_all(
        jax.lax.switch(index, [branch(g) for g in plan.groups], rows_in, fs),
        names, 0, 0, tiled=True)
    out = {}
    for source, mine in enumerate(plan.owned):
      offset = 0
      for item in gives[mine]:
        x = field(item)
        local = (x.shape[0] // n, x.shape[1]) if split(x) else x.shape
        out[item] = back[source, offset:offset + block(x)].reshape(
            local).astype(x.dtype)
        offset += block(x)
    return _placement.from_fields(shapes, out)

  spec = lambda x: PartitionSpec(names, None) if split(x) else PartitionSpec()
  written = jax.shard_map(
      per_device, mesh=mesh, in_specs=(jax.tree.map(spec, inputs),),
      out_specs={k: jax.tree.map(spec, w) for k, w in shapes.items()},
      axis_names=set(names), check_vma=False)(shard_rows(inputs, mesh, names))
  return _placement.with_accumulators(written, factors)


def _rows(x: jax.Array, r: int, n: int) -> jax.Array:
  """Rows ``r`` of ``n`` equal blocks of a matrix; a vector whole."""
  if x.ndim != 2:
    return x
  size = x.shape[0] // n
  return x[r * size:(r + 1) * size]
