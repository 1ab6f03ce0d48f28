"""Shared fixtures and helpers: tiny generated MNIST-like data, a fast
config, host metrics as the loop hands them to hooks, and an event-file reader.

Nothing here needs the network: the IDX files are written by the fixture.
"""

import glob
import gzip
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mnist_jax  # noqa: E402,F401  (XLA flags before JAX starts)
from configs import default  # noqa: E402
from mnist_jax import metrics as metrics_lib  # noqa: E402


# The longest files (seconds of work on 2 cores, summed over their tests),
# longest first. The two xdist workers take files in collection order
# (`--dist loadfile`); alphabetical order handed these out last, and the run
# waited on one worker at the end.
LONGEST_FILES = ('test_parallel.py', 'test_sweep_ray.py',
                 'test_checkpointing.py', 'test_ops.py',
                 'test_checkpoint_faults.py', 'test_user_errors.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def write_idx(path, array, gz=True):
  """Writes a uint8 array as an IDX file (the format of MNIST's files)."""
  magic = 2051 if array.ndim == 3 else 2049
  raw = struct.pack(f'>I{array.ndim}I', magic, *array.shape) + array.astype(
      np.uint8).tobytes()
  opener = gzip.open if gz else open
  with opener(path, 'wb') as f:
    f.write(raw)


def make_digits(n, seed):
  """Learnable fake digits: each class is a bright bar at its own position."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.uint8)
  images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
  for i, label in enumerate(labels):
    r = 2 + 2 * int(label)
    images[i, r:r + 3, 4:24] = 255
  return images, labels


def write_idx_dataset(folder, num_train=700, num_test=230, gz=True):
  os.makedirs(folder, exist_ok=True)
  sfx = '.gz' if gz else ''
  tr_x, tr_y = make_digits(num_train, 0)
  te_x, te_y = make_digits(num_test, 1)
  write_idx(os.path.join(folder, 'train-images-idx3-ubyte' + sfx), tr_x, gz)
  write_idx(os.path.join(folder, 'train-labels-idx1-ubyte' + sfx), tr_y, gz)
  write_idx(os.path.join(folder, 't10k-images-idx3-ubyte' + sfx), te_x, gz)
  write_idx(os.path.join(folder, 't10k-labels-idx1-ubyte' + sfx), te_y, gz)
  return folder


@pytest.fixture(scope='session')
def idx_dir(tmp_path_factory):
  """700 train (100 validate, 600 train) and 230 test generated images."""
  return write_idx_dataset(str(tmp_path_factory.mktemp('mnist_idx')))


def tiny_config_for(idx_folder):
  config = default.get_config()
  config.data.source = 'idx'
  config.data.dir = idx_folder
  config.data.num_validation = 100
  config.data.download = 'false'  # tests never download
  config.batch_size = 32
  config.eval_batch_size = 64  # 100 and 230 are not multiples: padding is used
  config.num_epochs = 2
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  # One compiled program per test run (dispatch lengths k and the remainders
  # would each compile); tests of k > 1 set it themselves.
  config.steps_per_dispatch = 1
  return config


@pytest.fixture
def tiny_config(idx_dir):
  """A fast config on the generated data: 600 train images, batch 32."""
  return tiny_config_for(idx_dir)


def stacked_train_metrics(losses, lrs):
  """Host TrainMetrics stacked over steps, as the loop hands `on_metrics`:
  step i has loss `losses[i]`, learning rate `lrs[i]` and accuracy 1/2."""
  steps = []
  for loss, lr in zip(losses, lrs):
    logits = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    steps.append(metrics_lib.TrainMetrics.single_from_model_output(
        loss=jnp.float32(loss), logits=logits, labels=jnp.array([0, 0]),
        learning_rate=jnp.float32(lr)))
  return jax.tree.map(lambda *x: np.stack([np.asarray(v) for v in x]), *steps)


def read_events(logdir):
  """{tag: {step: (plugin, value or None)}} of every summary in `logdir`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        plugin = v.metadata.plugin_data.plugin_name
        value = tf.make_ndarray(v.tensor) if v.HasField('tensor') else None
        out.setdefault(v.tag, {})[event.step] = (plugin, value)
  return out


_HOLD = ('import sys; from mnist_jax import workdir\n'
         'with workdir.lock(sys.argv[1]):\n'
         '  print("locked", flush=True); sys.stdin.read()\n')


def hold_lock(path):
  """A process holding `path`'s lock until its stdin closes (or it dies)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, '-c', _HOLD, path], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'locked'
  return proc
