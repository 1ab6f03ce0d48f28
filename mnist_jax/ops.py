"""PROVISIONAL reference lowerings; helper-1 replaces this file with fast ops."""
import flax.linen as nn
import jax


def reference_conv2d(x, kernel, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def reference_max_pool_2x2(x):
  return nn.max_pool(x, (2, 2), (2, 2))


conv2d = reference_conv2d
max_pool_2x2 = reference_max_pool_2x2


def dense_conv(x, kernel):
  return reference_conv2d(x, kernel, 'VALID')
