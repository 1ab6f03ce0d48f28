"""Checkpoint faults with real processes: SIGKILL at three moments, SIGTERM
pre-emption, and restoring across device counts (8 forced CPU devices <-> 1).

Kill points are driven deterministically by the test-only environment
variable MNIST_JAX_TEST_FAULT (see checkpointing._FAULT_ENV): the process
kills itself at an exact step and phase. Subprocesses share a persistent
compilation cache so that only the first one pays for XLA compilation.
"""

import json
import os
import re
import signal

import pytest

import ckpt_util
from conftest import tiny_config_for
from mnist_jax import checkpoint_tools
from mnist_jax import checkpointing

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def reference(tmp_path_factory, idx_dir):
  return ckpt_util.reference_run(tmp_path_factory, idx_dir)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """A persistent XLA cache shared by this module's processes."""
  return ckpt_util.xla_cache(tmp_path_factory)


def _partial_saves(workdir):
  d = checkpointing.checkpoint_dir(workdir)
  return [n for n in os.listdir(d) if not n.isdigit() and 'tmp' in n]


def test_kills_and_preemption_resume_exactly(reference, cache, tmp_path,
                                             capsys):
  config, _, _, ref_params = reference
  workdir = str(tmp_path / 'w')

  def launch(fault, expected_rc):
    # SIGKILLs in lean processes; the pre-emption through launch.py itself.
    p = ckpt_util.launch(cache, workdir, config, fault=fault,
                lean=not fault.startswith('term'))
    assert p.returncode == expected_rc, (fault, p.stdout, p.stderr[-3000:])
    return p.stdout

  # 1. SIGKILL during a step (dispatched, not finished) between saves.
  launch('kill_in_step:13', -signal.SIGKILL)
  assert ckpt_util.steps(workdir) == [10]
  # 2. SIGKILL while the asynchronous save of step 20 is being written.
  out = launch('kill_in_save:20', -signal.SIGKILL)
  assert 'Resuming from step 10' in out
  assert ckpt_util.steps(workdir) == [10]
  assert any(n.startswith('20') for n in _partial_saves(workdir))
  # 3. SIGKILL right after the save of step 30 completed; the partial step
  # 20 was not picked up (resumed from 10) and is saved again.
  out = launch('kill_after_save:30', -signal.SIGKILL)
  assert 'Resuming from step 10' in out
  assert ckpt_util.steps(workdir) == [10, 20, 30]
  # 4. SIGTERM (pre-emption) at step 33: save there, say so, exit 143.
  out = launch('term:33', checkpointing.EXIT_PREEMPTED)
  assert 'Resuming from step 30' in out
  assert 'Pre-empted (SIGTERM): saved checkpoint at step 33' in out
  assert ckpt_util.steps(workdir) == [10, 20, 30, 33]
  # 5. The same command finishes the run, bitwise as if never interrupted.
  capsys.readouterr()
  ckpt_util.run(config, workdir)
  assert 'Resuming from step 33' in capsys.readouterr().out
  assert ckpt_util.steps(workdir) == [10, 20, 30, 33, 36]
  ckpt_util.assert_bitwise_equal(ckpt_util.saved_params(workdir), ref_params)


def _accuracy(stdout):
  return float(re.search(r'Final test accuracy: ([\d.]+)%', stdout).group(1))


def test_checkpoints_move_between_device_counts(reference, idx_dir, cache,
                                                tmp_path, capsys):
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() != 8  # the in-process side is the "other" machine
  config, ref_workdir, ref_result, _ = reference
  # Saved on 1 device, evaluated on 8, through `launch.py --mode eval`.
  p = ckpt_util.launch(cache, ref_workdir, config, '--mode=eval', devices=8)
  assert p.returncode == 0, p.stderr[-3000:]
  assert _accuracy(p.stdout) == round(
      100 * ref_result['final']['test_accuracy'], 2)
  assert '8 x cpu' in open(os.path.join(ref_workdir, 'eval',
                                        'metrics.json')).read()
  # Trained and saved on 8 devices, evaluated here on 1.
  short = tiny_config_for(idx_dir)
  short.num_train_steps = 6
  short.checkpoint_every_steps = 3
  workdir = str(tmp_path / 'eight')
  p = ckpt_util.launch(cache, workdir, short, devices=8, lean=True)
  assert p.returncode == 0, p.stderr[-3000:]
  assert ckpt_util.steps(workdir) == [3, 6]
  with open(os.path.join(workdir, 'metrics.json')) as f:
    trained = json.load(f)['final']
  record = checkpoint_tools.evaluate_checkpoint(short, workdir)
  assert record['devices'].startswith(f'{jax.device_count()} x')
  assert record['test_accuracy'] == trained['test_accuracy']
  assert record['test_loss'] == pytest.approx(trained['test_loss'], rel=1e-4)
  assert record['validation_loss'] == pytest.approx(
      trained['validation_loss'], rel=1e-4)
