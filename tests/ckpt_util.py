"""Helpers shared by the checkpoint tests (in-process and subprocess)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from configs import default
from conftest import ROOT
from conftest import tiny_config_for
from mnist_jax import checkpointing
from mnist_jax import parallel
from mnist_jax import steps as steps_lib
from mnist_jax import train
from mnist_jax.hooks import checkpoint


def run(config, workdir, extra_hooks=(), **kwargs):
  """train_and_evaluate with the checkpoint hook only (no summaries/report)."""
  hooks = [checkpoint.CheckpointHook(), *extra_hooks]
  return train.train_and_evaluate(config, workdir, hooks=hooks, **kwargs)


def fresh_state(run):
  """A freshly initialised train state of `run`, on its devices."""
  return parallel.put_replicated(steps_lib.create_train_state(
      run.config, run.model, len(run.data.train), run.rngs['init']), run.mesh)


def start(config, workdir):
  """Runs only the restore-or-init step of a run; returns (state, run)."""
  run = train.setup(config, workdir)
  state = fresh_state(run)
  hook = checkpoint.CheckpointHook()
  try:
    update = hook.on_train_start(run, state)
  finally:
    hook.on_train_end(run, -1, state, None)
  return (state if update is None or update.state is None
          else update.state), run


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
    _, variables, _ = checkpointing.restore_variables(
        manager, {'params': abstract}, step)
  finally:
    manager.close()
  return jax.tree.map(np.asarray, variables['params'])


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


def flags_for(config, prefix='config'):
  """--config.x=v flags for every field where `config` differs from default."""
  base = default.get_config()
  out = []

  def walk(node, ref, path):
    for key, value in node.items():
      if hasattr(value, 'items'):
        walk(value, ref[key], f'{path}.{key}')
      elif key not in ref or ref[key] != value:
        out.append(f'--{path}.{key}={value}')
  walk(config, base, prefix)
  return out


def launch(workdir, config, *extra, fault=None, devices=1,
           lean=False, timeout=240):
  """Runs `launch.py` (or, lean, tests/ckpt_driver.py) in a new process."""
  env = dict(os.environ)
  env.pop(checkpoint._FAULT_ENV, None)  # pylint: disable=protected-access
  if fault:
    env[checkpoint._FAULT_ENV] = fault  # pylint: disable=protected-access
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={devices}')
  # The project's persistent compilation cache (train.setup turns it on)
  # is shared by the processes: only the first one compiles.
  env['JAX_PLATFORMS'] = 'cpu'
  if lean:
    cmd = [sys.executable, os.path.join(ROOT, 'tests', 'ckpt_driver.py'),
           workdir, json.dumps(config.to_dict()), *extra]
  else:
    flags = flags_for(config)
    if 'write_report' in default.get_config():
      flags.append('--config.write_report=False')  # not what is tested here
    cmd = [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
           os.path.join(ROOT, 'configs', 'default.py'), '--workdir', workdir,
           *flags, *extra]
  return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, check=False)


def reference_run(tmp_path_factory, idx_dir):
  """An uninterrupted 2-epoch tiny run (36 steps, saves at 10, 20, 30, 36).

  Built once per session (both checkpoint test modules use it): returns
  (config, workdir, result, final params).
  """
  config = tiny_config_for(idx_dir)
  workdir = str(tmp_path_factory.getbasetemp() / 'ckpt_reference')
  done = os.path.join(workdir, 'result.json')
  if not os.path.exists(done):
    # In a process of its own, like the fault tests' processes.
    shutil.rmtree(workdir, ignore_errors=True)
    p = launch(workdir, config, lean=True)
    assert p.returncode == 0, p.stderr[-3000:]
    os.rename(os.path.join(workdir, 'metrics.json'), done)
  with open(done) as f:
    result = json.load(f)
  return config, workdir, result, saved_params(workdir)
