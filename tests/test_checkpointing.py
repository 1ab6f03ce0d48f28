"""Checkpoints in-process: saving, exact resume, config checks, fine-tuning,
evaluation, listing, corruption fall-back, non-finite states, stopping on
request, and checkpoints written by the code before the package was layered."""

import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import ckpt_util
import conftest
from configs import default as configs_default
from mnist_jax import checkpointing
from mnist_jax import evaluate
from mnist_jax import models
from mnist_jax import optimizer
from mnist_jax import predict
from mnist_jax import steps
from mnist_jax import train
from mnist_jax.errors import CheckpointError, ConfigError, NonFiniteLossError
from mnist_jax.hooks import base
from mnist_jax.hooks import checkpoint

LEGACY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             'data', 'config_d886839_tiny.json')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, idx_dir):
  return ckpt_util.reference_run(tmp_path_factory, idx_dir)


def test_saves_state_config_and_metrics(reference):
  config, workdir, result, _ = reference
  assert ckpt_util.steps(workdir) == [10, 20, 30, 36]
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(workdir), read_only=True)
  saved = checkpointing.restore_items(manager, 36)
  manager.close()
  assert saved.config == json.loads(json.dumps(config.to_dict()))
  assert saved.run['reason'] == 'final'
  assert saved.run['metrics']['test_accuracy'] == result['final'][
      'test_accuracy']
  assert [r['epoch'] for r in saved.run['history']] == [1, 2]


def test_resume_mid_epoch_is_bitwise_identical(reference, tmp_path, capsys):
  config, ref_workdir, ref_result, ref_params = reference
  workdir = str(tmp_path)
  # The reference's checkpoints up to step 30 (epoch 2 ends at 36), as if
  # it had been interrupted there.
  ckpt_util.copy_steps(ref_workdir, workdir, [10, 20, 30])
  resumed = config.copy_and_resolve_references()
  resumed.max_checkpoints_to_keep = 2
  resumed.num_epochs = 3  # duration may change: extend, then stop at 36
  resumed.num_train_steps = 36
  result = ckpt_util.run(resumed, workdir)
  assert 'Resuming from step 30' in capsys.readouterr().out
  assert ckpt_util.steps(workdir) == [30, 36]  # keep-N dropped 10 and 20
  ckpt_util.assert_bitwise_equal(ckpt_util.saved_params(workdir), ref_params)
  # metrics.json carries the epochs of both processes.
  assert [r['step'] for r in result['epochs']] == [18, 36]
  assert result['final'] == ref_result['final']
  # Epoch 2's training metrics cover steps 31-36, and it says so.
  assert 'resumed_at_step' not in result['epochs'][0]
  assert result['epochs'][1]['resumed_at_step'] == 30


def test_config_change_that_alters_the_run_is_refused(reference):
  config, workdir, _, _ = reference
  changed = config.copy_and_resolve_references()
  changed.batch_size = 64
  with pytest.raises(ConfigError, match=r'batch_size=32 \(checkpoint\) vs 64'):
    ckpt_util.run(changed, workdir)
  changed = config.copy_and_resolve_references()
  changed.parallelism = 'pmap'
  with pytest.raises(ConfigError, match=r"parallelism='jit' \(checkpoint\)"):
    ckpt_util.run(changed, workdir)


def test_resuming_with_another_dataset_is_refused(tiny_config):
  saved = checkpointing.config_json(tiny_config)
  tiny_config.data.name = 'fashion_mnist'
  with pytest.raises(ConfigError, match=r"data.name='mnist' \(checkpoint\) "
                     r"vs 'fashion_mnist' \(now\)"):
    checkpointing.check_same_run(saved, tiny_config, '/run/checkpoints')
  del saved['data']['name']  # a checkpoint from before `data.name`: MNIST
  with pytest.raises(ConfigError, match=r"data.name='mnist' \(checkpoint\)"):
    checkpointing.check_same_run(saved, tiny_config, '/run/checkpoints')
  tiny_config.data.name = 'mnist'
  checkpointing.check_same_run(saved, tiny_config, '/run/checkpoints')


