r"""Trains and evaluates mnist_jax; a thin entry point over the library.

  python launch.py --config configs/default.py --workdir runs/default
  python launch.py --config configs/default.py:smoke --config.batch_size=128

  python launch.py --config configs/default.py --workdir runs/default --mode eval
  python launch.py --config configs/default.py --workdir runs/default --mode info
  python launch.py --config configs/default.py --workdir runs/default \
      --mode predict --image digit.png [more.jpg ...]
  python launch.py --config configs/default.py --config.seed=3 --mode config

Every config field can be set with --config.<field>=<value>; `--mode config`
lists them, with their values and meaning, and starts nothing.

Bad input (config, data, checkpoints) is reported as one line, `Error: ...`,
with exit status 2. A run pre-empted by SIGTERM saves a checkpoint and exits
with status 143; the same command resumes it.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import mnist_jax  # noqa: F401  (sets XLA flags before JAX starts its backend)
from mnist_jax import cli
from mnist_jax import config_lib
from mnist_jax import console
from mnist_jax import workdir as workdir_lib
from mnist_jax.errors import UserError

# Exit status after a SIGTERM pre-emption was saved: 128 + 15, what
# supervisors expect of a terminated process (retry-on-pre-emption policies
# fire), yet distinct from errors (2) and success (0).
EXIT_PREEMPTED = 143
# Exit status after Ctrl-C (saved, or aborted): 128 + SIGINT, as a shell's.
EXIT_INTERRUPTED = 130

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/default.py[:smoke].',
    lock_config=True)
flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, summaries and metrics go. Default: '
    'runs/<config file name>[_<config arg>].')
flags.DEFINE_bool(
    'sweep', False, "Run the config file's sweep (its get_sweep()) on Ray: "
    'every point in <workdir>/<its overrides>; re-running skips finished '
    'points.')
flags.DEFINE_integer(
    'sweep_parallel', 1, 'With --sweep: points per machine (CPU-only) or per '
    'GPU sharing it; see docs/sweeps.md.')
flags.DEFINE_integer(
    'sweep_retries', 2, 'With --sweep: how many more times a failed point is '
    "tried, in a fresh process, from its checkpoints (a sweep's re-run keeps "
    'its first run\'s value).')
flags.DEFINE_string(
    'sweep_address', None, 'With --sweep: the Ray cluster to run the points '
    'on (host:port); default $RAY_ADDRESS, else Ray embedded in this run.')
flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'info', 'predict', 'config'],
    'train: train (resuming from <workdir>/checkpoints if any); eval: '
    'evaluate the latest (or --config.eval_step) checkpoint; info: list the '
    'checkpoints; predict: classify --image files with the latest checkpoint; '
    'config: list the config fields (--config.<field>=...) as a run would '
    'use them, and exit.')
flags.DEFINE_multi_string(
    'image', [], 'With --mode predict: PNG/JPEG digit images; more may follow '
    'as plain arguments (--image a.png b.jpg).')
flags.mark_flags_as_required(['config'])


def default_workdir(config_path: str) -> str:
  path, _, arg = config_path.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', name + (f'_{arg}' if arg else ''))


def print_config() -> int:
  """`--mode config`: the fields as a run would use them; nothing starts."""
  try:
    config_lib.validate(FLAGS.config)
  except UserError as e:
    print(f'Error: {e}', file=sys.stderr, flush=True)
    return 2
  path = flags.FLAGS['config'].config_filename
  try:
    print(f'{path} as a run uses it (* = set on the command line):')
    print('\n'.join(config_lib.describe(
        FLAGS.config, path.partition(':')[0],
        FLAGS['config'].override_values)), flush=True)
  except BrokenPipeError:  # `| head`: as other commands, no traceback
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0


def main(argv):
  if len(argv) > 1 and FLAGS.mode != 'predict':
    print(f'Error: Unexpected argument(s) {argv[1:]}: flags take the form '
          '--name=value (image paths only with --mode predict).',
          file=sys.stderr, flush=True)
    sys.exit(2)
  if FLAGS.mode == 'config':
    sys.exit(print_config())
  console.setup()  # Log chatter off the console (before TF and JAX start).
  import jax  # pylint: disable=g-import-not-at-top
  from mnist_jax import tf_setup, train  # pylint: disable=g-import-not-at-top
  from mnist_jax import parallel  # pylint: disable=g-import-not-at-top
  from mnist_jax import checkpointing  # pylint: disable=g-import-not-at-top
  try:  # Bad values stop before any file is made; multi-host starts before
    # anything touches a JAX backend.
    config_lib.validate(FLAGS.config)
    parallel.initialize_distributed(FLAGS.config)
  except UserError as e:
    print(f'Error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  # (`--workdir=~/x`: the shell leaves a `~` after `=` as it is.)
  workdir = os.path.expanduser(FLAGS.workdir or default_workdir(
      flags.FLAGS['config'].config_filename))
  logging.info('JAX process %d / %d; local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  logging.info('Workdir: %s', workdir)
  try:
    if FLAGS.sweep and FLAGS.mode != 'train':
      raise UserError(f'--sweep trains its points; it does not combine with '
                      f'--mode {FLAGS.mode} (run that on a point\'s workdir).')
    if not FLAGS.sweep and (FLAGS.sweep_parallel != 1 or FLAGS.sweep_address
                            or FLAGS['sweep_retries'].present):
      raise UserError('--sweep_parallel, --sweep_retries and --sweep_address '
                      'need --sweep.')
    if FLAGS.mode == 'train':  # One run per workdir (held until exit).
      workdir_lib.claim(workdir, enabled=parallel.is_lead())
      console.log_to_file(workdir, jax.process_index())
    # TensorFlow (GPUs hidden) only once the command line has passed its
    # checks: its import takes seconds, and an exit waits for it.
    if FLAGS.mode == 'train' and not FLAGS.sweep:
      tf_setup.preload_in_background()  # beside data loading and compiling
    else:
      tf_setup.hide_accelerators_from_tf()
    if FLAGS.sweep:
      from mnist_jax import sweep_run  # pylint: disable=g-import-not-at-top
      sys.exit(sweep_run.run_from_file(flags.FLAGS['config'].config_filename,
                                       FLAGS.config, workdir,
                                       parallel=FLAGS.sweep_parallel,
                                       address=FLAGS.sweep_address,
                                       retries=FLAGS.sweep_retries))
    if FLAGS.mode in ('eval', 'predict'):
      # The run's own config (data, model, dtype), not the config file's
      # defaults; what the command line sets wins.
      config = checkpointing.run_config(
          workdir, FLAGS.config, FLAGS['config'].override_values,
          None if FLAGS.config.eval_step == -1 else FLAGS.config.eval_step)
      config_lib.validate(config)
    if FLAGS.mode == 'predict':
      from mnist_jax import predict  # pylint: disable=g-import-not-at-top
      sys.exit(predict.run(config, workdir, FLAGS.image + argv[1:]))
    if FLAGS.mode != 'train':
      from mnist_jax import evaluate  # pylint: disable=g-import-not-at-top
      if FLAGS.mode == 'eval':
        evaluate.evaluate_checkpoint(config, workdir)
      else:
        evaluate.print_checkpoints(workdir)
      return
    result = train.train_and_evaluate(FLAGS.config, workdir)
    if result and result.get('stopped_early'):  # state saved
      sys.exit(EXIT_INTERRUPTED if result['stop_reason'] == 'SIGINT'
               else EXIT_PREEMPTED)
  except UserError as e:
    print(f'Error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  except KeyboardInterrupt:  # outside training's own Ctrl-C handling
    print('\nInterrupted' + (' before training started; nothing to save.'
                             if FLAGS.mode == 'train' else '.'),
          file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
