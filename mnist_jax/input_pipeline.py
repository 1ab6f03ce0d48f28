"""MNIST input: whole splits as uint8 arrays, the tutorial's split, data order.

The dataset (55 MB as uint8) is loaded once into host memory and once onto
the devices; each step gathers its batch there. Sources: 'tfds' (the TFDS
dataset `data.name`, 'mnist' by default; with `data.download='auto'` it is
downloaded and prepared once when missing) or 'idx' (the tutorial's
`MNIST_data/` IDX files). The first
`num_validation` training images, in the source's own order, validate. Epoch
`e` visits the training set in the order `permutation(fold_in(key, e))`, a
pure function of (seed, epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import os
import re
import socket
import struct
import time
import urllib.parse
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import config_lib
from mnist_jax import tf_setup
from mnist_jax.errors import ConfigError
from mnist_jax.errors import DataError

IMAGE_SHAPE = (28, 28, 1)
MAX_CACHED_DATASETS = 4  # decoded TFDS datasets kept in the cache dir

IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number (uint8 data).

_USE_IDX = ('--config.data.source=idx --config.data.dir=<folder with '
            'train-images-idx3-ubyte.gz ...>')
# A decoded-cache entry: `<dataset>-<16 hex digits of its key>.npz`.
_CACHE_ENTRY = '*-' + '[0-9a-f]' * 16 + '.npz'


def _how_to_fix(name: str) -> str:
  return ('Set TFDS_DATA_DIR (or --config.data.dir) to a prepared '
          f'tensorflow_datasets folder that holds {name}, or use the IDX files '
          f'with {_USE_IDX}.')


@dataclasses.dataclass(frozen=True)
class Split:
  """One split held in host memory."""
  images: np.ndarray  # uint8 [N, 28, 28, 1], 0 = background, 255 = ink.
  labels: np.ndarray  # int32 [N].

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Mnist:
  """The tutorial's three splits."""
  train: Split
  validation: Split
  test: Split


def load(config) -> Mnist:
  """Loads MNIST as chosen by `config.data` and splits it as the tutorial.

  Args:
    config: the run's config (uses `config.data.source`, `.name` (TFDS only),
      `.dir`, `.num_validation`, `.download`, `.cache_dir`, and
      `config.num_classes`).

  Returns:
    The train/validation/test splits as uint8 images and int32 labels.

  Raises:
    DataError: the data cannot be found, read or is malformed; the message
      says what to do.
    ConfigError: the TFDS dataset `config.data.name` is not one of 28x28x1
      uint8 images with at most `config.num_classes` classes.
  """
  source = config.data.source
  # `--config.data.dir=~/x`: the shell leaves a `~` after `=` as it is.
  folder = os.path.expanduser(config.data.dir)
  if source == 'tfds':
    data_dir = folder or os.path.expanduser(
        os.environ.get('TFDS_DATA_DIR') or '')
    name = config.data.name
    if _holds_idx_files(data_dir, name):
      raise DataError(
          f'{data_dir} holds the MNIST IDX files, not a TFDS data dir: read '
          'them with --config.data.source=idx (or point data.dir at a '
          'tensorflow_datasets folder).')
    train, test = _cached(
        name, _tfds_files(data_dir, name),
        os.path.expanduser(config.data.cache_dir),
        lambda: _load_tfds(config, data_dir))
  elif source == 'idx':
    train, test = _load_idx(folder, config)
  else:  # config_lib.validate names the sources
    raise DataError(f'Unknown data source {source!r}.')
  n_val = config.data.num_validation
  if not 0 <= n_val < len(train):
    raise DataError(
        f'config.data.num_validation={n_val} must be in [0, {len(train)}):'
        f' the training split has only {len(train)} images.')
  return Mnist(
      train=Split(train.images[n_val:], train.labels[n_val:]),
      validation=Split(train.images[:n_val], train.labels[:n_val]),
      test=test)


