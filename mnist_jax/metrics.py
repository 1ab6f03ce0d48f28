"""The metrics: clu collections returned by the steps, merged on the host.

Add a metric here (a field of `TrainMetrics` or `EvalMetrics`); it then
reaches metrics.json, TensorBoard, the epoch line and the report by name.
One computed from what the steps already pass (`loss`, `logits`, `labels`,
`learning_rate`, `mask`) needs nothing else; one from another value (e.g.
`metrics.Average.from_output('grad_norm')`) also needs that value passed by
name to `single_from_model_output` in `steps.train_step` / `eval_step`.
"""

import dataclasses

import flax
import jax
import numpy as np
from clu import metrics


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """Per-step training metrics: mean loss, accuracy, learning rate used."""
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy
  learning_rate: metrics.LastValue.from_output('learning_rate')


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  """Evaluation metrics; `mask` excludes padding so each example counts once."""
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


# Shorter names on the epoch line.
_SHORT_NAMES = {'accuracy': 'acc', 'learning_rate': 'lr'}


def names(collection_cls) -> tuple[str, ...]:
  """The metric names a collection class computes, in definition order."""
  return tuple(f.name for f in dataclasses.fields(collection_cls)
               if not f.name.startswith('_'))


def format_value(name: str, value: float) -> str:
  """A metric value for people: accuracies in percent, others to 4 digits."""
  return f'{value:.2%}' if name.endswith('accuracy') else f'{value:.4g}'


def format_split(split: str, record: dict[str, float], metric_names) -> str:
  """'train loss 0.1234 acc 97.12%' from `record`'s `<split>_<name>` keys."""
  shown = [f'{_SHORT_NAMES.get(n, n)} {format_value(n, record[f"{split}_{n}"])}'
           for n in metric_names if f'{split}_{n}' in record]
  return ' '.join([split] + shown) if shown else ''


def merge_stacked(stacked, start: int = 0, stop=None):
  """Merges steps [start, stop) of a collection stacked by `lax.scan`.

  Args:
    stacked: a collection whose leaves have a leading step axis (numpy).
    start: first step to merge.
    stop: one past the last step (default: all).

  Returns:
    One collection: averages over the steps, `LastValue` of the last step.
  """
  stop = len(jax.tree.leaves(stacked)[0]) if stop is None else stop
  merged = None
  for i in range(start, stop):
    one = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    merged = one if merged is None else merged.merge(one)
  return merged


def to_scalars(collection, prefix: str = ''):
  """Computes a collection into plain Python floats, optionally prefixed."""
  return {prefix + k: float(v) for k, v in collection.compute().items()}
