"""Config sweeps without a cluster: definitions, search spaces, validation,
resources, schedulers and tables. Runs on Ray: tests/test_sweep_ray.py."""

import csv
import json
import logging
import os
import subprocess
import sys
import types

import pytest
from ray.tune import schedulers

from configs import sweep_lr
from configs import sweep_search
from mnist_jax import sweep
from mnist_jax import sweep_results
from mnist_jax import sweep_run
from mnist_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------- definitions

def test_product_is_a_grid_in_axis_order():
  points = sweep.product({'data.num_validation': [10, 20]}, batch_size=[1, 2])
  assert points == [
      {'data.num_validation': 10, 'batch_size': 1},
      {'data.num_validation': 10, 'batch_size': 2},
      {'data.num_validation': 20, 'batch_size': 1},
      {'data.num_validation': 20, 'batch_size': 2}]


def test_zipped_and_cross():
  lr = sweep.zipped(initial_learning_rate=[0.1, 0.2], weight_decay=[0.0, 0.1])
  assert lr == [{'initial_learning_rate': 0.1, 'weight_decay': 0.0},
                {'initial_learning_rate': 0.2, 'weight_decay': 0.1}]
  points = sweep.cross(lr, sweep.product(seed=[0, 1]))
  assert len(points) == 4
  assert points[1] == {'initial_learning_rate': 0.1, 'weight_decay': 0.0,
                       'seed': 1}
  with pytest.raises(ConfigError, match='equal length'):
    sweep.zipped(seed=[0, 1], batch_size=[8])
  with pytest.raises(ConfigError, match="'seed' is set by two sweeps"):
    sweep.cross([{'seed': 0}], [{'seed': 1}])
  with pytest.raises(ConfigError, match='list of values'):
    sweep.product(seed=3)


def test_point_names_follow_point_order_and_are_safe():
  assert (sweep.point_name({'initial_learning_rate': 0.003, 'batch_size': 256})
          == 'initial_learning_rate=0.003,batch_size=256')
  assert sweep.point_name({'data.dir': '/a b/c'}) == 'data.dir=_a_b_c'
  assert sweep.point_name({'adam_eps': 1e-05}) == 'adam_eps=1e-05'
  long_a = sweep.point_name({'data.dir': 'x' * 300 + 'a'})
  long_b = sweep.point_name({'data.dir': 'x' * 300 + 'b'})
  assert len(long_a) <= 180 and long_a != long_b


# -------------------------------------------------------------- validation

@pytest.mark.parametrize('bad_point, message', [
    ({'batch_sise': 64}, r"point 2/2 \(batch_sise=64\): unknown config key "
                         r"'batch_sise'.*did you mean 'batch_size'"),
    ({'data.nope': 1}, r"unknown config key 'data.nope' \(no 'nope' in data\)"),
    ({'batch_size': -4}, r'point 2/2 .*config.batch_size=-4: must be a positive'),
    ({'batch_size': 3.5}, r'config.batch_size expects int, got float 3.5'),
    ({'batch_size': True}, r'config.batch_size expects int, got bool'),
    ({'data.source': 'csv'}, r"config.data.source='csv': unknown data source"),
    ({'data': 3}, r"'data' is a group of fields"),
])
def test_invalid_sweep_fails_before_any_point_runs(tiny_config, tmp_path,
                                                   bad_point, message):
  workdir = str(tmp_path / 'w')
  with pytest.raises(ConfigError, match=message):
    sweep_run.run_sweep(tiny_config, [{'seed': 1}, bad_point], workdir)
  assert not os.path.exists(workdir)  # Not even Ray started.


def test_validation_accepts_int_for_float_and_keeps_base_config(tiny_config):
  tiny_config.lock()
  (name, point, config), = sweep.validate_sweep(
      tiny_config, [{'initial_learning_rate': 1, 'data.num_validation': 50}])
  assert config.initial_learning_rate == 1.0
  assert config.data.num_validation == 50
  assert tiny_config.data.num_validation == 100  # The base is untouched.
  assert name == 'initial_learning_rate=1,data.num_validation=50'
  assert point == {'initial_learning_rate': 1, 'data.num_validation': 50}


