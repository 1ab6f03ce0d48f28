"""Runs a sweep on Ray Tune: every point a trial, in its own sub-workdir.

`run_sweep(config, sweep, workdir)` validates the whole sweep first (see
`sweep.validate_sweep`), then runs each point as a Ray Tune trial
(`sweep_trial.PointTrainable`: `train.train_and_evaluate(point_config,
<workdir>/<point name>)`), with the sweep's early-stopping rule, if any, as
Tune's scheduler. Without an address Ray runs embedded (a single-machine
cluster inside this process's lifetime); with one (`RAY_ADDRESS` or
`address=`) the trials spread over that cluster's nodes, which then need the
project installed and `<workdir>` on a shared file system.

Tune's experiment state and trial logs live in `<workdir>/ray_tune`. Re-running
the same sweep restores that experiment: finished and early-stopped points are
kept, failed and unfinished ones run again and resume from their own
checkpoints. A trial that loses its node is retried (`max_failures`), also
from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Sequence
import warnings

from absl import flags
import ml_collections

from mnist_jax import checkpointing
from mnist_jax import config_lib
from mnist_jax import console
from mnist_jax import sweep as sweep_lib
from mnist_jax import sweep_results
from mnist_jax.errors import ConfigError
from mnist_jax.errors import UserError

# Ray folds lines of its processes that differ only in numbers into one
# ('[repeated 6x across cluster]'): with points in parallel that dropped most
# epoch lines, tagged with one point's name. Read when ray is imported.
os.environ.setdefault('RAY_DEDUP_LOGS', '0')

try:  # Ray is an optional extra; without it `--sweep` says what to install.
  import ray
  from ray import tune
  from ray.tune import logger as tune_logger
  from ray.tune import schedulers
  from mnist_jax import sweep_trial
except ImportError as e:
  if not (e.name or '').startswith('ray'):
    raise
  ray = None

EXPERIMENT = 'ray_tune'  # Tune's folder in the sweep's workdir
SWEEP_FILE = 'sweep.json'  # The points' configs, to refuse a changed sweep.
INSTALL_RAY = ("--sweep runs the points on Ray, which is not installed: "
               "pip install 'ray[tune]' (or pip install -e '.[sweep]').")
EXIT_INTERRUPTED = 143  # As a pre-empted training run: re-run to resume.
# Environment variables that trials on other nodes need as well.
_FORWARDED_ENV = ('TFDS_DATA_DIR', 'MNIST_JAX_')


# ------------------------------------------------------------- resources

def trial_resources(nodes: Sequence[dict[str, Any]],
                    parallel: int) -> dict[str, float]:
  """The resources one point asks Ray for.

  Args:
    nodes: `ray.nodes()`: the cluster's nodes and their resources.
    parallel: with accelerators, points per accelerator (each gets a share);
      else points per machine (the smallest machine's CPUs shared).

  Returns:
    {'CPU': n} on CPU-only clusters, else one (or 1/parallel of a) GPU or
    one TPU chip, Ray making only that accelerator visible to the point.
  """
  alive = [n['Resources'] for n in nodes
           if n.get('Alive') and n['Resources'].get('CPU', 0) > 0]
  if any(r.get('GPU') for r in alive):
    return {'CPU': 1, 'GPU': 1 / parallel}
  if any(r.get('TPU') for r in alive):
    return {'CPU': 1, 'TPU': 1}
  cpus = min((r['CPU'] for r in alive), default=1)
  return {'CPU': max(1, int(cpus // parallel))}


def scheduler(early_stopping: sweep_lib.EarlyStopping | None, max_epochs: int):
  """Tune's trial scheduler for the sweep's early-stopping rule.

  Both rules compare points on their validation accuracy at equal epochs.
  """
  if early_stopping is None:
    return schedulers.FIFOScheduler()
  common = dict(time_attr=sweep_trial.EPOCH_KEY, metric=sweep_trial.METRIC,
                mode='max', grace_period=early_stopping.grace_epochs)
  if early_stopping.rule == 'asha':
    return schedulers.ASHAScheduler(
        max_t=max(max_epochs, early_stopping.grace_epochs),
        reduction_factor=early_stopping.reduction_factor, **common)
  # With too few points to compare, Tune's rule would pause a point for
  # pending ones ('yielding time'), which saves and restores it through Tune's
  # checkpoints: a point goes on instead, its own checkpoints in its workdir.
  return schedulers.MedianStoppingRule(
      min_samples_required=early_stopping.min_samples,
      min_time_slice=float('inf'), **common)


# ------------------------------------------------------- same sweep again

# Fields a re-run of a sweep may change: how its points run and log, not
# what they train. The rest are the sweep's (duration and evaluation cadence
# too: finished points are not run again).
MAY_CHANGE_ON_RERUN = tuple(
    f for f in checkpointing.MAY_CHANGE_ON_RESUME
    if f not in ('num_epochs', 'num_train_steps', 'eval_every_epochs',
                 'init_from'))


def check_same_sweep(workdir: str, spec: dict[str, Any]) -> None:
  """Refuses to continue a workdir's sweep with other points or configs.

  Args:
    workdir: the sweep's directory; `spec` is stored there on the first run.
    spec: {'points': {name: config as JSON}, 'early_stopping': ...}.

  Raises:
    ConfigError: the stored sweep has other points, another early-stopping
      rule, or a point's config differs (fields only one of the two has,
      added or removed by a code change since, are not compared, nor
      `MAY_CHANGE_ON_RERUN`).
  """
  path = os.path.join(workdir, SWEEP_FILE)
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    os.makedirs(workdir, exist_ok=True)
    sweep_results.write_json(path, spec)
    return
  fix = 'use a new --workdir for a changed sweep.'
  old, new = stored['points'], spec['points']
  if set(old) != set(new):
    added, gone = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    raise ConfigError(
        f'{workdir} holds a sweep with other points (new: {added or "none"}; '
        f'missing: {gone or "none"}); {fix}')
  if stored.get('early_stopping') != spec['early_stopping']:
    raise ConfigError(f'{workdir} holds a sweep with another early-stopping '
                      f'rule ({stored.get("early_stopping")}); {fix}')
  for name in new:
    diff = checkpointing.changed_fields(old[name], new[name],
                                        MAY_CHANGE_ON_RERUN)
    if diff:
      raise ConfigError(f'{os.path.join(workdir, name)} was run with a '
                        f'different config (differs in {", ".join(diff)}); '
                        f'{fix}')


# -------------------------------------------------------------- running

def _tuner(plan, workdir: str, early_stopping, *, parallel: int,
           max_failures: int):
  trainable = tune.with_resources(
      tune.with_parameters(
          sweep_trial.PointTrainable, cwd=os.getcwd(),
          verbosity=(flags.FLAGS['verbosity'].value
                     if console.verbose_requested() else None),
          plan={name: (point_config.to_dict(), os.path.join(workdir, name))
                for name, _, point_config in plan}),
      trial_resources(ray.nodes(), parallel))
  path = os.path.join(workdir, EXPERIMENT)
  # Tune's JSON and CSV logs, not its TensorBoard files: those would show
  # up in `tensorboard --logdir <workdir>` beside the points' own.
  callbacks = [sweep_trial.PointEnd(workdir, {n: p for n, p, _ in plan}),
               tune_logger.JsonLoggerCallback(),
               tune_logger.CSVLoggerCallback()]
  run_config = tune.RunConfig(
      name=EXPERIMENT, storage_path=workdir, callbacks=callbacks,
      verbose=1 if console.verbose_requested() else 0,
      # The points' own checkpoints (in their workdirs) resume them.
      checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
      failure_config=tune.FailureConfig(max_failures=max_failures))
  if tune.Tuner.can_restore(path):
    print(f'Continuing the sweep recorded in {path}.', flush=True)
    # Finished and stopped points stay; the others resume from their
    # own checkpoints. The stored run config (and callbacks) is used.
    return tune.Tuner.restore(path, trainable, resume_unfinished=True,
                              restart_errored=True)
  names = [name for name, _, _ in plan]

  def trial_name(trial):
    return trial.config[sweep_trial.POINT_KEY]

  max_epochs = max(c.num_epochs for _, _, c in plan)
  return tune.Tuner(
      trainable,
      param_space={sweep_trial.POINT_KEY: tune.grid_search(names)},
      tune_config=tune.TuneConfig(
          scheduler=scheduler(early_stopping, max_epochs),
          # The next point starts in the last one's process, its imports
          # and JAX's in-memory caches already there.
          reuse_actors=True,
          trial_name_creator=trial_name, trial_dirname_creator=trial_name),
      run_config=run_config)


def _rows(plan, workdir: str) -> list[dict[str, Any]]:
  """The table's rows from Tune's record of the experiment."""
  analysis = tune.ExperimentAnalysis(os.path.join(workdir, EXPERIMENT))
  trials = {t.config[sweep_trial.POINT_KEY]: t for t in analysis.trials}
  keys = sweep_results.override_keys([p for _, p, _ in plan])
  rows = []
  for name, point, point_config in plan:
    trial = trials.get(name)
    last = dict(trial.last_result or {}) if trial else {}
    if trial is None or trial.status not in ('TERMINATED', 'ERROR'):
      status, error = sweep_results.PENDING, ''
    elif trial.status == 'ERROR':
      status, error = sweep_results.FAILED, sweep_trial.describe_error(trial)
    elif last.get(sweep_trial.STATUS_KEY) == sweep_results.DONE:
      status, error = sweep_results.DONE, ''
    else:  # Terminated by Tune before its last epoch: the scheduler's rule.
      status, error = sweep_results.STOPPED, ''
    # A field the point leaves alone shows the base config's value.
    rows.append({'point': name,
                 **{k: config_lib.get(point_config, k) for k in keys},
                 **{k: last.get(k) for k in sweep_results.SUMMARY},
                 # All attempts, to the end of the last (a stopped point's
                 # save, a failed one's error), not to its last report.
                 'wall_seconds': sweep_trial.read_wall_seconds(
                     os.path.join(workdir, name)),
                 'status': status, 'error': error})
  return rows


def _quiet_tune() -> None:
  """Keeps Tune's own console output to what the sweep does not say itself.

  The sweep prints a line per point as it ends (`sweep_trial.PointEnd`, a
  retried attempt's error included) and the results table; Tune's reporter
  (its experiment box, a block per failed attempt) and its full traceback of
  every failed attempt are left out. The tracebacks stay in each point's
  `<workdir>/ray_tune/<point>/error.txt`. absl's `--verbosity` (or
  `--alsologtostderr`) brings Tune's output back; so does setting
  `RAY_AIR_NEW_OUTPUT` or `TUNE_PRINT_ALL_TRIAL_ERRORS` oneself.
  """
  # Tune's legacy reporter honours `verbose=0`; the newer one still prints.
  os.environ.setdefault('RAY_AIR_NEW_OUTPUT', '0')
  os.environ.setdefault('TUNE_PRINT_ALL_TRIAL_ERRORS', '0')
  for name in ('ray.tune.tune', 'ray.tune.analysis.experiment_analysis'):
    tune_log = logging.getLogger(name)
    if not any(isinstance(f, _SaidBySweep) for f in tune_log.filters):
      tune_log.addFilter(_SaidBySweep())


class _SaidBySweep(logging.Filter):
  """Drops Tune's messages that the sweep says in its own words: which
  points failed or are unfinished and what to do (re-run the command, not
  Tune's `Tuner.restore`); a point that never reported is `pending`."""

  SAID = ('Trials did not complete', 'Stop signal received',
          'Experiment has been interrupted', 'Failed to fetch metrics')

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.SAID)


