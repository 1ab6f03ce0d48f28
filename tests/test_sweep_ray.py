"""Sweeps on Ray for real: embedded (the default), and a 2-node cluster on
127.0.0.1 that loses its worker node in the middle of the sweep."""

import csv
import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import ray
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata
import tensorflow as tf

from mnist_jax import sweep
from mnist_jax import sweep_run
from mnist_jax import sweep_trial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), 'ray')

_CONFIG_FILE = '''
import sys
import tempfile
sys.path.insert(0, {tests!r})
import conftest
from mnist_jax import sweep

def get_config():
  config = conftest.tiny_config_for({data!r})
  config.num_epochs = 2
  return config

def get_sweep():
  # 1e-7 learns nothing: ASHA stops it at epoch 1; batch 1024 > 600 images.
  return sweep.Sweep(
      [{{'initial_learning_rate': 0.001}}, {{'initial_learning_rate': 1e-7}},
       {{'batch_size': 1024}}],
      early_stopping=sweep.EarlyStopping(grace_epochs=1, reduction_factor=2))
'''


def _csv(workdir):
  with open(os.path.join(workdir, 'sweep_results.csv')) as f:
    return {r['point']: r for r in csv.DictReader(f)}


def _metrics(workdir, name):
  with open(os.path.join(workdir, name, 'metrics.json')) as f:
    return json.load(f)


def _results(workdir, name):
  """The reports Tune recorded for a point (all attempts)."""
  with open(os.path.join(workdir, 'ray_tune', name, 'result.json')) as f:
    return [json.loads(line) for line in f]


def _hparams(logdir):
  """A run's HParams session (hyperparameters) and its best validation
  accuracy, as TensorBoard's HParams dashboard reads them."""
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  info = metadata.parse_session_start_info_plugin_data(
      acc.PluginTagToContent('hparams')[metadata.SESSION_START_INFO_TAG])
  best = acc.Tensors('sweep/best_validation_accuracy')[-1].tensor_proto
  return ({k: v.number_value for k, v in info.hparams.items()},
          float(tf.make_ndarray(best)))


@pytest.mark.slow
def test_embedded_sweep_stops_early_records_failure_and_reruns(idx_dir,
                                                               tmp_path):
  config_file = tmp_path / 'tiny_sweep.py'
  config_file.write_text(_CONFIG_FILE.format(
      tests=os.path.join(ROOT, 'tests'), data=idx_dir))
  workdir = str(tmp_path / 'w')
  command = [sys.executable, 'launch.py', '--config', str(config_file),
             '--sweep', '--workdir', workdir, '--config.weight_decay=0',
             '--sweep_retries=1']
  env = dict(os.environ)
  env.pop('RAY_ADDRESS', None)
  # In its own process: Ray's settings (e.g. its token authentication) stay
  # out of this one, which the cluster test connects from.
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out
  assert 'Ray: embedded, 1 node(s)' in out
  assert '1 of 3 points failed (batch_size=1024)' in proc.stderr
  assert '[3/3]' in out  # A line per point as it ends.
  # The console: each epoch line tagged with its point; a line per failed
  # attempt, not Tune's traceback of it; no parameter tables or TensorFlow
  # notices (they are in each point's log.txt).
  assert '[initial_learning_rate=0.001] Epoch   2 step     36:' in out
  # Tried again once (--sweep_retries=1), then recorded as failed.
  assert ('batch_size=1024: attempt 1 failed (ConfigError: config.batch_size'
          in proc.stdout) and 'attempt 2 failed' not in proc.stdout
  for noise in ('Traceback', 'Trial task failed', 'errored after',
                'Configuration for experiment', 'Trials did not complete',
                'conv1/kernel', 'oneDNN custom operations', 'os.fork()'):
    assert noise not in out, noise
  assert 'ray_tune/<point>/error.txt' in proc.stderr
  rows = _csv(workdir)
  good, bad = 'initial_learning_rate=0.001', 'initial_learning_rate=1e-07'
  assert [r['status'] for r in rows.values()] == [
      'done', 'stopped early', 'failed']
  assert list(rows) == [good, bad, 'batch_size=1024']  # Ranked.
  assert rows['batch_size=1024']['error'].startswith(
      'ConfigError: config.batch_size=1024 is larger than the training split')
  for name in (good, bad):
    with open(os.path.join(workdir, name, 'log.txt')) as f:
      log = f.read()
    assert 'conv1/kernel' in log and 'Train 600 / validation' in log
  with open(os.path.join(workdir, 'batch_size=1024', 'log.txt')) as f:
    assert 'ConfigError: config.batch_size=1024' in f.read()  # traceback
  metrics = _metrics(workdir, good)  # Trained through train_and_evaluate.
  assert metrics['step'] == 36 and metrics['config']['weight_decay'] == 0
  assert float(rows[good]['best_validation_accuracy']) == max(
      e['validation_accuracy'] for e in metrics['epochs'])
  assert rows[good]['epochs'] == '2' and rows[good]['steps'] == '36'
  # Wall time to the end of a point's last attempt: the stopped point's save
  # after its last report; the failed point's error (it never reported).
  assert (float(rows[bad]['wall_seconds'])
          >= _results(workdir, bad)[-1]['wall_seconds'])
  failed_wall = float(rows['batch_size=1024']['wall_seconds'])
  # Stopped after epoch 1 with its last metrics, and a checkpoint to show.
  assert rows[bad]['epochs'] == '1' and rows[bad]['steps'] == '18'
  assert float(rows[bad]['best_validation_accuracy']) < 0.5
  assert not os.path.exists(os.path.join(workdir, bad, 'metrics.json'))
  assert max(map(int, os.listdir(os.path.join(workdir, bad, 'checkpoints')))
             ) == 18
  # Tune's state and logs are in the workdir; HParams for both runs.
  assert glob.glob(os.path.join(workdir, 'ray_tune', 'experiment_state*'))
  assert [r['epoch'] for r in _results(workdir, good)] == [1, 2]
  # The stopped point ran in the first point's process (Tune reused it).
  assert _results(workdir, bad)[0]['pid'] == _results(workdir, good)[0]['pid']
  for name in (good, bad):  # Each ended point's HParams session.
    hparams, best = _hparams(os.path.join(workdir, name))
    assert hparams == {'initial_learning_rate': float(
        rows[name]['initial_learning_rate'])}
    assert best == pytest.approx(float(rows[name]['best_validation_accuracy']))

  # Re-running skips the finished and stopped points: only the failed one
  # runs again, fails again, and the exit status says so.
  before = {n: os.path.getmtime(os.path.join(workdir, n, 'checkpoints'))
            for n in (good, bad)}
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'Continuing the sweep' in proc.stdout
  # Counted over the sweep: the two points that ended in the first run too.
  assert '[3/3] batch_size=1024: FAILED: ConfigError' in proc.stdout
  # The table; a point's cell for a field it leaves alone: the base value.
  assert '| 1 | 0.001 | 32 | 100.00% |' in proc.stdout
  assert '| 3 | 0.001 | 1024 |  |' in proc.stdout
  assert '1 of 3 points failed (batch_size=1024)' in proc.stderr
  assert 'Resuming' not in proc.stdout
  assert before == {n: os.path.getmtime(os.path.join(workdir, n,
                                                     'checkpoints'))
                    for n in (good, bad)}
  rows = _csv(workdir)
  assert [r['status'] for r in rows.values()] == [
      'done', 'stopped early', 'failed']
  # The failed point's wall time: its attempts in both runs.
  assert float(rows['batch_size=1024']['wall_seconds']) > failed_wall


