"""User mistakes on launch.py's command line: one `Error:` line, exit 2.

Each row runs launch.py in a subprocess on a workdir that already holds a
checkpoint, and checks the message, the status, that there is no traceback
and that the workdir is exactly as it was. A genuine bug keeps its traceback.
"""

import hashlib
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT
from conftest import tiny_config_for
import ckpt_util
from mnist_jax import checkpointing
from conftest import hold_lock

DEFAULT = os.path.join(ROOT, 'configs', 'default.py')

# (id, arguments, expected part of the message); in the arguments, {run} is the
# workdir holding a checkpoint, {tmp} a scratch folder.
CASES = [
    ('misspelt_field', ['--config.batch_sise=3'],
     'Error: Unknown config field in --config.batch_sise: Did you mean '
     '"batch_size" instead of "batch_sise"?'),
    ('misspelt_nested_field', ['--config.data.sourc=idx'],
     'Error: Unknown config field in --config.data.sourc: Did you mean '
     '"source" instead of "sourc"?'),
    ('wrong_type', ['--config.batch_size=abc'],
     "Error: flag --config.batch_size=abc: invalid literal for int()"),
    ('float_for_int', ['--config.num_epochs=1.5'],
     "Error: flag --config.num_epochs=1.5: invalid literal for int()"),
    ('unknown_flag', ['--workdr=x'],
     "Error: Unknown command line flag 'workdr'. Did you mean: workdir ?"),
    ('missing_config_file', ['--config={tmp}/nope.py'],
     'Error: Cannot load config file {tmp}/nope.py: No such file or '
     'directory.'),
    ('config_is_a_directory', ['--config={tmp}'],
     'Error: Cannot load config file {tmp}: Is a directory.'),
    ('config_without_get_config', ['--config={tmp}/no_get_config.py'],
     'Error: Config file {tmp}/no_get_config.py defines no get_config()'),
    ('config_not_python', ['--config={tmp}/not_python.py'],
     'Error: Config file {tmp}/not_python.py is not valid Python'),
    ('unknown_config_argument', [f'--config={DEFAULT}:bogus'],
     "Error: flag --config={default}:bogus: ValueError: Unknown config "
     "argument "
     "'bogus'; use 'smoke' or nothing."),
    ('no_config', ['--config='],
     'Error: Cannot load config file'),
    ('invalid_value', ['--config.batch_size=0'],
     'Error: config.batch_size=0: must be a positive integer.'),
    ('negative_seed', ['--config.seed=-1'],
     'Error: config.seed=-1: must be an integer in [0, 2**32).'),
    ('sweep_flag_without_sweep', ['--sweep_retries=0'],
     'Error: --sweep_parallel, --sweep_retries and --sweep_address need '
     '--sweep.'),
    ('stray_argument', ['extra'],
     "Error: Unexpected argument(s) ['extra']: flags take the form "
     '--name=value'),
    ('workdir_is_a_file', ['--workdir={tmp}/a_file'],
     'Error: --workdir {tmp}/a_file is a file, not a directory'),
    ('workdir_under_a_file', ['--workdir={tmp}/a_file/run'],
     'Error: Cannot create --workdir {tmp}/a_file/run: Not a directory.'),
    ('workdir_not_writable', ['--workdir={unwritable}'],
     'Error: --workdir {unwritable} is not writable'),
    ('workdir_busy', ['--workdir={run}'],
     'Error: --workdir {run} is in use by another run (pid {holder} on '),
]


def _tree(path):
  """{relative path: sha256} of every file under `path`."""
  digests = {}
  for dirpath, _, names in os.walk(path):
    for name in names:
      full = os.path.join(dirpath, name)
      with open(full, 'rb') as f:
        digests[os.path.relpath(full, path)] = hashlib.sha256(
            f.read()).hexdigest()
  return digests


