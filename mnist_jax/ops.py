"""Convolution, pooling and dense ops of the CNN, in two lowerings.

`conv2d`, `max_pool_2x2`, `dense_conv` and `batch_norm` are the fast lowerings (forms that
XLA:CPU hands to its library kernels, oneDNN through `mnist_jax.onednn` where
it is built); `reference_*` are the straightforward ones (`lax.conv`,
`reduce_window`). Both compute the same function and gradients
(`tests/test_ops.py`); why the reference lowering is slow on XLA:CPU is in
`benchmarks/README.md`.
"""

import functools
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from mnist_jax import onednn

Padding = Union[str, Sequence[Tuple[int, int]]]

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

# conv2d uses explicit patch extraction (im2col) when a patch is at most this
# many values long: for conv1 (5x5x1 = 25) the patch matrix is small and one
# GEMM (plus its two GEMM gradients) beats the convolution kernels, while for
# conv2 (5x5x32 = 800) materialising the patches costs more than it saves.
_IM2COL_MAX_PATCH_SIZE = 128

# Matmuls with at least this many multiply-adds (fc3: 1.6 G at batch 512)
# take their gradients from oneDNN where available; for small ones (fc4) the
# call overhead is not worth it.
_ONEDNN_MIN_MATMUL = 1 << 24


def _explicit_padding(kernel_hw: Tuple[int, int],
                      padding: Padding) -> Tuple[Tuple[int, int], ...]:
  """Returns ((top, bottom), (left, right)) padding for a stride-1 conv."""
  if isinstance(padding, str):
    if padding == 'VALID':
      return ((0, 0), (0, 0))
    if padding == 'SAME':
      # Stride 1: total padding k-1, the extra element (even k) at the end,
      # which is how XLA/TF define 'SAME'.
      return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw)
    raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, "
                     f'got {padding!r}')
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2:
    raise ValueError(f'expected 2 (low, high) padding pairs, got {padding!r}')
  return pads


def reference_conv2d(x: jax.Array, kernel: jax.Array,
                     padding: Padding) -> jax.Array:
  """Stride-1 NHWC x HWIO convolution, lowered as JAX/Flax normally would.

  This is what `flax.linen.Conv` lowers to. It is the definition the fast
  lowering is tested against; keep it for comparison and for backends where
  XLA handles the autodiff convolutions well (GPU, TPU).

  Args:
    x: [N, H, W, C] input.
    kernel: [KH, KW, C, O] kernel, same dtype as `x`.
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).

  Returns:
    [N, H', W', O] output.
  """
  return lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=_DIMENSION_NUMBERS)


def _canonical_conv(x, kernel, pads):
  """A stride-1 NHWC x HWIO -> NHWC convolution (XLA's library kernels)."""
  return lax.conv_general_dilated(
      x, kernel, (1, 1), pads, dimension_numbers=_DIMENSION_NUMBERS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_canonical_grads(x, kernel, pads):
  return _canonical_conv(x, kernel, pads)


def _conv2d_canonical_fwd(x, kernel, pads):
  return _canonical_conv(x, kernel, pads), (x, kernel)


def _conv2d_canonical_bwd(pads, residuals, g):
  """Both conv gradients as canonical NHWC x HWIO -> NHWC convolutions."""
  x, kernel = residuals
  dx = _xla_conv_input_grad(g, kernel.astype(g.dtype), x.shape[1:3], pads)
  dk = _xla_conv_kernel_grad(x, g.astype(x.dtype), pads)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _xla_conv_input_grad(g, kernel, input_hw, pads):
  """Input gradient: a 'full' correlation of g with the spatially flipped
  kernel whose in/out channels are swapped (HWOI read as HWIO). The output
  spans exactly the input's H, W."""
  kh, kw = kernel.shape[:2]
  (pt, _), (pl, _) = pads
  h, w = input_hw
  g_h, g_w = g.shape[1:3]
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx_pads = ((kh - 1 - pt, h - g_h + pt), (kw - 1 - pl, w - g_w + pl))
  return _canonical_conv(g, flipped, dx_pads)


def _xla_conv_kernel_grad(x, g, pads):
  """Kernel gradient as one canonical convolution: the padded input with g,
  the batch dimension playing the role of the input channels:
    x^T [C, H+pads, W+pads, N]  (*)  g^T [H', W', N, O]  ->  [C, KH, KW, O].
  """
  (pt, pb), (pl, pr) = pads
  x_t = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))).transpose(3, 1, 2, 0)
  g_t = g.transpose(1, 2, 0, 3)
  dk = _canonical_conv(x_t, g_t, ((0, 0), (0, 0)))
  return dk.transpose(1, 2, 0, 3)


