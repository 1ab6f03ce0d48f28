"""Runs a sweep: each point in its own sub-workdir, resumably.

`run_sweep(config, points, workdir)` validates the whole sweep first (see
`sweep.validate_sweep`), then runs every point that has not finished, by
default each in its own Python process (`python -m mnist_jax.sweep_run <sub>`)
so that a point that crashes, even hard, cannot take the sweep down, and
`parallel=N` is simply N processes at once.

Each sub-workdir holds, besides what training writes there:

* `sweep_config.json`: the point's full config; the worker trains from it.
* `sweep_status.json`: written by the parent only: 'running', 'done',
  'failed' (+ error) or 'interrupted' (pre-empted by SIGTERM after saving a
  checkpoint), attempts and the wall time summed over attempts.
* `sweep_log.txt`: the worker's stdout and stderr.

Re-running skips points whose status is 'done' and whose `metrics.json` is
complete; every other point (never started, failed, or interrupted while
'running') is run again with `train.train_and_evaluate` on the same
sub-workdir, which resumes from the point's latest checkpoint when there is
one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

import ml_collections

from mnist_jax import sweep as sweep_lib
from mnist_jax import sweep_results
from mnist_jax.errors import ConfigError

CONFIG_FILE = 'sweep_config.json'
STATUS_FILE = 'sweep_status.json'
ERROR_FILE = 'sweep_error.txt'
LOG_FILE = 'sweep_log.txt'
METRICS_FILE = 'metrics.json'  # Written by train.train_and_evaluate.

# A point stopped by SIGTERM after saving a checkpoint (launch.py's exit
# status for it is 128 + SIGTERM): not failed; the next run resumes it.
_EXIT_PREEMPTED = 143
_PREEMPTED = 'pre-empted (SIGTERM) after saving a checkpoint; re-run to resume'

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Point:
  """One point of a sweep and what is known about its run."""
  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict
  workdir: str
  status: dict[str, Any] = dataclasses.field(default_factory=dict)
  skipped: bool = False  # Finished by an earlier run of the sweep.


# -------------------------------------------------------------- bookkeeping

def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # Atomic: an interrupted sweep never leaves half a file.


def read_metrics(point_workdir: str) -> dict[str, Any] | None:
  """The point's metrics.json if it is complete (has final metrics)."""
  metrics = _read_json(os.path.join(point_workdir, METRICS_FILE))
  if isinstance(metrics, dict) and metrics.get('final'):
    return metrics
  return None


def is_finished(point_workdir: str) -> bool:
  """Whether an earlier run of the sweep completed this point."""
  status = _read_json(os.path.join(point_workdir, STATUS_FILE)) or {}
  return (status.get('status') == 'done'
          and read_metrics(point_workdir) is not None)


def _config_json(config: ml_collections.ConfigDict):
  # Round-trips through JSON so stored and current configs compare equal.
  return json.loads(config.to_json_best_effort())


def _check_same_config(point: Point) -> None:
  """A sub-workdir may only be resumed with the config it was started with;
  otherwise the table would silently mix runs of different configs. Fields
  that only one of the two configs has (added or removed by a code change
  since) are not compared."""
  stored = _read_json(os.path.join(point.workdir, CONFIG_FILE))
  if stored is None:
    return
  old, new = _flatten(stored), _flatten(_config_json(point.config))
  diff = sorted(k for k in set(old) & set(new) if old[k] != new[k])
  if diff:
    raise ConfigError(
        f'{point.workdir} was run with a different config (differs in '
        f'{", ".join(diff)}); use a new --workdir for a changed sweep.')