@pytest.mark.parametrize('points, message', [
    ([], 'no points'), ({'seed': [1]}, 'must return a list'),
    ([{'seed': 1}, {'seed': 1}], 'point 2/2 .* same config as point 1'),
    # Equal configs written differently: key order, 1 and 1.0, the base's.
    ([{'seed': 1, 'batch_size': 8}, {'batch_size': 8, 'seed': 1}],
     'same config as point 1'),
    ([{'initial_learning_rate': 1}, {'initial_learning_rate': 1.0}],
     'same config as point 1'),
    ([{}, {'batch_size': 32}], 'same config as point 1'),
    ([3], 'must be dicts')])
def test_malformed_sweeps(tiny_config, points, message):
  with pytest.raises(ConfigError, match=message):
    sweep.validate_sweep(tiny_config, points)


def test_different_points_with_one_folder_name_get_distinct_folders(
    tiny_config):
  plan = sweep.validate_sweep(tiny_config, [{'data.cache_dir': '/tmp/a/b'},
                                            {'data.cache_dir': '/tmp/a_b'}])
  names = [name for name, _, _ in plan]
  assert names[0] == 'data.cache_dir=_tmp_a_b'
  assert names[1].startswith('data.cache_dir=_tmp_a_b~') and len(set(names)) == 2


def test_shipped_sweep_is_valid():
  for arg in (None, 'quick'):
    plan = sweep.validate_sweep(sweep_lr.get_config(arg),
                                sweep_lr.get_sweep(arg))
    assert ('initial_learning_rate=0.001,batch_size=512'
            in [name for name, _, _ in plan])
  assert len(sweep_lr.get_sweep()) == 9
  for arg, n in ((None, 12), ('quick', 6)):
    spec = sweep.load_sweep(os.path.join(
        ROOT, 'configs/sweep_search.py' + (f':{arg}' if arg else '')))
    assert len(sweep.validate_sweep(sweep_search.get_config(arg),
                                    spec.points)) == n
    assert spec.early_stopping.rule == 'asha'


def test_load_sweep_needs_get_sweep():
  assert (sweep.load_sweep(os.path.join(ROOT, 'configs/sweep_lr.py:quick'))
          == sweep.Sweep(sweep_lr.get_sweep('quick')))
  with pytest.raises(ConfigError, match='defines no get_sweep'):
    sweep.load_sweep(os.path.join(ROOT, 'configs/default.py'))


# ----------------------------------------------------------- search spaces

def test_random_space_is_seeded_in_range_and_validated(tiny_config):
  space = sweep.Random({'initial_learning_rate': sweep.loguniform(1e-4, 1e-2),
                        'weight_decay': sweep.uniform(0.0, 1e-3),
                        'batch_size': sweep.choice([16, 32, 64]),
                        'seed': sweep.randint(0, 2),
                        'adam_b1': [0.8, 0.9]}, num_samples=24, seed=3)
  points = space.points()
  assert points == space.points()  # A re-run finds the same points.
  assert points != sweep.Random(space.axes, 24, seed=4).points()
  assert len(points) == 24 and list(points[0]) == list(space.axes)
  lrs = [p['initial_learning_rate'] for p in points]
  assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
  # Log-uniform: as many samples below 1e-3 (the log-midpoint) as above.
  assert 8 <= sum(lr < 1e-3 for lr in lrs) <= 16
  assert all(lr == float(f'{lr:.3g}') for lr in lrs)  # Short names.
  assert {p['batch_size'] for p in points} == {16, 32, 64}
  assert {p['seed'] for p in points} == {0, 1, 2}  # Both ends included.
  assert {p['adam_b1'] for p in points} == {0.8, 0.9}
  iid = sweep.Random(space.axes, 24, seed=3, quasi=False).points()
  assert iid != points and all(1e-4 <= p['initial_learning_rate'] <= 1e-2
                               for p in iid)
  plan = sweep.validate_sweep(tiny_config, points)
  assert len(plan) == 24 and plan[0][2].batch_size == points[0]['batch_size']


