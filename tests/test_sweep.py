"""Config sweeps: definitions, validation, tables, running and re-running."""

import csv
import json
import os
import subprocess
import sys

import pytest

from configs import sweep_lr
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
    sweep_run.run_sweep(tiny_config, [{'seed': 1}, bad_point], workdir,
                        in_process=True)
  assert not os.path.exists(workdir)  # Not even the good point started.


def test_validation_accepts_int_for_float_and_keeps_base_config(tiny_config):
  tiny_config.lock()
  (name, point, config), = sweep.validate_sweep(
      tiny_config, [{'initial_learning_rate': 1, 'data.num_validation': 50}])
  assert config.initial_learning_rate == 1.0
  assert config.data.num_validation == 50
  assert tiny_config.data.num_validation == 100  # The base is untouched.
  assert name == 'initial_learning_rate=1,data.num_validation=50'
  assert point == {'initial_learning_rate': 1, 'data.num_validation': 50}


def test_parallel_must_be_positive(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match='--sweep_parallel=0: must be a pos'):
    sweep_run.run_sweep(tiny_config, [{'seed': 1}], str(tmp_path), parallel=0)


@pytest.mark.parametrize('points, message', [
    ([], 'no points'), ({'seed': [1]}, 'must return a list'),
    ([{'seed': 1}, {'seed': 1}], 'repeats point 1'), ([3], 'must be dicts')])
def test_malformed_sweeps(tiny_config, points, message):
  with pytest.raises(ConfigError, match=message):
    sweep.validate_sweep(tiny_config, points)


def test_shipped_sweep_is_valid():
  for arg in (None, 'quick'):
    plan = sweep.validate_sweep(sweep_lr.get_config(arg),
                                sweep_lr.get_sweep(arg))
    assert ('initial_learning_rate=0.001,batch_size=512'
            in [name for name, _, _ in plan])
  assert len(sweep_lr.get_sweep()) == 9


def test_load_sweep_needs_get_sweep():
  assert (sweep.load_sweep(os.path.join(ROOT, 'configs/sweep_lr.py:quick'))
          == sweep_lr.get_sweep('quick'))
  with pytest.raises(ConfigError, match='defines no get_sweep'):
    sweep.load_sweep(os.path.join(ROOT, 'configs/default.py'))


# ------------------------------------------------------------------ tables

def _fake_point(tmp_path, name, overrides, val_accs, test_acc, status='done',
                error=None):
  """A point whose run 'happened': metrics.json and status as a run leaves."""
  workdir = tmp_path / name
  workdir.mkdir()
  epochs = [{'epoch': i + 1, 'step': 10 * (i + 1), 'validation_accuracy': a,
             'test_accuracy': test_acc} for i, a in enumerate(val_accs)]
  if status == 'done':
    (workdir / 'metrics.json').write_text(json.dumps(
        {'epochs': epochs, 'final': {'test_accuracy': test_acc},
         'step': 10 * len(epochs)}))
  return sweep_run.Point(name, overrides, None, str(workdir),
                         {'status': status, 'error': error,
                          'wall_seconds': 12.5})


def test_tables_rank_on_best_validation_not_test(tmp_path):
  points = [
      _fake_point(tmp_path, 'a', {'seed': 0}, [0.90, 0.95], test_acc=0.99),
      _fake_point(tmp_path, 'b', {'seed': 1}, [0.97, 0.96], test_acc=0.91),
      _fake_point(tmp_path, 'c', {'seed': 2}, [], None, status='failed',
                  error='NonFiniteLossError: loss is nan'),
      _fake_point(tmp_path, 'd', {'seed': 3}, [0.93], test_acc=0.999)]
  sweep_results.write_tables(str(tmp_path), points)
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
  assert rows[3]['status'] == 'failed'
  assert rows[3]['error'] == 'NonFiniteLossError: loss is nan'
  md = (tmp_path / 'sweep_results.md').read_text().splitlines()
  assert md[2].startswith('| rank | seed | best val acc |')
  assert md[4] == '| 1 | 1 | 97.00% | 1 | 91.00% | 2 | 20 | 12 | done |'
  assert md[7].endswith('| failed: NonFiniteLossError: loss is nan |')


