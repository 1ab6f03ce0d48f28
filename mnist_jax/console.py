"""A quiet console: library log chatter goes to `<workdir>/log.txt`.

By default the console shows what the run prints (parameter overview, progress,
epoch lines, results) and log records at WARNING and above; every record that
absl's `--verbosity` lets through (INFO by default: orbax, clu's writers, TFDS,
TensorFlow, JAX) goes to the workdir's log file instead. absl's own flags bring
the chatter back: an explicit `--verbosity=0` (INFO) or `--verbosity=1` (debug)
shows that level on the console as well; `--alsologtostderr` and
`--logtostderr` behave as absl documents. Log lines reach the console through
tqdm, so a live progress bar is cleared and redrawn around them, never broken.

TensorFlow 2.21 writes its start-up INFO lines (oneDNN, CPU features) from C++
straight to file descriptor 2, whatever `TF_CPP_MIN_LOG_LEVEL` says
(tensorflow/tensorflow#100442); `native_info_to_log` moves them to the log too.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import re
import sys
import threading
import traceback

from absl import flags
from absl import logging as absl_logging
import tqdm

FLAGS = flags.FLAGS

LOG_FILE = 'log.txt'
# Libraries whose log records, warnings and errors included, go to the log
# file only unless the console was asked for them (`--verbosity`).
QUIET_LIBRARIES = ('orbax', 'tensorflow_datasets')
# What is kept in memory until the log file is known (and for runs that have
# none: eval, info, predict); beyond it, records go to the log file only.
MAX_BUFFERED_CHARS = 1 << 20

_lock = threading.Lock()
_console_handler = None
_quiet_native = False  # setup() ran without verbose: C++ INFO to the log.
_native_lock = threading.Lock()  # Held while fd 2 is filtered.
_restore_lock = threading.Lock()
_native_filter = None  # (console fd, pump thread) while fd 2 is filtered.
# C++ (absl/glog-style) INFO lines, and absl's notice that precedes them.
_NATIVE_INFO = re.compile(
    rb'^(I\d{4} [\d:.]+ +\d+ [^ ]+:\d+\] |'
    rb'WARNING: All log messages before absl::InitializeLog\(\))')


def verbose_requested() -> bool:
  """Whether absl's flags ask for log records on the console."""
  return bool(FLAGS['verbosity'].present or FLAGS['alsologtostderr'].value
              or FLAGS['logtostderr'].value)


def setup(verbose: bool | None = None) -> None:
  """Keeps log records off the console (but WARNING+) until `log_to_file`.

  Call once flags are parsed, before TensorFlow is imported or JAX starts its
  backend (their C++ start-up logs obey `TF_CPP_MIN_LOG_LEVEL`, read then).
  Records are held in memory (up to `MAX_BUFFERED_CHARS`) until `log_to_file`
  names the file they belong in.

  Args:
    verbose: show records of absl's `--verbosity` level on the console too;
      default `verbose_requested()`.
  """
  global _console_handler, _quiet_native
  if verbose is None:
    verbose = verbose_requested()
  _quiet_native = not verbose
  if not verbose:
    # TensorFlow's and XLA's C++ INFO lines (oneDNN notices and the like).
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
    sys.unraisablehook = _unraisable_to_log
  if not isinstance(sys.stdout, _SurvivesClosedPipe):
    sys.stdout = _SurvivesClosedPipe(sys.stdout)
  if FLAGS['logtostderr'].value:
    return  # absl writes every record to stderr only: nothing to route.
  absl_logging.use_absl_handler()
  python_handler = absl_logging.get_absl_handler().python_handler
  python_handler.acquire()
  try:
    python_handler.stream = _Buffer()
  finally:
    python_handler.release()
  if FLAGS['alsologtostderr'].value:
    return  # absl also writes every record to stderr itself.
  if not FLAGS['stderrthreshold'].present:
    # Records reach the console through `_TqdmConsoleHandler` only, which
    # keeps the bar intact (absl would copy ERRORs to stderr itself).
    FLAGS.stderrthreshold = 'fatal'
  # tqdm makes its lock (importing multiprocessing) at first use: do it now,
  # not in a logging call from a thread while another thread imports under
  # etils' lazy imports (as TFDS does), where that import fails.
  tqdm.tqdm.get_lock()
  with _lock:
    if _console_handler is None:
      _console_handler = _TqdmConsoleHandler()
      _console_handler.setFormatter(absl_logging.PythonFormatter())
      logging.root.addHandler(_console_handler)
    _console_handler.setLevel(logging.NOTSET if verbose else logging.WARNING)
    _console_handler.quiet_libraries = not verbose


