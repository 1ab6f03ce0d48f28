"""Invalid configs are rejected before any work, with a clear message."""

import ml_collections
import pytest

from configs import default
from mnist_jax import config_lib
from mnist_jax import steps
from mnist_jax import train
from mnist_jax.errors import ConfigError


def test_default_config_has_the_tutorials_values():
  c = default.get_config()
  assert (c.batch_size, c.initial_learning_rate, c.learning_rate_decay_factor,
          c.num_epochs_per_decay, c.weight_decay, c.dropout_keep_prob,
          c.num_classes) == (512, 0.001, 0.95, 1, 0.0005, 0.5, 10)
  config_lib.validate(c)
  smoke = default.get_config('smoke')
  config_lib.validate(smoke)
  assert 100 <= smoke.num_train_steps <= 500


def test_unknown_config_arg():
  with pytest.raises(ValueError, match='smoke'):
    default.get_config('smok')


@pytest.mark.parametrize('field,value,message', [
    ('batch_size', 0, 'batch_size=0: must be a positive integer'),
    ('batch_size', -4, 'positive integer'),
    ('num_epochs', 0, 'num_epochs=0'),
    ('initial_learning_rate', 0.0, 'initial_learning_rate'),
    ('initial_learning_rate', -1e-3, 'must be > 0'),
    ('learning_rate_decay_factor', 0.0, r'\(0, 1\]'),
    ('learning_rate_decay_factor', 1.5, r'\(0, 1\]'),
    ('dropout_keep_prob', 0.0, 'dropout_keep_prob'),
    ('dropout_keep_prob', 1.2, r'\(0, 1\]'),
    ('num_train_steps', 0, 'num_train_steps'),
    ('data.source', 'csv', 'unknown data source'),
    ('lowering', 'magic', 'lowering'),
    ('dtype', 'float8', 'dtype'),
    ('parallelism', 'tpu', "parallelism='tpu': use one of"),
    ('distributed.initialize', 'maybe', "use one of \\('auto'"),
    ('steps_per_dispatch', -1, 'steps_per_dispatch=-1: must be 0'),
    ('overlap_epoch_end', 'sometimes', "overlap_epoch_end='sometimes'"),
    ('profile_steps', -1, 'profile_steps=-1'),
    ('eval_step', -2, 'eval_step=-2'),
    ('checkpoint_every_steps', -5, 'checkpoint_every_steps=-5'),
    ('adam_b1', 1.5, r'adam_b1=1.5: must be in \[0, 1\)'),
    ('adam_b2', -0.1, 'adam_b2=-0.1'),
    ('adam_eps', -1.0, 'adam_eps=-1.0: must be > 0'),
    ('seed', -1, r'seed=-1: must be an integer in \[0, 2\*\*32\)'),
    ('seed', 2**40, 'seed=1099511627776'),  # would train as seed 0
    ('data.num_validation', -1, r'num_validation=-1: must be an integer >= 0'),
    ('data.name', '', "data.name='': not a TFDS dataset name; use e.g."),
    ('data.name', '../mnist', 'not a TFDS dataset name'),
    ('data.name', 'MNIST', r"not a TFDS dataset name; use 'mnist' \(TFDS "
     'names are lower case'),
    ('augment_shift', 9, r'augment_shift=9: must be an integer number of '
     r'pixels in \[0, 8\]'),
])
def test_invalid_values_rejected(field, value, message):
  c = default.get_config()
  node = c
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(c)


def test_batch_larger_than_training_split_rejected_before_training(
    tiny_config, monkeypatch, tmp_path):
  tiny_config.batch_size = 1024  # the generated training split has 600
  called = []
  monkeypatch.setattr(steps, 'create_train_state',
                      lambda *a, **k: called.append(1))
  with pytest.raises(ConfigError, match='larger than the training split'):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not called


def test_labels_beyond_num_classes_rejected_before_training(
    tiny_config, monkeypatch, tmp_path):
  tiny_config.num_classes = 3  # the generated data has the labels 0-9
  called = []
  monkeypatch.setattr(steps, 'create_train_state',
                      lambda *a, **k: called.append(1))
  with pytest.raises(ConfigError, match=r'num_classes=3: \S+/train-labels-'
                     r'idx1-ubyte.gz has label 9; use at least 10'):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not called


def test_a_dataset_name_with_the_idx_source_is_refused():
  c = default.get_config()
  c.data.source = 'idx'
  config_lib.validate(c)  # 'mnist', the default: nothing to choose
  c.data.name = 'fashion_mnist'
  with pytest.raises(ConfigError, match=(
      r"data.name='fashion_mnist': names a TFDS dataset, and "
      r"data.source='idx' reads the four IDX files")):
    config_lib.validate(c)


def test_tfds_dataset_names_accepted():
  c = default.get_config()
  for name in ('fashion_mnist', 'emnist/balanced', 'mnist:3.0.1',
               'mnist_corrupted/shot_noise:1.*.*'):
    c.data.name = name
    config_lib.validate(c)


def test_get_reads_dotted_fields():
  c = default.get_config()
  assert config_lib.get(c, 'data.source') == c.data.source
  assert config_lib.get(c, 'batch_size') == 512


def test_global_batch_must_divide_over_the_devices(tiny_config):
  tiny_config.batch_size = 30
  config_lib.validate_against_devices(tiny_config, 1)  # 1 device: anything
  config_lib.validate_against_devices(tiny_config, 2)
  with pytest.raises(ConfigError, match=r'batch_size=30 .* 8 devices, .*'
                     r'multiple of 8, e.g. 24 or 32'):
    config_lib.validate_against_devices(tiny_config, 8)
  tiny_config.batch_size = 100
  with pytest.raises(ConfigError, match=r'batch_size=100 .* 8 devices '
                     r'of 2 processes.* 96 or 104'):
    config_lib.validate_against_devices(tiny_config, 8, 2)
  # Evaluation rounds its batch up to the devices (tests/test_parallel.py).
  tiny_config.batch_size, tiny_config.eval_batch_size = 32, 100
  config_lib.validate_against_devices(tiny_config, 8, 2)


def test_describe_takes_comments_from_the_file_and_its_base(tmp_path):
  (tmp_path / 'base.py').write_text(
      'def get_config():\n'
      '  config = ml_collections.ConfigDict()\n'
      '  config.sub = ml_collections.ConfigDict()\n'
      "  config.sub.tag = 'a#b'  # The tag.\n"
      '  config.rate = 0.1  # The rate.\n'
      '  config.rate = 0.2  # Second assignment: not the meaning.\n'
      '  config.bare = 1\n'
      '  return config\n')
  (tmp_path / 'child.py').write_text(
      'from configs import base\n'
      'def get_config():\n'
      '  config = base.get_config()\n'
      '  config.rate = 0.5  # The child\'s rate.\n'
      '  config.extra = (1, 2)\n'
      '  return config\n')
  config = ml_collections.ConfigDict(
      {'sub': {'tag': 'a#b'}, 'rate': 0.5, 'bare': 1, 'extra': (1, 2),
       'unlisted': None})
  lines = config_lib.describe(config, str(tmp_path / 'child.py'), {'rate'})
  assert lines == [
      "  sub.tag = 'a#b'  The tag.",
      "* rate = 0.5       The rate. [child.py: The child's rate.]",
      '  bare = 1',
      '  extra = (1, 2)',
      '  unlisted = None',
  ]
  # An unreadable file: the values still, without comments.
  assert config_lib.describe(config, str(tmp_path / 'gone.py'))[0] == (
      "  bare = 1")
