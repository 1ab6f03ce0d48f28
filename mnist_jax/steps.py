"""The train state and the pure, jitted training and evaluation steps.

`train_step` and `eval_step` are pure functions of arrays. `make_train_fn`
compiles `num_steps` of them (a `lax.scan`) over the device-resident dataset,
on a mesh (jit, the default) or with the classic `jax.pmap`; `make_eval_fn`
evaluates a whole padded split in one call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from mnist_jax import input_pipeline
from mnist_jax import metrics as metrics_lib
from mnist_jax import models
from mnist_jax import optimizer
from mnist_jax import parallel

P = jax.sharding.PartitionSpec
PMAP_AXIS = 'batch'
# Folded into the run's dropout key for the augmentation's stream (above any
# step, which the dropout stream folds in, so the two never meet).
AUGMENT_STREAM = 2**31 + 1


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, params, opt_state, tx), the model state (the
  variable collections besides 'params', e.g. BatchNorm's 'batch_stats';
  empty for the tutorial's network) and the schedule that `train_step`
  reports in its metrics."""
  model_state: dict[str, Any] = flax.struct.field(default_factory=dict)
  learning_rate_fn: Callable[[Any], Any] = flax.struct.field(
      pytree_node=False, default=None)

  @property
  def variables(self) -> dict[str, Any]:
    """What `model.apply` takes: {'params': ..., **model_state}."""
    return {'params': self.params, **self.model_state}


