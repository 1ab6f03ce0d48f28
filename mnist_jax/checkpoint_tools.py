"""The evaluation run (`--mode eval`) and the listing (`--mode info`).

`evaluate_checkpoint` is the tutorial's `test_classifier.py`: it restores a
checkpoint's parameters onto whatever devices this machine has (a checkpoint
written by 8 TPU cores restores on one laptop CPU) and evaluates the full
validation and test sets exactly (padding is masked).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from mnist_jax import checkpointing
from mnist_jax import input_pipeline
from mnist_jax import train
from mnist_jax.errors import ConfigError


def abstract_params(model, mesh):
  """ShapeDtypeStructs of the model's parameters, replicated over `mesh`: the
  target that restores a checkpoint's parameters onto these devices."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(
          (1,) + input_pipeline.IMAGE_SHAPE, jnp.float32), train=False))
  replicated = jax.NamedSharding(mesh, jax.P())
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      shapes['params'])


def evaluate_checkpoint(config, workdir: str) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir` on the validation and test sets.

  Args:
    config: the config (data, model and eval_batch_size are used);
      `config.eval_step` picks the step, -1 = the latest readable one.
    workdir: the training run's workdir.

  Returns:
    The record written to `<workdir>/eval/metrics.json`: step, checkpoint
    path, devices, and validation_/test_ loss and accuracy.
  """
  eval_step = config.get('eval_step', -1)
  if not isinstance(eval_step, int) or eval_step < -1:
    raise ConfigError(f'config.eval_step={eval_step!r}: use -1 (the latest '
                      'checkpoint) or a saved step (see --mode info).')
  directory = checkpointing.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointError(
        f'no checkpoints in {directory}; train first, or pass the --workdir '
        'of a training run.')
  ctx = train.setup(config, workdir)
  manager = checkpointing.create_manager(directory, read_only=True)
  try:
    step, params, _ = checkpointing.restore_params(
        manager, abstract_params(ctx.model, ctx.mesh),
        None if eval_step == -1 else eval_step)
  finally:
    manager.close()
  record = {'step': step, 'checkpoint': os.path.join(directory, str(step)),
            'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}'}
  for name, split in ctx.eval_splits.items():
    record.update({f'{name}_{k}': v for k, v in
                   train.evaluate(ctx.eval_fn, params, split).items()})
  if jax.process_index() == 0 and config.get('write_report', True):
    from mnist_jax import report  # pylint: disable=g-import-not-at-top
    record['report'] = report.write_report(workdir, config, params,
                                           test=ctx.data.test)
  if jax.process_index() == 0:  # every process evaluates; one writes
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    with open(os.path.join(workdir, 'eval', 'metrics.json'), 'w') as f:
      json.dump(record, f, indent=1)
  checkpointing.say(f"Checkpoint {record['checkpoint']}: validation accuracy "
                    f"{record['validation_accuracy']:.2%}, test loss "
                    f"{record['test_loss']:.4f}")
  checkpointing.say(f"Final test accuracy: {record['test_accuracy']:.2%}")
  return record


def list_checkpoints(workdir: str) -> list[dict[str, Any]]:
  """The checkpoints of a workdir, oldest first.

  Returns:
    One dict per checkpoint: step, path, time (ISO, when the save completed),
    reason (periodic / final / preempted), metrics (the record of the epoch
    that ended at that step, if any; empty otherwise) or an 'error' if its
    run record cannot be read.
  """
  directory = checkpointing.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointError(f'no checkpoints in {directory}.')
  manager = checkpointing.create_manager(directory, read_only=True)
  rows = []
  try:
    for step in sorted(manager.all_steps()):
      row = {'step': step, 'path': os.path.join(directory, str(step))}
      try:
        run = manager.restore(step, args=checkpointing.ocp.args.Composite(
            run=checkpointing.ocp.args.JsonRestore())).run
        row.update(time=datetime.datetime.fromtimestamp(run['time']).isoformat(
            sep=' ', timespec='seconds'), reason=run.get('reason', ''),
                   metrics=run.get('metrics', {}))
      except Exception as e:  # pylint: disable=broad-except
        row['error'] = f'{type(e).__name__}: {str(e)[:120]}'
      rows.append(row)
  finally:
    manager.close()
  return rows


def print_checkpoints(workdir: str) -> None:
  """Prints `list_checkpoints(workdir)` as a table (`--mode info`)."""
  rows = list_checkpoints(workdir)
  print(f'{len(rows)} checkpoint(s) in '
        f'{checkpointing.checkpoint_dir(workdir)}:')
  print(f"{'step':>8}  {'saved at':19}  {'reason':9}  metrics")
  for r in rows:
    if 'error' in r:
      print(f"{r['step']:>8}  unreadable: {r['error']}")
      continue
    m = r['metrics']
    shown = ', '.join(
        f'{k} {m[k]:.2%}' if k.endswith('accuracy') else f'{k} {m[k]:.4f}'
        for k in ('train_loss', 'train_accuracy', 'validation_accuracy',
                  'test_accuracy') if k in m) or '-'
    print(f"{r['step']:>8}  {r['time']:19}  {r['reason']:9}  {shown}")
  # Saves cut short (killed process): orbax never renamed them into place.
  directory = checkpointing.checkpoint_dir(workdir)
  partial = sorted(n for n in os.listdir(directory) if 'tmp' in n)
  if partial:
    print(f'Incomplete saves (ignored): {", ".join(partial)}')
