"""Shared benchmark helpers: machine description, timing statistics, JSON."""

import atexit
import json
import importlib.metadata
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile

import ml_dtypes
import numpy as np


# The CPU features that decide which XLA:CPU kernels are fast here.
_CPU_FEATURES = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16',
                 'amx_tile')


def run(main) -> None:
  """Runs a benchmark's `main`: a user mistake the project reports (data
  not found, a bad config value) is its one `Error:` line, exit status 2,
  as from `launch.py`, not a traceback."""
  from mnist_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    main()
  except UserError as e:
    print(f'Error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


def scratch_dir(prefix: str) -> str:
  """A new temporary folder (a run's workdir: checkpoints, ~40 MB each),
  removed when the benchmark's process exits."""
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def override(config, assignment: str) -> None:
  """Applies one `--set key.sub=value` to `config`, in the key's own type."""
  key, eq, value = assignment.partition('=')
  *parents, leaf = key.split('.')
  node = config
  try:
    if not eq:
      raise ValueError('not key=value')
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
      if value.lower() not in ('1', 'true', 'yes', '0', 'false', 'no'):
        raise ValueError('not true or false')
      node[leaf] = value.lower() in ('1', 'true', 'yes')
    else:
      node[leaf] = type(old)(value)
  except (KeyError, AttributeError):
    raise SystemExit(f'Error: --set {assignment}: no config field {key!r} '
                     '(--set field.sub=value).') from None
  except (ValueError, TypeError) as e:
    raise SystemExit(f'Error: --set {assignment}: {e}; give the field a '
                     'value of its type.') from None


def machine_info() -> dict:
  """CPU model, cores, devices and library versions, for every JSON result."""
  import jax  # pylint: disable=g-import-not-at-top
  cpu, cpu_flags, vendor, family_model = platform.processor(), '', '', {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name') and cpu == platform.processor():
          cpu = line.split(':', 1)[1].strip()
        if line.startswith('vendor_id') and not vendor:
          vendor = line.split(':', 1)[1].strip()
        key = line.split(':', 1)[0].strip()
        if key in ('cpu family', 'model') and key not in family_model:
          family_model[key] = line.split(':', 1)[1].strip()
        if line.startswith('flags') and not cpu_flags:
          have = line.split(':', 1)[1].split()
          cpu_flags = ' '.join(f for f in _CPU_FEATURES if f in have)
  except OSError:
    pass
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'clu',
               'numpy'):
    try:
      module = __import__(name, fromlist=['__version__'])
      versions[name] = getattr(module, '__version__', None)
    except ImportError:
      versions[name] = None
      continue
    if versions[name] is None:  # clu has no __version__: ask its distribution
      try:
        versions[name] = importlib.metadata.version(
            name.replace('.', '-'))
      except importlib.metadata.PackageNotFoundError:
        versions[name] = '?'
  devices = jax.devices()
  return {
      'cpu': cpu, 'cpu_vendor': vendor,
      'cpu_family_model': '/'.join(family_model.get(k, '?')
                                   for k in ('cpu family', 'model')),
      'cpu_flags': cpu_flags,
      'cpu_cores': os.cpu_count(),
      'platform': platform.platform(), 'python': sys.version.split()[0],
      'device_kind': devices[0].device_kind, 'device_count': len(devices),
      'backend': jax.default_backend(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'versions': versions,
      'onednn_kernels': _onednn_info(jax.default_backend()),
  }


def machine_line(machine: dict) -> str:
  """The machine in one line, printed above every benchmark's table: a
  figure is only read with its CPU (and its accelerator, where one ran)."""
  line = (f"{machine['cpu']} ({machine['cpu_vendor']}, family/model "
          f"{machine['cpu_family_model']}, {machine['cpu_cores']} cores; "
          f"{machine['cpu_flags'] or 'no AVX-512'})")
  if machine['backend'] != 'cpu':
    line += (f", {machine['device_count']} x {machine['device_kind']} "
             f"({machine['backend']})")
  return line


def _onednn_info(backend: str) -> str:
  """Whether the project's oneDNN kernels load, and which ones run."""
  if 'mnist_jax' not in sys.modules:
    # lowering.py's driver must not import the package: it would add the
    # project's XLA flags to the flag sets its subprocesses measure.
    return 'not checked (mnist_jax not imported)'
  if backend != 'cpu':  # the kernels are for CPUs only
    return f'not used (backend {backend})'
  from mnist_jax import onednn  # pylint: disable=g-import-not-at-top
  if not onednn.available(np.zeros(1, np.float32)):
    return 'unavailable: ' + onednn._state['reason']  # pylint: disable=protected-access
  parts = []
  for dtype in (np.float32, ml_dtypes.bfloat16):
    dtype = np.dtype(dtype)
    if not onednn.available(np.zeros(1, dtype)):
      parts.append(f'{dtype}: failed its self-test')
      continue
    conv2 = onednn.impl_info(
        'conv_bwd_weights', [512, 14, 14, 32, 14, 14, 64, 5, 5, 2, 2, 2, 2],
        dtype)
    fc3 = onednn.impl_info('matmul', [512, 1024, 3136, 0, 1], dtype)
    parts.append(f'{dtype}: conv2 kernel grad {conv2}, fc3 matmul {fc3}')
  return '; '.join(parts)


def cpu_slug(machine: dict) -> str:
  """A file-name-safe name of the CPU, e.g. 'intel-xeon-processor-6-207'.

  The model name alone can be generic under a hypervisor ('Intel(R) Xeon(R)
  Processor'), so the family and model numbers are appended.
  """
  words = re.sub(r'\(r\)|\(tm\)|cpu|@.*$', ' ', machine['cpu'].lower())
  words += ' ' + machine.get('cpu_family_model', '').replace('?', '')
  return re.sub(r'[^a-z0-9]+', '-', words).strip('-') or 'cpu'


def summarize(values) -> dict:
  """Median, min, max and relative spread of repeated measurements."""
  values = list(values)
  med = statistics.median(values)
  return {'median': med, 'min': min(values), 'max': max(values),
          'spread': (max(values) - min(values)) / med if med else 0.0,
          'n': len(values), 'values': values}


def write_json(path: str, payload: dict) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(payload, f, indent=1)
  print(f'wrote {path}')