def test_trial_lines_are_tagged_with_the_running_point():
  """A trial process runs one point after another (Tune reuses it): each
  line it prints starts with the point that printed it, however the writes
  split it."""
  out = io.StringIO()
  lines = sweep_trial._Tagged(out)  # pylint: disable=protected-access
  lines.tag = '[a=1] '
  print('Epoch 1', 'done', file=lines)  # three writes, one line
  lines.write('two\nlines\npartial ')
  lines.tag = '[a=2] '  # the next point: the open line stays the first's
  lines.write('end\nnext\n')
  assert out.getvalue() == ('[a=1] Epoch 1 done\n[a=1] two\n[a=1] lines\n'
                            '[a=1] partial end\n[a=2] next\n')


_SIGTERM_AFTER_RAY_INIT = r"""
import os, signal, time
from mnist_jax import sweep_run
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append('handled'))
sweep_run._init_ray(None)
try:
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.5)  # the handler runs between bytecodes
finally:
  sweep_run.ray.shutdown()
print(got)
"""


def test_sigterm_reaches_the_sweeps_handler_after_ray_starts(tmp_path):
  """Ray's start-up installs a C++ SIGTERM handler that ends the process;
  the sweep's own (stop the points as Ctrl-C does, exit 143) must stay."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('RAY_ADDRESS', None)
  proc = subprocess.run([sys.executable, '-c', _SIGTERM_AFTER_RAY_INIT],
                        cwd=str(tmp_path), env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "['handled']" in proc.stdout


# ------------------------------------------------------------ a real cluster

def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _tree(pid):
  """`pid` and its descendants (Ray's workers start their own sessions, so a
  process group would miss them)."""
  children = {}
  for entry in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{entry}/stat') as f:
        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    children.setdefault(ppid, []).append(int(entry))
  tree, todo = [], [pid]
  while todo:
    tree.append(todo.pop())
    todo += children.get(tree[-1], [])
  return tree


def _state(pid):
  """R, S, ..., Z (a zombie: dead) or '' (gone)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0]
  except (OSError, IndexError):
    return ''


def _cmdline(pid):
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return f.read()
  except OSError:
    return b''


