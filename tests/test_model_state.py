"""A model with state besides its parameters: BatchNorm's running statistics
(`config.batch_norm`) are trained, averaged over pmap's devices, used by
evaluation, checkpointed, resumed exactly, fine-tuned from, and restored for
`--mode eval` and `--mode predict`."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ckpt_util
import conftest
from mnist_jax import checkpointing
from mnist_jax import evaluate
from mnist_jax import models
from mnist_jax import ops
from mnist_jax import predict
from mnist_jax import steps
from mnist_jax.errors import CheckpointError


def _bn_config(idx_dir):
  config = conftest.tiny_config_for(idx_dir)
  config.batch_norm = True
  return config


def _batch(n, seed):
  images, labels = conftest.make_digits(n, seed)
  return {'image': jnp.asarray(images[..., None] / 255.0, jnp.float32),
          'label': jnp.asarray(labels, jnp.int32)}


def _stats(state, layer='conv1_bn'):
  return {k: np.asarray(v) for k, v in
          state.model_state['batch_stats'][layer].items()}


@pytest.fixture(scope='module')
def stepped(idx_dir):
  """(model, initial state, two batches of 16, the state after one step on
  each batch alone), with the reference lowering (it compiles faster; the
  runs below use the fast one)."""
  config = _bn_config(idx_dir)
  config.lowering = 'reference'
  model = models.create_model(config)
  state = steps.create_train_state(config, model, 600, jax.random.key(0))
  shares = [_batch(16, 0), _batch(16, 1)]
  step = jax.jit(steps.train_step)
  alone = [step(state, share, jax.random.key(1))[0] for share in shares]
  return model, state, shares, alone


def test_train_step_updates_running_statistics_that_evaluation_uses(stepped):
  model, state, (batch, _), (new, _) = stepped
  assert sorted(state.model_state) == ['batch_stats']
  assert 'bias' not in state.params['conv1']  # BatchNorm's bias replaces it
  # Flax's BatchNorm: mean <- 0.9 mean + 0.1 (batch mean of conv1's output),
  # from 0 at the start.
  conv1 = ops.reference_conv2d(batch['image'],
                               state.params['conv1']['kernel'], 'SAME')
  np.testing.assert_allclose(_stats(new)['mean'],
                             0.1 * np.asarray(conv1.mean((0, 1, 2))),
                             rtol=1e-4, atol=1e-7)
  # Evaluation normalises by the running statistics, not the batch's.
  forward = jax.jit(functools.partial(model.apply, train=False))
  logits = forward(new.variables, batch['image'])
  metrics = jax.jit(functools.partial(steps.eval_step, model=model))(
      new.variables, batch).compute()
  want = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['label']).mean()
  assert float(metrics['loss']) == pytest.approx(float(want), rel=1e-5)
  stale = forward({'params': new.params, **state.model_state},
                  batch['image'])
  assert not np.allclose(logits, stale, rtol=1e-3)
  # The summaries read the end points in training mode: batch statistics,
  # and the running ones stay as they are (no error either).
  _, points = jax.jit(lambda v, x: models.end_points(
      model, v, x, train=True, rngs={'dropout': jax.random.key(2)}))(
          new.variables, batch['image'])
  assert points['conv1'].shape == (16, 28, 28, 32)


def test_pmap_step_averages_the_running_statistics_of_the_shares(stepped):
  """Under pmap each device normalises its share by the share's statistics;
  the running averages that leave the step are the mean over the shares,
  the same on every device. (vmap with an axis name runs the collectives.)"""
  _, state, shares, alone = stepped
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *shares)
  step = functools.partial(steps.train_step, axis_name=steps.PMAP_AXIS)
  new, _ = jax.jit(jax.vmap(step, in_axes=(None, 0, None),
                            axis_name=steps.PMAP_AXIS))(
                                state, stacked, jax.random.key(1))
  for layer in ('conv1_bn', 'conv2_bn'):
    for key in ('mean', 'var'):
      got = np.asarray(new.model_state['batch_stats'][layer][key])
      np.testing.assert_array_equal(got[0], got[1])  # one value everywhere
      want = np.mean([_stats(s, layer)[key] for s in alone], axis=0)
      np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('dtype,tol', [('float32', 1e-5),
                                       ('bfloat16', 2e-2)])
def test_fast_batch_norm_is_flax_batch_norm(dtype, tol):
  """The 'fast' lowering's BatchNorm (GEMV channel sums, `ops.batch_norm`)
  has Flax's variables, outputs, running averages and gradients."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 6, 6, 5)) * 3 + 1, dtype)
  ours = models.BatchNorm(use_running_average=False, dtype=dtype)
  theirs = nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype)
  variables = theirs.init(jax.random.key(0), x)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == (
      jax.tree.structure(variables))
  variables = {'params': {'scale': jnp.asarray(rng.normal(size=5) + 1.0,
                                               jnp.float32),
                          'bias': jnp.asarray(rng.normal(size=5),
                                              jnp.float32)},
               'batch_stats': variables['batch_stats']}

  def loss(module, params, x):
    y, updated = module.apply({**variables, 'params': params}, x,
                              mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, updated)

  results = [jax.jit(jax.value_and_grad(
      functools.partial(loss, module), argnums=(0, 1), has_aux=True))(
          variables['params'], x) for module in (ours, theirs)]
  (_, (y, stats)), grads = results[0]
  (_, (want_y, want_stats)), want_grads = results[1]
  assert y.dtype == want_y.dtype == jnp.dtype(dtype)
  close = functools.partial(np.testing.assert_allclose, rtol=tol, atol=tol)
  close(np.asarray(y, np.float32), np.asarray(want_y, np.float32))
  jax.tree.map(lambda a, b: close(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32)),
               (stats, grads), (want_stats, want_grads))
  # Evaluation: the running averages.
  evaluated = [m.clone(use_running_average=True).apply(
      {**variables, **want_stats}, x) for m in (ours, theirs)]
  close(np.asarray(evaluated[0], np.float32),
        np.asarray(evaluated[1], np.float32))


