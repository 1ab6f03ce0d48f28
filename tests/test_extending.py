"""Extending the code as a fork would: hooks (their order, what they may read,
their end when start-up fails), another optimizer in `optimizer.py`, and a new
metric in `metrics.py` that reaches every output by name."""

import contextlib
import dataclasses
import io
import json
import os
import signal
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clu import metrics as clu_metrics

import ckpt_util
from conftest import read_events
from conftest import tiny_config_for
from mnist_jax import checkpointing
from mnist_jax import metrics as metrics_lib
from mnist_jax import optimizer
from mnist_jax import train
from mnist_jax.errors import ConfigError
from mnist_jax.hooks import base
from mnist_jax.hooks import checkpoint
from mnist_jax.hooks import report as report_hook
from mnist_jax.hooks import summaries


class _Probe(base.Hook):
  """Logs its calls; optionally fails at start."""

  def __init__(self, name, log, order=50, fail=False):
    self.name, self.log, self.order, self.fail = name, log, order, fail
    self.run = None
    self.run_is_frozen = None
    self.handlers = None

  def on_train_start(self, run, state):
    self.log.append(('start', self.name))
    self.run = run
    self.handlers = [signal.getsignal(s) for s in train.STOP_SIGNALS]
    try:
      run.total_steps = 1
      self.run_is_frozen = False
    except dataclasses.FrozenInstanceError:
      self.run_is_frozen = True
    if self.fail:
      raise RuntimeError(f'{self.name} failed to start')

  def on_train_end(self, run, step, state, result):
    self.log.append(('end', self.name, result is None))


def _traced(hook_cls, name, log):
  """A subclass of a real hook that logs its start and end."""

  class Traced(hook_cls):

    def on_train_start(self, run, state):
      log.append(('start', name))
      return super().on_train_start(run, state)

    def on_train_end(self, run, step, state, result):
      log.append(('end', name, result is None))
      return super().on_train_end(run, step, state, result)

  return Traced


# ------------------------------------------------------------ a new metric

@flax.struct.dataclass
class _Std(clu_metrics.Std):
  """clu's `Std`, whose `compute` calls `jnp.clip(a_min=...)`, which jax 0.10
  no longer accepts (clu 0.0.12)."""

  def compute(self):
    mean = self.total / self.count
    return jnp.sqrt(jnp.maximum(self.sum_of_squares / self.count - mean**2,
                                0.0))


# metrics.py's collections with one line added to each (clu collects the
# metrics from the class's own annotations, so a fork edits the class).
@flax.struct.dataclass
class _TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')
  accuracy: clu_metrics.Accuracy
  learning_rate: clu_metrics.LastValue.from_output('learning_rate')
  loss_std: _Std.from_output('loss')


@flax.struct.dataclass
class _EvalMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')
  accuracy: clu_metrics.Accuracy
  loss_std: _Std.from_output('loss')


def test_the_collections_above_extend_those_of_metrics_py():
  assert metrics_lib.names(_TrainMetrics) == (
      *metrics_lib.names(metrics_lib.TrainMetrics), 'loss_std')
  assert metrics_lib.names(_EvalMetrics) == (
      *metrics_lib.names(metrics_lib.EvalMetrics), 'loss_std')


@pytest.fixture(scope='module')
def metric_run(idx_dir, tmp_path_factory):
  """A 10-step run with `loss_std` added to both collections in metrics.py,
  with the report and summary hooks listed in the wrong order, and probes."""
  config = tiny_config_for(idx_dir)
  config.num_epochs = 1
  config.num_train_steps = 10
  workdir = str(tmp_path_factory.mktemp('metric_run'))
  log = []
  probes = [_Probe('first', log, order=-1), _Probe('tie_a', log),
            _Probe('tie_b', log)]
  hooks = [_traced(report_hook.ReportHook, 'report', log)(),
           probes[1],
           _traced(summaries.SummaryHook, 'summary', log)(print_overview=False),
           probes[2], probes[0]]
  stdout = io.StringIO()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(metrics_lib, 'TrainMetrics', _TrainMetrics)
    mp.setattr(metrics_lib, 'EvalMetrics', _EvalMetrics)
    with contextlib.redirect_stdout(stdout):
      result = train.train_and_evaluate(config, workdir, hooks=hooks)
  return types.SimpleNamespace(workdir=workdir, result=result, log=log,
                               probes=probes, stdout=stdout.getvalue())


