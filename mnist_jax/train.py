"""The training loop: `train_and_evaluate(config, workdir)`.

It is what `launch.py` calls and is equally usable from tests and notebooks:
epochs of jitted dispatches of steps (`steps.make_train_fn`), evaluation at
epoch ends, and hooks around it (`mnist_jax.hooks`) whose requests the loop
carries out.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from mnist_jax import config_lib
from mnist_jax import input_pipeline
from mnist_jax import metrics as metrics_lib
from mnist_jax import models
from mnist_jax import optimizer
from mnist_jax import parallel
from mnist_jax import steps
from mnist_jax import tf_setup
from mnist_jax.errors import NonFiniteLossError
from mnist_jax.hooks import base
from mnist_jax.hooks import checkpoint
from mnist_jax.hooks import progress
from mnist_jax.hooks import report
from mnist_jax.hooks import summaries

# Streams derived from key(seed) with fold_in: never stored, never threaded.
_INIT, _DROPOUT, _DATA = 0, 1, 2
# Signals that stop a single-process run after the step in flight, with a
# checkpoint (SIGTERM: pre-emption; SIGINT: Ctrl-C). A second one aborts at
# once. Multi-host runs use JAX's pre-emption service through orbax.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Exit status of an abort by a second signal: 128 + SIGINT, as a shell's.
EXIT_ABORTED = 130
# How the line printed when the loop stops early names each reason.
_STOP_WORDS = {'SIGTERM': 'Pre-empted (SIGTERM)', 'pre-empted': 'Pre-empted',
               'SIGINT': 'Interrupted', 'requested': 'Stopped early'}


def default_hooks(config, print_overview: bool = True) -> list[base.Hook]:
  """The hooks `train_and_evaluate` runs unless given others; without
  `print_overview`, the parameter table goes to the log, not the console."""
  hooks = [checkpoint.CheckpointHook(),
           summaries.SummaryHook(print_overview=print_overview)]
  if parallel.is_lead():  # one progress display per run, not per host
    hooks.append(progress.ProgressHook())
  if config.profile_steps > 0:
    hooks.append(progress.ProfileHook(config.profile_steps))
  if config.write_report:
    hooks.append(report.ReportHook())
  return hooks


def overlaps_epoch_end(config) -> bool:
  """Whether the loop dispatches each epoch's first steps before the previous
  epoch's end work (`config.overlap_epoch_end`; 'auto': on GPU/TPU).

  The device then trains on while the host fetches the evaluation, prints
  and hands the checkpoint over. The state is not donated (the epoch-end
  state stays valid for the hooks and for a stop at the epoch end; one more
  copy of it in device memory). An overlapped epoch's `train_seconds` runs
  from the previous epoch's training end, so it includes the epoch-end work
  the device ran in between (the evaluation). The first epoch end of a
  session runs in the plain order, so what it compiles stays off the clock.
  Off on the CPU, where executions run side by side on the same cores and
  nothing is gained.
  """
  if config.overlap_epoch_end == 'auto':
    return jax.default_backend() != 'cpu'
  return config.overlap_epoch_end == 'yes'


def enable_compilation_cache(cache_dir: str) -> str | None:
  """Turns on JAX's persistent compilation cache (faster warm starts).

  Args:
    cache_dir: '' = $XDG_CACHE_HOME/mnist_jax/jax_cache (~/.cache/...),
      'none' = off, else the folder (e.g. a bucket path on TPU VMs).

  Returns:
    The folder in use, or None when off. The first folder set in a process
    stays in use (JAX initialises the cache once).
  """
  if cache_dir == 'none':
    return None
  cache_dir = os.path.expanduser(cache_dir)
  if not cache_dir:
    cache_dir = os.path.join(
        os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
        'mnist_jax', 'jax_cache')
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    # Cache every step/eval program, not only those that took > 1 s.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return jax.config.jax_compilation_cache_dir


def setup(config: ml_collections.ConfigDict, workdir: str,
          training: bool = True) -> base.Run:
  """Validates the config, loads the data and builds everything but state
  (`training=False`: for evaluation, which takes no training batches)."""
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(config.compilation_cache_dir)
  mesh = parallel.create_mesh()
  if training:
    config_lib.validate_against_devices(config, mesh.devices.size,
                                        jax.process_count())
  data = input_pipeline.load(config)
  num_train = len(data.train)
  config_lib.validate_against_data(
      config, num_train, max(int(split.labels.max()) for split in (
          data.train, data.validation, data.test) if len(split)))
  spe = optimizer.steps_per_epoch(config, num_train)
  total_steps = optimizer.total_steps(config, num_train)
  model = models.create_model(config)
  root = jax.random.key(config.seed)
  return base.Run(
      config=config, workdir=workdir, mesh=mesh, model=model, data=data,
      steps_per_epoch=spe, total_steps=total_steps,
      eval_fn=steps.make_eval_fn(model, mesh),
      # (No validation split with data.num_validation=0.)
      eval_splits={name: steps.device_eval_split(
          getattr(data, name), config.eval_batch_size, mesh)
                   for name in ('validation', 'test')
                   if len(getattr(data, name))},
      rngs={name: jax.random.fold_in(root, i) for name, i in
            (('init', _INIT), ('dropout', _DROPOUT), ('data', _DATA))})


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str,
    hooks: list[base.Hook] | None = None,
    on_epoch: Callable[[dict[str, Any]], bool | None] | None = None,
) -> dict[str, Any]:
  """Trains the tutorial's CNN as configured and evaluates it every epoch.

  Args:
    config: the run's hyperparameters (see configs/default.py).
    workdir: where metrics.json, checkpoints and summaries go.
    hooks: what runs around training; default `default_hooks(config)`.
    on_epoch: called on the lead process with each epoch's record after its
      evaluation, before the hooks' `on_epoch_end` (a sweep's scheduler
      blocks in it until it decides); returning True stops the run there,
      with a checkpoint, as a pre-emption would (not after the last epoch).

  Returns:
    The metrics written to `<workdir>/metrics.json`: per-epoch records, the
    final validation and test metrics and the step. A run stopped early
    (signal, pre-emption, `on_epoch`) writes no metrics.json and returns
    `stopped_early=True` and `stop_reason`; the same call resumes it.
  """
  # TensorFlow (for summaries) is imported beside data loading and
  # compilation, with the GPUs hidden from it first.
  tf_setup.preload_in_background()
  run = setup(config, workdir)
  logging.info('Train %d / validation %d / test %d images; %d steps per epoch,'
               ' %d steps; devices: %s', len(run.data.train),
               len(run.data.validation), len(run.data.test),
               run.steps_per_epoch, run.total_steps, run.mesh.devices.tolist())
  hooks = default_hooks(config) if hooks is None else hooks
  hooks = sorted(hooks, key=lambda h: h.order)  # stable: ties keep list order
  state = parallel.put_replicated(
      steps.create_train_state(config, run.model, len(run.data.train),
                               run.rngs['init']), run.mesh)
  loop = _Loop(run, hooks, on_epoch)
  started, result = [], None
  with _stop_signals() as signalled:
    try:
      for hook in hooks:
        started.append(hook)
        state = loop.apply(hook.on_train_start(run, state), state)
      state, stop_reason = loop.train(state, signalled)
      result = _result(config, workdir, loop.history, int(state.step),
                       stop_reason)
    finally:
      _end_hooks(started, run, state, result)
  return result


def _result(config, workdir: str, history, step: int, stop_reason):
  """The run's result; written to metrics.json when the run completed."""
  result = {'config': config.to_dict(), 'epochs': history, 'final': {},
            'step': step}
  if stop_reason:
    return dict(result, stopped_early=True, stop_reason=stop_reason)
  last = history[-1] if history else {}
  result['final'] = {k: v for k, v in last.items()
                     if k.startswith(('validation_', 'test_'))}
  if parallel.is_lead():  # every process holds the same result
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump(result, f, indent=1)
  if result['final']:
    parallel.say(f"Final test accuracy: {result['final']['test_accuracy']:.2%}")
  return result