def test_a_schedule_over_the_runs_length_refuses_a_longer_resume(
    reference, tmp_path, monkeypatch):
  """Extending a run is allowed (num_epochs may change), but not where the
  schedule is defined by its length: the learning rate would jump."""
  config, ref_workdir, _, _ = reference
  workdir = str(tmp_path)
  ckpt_util.copy_steps(ref_workdir, workdir, [10, 20])
  monkeypatch.setattr(
      optimizer, 'learning_rate_schedule',
      lambda c, n: optax.cosine_decay_schedule(c.initial_learning_rate,
                                               optimizer.total_steps(c, n)))
  longer = config.copy_and_resolve_references()
  longer.num_epochs = 4
  with pytest.raises(ConfigError, match=(
      r'learning-rate schedule differs from the one that wrote .* at step '
      r'20: 0\.0004132 \(checkpoint\) vs 0\.0008214 \(now\)')):
    ckpt_util.run(longer, workdir)
  assert ckpt_util.steps(workdir) == [10, 20]
  # The same length (or the tutorial's per-epoch decay, extended in
  # test_resume_mid_epoch_is_bitwise_identical) resumes.
  saved = json.loads(json.dumps(config.to_dict()))
  checkpointing.check_same_schedule(saved, config, 600, 20, workdir)


def test_a_changed_model_is_one_line_not_every_checkpoint_unreadable(
    reference, tmp_path, monkeypatch, capsys):
  """The same config over a model whose code changed (here: BatchNorm in
  place of conv1's and conv2's biases): one line naming the layers; no
  checkpoint is called unreadable, moved or deleted."""
  config, ref_workdir, _, _ = reference
  workdir = str(tmp_path)
  ckpt_util.copy_steps(ref_workdir, workdir, [10, 20])
  create = models.create_model
  monkeypatch.setattr(models, 'create_model', lambda c: create(
      c).clone(batch_norm=True))
  with pytest.raises(CheckpointError, match=(
      r'conv1/bias: checkpoint \(32,\) vs model absent.*The model changed '
      'since this run saved it.*Nothing was deleted')):
    ckpt_util.run(config, workdir)
  assert 'unreadable' not in capsys.readouterr().err
  assert ckpt_util.steps(workdir) == [10, 20]
  assert not os.path.exists(os.path.join(workdir, checkpointing.CORRUPT_DIR))


def test_fine_tuning_takes_params_only(reference, tmp_path, capsys):
  config, workdir, _, ref_params = reference
  tuned = config.copy_and_resolve_references()
  tuned.init_from = workdir
  tuned.initial_learning_rate = 1e-4  # a fine-tune may change anything
  state, _ = ckpt_util.start(tuned, str(tmp_path / 'a'))
  assert 'Fine-tuning: parameters from' in capsys.readouterr().out
  ckpt_util.assert_bitwise_equal(jax.tree.map(np.asarray, state.params),
                                 ref_params)
  assert int(state.step) == 0
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(
      state.opt_state))  # fresh Adam moments and counts
  # A step folder works too, and picks that step.
  tuned.init_from = os.path.join(workdir, 'checkpoints', '10')
  state, _ = ckpt_util.start(tuned, str(tmp_path / 'b'))
  ckpt_util.assert_bitwise_equal(jax.tree.map(np.asarray, state.params),
                                 ckpt_util.saved_params(workdir, 10))


def test_own_checkpoints_win_over_init_from(reference, tmp_path, capsys):
  config, workdir, _, ref_params = reference
  rerun = config.copy_and_resolve_references()
  rerun.init_from = str(tmp_path / 'missing')  # would raise if it were used
  state, _ = ckpt_util.start(rerun, workdir)
  out = capsys.readouterr().out
  assert 'Resuming from step 36' in out
  assert (f"config.init_from='{tmp_path / 'missing'}' is not used: a run "
          'takes it only when it starts from scratch') in out
  assert int(state.step) == 36
  ckpt_util.assert_bitwise_equal(jax.tree.map(np.asarray, state.params),
                                 ref_params)


def test_fine_tuning_errors(reference, tmp_path):
  config, workdir, _, _ = reference
  tuned = config.copy_and_resolve_references()
  tuned.init_from = workdir
  tuned.num_classes = 12  # (fewer than the labels 0-9 is a ConfigError)
  with pytest.raises(CheckpointError,
                     match=r'fc4/kernel: checkpoint \(1, 1, 1024, 10\) vs '
                     r'model \(1, 1, 1024, 12\).*num_classes'):
    ckpt_util.start(tuned, str(tmp_path / 'a'))
  tuned.num_classes = 10
  tuned.init_from = str(tmp_path / 'nothing')
  with pytest.raises(CheckpointError, match='no checkpoints'):
    ckpt_util.start(tuned, str(tmp_path / 'b'))


