"""Checkpoints with orbax: save, exact resume, fine-tuning, pre-emption.

Layout of a workdir's checkpoints (one orbax `CheckpointManager`):

  <workdir>/checkpoints/<step>/state/   params, opt_state, step (orbax PyTree)
  <workdir>/checkpoints/<step>/config/  the config that produced it (JSON)
  <workdir>/checkpoints/<step>/run/     epoch records so far, the metrics of
                                        the epoch that ended at <step> (if
                                        any), wall time, why it was saved

Resuming needs nothing but the state: the data order and the dropout are
pure functions of (seed, step) (see `train.make_train_fn`), so a resumed run
is bitwise identical to an uninterrupted one.

At start, `CheckpointHook.on_train_start` picks, in order: the latest
readable checkpoint of the own workdir (resume), else `config.init_from`
(fine-tuning: parameters only, fresh optimizer state, step 0), else the
freshly initialised state. Restores go against an abstract target carrying
the *current* shardings, so a checkpoint written on any number or kind of
devices restores on this machine's.

Saves are asynchronous (orbax writes in a background thread into a temporary
folder and renames it when complete, so a killed save is never picked up);
`on_train_end` waits for them. The state is checked to be finite before
every save.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from mnist_jax import train
from mnist_jax.errors import ConfigError, UserError

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'  # unreadable checkpoints moved aside here
# Exit status of launch.py after a SIGTERM pre-emption was saved: 128 + 15,
# what supervisors expect of a terminated process (so retry-on-pre-emption
# policies fire), yet distinct from errors (2) and success (0).
EXIT_PREEMPTED = 128 + signal.SIGTERM

# Config fields that change the trajectory of a run: resuming a workdir with
# any of them changed would silently mix two runs. Duration (num_epochs,
# num_train_steps), logging, evaluation cadence, lowering, data.dir and
# steps_per_dispatch may change; so may init_from, which only matters before
# a run's first checkpoint.
RUN_FIELDS = (
    'batch_size', 'seed', 'initial_learning_rate', 'learning_rate_decay_factor',
    'num_epochs_per_decay', 'weight_decay', 'adam_b1', 'adam_b2', 'adam_eps',
    'dropout_keep_prob', 'num_classes', 'dtype', 'data.source',
    'data.num_validation',
    # pmap draws dropout masks per device, jit per global batch: switching
    # mid-run would silently change the run's randomness.
    'parallelism')

# Test-only fault injection for the subprocess fault tests, '<kind>:<step>'
# with kind one of kill_in_step, kill_in_save, kill_after_save, term.
_FAULT_ENV = 'MNIST_JAX_TEST_FAULT'


class CheckpointError(UserError):
  """A checkpoint is missing, unreadable or does not fit the model."""


# ----------------------------------------------------------------- manager

def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(directory: str, max_to_keep: int | None = None,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax CheckpointManager for our three items (state, config, run)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      'state': ocp.PyTreeCheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
      'run': ocp.JsonCheckpointHandler()})


def abstract_like(tree):
  """ShapeDtypeStructs with the shardings of `tree`'s arrays: the restore
  target that puts a checkpoint onto the current devices."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def _restore(manager, step: int, abstract: dict[str, Any], partial: bool):
  """Restores the 'state' item (all of `abstract`'s keys) and the JSON items."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                   partial_restore=partial),
      config=ocp.args.JsonRestore(), run=ocp.args.JsonRestore()))


def say(message: str, file=None) -> None:
  """Prints on process 0 only (every process of a multi-host run gets here)."""
  if jax.process_index() == 0:
    print(message, file=file or sys.stdout, flush=True)


def _warn(message: str) -> None:
  logging.warning('%s', message)
  say(f'Warning: {message}', file=sys.stderr)


def restore_latest_good(manager, restore_fn, steps=None):
  """Restores the newest checkpoint that reads back, warning about others.

  Args:
    manager: the CheckpointManager.
    restore_fn: `restore_fn(step)` -> restored items; an exception means the
      checkpoint is unreadable (truncated, missing files, ...).
    steps: the candidate steps (default: all, newest first).

  Returns:
    (step, restored, [unreadable steps newer than it]); (None, None, []) if
    there are no checkpoints.

  Raises:
    CheckpointError: checkpoints exist but none can be read.
  """
  steps = sorted(manager.all_steps(), reverse=True) if steps is None else steps
  bad = []
  for step in steps:
    try:
      return step, restore_fn(step), bad
    except (UserError, KeyboardInterrupt):
      raise
    except Exception as e:  # pylint: disable=broad-except
      path = os.path.join(str(manager.directory), str(step))
      reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      _warn(f'checkpoint {path} is unreadable ({type(e).__name__}: {reason});'
            ' falling back to the previous one. It is kept, not deleted.')
      bad.append(step)
  if bad:
    raise CheckpointError(
        f'none of the checkpoints in {manager.directory} (steps {bad}) can be '
        'read; nothing was deleted. Start afresh with a new --workdir.')
  return None, None, []


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(x.shape)
          for path, x in flat}


def check_param_shapes(manager, step: int, abstract_params, what: str) -> None:
  """Raises CheckpointError listing parameters whose shapes differ."""
  saved = _flat_shapes(manager.item_metadata(step)['state'].tree['params'])
  wanted = _flat_shapes(abstract_params)
  diffs = [f'{k}: checkpoint {saved.get(k)} vs model {wanted.get(k)}'
           for k in sorted(set(saved) | set(wanted))
           if saved.get(k) != wanted.get(k)]
  if diffs:
    raise CheckpointError(
        f'{what} at {manager.directory}/{step} does not fit the model ('
        f'{"; ".join(diffs[:4])}). Is config.num_classes (or the model) '
        'the same as in the run that saved it?')


def restore_params(manager, abstract_params, step: int | None = None):
  """Restores only the parameters onto the target's shardings.

  Args:
    manager: the CheckpointManager to read.
    abstract_params: ShapeDtypeStructs (with shardings) of the parameters.
    step: the step to read; None = the latest readable one.

  Returns:
    (step, params, the 'run' JSON item).
  """
  def restore_fn(s):
    check_param_shapes(manager, s, abstract_params, 'The checkpoint')
    r = _restore(manager, s, {'params': abstract_params}, partial=True)
    return r.state['params'], r.run

  steps = None
  if step is not None:
    if step not in manager.all_steps():
      raise CheckpointError(
          f'no checkpoint for step {step} in {manager.directory}; available '
          f'steps: {sorted(manager.all_steps()) or "none"}.')
    steps = [step]
  step, restored, _ = restore_latest_good(manager, restore_fn, steps)
  if step is None:
    raise CheckpointError(f'no checkpoints in {manager.directory}.')
  return step, restored[0], restored[1]


def resolve_checkpoint_path(path: str) -> tuple[str, int | None]:
  """(checkpoints folder, step or None) of a workdir, checkpoints folder or
  step folder `.../checkpoints/<N>`."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return os.path.join(path, CHECKPOINT_DIR), None
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path), int(base)
  if os.path.isdir(path) and any(n.isdigit() for n in os.listdir(path)):
    return path, None
  raise CheckpointError(
      f'config.init_from={path!r}: no checkpoints there; give a workdir, its '
      f'{CHECKPOINT_DIR}/ folder or a step folder {CHECKPOINT_DIR}/<N>.')


