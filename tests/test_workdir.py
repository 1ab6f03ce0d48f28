"""One run per workdir: the lock between real processes, and workdir checks."""

import os
import signal
import socket

import pytest

from conftest import hold_lock
from mnist_jax import workdir
from mnist_jax.errors import UserError


def test_second_process_is_refused_and_told_who_holds_it(tmp_path):
  holder = hold_lock(str(tmp_path))
  try:
    with pytest.raises(workdir.WorkdirBusyError) as e:
      with workdir.lock(str(tmp_path)):
        pytest.fail('two processes held the lock')
    message = str(e.value)
    assert f'pid {holder.pid} on {socket.gethostname()}, started ' in message
    assert 'in use by another run' in message and '\n' not in message
  finally:
    holder.communicate('')
  assert holder.returncode == 0
  with workdir.lock(str(tmp_path)):  # released when the holder ended
    pass


def test_kill_9_leaves_no_stale_lock(tmp_path):
  holder = hold_lock(str(tmp_path))
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert os.path.getsize(tmp_path / workdir.LOCK_FILE) > 0  # its name stayed
  with workdir.lock(str(tmp_path)):
    with open(tmp_path / workdir.LOCK_FILE) as f:
      assert f'"pid": {os.getpid()}' in f.read()


def test_lock_is_exclusive_within_a_process_too(tmp_path):
  with workdir.lock(str(tmp_path)):
    with pytest.raises(workdir.WorkdirBusyError, match=f'pid {os.getpid()}'):
      with workdir.lock(str(tmp_path)):
        pass
  assert os.path.getsize(tmp_path / workdir.LOCK_FILE) == 0  # released
  with workdir.lock(str(tmp_path), enabled=False):
    pass
  with workdir.lock(str(tmp_path / 'missing'), enabled=False):
    pass  # disabled: touches nothing


def test_prepare_creates_and_checks(tmp_path):
  new = tmp_path / 'a' / 'b'
  assert workdir.prepare(str(new)) == str(new) and new.is_dir()
  afile = tmp_path / 'file'
  afile.write_text('x')
  with pytest.raises(UserError, match='is a file, not a directory'):
    workdir.prepare(str(afile))
  with pytest.raises(UserError, match='Cannot create --workdir .*Not a dir'):
    workdir.prepare(str(afile / 'sub'))
  assert afile.read_text() == 'x'


def test_prepare_refuses_unwritable(tmp_path):
  if os.geteuid() == 0:  # root writes anywhere but into a read-only fs
    target = '/sys'
    if not os.path.isdir(target):
      pytest.skip('no read-only directory to try')
  else:
    target = tmp_path / 'ro'
    target.mkdir()
    target.chmod(0o555)
  with pytest.raises(UserError, match='is not writable'):
    workdir.prepare(str(target))
