"""Orbax checkpoints of a run: layout, save, restore, and run identity.

  <workdir>/checkpoints/<step>/state/   {'step', 'params', 'opt_state'} and,
                                        for a model with state (BatchNorm's
                                        statistics), 'model_state'

  <workdir>/checkpoints/<step>/config/  the config that wrote it (JSON)
  <workdir>/checkpoints/<step>/run/     epoch records so far, why it was saved

Restores go against an abstract target that carries the current shardings,
so a checkpoint written on any devices restores on this machine's.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mnist_jax import config_lib
from mnist_jax import models
from mnist_jax import optimizer
from mnist_jax import parallel
from mnist_jax.errors import CheckpointError, ConfigError, UserError

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'  # unreadable checkpoints are moved here

# Config fields that may differ between the run that wrote a checkpoint and
# the run that resumes it: they do not change the trajectory (duration,
# logging, evaluation, paths, how the same function is lowered or
# dispatched). Every other field is part of the run's identity, so a new
# hyperparameter is protected without editing this list.
MAY_CHANGE_ON_RESUME = (
    'num_epochs', 'num_train_steps', 'eval_batch_size', 'eval_every_epochs',
    'log_every_steps', 'steps_per_dispatch', 'overlap_epoch_end',
    'profile_steps', 'write_report',
    'compilation_cache_dir', 'checkpoint_every_steps',
    'max_checkpoints_to_keep', 'init_from', 'eval_step', 'lowering',
    'distributed', 'data.dir', 'data.download', 'data.cache_dir')


# Fields added to the config since runs were first saved, with the value
# every run before them had: a saved config without one was that run.
IMPLIED_WHEN_ABSENT = {'data.name': 'mnist', 'batch_norm': False,
                       'augment_shift': 0}

# Fields `run_config` leaves as the command line has them: how this machine
# runs the same function, not what the run was.
THIS_MACHINE = ('lowering', 'parallelism', 'distributed',
                'compilation_cache_dir', 'data.cache_dir', 'eval_step',
                'profile_steps')


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(directory: str, max_to_keep: int | None = None,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax CheckpointManager for our three items (state, config, run)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only,
      enable_background_delete=not read_only)  # close() waits for it
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      'state': ocp.PyTreeCheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
      'run': ocp.JsonCheckpointHandler()})


def state_tree(state) -> dict[str, Any]:
  """What a checkpoint holds of a `steps.TrainState` ('model_state' only
  where the model has some: the tutorial's checkpoints stay as they were)."""
  return {'step': state.step, 'opt_state': state.opt_state,
          **_variables_tree(state.variables)}


def _variables_tree(variables) -> dict[str, Any]:
  """The keys of a `state_tree` that hold a model's `variables`."""
  tree = {'params': variables['params']}
  rest = {k: v for k, v in variables.items() if k != 'params'}
  if rest:
    tree['model_state'] = rest
  return tree


def abstract_like(tree):
  """ShapeDtypeStructs with the shardings of `tree`'s arrays: the restore
  target that puts a checkpoint onto the current devices."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def config_json(config) -> dict[str, Any]:
  """The config as plain JSON data."""
  return json.loads(json.dumps(config.to_dict()))


# ------------------------------------------------------------------ saving

@jax.jit
def finite_copy(tree):
  """(a copy of `tree` on the same devices, whether all its floats are
  finite, as a device-side bool): one dispatch; `bool()` of the flag waits
  for it. The copy stays valid when the next step donates the original's
  buffers, so it can be saved meanwhile."""
  leaves = jax.tree.leaves(tree)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                              if jnp.issubdtype(x.dtype, jnp.inexact)]))
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree), finite


def step_dir(manager, step: int) -> str:
  """The folder of `manager`'s checkpoint of `step`."""
  return os.path.join(str(manager.directory), str(step))


def save(manager, step: int, tree: dict[str, Any], config,
         run: dict[str, Any]) -> str:
  """Saves `tree` (a `state_tree`) at `step` asynchronously; returns
  `step_dir(manager, step)`."""
  manager.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(tree),
      config=ocp.args.JsonSave(config_json(config)),
      run=ocp.args.JsonSave(run)))
  return step_dir(manager, step)


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is ENOSPC (orbax wraps
  the OSError of its writer threads)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC
        or 'No space left on device' in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