@pytest.fixture
def scene(tmp_path):
  """A workdir with a (fake) checkpoint, and the files the rows name."""
  run = tmp_path / 'run'
  (run / 'checkpoints' / '100' / 'state').mkdir(parents=True)
  (run / 'checkpoints' / '100' / 'state' / 'data').write_bytes(b'\0' * 64)
  (run / 'metrics.json').write_text('{}')
  (tmp_path / 'a_file').write_text('not a directory')
  (tmp_path / 'no_get_config.py').write_text('CONFIG = 1\n')
  (tmp_path / 'not_python.py').write_text('def get_config(:\n')
  if os.geteuid() == 0:
    unwritable = '/sys'  # read-only even for root
  else:
    unwritable = str(tmp_path / 'read_only')
    os.mkdir(unwritable, 0o555)
  return {'tmp': str(tmp_path), 'run': str(run), 'unwritable': unwritable,
          'default': DEFAULT}


def launch(args, cwd=ROOT):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'),
                         *args], capture_output=True, text=True, cwd=cwd,
                        env=env, timeout=240)


@pytest.mark.parametrize('args,expected', [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_user_mistake_is_one_line(scene, args, expected):
  if '{unwritable}' in ' '.join(args) and not os.path.isdir(
      scene['unwritable']):
    pytest.skip('no read-only directory here')
  holder = hold_lock(scene['run']) if 'is in use' in expected else None
  before = _tree(scene['run'])
  try:
    fmt = dict(scene, holder=holder.pid if holder else '')
    args = [a.format(**fmt) for a in args]
    if not any(a.startswith('--config=') for a in args):
      args.insert(0, f'--config={DEFAULT}')
    if not any(a.startswith('--workdir') for a in args):
      args.append(f'--workdir={scene["run"]}')
    proc = launch(args)
    after = _tree(scene['run'])  # (before the holder clears its lock file)
  finally:
    if holder:
      holder.communicate('')
  errors = [line for line in proc.stderr.splitlines()
            if line.startswith('Error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].startswith(expected.format(**fmt)), errors[0]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr + proc.stdout
  assert after == before


def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  bad = tmp_path / 'buggy.py'
  bad.write_text('def get_config():\n  return undefined_name\n')
  proc = launch([f'--config={bad}', f'--workdir={tmp_path / "run"}'])
  assert proc.returncode == 1
  assert 'Traceback' in proc.stderr
  assert "NameError: name 'undefined_name' is not defined" in proc.stderr


@pytest.mark.parametrize('step,kept', [(20, [10]), (36, [10, 20, 30])])
def test_full_disk_while_saving_is_one_line_and_keeps_earlier_checkpoints(
    idx_dir, tmp_path, step, kept):
  # The save of `step` fails with ENOSPC (test-only fault injection, as a
  # full disk makes orbax's writer fail; checked by hand on a 60 MB tmpfs).
  # 36 is the last save: the run waits for it before it writes metrics.json
  # (which a sweep counts as finished).
  workdir = str(tmp_path / 'run')
  proc = ckpt_util.launch(workdir, tiny_config_for(idx_dir),
                          fault=f'disk_full:{step}')
  errors = [l for l in proc.stderr.splitlines() if l.startswith('Error:')]
  assert errors == [
      'Error: no space left on the device while saving the checkpoint of '
      f'step {step} in {checkpointing.checkpoint_dir(workdir)}. The earlier '
      f'checkpoints are kept and readable (steps: {kept}); free some space '
      'and run the same command again to resume from the latest.'], (
          proc.stderr)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr + proc.stdout
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  manager = checkpointing.create_manager(
      checkpointing.checkpoint_dir(workdir), read_only=True)
  assert manager.all_steps() == kept
  assert int(checkpointing.restore_items(
      manager, kept[-1], checkpointing.abstract_like(
          {'step': jax.numpy.zeros((), 'int32')}), partial=True
  ).state['step']) == kept[-1]
  manager.close()