def _load_tfds(config, data_dir: str) -> tuple[Split, Split]:
  """Reads the whole 'train' and 'test' splits of the TFDS dataset
  `config.data.name` in file order.

  Its features are checked against the model first (`config_lib.
  validate_dataset`). When the splits are not prepared in `data_dir` and
  `config.data.download` is 'auto' (or True), TFDS downloads and prepares
  them there first, once.
  """
  name = config.data.name
  if not tf_setup.hide_accelerators_from_tf():  # before TFDS imports TF
    raise DataError(
        "data.source='tfds' reads its data through TensorFlow, which is not "
        'importable here: install it (pip install tensorflow-cpu) or use '
        f'{_USE_IDX}.')
  tf_setup.wait_for_preload()  # no other imports while TFDS imports
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  download = config_lib.download_setting(config.data.download)
  where = data_dir or f'{_default_tfds_dir()} (TFDS default)'
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    close = re.search(r'Did you mean: \S+ -> (\S+)', str(e))
    hint = (f'did you mean {close.group(1)!r}?' if close else
            f'use e.g. {config_lib.DATASET_EXAMPLES}.')
    raise ConfigError(f'config.data.name={name!r}: not a TFDS dataset; '
                      f'{hint}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Cannot open the TFDS data dir {where} '
                    f'({_brief(e)}). {_how_to_fix(name)}') from None
  _check_features(config, builder)  # before anything is downloaded
  try:
    # (TFDS's is_prepared() warns about a missing folder: look first; an
    # epath, so gs:// data dirs work too.)
    missing = bool(download) and not (
        (builder.data_path / 'dataset_info.json').exists()
        and builder.is_prepared())
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Cannot open the TFDS data dir {where} '
                    f'({_brief(e)}). {_how_to_fix(name)}') from None
  if missing:
    _download_and_prepare(builder, name, where)
  splits = []
  for split in ('train', 'test'):
    try:
      ds = tfds.load(name, split=split, data_dir=data_dir or None,
                     download=False, shuffle_files=False)
      images, labels = [], []
      for batch in tfds.as_numpy(ds.batch(10_000)):
        images.append(batch['image'])
        labels.append(batch['label'])
    except Exception as e:  # pylint: disable=broad-except
      never = '' if download else (
          ' (config.data.download=false: nothing is downloaded)')
      raise DataError(f'Cannot read TFDS {name}/{split} from {where}'
                      f'{never}: {_brief(e)}. '
                      f'{_how_to_fix(name)}') from None
    images, labels = np.concatenate(images), np.concatenate(labels)
    # What the features could not tell (or a dataset that breaks them).
    config_lib.validate_dataset(
        config, images.shape[1:], images.dtype.name,
        int(labels.max()) + 1 if labels.size else None, IMAGE_SHAPE)
    splits.append(_make_split(images, labels, f'TFDS {name}/{split}'))
  return splits[0], splits[1]


def _check_features(config, builder) -> None:
  """Checks the dataset's declared features (`builder.info`, known before it
  is downloaded) with `config_lib.validate_dataset`."""
  try:
    features = builder.info.features
    keys = list(features.keys())
  except Exception:  # pylint: disable=broad-except
    return  # no description here: the loaded arrays are checked instead
  if 'image' not in keys or 'label' not in keys:
    raise ConfigError(
        f'config.data.name={config.data.name!r}: not an image classification '
        f"dataset (its features: {', '.join(keys)}); use one with an 'image' "
        f"and an integer 'label', e.g. {config_lib.DATASET_EXAMPLES}.")
  image = features['image']
  try:
    shape = tuple(image.shape)
    dtype = np.dtype(image.np_dtype).name
  except Exception:  # pylint: disable=broad-except
    return  # not an image feature TFDS describes: check the arrays
  config_lib.validate_dataset(config, shape, dtype,
                              getattr(features['label'], 'num_classes', None),
                              IMAGE_SHAPE)


