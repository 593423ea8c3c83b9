"""Data-parallel K-FAC on every device there is: one host, many, or simulated.

The batch is split over a 1-D ``"data"`` mesh and the params and optimizer
state are replicated; ``jax.jit`` and XLA's SPMD partitioner do the rest. Each
device taps its share of the batch, its factors' averages become all-reduces
(as the gradients' do), and every device takes the same step: there is no
communication layer of kronjax's own. With
``kfac(placement=kronjax.Placement(mesh, "data"))`` each factor's refresh is
computed on one device of the mesh and shared (KAISA placement) instead of on
all of them; ``--shard-factors`` (``Placement(..., sharded=True)``) stores the
factors split by rows over the devices, for models whose factors do not fit
replicated.

Run it as it is (all local devices), on simulated CPU devices, or on several
hosts (one process per host, each with its coordinator's address in the
environment that ``jax.distributed.initialize`` reads; on a TPU pod or under
SLURM it finds them itself)::

  python -m kronjax.examples.distributed
  python -m kronjax.examples.distributed --cpu-devices 8 [--shard-factors]
  python -m kronjax.examples.distributed --multihost   # on every host

References:
  Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored
  approximate curvature. Ba, Grosse & Martens 2017, Distributed second-order
  optimization using Kronecker-factored approximations. Pauloski et al. 2021,
  KAISA: an adaptive second-order optimizer framework for deep neural
  networks.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import kronjax


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(64)(x))
    x = jnp.tanh(nn.Dense(32)(x))
    return nn.Dense(10)(x)


def local_batch(step: int, size: int, seed: int = 0):
  """This host's share of a synthetic classification batch (a fixed teacher).

  A real input pipeline reads only this host's files or shards here.
  """
  rng = np.random.default_rng([seed, step, jax.process_index()])
  teacher = np.random.default_rng(seed).normal(size=(16, 10))
  x = rng.normal(size=(size, 16)).astype(np.float32)
  return x, np.argmax(x @ teacher, axis=-1).astype(np.int32)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="simulate this many CPU devices (one host, tests)")
  parser.add_argument("--multihost", action="store_true",
                      help="call jax.distributed.initialize() first")
  parser.add_argument("--shard-factors", action="store_true",
                      help="store the factors split over the devices")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--batch", type=int, default=256,
                      help="global batch (a multiple of the device count)")
  args = parser.parse_args(argv)
  if args.cpu_devices:
    # Before anything asks for a device: the backend reads it once.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.multihost:
    # Only on a cluster: it waits for every process to join.
    jax.distributed.initialize()

  # Auto axes: XLA's partitioner chooses the shardings of the intermediates.
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))  # examples split over data

  loss_fn = kronjax.losses.softmax_cross_entropy
  model = Mlp()
  tape_fn = kronjax.flax.value_grad_and_tape(model, loss_fn)
  # Each layer's refresh on one device; with --shard-factors the factors
  # are stored split by rows over "data" too.
  placement = kronjax.Placement(mesh, "data", sharded=args.shard_factors)
  tx = kronjax.kfac(loss=loss_fn, inverse_every=5, placement=placement)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
  params = jax.device_put(params, replicated)
  opt_state = jax.jit(tx.init)(params)  # on the mesh, laid out by the optimizer

  @jax.jit
  def train_step(params, opt_state, x, y, rng):
    loss, grads, tape = tape_fn(params, x, y, rng)
    updates, opt_state = tx.update(
        grads, opt_state, params, curvature=kronjax.fisher_blocks(tape),
        output_fn=lambda p: model.apply({"params": p}, x), targets=y)
    return optax.apply_updates(params, updates), opt_state, loss

  per_host = args.batch // jax.process_count()
  for step in range(args.steps):
    # Each host gives its rows; the global array spans every device.
    x, y = (jax.make_array_from_process_local_data(batch_sharding, a)
            for a in local_batch(step, per_host))
    params, opt_state, loss = train_step(params, opt_state, x, y,
                                         jax.random.key(step))
    if step % 10 == 0 or step == args.steps - 1:
      print(f"step {step:3d}  loss {float(loss):.4f}")
  if jax.process_index() == 0:
    print(f"{jax.device_count()} devices, {jax.process_count()} process(es); "
          f"batch {args.batch} split as {x.sharding.spec}, "
          f"{train_step._cache_size()} compilation(s); placed refreshes, "
          f"sharded factors: {args.shard_factors}")


if __name__ == "__main__":
  main()
