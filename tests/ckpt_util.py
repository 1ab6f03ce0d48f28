"""Helpers shared by the checkpoint tests (in-process and subprocess)."""

import json
import os
import shutil

import jax
import numpy as np

from mnist_jax import checkpointing
from mnist_jax import train


def run(config, workdir, extra_hooks=(), before=()):
  """train_and_evaluate with the checkpoint hook only (no summaries/report)."""
  hooks = [*before, checkpointing.CheckpointHook(config), *extra_hooks]
  return train.train_and_evaluate(config, workdir, hooks=hooks)


def steps(workdir):
  d = checkpointing.checkpoint_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def saved_params(workdir, step=None):
  """Parameters of a checkpoint as host numpy arrays (bitwise comparable)."""
  manager = checkpointing.create_manager(checkpointing.checkpoint_dir(workdir),
                                         read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    meta = manager.item_metadata(step)['state'].tree['params']
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        meta)
    _, params, _ = checkpointing.restore_params(manager, abstract, step)
  finally:
    manager.close()
  return jax.tree.map(np.asarray, params)


def assert_bitwise_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


def copy_steps(src_workdir, dst_workdir, keep):
  """Copies only the given checkpoint steps (40 MB each) to a new workdir."""
  src = checkpointing.checkpoint_dir(src_workdir)
  dst = checkpointing.checkpoint_dir(dst_workdir)
  os.makedirs(dst)
  for step in keep:
    shutil.copytree(os.path.join(src, str(step)), os.path.join(dst, str(step)))


def reference_run(tmp_path_factory, idx_dir):
  """An uninterrupted 2-epoch tiny run (36 steps, saves at 10, 20, 30, 36).

  Built once per session (both checkpoint test modules use it): returns
  (config, workdir, result, final params).
  """
  from conftest import tiny_config_for  # pylint: disable=g-import-not-at-top
  config = tiny_config_for(idx_dir)
  workdir = str(tmp_path_factory.getbasetemp() / 'ckpt_reference')
  done = os.path.join(workdir, 'result.json')
  if not os.path.exists(done):
    shutil.rmtree(workdir, ignore_errors=True)
    result = run(config, workdir)
    with open(done, 'w') as f:
      json.dump(result, f)
  with open(done) as f:
    result = json.load(f)
  return config, workdir, result, saved_params(workdir)
