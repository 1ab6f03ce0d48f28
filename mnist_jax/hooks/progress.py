"""Progress in the terminal and the logs, and an optional profiler trace.

`ProgressHook`: a live tqdm bar per epoch on a terminal, plain periodic lines
otherwise; clu's `ReportProgress` logs steps/s and the ETA. `ProfileHook`
traces `config.profile_steps` steps into the workdir (TensorBoard's Profile
tab). Both use only what the loop hands them: no extra device syncs.
"""

from __future__ import annotations

import sys
import time

from absl import logging
import jax
import tqdm

from mnist_jax import parallel
from mnist_jax import tf_setup
from mnist_jax.hooks import base


def _format_secs(secs: float) -> str:
  secs = int(round(secs))
  return f'{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}'


class ProgressHook(base.Hook):
  """A live bar per epoch on a terminal; plain periodic lines otherwise.

  Args:
    stream: where to write (default sys.stderr, as tqdm); whether it is a
      terminal is decided by `stream.isatty()`.
    report_every_secs: how often clu's `ReportProgress` logs steps/s and ETA.
  """

  order = 20

  def __init__(self, stream=None, report_every_secs: float = 60.0):
    self.stream = sys.stderr if stream is None else stream
    self.report_every_secs = report_every_secs
    self.is_tty = bool(getattr(self.stream, 'isatty', lambda: False)())
    self._bar = None
    self._report = None
    self._t0 = self._step0 = None  # Start of the non-TTY rate measurement.
    self._enabled = True

  def on_train_start(self, run, state):
    self._report = None  # made at the first dispatch: see on_steps
    self._step0 = None
    self._enabled = parallel.is_lead()  # one bar, not one per host

  def on_steps(self, run, step, state):
    if self._report is None:
      # clu's periodic_actions imports TensorFlow: made after the first
      # dispatch is queued, so the import (usually done in the background by
      # then, tf_setup.preload_in_background) is off the path to step 1.
      if tf_setup.hide_accelerators_from_tf():
        from clu import periodic_actions  # pylint: disable=g-import-not-at-top
        self._report = periodic_actions.ReportProgress(
            num_train_steps=run.total_steps, every_secs=self.report_every_secs)
      else:  # clu's periodic actions import TensorFlow
        self._report = _RateLog(run.total_steps, self.report_every_secs)
    self._report(step)  # Host-side timing only; never blocks on the device.

  def on_metrics(self, run, first_step, metrics):
    if not self._enabled:
      return
    n = len(metrics.loss.total)
    last = first_step + n
    loss = float(metrics.loss.total[-1] / metrics.loss.count[-1])
    spe, bs = run.steps_per_epoch, run.config.batch_size
    epoch = first_step // spe + 1
    epoch_end = min(epoch * spe, run.total_steps)
    num_epochs = -(-run.total_steps // spe)
    if self.is_tty:
      if self._bar is None:
        self._bar = tqdm.tqdm(
            total=(epoch_end - (epoch - 1) * spe) * bs,
            initial=(first_step - (epoch - 1) * spe) * bs,
            desc=f'Epoch {epoch}/{num_epochs}', unit='img', unit_scale=True,
            file=self.stream, leave=True, dynamic_ncols=True)
      self._bar.set_postfix(loss=f'{loss:.4g}', refresh=False)
      self._bar.update(n * bs)
      if last >= epoch_end:  # Closed before the loop prints the epoch line.
        self._bar.close()
        self._bar = None
      return
    self._plain_line(run, first_step, last, loss, epoch, num_epochs)

  def _plain_line(self, run, first_step, last, loss, epoch, num_epochs):
    """One line per `log_every_steps` boundary crossed by this dispatch."""
    if self._step0 is None or first_step % run.steps_per_epoch == 0:
      # The rate is measured from the end of each epoch's first dispatch, so
      # neither compilation nor the epoch-end evaluation counts as training.
      self._t0, self._step0 = time.perf_counter(), last
      return
    every = run.config.log_every_steps
    if last // every == first_step // every and last != run.total_steps:
      return
    now = time.perf_counter()
    steps_per_sec = (last - self._step0) / max(now - self._t0, 1e-9)
    eta = (run.total_steps - last) / max(steps_per_sec, 1e-9)
    print(f'Epoch {epoch}/{num_epochs} step {last}/{run.total_steps} '
          f'({last / run.total_steps:.0%}) loss {loss:.4g} '
          f'{steps_per_sec * run.config.batch_size:.0f} img/s '
          f'ETA {_format_secs(eta)}', file=self.stream, flush=True)

  def on_train_end(self, run, step, state, result):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class ProfileHook(base.Hook):
  """Traces `num_steps` training steps with the JAX profiler into `workdir`.

  The trace starts at the first dispatch ending at or after `first_step`
  (after compilation, which would otherwise dominate it) and stops once
  `num_steps` more steps have been dispatched; only then does it wait for the
  device, once, so the trace holds the work it dispatched.
  """

  order = 30

  def __init__(self, num_steps: int, first_step: int = 5):
    self.num_steps = num_steps
    self.first_step = first_step
    self.logdir = None
    self._started_at = None
    self._done = False

  def on_train_start(self, run, state):
    self.logdir = run.workdir
    start = int(state.step)
    # Short runs: start early enough to trace `num_steps` steps before the end.
    self._first = start + max(
        min(self.first_step, run.total_steps - start - self.num_steps), 1)

  def on_steps(self, run, step, state):
    if self._started_at is None:
      if not self._done and step >= self._first:
        jax.profiler.start_trace(self.logdir)
        self._started_at = step
    elif step >= self._started_at + self.num_steps:
      self._stop(state)

  def _stop(self, state):
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    logging.info('Profiler trace of steps %d.. written.', self._started_at)
    self._started_at = None
    self._done = True

  def on_train_end(self, run, step, state, result):
    if self._started_at is not None:
      self._stop(state)


class _RateLog:
  """Logs steps/s and the ETA every `every_secs`: clu's `ReportProgress`
  for processes without TensorFlow (its module imports it)."""

  def __init__(self, total_steps: int, every_secs: float,
               clock=time.monotonic):
    self.total_steps, self.every_secs = total_steps, every_secs
    self._clock = clock
    self._last = None  # (time, step) of the last report

  def __call__(self, step: int) -> None:
    now = self._clock()
    if self._last is None:
      self._last = (now, step)
      return
    t, s = self._last
    if now - t >= self.every_secs and step > s:
      rate = (step - s) / (now - t)
      logging.info('%.1f steps/s, step %d/%d, ETA %.0f min', rate, step,
                   self.total_steps, (self.total_steps - step) / rate / 60)
      self._last = (now, step)