def _init_ray(address: str | None) -> None:
  env = {k: v for k, v in os.environ.items()
         if k == _FORWARDED_ENV[0] or k.startswith(_FORWARDED_ENV[1])}
  # Only Tune's own loggers listed in `_tuner`; and `tensorboard --logdir`
  # of the sweep stays free of Tune's TensorBoard files.
  os.environ['TUNE_DISABLE_AUTO_CALLBACK_LOGGERS'] = '1'
  if not console.verbose_requested():
    _quiet_tune()
  # 'local': a fresh embedded cluster, never one that happens to run on
  # this machine (which ray.init() would otherwise join).
  address = address or os.environ.get('RAY_ADDRESS') or 'local'
  on_term = signal.getsignal(signal.SIGTERM)
  with warnings.catch_warnings():
    # JAX warns of any fork in a process that imported it; Ray's start-up
    # forks only to exec its own processes at once.
    warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called',
                            category=RuntimeWarning)
    ray.init(address=address, include_dashboard=False,
             runtime_env={'env_vars': env}, configure_logging=False)
  if (on_term not in (None, signal.SIG_DFL)
      and threading.current_thread() is threading.main_thread()):
    # Ray's start-up installs a C++ SIGTERM handler that ends the process at
    # once; the caller's (launch.py: stop the points as Ctrl-C does) is put
    # back.
    signal.signal(signal.SIGTERM, on_term)
  resources = ray.cluster_resources()
  print(f'Ray: {"embedded" if address == "local" else address}, '
        f'{len([n for n in ray.nodes() if n["Alive"]])} node(s), '
        f'{resources.get("CPU", 0):g} CPUs'
        + ''.join(f', {resources[k]:g} {k}s' for k in ('GPU', 'TPU')
                  if resources.get(k)), flush=True)


