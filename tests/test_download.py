"""config.data.download: TFDS prepares MNIST once when missing; offline fails
with one line. No network: TFDS's download step is replaced by one that hands
TFDS generated IDX files (the format of MNIST's own files); the rest of TFDS's
preparation and reading is real."""

import os
import socket
import types

import pytest

from conftest import make_digits, tiny_config_for, write_idx
from mnist_jax import config_lib
from mnist_jax import input_pipeline
from mnist_jax.errors import ConfigError, DataError

tfds = pytest.importorskip('tensorflow_datasets')
mnist_builder = pytest.importorskip(
    'tensorflow_datasets.image_classification.mnist')

NUM_TRAIN, NUM_TEST = 300, 120


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
  """TFDS's download step, faked: `.calls` lists its calls; each hands back
  generated, unpacked IDX files, or raises `.error` if set."""
  folder = tmp_path / 'downloads'
  folder.mkdir()
  files = {}
  for key, (n, seed, what) in {
      'train_data': (NUM_TRAIN, 0, 'x'), 'train_labels': (NUM_TRAIN, 0, 'y'),
      'test_data': (NUM_TEST, 1, 'x'), 'test_labels': (NUM_TEST, 1, 'y')
  }.items():
    images, labels = make_digits(n, seed)
    files[key] = str(folder / key)
    write_idx(files[key], images if what == 'x' else labels, gz=False)
  fake = types.SimpleNamespace(calls=[], error=None)

  def download_and_extract(self, urls):
    del self
    fake.calls.append(urls)
    if fake.error is not None:
      raise fake.error
    assert sorted(urls) == sorted(files)  # what TFDS's mnist asks for
    return dict(files)

  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      download_and_extract)
  # The name of MNIST's host resolves (the pre-flight check of being online).
  monkeypatch.setattr(input_pipeline.socket, 'getaddrinfo',
                      lambda host, port: [('resolved', host, port)])
  # TFDS's mnist reads exactly as many images as the real files hold.
  monkeypatch.setattr(mnist_builder, '_TRAIN_EXAMPLES', NUM_TRAIN)
  monkeypatch.setattr(mnist_builder, '_TEST_EXAMPLES', NUM_TEST)
  return fake


def _config(data_dir, download='auto'):
  config = tiny_config_for('')
  config.data.source = 'tfds'
  config.data.dir = str(data_dir)
  config.data.cache_dir = 'none'  # read through TFDS every time
  config.data.num_validation = 50
  config.data.download = download
  return config


def test_auto_downloads_once_when_missing(tmp_path, fake_download, capsys):
  data_dir = tmp_path / 'tfds'
  data = input_pipeline.load(_config(data_dir))
  assert len(fake_download.calls) == 1
  assert (len(data.train), len(data.validation), len(data.test)) == (
      NUM_TRAIN - 50, 50, NUM_TEST)
  images, labels = make_digits(NUM_TEST, 1)
  # The same examples (TFDS writes them in its own, fixed order).
  assert sorted(zip(map(bytes, data.test.images[..., 0]), data.test.labels)) \
      == sorted(zip(map(bytes, images), labels))
  out = capsys.readouterr().out
  assert f'TFDS mnist is not prepared in {data_dir}: downloading' in out
  assert f'TFDS mnist downloaded and prepared in {data_dir} in ' in out
  assert os.path.isdir(data_dir / 'mnist')

  again = input_pipeline.load(_config(data_dir))  # prepared: no download
  assert len(fake_download.calls) == 1
  assert 'downloading' not in capsys.readouterr().out
  assert (again.train.images == data.train.images).all()


def test_download_true_is_auto_and_false_never_downloads(tmp_path,
                                                        fake_download):
  with pytest.raises(DataError) as e:
    input_pipeline.load(_config(tmp_path / 'tfds', download='false'))
  assert str(e.value).startswith(
      f'Cannot read TFDS mnist/train from {tmp_path}/tfds '
      '(config.data.download=false: nothing is downloaded): ')
  assert 'TFDS_DATA_DIR' in str(e.value) and not fake_download.calls
  input_pipeline.load(_config(tmp_path / 'tfds', download='true'))
  assert len(fake_download.calls) == 1


def test_offline_auto_fails_at_once_with_one_line(tmp_path, fake_download,
                                                  monkeypatch):
  def no_dns(host, port):
    raise socket.gaierror(-2, 'Name or service not known')

  monkeypatch.setattr(input_pipeline.socket, 'getaddrinfo', no_dns)
  for proxy in ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(proxy, raising=False)
  data_dir = tmp_path / 'tfds'
  with pytest.raises(DataError) as e:
    input_pipeline.load(_config(data_dir))
  message = str(e.value)
  assert message.startswith(
      f'Could not download TFDS mnist into {data_dir} (cannot resolve '
      'storage.googleapis.com: [Errno -2] Name or service not known). '
      'Without network access, put a prepared tensorflow_datasets folder')
  assert 'TFDS_DATA_DIR' in message and '--config.data.source=idx' in message
  assert '\n' not in message and not fake_download.calls


def test_failed_download_is_one_line(tmp_path, fake_download):
  fake_download.error = ConnectionError(
      "HTTPSConnectionPool(host='storage.googleapis.com'): Max retries "
      'exceeded\n(more detail)')
  data_dir = tmp_path / 'tfds'
  with pytest.raises(DataError) as e:
    input_pipeline.load(_config(data_dir))
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'Could not download TFDS mnist into {data_dir} '
                            '(ConnectionError: ')
  assert 'TFDS_DATA_DIR' in message and '--config.data.source=idx' in message
  assert len(fake_download.calls) == 1
  # Nothing half-prepared is left to be mistaken for the dataset.
  assert not tfds.builder('mnist', data_dir=str(data_dir)).is_prepared()


@pytest.mark.parametrize('value,expected', [
    ('auto', 'auto'), ('AUTO', 'auto'), ('true', True), ('False', False),
    (True, True), (False, False)])
def test_download_settings(value, expected):
  assert config_lib.download_setting(value) == expected


def test_bad_download_setting_is_a_config_error():
  config = tiny_config_for('')
  config.data.download = 'sometimes'
  with pytest.raises(ConfigError, match="config.data.download='sometimes'"):
    config_lib.validate(config)
