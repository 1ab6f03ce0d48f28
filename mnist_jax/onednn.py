"""oneDNN kernels for the ops XLA:CPU runs slowly, called through `jax.ffi`.

`csrc/onednn_ffi.cc` is compiled into `mnist_jax/_onednn_ffi*.so` by
`pip install -e .` (see setup.py) against the `onednn-cpu-gomp` package's
libdnnl. It provides a stride-1 NHWC x HWIO convolution with both gradients
and a matmul with optional transposes, in float32 or bfloat16 (AMX or
AVX512-BF16 kernels where the CPU has them, float32 accumulation).
`mnist_jax.ops` calls them on the CPU backend when `available()`; otherwise
(no library, no libdnnl, another dtype, another backend, or
`MNIST_JAX_NO_ONEDNN=1`) it uses its pure-XLA lowering, which computes the
same function. When the kernels cannot be loaded or fail their self-test in
a dtype, one line says so, once.
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

  True when the library loads, the arrays are all float32 or all bfloat16,
  the kernels pass their self-test in that dtype on this CPU (`_self_test`)
  and the env var `MNIST_JAX_NO_ONEDNN` is not set. Checked at trace time;
  the kernels only exist on the CPU backend, so callers also select by
  platform (`jax.lax.platform_dependent`).
  """
  if os.environ.get(DISABLE_ENV_VAR, '').strip().lower() in (
      '1', 'true', 'yes', 'on'):
    return False
  dtypes = {jnp.dtype(a.dtype) for a in arrays}
  if len(dtypes) != 1 or (dtype := dtypes.pop()) not in DTYPES:
    return False
  if not _load():
    _warn_once('', f"oneDNN kernels unavailable ({_state['reason']})")
    return False
  works = _state.setdefault('works', {})
  if dtype not in works:
    reason = _self_test(dtype)
    works[dtype] = not reason
    if reason:
      _warn_once(dtype, f'oneDNN kernels failed their {dtype} self-test on '
                 f'this CPU ({reason})')
  return works[dtype]


def _warn_once(key, what: str) -> None:
  warned = _state.setdefault('warned', set())
  if key not in warned:
    warned.add(key)
    print(f'mnist_jax: {what}; using the pure-XLA lowering.', file=sys.stderr)


def _self_test_inputs(dtype):
  """Small arrays for `_self_test`, rounded to `dtype`."""
  rng = np.random.default_rng(0)
  shapes = {'x': (2, 6, 5, 3), 'k': (3, 3, 3, 4), 'g': (2, 6, 5, 4),
            'a': (5, 7), 'b': (7, 6)}
  return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


def _numpy_conv_and_grads(x, k, g, pads):
  """float64 reference: y = xpad (*) k, and the input and kernel gradients
  for the cotangent g (stride 1, NHWC x HWIO)."""
  (pt, pb), (pl, pr) = pads
  xpad = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  _, oh, ow, _ = g.shape
  kh, kw = k.shape[:2]
  y = np.zeros(g.shape)
  dxpad, dk = np.zeros(xpad.shape), np.zeros(k.shape)
  for i in range(kh):
    for j in range(kw):
      window = xpad[:, i:i + oh, j:j + ow]
      y += window @ k[i, j]
      dxpad[:, i:i + oh, j:j + ow] += g @ k[i, j].T
      dk[i, j] = np.einsum('nhwc,nhwo->co', window, g)
  return y, dxpad[:, pt:pt + x.shape[1], pl:pl + x.shape[2]], dk


def _self_test(dtype) -> str:
  """Runs every kernel once on small inputs on the CPU, against
  numpy; returns '' when all agree, else why not (an error of oneDNN's, e.g.
  no bfloat16 kernels for this CPU, or a wrong result)."""
  pads = ((1, 1), (1, 1))
  inputs = _self_test_inputs(dtype)

  def kernels(x, k, g, a, b):
    return [conv(x, k, pads), conv_input_grad(g, k, x.shape[1:3], pads),
            conv_kernel_grad(x, g, k.shape[:2], pads), matmul(a, b),
            matmul(a, a, transpose_b=True), matmul(a, a, transpose_a=True)]

  host = {n: np.asarray(v, np.float64) for n, v in inputs.items()}
  a = host['a']
  want = [*_numpy_conv_and_grads(host['x'], host['k'], host['g'], pads),
          a @ host['b'], a @ a.T, a.T @ a]
  names = ('conv', 'conv input grad', 'conv kernel grad', 'matmul',
           'matmul b^T', 'matmul a^T')
  tolerance = 1e-4 if dtype == jnp.float32 else 3e-2
  try:
    # It runs when a model is traced: compute now, on the host's CPU.
    with jax.ensure_compile_time_eval(), jax.default_device(
        jax.local_devices(backend='cpu')[0]):
      got = jax.device_get(jax.jit(kernels)(**inputs))
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
  for name, g, w in zip(names, got, want):
    error = np.max(np.abs(np.asarray(g, np.float64) - w))
    if not error <= tolerance * np.max(np.abs(w)):
      return f'{name} differs from the reference by {error:.3g}'
  return ''


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