def _flatten(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# ------------------------------------------------------------------ running

def _start(point: Point) -> None:
  os.makedirs(point.workdir, exist_ok=True)
  _write_json(os.path.join(point.workdir, CONFIG_FILE),
              _config_json(point.config))
  error_file = os.path.join(point.workdir, ERROR_FILE)
  if os.path.exists(error_file):
    os.remove(error_file)
  previous = point.status
  point.status = {
      'status': 'running', 'overrides': point.overrides,
      'attempts': previous.get('attempts', 0) + 1,
      'wall_seconds': previous.get('wall_seconds', 0.0),
      'started': time.time()}
  _write_json(os.path.join(point.workdir, STATUS_FILE), point.status)


def _finish(point: Point, error: str | None) -> None:
  status = point.status
  status['wall_seconds'] += time.time() - status.pop('started')
  if error is None and read_metrics(point.workdir) is None:
    error = f'no complete {METRICS_FILE} was written'
  if error == _PREEMPTED:
    status['status'] = 'interrupted'
  else:
    status['status'] = 'failed' if error else 'done'
  status['error'] = error
  _write_json(os.path.join(point.workdir, STATUS_FILE), status)


def _error_of_process(point: Point, returncode: int) -> str:
  """The worker's own account of its error, else the log's last line."""
  if returncode in (_EXIT_PREEMPTED, -15):
    return _PREEMPTED
  try:
    with open(os.path.join(point.workdir, ERROR_FILE)) as f:
      return f.read().strip()
  except OSError:
    pass
  try:
    with open(os.path.join(point.workdir, LOG_FILE)) as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    lines = []
  last = f': {lines[-1]}' if lines else ''
  return f'worker exited with status {returncode}{last}'


def _run_in_process(point: Point) -> str | None:
  from mnist_jax import train  # pylint: disable=g-import-not-at-top
  try:
    result = train.train_and_evaluate(point.config, point.workdir)
  except Exception as e:  # pylint: disable=broad-except
    return _describe(e)
  return _PREEMPTED if result and result.get('stopped_early') else None


def _describe(e: BaseException) -> str:
  return f'{type(e).__name__}: {e}'.splitlines()[0]


def _popen(point: Point, python: str) -> subprocess.Popen:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (_PROJECT_ROOT, env.get('PYTHONPATH')) if p)
  with open(os.path.join(point.workdir, LOG_FILE), 'a') as log:
    return subprocess.Popen(
        [python, '-m', 'mnist_jax.sweep_run', point.workdir], env=env,
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        # Own session: a terminal's Ctrl-C reaches only the sweep, which then
        # stops the workers with SIGTERM so that they save a checkpoint.
        start_new_session=True)


def _log(message: str) -> None:
  print(message, flush=True)


def _report(point: Point, index: str) -> None:
  status = point.status
  if status['status'] == 'done':
    row = sweep_results.point_row(point)
    _log(f'[{index}] {point.name}: done in {status["wall_seconds"]:.0f} s, '
         f'best validation accuracy {row["best_validation_accuracy"]:.2%}')
  else:
    _log(f'[{index}] {point.name}: {status["status"].upper()}: '
         f'{status["error"]}')


def run_sweep(config: ml_collections.ConfigDict,
              points: Sequence[dict[str, Any]], workdir: str, *,
              parallel: int = 1, in_process: bool = False,
              python: str = sys.executable,
              on_finish: Callable[[Point], None] | None = None
              ) -> list[Point]:
  """Runs the sweep's unfinished points and writes the results tables.

  Args:
    config: the base config; each point overrides some of its fields.
    points: the sweep (see `sweep.product` and friends).
    workdir: the sweep's directory; point `p` runs in
      `<workdir>/<sweep.point_name(p)>`.
    parallel: how many points run at once (worker processes).
    in_process: run points one after another in this process instead of in
      worker processes (no process start-up; a hard crash ends the sweep).
    python: the interpreter for worker processes.
    on_finish: called with each point when it has finished or failed.

  Returns:
    All points, in sweep order, with their status.

  Raises:
    ConfigError: the sweep is invalid (nothing has run then), `parallel` is
      not positive, or a sub-workdir holds a run of a different config.
  """
  if not isinstance(parallel, int) or parallel < 1:
    raise ConfigError(f'--sweep_parallel={parallel!r}: must be a positive '
                      'integer (points run at once).')
  plan = [Point(name, overrides, point_config, os.path.join(workdir, name))
          for name, overrides, point_config
          in sweep_lib.validate_sweep(config, points)]
  for point in plan:
    _check_same_config(point)
    point.status = _read_json(os.path.join(point.workdir, STATUS_FILE)) or {}
    point.skipped = is_finished(point.workdir)
  os.makedirs(workdir, exist_ok=True)
  sweep_results.write_hparams_config(workdir, plan)
  todo = [p for p in plan if not p.skipped]
  _log(f'Sweep of {len(plan)} points in {workdir}: {len(plan) - len(todo)} '
       f'already done, {len(todo)} to run'
       + (f', {parallel} at a time.' if todo and not in_process else '.'))

  count = 0

  def finished(point: Point, error: str | None):
    nonlocal count
    _finish(point, error)
    count += 1
    _report(point, f'{count}/{len(todo)}')
    sweep_results.write_point_hparams(point)
    sweep_results.write_tables(workdir, plan)
    if on_finish:
      on_finish(point)

  if in_process:
    for point in todo:
      _start(point)
      finished(point, _run_in_process(point))
      if point.status['status'] == 'interrupted':
        break  # This process got SIGTERM: stop here, resume on re-run.
  else:
    _run_processes(todo, parallel, python, finished)
  sweep_results.write_tables(workdir, plan)
  return plan


