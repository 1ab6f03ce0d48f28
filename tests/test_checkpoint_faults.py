"""Checkpoint faults with real processes: SIGKILL at three moments, SIGTERM
pre-emption, and restoring across device counts (8 forced CPU devices <-> 1).

Kill points are driven deterministically by the test-only environment
variable MNIST_JAX_TEST_FAULT (see hooks/checkpoint.py): the process kills
itself at an exact step and phase.
"""

import json
import os
import re
import signal

import jax
import numpy as np
import pytest

import ckpt_util
from launch import EXIT_PREEMPTED
from mnist_jax import checkpointing
from mnist_jax import evaluate
from mnist_jax import parallel
from mnist_jax import steps
from mnist_jax import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def reference(tmp_path_factory, idx_dir):
  return ckpt_util.reference_run(tmp_path_factory, idx_dir)


def _partial_saves(workdir):
  d = checkpointing.checkpoint_dir(workdir)
  return [n for n in os.listdir(d) if not n.isdigit() and 'tmp' in n]


def test_kills_and_preemption_resume_exactly(reference, tmp_path,
                                             capsys):
  config, _, _, ref_params = reference
  workdir = str(tmp_path / 'w')

  def launch(fault, expected_rc):
    # SIGKILLs in lean processes; the pre-emption through launch.py itself.
    p = ckpt_util.launch(workdir, config, fault=fault,
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
  info = ckpt_util.launch(workdir, config, '--mode=info')
  assert info.returncode == 0, info.stderr[-3000:]
  assert re.search(r'^\s+10 .* periodic ', info.stdout, re.M), info.stdout
  assert 'Incomplete saves (ignored): 20.' in info.stdout
  # 3. SIGKILL right after the save of step 30 completed; the partial step
  # 20 was not picked up (resumed from 10) and is saved again.
  out = launch('kill_after_save:30', -signal.SIGKILL)
  assert 'Resuming from step 10' in out
  assert ckpt_util.steps(workdir) == [10, 20, 30]
  # 4. SIGTERM (pre-emption) at step 33: save there, say so, exit 143.
  out = launch('term:33', EXIT_PREEMPTED)
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


def test_checkpoints_move_between_device_counts(reference,
                                                tmp_path, capsys):
  assert jax.device_count() != 8  # the in-process side is the "other" machine
  config, ref_workdir, ref_result, _ = reference
  # Saved on 1 device, evaluated on 8, through `launch.py --mode eval`.
  p = ckpt_util.launch(ref_workdir, config, '--mode=eval', devices=8)
  assert p.returncode == 0, p.stderr[-3000:]
  assert _accuracy(p.stdout) == round(
      100 * ref_result['final']['test_accuracy'], 2)
  with open(os.path.join(ref_workdir, 'eval', 'metrics.json')) as f:
    on_eight = json.load(f)
  assert on_eight['devices'] == '8 x cpu'
  for key in ('validation_loss', 'test_loss'):  # summed in another order
    assert on_eight[key] == pytest.approx(ref_result['final'][key], rel=1e-4)
  # Saved by 8 devices, restored and evaluated here on 1: the freshly
  # initialised state (deterministic from the seed), so that the restored
  # parameters can be compared bitwise with this process's own.
  workdir = str(tmp_path / 'eight')
  p = ckpt_util.launch(workdir, config, 'save_init', devices=8,
                       lean=True)
  assert p.returncode == 0, p.stderr[-3000:]
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(workdir), read_only=True)
  saved_on = manager.item_metadata(0)['state'].tree['params']['fc3']['kernel']
  manager.close()
  assert len(saved_on.sharding.device_mesh.mesh) == 8
  record = evaluate.evaluate_checkpoint(config, workdir)
  assert record['step'] == 0
  assert record['devices'].startswith(f'{jax.device_count()} x')
  run = train.setup(config, workdir)
  init = steps.create_train_state(config, run.model, len(run.data.train),
                                  run.rngs['init'])
  ckpt_util.assert_bitwise_equal(ckpt_util.saved_params(workdir, 0),
                                 jax.tree.map(np.asarray, init.params))
  for name, split in run.eval_splits.items():
    want = steps.evaluate(run.eval_fn, parallel.put_replicated(
        init.variables, run.mesh), split)
    assert record[f'{name}_accuracy'] == want['accuracy']
    assert record[f'{name}_loss'] == want['loss']