def run_sweep(config: ml_collections.ConfigDict, sweep: Any, workdir: str, *,
              parallel: int = 1, address: str | None = None,
              max_failures: int = 2) -> list[dict[str, Any]]:
  """Runs the sweep's unfinished points on Ray; writes the results tables.

  Args:
    config: the base config; each point overrides some of its fields.
    sweep: what a config's `get_sweep()` returns: a list of points, a
      `sweep.Random` space or a `sweep.Sweep` (see `sweep.as_sweep`).
    workdir: the sweep's directory; point `p` runs in
      `<workdir>/<sweep.point_name(p)>`, Tune's files are in
      `<workdir>/ray_tune`.
    parallel: points per machine (CPU-only) or per accelerator.
    address: a Ray cluster's address ('host:port', 'ray://...'); default
      `RAY_ADDRESS`, else an embedded single-machine cluster.
    max_failures: retries of a point whose trial fails (e.g. lost its node,
      or raised); a re-run of the sweep keeps its first run's value.

  Returns:
    The rows of `<workdir>/sweep_results.csv`, ranked.

  Raises:
    ConfigError: the sweep is invalid (nothing has run then), `parallel` is
      not positive, or `workdir` holds a different sweep.
    UserError: Ray is not installed.
  """
  sweep = sweep_lib.as_sweep(sweep)
  if not isinstance(parallel, int) or parallel < 1:
    raise ConfigError(f'--sweep_parallel={parallel!r}: must be a positive '
                      'integer (points per machine or accelerator).')
  if not isinstance(max_failures, int) or max_failures < 0:
    raise ConfigError(f'--sweep_retries={max_failures!r}: must be an integer '
                      '>= 0 (how many more times a failed point is tried).')
  plan = sweep_lib.validate_sweep(config, sweep.points)
  if ray is None:
    raise UserError(INSTALL_RAY)
  workdir = os.path.abspath(workdir)
  early = sweep.early_stopping
  check_same_sweep(workdir, {
      'points': {name: json.loads(c.to_json_best_effort())
                 for name, _, c in plan},
      'early_stopping': early and dataclasses.asdict(early)})
  sweep_results.write_hparams_config(workdir, [p for _, p, _ in plan])
  _init_ray(address)
  try:
    tuner = _tuner(plan, workdir, early, parallel=parallel,
                   max_failures=max_failures)
    tuner.fit()
  finally:
    ray.shutdown()
  rows = _rows(plan, workdir)
  return sweep_results.write_tables(
      workdir, rows, sweep_results.override_keys([p for _, p, _ in plan]))


