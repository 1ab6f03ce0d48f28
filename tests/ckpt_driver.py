"""A lean training process for the checkpoint fault tests.

    python tests/ckpt_driver.py <workdir> '<config as JSON>'

Runs `train.train_and_evaluate` with only the checkpoint hook and exits like
launch.py (143 after a pre-emption), without importing TensorFlow and the
summary writers, which would cost seconds per process.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

import mnist_jax  # noqa: E402,F401  (XLA flags before JAX starts)
from mnist_jax import checkpointing  # noqa: E402
from mnist_jax import train  # noqa: E402


def main(workdir, config_json):
  config = ml_collections.ConfigDict(json.loads(config_json))
  result = train.train_and_evaluate(
      config, workdir, hooks=[checkpointing.CheckpointHook(config)])
  sys.exit(checkpointing.EXIT_PREEMPTED if result.get('stopped_early') else 0)


if __name__ == '__main__':
  main(*sys.argv[1:])