def run_from_file(config_filename: str, config: ml_collections.ConfigDict,
                  workdir: str, parallel: int = 1) -> int:
  """`launch.py --sweep`: runs the sweep of a config file, prints the table.

  Args:
    config_filename: 'path[:arg]' of a config file defining `get_sweep`.
    config: its config, with the command line's `--config.*` overrides (they
      apply to every point; the sweep's overrides win).
    workdir: the sweep's directory.
    parallel: points run at once.

  Returns:
    The exit status: 0 if every point is done, 1 if any failed, 143 if the
    sweep was interrupted (Ctrl-C or SIGTERM).
  """
  try:
    points = run_sweep(config, sweep_lib.load_sweep(config_filename),
                       workdir, parallel=parallel)
  except KeyboardInterrupt:
    print('Sweep interrupted; run the same command again to resume it.',
          file=sys.stderr, flush=True)
    return _EXIT_PREEMPTED
  with open(os.path.join(workdir, sweep_results.MD_FILE)) as f:
    _log('\n' + f.read())
  failed = [p.name for p in points if p.status.get('status') != 'done']
  if failed:
    print(f'{len(failed)} of {len(points)} points failed ({", ".join(failed)});'
          f' see their {LOG_FILE}. Re-run the same command to retry them.',
          file=sys.stderr, flush=True)
    return 1
  return 0


def _run_processes(todo: list[Point], parallel: int, python: str,
                   finished: Callable[[Point, str | None], None]) -> None:
  """Keeps up to `parallel` worker processes busy until all points ran."""
  queue, running = list(todo), {}

  def on_sigterm(signum, frame):
    del signum, frame
    raise KeyboardInterrupt('SIGTERM')

  # A pre-empted sweep stops its workers too, rather than orphaning them.
  old_handler = None
  if threading.current_thread() is threading.main_thread():
    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    while queue or running:
      while queue and len(running) < parallel:
        point = queue.pop(0)
        _start(point)
        _log(f'Starting {point.name} (log: {point.workdir}/{LOG_FILE})')
        running[point.name] = (point, _popen(point, python))
      time.sleep(0.2)
      for name, (point, proc) in list(running.items()):
        if proc.poll() is not None:
          del running[name]
          rc = proc.returncode
          finished(point, None if rc == 0 else _error_of_process(point, rc))
  finally:
    # Interrupted (e.g. Ctrl-C): stop our workers (SIGTERM: they save a
    # checkpoint); the next run of the sweep resumes them from it.
    for _, proc in running.values():
      proc.terminate()
    for point, proc in running.values():
      _finish(point, _error_of_process(point, proc.wait()))
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)


# ------------------------------------------------------------------- worker

def _worker_main(point_workdir: str) -> int:
  """Trains one point from its sweep_config.json (run by `_popen`)."""
  from mnist_jax import tf_setup, train  # pylint: disable=g-import-not-at-top
  tf_setup.hide_accelerators_from_tf()
  config = ml_collections.ConfigDict(
      _read_json(os.path.join(point_workdir, CONFIG_FILE)))
  try:
    result = train.train_and_evaluate(config, point_workdir)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    with open(os.path.join(point_workdir, ERROR_FILE), 'w') as f:
      f.write(_describe(e))
    return 1
  return _EXIT_PREEMPTED if result and result.get('stopped_early') else 0


if __name__ == '__main__':
  sys.exit(_worker_main(sys.argv[1]))
