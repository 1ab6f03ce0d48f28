"""XLA flags that measurably speed this network up on XLA:CPU.

XLA reads ``XLA_FLAGS`` once, when JAX initialises its backend (the first JAX
computation or device query), so :func:`configure` must run before that;
``import mnist_jax`` calls it. It only *appends* flags, never overrides a
flag the user already put in ``XLA_FLAGS``, and does nothing when
``MNIST_JAX_NO_XLA_FLAGS=1``.

Flags applied (CPU only; measured with ``benchmarks/lowering.py``, training
step at batch 512 with the 'fast' lowering of ``mnist_jax.ops``, jax/jaxlib
0.10.2, on a 2-vCPU AMD EPYC (Zen 5, AVX-512, no AMX) that other jobs shared
part of the time; "per CPU-s" is images per CPU-second of the benchmark
process, which is robust to that sharing, wall-clock img/s are from quiet
windows, median (min-max) of 3 windows):

* ``--xla_cpu_experimental_ynn_fusion_type=`` (empty value: no YNNPACK
  library fusions; dots and convolutions go to XLA's Eigen kernels).
  jaxlib's default YNN fusions include convolutions, and YNNPACK's kernels
  are slow for this network's gradient convolutions (conv2 forward + both
  gradients: 549 ms with YNN vs 277 ms without). Training step:

  ====================  ======================  =========================
  setting               jit per step            10 steps in ``lax.scan``
  ====================  ======================  =========================
  default flags         710 (667-734) img/s,    798 (771-799),
                        512-586 per CPU-s       628-691 per CPU-s
  this flag             1,704-1,841 img/s,      2,147-2,417 img/s,
                        914-980 per CPU-s       1,120-1,258 per CPU-s
  ====================  ======================  =========================

  Forward-only eval of 10,000 images (batch 1000 or 2500): 5,400-7,300 img/s
  with this flag vs ~4,800 with default flags (1.4-1.9 s vs 2.1 s).
  The alternative ``=-individual_convolution`` (keep YNN dots and elementwise
  fusions, drop only YNN convolutions) measured the same within noise
  (step 1,388-1,951, scan 2,219-2,428 img/s, interleaved with the runs above);
  the empty value is preferred because it is simpler, does not depend on the
  default fusion list of a jaxlib version, and was also the best setting on an
  Intel Sapphire Rapids host (shared/PERF_NOTES.md: 960 -> 1,500 img/s).

Measured and not applied:

* Default flags with the *reference* lowering are 4-10x slower; that is the
  lowering's fault (see ``mnist_jax.ops``), no flag fixes it.
* ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (a process-environment setting,
  not an XLA flag; it must be set before the process starts, so this module
  cannot apply it): on this VM first-touch page faults make every freshly
  allocated buffer cost ~0.3-0.5 ms/MB (a non-donated 320 MB output: 85-170 ms
  vs 12 ms donated, 20 ms with huge pages). It helped forward-only eval
  (~+20-30% per CPU-second) but not the training step with donated state, so
  it is only a suggestion for launchers.

Threads: XLA:CPU runs each op on an intra-op thread pool sized to all visible
cores (here 2); JAX exposes no per-process knob beyond XLA flags. On a 2-core
machine, wall-clock rate ~= 1.9x the per-CPU-second rate when the other core
is free, i.e. intra-op threading scales well; when another process occupies
the second core the step rate roughly halves. Pin competing jobs elsewhere
rather than reducing XLA's threads. ``--xla_cpu_multi_thread_eigen=false``,
oneDNN (``--xla_cpu_use_onednn``, ``--xla_cpu_experimental_onednn_custom_call``)
and XNNPACK (``--xla_cpu_use_xnnpack``,
``--xla_cpu_experimental_xnn_graph_fusion_mode``) exist in this jaxlib and
can be timed with ``benchmarks/lowering.py --flagsets ...``; they were not
measured in a quiet enough window to recommend them.

Safety: jaxlib aborts the process on an unknown flag name (and on an unknown
value of an enum-list flag), so flags are only added for the jaxlib series
they were validated on (``_VALIDATED_JAXLIB``); on other versions
:func:`configure` adds nothing. The flags only affect the CPU backend and are
ignored by GPU/TPU backends.
"""

import os
import sys
import warnings
from typing import List, Optional

DISABLE_ENV_VAR = 'MNIST_JAX_NO_XLA_FLAGS'

# Flags known to exist (and help) in these jaxlib release series.
_VALIDATED_JAXLIB = ('0.10.',)

CPU_FLAGS = (
    '--xla_cpu_experimental_ynn_fusion_type=',
)


def _flag_name(flag: str) -> str:
  return flag.lstrip('-').split('=', 1)[0]


def _jaxlib_version() -> Optional[str]:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
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


def recommended_flags(platform_hint: Optional[str] = None) -> List[str]:
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


def configure(platform_hint: Optional[str] = None) -> List[str]:
  """Appends the recommended XLA:CPU flags to ``os.environ['XLA_FLAGS']``.

  Call before JAX initialises its backend (``import mnist_jax`` does). A flag
  whose name already appears in ``XLA_FLAGS`` is left as the user set it.
  Setting the environment variable ``MNIST_JAX_NO_XLA_FLAGS=1`` disables this
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
