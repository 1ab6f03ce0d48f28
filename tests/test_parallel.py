"""Scaling out, tested on this CPU.

One device is the reference. Fresh processes (tests/parallel_worker.py) run
the same short training on 8 forced host devices (jit mesh and pmap paths)
and as 2 jax.distributed processes on localhost (2 devices each, gloo CPU
collectives), which also write a checkpoint, resume it, and leave it for a
1-process evaluation here. Every subprocess runs in its own process group
with a hard timeout; on timeout the whole group is killed.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tpu
from mnist_jax import config_lib
from mnist_jax import evaluate
from mnist_jax import models
from mnist_jax import parallel
from mnist_jax.errors import ConfigError

import conftest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'parallel_worker.py')
TIMEOUT_S = 240
STEPS = 6  # short runs: 6 steps of 32 images, then evaluation


def _env(num_devices, **extra):
  env = dict(os.environ, XLA_FLAGS=(
      f'--xla_force_host_platform_device_count={num_devices}'),
             JAX_PLATFORMS='cpu', **extra)
  for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
              'JAX_PROCESS_ID'):
    if key not in extra:
      env.pop(key, None)
  return env


def _run_workers(tmp, name, runs, envs):
  """Starts one worker per env (together), waits with a hard timeout and
  returns [(results, output)], one per worker."""
  spec = os.path.join(tmp, f'{name}.json')
  with open(spec, 'w') as f:
    json.dump({'idx_dir': runs[0].pop('idx_dir'), 'runs': runs}, f)
  procs = []
  for i, env in enumerate(envs):
    out = os.path.join(tmp, f'{name}_out{i}.json')
    procs.append((out, subprocess.Popen(
        [sys.executable, WORKER, spec, out], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)))
  results = []
  try:
    for out, proc in procs:
      try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        pytest.fail(f'worker {name} hung for {TIMEOUT_S}s; killed')
      assert proc.returncode == 0, output[-3000:]
      with open(out) as f:
        results.append((json.load(f), output))
  finally:
    for _, proc in procs:  # kill whatever is left, with its children
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  return results


def _runs(idx_dir, tmp, *runs):
  return [dict(r, workdir=os.path.join(tmp, r['name']),
               **({'idx_dir': idx_dir} if i == 0 else {}))
          for i, r in enumerate(runs)]


@pytest.fixture(scope='module')
def one_device(idx_dir, tmp_path_factory):
  """The reference: the same runs on 1 device."""
  tmp = str(tmp_path_factory.mktemp('one_device'))
  runs = _runs(idx_dir, tmp,
               {'name': 'jit', 'overrides': {'num_train_steps': STEPS}},
               {'name': 'nodrop', 'overrides': {'num_train_steps': STEPS,
                                                'dropout_keep_prob': 1.0}},
               {'name': 'jit_bf16', 'overrides': {
                   'num_train_steps': STEPS, 'dtype': 'bfloat16'}},
               {'name': 'jit_bn', 'overrides': {
                   'num_train_steps': STEPS, 'batch_norm': True,
                   'augment_shift': 2}})
  [(results, _)] = _run_workers(tmp, 'one', runs, [_env(1)])
  assert results['jit']['devices'] == 1
  return results


@pytest.fixture(scope='module')
def eight_devices(idx_dir, tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp('eight_devices'))
  runs = _runs(idx_dir, tmp,
               {'name': 'jit', 'overrides': {'num_train_steps': STEPS}},
               {'name': 'pmap', 'overrides': {
                   'num_train_steps': STEPS, 'dropout_keep_prob': 1.0,
                   'parallelism': 'pmap', 'steps_per_dispatch': 3,
                   # Not a multiple of 8: rounded up to 64, padding masked.
                   'eval_batch_size': 60}},
               {'name': 'pmap_bf16', 'overrides': {
                   'num_train_steps': STEPS, 'dtype': 'bfloat16',
                   'parallelism': 'pmap', 'steps_per_dispatch': 3}},
               {'name': 'jit_bn', 'overrides': {
                   'num_train_steps': STEPS, 'batch_norm': True,
                   'augment_shift': 2}})
  [(results, _)] = _run_workers(tmp, 'eight', runs, [_env(8)])
  assert results['jit']['devices'] == 8
  return results


def _assert_same_run(got, want, rtol=1e-4):
  """Same per-step losses to float tolerance, same final metrics."""
  np.testing.assert_allclose(got['losses'], want['losses'], rtol=rtol)
  assert got['step'] == want['step'] == STEPS
  for key, value in want['final'].items():
    if key.endswith('accuracy'):
      assert abs(got['final'][key] - value) <= 0.001, key
    else:
      np.testing.assert_allclose(got['final'][key], value, rtol=rtol)
  assert got['eval_counts'] == {'validation': 100, 'test': 230}


def test_jit_mesh_on_8_devices_equals_1_device_with_dropout(
    one_device, eight_devices):
  # Dropout masks of the sharded global batch equal the unsharded ones only
  # with partitionable threefry (jax's default since 0.5).
  assert jax.config.jax_threefry_partitionable
  _assert_same_run(eight_devices['jit'], one_device['jit'])


def test_batch_norm_and_augmentation_on_a_mesh_equal_1_device(
    one_device, eight_devices):
  """On the jit path BatchNorm's batch statistics are the global batch's
  (XLA reduces across the shards) and the augmentation's offsets the global
  batch's: 8 devices train as 1 does."""
  _assert_same_run(eight_devices['jit_bn'], one_device['jit_bn'])
  assert not np.allclose(one_device['jit_bn']['losses'],
                         one_device['jit']['losses'], rtol=1e-4)


