"""Command-line mistakes as one `Error: ...` line (exit 2), not tracebacks.

`parse_flags` is `launch.py`'s `app.run(..., flags_parser=...)`: it parses the
flags (including ml_collections' `--config` file and `--config.*` overrides)
and turns a user's mistake into one line: an unknown flag or config field
(keeping the "Did you mean" suggestion), a value of the wrong type, a config
file that is missing, not Python or without `get_config`. An error raised
inside a config file's own code is not a command-line mistake and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

from absl import flags

from mnist_jax.errors import UserError

EXIT_USER_ERROR = 2


def fail(message: str | BaseException) -> NoReturn:
  """Prints `Error: <message>` (one line) on stderr and exits with status 2."""
  print(f'Error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses `argv` into absl's FLAGS; user mistakes exit via `fail`.

  Args:
    argv: the command line, program name first.

  Returns:
    The arguments left after the flags, program name first.
  """
  try:
    return parse_flags_or_raise(argv)
  except UserError as e:
    fail(e)


def parse_flags_or_raise(argv: list[str]) -> list[str]:
  """As `parse_flags`, raising a `UserError` for a user's mistake."""
  try:
    args = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      # ml_collections reports a config file it could not load only when the
      # config is first used (any attribute): use it now.
      getattr(flags.FLAGS.config, 'keys', None)
    return args
  except flags.Error as e:
    raise UserError(_flag_error_message(e)) from None
  except (AttributeError, KeyError) as e:
    if _raised_in_config_path(e):  # --config.<field> names no field
      raise UserError(_unknown_field_message(e, argv)) from None
    if "has no attribute 'get_config'" in str(e):
      raise UserError(f'Config file {_config_file(argv)} defines no '
                      'get_config(); see configs/default.py.') from None
    raise
  except SyntaxError as e:
    raise UserError(f'Config file {e.filename or _config_file(argv)} is not '
                    f'valid Python: {e.msg} (line {e.lineno}).') from None
  except OSError as e:
    raise UserError(_config_load_message(e, argv)) from None


def _flag_error_message(e: flags.Error) -> str:
  message = str(e).strip()
  if 'must have a value other than None' in message and '--config' in message:
    return '--config is required, e.g. --config configs/default.py'
  if 'Traceback (most recent call last)' in message:
    # An exception in get_config (e.g. an unknown config argument, a
    # ValueError of the config file): its own message is the useful part.
    flag = message.split(': ', 1)[0]  # 'flag --config=<path>[:<arg>]'
    return f'{flag}: {message.splitlines()[-1].strip()}'
  return ' '.join(line.strip() for line in message.splitlines() if line.strip())


def _raised_in_config_path(e: BaseException) -> bool:
  return any(os.path.basename(frame.filename) == 'config_path.py'
             and 'ml_collections' in frame.filename
             for frame in traceback.extract_tb(e.__traceback__))


def _unknown_field_message(e: BaseException, argv: list[str]) -> str:
  # ml_collections' text: "'batch_sise'\nDid you mean "batch_size" instead...".
  lines = [line.strip() for line in str(e).strip('\'"').replace(
      '\\n', '\n').splitlines() if line.strip()]
  field = lines[0].strip('\'"\\') if lines else ''
  overrides = [a.split('=', 1)[0] for a in argv[1:]
               if a.startswith('--config.')
               and field in a.split('=', 1)[0].split('.')]
  where = overrides[0] if overrides else f'--config.{field}'
  hint = ' '.join(lines[1:]) or 'see the config file for its fields.'
  return f'Unknown config field in {where}: {hint}'


def _config_file(argv: list[str]) -> str:
  try:
    value = flags.FLAGS['config'].config_filename
  except (AttributeError, KeyError, flags.Error):  # not loaded
    value = next((a.split('=', 1)[1] for a in argv
                  if a.startswith('--config=')), '')
  return value.partition(':')[0]


def _config_load_message(e: OSError, argv: list[str]) -> str:
  cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
  path = _config_file(argv)
  if cause.strerror:
    reason = cause.strerror
  else:
    reason = str(cause).strip().splitlines()[-1].strip()
    # "[Errno 2] No such file or directory: 'path'" -> "No such file ...".
    reason = reason.split('] ', 1)[-1].split(": '", 1)[0]
  return (f'Cannot load config file{" " + path if path else ""}: '
          f'{reason.rstrip(".")}. Pass an existing file, e.g. --config '
          'configs/default.py')
