"""Restore-or-init at start; periodic, final and pre-emption saves.

At start the hook picks, in order: the latest readable checkpoint of the own
workdir (resume), else `config.init_from` (fine-tuning: parameters only,
fresh optimizer state, step 0), else the fresh state. Saves are asynchronous
(orbax renames a complete save into place, so a killed save is never
picked up): the loop's thread checks the state is finite and copies it on
its devices, and orbax's save of the copy runs on a `Background` thread (in
line where several processes save together), at most one at a time;
`on_stop` and `on_train_end` wait for them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from typing import Any

import jax

from mnist_jax import checkpointing
from mnist_jax import parallel
from mnist_jax.errors import CheckpointError, NonFiniteLossError
from mnist_jax.hooks import background
from mnist_jax.hooks import base

# Test-only fault injection for the subprocess fault tests, '<kind>:<step>'
# with kind one of kill_in_step, kill_in_save, kill_after_save, term,
# disk_full (the save of that step fails with ENOSPC).
_FAULT_ENV = 'MNIST_JAX_TEST_FAULT'


# Why a stop's save was made, as `--mode info` lists it; other stops (SIGTERM,
# JAX's pre-emption notice) are 'preempted'.
_SAVE_REASONS = {'SIGINT': 'interrupted', 'requested': 'stopped'}


class CheckpointHook(base.Hook):
  """Resume, fine-tune and save with one orbax CheckpointManager."""
  order = 0  # first: the state it may restore is what the others see

  def __init__(self):
    self.manager = None
    self.history: list[dict[str, Any]] = []
    self.last_saved = ''
    self._saved_step = None
    self._copy = None  # (step, finite_copy output) taken at an epoch end
    self._workdir = ''
    self._background = None
    kind, _, step = os.environ.get(_FAULT_ENV, '').partition(':')
    self._fault = (kind, int(step)) if kind else None

  # ------------------------------------------------------------------ start
  def on_train_start(self, run, state):
    self._workdir = run.workdir
    directory = checkpointing.checkpoint_dir(run.workdir)
    self.manager = checkpointing.create_manager(
        directory, run.config.max_checkpoints_to_keep)
    # Several processes save collectively (barriers): in line, in step.
    self._background = (background.Background('checkpoint', max_pending=1)
                        if jax.process_count() == 1 else None)
    abstract = checkpointing.abstract_like(checkpointing.state_tree(state))

    def restore_fn(step):
      saved = checkpointing.restore_items(self.manager, step)
      checkpointing.check_same_run(saved.config, run.config, directory)
      checkpointing.check_same_schedule(
          saved.config, run.config, len(run.data.train), step, directory)
      # The same config and other shapes: the model's code changed since.
      checkpointing.check_variable_shapes(
          self.manager, step, state.variables, advice=(
              'The model changed since this run saved it: undo the change '
              'to resume the run, or train the changed model in a new '
              '--workdir. Nothing was deleted.'))
      return checkpointing.restore_items(self.manager, step, abstract)

    step, restored, bad = checkpointing.restore_latest_good(
        self.manager, restore_fn)
    checkpointing.set_aside(self.manager, bad)
    if step is not None:
      self.history = list(restored.run.get('history', []))
      self.last_saved = os.path.join(directory, str(step))
      self._saved_step = step  # on disk: a stop or epoch end here saves not
      parallel.say(f'Resuming from step {step} ({self.last_saved}).')
      if run.config.init_from:
        parallel.say(f'config.init_from={run.config.init_from!r} is not '
                     'used: a run takes it only when it starts from scratch, '
                     'and this one resumes its own checkpoints (fine-tune in '
                     'a new --workdir).')
      if step >= run.total_steps:
        parallel.say(
            f'Nothing to train: the run ends at step {run.total_steps} '
            f'(num_epochs={run.config.num_epochs}, num_train_steps='
            f'{run.config.num_train_steps}); raise them to train on.')
      return base.Update(state=state.replace(**restored.state),
                         history=list(self.history),
                         checkpoint=self.last_saved)
    if run.config.init_from:
      return base.Update(state=self._init_from(run.config, state))
    return None

  def _init_from(self, config, state):
    directory, step = checkpointing.resolve_checkpoint_path(config.init_from)
    manager = checkpointing.create_manager(directory, read_only=True)
    try:
      step, variables, _ = checkpointing.restore_variables(
          manager, checkpointing.abstract_like(state.variables), step,
          config)
    finally:
      manager.close()
    params = variables.pop('params')
    taken = 'parameters and model state' if variables else 'parameters'
    parallel.say(f'Fine-tuning: {taken} from {directory}/{step}; fresh '
                 'optimizer state, starting at step 0.')
    return state.replace(params=params, model_state=variables)

  # ---------------------------------------------------------------- saving
  def on_steps(self, run, step, state):
    self._maybe_inject('kill_in_step', step)
    self._maybe_inject('term', step)
    if jax.process_count() > 1 and self.manager.reached_preemption(step):
      return base.Update(stop='pre-empted')  # all hosts agree on the step
    # Epoch ends save in on_epoch_end, with the epoch's metrics.
    every = run.config.checkpoint_every_steps
    is_epoch_end = step % run.steps_per_epoch == 0 or step == run.total_steps
    if not is_epoch_end and every > 0 and step % every == 0:
      return self._save(run, step, state)
    return None

  def on_stop(self, run, step, state, reason):
    update = None
    if self._saved_step != step:  # not already saved at this very step
      update = self._save(run, step, state, reason=_SAVE_REASONS.get(
          reason, 'preempted'))
    self._wait()  # on disk before the process ends
    return update

  def on_epoch_dispatched(self, run, epoch, step, state):
    if self._saves_at_epoch_end(run, step):
      # Copied now: the device does it before the evaluation (and before the
      # steps the loop may dispatch ahead), so on_epoch_end finds it done.
      tree, finite = checkpointing.finite_copy(checkpointing.state_tree(state))
      self._copy = (step, (tree, parallel.prefetch_to_host(finite)))

  def on_epoch_end(self, run, epoch, step, state, record):
    self.history.append(record)
    if step == self._saved_step:  # a resumed run's catch-up evaluation
      return None
    if step == run.total_steps:
      update = self._save(run, step, state, metrics=record, reason='final')
      self._wait()  # its errors come before the run reports success
      return update
    if self._saves_at_epoch_end(run, step):
      return self._save(run, step, state, metrics=record)
    return None

  @staticmethod
  def _saves_at_epoch_end(run, step) -> bool:
    every = run.config.checkpoint_every_steps
    return step == run.total_steps or every == 0 or step % every == 0

  def _save(self, run, step, state, metrics=None, reason='periodic'):
    copy, self._copy = self._copy, None
    # A copy: the next dispatch donates the state's buffers while it saves.
    tree, finite = (copy[1] if copy and copy[0] == step else
                    checkpointing.finite_copy(checkpointing.state_tree(state)))
    if not bool(finite):  # waits for the copy (done, if taken in advance)
      raise NonFiniteLossError(
          f'The training state is not finite at step {step} (the loss became '
          'NaN or infinite at or before it); it was not saved. Last good '
          f'checkpoint: {self.last_saved or "none"}.')
    record = {'history': list(self.history), 'metrics': metrics or {},
              'time': time.time(), 'reason': reason,
              'devices': f'{jax.device_count()} x '
                         f'{jax.devices()[0].device_kind}'}
    if self._background is None:
      self._write(step, tree, run.config, record)
    else:  # raises an earlier save's error
      self._background.submit(self._write, step, tree, run.config, record)
    self.last_saved = checkpointing.step_dir(self.manager, step)
    self._saved_step = step
    return base.Update(checkpoint=self.last_saved)

  def _write(self, step, tree, config, record):
    with self._disk_full_is_a_user_error(step):
      self._maybe_inject('disk_full', step)
      checkpointing.save(self.manager, step, tree, config, record)
    self._maybe_inject('kill_in_save', step)
    if self._fault and self._fault[0] == 'kill_after_save':
      self.manager.wait_until_finished()
      self._maybe_inject('kill_after_save', step)

  def _wait(self):
    """Returns when every save so far is on disk; raises their errors."""
    if self._background is not None:
      self._background.wait()
    with self._disk_full_is_a_user_error(self._saved_step):
      self.manager.wait_until_finished()

  # -------------------------------------------------------------------- end
  def on_train_end(self, run, step, state, result):
    if self.manager is not None:
      try:
        self._wait()  # async saves land before exit
      finally:
        try:
          if self._background is not None:
            self._background.close()
        finally:
          self._background = None
          self.manager.close()
          self.manager = None

  @contextlib.contextmanager
  def _disk_full_is_a_user_error(self, step):
    """A full disk while saving becomes one line saying what survived."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if not checkpointing.is_disk_full(e):
        raise
      failed = re.search(r'/(\d+)\.orbax-checkpoint-tmp', str(e))
      step = int(failed.group(1)) if failed else step  # an earlier async save
      kept = sorted(self.manager.all_steps()) if self.manager else []
      raise CheckpointError(
          f'no space left on the device while saving the checkpoint of step '
          f'{step} in {checkpointing.checkpoint_dir(self._workdir)}. The '
          f'earlier checkpoints are kept and readable (steps: '
          f'{kept or "none"}); free some space and run the same command '
          'again to resume from the latest.') from None

  def _maybe_inject(self, kind, step):
    if self._fault == (kind, step) and kind == 'disk_full':
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if self._fault == (kind, step):
      if kind == 'kill_in_step':
        # Deterministic: the earlier async save has landed; only the step
        # in flight is lost.
        self._wait()
      os.kill(os.getpid(),
              signal.SIGTERM if kind == 'term' else signal.SIGKILL)
