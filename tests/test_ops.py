"""Fast op lowerings equal the reference ones in value and gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import ops

RTOL = 1e-5


def _assert_close(actual, expected, rtol=RTOL):
  """Elementwise |a - e| <= rtol * max|e| (tolerance relative to magnitude)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  scale = max(float(np.abs(expected).max()), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _canonical(x, kernel, padding):
  pads = ops._explicit_padding(kernel.shape[:2], padding)  # pylint: disable=protected-access
  return ops._conv2d_canonical_grads(x, kernel, pads)  # pylint: disable=protected-access


CONV_CASES = [
    # (x shape, kernel shape, padding): the network's two convolutions
    # (conv1 takes the im2col path, conv2 the canonical custom_vjp) plus odd
    # shapes that exercise both paths and asymmetric padding.
    ((3, 28, 28, 1), (5, 5, 1, 32), 'SAME'),
    ((3, 14, 14, 32), (5, 5, 32, 64), 'SAME'),
    ((2, 9, 8, 5), (4, 3, 5, 7), 'SAME'),
    ((2, 9, 8, 5), (4, 3, 5, 7), 'VALID'),
    ((2, 9, 8, 16), (3, 4, 16, 6), ((1, 2), (0, 3))),
]


def _kernel(key, shape):
  """Fan-in scaled kernel, so outputs are O(1) as in a trained network."""
  fan_in = shape[0] * shape[1] * shape[2]
  return jax.random.normal(key, shape) / fan_in ** 0.5


def _conv_loss(conv, padding):
  return lambda x, k: jnp.sum(jnp.sin(conv(x, k, padding)))


@pytest.mark.parametrize('conv', [ops.conv2d, _canonical],
                         ids=['conv2d', 'canonical'])
@pytest.mark.parametrize('x_shape,k_shape,padding', CONV_CASES)
def test_conv2d_value_and_grads(conv, x_shape, k_shape, padding):
  x = jax.random.normal(jax.random.key(0), x_shape)
  k = _kernel(jax.random.key(1), k_shape)
  _assert_close(conv(x, k, padding), ops.reference_conv2d(x, k, padding))
  got = jax.jit(jax.grad(_conv_loss(conv, padding), (0, 1)))(x, k)
  want = jax.grad(_conv_loss(ops.reference_conv2d, padding), (0, 1))(x, k)
  for g, w in zip(got, want):
    _assert_close(g, w)


def test_conv2d_grads_inside_scan():
  x = jax.random.normal(jax.random.key(0), (4, 2, 14, 14, 32))
  k1 = _kernel(jax.random.key(1), (5, 5, 1, 32))
  k2 = _kernel(jax.random.key(2), (5, 5, 32, 64))

  def run(conv):
    def body(step, xs):
      def loss(ks):
        y = conv(xs[..., :1], ks[0], 'SAME')
        return jnp.sum(jnp.tanh(conv(xs + y, ks[1], 'SAME')))
      return step + 1, jax.grad(loss)((k1 * step, k2))
    return jax.jit(lambda: jax.lax.scan(body, 1., x)[1])()

  got, want = run(ops.conv2d), run(ops.reference_conv2d)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(g, w)


def test_conv2d_bfloat16_and_vmap():
  x = jax.random.normal(jax.random.key(0), (2, 3, 14, 14, 32))
  k = jax.random.normal(jax.random.key(1), (5, 5, 32, 8))
  xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  got = ops.conv2d(xb[0], kb, 'SAME')
  assert got.dtype == jnp.bfloat16
  _assert_close(got.astype(jnp.float32),
                ops.reference_conv2d(xb[0], kb, 'SAME').astype(jnp.float32),
                rtol=2e-2)
  gk = jax.grad(lambda k: jnp.sum(ops.conv2d(xb[0], k, 'SAME')))(kb)
  assert gk.dtype == jnp.bfloat16
  loss = lambda conv: (lambda x, k: jnp.sum(conv(x, k, 'SAME') ** 2))  # noqa: E731
  got = jax.vmap(jax.grad(loss(ops.conv2d), (0, 1)), (0, None))(x, k)
  want = jax.vmap(jax.grad(loss(ops.reference_conv2d), (0, 1)), (0, None))(
      x, k)
  for g, w in zip(got, want):
    _assert_close(g, w)


@pytest.mark.parametrize('dtype,rtol', [(jnp.float32, RTOL),
                                        (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize('shape', [(3, 28, 28, 32), (5, 1, 1, 10), (7, 4)])
def test_add_bias_value_and_grads(shape, dtype, rtol):
  y = jax.random.normal(jax.random.key(0), shape).astype(dtype)
  b = jax.random.normal(jax.random.key(1), shape[-1:]).astype(dtype)
  loss = lambda add: (lambda y, b: jnp.sum(  # noqa: E731
      jnp.sin(jax.nn.relu(add(y, b)).astype(jnp.float32))))
  value, (dy, db) = jax.jit(jax.value_and_grad(loss(ops.add_bias), (0, 1)))(
      y, b)
  want_value, (want_dy, _) = jax.jit(jax.value_and_grad(
      loss(lambda y, b: y + b), (0, 1)))(y, b)
  assert dy.dtype == db.dtype == dtype
  _assert_close(value, want_value)
  np.testing.assert_array_equal(dy, want_dy)
  # The bias gradient is the float32 sum of the cotangent (plain autodiff on
  # XLA:CPU sums bfloat16 in bfloat16: conv1's 2,352 terms per image
  # saturate at 256), rounded once to the dtype.
  want_db = jnp.sum(want_dy.astype(jnp.float32), axis=tuple(
      range(len(shape) - 1)))
  _assert_close(db.astype(jnp.float32), want_db, rtol)


def test_add_bias_gradient_is_no_serial_reduce_window():
  y = jnp.zeros((512, 28, 28, 32))
  grad = jax.grad(lambda y, b: jnp.sum(jax.nn.relu(ops.add_bias(y, b))), 1)
  hlo = jax.jit(grad).lower(y, jnp.zeros(32)).compile().as_text()
  assert 'reduce-window' not in hlo


def _relu_input_with_ties(shape):
  x = jax.nn.relu(jax.random.normal(jax.random.key(3), shape))
  # Force exact ties between non-zero maxima too, in every window position.
  x = x.at[:, 0::2, 1::2].set(x[:, 0::2, 0::2])
  return x.at[:, 1::4, 1::4].set(x[:, 0::4, 0::4])


@pytest.mark.parametrize('shape', [(2, 28, 28, 8), (2, 14, 14, 16),
                                   (2, 4, 6, 3)])
def test_max_pool_value_and_grad_with_ties(shape):
  x = _relu_input_with_ties(shape)
  assert float(jnp.mean(x == 0)) > 0.3  # plenty of all-zero windows
  g = jax.random.normal(jax.random.key(4),
                        (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))  # noqa: E731
  y, vjp = jax.vjp(jax.jit(ops.max_pool_2x2), x)
  y_ref, vjp_ref = jax.vjp(ref, x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
  np.testing.assert_array_equal(ops.reference_max_pool_2x2(x), y_ref)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape', [(2, 28, 28, 8), (3, 14, 14, 16)])
def test_bias_relu_max_pool_equals_the_three_ops(shape, dtype):
  # Exact ties (between positive maxima, and all-negative windows after the
  # bias) in every window position; the fused op must route like
  # reduce_window and give bitwise the same values and gradients.
  y = jax.random.normal(jax.random.key(3), shape)
  y = y.at[:, 0::2, 1::2].set(y[:, 0::2, 0::2])
  y = y.at[:, 1::4, 1::4].set(y[:, 0::4, 0::4]).astype(dtype)
  b = (0.3 * jax.random.normal(jax.random.key(4), shape[-1:])).astype(dtype)
  g = jax.random.normal(jax.random.key(5), (shape[0], shape[1] // 2,
                                            shape[2] // 2, shape[3]))
  g = g.astype(dtype)
  ref = lambda y, b: ops.reference_max_pool_2x2(jax.nn.relu(y + b))  # noqa: E731
  want, want_vjp = jax.vjp(jax.jit(ref), y, b)
  got, got_vjp = jax.vjp(jax.jit(ops.bias_relu_max_pool_2x2), y, b)
  np.testing.assert_array_equal(got, want)
  (dy, db), (want_dy, want_db) = got_vjp(g), want_vjp(g)
  np.testing.assert_array_equal(dy, want_dy)
  assert db.dtype == dtype
  # The bias gradient: summed in float32 (see test_add_bias_value_and_grads).
  _assert_close(db.astype(jnp.float32), jnp.sum(
      want_dy.astype(jnp.float32), axis=(0, 1, 2)),
                RTOL if dtype == jnp.float32 else 1e-2)
  assert int(jnp.sum(want_dy != 0)) > 0


def test_max_pool_grad_inside_scan():
  xs = _relu_input_with_ties((3, 2, 8, 8, 4))

  def run(pool):
    def body(c, x):
      return c + jax.grad(lambda x: jnp.sum(pool(x) ** 2))(x), None
    return jax.jit(lambda: jax.lax.scan(body, jnp.zeros(xs.shape[1:]), xs))()

  np.testing.assert_array_equal(run(ops.max_pool_2x2)[0],
                                run(ops.reference_max_pool_2x2)[0])


def test_max_pool_rejects_odd_sizes():
  with pytest.raises(ValueError):
    ops.max_pool_2x2(jnp.zeros((1, 5, 4, 1)))


@pytest.mark.parametrize('x_shape,k_shape', [((4, 7, 7, 64), (7, 7, 64, 32)),
                                             ((4, 1, 1, 48), (1, 1, 48, 10))])
def test_dense_conv(x_shape, k_shape):
  x = jax.random.normal(jax.random.key(5), x_shape)
  k = _kernel(jax.random.key(6), k_shape)
  y = jax.jit(ops.dense_conv)(x, k)
  assert y.shape == (x_shape[0], 1, 1, k_shape[-1])
  _assert_close(y, ops.reference_dense_conv(x, k))
  loss = lambda f: (lambda x, k: jnp.sum(jnp.sin(f(x, k))))  # noqa: E731
  got = jax.grad(loss(ops.dense_conv), (0, 1))(x, k)
  want = jax.grad(loss(ops.reference_dense_conv), (0, 1))(x, k)
  for g, w in zip(got, want):
    _assert_close(g, w)
  with pytest.raises(ValueError):
    ops.dense_conv(x, k[:, :, :1])
