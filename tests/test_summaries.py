"""One tiny training run with the default hooks, then its event files,
printed overview, progress lines, profile and report are read back. Plus unit
tests of the default hook list, the training-scalar windows, the layer
statistics and process-0 writing.
"""

import contextlib
import glob
import io
import json
import os
import re
import subprocess
import sys
import threading
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest

from conftest import ROOT
from conftest import read_events
from conftest import stacked_train_metrics
from conftest import tiny_config_for
from mnist_jax import input_pipeline
from mnist_jax import models
from mnist_jax import report
from mnist_jax import train
from mnist_jax.hooks import checkpoint
from mnist_jax.hooks import progress
from mnist_jax.hooks import report as report_hook
from mnist_jax.hooks import summaries

# tiny_config: 600 training images / batch 32 = 18 steps per epoch, 2 epochs.
SPE, TOTAL = 18, 36


@pytest.fixture(scope='module')
def run(idx_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('default_hooks_run'))
  config = tiny_config_for(idx_dir)
  config.profile_steps = 2
  config.checkpoint_every_steps = 100  # Fewer saves: faster (the end saves).
  stdout, stderr = io.StringIO(), io.StringIO()  # Not terminals.
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    result = train.train_and_evaluate(config, workdir)  # default hooks
  return types.SimpleNamespace(
      workdir=workdir, config=config, result=result,
      stdout=stdout.getvalue(), stderr=stderr.getvalue(),
      train=read_events(os.path.join(workdir, 'train')),
      eval=read_events(os.path.join(workdir, 'eval')))


def test_default_hooks_follow_the_config(tiny_config):
  kinds = lambda: [type(h) for h in train.default_hooks(tiny_config)]  # pylint: disable=g-long-lambda
  tiny_config.profile_steps = 0
  tiny_config.write_report = False
  assert kinds() == [checkpoint.CheckpointHook, summaries.SummaryHook,
                     progress.ProgressHook]
  tiny_config.profile_steps = 2
  tiny_config.write_report = True
  assert kinds() == [checkpoint.CheckpointHook, summaries.SummaryHook,
                     progress.ProgressHook, progress.ProfileHook,
                     report_hook.ReportHook]


def test_training_scalars_every_log_every_steps(run):
  want = sorted(set(range(5, TOTAL + 1, 5)) | {TOTAL})
  for tag in ('loss', 'accuracy', 'learning_rate'):
    assert sorted(run.train[tag]) == want, tag
    assert all(p == 'scalars' for p, _ in run.train[tag].values())
  assert run.train['learning_rate'][5][1] == pytest.approx(0.001)
  # Epoch 2 (steps 19..36) is after one decay period: 0.001 * 0.95.
  assert run.train['learning_rate'][TOTAL][1] == pytest.approx(0.00095)
  assert run.train['loss'][TOTAL][1] < run.train['loss'][5][1]


def test_eval_scalars_test_as_train_tags_validation_prefixed(run):
  epochs = {r['step']: r for r in run.result['epochs']}
  assert sorted(epochs) == [SPE, TOTAL]
  for tag, key in (('loss', 'test_loss'), ('accuracy', 'test_accuracy'),
                   ('validation_loss', 'validation_loss'),
                   ('validation_accuracy', 'validation_accuracy')):
    assert sorted(run.eval[tag]) == [SPE, TOTAL], tag
    for step, r in epochs.items():
      assert run.eval[tag][step][1] == pytest.approx(r[key], rel=1e-5), tag
  assert 'learning_rate' not in run.eval