@pytest.fixture(scope='module')
def bn_reference(idx_dir, tmp_path_factory):
  """An uninterrupted 2-epoch BatchNorm run (saves at 10, 20, 30, 36)."""
  config = _bn_config(idx_dir)
  workdir = str(tmp_path_factory.mktemp('bn_reference'))
  return config, workdir, ckpt_util.run(config, workdir)


def _saved_variables(config, workdir, step=None):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, variables, _ = checkpointing.restore_workdir_variables(
      workdir, models.abstract_variables(models.create_model(config), device),
      step)
  return jax.tree.map(np.asarray, variables)


def test_checkpoints_hold_the_statistics_and_resume_is_exact(bn_reference,
                                                            tmp_path):
  config, ref_workdir, ref_result = bn_reference
  saved = _saved_variables(config, ref_workdir)
  assert sorted(saved) == ['batch_stats', 'params']
  assert np.any(saved['batch_stats']['conv2_bn']['mean'])
  # Interrupted at step 20 (mid-epoch 2), resumed to the end: the same
  # statistics, parameters and metrics, bit for bit.
  workdir = str(tmp_path / 'resumed')
  ckpt_util.copy_steps(ref_workdir, workdir, [10, 20])
  result = ckpt_util.run(config, workdir)
  assert result['final'] == ref_result['final']
  ckpt_util.assert_bitwise_equal(_saved_variables(config, workdir), saved)
  # --mode eval evaluates with the saved statistics: the run's own numbers.
  record = evaluate.evaluate_checkpoint(config, ref_workdir)
  for key in ('test_loss', 'test_accuracy', 'validation_loss'):
    assert record[key] == ref_result['final'][key], key
  # --mode predict restores them too.
  step, variables = predict.restore_variables(config, ref_workdir)
  assert step == 36
  # Restored with the default config (the notebook's first try): the field
  # to set is named.
  plain = config.copy_and_resolve_references()
  plain.batch_norm = False
  with pytest.raises(CheckpointError, match=(
      r'conv1_bn/bias: checkpoint \(32,\) vs model absent.*'
      r'--config.batch_norm=True builds its model')):
    predict.restore_variables(plain, ref_workdir)
  ckpt_util.assert_bitwise_equal(jax.tree.map(np.asarray, variables), saved)


def test_fine_tuning_takes_the_statistics_with_the_parameters(bn_reference,
                                                             tmp_path):
  config, ref_workdir, _ = bn_reference
  tuned = config.copy_and_resolve_references()
  tuned.init_from = os.path.join(ref_workdir, 'checkpoints', '20')
  state, _ = ckpt_util.start(tuned, str(tmp_path / 'tuned'))
  assert int(state.step) == 0
  ckpt_util.assert_bitwise_equal(jax.tree.map(np.asarray, state.variables),
                                 _saved_variables(config, ref_workdir, 20))
  # The tutorial's network cannot start from it: one line naming the layers.
  plain = config.copy_and_resolve_references()
  plain.batch_norm = False
  plain.init_from = ref_workdir
  with pytest.raises(CheckpointError, match=(
      r'conv1/bias: checkpoint absent vs model \(32,\).*The run that '
      r'saved it had batch_norm=True \(now False\): '
      r'--config.batch_norm=True builds its model')):
    ckpt_util.start(plain, str(tmp_path / 'plain'))