def _kill_node(proc):
  """SIGKILLs a node: `ray start --block` and every process it started."""
  for pid in _tree(proc.pid):
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait(timeout=30)


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
  """A head and a worker node on 127.0.0.1, one CPU each; both always
  killed at the end, each process by its id, never with `ray stop`."""
  port = _free_port()
  monkeypatch.setenv('RAY_AUTH_MODE', 'disabled')  # Loopback only.
  common = ['--node-ip-address=127.0.0.1', '--num-cpus=1', '--block',
            '--disable-usage-stats']
  nodes = {}
  # Short: Ray's socket paths under it must fit in 107 bytes.
  temp = tempfile.mkdtemp(prefix='ray', dir='/tmp')

  def start(name, *args):
    log = open(tmp_path / f'{name}.log', 'w')
    nodes[name] = subprocess.Popen(
        [RAY, 'start', *args, *common,
         f'--temp-dir={os.path.join(temp, name)}'],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

  try:
    start('head', '--head', f'--port={port}', '--include-dashboard=false',
          f'--ray-client-server-port={_free_port()}',
          f'--dashboard-port={_free_port()}',
          # Notices a lost node in seconds rather than tens of seconds.
          '--system-config={"health_check_period_ms": 1000, '
          '"health_check_failure_threshold": 3}')
    address = f'127.0.0.1:{port}'
    deadline = time.time() + 60
    while time.time() < deadline:  # The head's GCS takes connections.
      with socket.socket() as s:
        if s.connect_ex(('127.0.0.1', port)) == 0:
          break
      assert nodes['head'].poll() is None, (tmp_path / 'head.log').read_text()
      time.sleep(0.2)
    start('worker', f'--address={address}')
    ray.init(address=address)
    try:
      while len([n for n in ray.nodes() if n['Alive']]) < 2:
        assert time.time() < deadline, (tmp_path / 'worker.log').read_text()
        time.sleep(0.2)
      ids = {('head' if 'node:__internal_head__' in n['Resources']
              else 'worker'): n['NodeID'] for n in ray.nodes() if n['Alive']}
    finally:
      ray.shutdown()
    monkeypatch.setenv('RAY_ADDRESS', address)
    yield nodes, ids
  finally:
    pids = [pid for proc in nodes.values() for pid in _tree(proc.pid)]
    for proc in nodes.values():
      _kill_node(proc)
    time.sleep(0.5)
    assert not [pid for pid in pids if _state(pid) not in ('', 'Z')]
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_cluster_sweep_uses_both_nodes_and_survives_losing_one(
    tiny_config, two_nodes, tmp_path, capfd):
  nodes, ids = two_nodes
  config = tiny_config
  config.num_epochs = 2
  config.checkpoint_every_steps = 6
  workdir = str(tmp_path / 'w')
  points = sweep.product(seed=[1, 2])
  killed = threading.Event()

  def kill_worker_mid_sweep():
    # Once both points reported their first epoch (and saved it) and one
    # trains on the worker (its actor is a process the worker node started).
    deadline = time.time() + 150
    while time.time() < deadline:
      past_epoch_1 = len(glob.glob(os.path.join(workdir, '*', 'checkpoints',
                                                '18'))) == 2
      on_worker = any(b'Trainable' in _cmdline(pid)
                      for pid in _tree(nodes['worker'].pid))
      if past_epoch_1 and on_worker:
        _kill_node(nodes['worker'])
        killed.set()
        return
      time.sleep(0.2)

  watcher = threading.Thread(target=kill_worker_mid_sweep, daemon=True)
  watcher.start()
  rows = sweep_run.run_sweep(config, points, workdir)
  watcher.join()
  out = capfd.readouterr().out
  assert killed.is_set(), out
  assert 'Ray: 127.0.0.1:' in out and '2 node(s), 2 CPUs' in out
  # Every point finished, both epochs, nothing lost.
  assert [r['status'] for r in rows] == ['done', 'done'], rows
  for name in ('seed=1', 'seed=2'):
    metrics = _metrics(workdir, name)
    assert metrics['step'] == 36
    assert [e['epoch'] for e in metrics['epochs']] == [1, 2]
  reports = {name: _results(workdir, name) for name in ('seed=1', 'seed=2')}
  seen = {r['node_id'] for rs in reports.values() for r in rs}
  assert seen == {ids['head'], ids['worker']}  # Ran on both nodes.
  # The point on the lost node was retried on the head and resumed from
  # its checkpoint, not restarted: its first report there is past epoch 1.
  lost, = [n for n, rs in reports.items() if rs[0]['node_id'] == ids['worker']]
  retried = [r for r in reports[lost] if r['node_id'] == ids['head']]
  assert retried and retried[0]['epoch'] >= 2
  # Its wall time counts both attempts: the lost one's, up to its last
  # report, and the retry's, which alone covers its reported epochs.
  lost_row, = [r for r in rows if r['point'] == lost]
  first = [r for r in reports[lost] if r['node_id'] == ids['worker']]
  assert lost_row['wall_seconds'] >= (first[-1]['wall_seconds']
                                      + retried[-1]['time_total_s'])
  assert 'Resuming from step' in out