def create_train_state(config, model: models.CNN, num_train: int,
                       rng: jax.Array) -> TrainState:
  """Initialises parameters (variance scaling) and the optimizer state."""
  schedule = optimizer.learning_rate_schedule(config, num_train)
  tx = optimizer.create_optimizer(config, schedule)

  @jax.jit  # one compiled program instead of hundreds of eager ops
  def init(rng):
    variables = models.init_variables(model, rng)
    state = TrainState.create(apply_fn=model.apply,
                              params=variables['params'], tx=tx,
                              model_state=models.model_state(variables),
                              learning_rate_fn=schedule)
    # A strongly typed int32 step: a weakly typed Python 0 would make the
    # step function compile again when it sees the int32 it returns.
    return state.replace(step=jnp.zeros((), jnp.int32))

  return init(rng)


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch, rng, *, axis_name=None):
  """One optimizer step on a batch; pure.

  Args:
    state: the train state; `state.step` is the global step.
    batch: {'image': float [B,28,28,1] in [0,1], 'label': int32 [B]}.
    rng: the run's dropout key; this step uses `fold_in(rng, state.step)`, so
      a run is reproducible from its seed and resumable from its step.
    axis_name: None on the jit path, where `batch` is the global batch. Under
      `pmap`, the mapped axis: `batch` is this device's share, gradients and
      metrics are averaged over the axis, and each device draws its own
      dropout mask.

  Returns:
    (new state, TrainMetrics of this step).
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng,
                                     jax.lax.axis_index(axis_name))

  def loss_fn(params):
    variables = {'params': params, **state.model_state}
    logits, model_state = state.apply_fn(
        variables, batch['image'], train=True, rngs={'dropout': dropout_rng},
        mutable=list(state.model_state))
    return cross_entropy(logits, batch['label']).mean(), (logits, model_state)

  (loss, (logits, model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  if axis_name is not None:  # equal shares: mean of means = global mean
    # (The model state too: BatchNorm's running averages of each device's
    # share become one, the same on every device.)
    grads, model_state = jax.lax.pmean((grads, model_state), axis_name)
  new_state = state.apply_gradients(grads=grads, model_state=model_state)
  metrics = metrics_lib.TrainMetrics.single_from_model_output(
      loss=loss, logits=logits, labels=batch['label'],
      learning_rate=state.learning_rate_fn(state.step))
  if axis_name is not None:
    metrics = jax.lax.all_gather(metrics, axis_name).reduce()
  return new_state, metrics


def eval_step(variables, batch, *, model):
  """Evaluation metrics of a batch; examples with `mask == False` are ignored.

  `variables`: {'params': ..., **model_state} (`TrainState.variables`).
  """
  logits = model.apply(variables, batch['image'], train=False)
  return metrics_lib.EvalMetrics.single_from_model_output(
      loss=cross_entropy(logits, batch['label']), logits=logits,
      labels=batch['label'], mask=batch.get('mask'))


# ------------------------------------------------------ dispatches of steps

def batch_indices(perm, step, *, batch_size: int, spe: int, shard=None):
  """Dataset rows of step `step`'s global batch, cut from the permutation.

  `shard=(index, count)` returns only share `index` of `count` equal shares
  (the pmap path: each device gathers its own rows of the same global batch).
  """
  start = (step % spe) * batch_size
  if shard is not None:
    index, count = shard
    batch_size //= count
    start = start + index * batch_size
  return jax.lax.dynamic_slice_in_dim(perm, start, batch_size)


def _steps_body(config, num_train: int, *, batch_sharding=None,
                axis_name=None, num_shards: int = 1):
  """`run(state, data, perm, rng, num_steps)`: `num_steps` consecutive steps
  within one epoch, each gathering its batch from the resident uint8 `data`
  by the epoch's permutation (then augmenting it, with
  `config.augment_shift`: the place for training-only input transforms);
  metrics stacked along a leading step axis."""
  spe = optimizer.steps_per_epoch(config, num_train)
  dtype = jnp.dtype(config.dtype)

  def one_step(state, data, perm, rng):
    shard = (None if axis_name is None else
             (jax.lax.axis_index(axis_name), num_shards))
    idx = batch_indices(perm, state.step, batch_size=config.batch_size,
                        spe=spe, shard=shard)
    if batch_sharding is not None:  # each device gathers only its own rows
      idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
    images = data['image'][idx]
    if config.augment_shift:
      key = jax.random.fold_in(jax.random.fold_in(rng, AUGMENT_STREAM),
                               state.step)
      if axis_name is not None:  # each device's share its own offsets
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
      images = input_pipeline.random_shift(images, key, config.augment_shift)
    batch = {'image': input_pipeline.normalize(images, dtype),
             'label': data['label'][idx]}
    return train_step(state, batch, rng, axis_name=axis_name)

  def run(state, data, perm, rng, num_steps: int):
    if num_steps == 1:
      state, metrics = one_step(state, data, perm, rng)
      return state, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(lambda s, _: one_step(s, data, perm, rng), state,
                        length=num_steps)

  return run


def make_train_fn(config, num_train: int, mesh, donate: bool = True):
  """The jitted `train_fn(state, data, perm, rng, num_steps)`.

  `config.parallelism='jit'` (default): one program over `mesh`, the global
  batch sharded along 'data', state and metrics replicated, state donated
  unless `donate=False` (the caller keeps using the state it passed: the
  loop's dispatch-ahead, `train.overlaps_epoch_end`).
  'pmap': the classic `jax.pmap` around the same step (see `_pmap_train_fn`).
  """
  if config.parallelism == 'pmap':
    return _pmap_train_fn(config, num_train, mesh, donate)
  run = _steps_body(config, num_train,
                    batch_sharding=jax.NamedSharding(mesh, P('data')))
  replicated = jax.NamedSharding(mesh, P())
  return jax.jit(run, static_argnames='num_steps',
                 donate_argnums=0 if donate else (),
                 out_shardings=(replicated, replicated))


def _pmap_train_fn(config, num_train: int, mesh, donate: bool = True):
  """The pmap option: each device gathers its `batch / devices` rows, the
  step `pmean`s the gradients. The state enters replicated along a leading
  device axis (broadcast on the devices) and leaves as one copy, so callers
  see the same state as on the jit path. Dropout masks are drawn per device
  (the jit path draws one for the global batch)."""
  devices = list(mesh.devices.flat)
  n = len(devices)
  run = _steps_body(config, num_train, axis_name=PMAP_AXIS, num_shards=n)
  pmapped = jax.pmap(
      run, axis_name=PMAP_AXIS, in_axes=(0, None, None, None),
      out_axes=(None, None), static_broadcasted_argnums=4, devices=devices,
      donate_argnums=0 if donate else ())
  replicate = jax.jit(
      lambda tree: jax.tree.map(
          lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree),
      out_shardings=jax.NamedSharding(mesh, P('data')))

  def train_fn(state, data, perm, rng, num_steps: int):
    out = pmapped(replicate(state), data, perm, rng, num_steps)
    if jax.process_count() > 1:
      # Multi-host pmap returns host-local arrays; the replicated values are
      # the same on every host, so they re-wrap as global arrays.
      out = multihost_utils.host_local_array_to_global_array(out, mesh, P())
    return out

  return train_fn


# --------------------------------------------------------------- evaluation

def make_eval_fn(model: models.CNN, mesh):
  """The jitted `eval_fn(variables, split) -> EvalMetrics` of a whole split
  (`device_eval_split`'s padded [num_batches, batch, ...] arrays)."""
  step = functools.partial(eval_step, model=model)

  def eval_fn(variables, split):
    def body(acc, batch):
      batch = dict(batch, image=input_pipeline.normalize(batch['image']))
      return acc.merge(step(variables, batch)), None
    metrics, _ = jax.lax.scan(body, metrics_lib.EvalMetrics.empty(), split)
    return metrics

  return jax.jit(eval_fn, out_shardings=jax.NamedSharding(mesh, P()))


def device_eval_split(split: input_pipeline.Split, eval_batch_size: int, mesh):
  """A split padded to whole batches, as [num_batches, batch, ...] arrays on
  the devices, each batch sharded along 'data'. A batch is
  `eval_batch_size`, but no larger than the split (a larger one would only
  be padding, as much memory as the batch asks for), rounded up to a
  multiple of the devices (the padding is masked out)."""
  n = mesh.devices.size
  batch = -(-min(eval_batch_size, len(split)) // n) * n
  padded = input_pipeline.pad_to_multiple(split, batch)
  return parallel.put_sharded_batches(
      {k: v.reshape((-1, batch) + v.shape[1:]) for k, v in padded.items()},
      mesh)


def evaluate(eval_fn, variables, device_split) -> dict[str, float]:
  """The metrics of a split (`{'loss', 'accuracy', ...}`) as host floats."""
  return metrics_lib.to_scalars(jax.device_get(eval_fn(variables,
                                                       device_split)))


@functools.lru_cache(maxsize=8)
def _forward_fn(model):
  return jax.jit(lambda variables, images: model.apply(
      variables, input_pipeline.normalize(images), train=False))


def logits_of(model: models.CNN, variables, images: np.ndarray,
              batch_size: int = 1000) -> np.ndarray:
  """Logits of uint8 images [N, 28, 28(, 1)] in batches, jitted; the last
  batch is zero-padded so every batch has one shape (one compile).
  `variables`: {'params': ..., **model_state}."""
  images = np.asarray(images, np.uint8).reshape(
      (-1,) + input_pipeline.IMAGE_SHAPE)
  n = len(images)
  batch_size = max(1, min(batch_size, n))
  images = np.concatenate(
      [images, np.zeros((-n % batch_size,) + images.shape[1:], np.uint8)])
  fwd = _forward_fn(model)
  return np.concatenate(
      [np.asarray(fwd(variables, images[i:i + batch_size]))
       for i in range(0, len(images), batch_size)])[:n]
