"""A lean training process for the checkpoint fault tests.

    python tests/ckpt_driver.py <workdir> '<config as JSON>' [save_init]

Runs `train.train_and_evaluate` with only the checkpoint hook and exits like
launch.py (143 after a pre-emption), without importing TensorFlow and the
summary writers, which would cost seconds per process. With `save_init`, it
only saves the freshly initialised state as step 0 (no step to compile).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

import mnist_jax  # noqa: E402,F401  (XLA flags before JAX starts)
from launch import EXIT_PREEMPTED  # noqa: E402
from mnist_jax import checkpointing  # noqa: E402
from mnist_jax import parallel  # noqa: E402
from mnist_jax import steps  # noqa: E402
from mnist_jax import train  # noqa: E402
from mnist_jax.hooks import checkpoint  # noqa: E402


def save_init(config, workdir):
  run = train.setup(config, workdir)
  state = parallel.put_replicated(steps.create_train_state(
      config, run.model, len(run.data.train), run.rngs['init']), run.mesh)
  manager = checkpointing.create_manager(checkpointing.checkpoint_dir(workdir))
  checkpointing.save(manager, 0, checkpointing.state_tree(state), config, {
      'history': [], 'metrics': {}, 'time': time.time(), 'reason': 'init'})
  manager.wait_until_finished()
  manager.close()


def main(workdir, config_json, mode='train'):
  config = ml_collections.ConfigDict(json.loads(config_json))
  if mode == 'save_init':
    return save_init(config, workdir)
  result = train.train_and_evaluate(config, workdir,
                                    hooks=[checkpoint.CheckpointHook()])
  sys.exit(EXIT_PREEMPTED if result.get('stopped_early') else 0)


if __name__ == '__main__':
  main(*sys.argv[1:])