def _end_hooks(started, run, state, result) -> None:
  """Ends every started hook, even if some fail; re-raises the first error
  unless another one is already propagating."""
  step = int(state.step) if result else -1
  first = None
  for hook in started:
    try:
      hook.on_train_end(run, step, state, result)
    except BaseException as e:  # pylint: disable=broad-except
      logging.exception('%s.on_train_end failed', type(hook).__name__)
      first = first or e
  if first is not None and result is not None:
    raise first


@contextlib.contextmanager
def _stop_signals():
  """Catches STOP_SIGNALS while training (single process, main thread):
  yields a list that receives the signals' names."""
  received: list[str] = []
  if (jax.process_count() > 1
      or threading.current_thread() is not threading.main_thread()):
    yield received
    return

  def handler(signum, frame):
    del frame
    name = signal.Signals(signum).name
    # os.write: safe wherever the handler interrupts the main thread.
    if received:  # the second signal: the user does not want to wait
      os.write(2, (f'\n{name} again: aborting now, without saving. A '
                   'checkpoint being written is discarded; the previous ones '
                   'are kept, and the same command resumes from the latest.\n'
                   ).encode())
      os._exit(EXIT_ABORTED)  # pylint: disable=protected-access
    received.append(name)
    os.write(2, (f'\n{name}: stopping after the step in flight to save a '
                 'checkpoint (Ctrl-C again aborts at once).\n').encode())

  old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
  try:
    yield received
  finally:
    for s, h in old.items():
      signal.signal(s, h)


