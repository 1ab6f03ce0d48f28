"""Config validation: every bad value is rejected before any work starts."""

from __future__ import annotations

from mnist_jax.errors import ConfigError

DATA_SOURCES = ('tfds', 'idx')
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
  check(config.num_train_steps == -1 or config.num_train_steps > 0,
        'num_train_steps', 'must be -1 (use num_epochs) or > 0.')
  check(config.data.source in DATA_SOURCES, 'data.source',
        f'unknown data source; use one of {DATA_SOURCES}.')
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
  check(config.data.num_validation > 0, 'data.num_validation', 'must be > 0.')
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
  if max_label is not None and max_label >= config.num_classes:
    raise ConfigError(
        f'config.num_classes={config.num_classes}: the data has label '
        f'{max_label}; use at least {max_label + 1}.')


def validate_against_devices(config, num_devices: int,
                             num_processes: int = 1) -> None:
  """Checks that the global batch sizes split evenly over the devices."""
  n = num_devices
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if value % n:
      ok = [v for v in (value - value % n, value - value % n + n) if v > 0]
      hosts = f' of {num_processes} processes' if num_processes > 1 else ''
      raise ConfigError(
          f'config.{field}={value} (global) does not divide by the {n} '
          f'devices{hosts}, which each take an equal share; use a multiple '
          f'of {n}, e.g. {" or ".join(map(str, ok))}.')


def download_setting(value: bool | str) -> bool | str:
  """`config.data.download` as 'auto', True or False (ValueError if none)."""
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.strip().lower() in DOWNLOAD_SETTINGS:
    return DOWNLOAD_SETTINGS[value.strip().lower()]
  raise ValueError(f'Not a data.download setting: {value!r}')