def _on_cpu_onednn(xla_fn, onednn_fn, *args):
  """`onednn_fn(*args)` on the CPU backend, `xla_fn(*args)` elsewhere (same
  function; only the branch of the backend being compiled for is lowered)."""
  return lax.platform_dependent(*args, cpu=onednn_fn, default=xla_fn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_onednn(x, kernel, pads):
  return _on_cpu_onednn(functools.partial(_canonical_conv, pads=pads),
                        functools.partial(onednn.conv, pads=pads), x, kernel)


def _conv2d_onednn_fwd(x, kernel, pads):
  return _conv2d_onednn(x, kernel, pads), (x, kernel)


def _conv2d_onednn_bwd(pads, residuals, g):
  """oneDNN's backward-data and backward-weights convolutions (unused
  results, e.g. conv1's input gradient, are dead code to XLA)."""
  x, kernel = residuals
  hw = x.shape[1:3]
  dx = _on_cpu_onednn(
      functools.partial(_xla_conv_input_grad, input_hw=hw, pads=pads),
      functools.partial(onednn.conv_input_grad, input_hw=hw, pads=pads),
      g, kernel)
  dk = _on_cpu_onednn(
      functools.partial(_xla_conv_kernel_grad, pads=pads),
      functools.partial(onednn.conv_kernel_grad, kernel_hw=kernel.shape[:2],
                        pads=pads), x, g)
  return dx, dk


_conv2d_onednn.defvjp(_conv2d_onednn_fwd, _conv2d_onednn_bwd)


_conv2d_canonical_grads.defvjp(_conv2d_canonical_fwd, _conv2d_canonical_bwd)


def _extract_patches(x, kernel_hw, pads):
  """[N, H, W, C] -> [N, H', W', KH*KW*C] patches in HWIO-flattened order."""
  kh, kw = kernel_hw
  xp = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  out_h = xp.shape[1] - kh + 1
  out_w = xp.shape[2] - kw + 1
  cols = [xp[:, i:i + out_h, j:j + out_w, :]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1)


def _conv2d_im2col(x, kernel, pads):
  """Convolution as explicit patch extraction followed by one matmul.

  Plain autodiff gives a GEMM for each gradient (plus a sum of shifted slices
  for the input gradient), none of which involves a convolution.
  """
  kh, kw, c, o = kernel.shape
  patches = _extract_patches(x, (kh, kw), pads)
  y = jnp.dot(patches.reshape(-1, kh * kw * c), kernel.reshape(kh * kw * c, o))
  return y.reshape(patches.shape[:3] + (o,))


def conv2d(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """Stride-1 NHWC x HWIO convolution with XLA:CPU-friendly gradients.

  Same value and gradients as :func:`reference_conv2d`. On the CPU backend
  with float32 or bfloat16 arrays, when `mnist_jax.onednn`'s kernels are
  available, the convolution and both its gradients are oneDNN's primitives
  (NHWC, as PyTorch runs them on CPUs; faster than XLA:CPU's kernels for both
  of the network's convolutions). Otherwise two pure-XLA lowerings are used,
  chosen statically from the kernel shape:

  * Few input values per patch (KH*KW*C <= 128, e.g. conv1's 5x5x1): explicit
    patch extraction ("im2col") and a single matmul. The patch matrix is small
    (25 floats per output pixel) and a GEMM and its two GEMM gradients are
    much faster than XLA:CPU's convolutions of this shape, especially the
    kernel gradient, which would be a convolution with 512 input channels and
    a 28x28 kernel.
  * Otherwise (conv2's 5x5x32): the forward convolution as is, and a
    `jax.custom_vjp` whose backward pass writes *both* gradients as
    convolutions in canonical NHWC x HWIO -> NHWC form (the kernel gradient
    treats the batch as the contraction/"input channel" dimension). XLA:CPU
    sends canonical convolutions to its library kernels; the convolutions
    produced by JAX's own transpose rules are not canonical and fall back to a
    slow loop, catastrophically so inside `lax.scan` (jax-ml/jax#12868).

  Args:
    x: [N, H, W, C] input.
    kernel: [KH, KW, C, O] kernel, same dtype as `x`.
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).

  Returns:
    [N, H', W', O] output, dtype of `x`.
  """
  kh, kw, c, _ = kernel.shape
  pads = _explicit_padding((kh, kw), padding)
  if onednn.available(x, kernel):
    return _conv2d_onednn(x, kernel, pads)
  if kh * kw * c <= _IM2COL_MAX_PATCH_SIZE:
    return _conv2d_im2col(x, kernel, pads)
  return _conv2d_canonical_grads(x, kernel, pads)


def _channel_sums(t: jax.Array) -> jax.Array:
  """Float32 sums of [..., C] over every axis but the last, as a GEMV
  (`ones @ rows`): XLA:CPU's reduction over the N*H*W rows is ~10x slower
  (51 MB of conv1 output: 30 ms against 3.5 ms here)."""
  rows = t.reshape(-1, t.shape[-1])
  ones = jnp.ones((1, rows.shape[0]), rows.dtype)
  return jnp.dot(ones, rows, preferred_element_type=jnp.float32)[0]


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias` over the last axis, whose bias gradient reads the cotangent
  once it is in memory.

  Plain autodiff gives the same values, but XLA:CPU rewrites the bias
  gradient's long sum (N*H*W rows) into a `reduce-window` that runs as a
  slow serial loop: 34 ms of a 320 ms training step for conv1 here. Here it
  is a GEMV, `ones @ g` (~3 ms), accumulated in float32 also for bfloat16
  (plain autodiff on XLA:CPU sums bfloat16 in bfloat16 and saturates). The
  barrier keeps the cotangent one buffer, which the convolution gradients
  read anyway.

  Args:
    y: [..., C] activations.
    bias: [C], same dtype.

  Returns:
    `y + bias`.
  """
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, g):
  g = lax.optimization_barrier(g)
  rows = g.reshape(-1, g.shape[-1])
  ones = jnp.ones((1, rows.shape[0]), g.dtype)
  if g.dtype == jnp.bfloat16 and onednn.available(ones, rows):
    xla_gemv = lambda a, b: jnp.dot(  # noqa: E731
        a, b, preferred_element_type=jnp.float32).astype(g.dtype)
    return g, _on_cpu_onednn(xla_gemv, onednn.matmul, ones, rows)[0]
  return g, _channel_sums(g).astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               epsilon: float):
  """Training-mode batch normalisation over every axis but the last.

  What `flax.linen.BatchNorm` computes with batch statistics (the biased
  variance), with every channel sum, forward and backward, a GEMV
  (`_channel_sums`) instead of XLA:CPU's slow reductions; statistics and
  normalisation in float32 for any `x` dtype.

  Args:
    x: [..., C] activations.
    scale: [C] float32.
    bias: [C] float32.
    epsilon: added to the variance.

  Returns:
    (normalised `x` in its dtype, the batch mean [C], the batch variance
    [C]), the statistics float32.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  count = x.size // x.shape[-1]
  mean = _channel_sums(x) / count
  centred = x.astype(jnp.float32) - mean
  var = _channel_sums(centred * centred) / count
  inv = lax.rsqrt(var + epsilon)
  xhat = centred * inv
  y = (xhat * scale + bias).astype(x.dtype)
  return (y, mean, var), (xhat, inv, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  del epsilon
  xhat, inv, scale = residuals
  g, g_mean, g_var = cotangents
  count = xhat.size // xhat.shape[-1]
  g32 = g.astype(jnp.float32)
  dbias = _channel_sums(g32)
  dscale = _channel_sums(g32 * xhat)
  dx = (scale * inv) * (g32 - (dbias + xhat * dscale) / count)
  # The statistics' own cotangents (zero when only the running averages
  # read them): d mean/dx = 1/N, d var/dx = 2 (x - mean)/N.
  dx = dx + (g_mean + g_var * 2.0 * xhat / inv) / count
  return dx.astype(g.dtype), dscale, dbias


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def reference_max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 'VALID' max-pool via `reduce_window` (what Flax uses).

  Its gradient is `select_and_scatter`, which routes each window's
  cotangent to the *first* maximal element in row-major window order.

  Args:
    x: [N, H, W, C] input.

  Returns:
    [N, H//2, W//2, C] output.
  """
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                           'VALID')


def _pool_windows(x):
  """The four elements of each 2x2 window, in row-major window order."""
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f'max_pool_2x2 needs even H and W, got shape {x.shape}')
  x6 = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return (x6[:, :, 0, :, 0], x6[:, :, 0, :, 1],
          x6[:, :, 1, :, 0], x6[:, :, 1, :, 1])


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 'VALID' max-pool on NHWC with even H and W.

  Written as a reshape to [N, H/2, 2, W/2, 2, C] and an elementwise max of the
  four window elements, which XLA fuses into neighbouring ops, instead of
  `reduce_window`, whose gradient (`select_and_scatter`) is a slow scalar
  loop on XLA:CPU.

  The gradient is a `custom_vjp` that reproduces `reduce_window`'s routing
  exactly: each window's cotangent goes to the *first* element (row-major:
  (0,0), (0,1), (1,0), (1,1)) equal to the window maximum. Plain autodiff of
  `jnp.max` would instead split it equally between tied elements, and ties
  are the common case here: after a ReLU, all-zero windows are frequent. The
  forward pass keeps each window's first-maximum position (int8) for the
  backward pass, which is elementwise (select) and fuses into one loop.

  Args:
    x: [N, H, W, C] input, H and W even.

  Returns:
    [N, H//2, W//2, C] output.
  """
  return _max_pool_fwd(x)[0]


def _first_maximum(a, b, c, d):
  """(each window's maximum, the position (int8, row-major) of its first
  element equal to it), both from the same four values."""
  m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
  first = jnp.where(a == m, 0, jnp.where(b == m, 1, jnp.where(c == m, 2, 3)))
  return m, first.astype(jnp.int8)


def _max_pool_fwd(x):
  # The position is taken here, from the values the maximum came from: a
  # backward pass comparing `x` with `y` would read an `x` that XLA may
  # recompute in another fusion, not always to the same bits (seen on a
  # sharded batch after BatchNorm), and route the cotangent wrongly.
  y, first = _first_maximum(*_pool_windows(x))
  return y, first


def _max_pool_bwd(first, g):
  zero = jnp.zeros_like(g)
  return (_unpool([jnp.where(first == i, g, zero) for i in range(4)]),)


def _unpool(parts):
  """The inverse of `_pool_windows`: [N, H, W, C] from the four
  [N, H/2, W/2, C] window elements, in row-major window order."""
  n, h2, w2, ch = parts[0].shape
  top = jnp.stack(parts[:2], axis=3)      # [N, H/2, W/2, 2, C]
  bottom = jnp.stack(parts[2:], axis=3)
  x6 = jnp.stack([top, bottom], axis=2)   # [N, H/2, 2, W/2, 2, C]
  return x6.reshape(n, 2 * h2, 2 * w2, ch)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def bias_relu_max_pool_2x2(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`max_pool_2x2(relu(y + bias))` in one pass over `y`, with a small
  residual.

  The same values and gradients as the three ops one after the other
  (`reduce_window`'s routing of each window's cotangent to its first
  maximum included), but the forward pass reads the convolution's output
  once and keeps only the pooled output and each window's first-maximum
  position (int8) for the backward pass, which writes the input cotangent
  in one pass and takes the bias gradient on the 4x smaller pooled grid.
  Separately, XLA:CPU stores the full ReLU output and reads `y` four times
  (conv1: 51 MB per 512 images each time).

  Why it is the same function: a bias constant over the window and a ReLU
  both commute with the maximum, and a window whose maximum `m = max(y +
  bias)` is <= 0 gets no gradient either way (ReLU's is 0 there).

  Args:
    y: [N, H, W, C] pre-activation (H, W even).
    bias: [C], same dtype.

  Returns:
    [N, H//2, W//2, C].
  """
  return _bias_relu_pool_fwd(y, bias)[0]


def _bias_relu_pool_fwd(y, bias):
  m, first = _first_maximum(*_pool_windows(y + bias))
  out = jnp.maximum(m, 0)
  return out, (first, out)


def _bias_relu_pool_bwd(residuals, g):
  first, out = residuals
  zero = jnp.zeros_like(g)
  g, db = _add_bias_bwd(None, jnp.where(out > 0, g, zero))
  return _unpool([jnp.where(first == i, g, zero) for i in range(4)]), db


bias_relu_max_pool_2x2.defvjp(_bias_relu_pool_fwd, _bias_relu_pool_bwd)


def reference_dense_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 'VALID' convolution whose kernel covers the whole input, as a conv."""
  return reference_conv2d(x, kernel, 'VALID')


def dense_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 'VALID' convolution whose kernel covers the whole spatial input.

  With KH, KW equal to the input's H, W the convolution has a single output
  position, so it *is* a matrix product of the flattened input [N, H*W*C]
  with the kernel reshaped to [KH*KW*C, O] (HWIO flattening matches NHWC
  flattening). Written as a matmul, forward and both gradients are single
  GEMMs; as a convolution the input gradient alone is ~40x slower on XLA:CPU
  (fc3: 575 ms vs 14 ms per 512-batch).

  Args:
    x: [N, H, W, C] input.
    kernel: [H, W, C, O] kernel, same dtype as `x`.

  Returns:
    [N, 1, 1, O] output, equal to `reference_dense_conv(x, kernel)`.
  """
  n, h, w, c = x.shape
  kh, kw, kc, o = kernel.shape
  if (kh, kw, kc) != (h, w, c):
    raise ValueError(f'dense_conv needs a kernel covering the input: x '
                     f'{x.shape}, kernel {kernel.shape}')
  a, b = x.reshape(n, h * w * c), kernel.reshape(h * w * c, o)
  big = n * h * w * c * o >= _ONEDNN_MIN_MATMUL
  y = _matmul(a, b) if big and onednn.available(a, b) else a @ b
  return y.reshape(n, 1, 1, o)


@jax.custom_vjp
def _matmul(a, b):
  """a @ b whose two gradient GEMMs run on oneDNN where available."""
  return _matmul_value(a, b)


def _matmul_value(a, b):
  """The forward GEMM: XLA's in float32 (as fast as oneDNN's here),
  oneDNN's in bfloat16 (XLA:CPU's bfloat16 dot is several times slower)."""
  if a.dtype == jnp.float32:
    return a @ b
  return _on_cpu_onednn(lambda a, b: a @ b, onednn.matmul, a, b)


def _matmul_fwd(a, b):
  return _matmul_value(a, b), (a, b)


def _matmul_bwd(residuals, g):
  a, b = residuals
  g = g.astype(a.dtype)
  da = _on_cpu_onednn(lambda g, b: g @ b.T,
                      functools.partial(onednn.matmul, transpose_b=True), g, b)
  db = _on_cpu_onednn(lambda a, g: a.T @ g,
                      functools.partial(onednn.matmul, transpose_a=True), a, g)
  return da, db.astype(b.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
