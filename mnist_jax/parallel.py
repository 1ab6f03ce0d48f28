"""Multi-device and multi-host plumbing: start-up, the mesh, global arrays.

Training is one jitted program over a mesh of all devices of all processes
with a 'data' axis (see `steps.make_train_fn`). Every process loads the same
host data and hands JAX only the rows its own devices hold; only the lead
process (0) prints and writes files.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from absl import logging
import jax
import numpy as np

from mnist_jax.errors import ConfigError


# ------------------------------------------------------------------ start-up

def _on_cloud_tpu_vm() -> bool:
  # TPU chips (/dev/accel* on v2-v4, /dev/vfio/<n> on v5e and later) *and*
  # libtpu: libtpu alone (on a laptop) must not make a run wait for a GCE
  # metadata server.
  chips = glob.glob('/dev/accel*') + glob.glob('/dev/vfio/[0-9]*')
  return bool(chips) and importlib.util.find_spec('libtpu') is not None


def distributed_args(config) -> dict | None:
  """The arguments for `jax.distributed.initialize`, or None to skip it.

  `config.distributed.initialize`: 'auto' initialises when a coordinator is
  given (`config.distributed.coordinator_address` or JAX_COORDINATOR_ADDRESS)
  or on a Cloud TPU VM; 'yes' always (JAX auto-detects TPU VMs, SLURM, ...);
  'no' never. The process count and id come from the config, else from
  JAX_NUM_PROCESSES / JAX_PROCESS_ID, else from JAX's auto-detection.
  """
  dist = config.distributed
  address = (dist.coordinator_address
             or os.environ.get('JAX_COORDINATOR_ADDRESS', ''))
  if dist.initialize == 'no' or (dist.initialize == 'auto' and not address
                                 and not _on_cloud_tpu_vm()):
    return None

  def from_config_or_env(value, unset, env):
    if value == unset and os.environ.get(env):
      try:
        value = int(os.environ[env])
      except ValueError:
        raise ConfigError(f'{env}={os.environ[env]!r} is not an integer.'
                          ) from None
    return None if value == unset else value

  n = from_config_or_env(dist.num_processes, 0, 'JAX_NUM_PROCESSES')
  i = from_config_or_env(dist.process_id, -1, 'JAX_PROCESS_ID')
  if n is not None and (n < 1 or (i is not None and not 0 <= i < n)):
    raise ConfigError(f'distributed: process id {i} of {n} processes; the id '
                      f'must be in 0..{n - 1} and the count >= 1.')
  if address and (n is None or i is None):
    raise ConfigError(
        f'distributed: coordinator {address} given, but the process count '
        'and id are not: set config.distributed.num_processes/process_id or '
        'JAX_NUM_PROCESSES/JAX_PROCESS_ID.')
  return {'coordinator_address': address or None, 'num_processes': n,
          'process_id': i}


def initialize_distributed(config) -> bool:
  """Runs `jax.distributed.initialize` if the config/environment asks for it.

  Must be called before any JAX computation (and before `jax.devices()`).
  Returns whether it initialised. Processes other than 0 then log warnings
  and errors only.
  """
  args = distributed_args(config)
  if args is None:
    return False
  jax.distributed.initialize(**args)
  if not is_lead():
    logging.set_verbosity(logging.WARNING)
  logging.info('jax.distributed: process %d of %d, %d local / %d devices',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_lead() -> bool:
  """True on the process that prints, logs and writes files (process 0)."""
  return jax.process_index() == 0


def say(message: str, file=None) -> None:
  """Prints a line on the lead process only."""
  if is_lead():
    print(message, file=file or sys.stdout, flush=True)


# ---------------------------------------------------------- mesh and arrays

def create_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the given) devices with a 'data' axis.

  `jax.make_mesh` orders the devices for the interconnect (on TPU slices the
  gradient all-reduce then runs over neighbouring chips).
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def process_local_data(host_array: np.ndarray, sharding) -> np.ndarray:
  """The part of a host array that this process's devices hold under
  `sharding` (along each dimension, the indices any local shard covers)."""
  shape = host_array.shape
  index_map = sharding.addressable_devices_indices_map(shape)
  local = host_array
  for dim in range(len(shape)):
    rows = set()
    for index in index_map.values():
      rows.update(range(*index[dim].indices(shape[dim])))
    if len(rows) < shape[dim]:
      local = np.take(local, sorted(rows), axis=dim)
  return local


def global_array(host_array: np.ndarray, sharding) -> jax.Array:
  """A global array from the host copy that every process holds; each
  process passes only its own rows. One process: a plain `device_put`."""
  host_array = np.asarray(host_array)
  return jax.make_array_from_process_local_data(
      sharding, process_local_data(host_array, sharding), host_array.shape)


def put_replicated(tree, mesh):
  """Places host arrays (or a pytree of them) on every device of `mesh`."""
  sharding = jax.NamedSharding(mesh, jax.P())
  return jax.tree.map(lambda x: global_array(x, sharding), tree)


def put_sharded_batches(tree, mesh):
  """Places [num_batches, batch, ...] host arrays with each batch sharded
  along 'data' (the padded evaluation splits)."""
  sharding = jax.NamedSharding(mesh, jax.P(None, 'data'))
  return jax.tree.map(lambda x: global_array(x, sharding), tree)


def prefetch_to_host(tree):
  """Starts copying `tree`'s arrays to the host (`copy_to_host_async`) and
  returns it. The fetch is then asked for before work dispatched later: on
  an H100, the loop's fetch of an epoch's metrics, asked for after the next
  epoch's steps were dispatched, returned only near their end."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and (leaf.is_fully_replicated
                                        or leaf.is_fully_addressable):
      leaf.copy_to_host_async()
  return tree
