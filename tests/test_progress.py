"""Progress bar (terminal), plain lines (not a terminal), ReportProgress and
the profiler hook's step window; driven with fake runs, no training."""

import io
import logging
import re
import types

import jax
import numpy as np

from conftest import stacked_train_metrics
from mnist_jax.hooks import progress


class FakeTTY(io.StringIO):
  """A stream that says it is a terminal."""

  def isatty(self):
    return True


def fake_run(steps_per_epoch=10, total_steps=20, batch_size=32, every=5):
  config = types.SimpleNamespace(batch_size=batch_size, log_every_steps=every)
  return types.SimpleNamespace(config=config, steps_per_epoch=steps_per_epoch,
                               total_steps=total_steps)


def drive(hook, run, dispatch=1):
  """Feeds the hook the loop's calls for a run of `run.total_steps` steps."""
  hook.on_train_start(run, types.SimpleNamespace(step=0))
  step = 0
  while step < run.total_steps:
    epoch_end = (step // run.steps_per_epoch + 1) * run.steps_per_epoch
    n = min(dispatch, epoch_end - step, run.total_steps - step)
    losses = np.linspace(2.0, 1.0, n) / (1 + step)
    hook.on_steps(run, step + n, None)
    hook.on_metrics(run, step, stacked_train_metrics(losses, [1e-3] * n))
    step += n
  hook.on_train_end(run, step, None, {})


def test_tty_shows_a_live_bar_per_epoch():
  stream = FakeTTY()
  hook = progress.ProgressHook(stream=stream)
  assert hook.is_tty
  drive(hook, fake_run(), dispatch=2)
  text = stream.getvalue()
  assert '\r' in text  # Redrawn in place.
  for epoch in ('Epoch 1/2', 'Epoch 2/2'):
    finished = [l for l in re.split(r'[\r\n]', text)
                if l.startswith(epoch) and '100%' in l]
    assert finished, text
    line = finished[-1]
    assert '320/320 [' in line, line  # 10 steps of 32 images
    assert re.search(r'img/s', line), line
    assert re.search(r'\d\d:\d\d<\d\d:\d\d', line), line  # elapsed<ETA
    assert 'loss=' in line, line
  assert hook._bar is None  # Closed at the epoch end.


def test_not_a_tty_prints_plain_periodic_lines():
  stream = io.StringIO()
  hook = progress.ProgressHook(stream=stream)
  assert not hook.is_tty
  drive(hook, fake_run(), dispatch=1)
  text = stream.getvalue()
  assert '\r' not in text
  lines = text.splitlines()
  # Every 5 steps (the first dispatch of each epoch only starts the clock).
  assert [l.split()[3] for l in lines] == ['5/20', '10/20', '15/20', '20/20']
  assert lines[0].startswith('Epoch 1/2 step 5/20 (25%) loss ')
  assert lines[-1].startswith('Epoch 2/2 step 20/20 (100%)')
  assert all(re.search(r'\d+ img/s ETA \d+:\d\d:\d\d$', l) for l in lines)


def test_report_progress_logs_steps_per_sec_and_eta(caplog):
  hook = progress.ProgressHook(stream=io.StringIO(), report_every_secs=None)
  with caplog.at_level(logging.INFO):
    drive(hook, fake_run(), dispatch=3)
  notes = [r.getMessage() for r in caplog.records
           if 'steps/s' in r.getMessage()]
  assert notes and '100.0% (20/20)' in notes[-1] and 'ETA' in notes[-1]


def test_profile_hook_traces_the_requested_steps(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(jax.profiler, 'start_trace',
                      lambda d: calls.append(('start', d)))
  monkeypatch.setattr(jax.profiler, 'stop_trace',
                      lambda: calls.append(('stop',)))
  run = fake_run(total_steps=40)
  run.workdir = str(tmp_path)
  hook = progress.ProfileHook(num_steps=3, first_step=5)
  hook.on_train_start(run, types.SimpleNamespace(step=0))
  seen = []
  for step in range(1, 41):
    before = len(calls)
    hook.on_steps(run, step, jax.numpy.zeros(()))
    seen += [(step,) + c for c in calls[before:]]
  hook.on_train_end(run, 40, None, {})
  assert seen == [(5, 'start', str(tmp_path)), (8, 'stop')]


def test_only_process_zero_prints(monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  for stream in (FakeTTY(), io.StringIO()):
    drive(progress.ProgressHook(stream=stream), fake_run())
    assert stream.getvalue() == ''


def test_without_tensorflow_a_rate_log_stands_in(monkeypatch, caplog):
  """clu's ReportProgress imports TensorFlow; without it, the hook logs
  steps/s and the ETA itself, every `report_every_secs`."""
  from mnist_jax import tf_setup  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tf_setup, 'hide_accelerators_from_tf', lambda: False)
  hook = progress.ProgressHook(stream=io.StringIO(), report_every_secs=25)
  drive(hook, fake_run(), dispatch=2)
  assert isinstance(hook._report, progress._RateLog)  # pylint: disable=protected-access

  clock = iter(range(0, 1000, 10))  # 10 s between calls
  rate_log = progress._RateLog(20, 25, clock=lambda: next(clock))  # pylint: disable=protected-access
  with caplog.at_level(logging.INFO):
    for step in range(2, 21, 2):
      rate_log(step)
  notes = [r.getMessage() for r in caplog.records
           if 'steps/s' in r.getMessage()]
  # Calls at steps 2, 4, ..., 20, 10 s apart: reports at steps 8, 14 and 20,
  # each over 6 steps in 30 s.
  assert notes == [f'0.2 steps/s, step {s}/20, ETA {(20 - s) / 0.2 / 60:.0f} min'
                   for s in (8, 14, 20)], notes