def test_eval_mode_and_info(reference, capsys):
  config, workdir, result, _ = reference
  record = evaluate.evaluate_checkpoint(config, workdir)
  assert record['step'] == 36
  out = capsys.readouterr().out
  acc = result['final']['test_accuracy']
  assert f'Final test accuracy: {acc:.2%}' in out
  for k, v in result['final'].items():
    assert record[k] == pytest.approx(v, rel=1e-6)
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    assert json.load(f) == record
  # The eval run writes the report too (confusion matrix, mistakes, numbers).
  with open(os.path.join(record['report'], 'report.md')) as f:
    assert f'{acc:.2%}' in f.read()
  assert os.path.getsize(os.path.join(record['report'], 'confusion_matrix.png'))
  at10 = config.copy_and_resolve_references()
  at10.eval_step = 10
  assert evaluate.evaluate_checkpoint(at10, workdir)['step'] == 10
  step, variables = predict.restore_variables(at10, workdir)  # --mode predict
  assert step == 10 and list(variables) == ['params']
  ckpt_util.assert_bitwise_equal(jax.tree.map(np.asarray, variables['params']),
                                 ckpt_util.saved_params(workdir, 10))
  at10.eval_step = 11
  with pytest.raises(CheckpointError,
                     match=r'no checkpoint for step 11.*\[10, 20, 30, 36\]'):
    evaluate.evaluate_checkpoint(at10, workdir)
  capsys.readouterr()
  evaluate.print_checkpoints(workdir)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith('4 checkpoint(s)')
  assert [int(line.split()[0]) for line in lines[2:]] == [10, 20, 30, 36]
  assert 'final' in lines[-1] and 'test_accuracy' in lines[-1]


def test_eval_mode_errors(tiny_config, tmp_path):
  with pytest.raises(CheckpointError, match='no checkpoints in'):
    evaluate.evaluate_checkpoint(tiny_config, str(tmp_path))
  os.makedirs(checkpointing.checkpoint_dir(str(tmp_path)))
  tiny_config.eval_step = -2
  with pytest.raises(ConfigError, match='config.eval_step=-2'):
    evaluate.evaluate_checkpoint(tiny_config, str(tmp_path))


def _truncate_state_files(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 4096:
        with open(path, 'r+b') as f:
          f.truncate(size // 2)


def test_corrupt_latest_falls_back_and_is_kept(reference, tmp_path, capsys):
  config, workdir, _, _ = reference
  work = str(tmp_path / 'w')
  ckpt_util.copy_steps(workdir, work, [30, 36])
  _truncate_state_files(os.path.join(work, 'checkpoints', '36'))
  # Evaluation falls back without touching anything.
  assert evaluate.evaluate_checkpoint(config, work)['step'] == 30
  assert 'checkpoints/36 is unreadable' in capsys.readouterr().err
  assert ckpt_util.steps(work) == [30, 36]
  # Training resumes from 30 and moves 36 aside (kept) so it can re-save 36.
  state, _ = ckpt_util.start(config, work)
  captured = capsys.readouterr()
  assert 'checkpoints/36 is unreadable' in captured.err
  assert 'Resuming from step 30' in captured.out
  assert int(state.step) == 30
  assert ckpt_util.steps(work) == [30]
  aside = os.listdir(os.path.join(work, checkpointing.CORRUPT_DIR))
  assert len(aside) == 1 and aside[0].startswith('36-')
  # Nothing readable at all: a clear error, and still nothing deleted.
  _truncate_state_files(os.path.join(work, 'checkpoints', '30'))
  with pytest.raises(CheckpointError,
                     match=r'none of the checkpoints.*\[30\].*nothing was '
                     'deleted'):
    ckpt_util.start(config, work)
  assert ckpt_util.steps(work) == [30]
  # Through `launch.py --mode eval`, with the data scrambled rather than cut:
  # the warning and the error, not orbax's unfinished reads reporting their
  # errors at exit ('Exception ignored in ...', tracebacks).
  work = str(tmp_path / 'scrambled')
  ckpt_util.copy_steps(workdir, work, [30])
  for root, _, files in os.walk(os.path.join(work, 'checkpoints', '30',
                                             'state')):
    for name in files if os.path.basename(root) == 'd' else ():  # the data
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        data = bytearray(f.read())
        data[::7] = bytes(b ^ 0x5a for b in data[::7])
        f.seek(0)
        f.write(data)
  p = ckpt_util.launch(work, config, '--mode=eval')
  assert p.returncode == 2
  assert [l.split()[0] for l in p.stderr.splitlines()] == ['Warning:',
                                                           'Error:'], p.stderr


class _NaNLearningRateFrom(base.Hook):
  """Makes the optimizer's learning rate NaN from a given step on."""

  def __init__(self, step):
    self.step = step

  def on_train_start(self, run, state):
    schedule = state.learning_rate_fn
    bad = lambda s: jnp.where(s >= self.step, jnp.nan, schedule(s))
    return base.Update(state=state.replace(
        tx=optimizer.create_optimizer(run.config, bad)))


def test_non_finite_loss_stops_naming_the_last_good_checkpoint(tiny_config,
                                                              tmp_path):
  # Step 13 uses the NaN rate: its parameters are NaN, step 14's loss is NaN,
  # found by the loop one dispatch late (before any save at step 20).
  with pytest.raises(NonFiniteLossError) as e:
    ckpt_util.run(tiny_config, str(tmp_path),
                  extra_hooks=[_NaNLearningRateFrom(12)])
  good = os.path.join(str(tmp_path), 'checkpoints', '10')
  assert 'at step 14' in str(e.value)
  assert f'Last good checkpoint: {good}' in str(e.value)
  assert ckpt_util.steps(str(tmp_path)) == [10]


def test_save_refuses_a_non_finite_state(tiny_config, tmp_path):
  # A save step that falls right after the loss went NaN (before the loop
  # sees the loss): the hook's own check must refuse to save.
  run = train.setup(tiny_config, str(tmp_path))
  state = ckpt_util.fresh_state(run)
  hook = checkpoint.CheckpointHook()
  assert hook.on_train_start(run, state) is None  # nothing to restore
  try:
    update = hook.on_steps(run, 10, state)  # checkpoint_every_steps=10
    good = os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), '10')
    assert update.checkpoint == good
    nan_mu = jax.tree.map(lambda x: x * jnp.nan, state.opt_state)
    with pytest.raises(NonFiniteLossError,
                       match=r'not finite at step 20.*it was not saved. Last '
                       f'good checkpoint: {good}'):
      hook.on_steps(run, 20, state.replace(opt_state=nan_mu))
  finally:
    hook.on_train_end(run, 20, state, None)
  assert ckpt_util.steps(str(tmp_path)) == [10]