def test_search_space_mistakes_are_one_line_errors(tiny_config):
  with pytest.raises(ConfigError, match='needs low > 0'):
    sweep.loguniform(0, 1)
  with pytest.raises(ConfigError, match='is empty'):
    sweep.uniform(1, 1)
  with pytest.raises(ConfigError, match='needs ints'):
    sweep.randint(0, 2.5)
  with pytest.raises(ConfigError, match='non-empty list'):
    sweep.choice([])
  with pytest.raises(ConfigError, match='num_samples=0'):
    sweep.as_sweep(sweep.Random({'seed': [1]}, num_samples=0))
  # A space too small for its samples repeats points: refused.
  with pytest.raises(ConfigError, match='same config as point'):
    sweep.validate_sweep(tiny_config, sweep.Random(
        {'seed': sweep.choice([1, 2])}, num_samples=3).points())
  with pytest.raises(ConfigError, match=r"unknown config key 'batch'"):
    sweep.validate_sweep(tiny_config, sweep.Random(
        {'batch': sweep.randint(8, 16)}, num_samples=2).points())


def test_early_stopping_is_checked_and_becomes_a_tune_scheduler():
  for bad, message in [(sweep.EarlyStopping(rule='hyperband'), 'use one of'),
                       (sweep.EarlyStopping(grace_epochs=0), 'grace_epochs'),
                       (sweep.EarlyStopping(reduction_factor=1), 'reduction')]:
    with pytest.raises(ConfigError, match=message):
      sweep.as_sweep(sweep.Sweep([{'seed': 1}], early_stopping=bad))
  asha = sweep_run.scheduler(sweep.EarlyStopping(grace_epochs=2), 20)
  assert isinstance(asha, schedulers.ASHAScheduler)
  assert asha.metric == 'validation_accuracy' and asha._mode == 'max'  # pylint: disable=protected-access
  median = sweep_run.scheduler(sweep.EarlyStopping(rule='median'), 20)
  assert isinstance(median, schedulers.MedianStoppingRule)
  # Too few points to compare while others wait: the point goes on. (Tune's
  # default paused it, through checkpoints PointTrainable does not keep:
  # every point of a median sweep failed with NotImplementedError.)
  pending = types.SimpleNamespace(status='PENDING')
  controller = types.SimpleNamespace(get_live_trials=lambda: [pending])
  point = type('Trial', (), {'trial_id': 'p', 'status': 'RUNNING'})()
  median.on_trial_add(controller, point)
  for epoch in (1, 2, 3):
    assert median.on_trial_result(
        controller, point, {'epoch': epoch, 'validation_accuracy': 0.5}
    ) == schedulers.TrialScheduler.CONTINUE
  assert isinstance(sweep_run.scheduler(None, 20), schedulers.FIFOScheduler)


def test_resources_per_point():
  def node(alive=True, **resources):
    return {'Alive': alive, 'Resources': resources}
  cpus = [node(CPU=8.0), node(CPU=4.0), node(False, CPU=1.0), node(CPU=0.0)]
  # One point per machine by default; the smallest live worker decides.
  assert sweep_run.trial_resources(cpus, 1) == {'CPU': 4}
  assert sweep_run.trial_resources(cpus, 2) == {'CPU': 2}
  assert sweep_run.trial_resources(cpus, 16) == {'CPU': 1}
  gpus = [node(CPU=16.0, GPU=8.0)]
  assert sweep_run.trial_resources(gpus, 1) == {'CPU': 1, 'GPU': 1}
  assert sweep_run.trial_resources(gpus, 4) == {'CPU': 1, 'GPU': 0.25}
  assert sweep_run.trial_resources([node(CPU=240.0, TPU=4.0)], 1) == {
      'CPU': 1, 'TPU': 1}


def test_parallel_must_be_positive(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match='--sweep_parallel=0: must be a pos'):
    sweep_run.run_sweep(tiny_config, [{'seed': 1}], str(tmp_path), parallel=0)


