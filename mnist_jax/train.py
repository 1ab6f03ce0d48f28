"""Training and evaluation: pure jitted steps and the `train_and_evaluate` loop.

The pieces, from the inside out:

* `train_step(state, batch, rng, *, learning_rate_fn)` and
  `eval_step(params, batch, *, model)` are pure functions of arrays.
* `make_train_fn` wraps `train_step` into one jitted call that gathers each
  step's batch from the device-resident uint8 dataset by the epoch's
  permutation, normalises it on the device and runs `num_steps` steps in a
  `lax.scan` (`config.steps_per_dispatch`), returning per-step metrics.
* `make_eval_fn` evaluates a whole padded split in one jitted call; padding is
  masked so every example counts exactly once.
* `train_and_evaluate(config, workdir)` is the loop: it is what `launch.py`
  calls and is equally usable from tests and notebooks.

Parallelism is expressed as shardings: the steps are jitted over a
`jax.make_mesh` of all devices with a 'data' axis; batches are sharded along
it, parameters, optimizer state and the dataset are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mnist_jax import config_lib
from mnist_jax import input_pipeline
from mnist_jax import metrics as metrics_lib
from mnist_jax import models
from mnist_jax import tf_setup
from mnist_jax.errors import UserError

P = jax.sharding.PartitionSpec

# Streams derived from key(seed) with fold_in: never stored, never threaded.
_INIT, _DROPOUT, _DATA = 0, 1, 2


class TrainState(train_state.TrainState):
  """Flax's TrainState: step (the global step), params, opt_state, tx."""


# ----------------------------------------------------------------- optimiser

def steps_per_epoch(config, num_train: int) -> int:
  """Steps per epoch; the last incomplete batch is dropped (as the tutorial)."""
  return num_train // config.batch_size


def create_learning_rate_fn(config, num_train: int) -> optax.Schedule:
  """The tutorial's staircase exponential decay of the learning rate.

  decay_steps = int(num_train / batch_size * num_epochs_per_decay), i.e. 107
  steps with the defaults (55,000 / 512).
  """
  decay_steps = int(num_train / config.batch_size * config.num_epochs_per_decay)
  return optax.exponential_decay(
      init_value=config.initial_learning_rate,
      transition_steps=max(decay_steps, 1),
      decay_rate=config.learning_rate_decay_factor,
      staircase=True)


def kernel_mask(params):
  """True for conv kernels (the only weights with L2), False for biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """L2 on kernels (the tutorial's `wd * sum(w**2) / 2` in the loss), then Adam.

  `add_decayed_weights` adds `wd * w` to the gradient *before* Adam, which is
  exactly the gradient of the tutorial's loss term; `optax.adamw` would decay
  after Adam's scaling (decoupled) and is a different optimiser.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=kernel_mask),
      optax.adam(learning_rate_fn, b1=config.adam_b1, b2=config.adam_b2,
                 eps=config.adam_eps))


def create_train_state(config, model, learning_rate_fn, rng=None) -> TrainState:
  """Initialises parameters (variance scaling) and the optimizer state."""
  if rng is None:
    rng = jax.random.fold_in(jax.random.key(config.seed), _INIT)
  tx = create_optimizer(config, learning_rate_fn)

  @jax.jit  # one compiled program instead of hundreds of eager ops (~10x)
  def init(rng):
    dummy = jnp.zeros((1,) + input_pipeline.IMAGE_SHAPE, jnp.float32)
    params = model.init(rng, dummy, train=False)['params']
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    # A strongly typed int32 step: a Python 0 would be weakly typed and the
    # step function would compile again when it sees the int32 it returns.
    return state.replace(step=jnp.zeros((), jnp.int32))

  return init(rng)


# --------------------------------------------------------------------- steps