# --------------------------------------------------------------- the config

def _get(d: dict[str, Any], dotted: str):
  for part in dotted.split('.'):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


def check_same_run(saved: dict[str, Any], config, directory: str) -> None:
  """Raises ConfigError if `config` differs from `saved` in RUN_FIELDS."""
  now = json.loads(json.dumps(config.to_dict()))
  diffs = [f'{f}={_get(saved, f)!r} (checkpoint) vs {_get(now, f)!r} (now)'
           for f in RUN_FIELDS
           if _get(saved, f) is not None and _get(now, f) is not None
           and _get(saved, f) != _get(now, f)]
  if diffs:
    raise ConfigError(
        f'the config differs from the one that wrote {directory} in fields '
        f'that change the run: {"; ".join(diffs)}. Resuming would mix two '
        'runs: set them back, or use a new --workdir (with --config.init_from='
        '<old workdir> to start from its parameters).')


# ------------------------------------------------------------- the hook

@jax.jit
def _finite(leaves) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree) -> bool:
  """Whether every float in `tree` is finite (one device pass, one sync)."""
  return bool(_finite([x for x in jax.tree.leaves(tree)
                       if jnp.issubdtype(x.dtype, jnp.inexact)]))


class CheckpointHook(train.Hook):
  """Restore-or-init at start, periodic/final/pre-emption saves, clean exit."""

  def __init__(self, config):
    self.config = config
    self.manager = None
    self.history: list[dict[str, Any]] = []
    self._sigterm = False
    self._old_handler = None
    kind, _, step = os.environ.get(_FAULT_ENV, '').partition(':')
    self._fault = (kind, int(step)) if kind else None

  # -- start
  def on_train_start(self, ctx, state):
    config = ctx.config
    directory = checkpoint_dir(ctx.workdir)
    self.manager = create_manager(directory, config.max_checkpoints_to_keep)
    tree = {'step': state.step, 'params': state.params,
            'opt_state': state.opt_state}
    abstract = abstract_like(tree)

    def restore_fn(step):
      saved = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))
      check_same_run(saved.config, config, directory)
      return _restore(self.manager, step, abstract, partial=False)

    try:
      step, restored, bad = restore_latest_good(self.manager, restore_fn)
      self._set_aside(directory, bad)
    except BaseException:
      self.manager.close()  # on_train_end is not called when we raise
      raise
    if step is not None:
      r = restored.state
      state = state.replace(step=r['step'], params=r['params'],
                            opt_state=r['opt_state'])
      self.history = list(restored.run.get('history', []))
      ctx.history = list(self.history)
      ctx.last_good_checkpoint = os.path.join(directory, str(step))
      say(f'Resuming from step {step} ({ctx.last_good_checkpoint}).')
    elif config.get('init_from'):
      try:
        state = self._init_from(config.init_from, state)
      except BaseException:
        self.manager.close()
        raise
    self._install_sigterm_handler()
    return state

  def _init_from(self, path, state):
    directory, step = resolve_checkpoint_path(path)
    manager = create_manager(directory, read_only=True)
    try:
      step, params, _ = restore_params(manager, abstract_like(state.params),
                                       step)
    finally:
      manager.close()
    say(f'Fine-tuning: parameters from {directory}/{step}; fresh optimizer '
        'state, starting at step 0.')
    return state.replace(params=params)

  def _set_aside(self, directory, steps):
    """Moves unreadable checkpoints newer than the resumed one out of the way
    (never deletes them), so that their steps can be saved again."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(directory), CORRUPT_DIR)
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside,
                              f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
        os.rename(os.path.join(directory, str(step)), target)
        _warn(f'moved the unreadable checkpoint of step {step} to {target}.')
    if jax.process_count() > 1:  # the others wait for the move
      multihost_utils.sync_global_devices('mnist_jax_set_aside')
    self.manager.reload()

  def _install_sigterm_handler(self):
    # Multi-host: JAX's preemption service catches SIGTERM and orbax's
    # reached_preemption() makes all hosts agree on the step; a per-host
    # flag could make hosts disagree, so only single-process runs use it.
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._sigterm = True

  # -- during training
  def on_steps(self, ctx, step, state):
    self._maybe_inject('kill_in_step', step)
    self._maybe_inject('term', step)
    if self._sigterm or (jax.process_count() > 1
                         and self.manager.reached_preemption(step)):
      self.save(ctx, step, state, reason='preempted')
      self.manager.wait_until_finished()
      say(f'Pre-empted (SIGTERM): saved checkpoint at step {step}; run the '
          'same command again to resume.')
      ctx.stop_requested = True
      return
    is_epoch_end = (step % ctx.steps_per_epoch == 0
                    or step == ctx.total_steps)
    # Epoch ends save in on_epoch_end, with the epoch's metrics.
    every = ctx.config.checkpoint_every_steps
    if not is_epoch_end and every > 0 and step % every == 0:
      self.save(ctx, step, state)

  def on_epoch_end(self, ctx, epoch, step, state, record):
    self.history.append(record)
    every = ctx.config.checkpoint_every_steps
    if (every == 0 or step % every == 0 or step == ctx.total_steps
        or ctx.stop_requested):
      self.save(ctx, step, state, metrics=record,
                reason='final' if step == ctx.total_steps else 'periodic')

  def save(self, ctx, step: int, state, metrics=None, reason='periodic'):
    """Saves `state` at `step` asynchronously, after checking it is finite."""
    if not _all_finite((state.params, state.opt_state)):
      raise train.NonFiniteLossError(
          f'The training state is not finite at step {step} (the loss became '
          'NaN or infinite at or before it); it was not saved. Last good '
          f'checkpoint: {ctx.last_good_checkpoint or "none"}.')
    tree = {'step': state.step, 'params': state.params,
            'opt_state': state.opt_state}
    run = {'history': list(self.history), 'metrics': metrics or {},
           'time': time.time(), 'reason': reason,
           'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}'}
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(tree),
        config=ocp.args.JsonSave(json.loads(json.dumps(ctx.config.to_dict()))),
        run=ocp.args.JsonSave(run)))
    self._maybe_inject('kill_in_save', step)
    ctx.last_good_checkpoint = os.path.join(str(self.manager.directory),
                                            str(step))
    if self._fault and self._fault[0] == 'kill_after_save':
      self.manager.wait_until_finished()
      self._maybe_inject('kill_after_save', step)

  def on_train_end(self, ctx, step, state, result):
    if self.manager is not None:
      self.manager.wait_until_finished()  # async saves finish before exit
      self.manager.close()
    if self._old_handler is not None:
      signal.signal(signal.SIGTERM, self._old_handler)
      self._old_handler = None

  def _maybe_inject(self, kind, step):
    if self._fault == (kind, step):
      if kind == 'kill_in_step':
        # Deterministic: the earlier async save has landed; only the step
        # in flight is lost.
        self.manager.wait_until_finished()
      sig = signal.SIGTERM if kind == 'term' else signal.SIGKILL
      os.kill(os.getpid(), sig)
