"""Config validation (every bad value is rejected before any work starts),
and `launch.py --mode config`'s listing of the fields."""

from __future__ import annotations

import ast
import os
import re
import tokenize

from mnist_jax.errors import ConfigError

DATA_SOURCES = ('tfds', 'idx')
# config.data.name: a TFDS name, optionally with a config and a version
# ('mnist', 'emnist/balanced', 'mnist:3.*.*'); also a folder in the data dir.
DATASET_NAME = re.compile(r'[a-z][a-z0-9_]*(/[A-Za-z0-9_][\w.-]*)?(:[\d.*]+)?')
# Datasets the model takes as they are (28x28x1 uint8 images, 10 classes).
DATASET_EXAMPLES = "'mnist', 'fashion_mnist' or 'kmnist'"
LOWERINGS = ('auto', 'fast', 'reference')
DTYPES = ('float32', 'bfloat16')
PARALLELISMS = ('jit', 'pmap')
DISTRIBUTED_INIT = ('auto', 'yes', 'no')
# config.overlap_epoch_end: 'auto' = on GPU/TPU (see train.overlaps_epoch_end).
OVERLAP_EPOCH_END = ('auto', 'yes', 'no')
# config.data.download: 'auto' (download when missing), True (the same), False.
# From the command line they come as strings ('--config.data.download=false').
DOWNLOAD_SETTINGS = {'auto': 'auto', 'true': True, 'false': False}