def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch, rng, *, learning_rate_fn,
               axis_name=None):
  """One Adam step on a batch; pure.

  Args:
    state: the train state; `state.step` is the global step.
    batch: {'image': float [B,28,28,1] in [0,1], 'label': int32 [B]}.
    rng: the run's dropout key; this step uses `fold_in(rng, state.step)`, so
      a run is reproducible from its seed and resumable from its step.
    learning_rate_fn: the schedule (reported in the metrics).
    axis_name: None on the default (jit) path, where `batch` is the global
      batch and XLA partitions the step. Under `pmap` (mnist_jax.parallel),
      the mapped axis: `batch` is this device's share, the gradients and the
      metrics are averaged over the axis, and the dropout key is folded with
      the device's index so that devices drop different units.

  Returns:
    (new state, TrainMetrics of this step).
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng,
                                     jax.lax.axis_index(axis_name))

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, batch['image'], train=True,
                            rngs={'dropout': dropout_rng})
    loss = cross_entropy(logits, batch['label']).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  if axis_name is not None:  # equal shares: mean of means = global mean
    grads = jax.lax.pmean(grads, axis_name)
  new_state = state.apply_gradients(grads=grads)
  metrics = metrics_lib.TrainMetrics.single_from_model_output(
      loss=loss, logits=logits, labels=batch['label'],
      learning_rate=learning_rate_fn(state.step))
  if axis_name is not None:
    metrics = jax.lax.all_gather(metrics, axis_name).reduce()
  return new_state, metrics


def eval_step(params, batch, *, model) -> metrics_lib.EvalMetrics:
  """Evaluation metrics of a batch; examples with `mask == False` are ignored."""
  logits = model.apply({'params': params}, batch['image'], train=False)
  return metrics_lib.EvalMetrics.single_from_model_output(
      loss=cross_entropy(logits, batch['label']), logits=logits,
      labels=batch['label'], mask=batch.get('mask'))


# ------------------------------------------------ device-resident data + jit

def create_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the given) devices with a 'data' axis.

  `jax.make_mesh` orders the devices for the hardware's interconnect (on TPU
  slices, so that the gradient all-reduce runs over neighbouring chips). The
  axis is 'Auto': shardings are hints that XLA propagates, as `jax.jit`
  with `with_sharding_constraint` expects.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def put_replicated(tree, mesh):
  """Places host arrays on every device of `mesh` (the dataset, the state);
  with several processes, via `jax.make_array_from_process_local_data`."""
  from mnist_jax import parallel  # pylint: disable=g-import-not-at-top
  sharding = jax.NamedSharding(mesh, P())
  return jax.tree.map(lambda x: parallel.global_array(x, sharding), tree)


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


def make_steps_fn(config, learning_rate_fn, num_train: int, *,
                  batch_sharding=None, axis_name=None, num_shards: int = 1):
  """The un-jitted `train_fn(state, data, perm, rng, num_steps)` that both
  parallel paths compile: `make_train_fn` (jit over a mesh, the default)
  and `parallel.make_pmap_train_fn` (pmap over `axis_name`).

  Runs `num_steps` consecutive steps within one epoch. Step `s` uses batch
  `s % steps_per_epoch` of `perm` (the epoch's permutation), gathered from
  the resident uint8 `data` and normalised on the device; so the data order,
  like the dropout, is a pure function of (seed, step). Metrics are stacked
  along a leading step axis.
  """
  spe = steps_per_epoch(config, num_train)
  batch_size = config.batch_size
  dtype = jnp.dtype(config.get('dtype', 'float32'))
  step_fn = functools.partial(train_step, learning_rate_fn=learning_rate_fn,
                              axis_name=axis_name)

  def one_step(state, data, perm, rng):
    shard = (None if axis_name is None else
             (jax.lax.axis_index(axis_name), num_shards))
    idx = batch_indices(perm, state.step, batch_size=batch_size, spe=spe,
                        shard=shard)
    if batch_sharding is not None:  # each device gathers only its own rows
      idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
    batch = {'image': input_pipeline.normalize(data['image'][idx], dtype),
             'label': data['label'][idx]}
    return step_fn(state, batch, rng)

  def train_fn(state, data, perm, rng, num_steps: int):
    if num_steps == 1:
      state, metrics = one_step(state, data, perm, rng)
      return state, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(lambda s, _: one_step(s, data, perm, rng), state,
                        length=num_steps)

  return train_fn


def make_train_fn(config, learning_rate_fn, num_train: int, mesh):
  """Returns jitted `train_fn(state, data, perm, rng, num_steps)` (see
  `make_steps_fn`): the global batch is sharded along the mesh's 'data'
  axis, the state and metrics replicated. The state is donated."""
  train_fn = make_steps_fn(config, learning_rate_fn, num_train,
                           batch_sharding=jax.NamedSharding(mesh, P('data')))
  replicated = jax.NamedSharding(mesh, P())
  return jax.jit(train_fn, static_argnames='num_steps', donate_argnums=0,
                 out_shardings=(replicated, replicated))


def make_eval_fn(model, mesh):
  """Returns jitted `eval_fn(params, split) -> EvalMetrics` over a whole split.

  `split` holds [num_batches, eval_batch, ...] padded arrays with a 'mask'
  (see `device_eval_split`); batches run in a `lax.scan`.
  """
  step = functools.partial(eval_step, model=model)

  def eval_fn(params, split):
    def body(acc, batch):
      batch = dict(batch, image=input_pipeline.normalize(batch['image']))
      return acc.merge(step(params, batch)), None
    metrics, _ = jax.lax.scan(body, metrics_lib.EvalMetrics.empty(), split)
    return metrics

  return jax.jit(eval_fn, out_shardings=jax.NamedSharding(mesh, P()))


def device_eval_split(split: input_pipeline.Split, eval_batch_size: int, mesh):
  """Pads a split to whole batches, reshapes to [num_batches, batch, ...] and
  places it on the devices, each batch sharded along 'data'."""
  from mnist_jax import parallel  # pylint: disable=g-import-not-at-top
  padded = input_pipeline.pad_to_multiple(split, eval_batch_size)
  sharding = jax.NamedSharding(mesh, P(None, 'data'))
  return {k: parallel.global_array(
      v.reshape((-1, eval_batch_size) + v.shape[1:]), sharding)
          for k, v in padded.items()}


def evaluate(eval_fn, params, device_split) -> dict[str, float]:
  """{'loss', 'accuracy'} of a split, computed on the host as floats."""
  return metrics_lib.to_scalars(jax.device_get(eval_fn(params, device_split)))


# ---------------------------------------------------------------- the loop

@dataclasses.dataclass
class Context:
  """What a run's hooks may read. Filled in by `train_and_evaluate`."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: models.CNN
  data: input_pipeline.Mnist  # host copies of the splits
  learning_rate_fn: Callable[[Any], Any]
  steps_per_epoch: int
  total_steps: int
  eval_fn: Callable[..., Any]
  eval_splits: dict[str, Any]  # device-resident padded validation/test
  rngs: dict[str, jax.Array]  # 'init', 'dropout', 'data'
  # Written by hooks (the checkpoint hook): epoch records of earlier
  # processes of a resumed run, the checkpoint errors should name, and a
  # request to stop after the current dispatch (pre-emption).
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  last_good_checkpoint: str = ''
  stop_requested: bool = False


class Hook:
  """Something that happens around training (logging, checkpoints, ...).

  The loop calls, in order: `on_train_start` once (may return a replacement
  state, e.g. a restored one), then per dispatch of steps `on_steps` (state
  after `step`, device-side; do not block on it unless needed), `on_metrics`
  when the per-step metrics of a dispatch have reached the host (one dispatch
  late, so the host never waits for the device), `on_epoch_end` after each
  epoch's evaluation, and `on_train_end` with the final result (also when the
  loop stops with an exception: `result` is None then).
  """

  def on_train_start(self, ctx: Context, state: TrainState):
    return state

  def on_steps(self, ctx: Context, step: int, state: TrainState) -> None:
    pass

  def on_metrics(self, ctx: Context, first_step: int, metrics) -> None:
    """`metrics`: host TrainMetrics stacked over steps first_step+1, ..."""

  def on_epoch_end(self, ctx: Context, epoch: int, step: int,
                   state: TrainState, record: dict[str, Any]) -> None:
    pass

  def on_train_end(self, ctx: Context, step: int, state: TrainState,
                   result: dict[str, Any] | None) -> None:
    pass


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss became NaN or infinite (printed as one line)."""


def _check_divisible(config, mesh):
  n = mesh.devices.size
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if value % n:
      ok = [v for v in (value - value % n, value - value % n + n) if v > 0]
      hosts = (f' of {jax.process_count()} processes'
               if jax.process_count() > 1 else '')
      raise config_lib.ConfigError(
          f'config.{field}={value} (global) does not divide by the {n} '
          f'devices{hosts}, which each take an equal share; use a multiple '
          f'of {n}, e.g. {" or ".join(map(str, ok))}.')


def _chunk_length(config, step: int, epoch_end: int) -> int:
  """Steps in the next dispatch: at most steps_per_dispatch, never past the
  epoch end nor past a checkpoint step (so saves happen at exact steps).

  Each distinct length is one more compiled program, so the default config
  checkpoints at epoch ends: an epoch is then k, k, ..., k, (107 mod k).
  """
  n = min(config.steps_per_dispatch, epoch_end - step)
  every = config.checkpoint_every_steps  # 0: at epoch ends only
  return min(n, every - step % every) if every > 0 else n


def default_hooks(config) -> list[Hook]:
  """The hooks `train_and_evaluate` runs unless given others."""
  # Imported here: these modules build on this one (they subclass Hook).
  from mnist_jax import progress, report, summaries  # pylint: disable=g-import-not-at-top
  from mnist_jax import checkpointing  # pylint: disable=g-import-not-at-top
  # Checkpoints first: it may replace the state (resume) the others read.
  hooks = [checkpointing.CheckpointHook(config), summaries.SummaryHook()]
  if jax.process_index() == 0:  # one progress display per run, not per host
    hooks.append(progress.ProgressHook())
  if config.get('profile_steps', 0) > 0:
    hooks.append(progress.ProfileHook(config.profile_steps))
  if config.get('write_report', True):
    hooks.append(report.ReportHook())  # After SummaryHook: reads its files.
  return hooks


def enable_compilation_cache(cache_dir: str) -> str | None:
  """Turns on JAX's persistent compilation cache (faster warm starts).

  Args:
    cache_dir: '' = $XDG_CACHE_HOME/mnist_jax/jax_cache (~/.cache/...),
      'none' = off, else the folder (e.g. a bucket path on TPU VMs).

  Returns:
    The folder in use, or None when off. The first folder set in a process
    stays in use (JAX initialises the cache once).
  """
  if cache_dir == 'none':
    return None
  if not cache_dir:
    cache_dir = os.path.join(
        os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
        'mnist_jax', 'jax_cache')
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    # Cache every step/eval program, not only those that took > 1 s.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return jax.config.jax_compilation_cache_dir


def setup(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """Validates the config, loads the data and builds everything but state."""
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(config.get('compilation_cache_dir', ''))
  mesh = create_mesh()
  _check_divisible(config, mesh)
  data = input_pipeline.load(config)
  num_train = len(data.train)
  config_lib.validate_against_data(config, num_train)
  spe = steps_per_epoch(config, num_train)
  total_steps = config.num_epochs * spe
  if config.num_train_steps > 0:
    total_steps = min(total_steps, config.num_train_steps)
  model = models.create_model(config)
  root = jax.random.key(config.seed)
  return Context(
      config=config, workdir=workdir, mesh=mesh, model=model, data=data,
      learning_rate_fn=create_learning_rate_fn(config, num_train),
      steps_per_epoch=spe, total_steps=total_steps,
      eval_fn=make_eval_fn(model, mesh),
      eval_splits={name: device_eval_split(getattr(data, name),
                                           config.eval_batch_size, mesh)
                   for name in ('validation', 'test')},
      rngs={name: jax.random.fold_in(root, i) for name, i in
            (('init', _INIT), ('dropout', _DROPOUT), ('data', _DATA))})


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str,
    hooks: list[Hook] | None = None,
    on_epoch: Callable[[dict[str, Any]], bool | None] | None = None
) -> dict[str, Any]:
  """Trains the tutorial's CNN as configured and evaluates it every epoch.

  Args:
    config: the run's hyperparameters (see configs/default.py).
    workdir: where metrics.json, checkpoints and summaries go.
    hooks: what runs around training; default `default_hooks(config)`.
    on_epoch: called on process 0 with each epoch's record after its
      evaluation, before the hooks' `on_epoch_end`; returning True stops the
      run there: that epoch's checkpoint is saved and the result has
      `stopped_early: True` (sweeps' early stopping). After the last epoch
      it changes nothing.

  Returns:
    The metrics written to `<workdir>/metrics.json`: per-epoch records and the
    final validation and test metrics.
  """
  # TensorFlow (for summaries) is imported beside data loading and
  # compilation, with the GPUs hidden from it first.
  tf_setup.preload_in_background()
  ctx = setup(config, workdir)
  logging.info('Train %d / validation %d / test %d images; %d steps per epoch,'
               ' %d steps; devices: %s', len(ctx.data.train),
               len(ctx.data.validation), len(ctx.data.test),
               ctx.steps_per_epoch, ctx.total_steps, ctx.mesh.devices.tolist())
  hooks = default_hooks(config) if hooks is None else hooks
  state = put_replicated(
      create_train_state(config, ctx.model, ctx.learning_rate_fn,
                         ctx.rngs['init']), ctx.mesh)
  for hook in hooks:
    state = hook.on_train_start(ctx, state)

  result = None
  try:
    state, history = _train_loop(ctx, state, hooks, on_epoch)
    final = {k: v for k, v in history[-1].items()
             if k.startswith(('validation_', 'test_'))} if history else {}
    result = {'config': config.to_dict(), 'epochs': history, 'final': final,
              'step': int(state.step)}
    if ctx.stop_requested:  # pre-empted: saved by a hook, resumed on rerun
      result.update(final={}, stopped_early=True)
    elif jax.process_index() == 0:  # the same result on every process
      with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
        json.dump(result, f, indent=1)
      if final:
        print(f"Final test accuracy: {final['test_accuracy']:.2%}", flush=True)
  finally:
    for hook in hooks:
      hook.on_train_end(ctx, int(state.step) if result else -1, state, result)
  return result


def _train_loop(ctx: Context, state: TrainState, hooks: list[Hook],
                on_epoch=None):
  """Epochs of dispatches of steps, with evaluation at epoch ends."""
  config = ctx.config
  num_train = len(ctx.data.train)
  train_data = put_replicated(
      {'image': ctx.data.train.images, 'label': ctx.data.train.labels},
      ctx.mesh)
  from mnist_jax import parallel  # pylint: disable=g-import-not-at-top
  train_fn = parallel.select_train_fn(config, ctx.learning_rate_fn, num_train,
                                      ctx.mesh)
  permutation = jax.jit(
      functools.partial(input_pipeline.epoch_permutation,
                        num_examples=num_train),
      out_shardings=jax.NamedSharding(ctx.mesh, P()))

  history = list(ctx.history)
  first_step_of_run = int(state.step)
  step = int(state.step)
  while step < ctx.total_steps:
    epoch = step // ctx.steps_per_epoch
    epoch_end = min((epoch + 1) * ctx.steps_per_epoch, ctx.total_steps)
    perm = permutation(ctx.rngs['data'], epoch)
    t0 = time.perf_counter()
    first_step, merged, pending = step, None, []

    def drain(keep: int):
      nonlocal merged
      while len(pending) > keep:
        start, stacked = pending.pop(0)
        host = jax.device_get(stacked)
        losses = host.loss.total / host.loss.count
        if not np.all(np.isfinite(losses)):
          bad = start + 1 + int(np.argmin(np.isfinite(losses)))
          raise NonFiniteLossError(
              f'Training loss is {losses[bad - start - 1]} at step {bad}; '
              'stopping (lower the learning rate?). Last good checkpoint: '
              f'{ctx.last_good_checkpoint or "none"}.')
        if start == first_step_of_run:  # benchmarks/startup.py waits for it
          logging.info('First dispatch done: steps %d-%d.', start + 1,
                       start + len(losses))
        for hook in hooks:
          hook.on_metrics(ctx, start, host)
        part = metrics_lib.merge_stacked(host)
        merged = part if merged is None else merged.merge(part)

    while step < epoch_end:
      n = _chunk_length(config, step, epoch_end)
      state, stacked = train_fn(state, train_data, perm, ctx.rngs['dropout'],
                                num_steps=n)
      pending.append((step, stacked))
      step += n
      for hook in hooks:
        hook.on_steps(ctx, step, state)
      if ctx.stop_requested:
        return state, history
      drain(keep=1)  # the previous dispatch's metrics, while this one runs
    drain(keep=0)
    train_time = time.perf_counter() - t0
    record = {'epoch': epoch + 1, 'step': step,
              **metrics_lib.to_scalars(merged, 'train_'),
              'train_seconds': train_time,
              'images_per_second': (step - first_step) * config.batch_size
                                   / train_time}
    if (epoch + 1) % config.eval_every_epochs == 0 or step == ctx.total_steps:
      for name, split in ctx.eval_splits.items():
        record.update({f'{name}_{k}': v for k, v in
                       evaluate(ctx.eval_fn, state.params, split).items()})
    history.append(record)
    if jax.process_index() == 0:  # other processes hold the same numbers
      print(_epoch_line(record), flush=True)
      # Single-process only here: several processes would have to agree.
      # After the last epoch there is nothing left to stop.
      if (on_epoch is not None and on_epoch(dict(record))
          and step < ctx.total_steps):
        ctx.stop_requested = True  # the checkpoint hook saves this epoch
    for hook in hooks:
      hook.on_epoch_end(ctx, epoch + 1, step, state, record)
    if ctx.stop_requested:
      return state, history
  return state, history


def _epoch_line(r) -> str:
  line = (f"Epoch {r['epoch']:3d} step {r['step']:6d}: train loss "
          f"{r['train_loss']:.4f} acc {r['train_accuracy']:.2%}")
  if 'test_accuracy' in r:
    line += (f" | validation acc {r['validation_accuracy']:.2%} | test acc "
             f"{r['test_accuracy']:.2%}")
  return line + (f" | lr {r['train_learning_rate']:.3g} | "
                 f"{r['images_per_second']:.0f} img/s")
