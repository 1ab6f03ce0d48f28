"""A report a researcher can read without opening TensorBoard.

`write_report(workdir, config, variables)` writes `<workdir>/report/`: learning
curves (from the event files, else metrics.json), the test confusion matrix,
the most confident test mistakes, and `report.md` with the final metrics and
the config. Plots use matplotlib's Agg canvas (no display needed).
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax
import numpy as np

from mnist_jax import input_pipeline
from mnist_jax import metrics as metrics_lib
from mnist_jax import models
from mnist_jax import steps

NUM_MISCLASSIFIED = 25  # A 5x5 grid.
SPLITS = ('train', 'validation', 'test')


def _figure(**kwargs):
  """A matplotlib Figure on the Agg canvas. matplotlib is imported here, at
  first use: a run needs it only for its report, at the end, and importing
  it with the module cost every `launch.py` ~0.5 s at start-up."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str) -> None:
  fig.savefig(path, dpi=100)


def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps, values)} of the scalar summaries in a TensorBoard dir."""
  if not os.path.isdir(logdir):
    return {}
  # Imported here: it pulls in TensorBoard's event-reading machinery.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags().get('tensors', []):
    events = acc.Tensors(tag)
    values = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
    if values and all(np.ndim(v) == 0 for v in values):
      out[tag] = (np.array([e.step for e in events]),
                  np.array(values, np.float64))
  return out


def learning_curves(workdir: str, history: dict | None):
  """{split: {'loss'|'accuracy': (steps, values)}} for the curves plot."""
  train = read_scalars(os.path.join(workdir, 'train'))
  evals = read_scalars(os.path.join(workdir, 'eval'))
  curves = {
      'train': {m: train[m] for m in ('loss', 'accuracy') if m in train},
      'test': {m: evals[m] for m in ('loss', 'accuracy') if m in evals},
      'validation': {m: evals[f'validation_{m}'] for m in ('loss', 'accuracy')
                     if f'validation_{m}' in evals},
  }
  for split in SPLITS:  # Fall back on metrics.json's per-epoch records.
    for m in ('loss', 'accuracy'):
      records = [r for r in (history or {}).get('epochs', [])
                 if f'{split}_{m}' in r]
      if m not in curves[split] and records:
        curves[split][m] = (np.array([r['step'] for r in records]),
                            np.array([r[f'{split}_{m}'] for r in records]))
  return curves


def plot_learning_curves(curves, path: str) -> None:
  fig = _figure(figsize=(11, 4.2))
  for i, metric in enumerate(('loss', 'accuracy')):
    ax = fig.add_subplot(1, 2, i + 1)
    for split in SPLITS:
      if metric in curves[split]:
        steps, values = curves[split][metric]
        # (A curve of one point is drawn only by its marker.)
        ax.plot(steps, values, label=split,
                marker='' if split == 'train' and len(steps) > 1 else 'o')
    ax.set_xlabel('step')
    ax.set_ylabel(metric)
    if metric == 'loss':
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # (no curves yet: no legend)
      ax.legend()
  fig.suptitle('Learning curves')
  fig.tight_layout()
  _save(fig, path)


def confusion_matrix(labels, predicted, num_classes: int = 10) -> np.ndarray:
  """[true, predicted] counts."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (np.asarray(labels), np.asarray(predicted)), 1)
  return cm


def plot_confusion_matrix(cm: np.ndarray, path: str) -> None:
  fig = _figure(figsize=(7, 6.3))
  ax = fig.add_subplot()
  ax.imshow(np.log1p(cm), cmap='Blues')
  for (t, p), count in np.ndenumerate(cm):
    if count:
      ax.text(p, t, str(count), ha='center', va='center', fontsize=8,
              color='white' if cm[t, p] > cm.max() / 2 else 'black')
  ax.set_xticks(range(len(cm)))
  ax.set_yticks(range(len(cm)))
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(f'Test confusion matrix ({np.trace(cm)}/{cm.sum()} correct)')
  fig.tight_layout()
  _save(fig, path)