def log_to_file(workdir: str, process_index: int = 0) -> str | None:
  """Sends log records to `<workdir>/log.txt` from now on (appending).

  Records held since `setup` are written first. Processes other than 0 of a
  multi-host run write `log.<process_index>.txt`.

  Args:
    workdir: the run's (existing, writable) workdir.
    process_index: `jax.process_index()`.

  Returns:
    The log file's path, or None with `--logtostderr` (no file).
  """
  if FLAGS['logtostderr'].value:
    return None
  name = LOG_FILE if process_index == 0 else f'log.{process_index}.txt'
  path = os.path.join(workdir, name)
  f = open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
  python_handler = absl_logging.get_absl_handler().python_handler
  python_handler.acquire()
  try:
    old = python_handler.stream
    if isinstance(old, _Buffer):
      f.write(old.getvalue())
    elif old not in (sys.stderr, sys.stdout, None):
      old.close()
    python_handler.stream = f
  finally:
    python_handler.release()
  f.flush()
  return path


@contextlib.contextmanager
def native_info_to_log():
  """Moves C++ INFO lines written to stderr (fd 2) in the block to the log.

  Everything else written to fd 2 meanwhile (warnings, errors, Python's own
  stderr) still reaches the console at once. A no-op unless `setup` made the
  console quiet. Wrap short blocks that print C++ start-up notices (importing
  TensorFlow): while it lasts, fd 2 is a pipe read by a thread.
  """
  global _native_filter
  if not _quiet_native or not _native_lock.acquire(blocking=False):
    yield  # Not quiet, or another block already filters fd 2.
    return
  try:
    sys.stderr.flush()
    console_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = threading.Thread(target=_pump_native, args=(read_fd, console_fd),
                            name='native-stderr', daemon=True)
    pump.start()
    with _restore_lock:
      _native_filter = (console_fd, pump)
    try:
      yield
    finally:
      _restore_native()
  finally:
    _native_lock.release()


def _restore_native(at_exit: bool = False) -> None:
  """Puts the console back on fd 2; the pump passes on what it still holds.

  Also runs at exit: a process that ends while another thread is still in a
  `native_info_to_log` block (e.g. an error during the background import of
  TensorFlow) must not lose what it wrote to stderr (its `Error:` line). That
  thread's later start-up notices would then land below it on the console,
  so at exit fd 2 goes to /dev/null instead once the pump has drained.
  """
  global _native_filter
  with _restore_lock:
    if _native_filter is None:
      return
    console_fd, pump = _native_filter
    _native_filter = None
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    if at_exit:
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, 2)  # Closes the pipe's last writer: the pump ends.
      os.close(devnull)
    else:
      os.dup2(console_fd, 2)
    pump.join(timeout=5)
    if not pump.is_alive():  # (A child process may still hold the pipe.)
      os.close(console_fd)


atexit.register(_restore_native, at_exit=True)


