"""Training math and the pure, compile-once steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from conftest import make_digits
from mnist_jax import input_pipeline
from mnist_jax import models
from mnist_jax import optimizer
from mnist_jax import parallel
from mnist_jax import steps
from mnist_jax import train
from mnist_jax.hooks import base


def test_learning_rate_schedule_staircase():
  config = default.get_config()
  assert optimizer.steps_per_epoch(config, 55_000) == 107  # 512 per batch
  lr = optimizer.learning_rate_schedule(config, num_train=55_000)
  for step, expected in ((0, 1e-3), (106, 1e-3), (107, 9.5e-4),
                         (213, 9.5e-4), (214, 9.025e-4)):
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-6)


def _state(config, seed=0):
  model = models.create_model(config)
  return model, steps.create_train_state(config, model, 600,
                                         jax.random.key(seed))


def test_l2_touches_kernels_only_and_equals_tutorial_term():
  config = default.get_config()
  _, state = _state(config)
  params = state.params
  zeros = jax.tree.map(jnp.zeros_like, params)
  l2 = optax.add_decayed_weights(config.weight_decay,
                                 mask=optimizer.kernel_mask)
  got, _ = l2.update(zeros, l2.init(params), params)

  def tutorial_term(p):  # 0.0005 * sum(w**2) / 2 over conv kernels
    return sum(config.weight_decay * jnp.sum(layer['kernel'] ** 2) / 2
               for layer in p.values())

  expected = jax.grad(tutorial_term)(params)
  for name in params:
    np.testing.assert_allclose(got[name]['kernel'], expected[name]['kernel'],
                               rtol=1e-6, atol=1e-12)
    assert not np.any(np.asarray(got[name]['bias']))
    assert np.any(np.asarray(got[name]['kernel']))
  # The full chain is Adam applied to (gradient + L2 gradient), not AdamW.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  tx = optimizer.create_optimizer(config, 1e-3)
  updates, _ = tx.update(grads, tx.init(params), params)
  adam = optax.adam(1e-3)
  combined = jax.tree.map(jnp.add, grads, expected)
  manual, _ = adam.update(combined, adam.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(manual)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def _batch(n=16, seed=0):
  images, labels = make_digits(n, seed)
  return {'image': jnp.asarray(images[..., None] / 255.0, jnp.float32),
          'label': jnp.asarray(labels, jnp.int32)}


def test_train_step_is_pure_and_compiles_once():
  config = default.get_config()
  _, state = _state(config)
  step = jax.jit(steps.train_step)
  rng = jax.random.key(0)
  batch = _batch()
  s1, m1 = step(state, batch, rng)
  s1b, m1b = step(state, batch, rng)
  for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s1b, m1b))):
    np.testing.assert_array_equal(a, b)
  s = s1
  for i in range(3):
    s, _ = step(s, _batch(seed=i + 1), rng)
  assert step._cache_size() == 1
  assert int(s.step) == 4
  # The dropout mask depends on the step: a different step gives other outputs.
  other = s1.replace(step=state.step + 5)
  s2, _ = step(other.replace(params=state.params, opt_state=state.opt_state),
               batch, rng)
  assert not np.array_equal(np.asarray(s2.params['fc3']['kernel']),
                            np.asarray(s1.params['fc3']['kernel']))


def test_loss_falls_on_a_fixed_batch():
  config = default.get_config()
  _, state = _state(config)
  step = jax.jit(steps.train_step, donate_argnums=0)
  batch = _batch(32)
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics.compute()['loss']))
  assert losses[-1] < 0.5 * losses[0], losses
  # 600 images / batch 512: the learning rate decays every step; step 14 ran.
  np.testing.assert_allclose(float(metrics.compute()['learning_rate']),
                             1e-3 * 0.95**14, rtol=1e-5)


@pytest.mark.parametrize('augment_shift', [0, 2])
def test_resident_train_fn_compiles_once_and_k_steps_equal_single_steps(
    tiny_config, augment_shift):
  """steps_per_dispatch=k gives exactly the k=1 result, per-step metrics too
  (with augmentation too: its offsets are a function of seed and step)."""
  tiny_config.augment_shift = augment_shift
  tiny_config.batch_size = 8
  mesh = parallel.create_mesh()
  data = input_pipeline.load(tiny_config)
  n = len(data.train)
  _, state0 = _state(tiny_config)
  train_data = parallel.put_replicated(
      {'image': data.train.images, 'label': data.train.labels}, mesh)
  perm = input_pipeline.epoch_permutation(jax.random.key(1), 0, n)
  fn = steps.make_train_fn(tiny_config, n, mesh)
  rng = jax.random.key(2)
  copy = lambda s: parallel.put_replicated(jax.tree.map(np.array, s), mesh)
  s1, per_step = copy(state0), []
  for _ in range(4):
    s1, m = fn(s1, train_data, perm, rng, num_steps=1)
    per_step.append(m)
  assert fn._cache_size() == 1
  s4, m4 = fn(copy(state0), train_data, perm, rng, num_steps=4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_array_equal(a, b)
  stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *per_step)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(m4)):
    np.testing.assert_array_equal(a, b)
  if augment_shift:  # and the steps did see moved images
    plain = tiny_config.copy_and_resolve_references()
    plain.augment_shift = 0
    _, m0 = steps.make_train_fn(plain, n, mesh)(
        copy(state0), train_data, perm, rng, num_steps=4)
    assert not np.allclose(m0.loss.total, m4.loss.total)


def test_resident_steps_make_no_host_to_device_copies(tiny_config):
  """Data stays put: after set-up, a dispatch copies nothing host -> device."""
  mesh = parallel.create_mesh()
  data = input_pipeline.load(tiny_config)
  n = len(data.train)
  _, state = _state(tiny_config)
  state = parallel.put_replicated(state, mesh)
  train_data = parallel.put_replicated(
      {'image': data.train.images, 'label': data.train.labels}, mesh)
  perm = jax.jit(input_pipeline.epoch_permutation, static_argnums=2)(
      jax.random.key(1), 0, n)
  rng = jax.device_put(jax.random.key(2))
  fn = steps.make_train_fn(tiny_config, n, mesh)
  state, _ = fn(state, train_data, perm, rng, num_steps=3)  # compile
  with jax.transfer_guard_host_to_device('disallow'):
    for _ in range(2):
      state, metrics = fn(state, train_data, perm, rng, num_steps=3)
  jax.block_until_ready(metrics)
  assert int(state.step) == 9


def test_dispatches_end_at_epoch_ends_and_checkpoint_steps(tiny_config):
  """An 18-step epoch in dispatches of at most 4 steps; saves at exact steps."""
  def lengths(every):
    tiny_config.checkpoint_every_steps = every
    out, step = [], 0
    while step < 18:
      out.append(train._chunk_length(tiny_config, step, 18, 18))  # pylint: disable=protected-access
      step += out[-1]
    return out

  tiny_config.steps_per_dispatch = 4
  assert lengths(0) == [4, 4, 4, 4, 2]  # checkpoints at epoch ends only
  assert lengths(10) == [4, 4, 2, 4, 4]  # 10 is a dispatch boundary


def test_auto_steps_per_dispatch_is_10_on_cpu_and_an_epoch_elsewhere(
    tiny_config, monkeypatch):
  tiny_config.steps_per_dispatch = 0  # the default: auto
  tiny_config.checkpoint_every_steps = 0
  assert train.steps_per_dispatch(tiny_config, 107) == 10
  assert train.dispatch_lengths(tiny_config, 0, 214, 107) == [7, 10]
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert train.steps_per_dispatch(tiny_config, 107) == 107
  assert train.dispatch_lengths(tiny_config, 0, 214, 107) == [107]
  assert train.dispatch_lengths(tiny_config, 50, 214, 107) == [57, 107]
  tiny_config.checkpoint_every_steps = 100  # saves still at exact steps
  assert train.dispatch_lengths(tiny_config, 0, 214, 107) == [7, 14, 93, 100]
  tiny_config.steps_per_dispatch = 4  # a value set by hand wins
  assert train.steps_per_dispatch(tiny_config, 107) == 4


def test_every_dispatch_length_compiles_before_the_epochs_clock(
    tiny_config, tmp_path):
  """Lengths 4, 4, 4, 4, 2 per epoch: both programs are compiled before the
  first epoch's timer starts, so no compilation happens while it runs, and
  the first epoch's record says how long compiling took."""
  tiny_config.steps_per_dispatch = 4
  tiny_config.checkpoint_every_steps = 0
  tiny_config.write_report = False
  tiny_config.compilation_cache_dir = 'none'  # real compilations, counted
  assert train.dispatch_lengths(tiny_config, 0, 36, 18) == [2, 4]
  assert train.dispatch_lengths(tiny_config, 34, 36, 18) == [2]
  compiles, seen = [], []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)

  class Watch(base.Hook):
    def on_steps(self, run, step, state):
      seen.append((step, len(compiles)))
  try:
    result = train.train_and_evaluate(
        tiny_config, str(tmp_path), hooks=[Watch()])
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  for epoch_end in (18, 36):  # within each epoch, no new compilation
    counts = {c for s, c in seen if epoch_end - 18 < s <= epoch_end}
    assert len(counts) == 1, seen
  first, second = result['epochs']
  assert first['compile_seconds'] > 0 and 'compile_seconds' not in second


def test_epoch_line_shows_every_metric_of_the_record():
  record = {'epoch': 1, 'step': 30, 'train_loss': 1.08843,
            'train_accuracy': 0.65994, 'train_learning_rate': 0.001,
            'train_seconds': 6.4, 'images_per_second': 149.2,
            'validation_loss': 0.368912, 'validation_accuracy': 0.8808,
            'test_loss': 0.361449, 'test_accuracy': 0.8873}
  assert train.epoch_line(record) == (
      'Epoch   1 step     30: train loss 1.088 acc 65.99% lr 0.001 | '
      'validation loss 0.3689 acc 88.08% | test loss 0.3614 acc 88.73% | '
      '149 img/s')
  not_evaluated = {k: v for k, v in record.items()
                   if not k.startswith(('validation_', 'test_'))}
  assert train.epoch_line(not_evaluated) == (
      'Epoch   1 step     30: train loss 1.088 acc 65.99% lr 0.001 | '
      '149 img/s')