def test_orbax_saves_a_copy_beside_the_loop(tiny_config, tmp_path,
                                           monkeypatch):
  """The loop's thread checks and copies the state on its devices; orbax's
  save of the copy runs on the hook's thread, so the next dispatch may
  donate (here: delete) the state's buffers while it saves."""
  run = train.setup(tiny_config, str(tmp_path))
  state = ckpt_util.fresh_state(run)
  expected = jax.device_get(state.params)
  hook = checkpoint.CheckpointHook()
  hook.on_train_start(run, state)
  release, threads = threading.Event(), []
  real_save = checkpointing.save

  def slow_save(*args, **kwargs):
    threads.append(threading.current_thread())
    assert release.wait(30)
    return real_save(*args, **kwargs)

  monkeypatch.setattr(checkpointing, 'save', slow_save)
  try:
    update = hook.on_steps(run, 10, state)  # returns while orbax waits
    assert update.checkpoint == os.path.join(
        checkpointing.checkpoint_dir(str(tmp_path)), '10')
    assert ckpt_util.steps(str(tmp_path)) == []
    for x in jax.tree.leaves((state.params, state.opt_state)):
      x.delete()  # what donation to the next step does
    release.set()
  finally:
    release.set()
    hook.on_train_end(run, 10, state, None)  # waits for the save
  assert threads and threads[0] is not threading.main_thread()
  assert ckpt_util.steps(str(tmp_path)) == [10]
  ckpt_util.assert_bitwise_equal(ckpt_util.saved_params(str(tmp_path)),
                                 expected)


def test_default_cadence_saves_at_every_epoch_end(tiny_config, tmp_path):
  tiny_config.checkpoint_every_steps = 0  # the default: epoch ends
  tiny_config.steps_per_dispatch = 4
  tiny_config.write_report = False
  ckpt_util.run(tiny_config, str(tmp_path))
  assert ckpt_util.steps(str(tmp_path)) == [18, 36]


