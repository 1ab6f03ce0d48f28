"""Builds the optional oneDNN FFI kernels (csrc/onednn_ffi.cc); see pyproject.toml.

The extension is `mnist_jax/_onednn_ffi*.so`, loaded with ctypes by
`mnist_jax/onednn.py` (it is not a Python module). It needs the XLA FFI
headers (jaxlib) and oneDNN's headers (onednn-devel-cpu-gomp), both build
requirements on x86-64 Linux. When it cannot be built (another platform, no
compiler), the install goes on without it and the project uses its pure-XLA
lowering; one line says so.
"""

import importlib.util
import os
import sys

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext


def _include_dirs() -> list[str]:
  dirs = []
  spec = importlib.util.find_spec('jaxlib')
  if spec and spec.submodule_search_locations:
    dirs.append(os.path.join(spec.submodule_search_locations[0], 'include'))
  # onednn-devel-cpu-gomp installs its headers as data files under the
  # prefix it is installed into: pip's isolated build environment (whose
  # site-packages is on sys.path, <prefix>/lib/pythonX.Y/site-packages), or
  # this interpreter's prefix.
  prefixes = [os.path.dirname(os.path.dirname(os.path.dirname(p)))
              for p in sys.path if p.endswith('site-packages')]
  for prefix in prefixes + [sys.prefix, sys.base_prefix]:
    if os.path.exists(os.path.join(prefix, 'include', 'oneapi', 'dnnl')):
      dirs.append(os.path.join(prefix, 'include'))
  return dirs


class OptionalBuildExt(build_ext):
  """build_ext that reports a failed build instead of failing the install."""

  failed = False

  def _report(self, error):
    if not OptionalBuildExt.failed:
      OptionalBuildExt.failed = True
      print(f'mnist_jax: oneDNN kernels not built ({error}); the pure-XLA '
            'lowering will be used.')

  def run(self):
    try:
      super().run()
    except Exception as e:  # pylint: disable=broad-except
      self._report(e)

  def build_extension(self, ext):
    try:
      super().build_extension(ext)
    except Exception as e:  # pylint: disable=broad-except
      self._report(e)


setup(
    ext_modules=[Extension(
        'mnist_jax._onednn_ffi', ['csrc/onednn_ffi.cc'],
        include_dirs=_include_dirs(), language='c++',
        extra_compile_args=['-std=c++17', '-O2', '-w'],
        # libdnnl is loaded (RTLD_GLOBAL) by mnist_jax/onednn.py before this
        # library, so it is not linked here: no build-time path leaks in.
    )],
    cmdclass={'build_ext': OptionalBuildExt},
)
