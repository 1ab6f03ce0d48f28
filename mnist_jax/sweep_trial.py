"""One sweep point as a Ray Tune trial: `train_and_evaluate` in its workdir.

`PointTrainable` is Tune's view of a point: every `step()` is one epoch.
Training runs in a thread of the trial's process and hands each epoch's
record over in `train_and_evaluate`'s `on_epoch` callback, then waits: the
next `step()` lets it go on, while Tune stopping the trial (the early-stopping
rule, or an interrupted sweep) makes `on_epoch` return True, so the point
saves a checkpoint and returns cleanly. A retried or re-run point resumes
from its own checkpoints in `<W>/<point name>`. Tune starts the next point in
a finished point's process (`reset_config`), not in a fresh one.

`PointEnd`, a Tune callback on the sweep's driver, reports each point as it
ends and writes its TensorBoard HParams.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import ml_collections
import ray
from ray import cloudpickle
from ray import tune

from mnist_jax import sweep_results
from mnist_jax import train

# Keys of every result a trial reports to Tune (besides Tune's own).
POINT_KEY = 'point'  # the point's name; its one search-space parameter
STATUS_KEY = 'point_status'  # 'running', or 'done'/'stopped early' at the end
EPOCH_KEY = 'epoch'  # the early-stopping rules' clock
METRIC = 'validation_accuracy'  # what they compare; never the test accuracy


class PointTrainable(tune.Trainable):
  """Trains one point, an epoch per `step()`; see the module docstring."""

  def setup(self, config: dict[str, Any], *,
            plan: dict[str, tuple[dict[str, Any], str]], cwd: str):
    """Args: config: {POINT_KEY: name}; plan: {name: (its config as a dict,
    its workdir)}; cwd: the sweep's working directory, for relative paths
    in the config (where it exists on this node)."""
    self._plan, self._cwd = plan, cwd
    self._node = ray.get_runtime_context().get_node_id()  # Where it ran.
    self._begin(config)

  def reset_config(self, new_config: dict[str, Any]) -> bool:
    """The next point in this process (Tune reuses the actor): the last one
    stops first, saving a checkpoint if Tune stopped it early."""
    self.cleanup()
    self._begin(new_config)
    return True

  def _begin(self, config: dict[str, Any]) -> None:
    self._name = config[POINT_KEY]
    config_dict, self._workdir = self._plan[self._name]
    self._config = ml_collections.ConfigDict(config_dict)
    if os.path.isdir(self._cwd):
      os.chdir(self._cwd)  # Tune starts trials in their own log folder.
    self._records: queue.Queue = queue.Queue()  # training -> step()
    self._go: queue.Queue = queue.Queue()  # step() -> training: stop?
    self._thread: threading.Thread | None = None  # started by step()
    self._start = time.time()
    self._seen: list[dict[str, Any]] = []

  def _on_epoch(self, record: dict[str, Any]) -> bool:
    self._records.put(('epoch', record))
    return self._go.get()  # Until Tune asks for another epoch, or stops.

  def _train(self):
    try:
      result = train.train_and_evaluate(self._config, self._workdir,
                                        on_epoch=self._on_epoch)
      self._records.put(('end', result))
    except BaseException as e:  # pylint: disable=broad-except
      self._records.put(('error', e))

  def step(self) -> dict[str, Any]:
    if self._thread is None:
      # TensorFlow (for summaries; GPUs hidden) is imported by
      # `train_and_evaluate` in the background, beside data loading and
      # compilation, not here before them.
      self._thread = threading.Thread(target=self._train, daemon=True,
                                      name=f'train {self._name}')
      self._thread.start()
    else:
      self._go.put(False)  # Tune wants the next epoch.
    kind, value = self._records.get()
    if kind == 'epoch' and self._is_last(value):
      # No rule acts on the last epoch: the run finishes (metrics.json) and
      # its report is the whole run's, resumed epochs included.
      self._go.put(False)
      kind, value = self._records.get()
    if kind == 'error':
      raise value  # Tune records the trial as failed with this error.
    if kind == 'epoch':
      # The best so far of this attempt's epochs (a resumed point's earlier
      # ones are in its checkpoint); the last report covers the whole run.
      self._seen.append(value)
      summary = sweep_results.summarize({'epochs': self._seen,
                                         'step': value['step']})
      return {**value, **summary, STATUS_KEY: 'running', 'node_id': self._node,
              'wall_seconds': time.time() - self._start}
    return self._finish(value)

  def _is_last(self, record: dict[str, Any]) -> bool:
    limit = self._config.num_train_steps
    return (record['epoch'] >= self._config.num_epochs
            or 0 < limit <= record['step'])

  def _finish(self, result: dict[str, Any]) -> dict[str, Any]:
    """The last report: the whole run's summary (resumed epochs included)."""
    if result.get('stopped_early'):  # Not asked to (that is `cleanup`).
      raise RuntimeError('The point was pre-empted after saving a checkpoint;'
                         ' its retry resumes from it.')
    last = result['epochs'][-1] if result['epochs'] else {}
    return {**last, **sweep_results.summarize(result),
            'wall_seconds': time.time() - self._start,
            STATUS_KEY: sweep_results.DONE, 'node_id': self._node, 'done': True}

  def cleanup(self):
    """Tune stops the trial: the training stops after saving a checkpoint."""
    if self._thread is not None and self._thread.is_alive():
      self._go.put(True)
      self._thread.join()