def test_sparsity_per_end_point_train_and_test(run):
  for events in (run.train, run.eval):
    for name in models.END_POINTS:
      assert sorted(events[f'sparsity/{name}']) == [SPE, TOTAL]
    for step in (SPE, TOTAL):
      # ReLU layers have zeros; fc4 (the logits) is linear and has none.
      assert events['sparsity/conv1'][step][1] > 0.05
      assert events['sparsity/fc4'][step][1] == 0
  for step in (SPE, TOTAL):
    # Train batch runs with dropout: dropout3 has more zeros than fc3 ...
    assert (run.train['sparsity/dropout3'][step][1]
            > run.train['sparsity/fc3'][step][1])
    # ... the test batch without: dropout3 is fc3.
    assert (run.eval['sparsity/dropout3'][step][1]
            == pytest.approx(run.eval['sparsity/fc3'][step][1]))


def test_histograms_images_hparams(run):
  for name in models.END_POINTS:
    steps = run.train[f'activations/{name}']
    assert sorted(steps) == [SPE, TOTAL]
    assert {p for p, _ in steps.values()} == {'histograms'}
  images = run.train['images']
  assert sorted(images) == [SPE, TOTAL]
  plugin, value = images[SPE]
  assert plugin == 'images'
  assert len(value) == 2 + 3  # width, height, then three encoded PNGs.
  hparams = [t for t, s in run.train.items()
             if any(p == 'hparams' for p, _ in s.values())]
  assert hparams


def test_parameter_overview_printed(run):
  assert 'fc3/kernel' in run.stdout
  assert 'Total: 3,274,634' in run.stdout


def test_plain_progress_lines_when_not_a_terminal(run):
  lines = [l for l in run.stderr.splitlines() if l.startswith('Epoch ')]
  steps = [int(l.split()[3].split('/')[0]) for l in lines]
  # Epoch 1's first dispatch (compilation) only starts the clock.
  assert steps == [5, 10, 15, 20, 25, 30, 35, 36]
  assert all('img/s' in l and 'ETA' in l and 'loss' in l for l in lines)
  assert '\r' not in run.stderr


def test_profile_trace_in_workdir(run):
  traces = glob.glob(os.path.join(run.workdir, 'plugins', 'profile', '*',
                                  '*.xplane.pb'))
  assert traces


def test_report_written_after_training(run):
  out = os.path.join(run.workdir, 'report')
  for name in ('learning_curves.png', 'confusion_matrix.png',
               'misclassified.png', 'report.md'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  # The curves read the event files: one train point per log_every_steps.
  curves = report.learning_curves(run.workdir, None)
  assert list(curves['train']['loss'][0]) == [5, 10, 15, 20, 25, 30, 35, 36]
  assert list(curves['test']['accuracy'][0]) == [SPE, TOTAL]
  assert list(curves['validation']['loss'][0]) == [SPE, TOTAL]
  with open(os.path.join(run.workdir, 'metrics.json')) as f:
    assert json.load(f)['step'] == TOTAL


# ------------------------------------------------------------- unit tests

class RecordingWriter:
  """Stands in for a clu writer; records write_scalars calls."""

  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, scalars))


def test_training_scalars_average_the_window_across_dispatches():
  hook = summaries.SummaryHook()
  hook.train_writer = RecordingWriter()
  run = types.SimpleNamespace(config=types.SimpleNamespace(log_every_steps=4),
                              total_steps=10)
  losses = np.arange(1.0, 11.0)  # Step s has loss s.
  lrs = losses / 100
  # Dispatches of 3 steps: windows straddle them.
  for first in (0, 3, 6, 9):
    hook.on_metrics(run, first, stacked_train_metrics(
        losses[first:first + 3], lrs[first:first + 3]))
  hook.wait()  # the writes happen on the hook's background thread
  steps = [s for s, _ in hook.train_writer.scalars]
  assert steps == [4, 8, 10]
  got = dict(hook.train_writer.scalars)
  assert got[4]['loss'] == pytest.approx(2.5)  # mean of 1..4
  assert got[8]['loss'] == pytest.approx(6.5)  # mean of 5..8
  assert got[10]['loss'] == pytest.approx(9.5)
  assert got[8]['learning_rate'] == pytest.approx(0.08)  # the last step's
  assert got[4]['accuracy'] == pytest.approx(0.5)