# --------------------------------------------------------------- restoring

def restore_items(manager, step: int, abstract: dict[str, Any] | None = None,
                  partial: bool = False):
  """Restores the JSON items and, if `abstract` is given, those keys of the
  'state' item onto `abstract`'s shardings."""
  items = {'config': ocp.args.JsonRestore(), 'run': ocp.args.JsonRestore()}
  if abstract is not None:
    items['state'] = ocp.args.PyTreeRestore(
        item=abstract, partial_restore=partial,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
  return manager.restore(step, args=ocp.args.Composite(**items))


def warn(message: str) -> None:
  """A warning on stderr (lead process) and, at INFO, in the log file (the
  console shows log warnings too, so it is not logged as one)."""
  logging.info('Warning: %s', message)
  parallel.say(f'Warning: {message}', file=sys.stderr)


def restore_latest_good(manager, restore_fn: Callable[[int], Any],
                        steps: list[int] | None = None):
  """Restores the newest checkpoint that reads back, warning about others.

  Args:
    manager: the CheckpointManager.
    restore_fn: `restore_fn(step)` -> restored items; an exception other than
      a UserError means the checkpoint is unreadable.
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
      path = step_dir(manager, step)
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      # (TensorStore appends a long spec of the array: not for the console.)
      reason = reason.split('. See full TensorStore details')[0][:200]
      warn(f'checkpoint {path} is unreadable ({type(e).__name__}: {reason});'
           ' falling back to the previous one. It is kept, not deleted.')
      bad.append(step)
  if bad:
    raise CheckpointError(
        f'none of the checkpoints in {manager.directory} (steps {bad}) can be '
        'read; nothing was deleted. Start afresh with a new --workdir.')
  return None, None, []


def set_aside(manager, steps: list[int]) -> None:
  """Moves unreadable checkpoints out of the way (never deletes them), so
  that their steps can be saved again."""
  if not steps:
    return
  directory = str(manager.directory)
  if parallel.is_lead():
    aside = os.path.join(os.path.dirname(directory), CORRUPT_DIR)
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
      os.rename(os.path.join(directory, str(step)), target)
      warn(f'moved the unreadable checkpoint of step {step} to {target}.')
  if jax.process_count() > 1:  # the others wait for the move
    multihost_utils.sync_global_devices('mnist_jax_set_aside')
  manager.reload()


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(x.shape)
          for path, x in flat}


def check_variable_shapes(
    manager, step: int, abstract_variables, config=None,
    advice: str = 'Is config.num_classes (or the model) the same as in the '
    'run that saved it?') -> None:
  """Raises CheckpointError listing the model's variables (parameters and
  model state) whose shapes differ from those in the checkpoint, then what
  to do: the model fields (`models.model_fields`) where `config` differs
  from the saved run's config, else `advice`."""
  wanted_tree = _variables_tree(abstract_variables)
  saved_tree = manager.item_metadata(step)['state'].tree
  saved = _flat_shapes({k: saved_tree[k] for k in wanted_tree
                        if k in saved_tree})
  wanted = _flat_shapes(wanted_tree)
  # Parameters first, by their names (without the 'params/' prefix).
  names = sorted(set(saved) | set(wanted),
                 key=lambda k: (not k.startswith('params/'), k))
  shape = lambda tree, k: tree.get(k, 'absent')  # pylint: disable=unnecessary-lambda-assignment
  diffs = [f'{k.removeprefix("params/")}: checkpoint {shape(saved, k)} vs '
           f'model {shape(wanted, k)}'
           for k in names if saved.get(k) != wanted.get(k)]
  if not diffs:
    return
  if config is not None:
    advice = _model_field_advice(manager, step, config) or advice
  more = f'; and {len(diffs) - 4} more' if len(diffs) > 4 else ''
  raise CheckpointError(
      f'The checkpoint at {manager.directory}/{step} does not fit the model '
      f'({"; ".join(diffs[:4])}{more}). {advice}')