def test_added_metric_reaches_json_events_epoch_line_and_report(metric_run):
  with open(os.path.join(metric_run.workdir, 'metrics.json')) as f:
    saved = json.load(f)
  [record] = saved['epochs']
  for key in ('train_loss_std', 'validation_loss_std', 'test_loss_std'):
    assert record[key] > 0, key
  assert saved['final']['test_loss_std'] == record['test_loss_std']
  train_events = read_events(os.path.join(metric_run.workdir, 'train'))
  eval_events = read_events(os.path.join(metric_run.workdir, 'eval'))
  assert sorted(train_events['loss_std']) == [5, 10]  # log_every_steps=5
  assert eval_events['loss_std'][10][1] == pytest.approx(
      record['test_loss_std'], rel=1e-6)
  assert eval_events['validation_loss_std'][10][1] == pytest.approx(
      record['validation_loss_std'], rel=1e-6)
  [line] = [l for l in metric_run.stdout.splitlines()
            if l.startswith('Epoch ')]
  shown = {k: metrics_lib.format_value(k, record[k]) for k in record
           if k.endswith('loss_std')}
  assert (f" loss_std {shown['train_loss_std']} | validation loss " in line
          and f" loss_std {shown['validation_loss_std']} | test loss " in line
          and f" loss_std {shown['test_loss_std']} | " in line), line
  with open(os.path.join(metric_run.workdir, 'report', 'report.md')) as f:
    assert f"| test_loss_std | {shown['test_loss_std']} |" in f.read()


def test_hooks_run_in_ascending_order_ties_in_list_order(metric_run):
  starts = [e[1] for e in metric_run.log if e[0] == 'start']
  ends = [e[1] for e in metric_run.log if e[0] == 'end']
  # Listed report, tie_a, summary, tie_b, first.
  assert starts == ['first', 'summary', 'report', 'tie_a', 'tie_b']
  assert ends == starts  # the report ends after the summaries are closed
  assert not any(e[2] for e in metric_run.log if e[0] == 'end')  # a result


def test_hooks_read_a_frozen_run(metric_run):
  for probe in metric_run.probes:
    assert isinstance(probe.run, base.Run)
    assert probe.run_is_frozen
  assert metric_run.result['step'] == 10


def test_a_failing_start_ends_every_started_hook(tiny_config, tmp_path):
  log = []
  before = [signal.getsignal(s) for s in train.STOP_SIGNALS]
  assert signal.SIGTERM in train.STOP_SIGNALS
  ckpt = _traced(checkpoint.CheckpointHook, 'checkpoint', log)()
  early = _Probe('early', log, order=5)
  hooks = [_Probe('late', log, order=60), _Probe('failing', log, order=20,
                                                   fail=True), ckpt, early]
  with pytest.raises(RuntimeError, match='failing failed to start'):
    train.train_and_evaluate(tiny_config, str(tmp_path), hooks=hooks)
  assert log == [('start', 'checkpoint'), ('start', 'early'),
                 ('start', 'failing'), ('end', 'checkpoint', True),
                 ('end', 'early', True), ('end', 'failing', True)]
  assert ckpt.manager is None  # closed
  # The loop's SIGTERM (and SIGINT) handlers were in place during start-up,
  # and the previous ones are back.
  assert all(h is not b for h, b in zip(early.handlers, before))
  assert [signal.getsignal(s) for s in train.STOP_SIGNALS] == before


# --------------------------------------------------------- another optimizer

class _Losses(base.Hook):

  def __init__(self):
    self.losses = []

  def on_metrics(self, run, first_step, metrics):
    self.losses += list(np.asarray(metrics.loss.total / metrics.loss.count))


def _sgd_momentum(config, learning_rate):
  """What a fork writes into `optimizer.create_optimizer`."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay,
                                mask=optimizer.kernel_mask),
      optax.sgd(learning_rate, momentum=config.momentum))


def test_another_optax_optimizer_trains_and_resumes_only_unchanged(
    tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(optimizer, 'create_optimizer', _sgd_momentum)
  tiny_config.momentum = 0.9  # the new optimizer's new config field
  tiny_config.initial_learning_rate = 0.02
  tiny_config.num_train_steps = 12
  workdir = str(tmp_path)
  losses = _Losses()
  ckpt_util.run(tiny_config, workdir, extra_hooks=[losses])
  assert len(losses.losses) == 12
  assert np.mean(losses.losses[-4:]) < 0.9 * np.mean(losses.losses[:4]), (
      losses.losses)
  # The checkpoint holds SGD's momentum, not Adam's moments.
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(workdir), read_only=True)
  meta = manager.item_metadata(12)['state'].tree['opt_state']
  manager.close()
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(meta)[0]]
  assert sum("['trace']" in p for p in paths) == 8, paths  # one per param
  assert not any("['mu']" in p or "['nu']" in p for p in paths), paths
  # A changed value of the new field is another run: resuming is refused.
  longer = tiny_config.copy_and_resolve_references()
  longer.num_train_steps = 18
  longer.momentum = 0.5
  with pytest.raises(ConfigError, match=r'momentum=0.9 \(checkpoint\) vs 0.5'):
    ckpt_util.run(longer, workdir)
  assert ckpt_util.steps(workdir) == [10, 12]
  # The same value resumes (onto the state of SGD with momentum).
  longer.momentum = 0.9
  result = ckpt_util.run(longer, workdir)
  assert result['step'] == 18 and ckpt_util.steps(workdir) == [10, 12, 18]