# ----------------------------------------------------------------- running

def _short(config):
  config.num_epochs = 1
  config.num_train_steps = 5
  return config


# The last point fails at run time: its batch is larger than the 600 images.
_SWEEP = sweep.product(initial_learning_rate=[0.001, 0.02]) + [
    {'batch_size': 1024}]


def _hparams_events(logdir):
  """What TensorBoard's HParams plugin reads from a run's directory: the
  session's hyperparameters (or the experiment) and the scalars."""
  from tensorboard.backend.event_processing import event_accumulator as ea  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import metadata  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  acc = ea.EventAccumulator(logdir, size_guidance={ea.TENSORS: 0})
  acc.Reload()
  content = acc.PluginTagToContent('hparams')
  scalars = {tag: float(tf.make_ndarray(acc.Tensors(tag)[-1].tensor_proto))
             for tag in acc.Tags()['tensors'] if tag.startswith('sweep/')}
  if metadata.EXPERIMENT_TAG in content:
    return metadata.parse_experiment_plugin_data(
        content[metadata.EXPERIMENT_TAG]), scalars
  info = metadata.parse_session_start_info_plugin_data(
      content[metadata.SESSION_START_INFO_TAG])
  return {k: v.number_value for k, v in info.hparams.items()}, scalars


def _mtimes(workdir):
  return {name: os.path.getmtime(os.path.join(workdir, name, 'metrics.json'))
          for name in os.listdir(workdir)
          if os.path.exists(os.path.join(workdir, name, 'metrics.json'))}


@pytest.mark.slow
def test_sweep_ranks_points_records_failure_and_rerun_skips(tiny_config,
                                                             tmp_path):
  config, workdir = _short(tiny_config), str(tmp_path / 'w')
  finished = []
  points = sweep_run.run_sweep(config, _SWEEP, workdir, in_process=True,
                               on_finish=finished.append)
  assert len(finished) == 3

  with open(os.path.join(workdir, 'sweep_results.csv')) as f:
    rows = list(csv.DictReader(f))
  done = [r for r in rows if r['status'] == 'done']
  assert sorted(r['point'] for r in done) == [
      'initial_learning_rate=0.001', 'initial_learning_rate=0.02']
  accs = [float(r['best_validation_accuracy']) for r in done]
  assert accs == sorted(accs, reverse=True) and len(set(accs)) == 2
  for row in done:  # Each row is its own point's run.
    with open(os.path.join(workdir, row['point'], 'metrics.json')) as f:
      metrics = json.load(f)
    assert float(row['best_validation_accuracy']) == max(
        e['validation_accuracy'] for e in metrics['epochs'])
    assert float(row['test_accuracy']) == metrics['final']['test_accuracy']
    assert metrics['step'] == 5 and row['steps'] == '5'
    assert str(metrics['config']['initial_learning_rate']) == row[
        'initial_learning_rate']
    hparams, scalars = _hparams_events(os.path.join(workdir, row['point']))
    assert hparams == {'initial_learning_rate': float(
        row['initial_learning_rate'])}
    assert scalars['sweep/best_validation_accuracy'] == pytest.approx(
        float(row['best_validation_accuracy']))
  experiment, _ = _hparams_events(workdir)  # The dashboard's columns.
  assert [h.name for h in experiment.hparam_infos] == [
      'initial_learning_rate', 'batch_size']
  assert 'sweep/best_validation_accuracy' in [
      m.name.tag for m in experiment.metric_infos]
  assert rows[-1]['point'] == 'batch_size=1024'
  assert rows[-1]['status'] == 'failed'
  assert 'ConfigError: config.batch_size=1024 is larger' in rows[-1]['error']
  assert [p.status['attempts'] for p in points] == [1, 1, 1]

  # Re-running does no repeated work: finished points are skipped (their
  # metrics.json untouched), only the failed one is retried.
  before, finished = _mtimes(workdir), []
  points = sweep_run.run_sweep(config, _SWEEP, workdir, in_process=True,
                               on_finish=finished.append)
  assert [p.name for p in finished] == ['batch_size=1024']
  assert [p.skipped for p in points] == [True, True, False]
  assert _mtimes(workdir) == before
  assert [p.status['attempts'] for p in points] == [1, 1, 2]

  # A field added to the config since (a code change) is no change of run.
  config.added_since = 1
  points = sweep_run.run_sweep(config, _SWEEP, workdir, in_process=True)
  assert [p.skipped for p in points] == [True, True, False]

  # The same sweep over a different base config is refused, not mixed in.
  config.seed = 4
  with pytest.raises(ConfigError,
                     match=r'different config \(differs in seed\)'):
    sweep_run.run_sweep(config, _SWEEP, workdir, in_process=True)


