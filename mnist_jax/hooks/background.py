"""Epoch-end work off the training loop's thread, in order, with errors kept.

Hooks hand the host side of their work (writing summaries, orbax's save of a
device copy of the state) to a `Background` worker, so the loop dispatches
the next epoch while it runs. An accelerator's epoch is a few hundred
milliseconds, comparable to that work: done in line, the device waited.
"""

from __future__ import annotations

import collections
from concurrent import futures
from typing import Any, Callable


class Background:
  """Runs submitted calls one at a time, in submission order, on one thread.

  `submit` returns at once unless `max_pending` calls are queued or running,
  then it waits for the oldest (a worker slower than the loop slows the loop
  instead of piling up work). An exception raised by a call is raised again
  on the caller's thread by the next `submit`, `wait` or `close`; the calls
  queued behind it are dropped.
  """

  def __init__(self, name: str, max_pending: int = 2):
    if max_pending < 1:
      raise ValueError(f'max_pending must be >= 1, got {max_pending}')
    self._max_pending = max_pending
    # Not a daemon: at interpreter exit Python waits for a call in flight.
    self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix=name)
    self._queue: collections.deque[futures.Future] = collections.deque()

  def submit(self, fn: Callable[..., Any], *args, **kwargs) -> None:
    """Queues `fn(*args, **kwargs)`; raises an earlier call's error."""
    self._collect(wait_for=len(self._queue) - self._max_pending + 1)
    self._queue.append(self._pool.submit(fn, *args, **kwargs))

  def wait(self) -> None:
    """Returns when every submitted call has run; raises the first error."""
    self._collect(wait_for=len(self._queue))

  def close(self) -> None:
    """`wait`, then stops the thread (also when a call failed)."""
    try:
      self.wait()
    finally:
      self._pool.shutdown(wait=True, cancel_futures=True)

  @property
  def pending(self) -> int:
    """Calls queued or running."""
    return sum(not f.done() for f in self._queue)

  def _collect(self, wait_for: int) -> None:
    """Waits for the oldest `wait_for` calls and forgets every finished one,
    raising the first error found."""
    while self._queue and (wait_for > 0 or self._queue[0].done()):
      wait_for -= 1
      done = self._queue.popleft()
      error = done.exception()  # waits
      if error is not None:
        for later in self._queue:
          later.cancel()
        self._queue.clear()
        raise error