def test_resume_regrouping_steps_into_dispatches_is_bitwise(tiny_config,
                                                            tmp_path):
  """k = 4 steps per dispatch: an interruption at step 14 regroups the rest
  of the run into other dispatches (14-18, 18-22, ... instead of 16-18, 18-22,
  ...), and the final parameters are still bitwise those of one run."""
  tiny_config.steps_per_dispatch = 4
  tiny_config.checkpoint_every_steps = 0  # epoch ends (18, 36) and the end
  tiny_config.write_report = False
  whole = str(tmp_path / 'whole')
  ckpt_util.run(tiny_config, whole)
  parts = str(tmp_path / 'parts')
  first = tiny_config.copy_and_resolve_references()
  first.num_train_steps = 14  # stops (and saves) mid-epoch, like a SIGTERM
  ckpt_util.run(first, parts)
  assert ckpt_util.steps(parts) == [14]
  ckpt_util.run(tiny_config, parts)
  assert ckpt_util.steps(parts)[-1] == 36
  ckpt_util.assert_bitwise_equal(ckpt_util.saved_params(parts),
                                 ckpt_util.saved_params(whole))


def test_on_epoch_returning_true_stops_with_a_checkpoint_and_resumes(
    reference, tmp_path, capsys):
  config, _, ref_result, ref_params = reference
  workdir = str(tmp_path)
  seen = []
  result = ckpt_util.run(config, workdir,
                         on_epoch=lambda r: seen.append(r['epoch']) or True)
  assert seen == [1]
  assert result['stopped_early'] and result['stop_reason'] == 'requested'
  assert result['step'] == 18 and result['final'] == {}
  # The caller's decision (a sweep's rule, which its re-run keeps): no
  # advice to run the same command again.
  assert ('Stopped early: saved checkpoint at step 18.\n'
          in capsys.readouterr().out)
  assert ckpt_util.steps(workdir) == [10, 18]  # 18 is not a periodic step
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  # Rerunning resumes at 18 and finishes as if never stopped.
  result = ckpt_util.run(config, workdir, on_epoch=lambda r: True)
  assert 'Resuming from step 18' in capsys.readouterr().out
  assert 'stopped_early' not in result  # the last epoch ends the run anyway
  assert [r['step'] for r in result['epochs']] == [18, 36]
  assert result['final'] == ref_result['final']
  ckpt_util.assert_bitwise_equal(ckpt_util.saved_params(workdir), ref_params)


TIMES = ('train_seconds', 'images_per_second', 'compile_seconds')


def _without_times(records):
  return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


class _Dispatches:
  """Wraps `steps.make_train_fn`'s function to log each dispatch's first
  step into `events` and keep the states it was given."""

  def __init__(self, fn, events):
    self.fn, self.events, self.given = fn, events, []
    self.lower = fn.lower

  def __call__(self, state, *args, **kwargs):
    self.events.append(('dispatch', int(state.step)))
    self.given.append(state)
    return self.fn(state, *args, **kwargs)


class _EpochEvents(base.Hook):
  def __init__(self, events):
    self.events = events

  def on_epoch_dispatched(self, run, epoch, step, state):
    self.events.append(('dispatched', step))

  def on_epoch_end(self, run, epoch, step, state, record):
    self.events.append(('end', step))
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))


def _events_run(config, workdir, monkeypatch, hooks=(), **kwargs):
  """(result, events, states given to the train function) of a run."""
  events, wrapped = [], []
  make = steps.make_train_fn

  def make_train_fn(*args, **kw):
    wrapped.append(_Dispatches(make(*args, **kw), events))
    return wrapped[-1]

  monkeypatch.setattr(steps, 'make_train_fn', make_train_fn)
  result = ckpt_util.run(config, workdir,
                         extra_hooks=[_EpochEvents(events), *hooks], **kwargs)
  monkeypatch.setattr(steps, 'make_train_fn', make)
  return result, events, wrapped[0].given


@pytest.fixture(scope='module')
def three_epochs(tmp_path_factory, idx_dir):
  """A plain 3-epoch run (epoch ends at 18, 36, 54; saves at every one)."""
  config = conftest.tiny_config_for(idx_dir)
  config.num_epochs = 3
  config.checkpoint_every_steps = 0
  config.write_report = False
  config.overlap_epoch_end = 'no'
  workdir = str(tmp_path_factory.mktemp('plain3'))
  with pytest.MonkeyPatch.context() as mp:
    result, events, given = _events_run(config, workdir, mp)
  return config, result, events, given, ckpt_util.saved_params(workdir)