def test_jit_compiles_ahead_of_the_clock_pmap_at_first_use(eight_devices):
  """The jit mesh path compiles every dispatch length before the first
  epoch and records how long; pmap (no `lower`) compiles at first use and
  records nothing rather than a made-up 0."""
  assert eight_devices['jit']['compile_seconds'] > 0
  assert eight_devices['pmap']['compile_seconds'] is None


def test_pmap_on_8_devices_equals_1_device(one_device, eight_devices):
  # Without dropout: pmap's per-device masks are independent draws, not
  # slices of the global mask (see steps.make_train_fn).
  _assert_same_run(eight_devices['pmap'], one_device['nodrop'])
  # And it is not the dropout run: the comparison above can tell them apart.
  assert not np.allclose(eight_devices['pmap']['losses'],
                         one_device['jit']['losses'], rtol=1e-4)


@pytest.mark.parametrize('run', ['one:jit_bf16', 'eight:pmap_bf16'])
def test_bfloat16_trains_with_float32_params_and_optimizer_state(
    run, one_device, eight_devices):
  where, name = run.split(':')
  result = (one_device if where == 'one' else eight_devices)[name]
  losses = result['losses']
  assert losses[-1] < 0.5 * losses[0], losses
  assert result['param_dtypes'] == ['float32']
  assert result['float_state_dtypes'] == ['float32']
  # bfloat16 activations give a (slightly) different trajectory than f32.
  assert not np.allclose(losses, one_device['jit']['losses'], rtol=1e-5)


def test_bfloat16_activations_and_float32_params():
  config = conftest.default.get_config()
  config.dtype = 'bfloat16'
  model = models.create_model(config)
  images = jax.ShapeDtypeStruct((2, 28, 28, 1), np.float32)
  params = models.abstract_variables(model)['params']
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {'float32'}
  logits, points = jax.eval_shape(
      lambda p, x: models.end_points(model, {'params': p}, x), params, images)
  assert {str(v.dtype) for v in points.values()} == {'bfloat16'}
  assert str(logits.dtype) == 'float32'


# ------------------------------------------------------------- multi-host

def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _two_processes(idx_dir, tmp, name, runs):
  port = _free_port()
  envs = [_env(2, JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i))
          for i in range(2)]
  return _run_workers(tmp, name, _runs(idx_dir, tmp, *runs), envs)


@pytest.fixture(scope='module')
def two_processes(idx_dir, tmp_path_factory):
  """2 processes x 2 devices: train 3 steps (checkpoint), stop; a second
  pair of processes resumes to step 6, then runs the pmap path; returns both
  phases and the workdir."""
  tmp = str(tmp_path_factory.mktemp('two_processes'))
  run = {'name': 'run', 'checkpoint': True, 'overrides': {
      'num_train_steps': STEPS // 2, 'checkpoint_every_steps': STEPS // 2}}
  first = _two_processes(idx_dir, tmp, 'first', [run])
  run['overrides']['num_train_steps'] = STEPS
  pmap = {'name': 'pmap', 'overrides': {
      'num_train_steps': STEPS, 'dropout_keep_prob': 1.0,
      'parallelism': 'pmap', 'steps_per_dispatch': 3}}
  second = _two_processes(idx_dir, tmp, 'second', [run, pmap])
  return first, second, os.path.join(tmp, 'run')


def test_two_processes_match_one_process_and_resume(one_device,
                                                    two_processes):
  first, second, _ = two_processes
  for phase in (first, second):
    assert [r['run']['process'] for r, _ in phase] == [0, 1]
    assert all(r['run']['processes'] == 2 and r['run']['devices'] == 4
               for r, _ in phase)
  (lead, lead_out), (other, other_out) = second
  assert 'Resuming from step 3' in lead_out
  # One run, interrupted and resumed in 2 processes, equals 1 device.
  resumed = dict(lead['run'], losses=first[0][0]['run']['losses']
                 + lead['run']['losses'])
  _assert_same_run(resumed, one_device['jit'])
  assert other['run']['losses'] == lead['run']['losses']  # same global run
  # Only process 0 reports.
  assert 'Final test accuracy' in lead_out and 'Epoch' in lead_out
  assert 'Final test accuracy' not in other_out and 'Epoch' not in other_out


def test_pmap_in_two_processes_matches_one_process(one_device,
                                                   two_processes):
  for result, _ in two_processes[1]:
    assert result['pmap']['devices'] == 4
    _assert_same_run(result['pmap'], one_device['nodrop'])


def test_each_process_gathers_only_its_share_of_the_global_batch(
    two_processes):
  (p0, _), (p1, _) = two_processes[1]
  rows0, rows1 = p0['run']['local_rows'], p1['run']['local_rows']
  batch = rows0['global_batch']
  assert batch == rows1['global_batch']  # the same global permutation
  assert rows0['rows'] == batch[:16] and rows1['rows'] == batch[16:]


def test_checkpoint_of_two_processes_evaluates_in_one(two_processes, idx_dir):
  _, second, workdir = two_processes
  config = conftest.tiny_config_for(idx_dir)
  result = evaluate.evaluate_checkpoint(config, workdir)
  assert result['step'] == STEPS
  assert result['devices'] == f'{jax.device_count()} x cpu'
  want = second[0][0]['run']['final']
  for key in ('validation_loss', 'test_loss', 'test_accuracy'):
    np.testing.assert_allclose(result[key], want[key], rtol=1e-5)


# ------------------------------------------------------------ config, errors

def test_distributed_args_from_config_and_environment(tiny_config,
                                                      monkeypatch):
  for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
              'JAX_PROCESS_ID'):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setattr(parallel, '_on_cloud_tpu_vm', lambda: False)
  assert parallel.distributed_args(tiny_config) is None  # a laptop
  monkeypatch.setattr(parallel, '_on_cloud_tpu_vm', lambda: True)
  assert parallel.distributed_args(tiny_config) == {
      'coordinator_address': None, 'num_processes': None, 'process_id': None}
  monkeypatch.setattr(parallel, '_on_cloud_tpu_vm', lambda: False)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert parallel.distributed_args(tiny_config) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 4,
      'process_id': 3}
  tiny_config.distributed.process_id = 1  # the config wins
  assert parallel.distributed_args(tiny_config)['process_id'] == 1
  tiny_config.distributed.initialize = 'no'
  assert parallel.distributed_args(tiny_config) is None


