"""The tutorial's fully convolutional MNIST classifier as a Flax linen module.

    conv1 32@5x5 SAME+ReLU -> pool1 2x2/2 -> conv2 64@5x5 SAME+ReLU -> pool2
    -> fc3 1024@7x7 VALID+ReLU -> dropout3 -> fc4 10@1x1 -> logits [B, 10]

Every layer's output is sown into 'intermediates' as the dict `end_points`.
With `batch_norm=True` (not the tutorial's network) conv1 and conv2 are
followed by BatchNorm before their ReLU; its running statistics are the
collection 'batch_stats', the model state `steps.TrainState` carries and
checkpoints beside the parameters. A module's `variables` are 'params' plus
any such collection (`init_variables`).
`lowering` picks how the layers lower to XLA: 'reference' is what `nn.Conv`
and `nn.max_pool` lower to (what XLA:GPU/TPU tune); 'fast' is `mnist_jax.ops`
(oneDNN kernels where built, and forms XLA:CPU runs fast); 'auto' (default)
is 'fast' on the CPU backend and 'reference' elsewhere. The function and the
parameters are the same either way.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mnist_jax import input_pipeline
from mnist_jax import ops

# The network's end points, as it sows them (the summaries take whatever a
# model sows).
END_POINTS = ('conv1', 'pool1', 'conv2', 'pool2', 'fc3', 'dropout3', 'fc4')

# TF's variance_scaling_initializer(factor=1.0, mode='FAN_AVG', uniform=False):
# a truncated normal with variance 1 / fan_avg.
kernel_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'truncated_normal')


def resolve_lowering(lowering: str) -> str:
  """'auto' -> 'fast' on the CPU backend, 'reference' on GPU/TPU."""
  if lowering == 'auto':
    return 'fast' if jax.default_backend() == 'cpu' else 'reference'
  if lowering not in ('fast', 'reference'):
    raise ValueError(f"lowering must be 'auto', 'fast' or 'reference', got "
                     f'{lowering!r}')
  return lowering


class Conv(nn.Module):
  """Stride-1 NHWC convolution with an HWIO kernel and (`use_bias`) a bias.

  A kernel that covers the whole spatial input with VALID padding (fc3, fc4)
  is a fully connected layer and is computed as one matmul on the 'fast' path.
  With `pool=True` (ReLU only) it returns `(activation, max_pool_2x2 of it)`;
  the 'fast' path computes the pooled output in one fused op
  (`ops.bias_relu_max_pool_2x2`), and the full activation is then only
  computed when something reads it (the end points).
  """
  features: int
  kernel_size: tuple[int, int]
  padding: str = 'SAME'
  activation: Any = None
  lowering: str = 'fast'
  dtype: Any = jnp.float32
  pool: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array):
    kh, kw = self.kernel_size
    kernel = self.param('kernel', kernel_init,
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,),
                        jnp.float32)
    elif self.pool:
      raise ValueError('Conv(pool=True) fuses the bias; use_bias=False is '
                       'for a conv that a normalisation follows')
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    whole_input = (self.padding == 'VALID' and x.shape[1:3] == (kh, kw))
    if self.lowering == 'reference':
      y = ops.reference_conv2d(x, kernel, self.padding)
    elif whole_input:
      y = ops.dense_conv(x, kernel)
    else:
      y = ops.conv2d(x, kernel, self.padding)
    if not self.use_bias:
      z = y
    else:
      bias = bias.astype(self.dtype)
      z = y + bias if self.lowering == 'reference' else ops.add_bias(y, bias)
    out = self.activation(z) if self.activation is not None else z
    if not self.pool:
      return out
    if self.activation is not nn.relu:
      raise ValueError('Conv(pool=True) fuses a ReLU; got activation '
                       f'{self.activation}')
    if self.lowering == 'reference':
      return out, ops.reference_max_pool_2x2(out)
    return out, ops.bias_relu_max_pool_2x2(y, bias)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis, the 'fast' lowering: the
  same variables ('params' scale/bias, 'batch_stats' mean/var, so
  checkpoints are the same), running averages and function, with the batch
  statistics and their gradients as GEMVs (`ops.batch_norm`)."""
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features,
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features,
                           jnp.float32)
    if self.use_running_average:
      inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
      return ((x.astype(jnp.float32) - ra_mean.value) * (inv * scale)
              + bias).astype(self.dtype)
    y, mean, var = ops.batch_norm(x.astype(self.dtype), scale, bias,
                                  self.epsilon)
    if not self.is_initializing():
      ra_mean.value = (self.momentum * ra_mean.value
                       + (1.0 - self.momentum) * mean)
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y


