"""oneDNN kernels for the ops XLA:CPU runs slowly, called through `jax.ffi`.

`csrc/onednn_ffi.cc` is compiled into `mnist_jax/_onednn_ffi*.so` by
`pip install -e .` (see setup.py) against the `onednn-cpu-gomp` package's
libdnnl. It provides a stride-1 NHWC x HWIO convolution with both gradients
and a matmul with optional transposes, in float32 or bfloat16 (AMX or
AVX512-BF16 kernels where the CPU has them, float32 accumulation).
`mnist_jax.ops` calls them on the CPU backend when `available()`; otherwise
(no library, no libdnnl, another dtype, another backend, or
`MNIST_JAX_NO_ONEDNN=1`) it uses its pure-XLA lowering, which computes the
same function. When the kernels cannot be
loaded, one line says so, once.
"""

import ctypes
import glob
import os
import site
import sys

import jax
import jax.numpy as jnp
import numpy as np

DISABLE_ENV_VAR = 'MNIST_JAX_NO_ONEDNN'
_TARGETS = {
    'mnist_onednn_conv': 'MnistOnednnConv',
    'mnist_onednn_conv_bwd_weights': 'MnistOnednnConvBackwardWeights',
    'mnist_onednn_matmul': 'MnistOnednnMatmul',
}
_state = {'loaded': None, 'reason': ''}
# What the kernels compute in (all of an op's buffers share one).
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _find_libdnnl() -> str | None:
  """libdnnl.so.3 of the onednn-cpu-gomp wheel (installed under prefix/lib)."""
  prefixes = [sys.prefix, getattr(site, 'USER_BASE', None) or '']
  for prefix in filter(None, prefixes):
    path = os.path.join(prefix, 'lib', 'libdnnl.so.3')
    if os.path.exists(path):
      return path
  return None


def _load() -> bool:
  """Loads libdnnl and the FFI library and registers the targets, once."""
  if _state['loaded'] is not None:
    return _state['loaded']
  _state['loaded'] = False
  here = os.path.dirname(os.path.abspath(__file__))
  candidates = sorted(glob.glob(os.path.join(here, '_onednn_ffi*.so')))
  if not candidates:
    _state['reason'] = 'mnist_jax/_onednn_ffi*.so was not built'
    return False
  try:
    # The FFI library leaves oneDNN's symbols to the dynamic loader: load
    # libdnnl first, globally (the wheel's copy, else the system's).
    ctypes.CDLL(_find_libdnnl() or 'libdnnl.so.3', mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(candidates[0])
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  except (OSError, AttributeError) as e:
    _state['reason'] = f'{type(e).__name__}: {e}'
    return False
  _state['lib'] = lib
  _state['loaded'] = True
  return True


def available(*arrays) -> bool:
  """Whether the oneDNN kernels can compute an op on these arrays.

  True when the library loads, the arrays are all float32 or all bfloat16
  and the env var `MNIST_JAX_NO_ONEDNN` is not set. Checked at trace time; the kernels only
  exist on the CPU backend, so callers also select by platform
  (`jax.lax.platform_dependent`).
  """
  if os.environ.get(DISABLE_ENV_VAR, '').strip().lower() in (
      '1', 'true', 'yes', 'on'):
    return False
  dtypes = {jnp.dtype(a.dtype) for a in arrays}
  if len(dtypes) != 1 or dtypes.pop() not in DTYPES:
    return False
  if not _load():
    if not _state.get('warned'):
      _state['warned'] = True
      print(f"mnist_jax: oneDNN kernels unavailable ({_state['reason']}); "
            'using the pure-XLA lowering.', file=sys.stderr)
    return False
  return True


def _pad_attrs(pads):
  (pt, pb), (pl, pr) = pads
  return dict(pad_t=np.int64(pt), pad_b=np.int64(pb), pad_l=np.int64(pl),
              pad_r=np.int64(pr))


def conv(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
  """Stride-1 NHWC x HWIO convolution on oneDNN (float32 or bfloat16)."""
  kh, kw, _, o = kernel.shape
  out = jax.ShapeDtypeStruct(
      (x.shape[0], x.shape[1] + sum(pads[0]) - kh + 1,
       x.shape[2] + sum(pads[1]) - kw + 1, o), x.dtype)
  return jax.ffi.ffi_call('mnist_onednn_conv', out, vmap_method='sequential')(
      x, kernel, backward_data=False, **_pad_attrs(pads))


def conv_input_grad(g: jax.Array, kernel: jax.Array, input_hw: tuple[int, int],
                    pads) -> jax.Array:
  """Input gradient of `conv(x, kernel, pads)` for the cotangent `g`."""
  out = jax.ShapeDtypeStruct((g.shape[0],) + tuple(input_hw) +
                             (kernel.shape[2],), g.dtype)
  return jax.ffi.ffi_call('mnist_onednn_conv', out, vmap_method='sequential')(
      g, kernel, backward_data=True, **_pad_attrs(pads))


def conv_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int],
                     pads) -> jax.Array:
  """Kernel gradient of a stride-1 NHWC x HWIO convolution, on oneDNN.

  Args:
    x: [N, H, W, C] input of the convolution.
    g: [N, H', W', O] cotangent of its output, same dtype.
    kernel_hw: (KH, KW).
    pads: ((top, bottom), (left, right)) explicit padding.

  Returns:
    [KH, KW, C, O] in their dtype: sum over n, h, w of
    xpad[n, h + i, w + j, c] * g[n, h, w, o].
  """
  out = jax.ShapeDtypeStruct(tuple(kernel_hw) + (x.shape[3], g.shape[3]),
                             x.dtype)
  return jax.ffi.ffi_call('mnist_onednn_conv_bwd_weights', out,
                          vmap_method='sequential')(x, g, **_pad_attrs(pads))


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False,
           transpose_b: bool = False) -> jax.Array:
  """op(a) @ op(b) on oneDNN (op: optional transpose; float32 or bfloat16)."""
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  out = jax.ShapeDtypeStruct((m, n), a.dtype)
  return jax.ffi.ffi_call('mnist_onednn_matmul', out,
                          vmap_method='sequential')(
                              a, b, transpose_a=bool(transpose_a),
                              transpose_b=bool(transpose_b))


def impl_info(kind: str, dims, dtype=jnp.float32) -> str:
  """The oneDNN implementation picked for a shape (e.g. 'brg:avx512_core').

  Args:
    kind: 'conv_bwd_weights', 'conv' (forward and input gradient) (dims: n h
      w c oh ow o kh kw pt pb pl pr) or 'matmul' (dims: m k n transpose_a
      transpose_b).
    dims: the integers above.
    dtype: float32 or bfloat16 buffers.
  """
  if not _load():
    return f"unavailable: {_state['reason']}"
  arr = (ctypes.c_int64 * len(dims))(*dims)
  buf = ctypes.create_string_buffer(256)
  code = {'conv_bwd_weights': 0, 'matmul': 1, 'conv': 3}[kind]
  bf16 = jnp.dtype(dtype) == jnp.bfloat16
  _state['lib'].MnistOnednnImplInfo(ctypes.c_int64(code), arr,
                                    ctypes.c_int64(bf16), buf,
                                    ctypes.c_int64(256))
  return buf.value.decode()