def test_overlapped_epoch_ends_dispatch_ahead_and_train_the_same(
    three_epochs, tmp_path, monkeypatch):
  """overlap_epoch_end='yes' (the GPU/TPU default) dispatches the next
  epoch's first steps between `on_epoch_dispatched` and `on_epoch_end` from
  the second epoch end on (the first compiles in the plain order), without
  donating the state, and trains, evaluates and saves bitwise what the
  plain loop does."""
  config, plain, plain_events, plain_given, plain_params = three_epochs
  ahead = [('dispatched', 36), ('dispatch', 36), ('end', 36)]
  in_order = [('dispatched', 36), ('end', 36), ('dispatch', 36)]
  at_36 = lambda events: events[events.index(('dispatched', 36)):][:3]
  assert at_36(plain_events) == in_order
  assert all(s.step.is_deleted() for s in plain_given)  # donated
  config = config.copy_and_resolve_references()
  config.overlap_epoch_end = 'yes'
  workdir = str(tmp_path)
  result, events, given = _events_run(config, workdir, monkeypatch)
  assert at_36(events) == ahead
  at_18 = events[events.index(('dispatched', 18)):][:3]
  assert at_18 == [('dispatched', 18), ('end', 18), ('dispatch', 18)]
  assert events[-2:] == [('dispatched', 54), ('end', 54)]  # none past the end
  assert not any(s.step.is_deleted() for s in given)  # not donated
  assert _without_times(result['epochs']) == _without_times(plain['epochs'])
  assert result['final'] == plain['final']
  assert ckpt_util.steps(workdir) == [18, 36, 54]
  ckpt_util.assert_bitwise_equal(ckpt_util.saved_params(workdir), plain_params)


def test_overlapped_stop_at_an_epoch_end_drops_the_steps_run_ahead(
    three_epochs, tmp_path, monkeypatch, capsys):
  """A stop requested at the second epoch end (where steps were dispatched
  ahead) saves the epoch-end state, and the resumed run ends bitwise as the
  plain one."""
  config, plain, _, _, plain_params = three_epochs
  config = config.copy_and_resolve_references()
  config.overlap_epoch_end = 'yes'
  workdir = str(tmp_path)
  result, events, _ = _events_run(config, workdir, monkeypatch,
                                  on_epoch=lambda r: r['epoch'] == 2)
  assert ('dispatch', 36) in events  # run ahead, then dropped
  assert result['stopped_early'] and result['step'] == 36
  assert 'Stopped early: saved checkpoint at step 36' in capsys.readouterr().out
  assert ckpt_util.steps(workdir) == [18, 36]
  result = ckpt_util.run(config, workdir)
  assert [r['step'] for r in result['epochs']] == [18, 36, 54]
  assert result['final'] == plain['final']
  ckpt_util.assert_bitwise_equal(ckpt_util.saved_params(workdir), plain_params)


def test_overlap_is_on_for_accelerators_only(monkeypatch, tiny_config):
  assert not train.overlaps_epoch_end(tiny_config)  # 'auto' on the CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert train.overlaps_epoch_end(tiny_config)
  tiny_config.overlap_epoch_end = 'no'
  assert not train.overlaps_epoch_end(tiny_config)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  tiny_config.overlap_epoch_end = 'yes'
  assert train.overlaps_epoch_end(tiny_config)