def test_a_stop_writes_the_steps_since_the_last_write():
  """A resumed run's first window starts after the stop: the steps before
  it are written at the stop, not lost or averaged into the next window."""
  hook = summaries.SummaryHook()
  hook.train_writer = RecordingWriter()
  run = types.SimpleNamespace(config=types.SimpleNamespace(log_every_steps=4),
                              total_steps=10)
  losses = np.arange(1.0, 7.0)
  hook.on_metrics(run, 0, stacked_train_metrics(losses, losses / 100))
  hook.on_stop(run, 6, None, 'SIGINT')
  hook.on_stop(run, 6, None, 'SIGINT')  # nothing left: nothing written
  hook.wait()
  got = dict(hook.train_writer.scalars)
  assert sorted(got) == [4, 6]
  assert got[6]['loss'] == pytest.approx(5.5)  # mean of steps 5, 6


def test_layer_stats_cover_the_end_points_a_changed_model_sows():
  """A layer added, renamed or removed in models.py is summarised as the
  model sows it; nothing lists the layers a second time."""

  class Changed(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
      hidden = nn.relu(nn.Dense(8, name='dense')(x.reshape(len(x), -1)))
      logits = nn.Dense(3, name='out')(hidden)
      self.sow('intermediates', 'end_points', {'hidden': hidden,
                                               'logits': logits})
      return logits

  model = Changed()
  images = conftest.make_digits(4, 0)[0][..., None]
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                         train=False)
  stats = summaries.make_layer_stats_fn(model, max_histogram_values=10)(
      {'params': variables['params']}, images, images, jax.random.key(1))
  for key in ('train_sparsity', 'test_sparsity', 'histograms'):
    assert list(stats[key]) == ['hidden', 'logits'], key


def test_epoch_summaries_are_written_beside_the_loop(tmp_path, tiny_config):
  """on_epoch_end only dispatches the statistics: fetching and writing them
  happen on the hook's thread, after the parameters may be donated."""
  run = train.setup(tiny_config, str(tmp_path))
  params = models.init_params(run.model, jax.random.key(0))
  hook = summaries.SummaryHook(print_overview=False)
  hook.on_train_start(run, types.SimpleNamespace(params=params))
  release, threads = threading.Event(), set()

  class BlockingWriter:
    def __getattr__(self, name):
      def write(*args, **kwargs):
        threads.add(threading.current_thread())
        assert release.wait(30)
      return write

  hook.train_writer = hook.eval_writer = BlockingWriter()
  record = {'test_accuracy': 0.5, 'validation_accuracy': 0.5}
  try:
    hook.on_epoch_end(run, 1, 10, types.SimpleNamespace(
        params=params, variables={'params': params}), record)  # returns while the writer blocks
    for x in jax.tree.leaves(params):
      x.delete()  # what donation to the next step does
    release.set()
    hook.wait()
  finally:
    release.set()
  assert threads and threading.main_thread() not in threads


def test_only_process_zero_writes_event_files(tmp_path, monkeypatch,
                                              tiny_config):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  run = types.SimpleNamespace(workdir=str(tmp_path), config=tiny_config,
                              model=models.create_model(tiny_config))
  hook = summaries.SummaryHook(print_overview=False)
  hook.on_train_start(run, types.SimpleNamespace(params={}))
  hook.train_writer.write_scalars(1, {'loss': 1.0})
  hook.on_train_end(run, 1, None, None)
  assert not glob.glob(str(tmp_path / '**' / 'events.out.tfevents.*'),
                       recursive=True)
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  hook.on_train_start(run, types.SimpleNamespace(params={}))
  hook.train_writer.write_scalars(1, {'loss': 1.0})
  hook.on_train_end(run, 1, None, None)  # Flushes and closes.
  assert read_events(str(tmp_path / 'train'))['loss'][1][1] == 1.0