def _pump_native(read_fd: int, console_fd: int) -> None:
  pending = b''
  with os.fdopen(read_fd, 'rb', buffering=0) as pipe:
    while chunk := pipe.read(65536):
      *lines, pending = (pending + chunk).split(b'\n')
      for line in lines:
        if _NATIVE_INFO.match(line):
          _write_to_log(line.decode(errors='replace') + '\n')
        else:
          os.write(console_fd, line + b'\n')
      if pending and pending[:1] not in (b'I', b'W'):
        os.write(console_fd, pending)  # A partial line (e.g. a tqdm redraw).
        pending = b''
  if pending:
    os.write(console_fd, pending)


def _write_to_log(text: str) -> None:
  python_handler = absl_logging.get_absl_handler().python_handler
  python_handler.acquire()
  try:
    if python_handler.stream not in (sys.stderr, None):
      python_handler.stream.write(text)
  finally:
    python_handler.release()


def _unraisable_to_log(unraisable) -> None:
  """Python's 'Exception ignored in ...' reports go to the log: errors no
  caller can catch, in a library's clean-up (e.g. orbax's unfinished reads
  of a corrupt checkpoint, reported at exit after the run said what failed)."""
  where = ('' if unraisable.object is None
           else f'Exception ignored in: {unraisable.object!r}\n')
  _write_to_log(where + ''.join(traceback.format_exception(
      unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)))


class StreamProxy(io.TextIOBase):
  """A text stream that passes everything on to `stream`; subclasses
  change what `write` does."""

  def __init__(self, stream):
    super().__init__()
    self.stream = stream

  def write(self, s: str) -> int:
    return self.stream.write(s)

  def flush(self) -> None:
    self.stream.flush()

  def isatty(self) -> bool:
    return self.stream.isatty()

  def fileno(self) -> int:
    return self.stream.fileno()

  @property
  def encoding(self):
    return self.stream.encoding

  def __getattr__(self, name):  # the rest as the stream has it (`buffer`)
    return getattr(self.stream, name)


class _SurvivesClosedPipe(StreamProxy):
  """stdout whose reader went away (`launch.py ... | head`): the run goes
  on without printing, rather than dying of a BrokenPipeError."""

  closed_pipe = False

  def write(self, s: str) -> int:
    if not self.closed_pipe:
      try:
        return self.stream.write(s)
      except BrokenPipeError:
        self._reader_gone()
    return len(s)

  def flush(self) -> None:
    if not self.closed_pipe:
      try:
        self.stream.flush()
      except BrokenPipeError:
        self._reader_gone()

  def _reader_gone(self) -> None:
    self.closed_pipe = True
    try:  # what is still buffered (and the exit's flush) goes nowhere
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, self.stream.fileno())
      os.close(devnull)
    except (OSError, ValueError):
      pass
    logging.warning('The console output was closed (its reader exited): '
                    'the run goes on without printing; its results go to '
                    'the workdir.')


class _Buffer(io.StringIO):
  """Log text held in memory; what exceeds `MAX_BUFFERED_CHARS` is dropped."""

  def write(self, s: str) -> int:
    if self.tell() + len(s) <= MAX_BUFFERED_CHARS:
      super().write(s)
    return len(s)


class _TqdmConsoleHandler(logging.Handler):
  """Writes records to stderr with any live tqdm bar cleared, then redrawn.

  Records absl itself copies to stderr (at or above `--stderrthreshold`) are
  skipped, so that none is shown twice.
  """

  quiet_libraries = True

  def filter(self, record: logging.LogRecord) -> bool:
    threshold = absl_logging.converter.string_to_standard(
        FLAGS['stderrthreshold'].value)
    if self.quiet_libraries and any(
        f'{os.sep}{name}{os.sep}' in record.pathname for name in QUIET_LIBRARIES):
      # Their warnings are about their internals and their errors reach us
      # as exceptions, which the run reports in its own words: log.txt only.
      return False
    return record.levelno < threshold and super().filter(record)

  def emit(self, record: logging.LogRecord) -> None:
    try:
      message = self.format(record)
      stream = sys.stderr
      with tqdm.tqdm.external_write_mode(file=stream):
        stream.write(message + '\n')
        stream.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)
