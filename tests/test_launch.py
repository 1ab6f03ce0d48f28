"""launch.py end to end, in a subprocess, with command-line overrides."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mnist_jax import evaluate
from mnist_jax import train
from mnist_jax.hooks import base


def _launch(args, timeout=240):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'),
                         *args], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=timeout)


def test_launch_trains_with_overrides(idx_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _launch([
      '--config', os.path.join(ROOT, 'configs/default.py'),
      '--workdir', workdir, '--config.data.source=idx',
      f'--config.data.dir={idx_dir}', '--config.data.num_validation=100',
      '--config.batch_size=32', '--config.eval_batch_size=50',
      '--config.num_epochs=2', '--config.num_train_steps=30',
      '--config.initial_learning_rate=0.002'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert 'Epoch   1 step     18' in out and 'Epoch   2 step     30' in out
  final = [l for l in out.splitlines() if l.startswith('Final test accuracy:')]
  assert len(final) == 1 and final[0].endswith('%')
  with open(os.path.join(workdir, 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['config']['batch_size'] == 32
  assert metrics['config']['initial_learning_rate'] == 0.002
  assert metrics['step'] == 30 and len(metrics['epochs']) == 2
  acc = metrics['final']['test_accuracy']
  assert final[0] == f'Final test accuracy: {acc:.2%}'
  assert acc > 0.5  # the generated digits are easy


def test_launch_bad_config_is_one_clear_line(tmp_path):
  proc = _launch(['--config', os.path.join(ROOT, 'configs/default.py'),
                  '--workdir', str(tmp_path / 'x'), '--config.batch_size=0'])
  assert proc.returncode == 2
  assert 'Error: config.batch_size=0: must be a positive integer' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_launch_missing_data_is_one_clear_line(tmp_path):
  proc = _launch(['--config', os.path.join(ROOT, 'configs/default.py'),
                  '--workdir', str(tmp_path / 'x'), '--config.data.source=idx',
                  f'--config.data.dir={tmp_path}/nowhere'])
  assert proc.returncode == 2
  assert 'Error: IDX file' in proc.stderr and 'Traceback' not in proc.stderr


class _EvalCounts(base.Hook):
  """Records how many examples each evaluation split counts."""

  def on_train_end(self, run, step, state, result):
    self.counts = {name: int(run.eval_fn(state.variables, split).accuracy.count)
                   for name, split in run.eval_splits.items()}
    self.num_train = len(run.data.train)


def test_train_and_evaluate_on_tfds_mock_data(tiny_config, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  tiny_config.data.source = 'tfds'
  tiny_config.data.dir = ''  # (the mock ignores it; not the IDX folder)
  tiny_config.data.num_validation = 40
  tiny_config.data.cache_dir = 'none'
  tiny_config.num_epochs = 1
  tiny_config.num_train_steps = 4
  counts = _EvalCounts()
  with tfds.testing.mock_data(num_examples=200):
    result = train.train_and_evaluate(tiny_config, str(tmp_path),
                                      hooks=[counts])
  assert result['step'] == 4
  # The mock's 200 train images: 40 validate, 160 train; its 200 test
  # images are each counted once (eval batches of 64 are padded).
  assert counts.num_train == 160
  assert counts.counts == {'validation': 40, 'test': 200}
  test_correct = result['final']['test_accuracy'] * 200
  assert test_correct == pytest.approx(round(test_correct), abs=1e-3)
  with open(os.path.join(str(tmp_path), 'metrics.json')) as f:
    assert json.load(f)['final'] == result['final']


def test_mode_config_lists_every_field_as_the_run_would_use_it(tmp_path):
  workdir = tmp_path / 'never'
  proc = _launch(['--config', os.path.join(ROOT, 'configs/tpu.py'),
                  '--workdir', str(workdir), '--config.seed=3',
                  '--config.data.dir=/data', '--mode', 'config'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].endswith('configs/tpu.py as a run uses it (* = set on the '
                           'command line):')
  fields = [l[2:].split(' = ')[0] for l in lines[1:]]
  from configs import tpu  # pylint: disable=g-import-not-at-top
  config = tpu.get_config()
  expected = [k for k, v in config.items() if not hasattr(v, 'keys')]
  expected += [f'{k}.{f}' for k, v in config.items() if hasattr(v, 'keys')
               for f in v]
  assert sorted(fields) == sorted(expected)  # Each once.
  assert fields[0] == 'data.source'  # The base file's order.
  by_field = dict(zip(fields, lines[1:]))
  assert by_field['seed'].startswith('* seed = 3 ')
  assert by_field['data.dir'].startswith("* data.dir = '/data' ")
  assert by_field['data.name'].startswith("  data.name = 'mnist' ")
  assert "'fashion_mnist'" in by_field['data.name']
  # Comments: the base config's (default.py), unless tpu.py has its own.
  assert by_field['batch_size'].startswith('  batch_size = 512 ')
  assert by_field['batch_size'].endswith('Global training batch size.')
  assert by_field['data.download'].endswith(
      "'false': never (offline/TPU). [tpu.py: Prepared once in the bucket "
      "(docs/scaling.md); hosts never download.]")
  assert not workdir.exists()  # Nothing started, nothing written.
  # `--mode config | head -0`: its reader gone before it prints (it takes
  # ~1 s to start): no traceback, no warning.
  head = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
       os.path.join(ROOT, 'configs/default.py'), '--mode', 'config'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  head.stdout.close()
  assert head.communicate(timeout=60)[1] == '' and head.returncode == 0
  proc = _launch(['--config', os.path.join(ROOT, 'configs/default.py'),
                  '--config.batch_size=0', '--mode', 'config'])
  assert proc.returncode == 2
  assert proc.stderr.strip() == ('Error: config.batch_size=0: must be a '
                                 'positive integer.')


def test_num_validation_0_trains_on_every_training_image(tiny_config,
                                                         tmp_path, capsys):
  """As the tutorial's `read_data_sets(validation_size=0)`: no validation
  set; the epochs evaluate the test set, and so does `--mode eval`."""
  tiny_config.data.num_validation = 0
  tiny_config.num_epochs, tiny_config.num_train_steps = 1, 5
  tiny_config.write_report = False
  workdir = str(tmp_path)
  counts = _EvalCounts()
  result = train.train_and_evaluate(
      tiny_config, workdir, hooks=train.default_hooks(tiny_config) + [counts])
  out = capsys.readouterr().out
  assert 'Epoch   1 step      5: train' in out
  assert 'validation' not in out
  assert counts.num_train == 700 and counts.counts == {'test': 230}
  assert set(result['final']) == {'test_loss', 'test_accuracy'}
  record = evaluate.evaluate_checkpoint(tiny_config, workdir)
  assert record['test_accuracy'] == result['final']['test_accuracy']
  assert 'validation_accuracy' not in record
  assert (f"Final test accuracy: {record['test_accuracy']:.2%}"
          in capsys.readouterr().out)