class _Loop:
  """Epochs of dispatches of steps, with evaluation at epoch ends."""

  def __init__(self, run: base.Run, hooks, on_epoch):
    self.run = run
    self.hooks = hooks
    self.on_epoch = on_epoch
    self.history: list[dict[str, Any]] = []
    self.last_checkpoint = ''
    self.stop: str | None = None
    self.first_step_of_run = 0

  def apply(self, update: base.Update | None, state):
    """Carries out a hook's `Update`; returns the state to continue with."""
    if update is None:
      return state
    if update.history is not None:
      self.history = list(update.history)
    if update.checkpoint:
      self.last_checkpoint = update.checkpoint
    if update.stop and not self.stop:
      self.stop = update.stop
    return state if update.state is None else update.state

  def _call(self, method: str, state, *args):
    for hook in self.hooks:
      state = self.apply(getattr(hook, method)(self.run, *args), state)
    return state

  def train(self, state, signalled: list[str]):
    """Returns (final state, the reason it stopped early or None)."""
    run, config = self.run, self.run.config
    num_train = len(run.data.train)
    train_data = parallel.put_replicated(
        {'image': run.data.train.images, 'label': run.data.train.labels},
        run.mesh)
    overlap = overlaps_epoch_end(config)
    # Dispatching ahead keeps the epoch-end state: no donation then.
    train_fn = steps.make_train_fn(config, num_train, run.mesh,
                                   donate=not overlap)
    permutation = jax.jit(
        functools.partial(input_pipeline.epoch_permutation,
                          num_examples=num_train),
        out_shardings=jax.NamedSharding(run.mesh, jax.P()))

    def dispatch(state, step, epoch_end, perm):
      n = _chunk_length(config, step, epoch_end, run.steps_per_epoch)
      state, stacked = train_fn(state, train_data, perm, run.rngs['dropout'],
                                num_steps=n)
      return state, step + n, parallel.prefetch_to_host(stacked)

    self.first_step_of_run = int(state.step)
    step = int(state.step)
    if self._unrecorded_end(step):
      state = self._catch_up(state, step)
    ahead = None  # (state, step, stacked, perm): the next epoch's first
    ahead_t0 = None  # where the clock of the epoch run ahead starts
    warm = False  # whether an evaluation and epoch-end hooks have run
    while step < run.total_steps:
      epoch = step // run.steps_per_epoch
      epoch_end = min((epoch + 1) * run.steps_per_epoch, run.total_steps)
      if ahead is None:
        perm = permutation(run.rngs['data'], epoch)
        if step == self.first_step_of_run:  # all dispatch lengths, before t0
          compile_seconds = _precompile(
              train_fn, (state, train_data, perm, run.rngs['dropout']),
              dispatch_lengths(config, step, run.total_steps,
                               run.steps_per_epoch))
        t0 = time.perf_counter()
      first_step, pending = step, []
      merged = None
      while step < epoch_end:
        if signalled and not self.stop:
          self.stop = signalled[0]
        if self.stop:  # dispatch no more: stop at the step in flight
          self._drain(pending, merged, keep=0)
          return self._stop(state, step), self.stop
        start = step
        if ahead is not None:  # dispatched during the last epoch's end
          (state, step, stacked, perm), t0 = ahead, ahead_t0
          ahead = None
        else:
          state, step, stacked = dispatch(state, step, epoch_end, perm)
        pending.append((start, stacked))
        state = self._call('on_steps', state, step, state)
        # (A stop asked for meanwhile is seen above, or at the epoch end:
        # an epoch whose last step is in flight is evaluated and recorded
        # before the run stops.)
        merged = self._drain(pending, merged, keep=1)  # overlaps the device
      evaluate_now = ((epoch + 1) % config.eval_every_epochs == 0
                      or step == run.total_steps)
      if overlap and warm:
        # The device runs what the hooks compute from the epoch-end state,
        # the evaluation and the next epoch's first steps: it keeps busy
        # while this thread waits, prints and saves. What this thread will
        # fetch is already on its way to the host (`prefetch_to_host`), so no
        # fetch waits behind the steps dispatched ahead.
        self._epoch_dispatched(epoch + 1, step, state)
        evals = self._dispatch_evaluation(state) if evaluate_now else {}
        if step < run.total_steps and not (signalled or self.stop):
          next_end = min(epoch_end + run.steps_per_epoch, run.total_steps)
          next_perm = permutation(run.rngs['data'], epoch + 1)
          ahead = (*dispatch(state, step, next_end, next_perm), next_perm)
        merged = self._drain(pending, merged, keep=0)
        # The next epoch's clock starts where this epoch's training ended:
        # it counts the epoch-end work the device runs before it.
        ahead_t0 = time.perf_counter()
        train_time = ahead_t0 - t0
      else:
        merged = self._drain(pending, merged, keep=0)
        train_time = time.perf_counter() - t0
        self._epoch_dispatched(epoch + 1, step, state)
        evals = self._dispatch_evaluation(state) if evaluate_now else {}
      record = {'epoch': epoch + 1, 'step': step,
                **metrics_lib.to_scalars(merged, 'train_'),
                'train_seconds': train_time,
                'images_per_second': (step - first_step) * config.batch_size
                                     / train_time}
      _add_evaluation(record, evals)
      if first_step == self.first_step_of_run and compile_seconds is not None:
        record['compile_seconds'] = compile_seconds  # this session's first
      if first_step > epoch * run.steps_per_epoch:  # resumed mid-epoch
        record['resumed_at_step'] = first_step  # train_* cover steps after
      self.history.append(record)
      parallel.say(epoch_line(record))
      stop = (self.on_epoch is not None and parallel.is_lead()
              and self.on_epoch(dict(record)) and step < run.total_steps)
      ended = self._call('on_epoch_end', state, epoch + 1, step, state,
                         record)
      if ended is not state:  # a hook replaced the state: not what ran ahead
        ahead = None
      state = ended
      # Epoch ends overlap once what they run has compiled (in the plain
      # order, outside the training clock): after the first evaluation.
      warm = warm or bool(evals)
      if stop:
        self.stop = 'requested'
      elif signalled and not self.stop:
        self.stop = signalled[0]
      if self.stop and step < run.total_steps:  # (at the end: done anyway)
        return self._stop(state, step), self.stop
    return state, None

  def _unrecorded_end(self, step: int) -> bool:
    """Whether a resumed run starts where an evaluation is due that its
    history lacks: the run's end (e.g. a shorter run now), or an evaluated
    epoch's end a run older than this check stopped at."""
    run = self.run
    if step == 0 or (self.history and self.history[-1]['step'] >= step):
      return False
    return step >= run.total_steps or (
        step % run.steps_per_epoch == 0
        and step // run.steps_per_epoch % run.config.eval_every_epochs == 0)

  def _catch_up(self, state, step: int):
    """Evaluates and records `step` as an epoch end (no training metrics:
    those steps ran before the restart)."""
    epoch = -(-step // self.run.steps_per_epoch)  # the one `step` ends or is in
    self._epoch_dispatched(epoch, step, state)
    record = {'epoch': epoch, 'step': step}
    _add_evaluation(record, self._dispatch_evaluation(state))
    self.history.append(record)
    parallel.say(epoch_line(record))
    return self._call('on_epoch_end', state, epoch, step, state, record)

  def _epoch_dispatched(self, epoch: int, step: int, state) -> None:
    for hook in self.hooks:
      hook.on_epoch_dispatched(self.run, epoch, step, state)

  def _dispatch_evaluation(self, state) -> dict[str, Any]:
    """The splits' device-side metrics, every split dispatched at once."""
    return parallel.prefetch_to_host(
        {name: self.run.eval_fn(state.variables, split)
         for name, split in self.run.eval_splits.items()})

  def _stop(self, state, step):
    state = self._call('on_stop', state, step, state, self.stop)
    what = _STOP_WORDS.get(self.stop, f'Stopped ({self.stop})')
    saved = (f'saved checkpoint at step {step}' if self.last_checkpoint
             else f'nothing saved at step {step}')
    # (A stop `on_epoch` asked for is the caller's decision, e.g. a sweep's
    # early-stopping rule, which a re-run of the sweep keeps.)
    again = ('' if self.stop == 'requested'
             else '; run the same command again to resume')
    parallel.say(f'{what}: {saved}{again}.')
    return state

  def _drain(self, pending, merged, keep: int):
    """Hands the metrics of all but `keep` pending dispatches to the hooks
    (after checking the loss is finite) and merges them into `merged`."""
    while len(pending) > keep:
      start, stacked = pending.pop(0)
      host = jax.device_get(stacked)
      losses = host.loss.total / host.loss.count
      if not np.all(np.isfinite(losses)):
        bad = start + 1 + int(np.argmin(np.isfinite(losses)))
        raise NonFiniteLossError(
            f'Training loss is {losses[bad - start - 1]} at step {bad}; '
            'stopping (lower the learning rate?). Last good checkpoint: '
            f'{self.last_checkpoint or "none"}.')
      if start == self.first_step_of_run:  # benchmarks/startup.py waits for it
        logging.info('First dispatch done: steps %d-%d.', start + 1,
                     start + len(losses))
      for hook in self.hooks:
        hook.on_metrics(self.run, start, host)
      part = metrics_lib.merge_stacked(host)
      merged = part if merged is None else merged.merge(part)
    return merged


def _add_evaluation(record: dict[str, Any], evals) -> None:
  """Adds `<split>_<metric>` scalars of the evaluated splits to `record`."""
  for name, metrics in jax.device_get(evals).items():
    record.update({f'{name}_{k}': v for k, v in
                   metrics_lib.to_scalars(metrics).items()})


def dispatch_lengths(config, step: int, total_steps: int,
                     steps_per_epoch: int, limit: int = 1 << 20) -> list[int]:
  """The distinct dispatch lengths (`_chunk_length`) from `step` to the end,
  each one compiled program; the first `limit` dispatches are looked at."""
  lengths = set()
  for _ in range(limit):
    if step >= total_steps:
      break
    epoch_end = min((step // steps_per_epoch + 1) * steps_per_epoch,
                    total_steps)
    n = _chunk_length(config, step, epoch_end, steps_per_epoch)
    lengths.add(n)
    step += n
  return sorted(lengths)


def _precompile(train_fn, args, lengths: list[int]) -> float | None:
  """Compiles `train_fn` for every dispatch length; returns the wall seconds
  (None for the pmap option, which has no `lower` and compiles at first use).

  The jitted function's own cache then holds the programs: the epochs'
  `train_seconds` time training alone, and the first epoch's last, shorter
  dispatch no longer stops training to compile. One after the other, the
  longest first: two at once, in threads, took 25 s instead of 5 on an H200.
  """
  if not hasattr(train_fn, 'lower'):
    return None
  t0 = time.perf_counter()
  for n in sorted(lengths, reverse=True):
    train_fn.lower(*args, num_steps=n).compile()
  seconds = time.perf_counter() - t0
  logging.info('Compiled the training step for dispatches of %s steps in '
               '%.1f s.', '/'.join(map(str, lengths)), seconds)
  return seconds


# steps_per_dispatch=0 (auto) on the CPU: a dispatch of 10 steps takes ~2 s
# there, so the progress bar moves and a stop request waits little.
CPU_STEPS_PER_DISPATCH = 10


def steps_per_dispatch(config, steps_per_epoch: int) -> int:
  """`config.steps_per_dispatch`; 0 (auto): 10 on the CPU, a whole epoch on
  GPU/TPU (its host then dispatches once per epoch and need not keep pace
  with steps of a few milliseconds, which threads writing summaries and
  checkpoints beside the loop would otherwise slow)."""
  if config.steps_per_dispatch > 0:
    return config.steps_per_dispatch
  if jax.default_backend() == 'cpu':
    return CPU_STEPS_PER_DISPATCH
  return steps_per_epoch


def _chunk_length(config, step: int, epoch_end: int,
                  steps_per_epoch: int) -> int:
  """Steps in the next dispatch: at most `steps_per_dispatch`, never past
  the epoch end nor past a checkpoint step (so saves happen at exact steps).

  Each distinct length is one more compiled program, so the default config
  checkpoints at epoch ends: an epoch is then k, k, ..., k, (107 mod k).
  """
  n = min(steps_per_dispatch(config, steps_per_epoch), epoch_end - step)
  every = config.checkpoint_every_steps  # 0: at epoch ends only
  return min(n, every - step % every) if every > 0 else n


def epoch_line(record: dict[str, Any]) -> str:
  """The line printed after each epoch, built from the metrics' names."""
  parts = [metrics_lib.format_split('train', record,
                                    metrics_lib.names(metrics_lib.TrainMetrics))]
  parts += [metrics_lib.format_split(split, record,
                                     metrics_lib.names(metrics_lib.EvalMetrics))
            for split in ('validation', 'test')]
  if 'images_per_second' in record:  # (not a resumed run's catch-up)
    parts.append(f"{record['images_per_second']:.0f} img/s")
  return (f"Epoch {record['epoch']:3d} step {record['step']:6d}: "
          + ' | '.join(p for p in parts if p))
