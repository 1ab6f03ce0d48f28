"""XLA flags that measurably speed this network up on XLA:CPU.

XLA reads `XLA_FLAGS` once, when JAX starts its backend, so `configure` runs
on `import mnist_jax`. It only appends flags the user has not set, only on
the jaxlib series they were validated on (jaxlib aborts on unknown flags),
and not at all with `MNIST_JAX_NO_XLA_FLAGS=1`. The flag, YNN fusions off,
affects the CPU backend only; the measurements behind it, and the flags that
were tried and not applied, are in `benchmarks/README.md`.
"""

from __future__ import annotations

from importlib import metadata
import os
import sys
import warnings

DISABLE_ENV_VAR = 'MNIST_JAX_NO_XLA_FLAGS'

# Flags known to exist (and help) in these jaxlib release series.
_VALIDATED_JAXLIB = ('0.10.',)

CPU_FLAGS = (
    '--xla_cpu_experimental_ynn_fusion_type=',
)


def _flag_name(flag: str) -> str:
  return flag.lstrip('-').split('=', 1)[0]


def _jaxlib_version() -> str | None:
  try:
    return metadata.version('jaxlib')
  except Exception:  # pylint: disable=broad-except
    return None


def _backend_already_initialised() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # pylint: disable=broad-except
    return False


def recommended_flags(platform_hint: str | None = None) -> list[str]:
  """The XLA flags this module would add, before de-duplication.

  Args:
    platform_hint: 'cpu', 'gpu', 'tpu' or None (unknown). Flags are CPU-only;
      for an explicit non-CPU hint none are returned.

  Returns:
    List of '--name=value' strings (empty on unvalidated jaxlib versions).
  """
  if platform_hint is not None and platform_hint.lower() != 'cpu':
    return []
  version = _jaxlib_version()
  if version is None or not version.startswith(_VALIDATED_JAXLIB):
    return []
  return list(CPU_FLAGS)


def configure(platform_hint: str | None = None) -> list[str]:
  """Appends the recommended XLA:CPU flags to `os.environ['XLA_FLAGS']`.

  Call before JAX initialises its backend (`import mnist_jax` does). A flag
  whose name already appears in `XLA_FLAGS` is left as the user set it.
  Setting the environment variable `MNIST_JAX_NO_XLA_FLAGS=1` disables this
  function. Calling it more than once is harmless.

  Args:
    platform_hint: optional platform name ('cpu', 'gpu', 'tpu'); with a
      non-CPU hint nothing is added. None: add the CPU flags, which other
      backends ignore.

  Returns:
    The flags that were appended (possibly empty).
  """
  if os.environ.get(DISABLE_ENV_VAR, '').strip().lower() in (
      '1', 'true', 'yes', 'on'):
    return []
  flags = recommended_flags(platform_hint)
  if not flags:
    return []
  current = os.environ.get('XLA_FLAGS', '')
  present = {_flag_name(f) for f in current.split() if f.startswith('--')}
  added = [f for f in flags if _flag_name(f) not in present]
  if not added:
    return []
  if _backend_already_initialised():
    warnings.warn(
        'mnist_jax.xla_setup.configure() called after the JAX backend was '
        'initialised; XLA flags %s will not take effect.' % added,
        stacklevel=2)
  os.environ['XLA_FLAGS'] = ' '.join([current] + added).strip()
  return added