def _model_field_advice(manager, step: int, config) -> str | None:
  """'The run that saved it had batch_norm=True (now False): ...', or None
  where no model field differs (or the saved config cannot be read)."""
  try:
    saved = _identity_leaves(restore_items(manager, step).config)
  except Exception:  # pylint: disable=broad-except
    return None
  now = config_lib.leaves(config_json(config))
  fields = [f for f in models.model_fields(config)
            if f in saved and f in now and saved[f] != now[f]]
  if not fields:
    return None
  return ('The run that saved it had '
          + ', '.join(f'{f}={saved[f]!r} (now {now[f]!r})' for f in fields)
          + ': ' + ' '.join(f'--config.{f}={saved[f]}' for f in fields)
          + ' builds its model.')


def restore_variables(manager, abstract_variables, step: int | None = None,
                      config=None):
  """Restores only the model's variables onto the target's shardings.

  Args:
    manager: the CheckpointManager to read.
    abstract_variables: ShapeDtypeStructs (with shardings) of the variables
      ({'params': ..., **model_state}: `models.abstract_variables`).
    step: the step to read; None = the latest readable one.
    config: the config the model was built from; where the checkpoint does
      not fit, its error names the model fields the saved run had otherwise.

  Returns:
    (step, variables, the 'run' JSON item).
  """
  def restore_fn(s):
    check_variable_shapes(manager, s, abstract_variables, config)
    r = restore_items(manager, s, _variables_tree(abstract_variables),
                      partial=True)
    return {'params': r.state['params'],
            **r.state.get('model_state', {})}, r.run

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