def run_from_file(config_filename: str, config: ml_collections.ConfigDict,
                  workdir: str, parallel: int = 1,
                  address: str | None = None, retries: int = 2) -> int:
  """`launch.py --sweep`: runs the sweep of a config file, prints the table.

  Args:
    config_filename: 'path[:arg]' of a config file defining `get_sweep`.
    config: its config, with the command line's `--config.*` overrides (they
      apply to every point; the sweep's overrides win).
    workdir: the sweep's directory.
    parallel: points per machine or accelerator.
    address: a Ray cluster's address; default `RAY_ADDRESS` or embedded.
    retries: how many more times a failed point is tried (`max_failures`).

  Returns:
    The exit status: 0 if every point is done or stopped early, 1 if any
    failed, 143 if the sweep was interrupted (Ctrl-C, SIGTERM).
  """
  sweep = sweep_lib.load_sweep(config_filename)
  # SIGTERM (pre-emption) as Ctrl-C: Tune stops the points, which save a
  # checkpoint, and records the experiment for the re-run.
  signal.signal(signal.SIGTERM,
                lambda *_: os.kill(os.getpid(), signal.SIGINT))
  try:
    rows = run_sweep(config, sweep, workdir, parallel=parallel,
                     address=address, max_failures=retries)
  except KeyboardInterrupt:  # Before Tune took over Ctrl-C.
    print('Sweep interrupted; run the same command again to resume it.',
          file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  with open(os.path.join(workdir, sweep_results.MD_FILE)) as f:
    print('\n' + f.read(), flush=True)
  pending = [r['point'] for r in rows if r['status'] == sweep_results.PENDING]
  failed = [r['point'] for r in rows if r['status'] == sweep_results.FAILED]
  if pending:
    print(f'Sweep interrupted with {len(pending)} of {len(rows)} points '
          'unfinished; run the same command again to resume it.',
          file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  if failed:
    print(f'{len(failed)} of {len(rows)} points failed ({", ".join(failed)});'
          ' their tracebacks are in '
          f'{os.path.join(workdir, EXPERIMENT, "<point>", "error.txt")}. '
          'Re-run the same command to retry them.', file=sys.stderr,
          flush=True)
    return 1
  return 0