class CNN(nn.Module):
  """The tutorial's network; returns logits [B, num_classes].

  Attributes:
    num_classes: outputs of fc4.
    dropout_keep_prob: keep probability of the dropout after fc3 (the
      tutorial's 0.5); dropout is applied only when `train=True`.
    lowering: 'auto', 'fast' or 'reference' (same function, different XLA
      ops; 'auto' is 'fast' on CPU, 'reference' on accelerators).
    dtype: compute dtype of activations; parameters are always float32.
    batch_norm: BatchNorm (no conv bias) between conv1/conv2 and their ReLU;
      batch statistics when training (on the jit path the global batch's;
      under `pmap`, each device's share, the running averages then averaged
      over devices), running averages otherwise.
    batch_norm_momentum: decay of the running averages.
  """
  num_classes: int = 10
  dropout_keep_prob: float = 0.5
  lowering: str = 'auto'
  dtype: Any = jnp.float32
  batch_norm: bool = False
  batch_norm_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    lowering = resolve_lowering(self.lowering)
    conv = lambda f, k, pad, act, name, pool=False, bias=True: Conv(  # pylint: disable=g-long-lambda
        f, (k, k), pad, act, lowering, self.dtype, pool, bias, name=name)

    def conv_pool(x, features, name):  # (activation, its 2x2 max-pool)
      if not self.batch_norm:
        return conv(features, 5, 'SAME', nn.relu, name, pool=True)(x)
      y = conv(features, 5, 'SAME', None, name, bias=False)(x)
      norm = nn.BatchNorm if lowering == 'reference' else BatchNorm
      y = nn.relu(norm(
          use_running_average=not train, momentum=self.batch_norm_momentum,
          dtype=self.dtype, name=f'{name}_bn')(y))
      pool = (ops.reference_max_pool_2x2 if lowering == 'reference' else
              ops.max_pool_2x2)
      return y, pool(y)

    points = {}
    points['conv1'], x = conv_pool(x, 32, 'conv1')
    points['pool1'] = x
    points['conv2'], x = conv_pool(x, 64, 'conv2')
    points['pool2'] = x
    x = points['fc3'] = conv(1024, x.shape[1], 'VALID', nn.relu, 'fc3')(x)
    x = points['dropout3'] = nn.Dropout(
        rate=1.0 - self.dropout_keep_prob, deterministic=not train,
        name='dropout3')(x)
    x = points['fc4'] = conv(self.num_classes, 1, 'VALID', None, 'fc4')(x)
    # One sow of all end points; nothing is stored unless the caller makes
    # 'intermediates' mutable, and unused values are dead code to XLA.
    self.sow('intermediates', 'end_points', points)
    return jnp.squeeze(x, axis=(1, 2)).astype(jnp.float32)


def create_model(config) -> CNN:
  """The model chosen by `config`."""
  return CNN(num_classes=config.num_classes,
             dropout_keep_prob=config.dropout_keep_prob,
             lowering=config.lowering, dtype=jnp.dtype(config.dtype),
             batch_norm=config.batch_norm)


class _Reads:
  """A view of a config that records the dotted fields read through it."""

  def __init__(self, config, read: set[str], prefix: str = ''):
    self._config, self._read, self._prefix = config, read, prefix

  def __getattr__(self, name):
    value = getattr(self._config, name)
    if isinstance(value, ml_collections.ConfigDict):
      return _Reads(value, self._read, f'{self._prefix}{name}.')
    self._read.add(self._prefix + name)
    return value

  __getitem__ = __getattr__


def model_fields(config) -> list[str]:
  """The config fields `create_model` builds the model from, sorted: what a
  checkpoint's variables were shaped by (read off `create_model` itself, so
  a field added there is included)."""
  read = set()
  create_model(_Reads(config, read))
  return sorted(read)


def end_points(model: CNN, variables, images, *, train=False, rngs=None):
  """Runs the model (running statistics unchanged, even with `train=True`)
  and returns (logits, {end point name: activation})."""
  logits, state = model.apply(variables, images, train=train, rngs=rngs,
                              mutable=['intermediates', *model_state(
                                  variables)])
  return logits, dict(state['intermediates']['end_points'][0])


def model_state(variables) -> dict[str, Any]:
  """The collections of `variables` other than 'params' (e.g. 'batch_stats'):
  what the model updates while training, without gradients."""
  return {k: v for k, v in variables.items()
          if k not in ('params', 'intermediates')}


def init_variables(model: CNN, rng: jax.Array) -> dict[str, Any]:
  """Freshly initialised variables: 'params' (variance scaling, zero
  biases) and the model state's collections, if the model has any."""
  dummy = jnp.zeros((1,) + input_pipeline.IMAGE_SHAPE, jnp.float32)
  variables = model.init(rng, dummy, train=False)
  return {'params': variables['params'], **model_state(variables)}


def init_params(model: CNN, rng: jax.Array):
  """Freshly initialised parameters (variance scaling, zero biases)."""
  return init_variables(model, rng)['params']


def abstract_variables(model: CNN, sharding=None) -> dict[str, Any]:
  """ShapeDtypeStructs of the variables (with `sharding`, if given): the
  target that restores a checkpoint's variables onto these devices."""
  shapes = jax.eval_shape(lambda rng: init_variables(model, rng),
                          jax.random.key(0))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      shapes)
