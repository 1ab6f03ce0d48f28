"""Keeps TensorFlow (used by TFDS and clu's writers) off the accelerators."""

import functools


@functools.cache
def hide_accelerators_from_tf() -> None:
  """Hides GPUs from TensorFlow so it never takes accelerator memory from JAX.

  Must run before TensorFlow touches a GPU, i.e. before any TFDS or summary
  writer use; it is idempotent and called by `train_and_evaluate` and
  `launch.py` at start-up.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