def get(config, dotted: str):
  """`config.a.b` for `dotted='a.b'`."""
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def leaves(tree, prefix: str = '') -> dict:
  """A config (ConfigDict or its JSON dict) as {dotted field: value}."""
  if hasattr(tree, 'to_dict'):
    tree = tree.to_dict()
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(leaves(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def validate(config) -> None:
  """Checks `config`; raises ConfigError naming the field and what to do."""

  def check(ok: bool, field: str, why: str):
    if not ok:
      raise ConfigError(f'config.{field}={get(config, field)!r}: {why}')

  def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

  for field in ('batch_size', 'num_epochs', 'eval_batch_size', 'log_every_steps',
                'eval_every_epochs',
                'max_checkpoints_to_keep', 'num_classes'):
    check(is_int(get(config, field)) and get(config, field) > 0, field,
          'must be a positive integer.')
  check(is_int(config.checkpoint_every_steps)
        and config.checkpoint_every_steps >= 0, 'checkpoint_every_steps',
        'must be 0 (at every epoch end) or a positive number of steps.')
  check(config.initial_learning_rate > 0, 'initial_learning_rate',
        'must be > 0.')
  check(0 < config.learning_rate_decay_factor <= 1,
        'learning_rate_decay_factor', 'must be in (0, 1].')
  check(config.num_epochs_per_decay > 0, 'num_epochs_per_decay', 'must be > 0.')
  check(config.weight_decay >= 0, 'weight_decay', 'must be >= 0.')
  for field in ('adam_b1', 'adam_b2'):
    check(0 <= get(config, field) < 1, field, 'must be in [0, 1).')
  check(config.adam_eps > 0, 'adam_eps', 'must be > 0.')
  # JAX keeps a key's low 32 bits (2**32 would train as seed 0), and numpy's
  # generators (the summaries' samples) refuse negative seeds.
  check(is_int(config.seed) and 0 <= config.seed < 2**32, 'seed',
        'must be an integer in [0, 2**32).')
  check(0 < config.dropout_keep_prob <= 1, 'dropout_keep_prob',
        'must be in (0, 1] (1 disables dropout).')
  check(is_int(config.augment_shift) and 0 <= config.augment_shift <= 8,
        'augment_shift', 'must be an integer number of pixels in [0, 8] (0 '
        '= no augmentation).')
  check(config.num_train_steps == -1 or config.num_train_steps > 0,
        'num_train_steps', 'must be -1 (use num_epochs) or > 0.')
  check(config.data.source in DATA_SOURCES, 'data.source',
        f'unknown data source; use one of {DATA_SOURCES}.')
  name = config.data.name
  lower = (f"{name.lower()!r}" if isinstance(name, str)
           and DATASET_NAME.fullmatch(name.lower()) else None)
  check(isinstance(name, str) and DATASET_NAME.fullmatch(name), 'data.name',
        f'not a TFDS dataset name; use {lower} (TFDS names are lower case).'
        if lower else f'not a TFDS dataset name; use e.g. {DATASET_EXAMPLES}.')
  # The IDX source reads whatever its folder holds; a name there would be a
  # label the run's identity keeps, without choosing anything.
  check(config.data.source != 'idx' or name == 'mnist', 'data.name',
        "names a TFDS dataset, and data.source='idx' reads the four IDX files "
        "in data.dir, whatever they hold: leave data.name at 'mnist' (or use "
        "--config.data.source=tfds).")
  check(config.lowering in LOWERINGS, 'lowering', f'use one of {LOWERINGS}.')
  check(config.dtype in DTYPES, 'dtype', f'use one of {DTYPES}.')
  check(config.parallelism in PARALLELISMS, 'parallelism',
        f'use one of {PARALLELISMS}.')
  check(config.distributed.initialize in DISTRIBUTED_INIT,
        'distributed.initialize', f'use one of {DISTRIBUTED_INIT}.')
  check(is_int(config.steps_per_dispatch) and config.steps_per_dispatch >= 0,
        'steps_per_dispatch', 'must be 0 (auto: 10 on the CPU, an epoch on '
        'GPU/TPU) or a positive number of steps.')
  check(config.overlap_epoch_end in OVERLAP_EPOCH_END, 'overlap_epoch_end',
        f'use one of {OVERLAP_EPOCH_END}.')
  check(is_int(config.data.num_validation)
        and config.data.num_validation >= 0, 'data.num_validation',
        'must be an integer >= 0 (0: train on every training image, no '
        'validation set).')
  try:
    download_setting(config.data.download)
  except ValueError:
    check(False, 'data.download', "use 'auto' (download MNIST when missing), "
          'true (the same) or false (never download).')
  check(is_int(config.profile_steps) and config.profile_steps >= 0,
        'profile_steps', 'must be an integer >= 0 (0 = no profiler trace).')
  check(is_int(config.eval_step) and config.eval_step >= -1, 'eval_step',
        'use -1 (the latest checkpoint) or a saved step (see --mode info).')


def validate_against_data(config, num_train: int,
                          max_label: int | None = None) -> None:
  """Checks what needs the data: the batch no larger than the training split,
  and (given the largest label) a class for every label."""
  if config.batch_size > num_train:
    raise ConfigError(
        f'config.batch_size={config.batch_size} is larger than the training '
        f'split ({num_train} images); use at most {num_train}.')
  if max_label is not None:
    validate_num_classes(config, max_label, 'the data')


def validate_dataset(config, image_shape: tuple[int | None, ...],
                     image_dtype: str, num_labels: int | None,
                     model_shape: tuple[int, ...]) -> None:
  """Checks the TFDS dataset `config.data.name` against the model: images of
  `model_shape` and dtype uint8, a class for every label.

  Args:
    config: the run's config.
    image_shape: the dataset's image shape (from its TFDS features, before
      anything is downloaded, or from the loaded images).
    image_dtype: the images' dtype name.
    num_labels: how many classes its labels take (None: unknown).
    model_shape: the image shape the model takes.
  """
  name = config.data.name
  shape = lambda s: 'x'.join('?' if d is None else str(d) for d in s)  # pylint: disable=unnecessary-lambda-assignment
  if tuple(image_shape) != tuple(model_shape) or image_dtype != 'uint8':
    raise ConfigError(
        f'config.data.name={name!r}: its images are {shape(image_shape)} '
        f'{image_dtype}, the model takes {shape(model_shape)} uint8; use a '
        f'dataset of such images, e.g. {DATASET_EXAMPLES}.')
  if num_labels:
    validate_num_classes(config, num_labels - 1, f'TFDS {name}')


def validate_num_classes(config, max_label: int, what: str) -> None:
  """Checks that `config.num_classes` has a class for `what`'s largest
  label, `max_label` (`what`: e.g. a labels file, for a damaged one)."""
  if max_label >= config.num_classes:
    raise ConfigError(
        f'config.num_classes={config.num_classes}: {what} has label '
        f'{max_label}; use at least {max_label + 1} '
        f'(--config.num_classes={max_label + 1}).')


def validate_against_devices(config, num_devices: int,
                             num_processes: int = 1) -> None:
  """Checks that the global training batch splits evenly over the devices
  (an evaluation batch is rounded up to a multiple of them, its padding
  masked out: `steps.device_eval_split`)."""
  n, value = num_devices, config.batch_size
  if value % n:
    ok = [v for v in (value - value % n, value - value % n + n) if v > 0]
    hosts = f' of {num_processes} processes' if num_processes > 1 else ''
    raise ConfigError(
        f'config.batch_size={value} (global) does not divide by the {n} '
        f'devices{hosts}, which each take an equal share; use a multiple '
        f'of {n}, e.g. {" or ".join(map(str, ok))}.')


def download_setting(value: bool | str) -> bool | str:
  """`config.data.download` as 'auto', True or False (ValueError if none)."""
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.strip().lower() in DOWNLOAD_SETTINGS:
    return DOWNLOAD_SETTINGS[value.strip().lower()]
  raise ValueError(f'Not a data.download setting: {value!r}')


# ------------------------------------------------------- --mode config

def _assignments(path: str) -> dict[str, str]:
  """`config.<field> = ...` lines of a config file: {dotted field: its
  trailing comment, or ''}, in the file's order."""
  found = {}
  with open(path, 'rb') as f:
    tokens = list(tokenize.tokenize(f.readline))
  by_line: dict[int, list[tokenize.TokenInfo]] = {}
  for token in tokens:
    by_line.setdefault(token.start[0], []).append(token)
  for line in by_line.values():
    words = [t for t in line if t.type in (tokenize.NAME, tokenize.OP)]
    if len(words) < 4 or words[0].string != 'config':
      continue
    parts, i = [], 1
    while (i + 1 < len(words) and words[i].string == '.'
           and words[i + 1].type == tokenize.NAME):
      parts.append(words[i + 1].string)
      i += 2
    if parts and i < len(words) and words[i].string == '=':
      comments = [t.string for t in line if t.type == tokenize.COMMENT]
      found.setdefault('.'.join(parts),
                       comments[-1].lstrip('#').strip() if comments else '')
  return found


def _imported_siblings(path: str) -> list[str]:
  """Config files beside `path` that it imports (`from configs import
  default`), e.g. the default config a TPU config builds on."""
  folder = os.path.dirname(os.path.abspath(path))
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      names += [a.name for a in node.names] + [(node.module or '').split('.')[-1]]
    elif isinstance(node, ast.Import):
      names += [a.name.split('.')[-1] for a in node.names]
  files = [os.path.join(folder, f'{n}.py') for n in dict.fromkeys(names) if n]
  return [f for f in files if os.path.isfile(f) and not os.path.samefile(f, path)]


def describe(config, config_file: str, overridden=()) -> list[str]:
  """`--mode config`: a line per field, `name = value` and its comment: from
  a config file beside it that it imports (e.g. the default config it builds
  on), with the file's own note in brackets, or from the file; in the files'
  order; fields set on the command line (`overridden`) marked `*`.

  Args:
    config: the config as a run would use it (overrides applied).
    config_file: its file (without the `:arg`).
    overridden: the dotted fields the command line set.
  """
  comments: dict[str, str] = {}
  try:  # In the base file's order: what a field means, then the file's note.
    for path in [*_imported_siblings(config_file), config_file]:
      for field, comment in _assignments(path).items():
        meaning = comments.get(field, '')
        if comment and meaning and path == config_file:
          comment = f'{meaning} [{os.path.basename(path)}: {comment}]'
        comments[field] = comment or meaning
  except (OSError, SyntaxError, tokenize.TokenError, ValueError):
    comments = {}  # values without comments rather than no answer
  values = leaves(config)
  order = {field: i for i, field in enumerate(comments)}
  fields = sorted(values, key=lambda f: (order.get(f, len(order)), f))
  cells = [f'{"*" if f in overridden else " "} {f} = {values[f]!r}'
           for f in fields]
  width = min(max(map(len, cells), default=0), 56)
  return [f'{cell:<{width}}  {comments.get(f, "")}'.rstrip()
          for cell, f in zip(cells, fields)]
