"""The network reproduces the tutorial's architecture exactly."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import tpu
from mnist_jax import models

EXPECTED_SHAPES = {
    'conv1': (3, 28, 28, 32), 'pool1': (3, 14, 14, 32),
    'conv2': (3, 14, 14, 64), 'pool2': (3, 7, 7, 64),
    'fc3': (3, 1, 1, 1024), 'dropout3': (3, 1, 1, 1024), 'fc4': (3, 1, 1, 10),
}


def _init(model=None, seed=0):
  model = model or models.CNN()
  return model, {'params': models.init_params(model, jax.random.key(seed))}


def test_exact_parameter_count_and_shapes():
  _, variables = _init()
  params = variables['params']
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == 3_274_634
  shapes = jax.tree.map(lambda x: x.shape, params)
  assert shapes == {
      'conv1': {'kernel': (5, 5, 1, 32), 'bias': (32,)},
      'conv2': {'kernel': (5, 5, 32, 64), 'bias': (64,)},
      'fc3': {'kernel': (7, 7, 64, 1024), 'bias': (1024,)},
      'fc4': {'kernel': (1, 1, 1024, 10), 'bias': (10,)},
  }


def test_end_points_names_and_shapes():
  model, variables = _init()
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
  logits, points = models.end_points(model, variables, x)
  assert logits.shape == (3, 10)
  assert {k: v.shape for k, v in points.items()} == EXPECTED_SHAPES
  np.testing.assert_allclose(points['fc4'][:, 0, 0], logits, rtol=1e-6)


@pytest.mark.parametrize('batch_norm', [False, True])
def test_abstract_variables_match_init_variables_with_the_given_sharding(
    batch_norm):
  model = models.CNN(num_classes=7, batch_norm=batch_norm)
  variables = models.init_variables(model, jax.random.key(0))
  assert sorted(variables) == (['batch_stats', 'params'] if batch_norm
                               else ['params'])
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = models.abstract_variables(model, sharding)
  assert jax.tree.structure(abstract) == jax.tree.structure(variables)
  for a, p in zip(jax.tree.leaves(abstract), jax.tree.leaves(variables)):
    assert (a.shape, a.dtype, a.sharding) == (p.shape, p.dtype, sharding)
  assert all(a.sharding is None
             for a in jax.tree.leaves(models.abstract_variables(model)))


def test_initialisation_variance_scaling_fan_avg_and_zero_bias():
  _, variables = _init(seed=3)
  params = variables['params']
  kernel = np.asarray(params['fc3']['kernel'])
  fan_avg = (7 * 7 * 64 + 7 * 7 * 1024) / 2
  assert abs(kernel.std() / np.sqrt(1.0 / fan_avg) - 1) < 0.02
  # Truncated normal: nothing beyond 2 standard deviations of the base normal.
  assert np.abs(kernel).max() <= 2 * np.sqrt(1.0 / fan_avg) / 0.8796 + 1e-6
  for layer in params.values():
    assert not np.any(np.asarray(layer['bias']))


def test_num_classes_and_keep_prob_from_config(tiny_config):
  tiny_config.num_classes = 7
  tiny_config.dropout_keep_prob = 0.8
  model = models.create_model(tiny_config)
  assert (model.num_classes, model.dropout_keep_prob) == (7, 0.8)
  _, variables = _init(model)
  assert variables['params']['fc4']['kernel'].shape == (1, 1, 1024, 7)


def test_dropout_only_in_training():
  model, variables = _init()
  x = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1))
  a = model.apply(variables, x, train=False)
  b = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(a, b)
  t1 = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(0)})
  t2 = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  assert not np.allclose(t1, t2)
  assert not np.allclose(t1, a)
  _, points = models.end_points(model, variables, x, train=True,
                                rngs={'dropout': jax.random.key(0)})
  kept = np.asarray(points['dropout3'] != 0).mean() / max(
      np.asarray(points['fc3'] != 0).mean(), 1e-9)
  assert 0.35 < kept < 0.65  # keep_prob 0.5 of the active units
  # keep_prob = 1 disables dropout even in training.
  no_drop = models.CNN(dropout_keep_prob=1.0)
  np.testing.assert_allclose(
      no_drop.apply(variables, x, train=True, rngs={'dropout': jax.random.key(0)}),
      a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('lowering', ['fast', 'reference'])
def test_forward_equals_tf_keras(lowering):
  """Same weights in a tf.keras model: proves SAME/VALID/layout semantics."""
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  tf = pytest.importorskip('tensorflow')
  tf.config.set_visible_devices([], 'GPU')
  keras = tf.keras
  model, variables = _init(models.CNN(lowering=lowering), seed=5)
  params = jax.tree.map(np.asarray, variables['params'])
  keras_model = keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.Conv2D(32, 5, padding='same', activation='relu'),
      keras.layers.MaxPooling2D(2, 2),
      keras.layers.Conv2D(64, 5, padding='same', activation='relu'),
      keras.layers.MaxPooling2D(2, 2),
      keras.layers.Conv2D(1024, 7, padding='valid', activation='relu'),
      keras.layers.Dropout(0.5),
      keras.layers.Conv2D(10, 1),
      keras.layers.Reshape((10,)),
  ])
  convs = [l for l in keras_model.layers if isinstance(l, keras.layers.Conv2D)]
  for layer, name in zip(convs, ('conv1', 'conv2', 'fc3', 'fc4')):
    layer.set_weights([params[name]['kernel'], params[name]['bias']])
  x = np.random.default_rng(0).random((8, 28, 28, 1)).astype(np.float32)
  expected = keras_model(x, training=False).numpy()
  got = np.asarray(model.apply(variables, x, train=False))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fast_lowering_equals_reference_outputs_and_gradients():
  """Same parameters, same function: the lowering changes only XLA's ops."""
  fast, reference = models.CNN(lowering='fast'), models.CNN(lowering='reference')
  _, variables = _init(fast, seed=7)
  _, ref_variables = _init(reference, seed=7)
  chex_equal = jax.tree.map(np.array_equal, variables, ref_variables)
  assert all(jax.tree.leaves(chex_equal))  # identical parameter trees
  x = jax.random.uniform(jax.random.key(8), (16, 28, 28, 1))
  labels = jax.random.randint(jax.random.key(9), (16,), 0, 10)

  def loss(model, params):
    logits = model.apply({'params': params}, x, train=True,
                         rngs={'dropout': jax.random.key(10)})
    onehot = jax.nn.one_hot(labels, 10)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, -1)), logits

  (l_fast, z_fast), g_fast = jax.jit(jax.value_and_grad(
      lambda p: loss(fast, p), has_aux=True))(variables['params'])
  (l_ref, z_ref), g_ref = jax.jit(jax.value_and_grad(
      lambda p: loss(reference, p), has_aux=True))(variables['params'])
  np.testing.assert_allclose(z_fast, z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    scale = float(np.max(np.abs(b))) + 1e-12
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale,
                               atol=1e-5)


def test_auto_lowering_is_fast_on_cpu_and_reference_on_accelerators(
    monkeypatch):
  assert default.get_config().lowering == 'auto'
  assert tpu.get_config().lowering == 'auto'
  assert models.resolve_lowering('auto') == 'fast'  # tests run on CPU
  assert models.resolve_lowering('reference') == 'reference'
  with pytest.raises(ValueError, match='lowering'):
    models.resolve_lowering('magic')
  # On an accelerator backend 'auto' builds the standard linen lowering: no
  # reshape-max pools or canonical-gradient custom_vjps in the program.
  for backend in ('gpu', 'tpu'):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert models.resolve_lowering('auto') == 'reference'
    x = jnp.zeros((2, 28, 28, 1))
    variables = models.CNN().init(jax.random.key(0), x, train=False)
    jaxpr = str(jax.make_jaxpr(
        lambda v: models.CNN().apply(v, x, train=False))(variables))
    assert 'reduce_window_max' in jaxpr and 'custom_vjp' not in jaxpr
  monkeypatch.undo()
  jaxpr = str(jax.make_jaxpr(
      lambda v: models.CNN().apply(v, x, train=False))(variables))
  assert 'reduce_window_max' not in jaxpr