def _write_legacy_checkpoint(directory, step, state_tree, config_json, run):
  """Saves the way d886839's `CheckpointHook.save` did, with orbax only."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=10, create=True, enable_async_checkpointing=True)
  manager = ocp.CheckpointManager(directory, options=options, item_handlers={
      'state': ocp.PyTreeCheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
      'run': ocp.JsonCheckpointHandler()})
  manager.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state_tree),
      config=ocp.args.JsonSave(config_json),
      run=ocp.args.JsonSave(run)))
  manager.wait_until_finished()
  manager.close()


def test_checkpoint_of_the_code_before_layering_resumes_and_evaluates(
    reference, tmp_path, capsys):
  """A checkpoint in d886839's layout (its state tree, its config JSON, its
  run record) resumes bitwise and evaluates."""
  config, ref_workdir, ref_result, ref_params = reference
  # The reference's state at step 10, read back as plain arrays ...
  run = train.setup(config, ref_workdir)
  abstract = checkpointing.abstract_like(
      checkpointing.state_tree(ckpt_util.fresh_state(run)))
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(ref_workdir), read_only=True)
  tree = checkpointing.restore_items(manager, 10, abstract).state
  manager.close()
  # ... written as d886839 wrote it: {'step', 'params', 'opt_state'} with
  # opt_state = (masked add_decayed_weights, Adam with a schedule).
  legacy_tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay,
                                mask=optimizer.kernel_mask),
      optax.adam(lambda s: 1e-3, b1=config.adam_b1, b2=config.adam_b2,
                 eps=config.adam_eps))
  assert (jax.tree.structure(legacy_tx.init(tree['params']))
          == jax.tree.structure(tree['opt_state']))
  with open(LEGACY_CONFIG) as f:
    legacy_config = json.load(f)
  legacy_config['data']['dir'] = config.data.dir
  workdir = str(tmp_path)
  _write_legacy_checkpoint(
      checkpointing.checkpoint_dir(workdir), 10,
      {'step': tree['step'], 'params': tree['params'],
       'opt_state': tree['opt_state']}, legacy_config,
      {'history': [], 'metrics': {}, 'time': time.time(),
       'reason': 'periodic', 'devices': '1 x cpu'})
  # Evaluates: the same numbers as the reference's own step 10.
  quiet = config.copy_and_resolve_references()
  quiet.write_report = False
  at10 = quiet.copy_and_resolve_references()
  at10.eval_step = 10
  want = evaluate.evaluate_checkpoint(at10, ref_workdir)
  got = evaluate.evaluate_checkpoint(quiet, workdir)
  assert got['step'] == 10
  for key in ('validation_loss', 'validation_accuracy', 'test_loss',
              'test_accuracy'):
    assert got[key] == want[key], key
  # Its config predates batch_norm, augment_shift and data.name: the run had
  # the values every run before them had, whatever the config file says.
  other = quiet.copy_and_resolve_references()
  other.batch_norm, other.augment_shift = True, 2
  merged = checkpointing.run_config(workdir, other)
  assert (merged.batch_norm, merged.augment_shift, merged.data.name) == (
      False, 0, 'mnist')
  # Resumes: the step continues from 10 and the run ends bitwise as the
  # reference, which was never interrupted.
  capsys.readouterr()
  result = ckpt_util.run(config, workdir)
  assert 'Resuming from step 10' in capsys.readouterr().out
  assert result['step'] == 36
  assert [r['step'] for r in result['epochs']] == [18, 36]
  assert result['final'] == ref_result['final']
  ckpt_util.assert_bitwise_equal(ckpt_util.saved_params(workdir), ref_params)


def test_resuming_past_the_end_says_there_is_nothing_to_train(
    reference, tmp_path, capsys):
  config, workdir, _, _ = reference
  work = str(tmp_path / 'w')
  ckpt_util.copy_steps(workdir, work, [36])
  config = config.copy_and_resolve_references()
  config.num_train_steps = 20  # the checkpoint is at 36
  result = train.train_and_evaluate(config, work)
  out = capsys.readouterr().out
  assert ('Nothing to train: the run ends at step 20 (num_epochs=2, '
          'num_train_steps=20)') in out
  assert result['step'] == 36 and ckpt_util.steps(work) == [36]


def test_run_config_is_the_runs_with_the_command_lines_overrides(reference):
  """`--mode eval/predict`'s config: the run's values over the config file's
  defaults, except what the command line set and this machine's settings."""
  config, workdir, _, _ = reference
  command = configs_default.get_config()  # as `--config configs/default.py`
  command.eval_batch_size = 50  # given as --config.eval_batch_size=50
  command.lowering = 'reference'  # this machine's (not a run's) setting
  del command['write_report']  # a field the run has and the code lost
  command.data.num_validation = 5000  # a file default: the run's wins
  got = checkpointing.run_config(workdir, command, {'eval_batch_size': 50})
  assert got.data.source == 'idx' and got.data.dir == config.data.dir
  assert got.data.num_validation == config.data.num_validation == 100
  assert got.batch_size == config.batch_size
  assert got.eval_batch_size == 50 and got.lowering == 'reference'
  assert 'write_report' not in got
  assert command.data.source == 'tfds'  # the command's config is untouched


