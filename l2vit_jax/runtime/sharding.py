"""Device mesh and batch placement: data parallel over every device of every process, no pmap.

Parameters are replicated (``P()``); batches are split along the ``data`` axis. A ``model`` axis of
size 1 is kept in the mesh so parameters can later be sharded FSDP-style without changing callers.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(devices=None) -> Mesh:
  """A (data=all devices, model=1) mesh over ``devices`` (default: every device of every process).

  ``devices`` may also be the devices of a compile-only topology (``scripts/compile_tpu.py``).
  """
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: XLA's partitioner propagates shardings through the model (jax.make_mesh now defaults
  # to Explicit axes, which would demand sharding annotations on every op that mixes arrays).
  return jax.make_mesh(
    (len(devices), 1), (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
  )


def mesh_platform(mesh: Mesh) -> str:
  """The platform ('cpu', 'gpu', 'tpu') the mesh's devices are, which is what steps compile for."""
  return mesh.devices.flat[0].platform


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Per-process batch size; the global batch must split evenly over processes and devices."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(
      f"batch size {global_batch_size} does not divide over {devices} devices; use a multiple of {devices}"
    )
  return global_batch_size // jax.process_count()


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global array sharded along ``data``."""
  sharding = batch_sharding(mesh)
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for key, value in local_batch.items()
  }


def replicate(tree, mesh: Mesh):
  """Places a host-identical pytree on every device of every process (``device_put`` cannot span
  processes); PRNG key leaves travel as their raw key data."""
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(put, tree)


def to_host(array: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array on every process."""
  if array.is_fully_addressable:
    return np.asarray(array)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return np.asarray(multihost_utils.process_allgather(array, tiled=True))
