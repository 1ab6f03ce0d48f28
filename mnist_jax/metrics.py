"""clu metric collections returned by the steps and merged on the host."""


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