def plot_misclassified(images, labels, probs, path: str,
                       num: int = NUM_MISCLASSIFIED) -> int:
  """Grid of the most confident mistakes; returns how many mistakes exist."""
  predicted = probs.argmax(-1)
  wrong = np.nonzero(predicted != labels)[0]
  wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind='stable')]
  shown = wrong[:num]
  cols = 5
  rows = max(1, -(-len(shown) // cols))
  fig = _figure(figsize=(2 * cols, 2.3 * rows + 0.6))
  if not len(shown):
    fig.text(0.5, 0.5, 'No test mistakes.', ha='center', va='center')
  for k, i in enumerate(shown):
    ax = fig.add_subplot(rows, cols, k + 1)
    ax.imshow(images[i].squeeze(), cmap='gray', vmin=0, vmax=255)
    ax.set_title(f'true {labels[i]} / pred {predicted[i]}\n'
                 f'{probs[i, predicted[i]]:.1%}', fontsize=9)
    ax.axis('off')
  fig.suptitle(f'Most confident test mistakes ({len(shown)} of {len(wrong)})')
  fig.tight_layout()
  _save(fig, path)
  return len(wrong)


def write_report(workdir: str, config, variables, *, test=None,
                 history: dict | None = None,
                 evaluated: dict | None = None) -> str:
  """Writes `<workdir>/report/` (see the module docstring).

  Args:
    workdir: the run's workdir (its event files and metrics.json are read).
    config: the run's config (the model and, if `test` is None, the data).
    variables: the CNN's variables to evaluate on the test set
      ({'params': ..., **model_state}: `TrainState.variables`).
    test: the test `input_pipeline.Split`; loaded from `config` if None.
    history: the loop's result (metrics.json contents); read from the
      workdir if None and the file exists.
    evaluated: `--mode eval`'s record of the checkpoint `variables` come from
      (its step and validation_/test_ metrics): the report describes that
      checkpoint and goes to `<workdir>/eval/report/`, leaving the training
      run's report as it is.

  Returns:
    The report directory.
  """
  out = os.path.join(workdir, *(('eval',) if evaluated else ()), 'report')
  os.makedirs(out, exist_ok=True)
  if history is None:
    path = os.path.join(workdir, 'metrics.json')
    if os.path.exists(path):
      with open(path) as f:
        history = json.load(f)
  if test is None:
    test = input_pipeline.load(config).test
  model = models.create_model(config)
  logits = steps.logits_of(model, jax.device_get(variables), test.images,
                           config.eval_batch_size)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  labels = np.asarray(test.labels)
  predicted = probs.argmax(-1)
  loss = float(np.mean(steps.cross_entropy(logits, labels)))
  accuracy = float(np.mean(predicted == labels))

  plot_learning_curves(learning_curves(workdir, history),
                       os.path.join(out, 'learning_curves.png'))
  cm = confusion_matrix(labels, predicted, config.num_classes)
  plot_confusion_matrix(cm, os.path.join(out, 'confusion_matrix.png'))
  mistakes = plot_misclassified(test.images, labels, probs,
                                os.path.join(out, 'misclassified.png'))
  if evaluated:
    final = {k: v for k, v in evaluated.items()
             if k.startswith(('validation_', 'test_'))}
    step = f'Evaluated the checkpoint at step {evaluated["step"]}.'
  else:
    final = dict((history or {}).get('final', {}))
    step = (history or {}).get('step')
    step = f'Trained for {step} steps.' if step is not None else None
  final.update(test_loss=loss, test_accuracy=accuracy)
  _write_markdown(os.path.join(out, 'report.md'), config, final, cm,
                  mistakes, step)
  logging.info('Report written to %s', out)
  return out


def _write_markdown(path, config, final, cm, mistakes, step) -> None:
  per_class = np.diag(cm) / np.maximum(cm.sum(1), 1)
  lines = ['# mnist_jax report', '']
  if step:
    lines += [step, '']
  lines += ['## Final metrics', '', '| metric | value |', '|---|---|']
  for k, v in sorted(final.items()):
    lines.append(f'| {k} | {metrics_lib.format_value(k, v)} |')
  lines += ['', f'Test: {np.trace(cm)} of {cm.sum()} correct, {mistakes} '
            'mistakes.', '', '| digit | ' + ' | '.join(map(str, range(len(cm))))
            + ' |', '|---' * (len(cm) + 1) + '|',
            '| test accuracy | ' + ' | '.join(f'{a:.1%}' for a in per_class)
            + ' |', '',
            '## Learning curves', '', '![learning curves](learning_curves.png)',
            '', '## Confusion matrix (test)', '',
            '![confusion matrix](confusion_matrix.png)', '',
            '## Most confident mistakes (test)', '',
            '![misclassified](misclassified.png)', '', '## Config', '',
            '```', str(config).rstrip(), '```', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
