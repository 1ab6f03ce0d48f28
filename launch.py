r"""Trains and evaluates mnist_jax; a thin entry point over the library.

  python launch.py --config configs/default.py --workdir runs/default
  python launch.py --config configs/default.py:smoke --config.batch_size=128

Bad input (config, data, checkpoints) is reported as one line, `Error: ...`,
with exit status 2.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import mnist_jax  # noqa: F401  (sets XLA flags before JAX starts its backend)
from mnist_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/default.py[:smoke].',
    lock_config=True)
flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, summaries and metrics go. Default: '
    'runs/<config file name>[_<config arg>].')
flags.mark_flags_as_required(['config'])


def default_workdir(config_path: str) -> str:
  path, _, arg = config_path.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', name + (f'_{arg}' if arg else ''))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  from mnist_jax import tf_setup, train  # pylint: disable=g-import-not-at-top
  tf_setup.hide_accelerators_from_tf()
  workdir = FLAGS.workdir or default_workdir(
      flags.FLAGS['config'].config_filename)
  logging.info('JAX process %d / %d; local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  logging.info('Workdir: %s', workdir)
  try:
    train.train_and_evaluate(FLAGS.config, workdir)
  except UserError as e:
    print(f'Error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
