"""One training run per workdir, and a usable workdir, checked before any work.

`lock(workdir)` holds an OS lock (`fcntl.flock`) on `<workdir>/.lock` for the
run's lifetime; the kernel drops it when the process ends, however it ends
(kill -9 included), so a lock is never stale. A second run on the same workdir
stops with a `WorkdirBusyError` naming the first (pid, host, start time).
`claim` checks the workdir and holds its lock until the process exits.
Only training takes it: eval, info and predict only read.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from typing import Iterator

from mnist_jax.errors import UserError

LOCK_FILE = '.lock'

# Locks taken by `claim`, released at exit (the kernel would release them too).
_held = contextlib.ExitStack()
atexit.register(_held.close)


class WorkdirBusyError(UserError):
  """Another run holds the workdir's lock."""


def prepare(workdir: str) -> str:
  """Creates `workdir` if needed and checks that a run can write into it.

  Args:
    workdir: the run's directory.

  Returns:
    `workdir`.

  Raises:
    UserError: it is a file, cannot be created or is not writable; the
      message says which.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir} is a file, not a directory; pass a '
                    'directory (it is created if missing).')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'Cannot create --workdir {workdir}: '
                    f'{e.strerror or e}. Pass another directory.') from None
  try:
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise UserError(f'--workdir {workdir} is not writable ({e.strerror or e}); '
                    'fix its permissions or pass another directory.') from None
  return workdir


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds the workdir's lock for the `with` block (one run per workdir).

  Args:
    workdir: an existing, writable directory (see `prepare`).
    enabled: False makes it a no-op (processes other than 0 of a multi-host
      run, which trust process 0 to hold it).

  Raises:
    WorkdirBusyError: another process holds it; nothing was written.
  """
  if not enabled:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f'Cannot create the lock file {path}: '
                    f'{e.strerror or e}.') from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirBusyError(
          f'--workdir {workdir} is in use by another run '
          f'({_describe_holder(fd)}); wait for it to end or stop it, or pass '
          'another --workdir.') from None
    holder = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + '\n').encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # The lock goes with the descriptor; the file stays.
  finally:
    os.close(fd)


def claim(workdir: str, enabled: bool = True) -> None:
  """`prepare(workdir)`, then holds its lock until the process exits.

  Args:
    workdir: the training run's directory.
    enabled: take the lock (True on process 0 only of a multi-host run).

  Raises:
    UserError: see `prepare`; WorkdirBusyError if another run holds it.
  """
  prepare(workdir)
  _held.enter_context(lock(workdir, enabled))


def _read_holder(fd: int) -> dict[str, object] | None:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode())
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def _describe_holder(fd: int) -> str:
  info = _read_holder(fd)
  if not info:  # It has the lock but has not written its name yet.
    return 'a process that is just starting'
  return (f"pid {info.get('pid')} on {info.get('host')}, started "
          f"{info.get('started')}")