def test_layer_stats_count_zeros_of_each_end_point(tiny_config):
  """Sparsity is the fraction of exact zeros; the test batch runs without
  dropout, so its statistics equal a plain forward pass."""
  model = models.create_model(tiny_config)
  params = models.init_params(model, jax.random.key(0))
  test = input_pipeline.load(tiny_config).test.images[:16]
  stats = summaries.make_layer_stats_fn(model, max_histogram_values=100)(
      {'params': params}, test, test, jax.random.key(1))
  _, points = models.end_points(model, {'params': params},
                                input_pipeline.normalize(test), train=False)
  for name in models.END_POINTS:
    want = float(np.mean(np.asarray(points[name]) == 0))
    assert float(stats['test_sparsity'][name]) == pytest.approx(want), name
    assert stats['histograms'][name].shape == (
        min(100, points[name].size),), name
  assert float(stats['train_sparsity']['dropout3']) > float(
      stats['test_sparsity']['dropout3'])


def test_launch_predict_restores_the_run_and_names_bad_files(run, tmp_path):
  """`launch.py --mode predict --image a b ...` on the trained run's workdir."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  good = np.zeros((56, 40), np.uint8)
  good[8:48, 16:22] = 255  # a '1', white on black
  Image.fromarray(good).save(tmp_path / 'one.png')
  Image.fromarray(255 - good).convert('RGB').save(tmp_path / 'inked.jpg')
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG garbage')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'),
       '--config', os.path.join(ROOT, 'configs', 'default.py'),
       '--workdir', run.workdir, '--mode', 'predict',
       '--image', str(tmp_path / 'one.png'), str(tmp_path / 'broken.png'),
       str(tmp_path / 'inked.jpg')],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 2, proc.stderr[-2000:]
  out = proc.stdout
  assert f'step {TOTAL}' in out
  for name in ('one.png', 'inked.jpg'):
    line = [l for l in out.splitlines() if l.startswith(str(tmp_path / name))]
    assert len(line) == 1 and re.search(r': \d  \(top 3: \d: [\d.]+%, '
                                        r'\d: [\d.]+%, \d: [\d.]+%\)$',
                                        line[0]), out
  assert f'Error: {tmp_path / "broken.png"}: cannot read image' in proc.stderr


def test_launch_eval_takes_the_runs_config_and_keeps_its_report(run):
  """`--mode eval` with only the config file evaluates the run as trained
  (its data source, split and model from its checkpoint, not the file's
  defaults), and the checkpoint's report goes to eval/report, leaving the
  training run's report as it was. On 3 devices, which neither the training
  batch (32) nor the evaluation batch (64) divides by."""
  with open(os.path.join(run.workdir, 'report', 'report.md')) as f:
    train_report = f.read()
  command = [sys.executable, os.path.join(ROOT, 'launch.py'),
             '--config', os.path.join(ROOT, 'configs', 'default.py'),
             '--workdir', run.workdir, '--mode', 'eval']
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=3')
  proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                        cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  final = run.result['final']
  assert (f'Final test accuracy: {final["test_accuracy"]:.2%}'
          in proc.stdout), proc.stdout
  with open(os.path.join(run.workdir, 'eval', 'metrics.json')) as f:
    record = json.load(f)
  assert record['step'] == TOTAL and record['devices'].startswith('3 x ')
  for key in ('validation_loss', 'validation_accuracy', 'test_loss'):
    assert record[key] == pytest.approx(final[key], rel=1e-5), key
  with open(os.path.join(run.workdir, 'eval', 'report', 'report.md')) as f:
    text = f.read()
  assert f'Evaluated the checkpoint at step {TOTAL}.' in text
  assert 'source: idx' in text and 'batch_size: 32' in text
  with open(os.path.join(run.workdir, 'report', 'report.md')) as f:
    assert f.read() == train_report
  # (The command line's overrides win: test_checkpointing's run_config test.)
