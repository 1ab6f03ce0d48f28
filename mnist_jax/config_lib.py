"""Config validation: every bad value is rejected before any work starts."""

from __future__ import annotations

from mnist_jax.errors import ConfigError

DATA_SOURCES = ('tfds', 'idx')
LOWERINGS = ('auto', 'fast', 'reference')
DTYPES = ('float32', 'bfloat16')
PARALLELISMS = ('jit', 'pmap')


def validate(config) -> None:
  """Checks `config`; raises ConfigError naming the field and what to do."""

  def check(ok: bool, field: str, why: str):
    if not ok:
      raise ConfigError(f'config.{field}={config_get(config, field)!r}: {why}')

  def positive_int(field):
    v = config_get(config, field)
    check(isinstance(v, int) and not isinstance(v, bool) and v > 0, field,
          'must be a positive integer.')

  for field in ('batch_size', 'num_epochs', 'eval_batch_size', 'log_every_steps',
                'steps_per_dispatch', 'eval_every_epochs',
                'max_checkpoints_to_keep', 'num_classes'):
    if config_get(config, field) is not None:
      positive_int(field)
  every = config.get('checkpoint_every_steps', 0)
  check(isinstance(every, int) and every >= 0, 'checkpoint_every_steps',
        'must be 0 (at every epoch end) or a positive number of steps.')
  check(config.initial_learning_rate > 0, 'initial_learning_rate',
        'must be > 0.')
  check(0 < config.learning_rate_decay_factor <= 1,
        'learning_rate_decay_factor', 'must be in (0, 1].')
  check(config.num_epochs_per_decay > 0, 'num_epochs_per_decay', 'must be > 0.')
  check(config.weight_decay >= 0, 'weight_decay', 'must be >= 0.')
  check(0 < config.dropout_keep_prob <= 1, 'dropout_keep_prob',
        'must be in (0, 1] (1 disables dropout).')
  check(config.num_train_steps == -1 or config.num_train_steps > 0,
        'num_train_steps', 'must be -1 (use num_epochs) or > 0.')
  check(config.data.source in DATA_SOURCES, 'data.source',
        f'unknown data source; use one of {DATA_SOURCES}.')
  check(config.get('lowering', 'auto') in LOWERINGS, 'lowering',
        f'use one of {LOWERINGS}.')
  check(config.get('dtype', 'float32') in DTYPES, 'dtype',
        f'use one of {DTYPES}.')
  check(config.get('parallelism', 'jit') in PARALLELISMS, 'parallelism',
        f'use one of {PARALLELISMS}.')
  check(config.data.num_validation > 0, 'data.num_validation', 'must be > 0.')
  profile_steps = config.get('profile_steps', 0)
  check(isinstance(profile_steps, int) and profile_steps >= 0, 'profile_steps',
        'must be an integer >= 0 (0 = no profiler trace).')


def validate_against_data(config, num_train: int) -> None:
  """Checks what needs the dataset size (batch no larger than the split)."""
  if config.batch_size > num_train:
    raise ConfigError(
        f'config.batch_size={config.batch_size} is larger than the training '
        f'split ({num_train} images); use at most {num_train}.')


def config_get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node.get(part) if hasattr(node, 'get') else getattr(node, part)
  return node
