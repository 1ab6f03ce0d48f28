"""The evaluation run (`--mode eval`) and the checkpoint listing (`--mode info`).

`evaluate_checkpoint` is the tutorial's `test_classifier.py`: it restores a
checkpoint's parameters onto this machine's devices and evaluates the whole
validation and test sets exactly (padding is masked).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import jax

from mnist_jax import checkpointing
from mnist_jax import metrics as metrics_lib
from mnist_jax import models
from mnist_jax import parallel
from mnist_jax import report
from mnist_jax import steps
from mnist_jax import train


def evaluate_checkpoint(config, workdir: str) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir` on the validation and test sets.

  Args:
    config: the config (data, model and eval_batch_size are used);
      `config.eval_step` picks the step, -1 = the latest readable one.
    workdir: the training run's workdir.

  Returns:
    The record written to `<workdir>/eval/metrics.json`: step, checkpoint
    path, devices, and validation_/test_ loss and accuracy (and, with
    `config.write_report`, the checkpoint's report in `<workdir>/eval/report`;
    the training run's own `<workdir>/report` is left as it is).
  """
  checkpointing.require_checkpoints(workdir)  # before loading any data
  run = train.setup(config, workdir, training=False)
  step, variables, _ = checkpointing.restore_workdir_variables(
      workdir, models.abstract_variables(
          run.model, jax.NamedSharding(run.mesh, jax.P())),
      None if config.eval_step == -1 else config.eval_step, config)
  record = {'step': step,
            'checkpoint': os.path.join(checkpointing.checkpoint_dir(workdir),
                                       str(step)),
            'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}'}
  for name, split in run.eval_splits.items():
    record.update({f'{name}_{k}': v for k, v in
                   steps.evaluate(run.eval_fn, variables, split).items()})
  if parallel.is_lead():  # every process evaluates; one writes
    if config.write_report:
      record['report'] = report.write_report(workdir, config, variables,
                                             test=run.data.test,
                                             evaluated=record)
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    with open(os.path.join(workdir, 'eval', 'metrics.json'), 'w') as f:
      json.dump(record, f, indent=1)
  validation = (f"validation accuracy {record['validation_accuracy']:.2%}, "
                if 'validation_accuracy' in record else '')
  parallel.say(f"Checkpoint {record['checkpoint']}: {validation}test loss "
               f"{record['test_loss']:.4g}")
  parallel.say(f"Final test accuracy: {record['test_accuracy']:.2%}")
  return record


def list_checkpoints(workdir: str) -> list[dict[str, Any]]:
  """The checkpoints of a workdir, oldest first.

  Returns:
    One dict per checkpoint: step, path, time (ISO, when the save completed),
    reason (periodic / final / preempted / interrupted / stopped), metrics
    (the record of the epoch that ended at that step, if any; empty
    otherwise) or an 'error' if its run record cannot be read.
  """
  directory = checkpointing.require_checkpoints(workdir)
  manager = checkpointing.create_manager(directory, read_only=True)
  rows = []
  try:
    for step in sorted(manager.all_steps()):
      row = {'step': step, 'path': os.path.join(directory, str(step))}
      try:
        run = checkpointing.restore_items(manager, step).run
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
  print(f"{'step':>8}  {'saved at':19}  {'reason':11}  metrics")
  for r in rows:
    if 'error' in r:
      print(f"{r['step']:>8}  unreadable: {r['error']}")
      continue
    m = r['metrics']
    shown = ', '.join(
        f'{k} {metrics_lib.format_value(k, m[k])}' for k in ('train_loss', 'train_accuracy', 'validation_accuracy',
                  'test_accuracy') if k in m) or '-'
    print(f"{r['step']:>8}  {r['time']:19}  {r['reason']:11}  {shown}")
  # Saves cut short (killed process): orbax never renamed them into place.
  directory = checkpointing.checkpoint_dir(workdir)
  partial = sorted(n for n in os.listdir(directory) if 'tmp' in n)
  if partial:
    print(f'Incomplete saves (ignored): {", ".join(partial)}')
