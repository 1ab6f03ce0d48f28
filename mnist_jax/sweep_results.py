"""A sweep's results: ranked tables and TensorBoard HParams.

`<W>/sweep_results.csv` and `<W>/sweep_results.md` hold one row per point,
ranked by the best validation accuracy of any evaluated epoch. Model selection
never looks at the test set (the tutorial held out 5,000 training images for
exactly this); the final test accuracy is reported beside it, not used.

For TensorBoard's HParams dashboard each finished point's sub-workdir gets its
hyperparameters and final metrics (`sweep/...` scalars), and `<W>` gets the
experiment's list of hyperparameters and metrics, so
`tensorboard --logdir <W>` compares all points in one table.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Any, Sequence

from mnist_jax import tf_setup
from mnist_jax.hooks import event_writer

CSV_FILE = 'sweep_results.csv'
MD_FILE = 'sweep_results.md'
# Metrics written for the HParams dashboard, with their display names.
HPARAM_METRICS = {
    'sweep/best_validation_accuracy': 'best validation accuracy',
    'sweep/test_accuracy': 'final test accuracy',
    'sweep/wall_seconds': 'wall time (s)',
}
# A row's summary of a run, then its bookkeeping.
SUMMARY = ('best_validation_accuracy', 'best_epoch', 'test_accuracy',
           'epochs', 'steps')
_COLUMNS = (*SUMMARY, 'wall_seconds', 'status', 'error')
# Statuses: finished or stopped by the early-stopping rule (both final),
# failed (retried by a re-run), or not run yet.
DONE, STOPPED, FAILED, PENDING = 'done', 'stopped early', 'failed', 'pending'


def write_json(path: str, data: Any) -> None:
  """Writes `data` to `path` whole or not at all (a killed write leaves the
  old file): the sweep's record of its points, a point's wall time."""
  with open(f'{path}.tmp', 'w') as f:
    json.dump(data, f, indent=1)
  os.replace(f'{path}.tmp', path)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
  """The table's summary of a run from `train.train_and_evaluate`'s result.

  Args:
    result: {'epochs': [epoch records], 'final': {...}, 'step': int}; a
      stopped run has no 'final' metrics: its last evaluated epoch's test
      accuracy is reported instead.

  Returns:
    {'best_validation_accuracy', 'best_epoch', 'test_accuracy', 'epochs',
     'steps'}, None where nothing was evaluated.
  """
  epochs = result.get('epochs') or []
  evaluated = [r for r in epochs if 'validation_accuracy' in r]
  best = max(evaluated, key=lambda r: r['validation_accuracy'], default=None)
  test = (result.get('final') or {}).get('test_accuracy')
  if test is None and evaluated:
    test = evaluated[-1].get('test_accuracy')
  return {
      'best_validation_accuracy': best['validation_accuracy'] if best else None,
      'best_epoch': best['epoch'] if best else None,
      'test_accuracy': test,
      'epochs': epochs[-1]['epoch'] if epochs else None,
      'steps': result.get('step'),
  }


def ranked_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Rows ranked by best validation accuracy; points without one (failed,
  pending) last, in sweep order. Adds a 1-based 'rank'."""
  rows = list(rows)
  rows.sort(key=lambda r: (r['best_validation_accuracy'] is None,
                           -(r['best_validation_accuracy'] or 0.0)))
  return [{'rank': i + 1, **row} for i, row in enumerate(rows)]


def override_keys(overrides: Sequence[dict[str, Any]]) -> list[str]:
  """The keys of all points' overrides, in order of first appearance."""
  keys = []
  for point in overrides:
    keys += [k for k in point if k not in keys]
  return keys


def write_tables(workdir: str, rows: Sequence[dict[str, Any]],
                 keys: Sequence[str]) -> list[dict[str, Any]]:
  """Writes `<workdir>/sweep_results.{csv,md}`; returns the ranked rows.

  Args:
    workdir: the sweep's directory.
    rows: one per point: {'point': name, <override key>: value, ...,
      `SUMMARY` fields, 'wall_seconds', 'status', 'error'}.
    keys: the override keys, the table's first columns after the name.
  """
  rows = ranked_rows(rows)
  columns = ['rank', 'point', *keys, *_COLUMNS]
  tmp = os.path.join(workdir, CSV_FILE + '.tmp')
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: '' if row.get(k) is None else row[k]
                       for k in columns})
  os.replace(tmp, os.path.join(workdir, CSV_FILE))
  with open(os.path.join(workdir, MD_FILE), 'w') as f:
    f.write(markdown_table(rows, keys))
  return rows


def _cell(key: str, value) -> str:
  if value is None or value == '':
    return ''
  if key.endswith('accuracy'):
    return f'{value:.2%}'
  if key == 'wall_seconds':
    return f'{value:.0f}'
  return str(value).replace('|', '\\|')


def markdown_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
  """The ranked rows as a Markdown table (errors shortened)."""
  head = ['rank', *keys, 'best val acc', 'best epoch', 'test acc', 'epochs',
          'steps', 'wall s', 'status']
  fields = ['rank', *keys, *_COLUMNS[:-1]]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    cells = [_cell(k, row.get(k)) for k in fields]
    if row['error']:
      cells[-1] += ': ' + _cell('error', row['error'][:120])
    lines.append('| ' + ' | '.join(cells) + ' |')
  return ('Ranked by best validation accuracy; the test accuracy is reported, '
          'never used for selection.\n\n' + '\n'.join(lines) + '\n')


# ---------------------------------------------------------------- HParams

def write_point_hparams(point_workdir: str, overrides: dict[str, Any],
                        row: dict[str, Any]) -> None:
  """Writes a point's hyperparameters and summary into its sub-workdir for
  TensorBoard's HParams dashboard (nothing if it has no validation result).

  Args:
    point_workdir: the point's own workdir (its TensorBoard run).
    overrides: the point's overrides.
    row: its `summarize` fields and 'wall_seconds'.
  """
  if row.get('best_validation_accuracy') is None:
    return
  if tf_setup.hide_accelerators_from_tf():
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    writer = metric_writers.SummaryWriter(point_workdir)
  else:  # the same records through TensorBoard's own writer
    writer = event_writer.EventWriter(point_workdir)
  writer.write_hparams(dict(overrides))
  writer.write_scalars(row['steps'] or 0, {
      'sweep/best_validation_accuracy': row['best_validation_accuracy'],
      'sweep/test_accuracy': row['test_accuracy'],
      'sweep/wall_seconds': row['wall_seconds']})
  writer.close()


def write_hparams_config(workdir: str,
                         overrides: Sequence[dict[str, Any]]) -> None:
  """Declares the sweep's hyperparameters (with their values) and metrics in
  `<workdir>` so the HParams dashboard shows them as columns; written once."""
  if glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    return
  # TensorBoard's pure-proto HParams API: no TensorFlow needed.
  from tensorboard.plugins.hparams import summary_v2 as hp  # pylint: disable=g-import-not-at-top
  hparams = []
  for key in override_keys(overrides):
    values = {p[key] for p in overrides if key in p}
    # Discrete domains need values of one type; mixed ones get no domain.
    domain = (hp.Discrete(sorted(values))
              if len({type(v) for v in values}) == 1 else None)
    hparams.append(hp.HParam(key, domain))
  metrics = [hp.Metric(tag, display_name=name)
             for tag, name in HPARAM_METRICS.items()]
  writer = event_writer.EventWriter(workdir)
  writer.write_summary_proto(0, hp.hparams_config_pb(hparams=hparams,
                                                     metrics=metrics))
  writer.close()
