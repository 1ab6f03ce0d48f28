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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

import mnist_jax  # noqa: E402,F401  (XLA flags before JAX starts)
from mnist_jax import checkpointing  # noqa: E402
from mnist_jax import train  # noqa: E402


def save_init(config, workdir):
  ctx = train.setup(config, workdir)
  state = train.put_replicated(train.create_train_state(
      config, ctx.model, ctx.learning_rate_fn, ctx.rngs['init']), ctx.mesh)
  hook = checkpointing.CheckpointHook(config)
  state = hook.on_train_start(ctx, state)
  hook.save(ctx, 0, state, reason='init')
  hook.on_train_end(ctx, 0, state, None)


def main(workdir, config_json, mode='train'):
  config = ml_collections.ConfigDict(json.loads(config_json))
  if mode == 'save_init':
    return save_init(config, workdir)
  result = train.train_and_evaluate(
      config, workdir, hooks=[checkpointing.CheckpointHook(config)])
  sys.exit(checkpointing.EXIT_PREEMPTED if result.get('stopped_early') else 0)


if __name__ == '__main__':
  main(*sys.argv[1:])