def test_a_workdir_refuses_a_changed_sweep(tmp_path):
  workdir = str(tmp_path)
  base = {'data': {'dir': 'a'}, 'log_every_steps': 5, 'num_epochs': 20,
          'weight_decay': 0.0005}
  spec = {'points': {'seed=1': {'seed': 1, **base},
                     'seed=2': {'seed': 2, **base}},
          'early_stopping': None}
  sweep_run.check_same_sweep(workdir, spec)  # Recorded on the first run.
  sweep_run.check_same_sweep(workdir, spec)
  added = json.loads(json.dumps(spec))
  added['points']['seed=1']['added_since'] = 3  # A code change: no change.
  sweep_run.check_same_sweep(workdir, added)
  # Where the data is, and how often a point logs: not a different sweep.
  moved = json.loads(json.dumps(spec))
  moved['points']['seed=2']['data']['dir'] = 'b'
  moved['points']['seed=2']['log_every_steps'] = 7
  sweep_run.check_same_sweep(workdir, moved)
  other = json.loads(json.dumps(spec))
  other['points']['seed=2']['weight_decay'] = 0.1
  other['points']['seed=2']['num_epochs'] = 30  # Finished points would stay.
  with pytest.raises(ConfigError, match=r'seed=2 was run with a different '
                     r'config \(differs in num_epochs, weight_decay\)'):
    sweep_run.check_same_sweep(workdir, other)
  with pytest.raises(ConfigError, match=r"other points \(new: \['seed=3'\]"):
    sweep_run.check_same_sweep(workdir, dict(spec, points={
        **spec['points'], 'seed=3': {'seed': 3}}))
  with pytest.raises(ConfigError, match='another early-stopping rule'):
    sweep_run.check_same_sweep(workdir, dict(spec, early_stopping={
        'rule': 'asha'}))


def test_without_ray_sweep_says_what_to_install(tmp_path):
  code = ('import sys; sys.modules["ray"] = None; sys.path.insert(0, "tests")\n'
          'import conftest\n'
          'from mnist_jax import sweep_run\n'
          'config = conftest.tiny_config_for("unused")\n'
          'sweep_run.run_sweep(config, [{"seed": 1}], sys.argv[1])\n')
  proc = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'w')],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last == ('mnist_jax.errors.UserError: ' + sweep_run.INSTALL_RAY)
  assert "pip install 'ray[tune]'" in last


# ------------------------------------------------------------------ tables

def _row(name, overrides, val_accs, test_acc, status='done', error=''):
  """A point's row as the runner builds it from the point's reports."""
  epochs = [{'epoch': i + 1, 'step': 10 * (i + 1), 'validation_accuracy': a,
             'test_accuracy': test_acc} for i, a in enumerate(val_accs)]
  final = {'test_accuracy': test_acc} if status == 'done' else {}
  summary = sweep_results.summarize(
      {'epochs': epochs, 'final': final,
       'step': 10 * len(epochs) if epochs else None})
  return {'point': name, **overrides, **summary, 'wall_seconds': 12.5,
          'status': status, 'error': error}


def test_summary_of_a_run():
  run = {'epochs': [{'epoch': 1, 'step': 5, 'validation_accuracy': 0.9,
                     'test_accuracy': 0.8},
                    {'epoch': 2, 'step': 10, 'train_loss': 0.1},  # No eval.
                    {'epoch': 3, 'step': 15, 'validation_accuracy': 0.85,
                     'test_accuracy': 0.86}],
         'final': {'test_accuracy': 0.87}, 'step': 15}
  assert sweep_results.summarize(run) == {
      'best_validation_accuracy': 0.9, 'best_epoch': 1, 'test_accuracy': 0.87,
      'epochs': 3, 'steps': 15}
  stopped = dict(run, final={}, stopped_early=True)  # Its last evaluation.
  assert sweep_results.summarize(stopped)['test_accuracy'] == 0.86
  assert sweep_results.summarize({'epochs': []})['best_epoch'] is None


