"""One sweep point as a Ray Tune trial: `train_and_evaluate` in its workdir.

`PointTrainable` is Tune's view of a point: every `step()` is one epoch.
Training runs in a thread of the trial's process and hands each epoch's
record over in `train_and_evaluate`'s `on_epoch` callback, then waits: the
next `step()` lets it go on, while Tune stopping the trial (the early-stopping
rule, or an interrupted sweep) makes `on_epoch` return True, so the point
saves a checkpoint and returns cleanly. A retried or re-run point resumes
from its own checkpoints in `<W>/<point name>`. Tune starts the next point in
a finished point's process (`reset_config`), not in a fresh one.

A trial's console is a single run's (see `console`): library log records and
TensorFlow's C++ notices go to `<W>/<point name>/log.txt`, with the parameter
table; what reaches the console (and Ray's copy of it on the driver) is the
point's progress, epoch lines and warnings, each line tagged with its point.

`PointEnd`, a Tune callback on the sweep's driver, reports each point as it
ends and writes its TensorBoard HParams.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from typing import Any

from absl import flags
from absl import logging
import ml_collections
import ray
from ray import cloudpickle
from ray import tune

from mnist_jax import console
from mnist_jax import sweep_results
from mnist_jax import train

# Keys of every result a trial reports to Tune (besides Tune's own).
POINT_KEY = 'point'  # the point's name; its one search-space parameter
STATUS_KEY = 'point_status'  # 'running', or 'done'/'stopped early' at the end
EPOCH_KEY = 'epoch'  # the early-stopping rules' clock
METRIC = 'validation_accuracy'  # what they compare; never the test accuracy
# In a point's workdir: its wall time over all attempts and re-runs so far.
WALL_FILE = 'sweep_wall_seconds.json'


class PointTrainable(tune.Trainable):
  """Trains one point, an epoch per `step()`; see the module docstring."""

  def setup(self, config: dict[str, Any], *,
            plan: dict[str, tuple[dict[str, Any], str]], cwd: str,
            verbosity: int | None = None):
    """Args: config: {POINT_KEY: name}; plan: {name: (its config as a dict,
    its workdir)}; cwd: the sweep's working directory, for relative paths
    in the config (where it exists on this node); verbosity: the driver's
    `--verbosity` when it asked for log records on the console, else None."""
    self._plan, self._cwd = plan, cwd
    self._node = ray.get_runtime_context().get_node_id()  # Where it ran.
    self._lines = _quiet_console(verbosity)
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
    for stream in self._lines:
      stream.tag = f'[{self._name}] '
    os.makedirs(self._workdir, exist_ok=True)
    console.log_to_file(self._workdir)
    self._records: queue.Queue = queue.Queue()  # training -> step()
    self._go: queue.Queue = queue.Queue()  # step() -> training: stop?
    self._thread: threading.Thread | None = None  # started by step()
    self._start = time.time()
    self._earlier = read_wall_seconds(self._workdir) or 0.0  # earlier attempts
    self._seen: list[dict[str, Any]] = []

  def _wall_seconds(self) -> float:
    """The point's wall time so far, earlier attempts included; kept in its
    workdir for the next attempt (a retry, or a re-run of the sweep)."""
    seconds = self._earlier + time.time() - self._start
    sweep_results.write_json(os.path.join(self._workdir, WALL_FILE),
                             {'wall_seconds': seconds})
    return seconds

  def _on_epoch(self, record: dict[str, Any]) -> bool:
    self._records.put(('epoch', record))
    return self._go.get()  # Until Tune asks for another epoch, or stops.

  def _train(self):
    try:
      result = train.train_and_evaluate(
          self._config, self._workdir, on_epoch=self._on_epoch,
          hooks=train.default_hooks(self._config, print_overview=False))
      self._records.put(('end', result))
    except BaseException as e:  # pylint: disable=broad-except
      # The traceback in the point's log.txt (and Tune's error.txt), not on
      # the console: its line there is the driver's (`PointEnd`).
      logging.info('The point failed.', exc_info=True)
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
      self._wall_seconds()
      raise value  # Tune records the trial as failed with this error.
    if kind == 'epoch':
      # The best so far of this attempt's epochs (a resumed point's earlier
      # ones are in its checkpoint); the last report covers the whole run.
      self._seen.append(value)
      summary = sweep_results.summarize({'epochs': self._seen,
                                         'step': value['step']})
      return {**value, **summary, STATUS_KEY: 'running', 'node_id': self._node,
              'wall_seconds': self._wall_seconds()}
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
            'wall_seconds': self._wall_seconds(),
            STATUS_KEY: sweep_results.DONE, 'node_id': self._node, 'done': True}

  def cleanup(self):
    """Tune stops the trial: the training stops after saving a checkpoint."""
    if self._thread is not None and self._thread.is_alive():
      self._go.put(True)
      self._thread.join()
      self._wall_seconds()


def read_wall_seconds(workdir: str) -> float | None:
  """A point's wall time over its attempts so far (`WALL_FILE`); None if
  it never started (or the file is damaged: the count starts again)."""
  try:
    with open(os.path.join(workdir, WALL_FILE)) as f:
      return float(json.load(f)['wall_seconds'])
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError):
    logging.warning('Ignoring %s: not a wall time.',
                    os.path.join(workdir, WALL_FILE))
    return None


def _quiet_console(verbosity: int | None) -> tuple[_Tagged, _Tagged]:
  """Sets up this trial process's console as `launch.py` does a run's (once
  per process); returns its stdout and stderr, which tag lines by point."""
  if not isinstance(sys.stdout, _Tagged):
    if not flags.FLAGS.is_parsed():  # absl logs to stderr until parsed
      flags.FLAGS(['trial'], known_only=True)
      # As `absl.app.run` does: INFO, unless the driver asked for a level.
      flags.FLAGS.verbosity = 0 if verbosity is None else verbosity
    console.setup(verbose=verbosity is not None)
    sys.stdout, sys.stderr = _Tagged(sys.stdout), _Tagged(sys.stderr)
  return sys.stdout, sys.stderr


class _Tagged(console.StreamProxy):
  """A text stream that starts each line with `tag` (the running point's
  name): Ray prefixes a trial's lines with its process, which runs one
  point after another."""

  def __init__(self, stream):
    super().__init__(stream)
    self.tag = ''
    self._line_start = True
    self._lock = threading.Lock()

  def write(self, s: str) -> int:
    with self._lock:
      parts = []
      for line in s.splitlines(keepends=True):
        parts.append(self.tag + line if self._line_start else line)
        self._line_start = line.endswith(('\n', '\r'))
      self.stream.write(''.join(parts))
    return len(s)


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

  def on_trial_recover(self, iteration, trials, trial, **info):
    del iteration, trials, info
    # Tune retries a failed point in a fresh process (`max_failures`).
    print(f'{trial.config[POINT_KEY]}: attempt {trial.num_failures} failed '
          f'({describe_error(trial, running=True)}); trying again.',
          flush=True)


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
