"""MNIST input: both sources, the tutorial's split, data order, exact eval."""

import gzip
import hashlib
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
from mnist_jax.errors import ConfigError, DataError


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
  with pytest.raises(ConfigError, match=r'config.num_classes=10: \S+/'
                     r't10k-labels-idx1-ubyte\.gz has label 12; use at least '
                     r'13'):
    input_pipeline.load(tiny_config)
  tiny_config.num_classes = 13  # a dataset of 13 classes in IDX files
  assert input_pipeline.load(tiny_config).test.labels.max() == 12


# ------------------------------------------------- config.data.name (TFDS)

def _tfds_by_name(tiny_config, monkeypatch, data_dir='', num_examples=30):
  """The TFDS source on `data_dir`; returns (tfds, calls, as_dataset): a mock
  `as_dataset` for `tfds.testing.mock_data` whose dataset `name` has images
  all `_value(name)` and that appends each read's (builder name, split) to
  `calls`."""
  tfds = pytest.importorskip('tensorflow_datasets')
  tf = pytest.importorskip('tensorflow')
  monkeypatch.setattr(tf_setup, 'hide_accelerators_from_tf', lambda: True)
  tiny_config.data.source = 'tfds'
  tiny_config.data.dir = data_dir
  tiny_config.data.num_validation = 10
  calls = []

  def as_dataset(self, split, **kwargs):
    del kwargs
    calls.append((self.name, str(split)))
    shape = self.info.features['image'].shape
    return tf.data.Dataset.from_tensor_slices({
        'image': np.full((num_examples, *shape), _value(self.name), np.uint8),
        'label': np.arange(num_examples) % 10})

  return tfds, calls, as_dataset


def _value(name):
  return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 200 + 1


def test_data_name_is_the_tfds_dataset_read(tiny_config, monkeypatch):
  tfds, calls, as_dataset = _tfds_by_name(tiny_config, monkeypatch)
  tiny_config.data.name = 'fashion_mnist'
  tiny_config.data.cache_dir = 'none'
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    data = input_pipeline.load(tiny_config)
  assert sorted(calls) == [('fashion_mnist', 'test'), ('fashion_mnist',
                                                      'train')]
  assert (data.train.images == _value('fashion_mnist')).all()
  assert len(data.test) == 30


def test_decoded_cache_never_mixes_two_datasets(tmp_path, tiny_config,
                                                monkeypatch):
  tfds, calls, as_dataset = _tfds_by_name(tiny_config, monkeypatch,
                                          str(tmp_path / 'tfds'))
  tiny_config.data.cache_dir = str(tmp_path / 'cache')
  records = {}
  for name in ('mnist', 'fashion_mnist'):
    records[name] = tmp_path / 'tfds' / name / '3.0.1' / 'train.tfrecord-0'
    records[name].parent.mkdir(parents=True)
    records[name].write_bytes(b'same bytes')
    os.utime(records[name], (1000, 1000))
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    for _ in range(2):  # decoded, then served from the cache
      for name in ('mnist', 'fashion_mnist'):
        tiny_config.data.name = name
        data = input_pipeline.load(tiny_config)
        assert (data.test.images == _value(name)).all(), name
  assert len(calls) == 4  # each dataset's two splits decoded once
  entries = sorted(p.name for p in (tmp_path / 'cache').glob('*.npz'))
  assert [e.split('-')[0] for e in entries] == ['fashion_mnist', 'mnist']
  # MNIST's entry keeps the name it had before `data.name`: still used.
  record = records['mnist']
  old_key = hashlib.sha256(repr([(str(record), record.stat().st_size,
                                  record.stat().st_mtime)]).encode())
  assert entries[1] == f'mnist-{old_key.hexdigest()[:16]}.npz'


@pytest.mark.parametrize('name, error', [
    ('cifar10', r"config.data.name='cifar10': its images are 32x32x3 uint8, "
                r"the model takes 28x28x1 uint8; use a dataset of such images, "
                r"e.g. 'mnist', 'fashion_mnist' or 'kmnist'\.$"),
    ('emnist/balanced', r'config.num_classes=10: TFDS emnist/balanced has '
                        r'label 46; use at least 47 \(--config.num_classes=47'),
    ('imdb_reviews', r"imdb_reviews': not an image classification dataset"),
    ('zzqx', r"config.data.name='zzqx': not a TFDS "
                r"dataset; use e.g. 'mnist'"),
    ('fashion_mnst', r"'fashion_mnst': not a TFDS dataset; did you mean "
                     r"'fashion_mnist'\?$"),
])
def test_a_dataset_the_model_cannot_take_is_one_line(tiny_config, monkeypatch,
                                                     name, error):
  tfds, calls, as_dataset = _tfds_by_name(tiny_config, monkeypatch)
  tiny_config.data.name = name
  tiny_config.data.cache_dir = 'none'
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    with pytest.raises(ConfigError, match=error) as e:
      input_pipeline.load(tiny_config)
  assert '\n' not in str(e.value)
  assert not calls  # known from the dataset's description: nothing read


def test_images_of_the_wrong_shape_are_caught_when_loaded(tiny_config,
                                                          monkeypatch):
  """A dataset whose data does not match its description."""
  tfds, _, _ = _tfds_by_name(tiny_config, monkeypatch)
  tf = pytest.importorskip('tensorflow')
  tiny_config.data.cache_dir = 'none'

  def as_dataset(self, split, **kwargs):
    del self, split, kwargs
    return tf.data.Dataset.from_tensor_slices({
        'image': np.zeros((20, 32, 32, 1), np.uint8), 'label': np.zeros(20)})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    with pytest.raises(ConfigError, match=r"config.data.name='mnist': its "
                       r'images are 32x32x1 uint8, the model takes 28x28x1'):
      input_pipeline.load(tiny_config)


def test_random_shift_moves_each_image_within_the_bound():
  images = conftest.make_digits(6, 0)[0][..., None]
  key = jax.random.key(3)
  out = np.asarray(input_pipeline.random_shift(images, key, 2))
  assert out.dtype == np.uint8 and out.shape == images.shape
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = []
  for image, moved in zip(padded, out):
    found = [(dy, dx) for dy in range(5) for dx in range(5)
             if np.array_equal(image[dy:dy + 28, dx:dx + 28], moved)]
    assert found, 'not a shift of at most 2 pixels with a black border'
    offsets.append(found[0])
  assert len(set(offsets)) > 1  # each image its own offset
  np.testing.assert_array_equal(
      input_pipeline.random_shift(images, key, 2), out)  # a function of key
  assert not np.array_equal(
      input_pipeline.random_shift(images, jax.random.key(4), 2), out)
  assert input_pipeline.random_shift(images, key, 0) is images