def _brief(e: BaseException, limit: int = 200) -> str:
  """'Type: first line of the message', cut at a word within `limit`."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  text = lines[0] if lines else ''
  if len(text) > limit:
    text = text[:limit].rsplit(' ', 1)[0].rstrip('.,;:') + ' ...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _download_and_prepare(builder, name: str, where: str) -> None:
  """TFDS downloads the dataset `name` (MNIST: ~11 MB) and prepares it in the
  data dir; says so."""
  def offline(why: str) -> DataError:
    return DataError(
        f'Could not download TFDS {name} into {where} ({why}). Without '
        'network access, put a prepared tensorflow_datasets folder there (or '
        'point TFDS_DATA_DIR or --config.data.dir at one), or use the four IDX '
        f'files: {_USE_IDX}; --config.data.download=false never downloads.')

  # Offline, TFDS would retry for minutes before failing deep inside its
  # downloader: a host that does not resolve fails at once.
  host = urllib.parse.urlparse(getattr(builder, 'URL', '') or '').hostname
  if host and not _uses_proxy():
    try:
      socket.getaddrinfo(host, 443)
    except OSError as e:
      raise offline(f'cannot resolve {host}: {e}') from None
  print(f'TFDS {name} is not prepared in {where}: downloading and preparing '
        'it there (once)...', flush=True)
  t0 = time.perf_counter()
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise offline(_brief(e)) from None
  print(f'TFDS {name} downloaded and prepared in {where} in '
        f'{time.perf_counter() - t0:.0f} s.', flush=True)


def _uses_proxy() -> bool:
  """Whether HTTPS goes through a proxy (then names may not resolve here)."""
  return any(os.environ.get(v) for v in (
      'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'))


def _default_tfds_dir() -> str:
  return os.path.expanduser('~/tensorflow_datasets')


def _dataset_dir(data_dir: str, name: str) -> str:
  """Where TFDS keeps the dataset `name` ('mnist', 'emnist/balanced',
  'mnist:3.0.1': all versions) in `data_dir`."""
  return os.path.join(data_dir or _default_tfds_dir(),
                      *name.partition(':')[0].split('/'))


def _tfds_files(data_dir: str, name: str) -> list[str]:
  """The prepared files of the TFDS dataset `name` (empty if there are none
  to key a cache)."""
  root = _dataset_dir(data_dir, name)
  files = []
  for dirpath, _, names in os.walk(root):
    files += [os.path.join(dirpath, n) for n in names]
  return sorted(f for f in files if '.tfrecord' in f or '.array_record' in f)


def _cached(name: str, files: list[str], cache_dir: str, load_fn):
  """Decoded splits of the TFDS dataset `name` cached as .npz, keyed by the
  dataset's name and its source files' identity.

  Decoding 70,000 PNGs through TFDS takes ~4 s, most of a cold start; the
  cache makes it ~0.2 s. The key covers the name and the source files' paths,
  sizes and modification times, so a changed dataset is read again and two
  datasets never share an entry. `cache_dir='none'` disables it; '' means
  $XDG_CACHE_HOME/mnist_jax (~/.cache/mnist_jax).
  """
  if cache_dir == 'none' or not files:
    return load_fn()
  cache_dir = cache_dir or os.path.join(
      os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
      'mnist_jax')
  identity = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f))
              for f in files]
  # 'mnist' keeps the key it had before `data.name` existed (its files are
  # under `<data_dir>/mnist/`, so no other name's files can give that key).
  key = hashlib.sha256(repr(
      identity if name == 'mnist' else (name, identity)).encode())
  prefix = re.sub(r'[^A-Za-z0-9_]+', '_', name)
  path = os.path.join(cache_dir, f'{prefix}-{key.hexdigest()[:16]}.npz')
  try:
    with np.load(path) as z:
      splits = (Split(z['train_images'], z['train_labels']),
                Split(z['test_images'], z['test_labels']))
    with contextlib.suppress(OSError):
      os.utime(path)  # recently used: kept by `_prune_cache`
    return splits
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
    pass  # absent or unreadable: decode again and rewrite
  train, test = load_fn()
  try:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp.npz'
    np.savez(tmp, train_images=train.images, train_labels=train.labels,
             test_images=test.images, test_labels=test.labels)
    os.replace(tmp, path)  # atomic: concurrent runs never see half a file
    _prune_cache(cache_dir)
  except OSError:
    pass  # a read-only cache dir only costs speed
  return train, test


def _prune_cache(cache_dir: str, keep: int = MAX_CACHED_DATASETS) -> None:
  """Deletes all but the `keep` most recently used decoded datasets (MNIST
  ~55 MB; a moved or touched data dir makes a new one), of any name."""
  files = glob.glob(os.path.join(cache_dir, _CACHE_ENTRY))
  files.sort(key=lambda f: os.path.getmtime(f) if os.path.exists(f) else 0,
             reverse=True)
  for stale in files[keep:]:
    with contextlib.suppress(OSError):
      os.remove(stale)


def _load_idx(folder: str, config) -> tuple[Split, Split]:
  """Reads the four classic IDX files (gzipped or not) from `folder`: MNIST's,
  or another dataset's in the same format (Fashion-MNIST ships them too),
  with a class (`config.num_classes`) for every label."""
  if not folder:
    raise DataError('data.source=idx needs --config.data.dir=<folder with the '
                    'four MNIST IDX files> (the tutorial\'s MNIST_data/).')
  arrays, paths = {}, {}
  for key, name in IDX_FILES.items():
    paths[key] = _find_idx_file(folder, name)
    arrays[key] = read_idx(paths[key], ndim=3 if key.endswith('images') else 1)
    if key.endswith('labels') and arrays[key].size:
      config_lib.validate_num_classes(config, int(arrays[key].max()),
                                      paths[key])
  return tuple(
      _make_split(arrays[f'{split}_images'][..., None],
                  arrays[f'{split}_labels'], paths[f'{split}_images'],
                  labels_from=paths[f'{split}_labels'])
      for split in ('train', 'test'))


def _holds_idx_files(folder: str, name: str) -> bool:
  """Whether `folder` has the four IDX files (and not the TFDS dataset
  `name`)."""
  if not folder or os.path.isdir(_dataset_dir(folder, name)):
    return False
  return all(any(os.path.isfile(os.path.join(folder, name + ext))
                 for ext in ('.gz', ''))
             for name in IDX_FILES.values())


def _find_idx_file(folder: str, name: str) -> str:
  for candidate in (name + '.gz', name):
    path = os.path.join(folder, candidate)
    if os.path.isfile(path):
      return path
  raise DataError(
      f'IDX file {name}[.gz] not found in {folder!r}. {_how_to_fix("mnist")}')


def read_idx(path: str, ndim: int) -> np.ndarray:
  """Reads a uint8 IDX file (optionally gzipped), validating its header.

  Args:
    path: the file.
    ndim: expected number of dimensions (3 for images, 1 for labels).

  Returns:
    The array, uint8 with the header's shape.

  Raises:
    DataError: naming the file, if it is truncated, corrupt or of the wrong kind.
  """
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        raw = f.read()
    else:
      with open(path, 'rb') as f:
        raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'Corrupt or truncated IDX file {path}: {e}. Replace it '
                    'with a fresh copy of the MNIST file.') from None
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f'Corrupt or truncated IDX file {path}: only {len(raw)} '
                    'bytes. Replace it with a fresh copy of the MNIST file.')
  magic = struct.unpack('>I', raw[:4])[0]
  if magic != _IDX_MAGIC[ndim]:
    raise DataError(f'{path} is not a {ndim}-D uint8 IDX file (magic {magic}, '
                    f'expected {_IDX_MAGIC[ndim]}). Check the file names.')
  shape = struct.unpack(f'>{ndim}I', raw[4:header])
  expected = header + int(np.prod(shape))
  if len(raw) != expected:
    raise DataError(
        f'Corrupt or truncated IDX file {path}: {len(raw)} bytes, header says '
        f'{expected}. Replace it with a fresh copy of the MNIST file.')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _make_split(images: np.ndarray, labels: np.ndarray, what: str,
                labels_from: str | None = None) -> Split:
  """A checked split; errors name `what` (and `labels_from` for labels).
  (The callers check the labels against `config.num_classes`.)"""
  images = np.ascontiguousarray(images, dtype=np.uint8)
  labels = np.asarray(labels)
  if images.shape[1:] != IMAGE_SHAPE or len(images) != len(labels):
    both = f'{what} and {labels_from}' if labels_from else what
    raise DataError(f'{both}: unexpected shapes {images.shape} / '
                    f'{labels.shape}, expected [N, 28, 28, 1] images and [N] '
                    'labels.')
  if labels.size and labels.min() < 0:
    raise DataError(f'{labels_from or what}: negative labels.')
  return Split(images, labels.astype(np.int32))


# ---------------------------------------------------------------- data order

def epoch_permutation(rng: jax.Array, epoch, num_examples: int) -> jax.Array:
  """The training order of `epoch`: a pure function of (rng, epoch).

  Jit-able; `rng` is the run's data key (`fold_in(key(seed), 'data')`).
  """
  return jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)


def random_shift(images: jax.Array, rng: jax.Array,
                 max_shift: int) -> jax.Array:
  """Training augmentation: each image moved by its own random offset of up
  to `max_shift` pixels along each axis, the uncovered border black (0).

  A pure function of `rng` (the training step derives it from the seed and
  the step, so runs stay reproducible and resumable) on device, inside the
  step; with a batch sharded over devices each shard is moved where it is.

  Args:
    images: [B, H, W, C] images, any dtype.
    rng: the key of this batch's offsets.
    max_shift: the largest offset; 0 returns `images` as they are.

  Returns:
    [B, H, W, C], the same dtype.
  """
  if max_shift == 0:
    return images
  _, h, w, c = images.shape
  offsets = jax.random.randint(rng, (len(images), 2), 0, 2 * max_shift + 1)
  pad = (max_shift, max_shift)
  padded = jnp.pad(images, ((0, 0), pad, pad, (0, 0)))
  return jax.vmap(lambda image, o: jax.lax.dynamic_slice(
      image, (o[0], o[1], 0), (h, w, c)))(padded, offsets)


def normalize(images: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 [0, 255] -> `dtype` in [0, 1], as the tutorial's `read_data_sets`."""
  return images.astype(dtype) * (1.0 / 255.0)


def pad_to_multiple(split: Split, multiple: int) -> dict[str, np.ndarray]:
  """Pads a split to a multiple of `multiple` examples, with a validity mask.

  Evaluation runs over the padded arrays and weights each example by `mask`,
  so every real example is counted exactly once and padding never is.
  """
  n = len(split)
  padded = -(-n // multiple) * multiple
  pad = padded - n
  return {
      'image': np.concatenate(
          [split.images, np.zeros((pad,) + IMAGE_SHAPE, np.uint8)]),
      'label': np.concatenate([split.labels, np.zeros((pad,), np.int32)]),
      'mask': np.concatenate([np.ones((n,), bool), np.zeros((pad,), bool)]),
  }