def test_tables_rank_on_best_validation_not_test(tmp_path):
  rows = [
      _row('a', {'seed': 0}, [0.90, 0.95], test_acc=0.99),
      _row('b', {'seed': 1}, [0.97, 0.96], test_acc=0.91),
      _row('c', {'seed': 2}, [], None, status='failed',
           error='NonFiniteLossError: loss is nan'),
      _row('d', {'seed': 3}, [0.93], test_acc=0.999, status='stopped early')]
  sweep_results.write_tables(str(tmp_path), rows, ['seed'])
  with open(tmp_path / 'sweep_results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['point'] for r in rows] == ['b', 'a', 'd', 'c']
  assert [r['rank'] for r in rows] == ['1', '2', '3', '4']
  assert rows[0]['seed'] == '1'
  assert float(rows[0]['best_validation_accuracy']) == 0.97
  assert rows[0]['best_epoch'] == '1'  # Best, not last, epoch.
  assert float(rows[0]['test_accuracy']) == 0.91
  assert rows[0]['epochs'] == '2' and rows[0]['steps'] == '20'
  assert rows[0]['status'] == 'done' and rows[0]['wall_seconds'] == '12.5'
  assert rows[2]['status'] == 'stopped early'
  assert rows[3]['status'] == 'failed'
  assert rows[3]['error'] == 'NonFiniteLossError: loss is nan'
  md = (tmp_path / 'sweep_results.md').read_text().splitlines()
  assert md[2].startswith('| rank | seed | best val acc |')
  assert md[4] == '| 1 | 1 | 97.00% | 1 | 91.00% | 2 | 20 | 12 | done |'
  assert md[6] == ('| 3 | 3 | 93.00% | 1 | 99.90% | 1 | 10 | 12 | '
                   'stopped early |')
  assert md[7].endswith('| failed: NonFiniteLossError: loss is nan |')


def test_ray_keeps_every_line_of_parallel_points():
  """Ray folds lines that differ only in numbers ('[repeated 6x across
  cluster]'): points in parallel lost most epoch lines. Off for sweeps."""
  env = {k: v for k, v in os.environ.items() if k != 'RAY_DEDUP_LOGS'}
  proc = subprocess.run(
      [sys.executable, '-c', 'from mnist_jax import sweep_run; '
       'from ray._private import ray_constants; '
       'print(ray_constants.RAY_DEDUP_LOGS)'],
      capture_output=True, text=True, env=env, timeout=120)
  assert proc.stdout.strip() == 'False', proc.stderr[-2000:]


def test_tunes_messages_the_sweep_says_itself_are_dropped(monkeypatch):
  """Tune's advice on an interrupted sweep is `Tuner.restore(...)`; the
  sweep's is to re-run the command. Its other messages are kept."""
  monkeypatch.setenv('RAY_AIR_NEW_OUTPUT', '1')  # (left as they are)
  monkeypatch.setenv('TUNE_PRINT_ALL_TRIAL_ERRORS', '1')
  sweep_run._quiet_tune()  # pylint: disable=protected-access
  for name, message, shown in [
      ('ray.tune.tune', 'Experiment has been interrupted, but the most recent'
       ' state was saved.\nResume experiment with: Tuner.restore(...)', False),
      ('ray.tune.tune', 'Stop signal received (e.g. via SIGINT/Ctrl+C)', False),
      ('ray.tune.tune', 'Trials did not complete: [a]', False),
      ('ray.tune.analysis.experiment_analysis',
       'Failed to fetch metrics for 1 trial(s):', False),
      ('ray.tune.tune', 'Something else', True)]:
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, message,
                               None, None)
    assert bool(logging.getLogger(name).filter(record)) == shown, message


def test_get_sweep_argument_mismatch_is_one_clear_error(tmp_path):
  needs = tmp_path / 'needs_arg.py'
  needs.write_text('def get_sweep(arg):\n  return [{"seed": int(arg)}]\n')
  takes_none = tmp_path / 'no_arg.py'
  takes_none.write_text('def get_sweep():\n  return [{"seed": 1}]\n')
  with pytest.raises(ConfigError, match=r'takes one .*:<arg>'):
    sweep.load_sweep(str(needs))
  with pytest.raises(ConfigError, match='takes none .*drop ":3"'):
    sweep.load_sweep(f'{takes_none}:3')
  assert sweep.load_sweep(f'{needs}:2').points == [{'seed': 2}]


def test_a_sweep_needs_a_validation_set(tiny_config):
  with pytest.raises(ConfigError, match=r'point 1/1 \(data.num_validation=0'
                     r'\): config.data.num_validation=0: a sweep ranks'):
    sweep.validate_sweep(tiny_config, [{'data.num_validation': 0}])
