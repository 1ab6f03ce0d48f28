"""Ctrl-C in a real `launch.py` process: it saves, says so, exits 130, and
the same command resumes; a second Ctrl-C aborts at once."""

import glob
import os
import signal
import subprocess
import sys

from tensorboard.backend.event_processing import event_file_loader

from conftest import ROOT
from conftest import tiny_config_for
from mnist_jax import checkpointing

import ckpt_util

EXIT_INTERRUPTED = 130


def _start(workdir, config, *extra):
  """launch.py in its own process, SIGINT not ignored (unlike `cmd &`)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  cmd = [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
         os.path.join(ROOT, 'configs', 'default.py'), '--workdir', workdir,
         *ckpt_util.flags_for(config), '--config.write_report=False', *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _interrupt_after_epoch(proc, epoch=1, again=False):
  """Sends SIGINT once an epoch's line is out and, with `again`, a second
  one as soon as the run says it is stopping; returns its output."""
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.startswith(f'Epoch {epoch:3d} '):
      proc.send_signal(signal.SIGINT)
    if again and line.startswith('SIGINT: stopping'):
      proc.send_signal(signal.SIGINT)
      break
  return ''.join(out) + proc.communicate(timeout=240)[0]


def _config(idx_dir):
  config = tiny_config_for(idx_dir)
  config.num_epochs = 40  # far longer than the test waits
  config.checkpoint_every_steps = 0  # saves at epoch ends only
  return config


def test_ctrl_c_saves_at_the_step_and_the_same_command_resumes(idx_dir,
                                                               tmp_path):
  workdir = str(tmp_path / 'run')
  config = _config(idx_dir)
  proc = _start(workdir, config)
  out = _interrupt_after_epoch(proc)
  assert proc.returncode == EXIT_INTERRUPTED
  assert 'Traceback' not in out, out[-3000:]
  lines = [l for l in out.splitlines() if l.startswith('Interrupted:')]
  assert len(lines) == 1, out
  step = int(lines[0].split('saved checkpoint at step ')[1].split(';')[0])
  assert lines[0] == (f'Interrupted: saved checkpoint at step {step}; run the '
                      'same command again to resume.')
  # Epoch 1 (18 steps) ended before the Ctrl-C: it stops there, or at the
  # end of a dispatch already in flight (an epoch end, once evaluated).
  assert step >= 18
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(workdir), read_only=True)
  assert step in manager.all_steps()
  # `--mode info` lists it as what it was, not as a pre-emption: an epoch
  # end's save (with its metrics), or the interrupt's own.
  assert checkpointing.restore_items(manager, step).run['reason'] == (
      'periodic' if step % 18 == 0 else 'interrupted')
  manager.close()

  resumed = _start(workdir, config, '--config.num_epochs=3')
  out = resumed.communicate(timeout=240)[0]
  assert resumed.returncode == 0, out[-3000:]
  assert f'Resuming from step {step}' in out
  assert 'Final test accuracy' in out
  # TensorBoard's HParams: the run's, once (not again by the resumption).
  tags = [v.tag for path in glob.glob(os.path.join(workdir, 'train',
                                                    'events.out.tfevents.*'))
          for event in event_file_loader.EventFileLoader(path).Load()
          for v in event.summary.value]
  assert tags.count('_hparams_/session_start_info') == 1


def test_second_ctrl_c_aborts_at_once_and_keeps_earlier_checkpoints(
    idx_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _start(workdir, _config(idx_dir))
  out = _interrupt_after_epoch(proc, epoch=2, again=True)
  assert proc.returncode == EXIT_INTERRUPTED
  assert 'SIGINT again: aborting now, without saving' in out
  assert 'Interrupted: saved' not in out
  assert 'Traceback' not in out, out[-3000:]
  # Epoch 1's save is there, and whatever is listed reads back: a save the
  # abort cut short is never picked up.
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(workdir), read_only=True)
  assert 18 in manager.all_steps() and set(manager.all_steps()) <= {18, 36}
  for step in manager.all_steps():
    checkpointing.restore_items(manager, step)
  manager.close()
