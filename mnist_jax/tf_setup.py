"""Keeps TensorFlow (used by TFDS and clu's writers) off the accelerators, and
off the start-up's critical path."""

import importlib
import threading

from absl import logging

from mnist_jax import console

_lock = threading.Lock()
_hidden = False
_available = None  # None: not tried yet; then whether TensorFlow imports.
_preload_thread = None

# clu modules that import TensorFlow (~2 s on a 2-core machine).
TF_MODULES = ('clu.metric_writers', 'clu.periodic_actions')


def hide_accelerators_from_tf() -> bool:
  """Hides GPUs from TensorFlow so it never takes accelerator memory from JAX.

  Must run before TensorFlow touches a GPU, i.e. before any TFDS or summary
  writer use; idempotent and thread-safe. Everything in mnist_jax that imports
  TensorFlow calls it first.

  Returns whether TensorFlow is installed. Accelerator images often carry JAX
  without TensorFlow: there summaries go through TensorBoard's own event
  writer (`hooks.event_writer`) and the IDX data source needs none.
  """
  global _hidden, _available
  with _lock:
    if _hidden or _available is False:
      return bool(_available)
    with console.native_info_to_log():  # TF's C++ start-up notices
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        _available = False
        logging.info('TensorFlow is not importable (%s): summaries use '
                     "TensorBoard's own event writer.", e)
        return False
      tf.config.set_visible_devices([], 'GPU')
    _hidden = _available = True
    return True


def preload_in_background() -> threading.Thread:
  """Imports TensorFlow (GPUs hidden) and clu's writers on a thread.

  Training needs them only for summaries, which start after the first steps;
  importing them beside data loading and compilation (which release the GIL)
  takes ~2 s off the time to the first step. Idempotent. A failure here is
  only logged: the same import in the main thread reports it properly.
  """
  global _preload_thread

  def work():
    try:
      if not hide_accelerators_from_tf():
        return
      for name in TF_MODULES:
        importlib.import_module(name)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Background import of TensorFlow failed: %s', e)

  with _lock:
    if _preload_thread is None:
      # Not a daemon: a process that exits while TensorFlow is still
      # importing (e.g. after an `Error:` line at start-up) aborted in its
      # C++ teardown (SIGABRT, ~1 exit in 8 here), and one that waits for
      # it in an atexit handler crashes (the import then ends during
      # shutdown). Python waits for a non-daemon thread before shutting down.
      _preload_thread = threading.Thread(target=work, name='tf-preload',
                                         daemon=False)
      _preload_thread.start()
  return _preload_thread


def wait_for_preload() -> None:
  """Waits until `preload_in_background`'s imports are done, if it started.

  TFDS imports under etils' lazy imports, which patch `import` for the whole
  process: an import running meanwhile on another thread fails (or returns a
  lazy stub). Import TFDS only after this.
  """
  thread = _preload_thread
  if thread is not None and thread is not threading.current_thread():
    thread.join()