@pytest.mark.parametrize('field,value,env,match', [
    ('process_id', 5, {'JAX_COORDINATOR_ADDRESS': 'h:1',
                       'JAX_NUM_PROCESSES': '2'}, 'must be in 0..1'),
    ('initialize', 'auto', {'JAX_COORDINATOR_ADDRESS': 'h:1'},
     'process count and id are not'),
    ('initialize', 'auto', {'JAX_COORDINATOR_ADDRESS': 'h:1',
                            'JAX_NUM_PROCESSES': 'two'}, 'not an integer'),
])
def test_bad_distributed_settings_are_one_line_errors(
    tiny_config, monkeypatch, field, value, env, match):
  for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
              'JAX_PROCESS_ID'):
    monkeypatch.delenv(key, raising=False)
  for key, v in env.items():
    monkeypatch.setenv(key, v)
  tiny_config.distributed[field] = value
  with pytest.raises(ConfigError, match=match):
    parallel.distributed_args(tiny_config)


def test_process_local_data_takes_only_the_local_rows():
  host = np.arange(24).reshape(2, 12)

  class TwoOfFourDevices:  # what process 1 of 2 sees: columns 6..11
    def addressable_devices_indices_map(self, shape):
      assert shape == (2, 12)
      return {'d2': (slice(None), slice(6, 9)),
              'd3': (slice(None), slice(9, 12))}

  np.testing.assert_array_equal(
      parallel.process_local_data(host, TwoOfFourDevices()), host[:, 6:])
  # One process holds every device: all of it, as one global array.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  sharding = jax.NamedSharding(mesh, jax.P(None, 'data'))
  np.testing.assert_array_equal(parallel.global_array(host, sharding), host)


# ----------------------------------------------------------- configs/tpu.py

def test_tpu_config():
  config = tpu.get_config()
  config_lib.validate(config)
  for devices in (4, 8):  # v4-8 (megacore) and v5e-8
    assert config.batch_size % devices == 0
    assert config.eval_batch_size % devices == 0
  assert config.steps_per_dispatch > 1
  assert config.checkpoint_every_steps % config.steps_per_dispatch == 0
  assert config.dtype == 'float32' and config.parallelism == 'jit'
  config = tpu.get_config('bucket=my-bucket,bf16')
  config_lib.validate(config)
  assert config.dtype == 'bfloat16'
  assert config.data.dir == 'gs://my-bucket/tensorflow_datasets'
  assert config.compilation_cache_dir == 'gs://my-bucket/jax_cache'
  with pytest.raises(ValueError, match='Unknown config argument'):
    tpu.get_config('v6e')


def test_launch_bad_distributed_setting_is_one_line_error(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(
      [sys.executable, os.path.join(root, 'launch.py'), '--config',
       os.path.join(root, 'configs/default.py'), '--workdir', str(tmp_path),
       '--config.distributed.initialize=maybe'],
      env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)
  try:
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == 2, err[-2000:]
  assert err.strip().splitlines()[-1].startswith(
      "Error: config.distributed.initialize='maybe'")
