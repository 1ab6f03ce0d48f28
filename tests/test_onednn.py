"""The oneDNN FFI kernels: built, routed to on CPU, same function as XLA's."""

import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import onednn
from mnist_jax import ops

# `pip install -e .` builds the kernels on x86-64 Linux; elsewhere the
# project runs on the pure-XLA lowering and only the fallback is tested.
BUILT_HERE = sys.platform == 'linux' and platform.machine() == 'x86_64'
needs_kernels = pytest.mark.skipif(not BUILT_HERE,
                                   reason='oneDNN kernels: x86-64 Linux only')


def _assert_close(actual, expected, rtol=1e-5):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  scale = max(float(np.abs(expected).max()), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


@needs_kernels
def test_kernels_load_here():
  assert onednn.available(jnp.zeros(1, jnp.float32)), onednn._state['reason']  # pylint: disable=protected-access
  assert onednn.available(jnp.zeros(1, jnp.bfloat16))
  # One dtype per op, and only those two.
  assert not onednn.available(jnp.zeros(1, jnp.float32),
                              jnp.zeros(1, jnp.bfloat16))
  assert not onednn.available(jnp.zeros(1, jnp.float16))


@needs_kernels
@pytest.mark.parametrize('x_shape,k_hw,pads', [
    ((4, 14, 14, 32), (5, 5), ((2, 2), (2, 2))),   # conv2 of the network
    ((3, 9, 8, 5), (4, 3), ((1, 2), (0, 3))),      # odd, asymmetric
    ((2, 7, 7, 6), (3, 3), ((0, 0), (0, 0))),      # VALID
])
def test_conv_kernel_grad_equals_xla(x_shape, k_hw, pads):
  x = jax.random.normal(jax.random.key(0), x_shape)
  oh = x_shape[1] + sum(pads[0]) - k_hw[0] + 1
  ow = x_shape[2] + sum(pads[1]) - k_hw[1] + 1
  g = jax.random.normal(jax.random.key(1), (x_shape[0], oh, ow, 11))
  got = jax.jit(lambda x, g: onednn.conv_kernel_grad(x, g, k_hw, pads))(x, g)
  want = ops._xla_conv_kernel_grad(x, g, pads)  # pylint: disable=protected-access
  _assert_close(got, want)


@needs_kernels
@pytest.mark.parametrize('x_shape,k_shape,pads', [
    ((4, 14, 14, 32), (5, 5, 32, 64), ((2, 2), (2, 2))),
    ((3, 28, 28, 1), (5, 5, 1, 32), ((2, 2), (2, 2))),
    ((3, 9, 8, 5), (4, 3, 5, 7), ((1, 2), (0, 3))),
])
def test_conv_and_input_grad_equal_xla(x_shape, k_shape, pads):
  x = jax.random.normal(jax.random.key(0), x_shape)
  k = jax.random.normal(jax.random.key(1), k_shape)
  y = jax.jit(lambda x, k: onednn.conv(x, k, pads))(x, k)
  _assert_close(y, ops._canonical_conv(x, k, pads))  # pylint: disable=protected-access
  g = jax.random.normal(jax.random.key(2), y.shape)
  dx = jax.jit(lambda g, k: onednn.conv_input_grad(g, k, x_shape[1:3], pads))(
      g, k)
  _assert_close(dx, ops._xla_conv_input_grad(g, k, x_shape[1:3], pads))  # pylint: disable=protected-access


@needs_kernels
@pytest.mark.parametrize('transpose_a', [False, True])
@pytest.mark.parametrize('transpose_b', [False, True])
def test_matmul_equals_numpy(transpose_a, transpose_b):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((37, 19) if not transpose_a else (19, 37))
  b = rng.standard_normal((19, 23) if not transpose_b else (23, 19))
  got = jax.jit(lambda a, b: onednn.matmul(
      a, b, transpose_a=transpose_a, transpose_b=transpose_b))(
          a.astype(np.float32), b.astype(np.float32))
  want = (a.T if transpose_a else a) @ (b.T if transpose_b else b)
  _assert_close(got, want)


def _fc3_loss(dense):
  return lambda x, k: jnp.sum(jnp.sin(dense(x, k)))


def _conv2_loss(conv):
  return lambda x, k: jnp.sum(jnp.sin(conv(x, k, 'SAME')))


def _conv2_inputs():
  x = jax.random.normal(jax.random.key(0), (3, 14, 14, 32))
  k = jax.random.normal(jax.random.key(1), (5, 5, 32, 64)) / 800 ** 0.5
  return x, k


def _fc3_inputs():
  # 8 x 3136 x 1024 multiply-adds: above ops._ONEDNN_MIN_MATMUL.
  x = jax.random.normal(jax.random.key(2), (8, 7, 7, 64))
  k = jax.random.normal(jax.random.key(3), (7, 7, 64, 1024)) / 3136 ** 0.5
  return x, k


@needs_kernels
def test_network_gradients_use_onednn_and_match_reference():
  x, k = _conv2_inputs()
  grad = jax.grad(_conv2_loss(ops.conv2d), (0, 1))
  hlo = _hlo(grad, x, k)
  for target in ('"mnist_onednn_conv"', 'mnist_onednn_conv_bwd_weights'):
    assert target in hlo
  assert hlo.count('"mnist_onednn_conv"') == 2  # forward and input gradient
  want = jax.grad(_conv2_loss(ops.reference_conv2d), (0, 1))(x, k)
  for g, w in zip(jax.jit(grad)(x, k), want):
    _assert_close(g, w)

  x, k = _fc3_inputs()
  grad = jax.grad(_fc3_loss(ops.dense_conv), (0, 1))
  assert _hlo(grad, x, k).count('mnist_onednn_matmul') == 2
  want = jax.grad(_fc3_loss(ops.reference_dense_conv), (0, 1))(x, k)
  for g, w in zip(jax.jit(grad)(x, k), want):
    _assert_close(g, w)


def test_disabled_or_float16_uses_pure_xla(monkeypatch):
  x, k = _conv2_inputs()
  grad = jax.grad(_conv2_loss(ops.conv2d), (0, 1))
  assert 'mnist_onednn' not in _hlo(grad, x.astype(jnp.float16),
                                    k.astype(jnp.float16))
  monkeypatch.setenv(onednn.DISABLE_ENV_VAR, '1')
  assert 'mnist_onednn' not in _hlo(grad, x, k)
  want = jax.grad(_conv2_loss(ops.reference_conv2d), (0, 1))(x, k)
  for g, w in zip(jax.jit(grad)(x, k), want):
    _assert_close(g, w)


def _bf16(*arrays):
  return [a.astype(jnp.bfloat16) for a in arrays]


def _f32_of_bf16(*arrays):
  """The bfloat16-rounded values in float32: what a bfloat16 kernel that
  accumulates in float32 computes, before rounding its result."""
  return [a.astype(jnp.bfloat16).astype(jnp.float32) for a in arrays]


@needs_kernels
def test_bfloat16_kernels_equal_float32_math_on_rounded_inputs():
  # bfloat16 in and out, float32 accumulation: the result is the float32
  # result of the rounded inputs, rounded once (relative error <= 2^-8).
  x, k = _conv2_inputs()
  pads = ((2, 2), (2, 2))
  xf, kf = _f32_of_bf16(x, k)
  y = jax.jit(lambda x, k: onednn.conv(x, k, pads))(*_bf16(x, k))
  assert y.dtype == jnp.bfloat16
  want_y = ops._canonical_conv(xf, kf, pads)  # pylint: disable=protected-access
  _assert_close(y, want_y, rtol=8e-3)
  g, = _f32_of_bf16(jnp.cos(want_y))
  dx = jax.jit(lambda g, k: onednn.conv_input_grad(g, k, (14, 14), pads))(
      *_bf16(g, kf))
  _assert_close(dx, ops._xla_conv_input_grad(g, kf, (14, 14), pads),  # pylint: disable=protected-access
                rtol=8e-3)
  dk = jax.jit(lambda x, g: onednn.conv_kernel_grad(x, g, (5, 5), pads))(
      *_bf16(xf, g))
  assert dk.dtype == jnp.bfloat16
  _assert_close(dk, ops._xla_conv_kernel_grad(xf, g, pads), rtol=8e-3)  # pylint: disable=protected-access
  a, b = _f32_of_bf16(*_fc3_inputs())
  a, b = a.reshape(8, -1), b.reshape(-1, 1024)
  for ta, tb in ((False, False), (True, False), (False, True)):
    got = jax.jit(lambda a, b, ta=ta, tb=tb: onednn.matmul(
        a, b, transpose_a=ta, transpose_b=tb))(*_bf16(a.T if ta else a,
                                                      b.T if tb else b))
    _assert_close(got, a @ b, rtol=8e-3)


@needs_kernels
def test_bfloat16_network_ops_run_on_onednn():
  x, k = _bf16(*_conv2_inputs())
  grad = jax.grad(lambda x, k: jnp.sum(
      jnp.sin(ops.conv2d(x, k, 'SAME').astype(jnp.float32))), (0, 1))
  hlo = _hlo(grad, x, k)
  assert hlo.count('"mnist_onednn_conv"') == 2
  assert 'mnist_onednn_conv_bwd_weights' in hlo
  x, k = _bf16(*_fc3_inputs())
  grad = jax.grad(lambda x, k: jnp.sum(
      jnp.sin(ops.dense_conv(x, k).astype(jnp.float32))), (0, 1))
  assert _hlo(grad, x, k).count('mnist_onednn_matmul') == 3  # fwd + 2 grads


@needs_kernels
def test_inside_scan_matches_outside():
  x, k = _conv2_inputs()
  grad = jax.grad(_conv2_loss(ops.conv2d), 1)

  def body(carry, _):
    return carry - 0.1 * grad(x, carry), None

  scanned, _ = jax.jit(lambda k: jax.lax.scan(body, k, length=2))(k)
  k1 = k - 0.1 * grad(x, k)
  _assert_close(scanned, k1 - 0.1 * grad(x, k1), rtol=1e-5)


def test_missing_library_prints_one_line_and_falls_back(monkeypatch, capsys):
  monkeypatch.setattr(onednn, '_state',
                      {'loaded': False, 'reason': 'test: not built'})
  x, k = _conv2_inputs()
  for _ in range(2):
    assert not onednn.available(x)
  err = capsys.readouterr().err
  assert err.count('oneDNN kernels unavailable (test: not built)') == 1
  grad = jax.grad(_conv2_loss(ops.conv2d), (0, 1))
  assert 'mnist_onednn' not in _hlo(grad, x, k)


@needs_kernels
def test_kernels_failing_their_self_test_fall_back_with_one_line(
    monkeypatch, capsys):
  monkeypatch.setitem(onednn._state, 'works', {})  # pylint: disable=protected-access
  monkeypatch.setitem(onednn._state, 'warned', set())  # pylint: disable=protected-access
  real_inputs = onednn._self_test_inputs  # pylint: disable=protected-access

  def mixed_dtypes(dtype):  # the C++ handlers reject these: a real error
    inputs = real_inputs(dtype)
    return dict(inputs, k=inputs['k'].astype(np.float32))

  monkeypatch.setattr(onednn, '_self_test_inputs', mixed_dtypes)
  x, k = _bf16(*_conv2_inputs())
  for _ in range(2):
    assert not onednn.available(x, k)
  err = capsys.readouterr().err
  assert err.count('\n') == 1, err
  assert ('oneDNN kernels failed their bfloat16 self-test on this CPU '
          '(JaxRuntimeError: ' in err), err
  assert 'using the pure-XLA lowering' in err
  grad = jax.grad(lambda x, k: jnp.sum(
      ops.conv2d(x, k, 'SAME').astype(jnp.float32)), (0, 1))
  assert 'mnist_onednn' not in _hlo(grad, x, k)
  # float32 is tested on its own and still runs on oneDNN.
  monkeypatch.setattr(onednn, '_self_test_inputs', real_inputs)
  assert onednn.available(*_conv2_inputs())


@needs_kernels
def test_self_test_runs_while_a_model_is_traced(monkeypatch):
  monkeypatch.setitem(onednn._state, 'works', {})  # pylint: disable=protected-access
  x, k = _conv2_inputs()
  grad = jax.jit(jax.grad(_conv2_loss(ops.conv2d), (0, 1)))
  assert 'mnist_onednn' in grad.lower(x, k).as_text()  # first use: traced
  assert onednn._state['works'] == {jnp.dtype(jnp.float32): True}  # pylint: disable=protected-access


@needs_kernels
def test_kernels_computing_a_wrong_result_fall_back(monkeypatch, capsys):
  monkeypatch.setitem(onednn._state, 'works', {})  # pylint: disable=protected-access
  monkeypatch.setitem(onednn._state, 'warned', set())  # pylint: disable=protected-access
  real = onednn._numpy_conv_and_grads  # pylint: disable=protected-access

  def off_by_one(*args):
    y, dx, dk = real(*args)
    return y, dx, dk + 1.0

  monkeypatch.setattr(onednn, '_numpy_conv_and_grads', off_by_one)
  assert not onednn.available(*_conv2_inputs())
  err = capsys.readouterr().err
  assert 'float32 self-test on this CPU (conv kernel grad differs' in err