_CONFIG_FILE = '''
import sys
sys.path.insert(0, {tests!r})
import conftest
from mnist_jax import sweep

def get_config():
  config = conftest.tiny_config_for({data!r})
  config.num_epochs = 1
  config.num_train_steps = 5
  config.checkpoint_every_steps = 2
  return config

def get_sweep():
  return [{{'seed': 1}}, {{'batch_size': 1024}}]  # The second one fails.
'''


@pytest.mark.slow
def test_launch_sweep_parallel_workers_crash_and_resume(idx_dir, tmp_path,
                                                         capfd):
  config_file = tmp_path / 'tiny_sweep.py'
  config_file.write_text(_CONFIG_FILE.format(
      tests=os.path.join(ROOT, 'tests'), data=idx_dir))
  workdir = str(tmp_path / 'w')
  # Every worker is SIGKILLed in step 3, after its step-2 checkpoint landed:
  # a hard crash that only a separate process survives.
  env = dict(os.environ, MNIST_JAX_TEST_FAULT='kill_in_step:3')
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config', str(config_file), '--sweep',
       '--sweep_parallel=2', '--workdir', workdir, '--config.weight_decay=0'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert '2 to run, 2 at a time' in proc.stdout
  assert '2 of 2 points failed (seed=1, batch_size=1024)' in proc.stderr
  assert '| 1 | 1 |  |' in proc.stdout  # The table is printed.
  status = {name: json.load(open(os.path.join(workdir, name,
                                              'sweep_status.json')))
            for name in ('seed=1', 'batch_size=1024')}
  assert status['seed=1']['error'].startswith('worker exited with status -9')
  # The worker's own one-line account, not just an exit status.
  assert status['batch_size=1024']['error'].startswith(
      'ConfigError: config.batch_size=1024 is larger')
  with open(os.path.join(workdir, 'batch_size=1024', 'sweep_log.txt')) as f:
    assert 'Traceback' in f.read()

  # Re-running (in-process here, to keep the test fast) resumes the crashed
  # point from its checkpoint with the command line's override kept.
  sys.path.insert(0, str(tmp_path))
  try:
    import tiny_sweep  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(tmp_path))
  config = tiny_sweep.get_config()
  config.weight_decay = 0.0
  capfd.readouterr()
  points = sweep_run.run_sweep(config, tiny_sweep.get_sweep(), workdir,
                               in_process=True)
  assert 'Resuming from step 2' in capfd.readouterr().out
  assert [p.status['status'] for p in points] == ['done', 'failed']
  assert [p.status['attempts'] for p in points] == [2, 2]
  with open(os.path.join(workdir, 'seed=1', 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['step'] == 5
  assert metrics['config']['seed'] == 1
  assert metrics['config']['weight_decay'] == 0
