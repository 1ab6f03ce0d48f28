"""Scaling out: multi-host start-up, global arrays, and the pmap option.

The default (`config.parallelism = 'jit'`) needs nothing from this module but
`global_array`: `train.make_train_fn` jits the step over a mesh of *all*
devices, of all processes, with a 'data' axis. How the pieces fit:

* Start-up. `initialize_distributed(config)` runs `jax.distributed.initialize`
  before anything touches a JAX backend (launch.py calls it first). After it,
  `jax.devices()` lists every process's devices and one jitted program runs
  on all of them (SPMD: every process runs the same Python).
* Data. Every process loads MNIST into host memory (55 MB; the same bytes
  everywhere) and `global_array` hands JAX only the rows its own devices hold
  (`jax.make_array_from_process_local_data`): the training set is replicated,
  so that is all of it, once, at start; the padded evaluation splits are
  sharded along 'data', so each process passes its columns of every batch.
  Each training step then gathers its global batch on the devices from the
  epoch's permutation, which every process computes identically from
  (seed, epoch); the batch indices are sharded along 'data', so each device,
  and hence each process, gathers only its own share of every global batch.
  There are no per-step host reads to split between processes.
* Results. Parameters, optimizer state and metrics are replicated, so every
  process holds them; only process 0 prints, logs, writes summaries, metrics
  and reports; orbax saves and restores collectively (every process calls it).

`config.parallelism = 'pmap'` selects `make_pmap_train_fn`: the classic
`jax.pmap` with an axis name, around the *same* `train.make_steps_fn` (and
so the same `train.train_step`, which then `pmean`s the gradients and
all-gathers the metrics). In jax >= 0.8, pmap is itself built on jit +
shard_map, so it is an option for users who know it, not a faster path.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from mnist_jax import config_lib
from mnist_jax import train
from mnist_jax.errors import ConfigError

PARALLELISMS = config_lib.PARALLELISMS
PMAP_AXIS = 'batch'


# ------------------------------------------------------------------ start-up

def _on_cloud_tpu_vm() -> bool:
  # A TPU VM has TPU chips (/dev/accel* on v2-v4, /dev/vfio/<n> on v5e and
  # later) and libtpu (the `jax[tpu]` extra); there JAX finds the
  # coordinator, process count and id itself (GCE metadata). Both are
  # required: libtpu alone (installed on a laptop) must not make a run wait
  # for a metadata server.
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
  dist = config.get('distributed')
  if dist is None:
    return None
  mode = dist.get('initialize', 'auto')
  if mode not in ('auto', 'yes', 'no'):
    raise ConfigError(f"config.distributed.initialize={mode!r}: use 'auto', "
                      "'yes' or 'no'.")
  address = (dist.get('coordinator_address', '')
             or os.environ.get('JAX_COORDINATOR_ADDRESS', ''))
  if mode == 'no' or (mode == 'auto' and not address
                      and not _on_cloud_tpu_vm()):
    return None

  def from_env(field, env, unset):
    value = dist.get(field, unset)
    if value == unset and os.environ.get(env):
      try:
        value = int(os.environ[env])
      except ValueError:
        raise ConfigError(f'{env}={os.environ[env]!r} is not an integer.'
                          ) from None
    return None if value == unset else value

  args = {'coordinator_address': address or None,
          'num_processes': from_env('num_processes', 'JAX_NUM_PROCESSES', 0),
          'process_id': from_env('process_id', 'JAX_PROCESS_ID', -1)}
  n, i = args['num_processes'], args['process_id']
  if n is not None and (n < 1 or (i is not None and not 0 <= i < n)):
    raise ConfigError(f'distributed: process id {i} of {n} processes; the id '
                      f'must be in 0..{n - 1} and the count >= 1.')
  if address and (n is None or i is None):
    raise ConfigError(
        f'distributed: coordinator {address} given, but the process count '
        'and id are not: set config.distributed.num_processes/process_id or '
        'JAX_NUM_PROCESSES/JAX_PROCESS_ID.')
  return args


def initialize_distributed(config) -> bool:
  """Runs `jax.distributed.initialize` if the config/environment asks for it.

  Must be called before any JAX computation (and before `jax.devices()`).
  Returns whether it initialised. Also makes processes other than 0 quiet:
  their absl logs show warnings and errors only.
  """
  args = distributed_args(config)
  if args is None:
    return False
  jax.distributed.initialize(**args)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('jax.distributed: process %d of %d, %d local / %d devices',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_lead() -> bool:
  """True on the process that prints, logs and writes files (process 0)."""
  return jax.process_index() == 0


# -------------------------------------------------------------- global data

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


# ---------------------------------------------------------------- pmap path

def make_pmap_train_fn(config, learning_rate_fn, num_train: int, mesh):
  """The classic pmap path (`config.parallelism = 'pmap'`), a thin wrapper.

  Same signature and results as `train.make_train_fn`: `train_fn(state,
  data, perm, rng, num_steps)`. The body is `train.make_steps_fn` with
  `axis_name`: each device gathers its own `batch_size / devices` rows of the
  global batch, `train.train_step` `pmean`s the gradients and all-gathers
  the metrics over the axis.

  Replicate/unreplicate at the edges of each dispatch: the state is
  replicated along a leading device axis (`in_axes=0`, as pmap wants; the
  copies are broadcast on the devices from the copy each already holds, not
  sent from the host), the dataset, permutation and key enter unmapped
  (`in_axes=None`), and the state and metrics leave unreplicated
  (`out_axes=None`: one copy, valid because after the `pmean` every device
  computed the same update). So the loop, the hooks and the checkpoints see
  the same state as on the jit path. The extra on-device copy of the state
  per dispatch is the price of the option; `steps_per_dispatch` amortises it.

  Dropout differs from the jit path: each device draws a mask for its local
  share from the step's key folded with its device index (independent across
  devices), while the jit path draws one mask for the global batch. With
  `dropout_keep_prob = 1` both paths compute the same function.
  """
  devices = list(mesh.devices.flat)
  n = len(devices)
  steps_fn = train.make_steps_fn(config, learning_rate_fn, num_train,
                                 axis_name=PMAP_AXIS, num_shards=n)
  pmapped = jax.pmap(
      steps_fn, axis_name=PMAP_AXIS, in_axes=(0, None, None, None),
      out_axes=(None, None), static_broadcasted_argnums=4, devices=devices,
      donate_argnums=0)
  replicate = jax.jit(
      lambda tree: jax.tree.map(
          lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree),
      out_shardings=jax.NamedSharding(mesh, jax.P('data')))

  def train_fn(state, data, perm, rng, num_steps: int):
    out = pmapped(replicate(state), data, perm, rng, num_steps)
    if jax.process_count() > 1:
      # Multi-host pmap returns host-local arrays; the replicated values are
      # the same on every host, so they re-wrap as global arrays (no copy).
      out = multihost_utils.host_local_array_to_global_array(
          out, mesh, jax.P())
    return out

  return train_fn


def select_train_fn(config, learning_rate_fn, num_train: int, mesh):
  """`train.make_train_fn` or `make_pmap_train_fn`, by `config.parallelism`."""
  parallelism = config.get('parallelism', 'jit')
  if parallelism not in PARALLELISMS:
    raise ConfigError(f'config.parallelism={parallelism!r}: use one of '
                      f'{PARALLELISMS}.')
  make = (make_pmap_train_fn if parallelism == 'pmap'
          else train.make_train_fn)
  return make(config, learning_rate_fn, num_train, mesh)
