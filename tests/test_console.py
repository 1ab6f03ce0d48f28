"""The quiet console, in real processes: chatter to log.txt, warnings and a
live bar on the console, absl's flags bringing the chatter back."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

# A program that logs and prints like a run: absl INFO chatter, a warning, a
# C++-style INFO notice and error on fd 2, a warning while a tqdm bar is live.
_PROGRAM = r'''
import os, sys
from absl import app, logging
import tqdm
from mnist_jax import console

def main(argv):
  console.setup()
  print('TF_CPP_MIN_LOG_LEVEL=%s' % os.environ.get('TF_CPP_MIN_LOG_LEVEL'))
  logging.info('chatter before the log file is known')
  console.log_to_file(os.environ['WORKDIR'])
  logging.info('chatter after')
  logging.warning('a warning that matters')
  with console.native_info_to_log():
    os.write(2, b'I0000 00:00:1795689583.399719   15993 port.cc:153] notice\n')
    os.write(2, b'E0000 00:00:1795689583.399719   15993 x.cc:1] native error\n')
  bar = tqdm.tqdm(total=10, file=sys.stderr, desc='Epoch 1/1', mininterval=0)
  bar.update(3)
  logging.warning('during the bar')
  bar.update(7)
  bar.close()
  print('Final line')

app.run(main)
'''


def run(tmp_path, *flags):
  env = dict(os.environ, WORKDIR=str(tmp_path), PYTHONPATH=ROOT)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  proc = subprocess.run([sys.executable, '-c', _PROGRAM, *flags], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  with open(tmp_path / 'log.txt') as f:
    return proc.stdout, proc.stderr, f.read()


def test_default_console_is_quiet_and_log_file_has_it_all(tmp_path):
  out, err, log = run(tmp_path)
  assert 'TF_CPP_MIN_LOG_LEVEL=1' in out and 'Final line' in out
  for line in ('a warning that matters', 'native error', 'during the bar'):
    assert err.count(line) == 1, err
  assert 'chatter' not in err and 'notice' not in err
  for line in ('chatter before the log file is known', 'chatter after',
               'a warning that matters', 'port.cc:153] notice'):
    assert line in log
  assert 'native error' not in log  # it went to the console


def test_log_line_never_breaks_the_bar(tmp_path):
  _, err, _ = run(tmp_path)
  at = err.index('during the bar')
  start = max(err.rfind('\n', 0, at), err.rfind('\r', 0, at)) + 1
  assert err[start] == 'W', repr(err[start - 80:at])  # its own line: absl's
  # prefix starts it, the bar (cleared first) is drawn again after it.
  assert 'Epoch 1/1' in err[at:]
  assert '10/10' in err


@pytest.mark.parametrize('flag', ['--verbosity=0', '--alsologtostderr'])
def test_absl_flags_bring_the_chatter_back(tmp_path, flag):
  out, err, log = run(tmp_path, flag)
  assert 'TF_CPP_MIN_LOG_LEVEL=None' in out
  assert err.count('chatter after') == 1  # once, not once per handler
  assert err.count('during the bar') == 1
  assert 'port.cc:153] notice' in err  # native notices not filtered
  assert 'chatter after' in log


_EXIT_WHILE_FILTERED = r'''
import atexit, os, sys, threading, time
from absl import app

# Registered before console's own exit handler, so it runs after it: the
# still-importing thread printing a start-up notice once the process exits.
atexit.register(os.write, 2, b'I0000 00:00:1795704402.402619 11624 '
                b'port.cc:153] a late C++ start-up notice\n')
from mnist_jax import console

def main(argv):
  console.setup()
  entered = threading.Event()

  def slow_import():  # as TensorFlow's import on the preload thread
    with console.native_info_to_log():
      entered.set()
      time.sleep(60)

  threading.Thread(target=slow_import, daemon=True).start()
  entered.wait()
  print('Error: a mistake found meanwhile', file=sys.stderr)
  sys.exit(2)

app.run(main)
'''


def test_stderr_written_while_filtered_survives_exit(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', _EXIT_WHILE_FILTERED], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  # The error reaches the console and stays its last line.
  assert proc.stderr.strip() == 'Error: a mistake found meanwhile'


_CLOSED_READER = r'''
import sys, time
from absl import app
from mnist_jax import console

def main(argv):
  console.setup()
  for i in range(200):  # a run printing its progress, long after `head`
    print(f'line {i}', flush=True)
    time.sleep(0.005)
  with open(sys.argv[1], 'w') as f:
    f.write('went on to the end')

app.run(main)
'''


def test_a_run_goes_on_when_its_output_is_closed(tmp_path):
  """`launch.py ... | head -1`: the reader exits; the run must not die of a
  BrokenPipeError (nor print one)."""
  done = tmp_path / 'done'
  proc = subprocess.Popen([sys.executable, '-c', _CLOSED_READER, str(done)],
                          env=dict(os.environ, PYTHONPATH=ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline() == 'line 0\n'
  proc.stdout.close()  # as `head -1` exiting
  err = proc.communicate(timeout=120)[1]
  assert proc.returncode == 0, err
  assert done.read_text() == 'went on to the end'
  assert err.count('The console output was closed (its reader exited)') == 1
  assert 'Traceback' not in err and 'BrokenPipe' not in err, err