class _CtrlCWhileDraining(base.Hook):
  """Presses Ctrl-C (SIGINT to this process) while the loop fetches the
  first dispatch's metrics: the next dispatch is then in flight."""

  def __init__(self):
    self.drained = []  # first steps of the dispatches handed to the hooks

  def on_metrics(self, run, first_step, metrics):
    self.drained.append(first_step)
    if first_step == 0:
      os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize('per_dispatch,stop_step', [
    (5, 10),  # mid-epoch: the dispatch in flight (steps 6-10), no more
    (10, 18),  # the one in flight ends the epoch: evaluated, then stopped
])
def test_ctrl_c_stops_at_the_step_in_flight(tiny_config, tmp_path, capsys,
                                            per_dispatch, stop_step):
  tiny_config.steps_per_dispatch = per_dispatch
  tiny_config.checkpoint_every_steps = 0
  hook = _CtrlCWhileDraining()
  result = ckpt_util.run(tiny_config, str(tmp_path), extra_hooks=[hook])
  out = capsys.readouterr().out
  assert result['stopped_early'] and result['step'] == stop_step, out
  assert (f'Interrupted: saved checkpoint at step {stop_step}; run the same '
          'command again to resume.') in out
  assert ckpt_util.steps(str(tmp_path)) == [stop_step]
  # Every dispatched step's metrics reached the hooks (summaries) first.
  assert hook.drained == list(range(0, stop_step, per_dispatch))
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(str(tmp_path)), read_only=True)
  history = checkpointing.restore_items(manager, stop_step).run['history']
  manager.close()
  if stop_step == 18:  # epoch 1 evaluated and recorded before the stop
    assert [r['step'] for r in history] == [18]
    assert 'test_accuracy' in history[0] and 'Epoch   1 step     18' in out
  else:
    assert history == [] and 'Epoch   1' not in out


def test_resuming_past_the_end_evaluates_the_restored_step(reference,
                                                          tmp_path, capsys):
  """Checkpoints up to step 30 and a run now 25 steps long: nothing to
  train; step 30 is evaluated and reported, not epoch 1's (step 18) result."""
  config, ref_workdir, _, _ = reference
  workdir = str(tmp_path)
  ckpt_util.copy_steps(ref_workdir, workdir, [10, 20, 30])
  shorter = config.copy_and_resolve_references()
  shorter.num_train_steps = 25
  result = ckpt_util.run(shorter, workdir)
  out = capsys.readouterr().out
  assert 'Nothing to train: the run ends at step 25' in out
  assert [(r['epoch'], r['step']) for r in result['epochs']] == [(1, 18),
                                                                 (2, 30)]
  assert result['step'] == 30 and not result.get('stopped_early')
  at30 = shorter.copy_and_resolve_references()
  at30.eval_step = 30
  evaluated = evaluate.evaluate_checkpoint(at30, workdir)
  for key in ('validation_accuracy', 'test_accuracy', 'test_loss'):
    assert result['final'][key] == pytest.approx(evaluated[key], rel=1e-6)
  assert (f"Final test accuracy: {evaluated['test_accuracy']:.2%}" in out)
  assert ckpt_util.steps(workdir) == [10, 20, 30]  # nothing saved again


class _CtrlCAtDispatch(base.Hook):
  """Presses Ctrl-C as the dispatch that ends at `step` is queued."""

  def __init__(self, step):
    self.step = step

  def on_steps(self, run, step, state):
    if step == self.step:
      os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_with_the_last_step_in_flight_completes_the_run(
    tiny_config, tmp_path, capsys):
  tiny_config.num_train_steps = 18  # one epoch; dispatches 1-10, 11-18
  tiny_config.steps_per_dispatch = 10
  tiny_config.checkpoint_every_steps = 0
  result = ckpt_util.run(tiny_config, str(tmp_path),
                         extra_hooks=[_CtrlCAtDispatch(18)])
  out = capsys.readouterr().out
  assert not result.get('stopped_early') and result['step'] == 18, out
  assert f"Final test accuracy: {result['final']['test_accuracy']:.2%}" in out
  with open(os.path.join(str(tmp_path), 'metrics.json')) as f:
    assert json.load(f)['final'] == result['final']


def test_a_stop_at_an_overlapped_epoch_end_dispatches_nothing_ahead(
    three_epochs, tmp_path, monkeypatch, capsys):
  config, _, _, _, plain_params = three_epochs
  config = config.copy_and_resolve_references()
  config.overlap_epoch_end = 'yes'
  result, events, _ = _events_run(config, str(tmp_path), monkeypatch,
                                  hooks=[_CtrlCAtDispatch(36)])
  assert result['stopped_early'] and result['step'] == 36
  # Epoch 2 is evaluated and saved (ahead of it nothing is dispatched).
  assert events[-2:] == [('dispatched', 36), ('end', 36)]
  assert [r['step'] for r in result['epochs']] == [18, 36]
  assert 'Interrupted: saved checkpoint at step 36' in capsys.readouterr().out
  assert ckpt_util.steps(str(tmp_path))[-1] == 36