# ------------------------------------------------------- on the driver

class PointEnd(tune.Callback):
  """On the driver, as each point finishes, stops early or fails: prints a
  line and writes the point's HParams (see `sweep_results`)."""

  def __init__(self, workdir: str, overrides: dict[str, dict[str, Any]]):
    self.workdir, self.overrides = workdir, overrides

  def _say(self, trials, trial, what: str):
    # Counted over the whole sweep: a re-run goes on from the points that
    # ended before it.
    ended = 1 + sum(t is not trial and t.status in ('TERMINATED', 'ERROR')
                    for t in trials)
    print(f'[{ended}/{len(self.overrides)}] '
          f'{trial.config[POINT_KEY]}: {what}', flush=True)

  def on_trial_complete(self, iteration, trials, trial, **info):
    del iteration, info
    r = trial.last_result or {}
    acc = r.get('best_validation_accuracy')
    acc = f', best validation accuracy {acc:.2%}' if acc is not None else ''
    if r.get(STATUS_KEY) == sweep_results.DONE:
      self._say(trials, trial, f'done in {r["wall_seconds"]:.0f} s{acc}')
    else:
      self._say(trials, trial,
                f'stopped early after epoch {r.get("epoch")}{acc}')
    name = trial.config[POINT_KEY]
    sweep_results.write_point_hparams(os.path.join(self.workdir, name),
                                      self.overrides[name], r)

  def on_trial_error(self, iteration, trials, trial, **info):
    del iteration, info
    self._say(trials, trial,
              f'FAILED: {describe_error(trial, running=True)}')


def describe_error(trial, *, running: bool = False) -> str:
  """One line for a failed trial's error: the point's own exception.

  While Tune runs (`running`), a fresh error is only in its local staging
  copy; afterwards it is in the experiment's folder.
  """
  error = None
  if running and os.path.exists(trial.pickled_error_file or ''):
    with open(trial.pickled_error_file, 'rb') as f:
      error = cloudpickle.load(f)
  error = error or trial.get_pickled_error() or trial.get_error()
  cause = getattr(error, 'cause', None) or error  # RayTaskError wraps it.
  if isinstance(cause, BaseException):
    text = f'{type(cause).__name__}: {cause}'
  else:
    text = str(cause)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return lines[0] if lines else 'unknown error'
