"""The hooks' background worker: order, errors, back-pressure, shutdown."""

import threading

import pytest

from mnist_jax.hooks import background


def test_calls_run_in_order_on_another_thread_without_blocking():
  worker = background.Background('test')
  release = threading.Event()
  seen = []
  worker.submit(lambda: (release.wait(10), seen.append(
      ('first', threading.current_thread().name))))
  worker.submit(lambda: seen.append(('second', None)))
  assert seen == [] and worker.pending == 2  # submit did not wait
  release.set()
  worker.wait()
  assert [s[0] for s in seen] == ['first', 'second']
  assert seen[0][1].startswith('test') and worker.pending == 0
  worker.close()


def test_an_error_surfaces_on_the_next_call_and_drops_the_queue():
  worker = background.Background('test', max_pending=3)
  release = threading.Event()
  ran = []

  def fail():
    release.wait(10)
    raise OSError('disk on fire')

  worker.submit(fail)
  worker.submit(ran.append, 'queued behind the failure')
  release.set()
  with pytest.raises(OSError, match='disk on fire'):
    worker.wait()
  worker.submit(ran.append, 'after')  # the worker goes on
  worker.close()
  assert ran in (['after'], ['queued behind the failure', 'after'])
  # A failure is raised by the next submit too.
  worker = background.Background('test')
  worker.submit(fail)
  with pytest.raises(OSError):
    worker.submit(ran.append, 'never')
    worker.wait()
  worker.close()


def test_max_pending_makes_submit_wait_for_the_oldest_call():
  worker = background.Background('test', max_pending=1)
  release = threading.Event()
  order = []
  worker.submit(lambda: (release.wait(10), order.append('slow')))
  submitted = threading.Event()

  def second():
    worker.submit(order.append, 'next')
    submitted.set()

  caller = threading.Thread(target=second)
  caller.start()
  assert not submitted.wait(0.3)  # blocked behind the slow call
  release.set()
  assert submitted.wait(10)
  caller.join()
  worker.close()
  assert order == ['slow', 'next']


def test_close_waits_for_the_calls_and_raises_their_error():
  worker = background.Background('test')
  done = []
  worker.submit(lambda: (threading.Event().wait(0.2), done.append(1)))
  worker.close()
  assert done == [1]
  worker = background.Background('test')
  worker.submit(lambda: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    worker.close()
  with pytest.raises(ValueError, match='max_pending'):
    background.Background('test', max_pending=0)