def require_checkpoints(workdir: str) -> str:
  """`checkpoint_dir(workdir)`; a CheckpointError if it does not exist."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(
        f'no checkpoints in {directory}; train first, or pass the --workdir '
        'of a training run.')
  return directory


def restore_workdir_variables(workdir: str, abstract_variables,
                              step: int | None = None, config=None):
  """`restore_variables` from a training run's workdir: (step, variables,
  run)."""
  directory = require_checkpoints(workdir)
  manager = create_manager(directory, read_only=True)
  try:
    return restore_variables(manager, abstract_variables, step, config)
  finally:
    manager.close()


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


# ------------------------------------------------------------ run identity

def _within(field: str, fields) -> bool:
  """Whether dotted `field` is one of `fields` or inside one of them."""
  return any(field == f or field.startswith(f + '.') for f in fields)


def run_config(workdir: str, config, overrides=(), step: int | None = None):
  """The config of the run that wrote `workdir`'s checkpoints, for
  evaluating or predicting with it (`launch.py --mode eval/predict`).

  Args:
    workdir: the training run's workdir.
    config: the command line's config: its `overrides` (dotted field names
      given as `--config.<field>=...`) win over the run's values; its
      `THIS_MACHINE` fields and those the run's config lacks (added to the
      code since) are kept, except `IMPLIED_WHEN_ABSENT`'s: the run had
      their value.
    overrides: see `config`.
    step: whose saved config (default: the latest readable checkpoint's).

  Returns:
    A copy of `config` holding the run's values; `config` itself if no
    checkpoint's config can be read (the restore then says why).
  """
  manager = create_manager(require_checkpoints(workdir), read_only=True)
  saved = None
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    for s in ([step] if step in steps else steps):
      try:
        saved = restore_items(manager, s).config
        break
      except Exception:  # pylint: disable=broad-except
        continue  # unreadable: the restore of the parameters reports it
  finally:
    manager.close()
  if saved is None:
    return config
  merged = config.copy_and_resolve_references()
  now = config_lib.leaves(config_json(config))
  for field, value in _identity_leaves(saved).items():
    if (field not in now or field in overrides or now[field] == value
        or _within(field, THIS_MACHINE)):
      continue
    *parents, leaf = field.split('.')
    node = merged
    for parent in parents:
      node = node[parent]
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)  # JSON has no tuples
    try:
      node[leaf] = value
    except (TypeError, ValueError):  # the field's type changed since
      logging.info('Not taking %s=%r from the run: it no longer fits.',
                   field, value)
  return merged


def _identity_leaves(tree: dict[str, Any]) -> dict[str, Any]:
  return {**IMPLIED_WHEN_ABSENT, **config_lib.leaves(tree)}


def changed_fields(old: dict[str, Any], new: dict[str, Any],
                   may_change: Sequence[str] = MAY_CHANGE_ON_RESUME
                   ) -> list[str]:
  """The dotted fields, outside `may_change`, where two configs (as JSON
  dicts) differ, sorted. Fields only one side has (added or removed by a
  code change) are not differences, except those `IMPLIED_WHEN_ABSENT`."""
  a, b = _identity_leaves(old), _identity_leaves(new)
  return [f for f in sorted(set(a) & set(b))
          if not _within(f, may_change) and a[f] != b[f]]


def run_identity_diffs(saved: dict[str, Any], config) -> list[str]:
  """The fields, outside `MAY_CHANGE_ON_RESUME`, where `config` differs from
  the `saved` config, each as `field=<saved> (checkpoint) vs <now> (now)`."""
  now = config_json(config)
  a, b = _identity_leaves(saved), _identity_leaves(now)
  return [f'{f}={a[f]!r} (checkpoint) vs {b[f]!r} (now)'
          for f in changed_fields(saved, now)]


def check_same_run(saved: dict[str, Any], config, directory: str) -> None:
  """Raises ConfigError if `config` is not the run that wrote `directory`."""
  diffs = run_identity_diffs(saved, config)
  if diffs:
    raise ConfigError(
        f'the config differs from the one that wrote {directory} in fields '
        f'that change the run: {"; ".join(diffs)}. Resuming would mix two '
        'runs: set them back, or use a new --workdir (with --config.init_from='
        '<old workdir> to start from its parameters).')


def check_same_schedule(saved: dict[str, Any], config, num_train: int,
                        step: int, directory: str) -> None:
  """Raises ConfigError if the learning-rate schedule of `config` differs
  from the saved run's over the steps it had left (`step` to its end).

  The run's duration may change on resume, but a schedule defined by it
  (cosine or warm-up over the run's length) then changes with it, silently.
  A saved config the current `optimizer.learning_rate_schedule` cannot read
  (fields it has added since) is not compared.
  """
  try:
    saved = ml_collections.ConfigDict(saved)
    before = optimizer.learning_rate_schedule(saved, num_train)
    end = optimizer.total_steps(saved, num_train)
  except (AttributeError, KeyError, TypeError, ValueError):
    return
  now = optimizer.learning_rate_schedule(config, num_train)
  for s in np.unique(np.linspace(step, max(step, end), 9).astype(int)):
    a, b = float(before(int(s))), float(now(int(s)))
    if not np.isclose(a, b, rtol=1e-6, atol=0.0):
      raise ConfigError(
          f'the learning-rate schedule differs from the one that wrote '
          f'{directory} at step {s}: {a:.4g} (checkpoint) vs {b:.4g} (now); '
          'it depends on a field that may otherwise change on resume (e.g. '
          'num_epochs). Resume with that field as it was, or start a new '
          '--workdir with --config.init_from=<this workdir>.')
