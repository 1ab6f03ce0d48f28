"""MNIST input: both sources, the tutorial's split, data order, exact eval."""

import gzip
import os

import jax
import numpy as np
import pytest

import conftest
from conftest import make_digits, write_idx_dataset
from mnist_jax import input_pipeline
from mnist_jax import models
from mnist_jax import parallel
from mnist_jax import steps
from mnist_jax import tf_setup
from mnist_jax.errors import DataError


@pytest.mark.parametrize('gz', [True, False])
def test_idx_source_split_sizes_and_order(tmp_path, tiny_config, gz):
  folder = write_idx_dataset(str(tmp_path), num_train=700, num_test=230, gz=gz)
  tiny_config.data.dir = folder
  data = input_pipeline.load(tiny_config)
  assert (len(data.train), len(data.validation), len(data.test)) == (600, 100,
                                                                     230)
  images, labels = make_digits(700, 0)
  # The *first* num_validation images validate, the rest train (tutorial).
  np.testing.assert_array_equal(data.validation.images[..., 0], images[:100])
  np.testing.assert_array_equal(data.train.labels, labels[100:])
  assert data.train.images.dtype == np.uint8
  assert data.train.images.shape[1:] == (28, 28, 1)
  assert data.train.labels.dtype == np.int32


def test_tfds_source_on_mock_data(tiny_config, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  tiny_config.data.source = 'tfds'
  tiny_config.data.dir = ''
  tiny_config.data.num_validation = 20
  tiny_config.data.cache_dir = 'none'  # read through the mock, not a cache
  calls = []
  monkeypatch.setattr(tf_setup, 'hide_accelerators_from_tf',
                      lambda: calls.append('hide') or True)  # TF is there
  real_load = tfds.load
  monkeypatch.setattr(tfds, 'load', lambda *a, **k: calls.append('load') or
                      real_load(*a, **k))
  with tfds.testing.mock_data(num_examples=70):
    data = input_pipeline.load(tiny_config)
  # TensorFlow is kept off the GPUs before TFDS first touches it.
  assert calls[0] == 'hide' and calls.count('load') == 2, calls
  assert (len(data.train), len(data.validation), len(data.test)) == (50, 20, 70)
  assert data.train.images.shape == (50, 28, 28, 1)
  assert data.train.images.dtype == np.uint8
  assert data.test.labels.dtype == np.int32


def test_normalize_to_unit_interval():
  x = np.array([0, 128, 255], np.uint8)
  np.testing.assert_allclose(input_pipeline.normalize(x), [0, 128 / 255, 1],
                             rtol=1e-6)


def test_epoch_permutations_deterministic_and_differ_across_epochs():
  rng = jax.random.key(0)
  p0 = np.asarray(input_pipeline.epoch_permutation(rng, 0, 1000))
  p0b = np.asarray(input_pipeline.epoch_permutation(jax.random.key(0), 0, 1000))
  p1 = np.asarray(input_pipeline.epoch_permutation(rng, 1, 1000))
  other_seed = np.asarray(
      input_pipeline.epoch_permutation(jax.random.key(1), 0, 1000))
  np.testing.assert_array_equal(p0, p0b)
  assert sorted(p0) == list(range(1000)) and sorted(p1) == list(range(1000))
  assert not np.array_equal(p0, p1)
  assert not np.array_equal(p0, other_seed)


def test_evaluation_counts_every_example_exactly_once(tiny_config):
  """230 test images with eval batches of 64: padding is masked out."""
  data = input_pipeline.load(tiny_config)
  mesh = parallel.create_mesh()
  model = models.create_model(tiny_config)
  params = models.init_params(model, jax.random.key(0))
  split = steps.device_eval_split(data.test, 64, mesh)
  assert split['image'].shape[:2] == (4, 64)
  # A batch larger than the split is the split (rounded to the devices):
  # eval_batch_size=100000 asked for 100,000 padded images per batch.
  whole = steps.device_eval_split(data.test, 100_000, mesh)
  n = mesh.devices.size
  assert whole['image'].shape[:2] == (1, -(-230 // n) * n)
  logits = model.apply({'params': params}, data.test.images / 255.0,
                       train=False)
  expected = np.mean(np.argmax(logits, -1) == data.test.labels)
  for split in (split, whole):
    metrics = jax.device_get(steps.make_eval_fn(model, mesh)(
        {'params': params}, split))
    assert int(metrics.accuracy.count) == 230
    assert int(metrics.loss.count) == 230
    np.testing.assert_allclose(float(metrics.accuracy.compute()), expected,
                               rtol=1e-6)


def test_missing_idx_folder_clear_error(tmp_path, tiny_config):
  tiny_config.data.dir = str(tmp_path / 'nothing_here')
  with pytest.raises(DataError, match='train-images-idx3-ubyte.*TFDS_DATA_DIR'):
    input_pipeline.load(tiny_config)


def test_idx_without_dir_clear_error(tiny_config):
  tiny_config.data.dir = ''
  with pytest.raises(DataError, match='data.dir'):
    input_pipeline.load(tiny_config)


def test_missing_tfds_data_clear_error(tmp_path, tiny_config, monkeypatch):
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  tiny_config.data.source = 'tfds'
  tiny_config.data.dir = str(tmp_path / 'no_tfds')
  with pytest.raises(DataError, match='TFDS_DATA_DIR'):
    input_pipeline.load(tiny_config)


@pytest.mark.parametrize('damage', ['truncate_gz', 'truncate_raw', 'bad_magic'])
def test_corrupt_idx_file_error_names_the_file(tmp_path, tiny_config, damage):
  gz = damage != 'truncate_raw'
  folder = write_idx_dataset(str(tmp_path), gz=gz)
  name = 't10k-images-idx3-ubyte' + ('.gz' if gz else '')
  path = os.path.join(folder, name)
  if damage == 'bad_magic':
    with gzip.open(path, 'rb') as f:
      raw = bytearray(f.read())
    raw[3] = 7
    with gzip.open(path, 'wb') as f:
      f.write(bytes(raw))
  else:
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      f.truncate(size // 2)
  tiny_config.data.dir = folder
  with pytest.raises(DataError, match=name):
    input_pipeline.load(tiny_config)


def test_unknown_source_rejected(tiny_config):
  tiny_config.data.source = 'csv'
  with pytest.raises(DataError, match="Unknown data source 'csv'"):
    input_pipeline.load(tiny_config)


def test_tfds_decoded_cache_is_keyed_by_the_source_files(tmp_path, tiny_config,
                                                         monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  data_dir = tmp_path / 'tfds' / 'mnist' / '3.0.1'
  data_dir.mkdir(parents=True)
  record = data_dir / 'mnist-train.tfrecord-00000-of-00001'
  record.write_bytes(b'x')
  tiny_config.data.source = 'tfds'
  tiny_config.data.dir = str(tmp_path / 'tfds')
  tiny_config.data.cache_dir = str(tmp_path / 'cache')
  tiny_config.data.num_validation = 20
  calls = []
  real_load = tfds.load
  monkeypatch.setattr(tfds, 'load',
                      lambda *a, **k: calls.append(1) or real_load(*a, **k))
  with tfds.testing.mock_data(num_examples=60):
    first = input_pipeline.load(tiny_config)
    n_calls = len(calls)
    assert n_calls == 2  # train and test were decoded
    second = input_pipeline.load(tiny_config)
    assert len(calls) == n_calls  # served from the cache
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    record.write_bytes(b'changed data')  # a changed dataset is read again
    input_pipeline.load(tiny_config)
    assert len(calls) == n_calls + 2
    # Only the most recently used datasets stay (each ~55 MB for MNIST).
    cached = lambda: sorted((tmp_path / 'cache').glob('mnist-*.npz'))  # pylint: disable=g-long-lambda
    assert len(cached()) == 2
    newest = max(cached(), key=os.path.getmtime)
    for i in range(input_pipeline.MAX_CACHED_DATASETS + 1):
      record.write_bytes(b'version %d' % i)
      os.utime(record, (1000 + i, 1000 + i))
      input_pipeline.load(tiny_config)
    assert len(cached()) == input_pipeline.MAX_CACHED_DATASETS
    assert newest not in cached()


def test_hiding_gpus_from_tensorflow_happens_once(monkeypatch):
  tf = pytest.importorskip('tensorflow')
  calls = []
  monkeypatch.setattr(tf.config, 'set_visible_devices',
                      lambda devices, kind: calls.append((devices, kind)))
  monkeypatch.setattr(tf_setup, '_hidden', False)
  tf_setup.hide_accelerators_from_tf()
  tf_setup.hide_accelerators_from_tf()
  assert calls == [([], 'GPU')]


def test_home_in_data_paths_is_expanded(tmp_path, tiny_config, monkeypatch):
  """`--config.data.dir=~/x`: the shell leaves that `~` alone; we do not."""
  monkeypatch.setenv('HOME', str(tmp_path))
  write_idx_dataset(str(tmp_path / 'MNIST_data'))
  tiny_config.data.dir = '~/MNIST_data'
  assert len(input_pipeline.load(tiny_config).test) == 230
  tfds = pytest.importorskip('tensorflow_datasets')
  record = tmp_path / 'tfds' / 'mnist' / '3.0.1' / 'mnist-train.tfrecord-0'
  record.parent.mkdir(parents=True)
  record.write_bytes(b'x')  # a file to key the decoded cache on
  tiny_config.data.source = 'tfds'
  tiny_config.data.dir = '~/tfds'
  tiny_config.data.cache_dir = '~/cache'
  tiny_config.data.num_validation = 20
  with tfds.testing.mock_data(num_examples=60):
    input_pipeline.load(tiny_config)
  assert len(list((tmp_path / 'cache').glob('mnist-*.npz'))) == 1
  assert not os.path.exists('~')  # no folder named '~' here


def test_idx_folder_given_to_the_tfds_source_says_use_idx(tmp_path,
                                                          tiny_config):
  tiny_config.data.source = 'tfds'
  tiny_config.data.dir = write_idx_dataset(str(tmp_path / 'MNIST_data'))
  with pytest.raises(DataError, match=r'holds the MNIST IDX files, not a TFDS '
                     r'data dir: read them with --config.data.source=idx'):
    input_pipeline.load(tiny_config)


def test_bad_labels_name_the_labels_file(tmp_path, tiny_config):
  folder = write_idx_dataset(str(tmp_path))
  labels = np.full(230, 12, np.uint8)
  conftest.write_idx(os.path.join(folder, 't10k-labels-idx1-ubyte.gz'), labels)
  tiny_config.data.dir = folder
  with pytest.raises(DataError, match=r't10k-labels-idx1-ubyte\.gz: labels '
                     r'outside 0\.\.9'):
    input_pipeline.load(tiny_config)
