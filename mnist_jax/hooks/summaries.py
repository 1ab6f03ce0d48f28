"""TensorBoard summaries: the tutorial's summaries/train and summaries/test.

`<workdir>/train`: the training metrics every `log_every_steps` steps, and
per epoch the per-layer sparsity and activation histograms of
`NUM_STATS_IMAGES` training images and three sample images; the HParams
once. `<workdir>/eval`: the test metrics under the same tags as training (one
chart), `validation_*`, and the per-layer sparsity of `NUM_STATS_IMAGES` test
images. Only the lead process writes event files."""

from __future__ import annotations

import functools
import glob
import os
from typing import Any

from absl import logging
from clu import parameter_overview
import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import config_lib
from mnist_jax import input_pipeline
from mnist_jax import metrics as metrics_lib
from mnist_jax import models
from mnist_jax import parallel
from mnist_jax import tf_setup
from mnist_jax.hooks import background
from mnist_jax.hooks import base
from mnist_jax.hooks import event_writer

# Histograms are drawn from a uniform random sample of at most this many values
# per end point: conv1 of a 512-image batch has 12.8M activations, and sending
# them all to the host and through TensorFlow's bucketing every epoch would
# cost seconds for a picture that is statistically the same.
MAX_HISTOGRAM_VALUES = 1 << 16
# Images per split whose end points give the per-epoch sparsity and
# histograms: conv1 alone then yields 3.2M values, and the epoch end spends
# a quarter of what a whole training batch would cost.
NUM_STATS_IMAGES = 128
NUM_SUMMARY_IMAGES = 3
# A stream of randomness of its own (the loop uses 0, 1, 2 of key(seed)).
_SUMMARY_STREAM = 100
# Writes queued for the background thread before `on_metrics` waits: a few
# epochs' worth, so the loop never waits while it writes one epoch's
# histograms.
_MAX_PENDING_WRITES = 64


def flatten_config(config) -> dict[str, Any]:
  """Config as {'data.source': 'idx', ...} with HParams-compatible values."""
  return {name: value if isinstance(value, (bool, int, float, str))
          else str(value) for name, value in config_lib.leaves(config).items()}


def make_layer_stats_fn(model: models.CNN,
                        max_histogram_values: int = MAX_HISTOGRAM_VALUES):
  """Returns jitted `stats(variables, train_images, test_images, rng)`.

  Args:
    model: the CNN.
    max_histogram_values: histogram sample size per end point.

  Returns:
    A function of uint8 image batches returning
    `{'train_sparsity': {layer: frac}, 'test_sparsity': {layer: frac},
    'histograms': {layer: sampled values}}`; the training batch runs with
    dropout (`train=True`, keyed by `rng`), the test batch without.
  """

  def stats(variables, train_images, test_images, rng):
    dropout_rng, sample_rng = jax.random.split(rng)
    _, train_points = models.end_points(
        model, variables, input_pipeline.normalize(train_images), train=True,
        rngs={'dropout': dropout_rng})
    _, test_points = models.end_points(
        model, variables, input_pipeline.normalize(test_images), train=False)
    histograms = {}
    # Every end point the model sows, in its order: a layer added, renamed
    # or removed in models.py is summarised as it is.
    for i, name in enumerate(train_points):
      flat = train_points[name].reshape(-1).astype(jnp.float32)
      if flat.size > max_histogram_values:
        idx = jax.random.randint(jax.random.fold_in(sample_rng, i),
                                 (max_histogram_values,), 0, flat.size)
        flat = flat[idx]
      histograms[name] = flat
    sparsity = lambda points: {n: jnp.mean(points[n] == 0)  # pylint: disable=g-long-lambda
                               for n in points}
    return {'train_sparsity': sparsity(train_points),
            'test_sparsity': sparsity(test_points),
            'histograms': histograms}

  return jax.jit(stats)


class SummaryHook(base.Hook):
  """Writes every TensorBoard summary of the run (see the module docstring).

  The loop's thread only merges the host-side metrics it already fetched and
  dispatches the per-epoch statistics; creating the writers, fetching the
  statistics, writing and flushing happen in order on a `Background` thread.
  `wait` returns once all of it is written; `on_train_end` closes the files.
  """

  order = 10  # before ReportHook, which reads the event files it closes

  def __init__(self, print_overview: bool = True):
    self.print_overview = print_overview
    self._train_writer = None
    self._eval_writer = None
    self._pending = None  # (workdir, just_logging, hparams) until first use
    self._window = None  # TrainMetrics merged since the last write.
    self._stats_fn = None
    self._stats_key = None
    self._statistics = None  # (epoch, statistics) dispatched at its end
    self._background = None

  # The writers are made at their first use, on the background thread:
  # clu's metric_writers imports TensorFlow, which `train_and_evaluate`
  # imports in the background meanwhile (tf_setup.preload_in_background).
  @property
  def train_writer(self):
    self._make_writers()
    return self._train_writer

  @train_writer.setter
  def train_writer(self, writer):
    self._train_writer = writer

  @property
  def eval_writer(self):
    self._make_writers()
    return self._eval_writer

  @eval_writer.setter
  def eval_writer(self, writer):
    self._eval_writer = writer

  def _make_writers(self):
    if self._pending is None:
      return
    workdir, just_logging, hparams = self._pending
    self._pending = None
    if tf_setup.hide_accelerators_from_tf():
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      make = functools.partial(metric_writers.create_default_writer,
                               just_logging=just_logging)
    else:  # No TensorFlow (e.g. a JAX-only GPU image): the same event files.
      make = lambda logdir: event_writer.EventWriter(  # pylint: disable=g-long-lambda
          None if just_logging else logdir)
    # The HParams once per run, not again by each resumption of it.
    resumed = glob.glob(os.path.join(workdir, 'train', 'events.out.tfevents.*'))
    # A writer set by hand (e.g. by a test) stays.
    if self._train_writer is None:
      self._train_writer = make(os.path.join(workdir, 'train'))
    if self._eval_writer is None:
      self._eval_writer = make(os.path.join(workdir, 'eval'))
    if not resumed:
      self._train_writer.write_hparams(hparams)

  def _submit(self, fn, *args) -> None:
    if self._background is None:
      self._background = background.Background(
          'summaries', max_pending=_MAX_PENDING_WRITES)
    self._background.submit(fn, *args)

  def wait(self) -> None:
    """Returns when everything submitted so far is written (not flushed)."""
    if self._background is not None:
      self._background.wait()

  # ------------------------------------------------------------------ start
  def on_train_start(self, run, state):
    self._pending = (run.workdir, not parallel.is_lead(),
                     flatten_config(run.config))
    if parallel.is_lead():
      overview = parameter_overview.get_parameter_overview(state.params)
      if self.print_overview:
        # Printed (not only logged) so it is seen whatever the absl log setup.
        print(overview, flush=True)
      else:  # e.g. a sweep's points: in each one's log.txt, not the console
        logging.info('Parameters:\n%s', overview)
    self._stats_fn = make_layer_stats_fn(run.model)
    self._stats_key = jax.random.fold_in(jax.random.key(run.config.seed),
                                         _SUMMARY_STREAM)
    self._window = None

  # ------------------------------------------------------------------ steps
  def on_metrics(self, run, first_step, metrics):
    every = run.config.log_every_steps
    n = len(metrics.loss.total)
    steps = first_step + 1 + np.arange(n)
    ends = np.nonzero((steps % every == 0) | (steps == run.total_steps))[0]
    start = 0
    for end in list(ends) + [None]:
      stop = n if end is None else end + 1
      if stop > start:
        part = metrics_lib.merge_stacked(metrics, start, stop)
        self._window = part if self._window is None else self._window.merge(
            part)
      if end is not None:
        self._submit(self._write_train_scalars, int(steps[end]),
                     metrics_lib.to_scalars(self._window))
        self._window = None
      start = stop

  def _write_train_scalars(self, step: int, scalars) -> None:
    self.train_writer.write_scalars(step, scalars)

  def on_stop(self, run, step, state, reason):
    del reason
    if self._window is not None:  # steps since the last write: not lost
      self._submit(self._write_train_scalars, step,
                   metrics_lib.to_scalars(self._window))
      self._window = None

  # ------------------------------------------------------------- epoch end
  def on_epoch_dispatched(self, run, epoch, step, state):
    # Dispatched here, before the evaluation and before the next epoch's
    # steps take the parameters' buffers (donation); fetched and written on
    # the background thread.
    self._statistics = (epoch, self._epoch_statistics(run, epoch,
                                                      state.variables))

  def on_epoch_end(self, run, epoch, step, state, record):
    evaluated = {k: v for k, v in record.items()
                 if k.startswith(('test_', 'validation_'))}
    scalars = {k[len('test_'):]: v for k, v in evaluated.items()
               if k.startswith('test_')}
    scalars.update({k: v for k, v in evaluated.items()
                    if k.startswith('validation_')})
    taken, self._statistics = self._statistics, None
    stats, images = (taken[1] if taken and taken[0] == epoch else
                     self._epoch_statistics(run, epoch, state.variables))
    self._submit(self._write_epoch, step, scalars, stats, images)

  def _epoch_statistics(self, run, epoch, variables):
    """(device-side layer statistics, sample images) of epoch `epoch`."""
    seed = run.config.seed
    host_rng = np.random.default_rng([seed, _SUMMARY_STREAM, epoch])
    train, test = run.data.train, run.data.test
    batch = min(NUM_STATS_IMAGES, len(train), len(test))
    train_idx = np.sort(host_rng.choice(len(train), batch, replace=False))
    test_idx = np.sort(host_rng.choice(len(test), batch, replace=False))
    rng = jax.random.fold_in(self._stats_key, epoch)
    stats = parallel.prefetch_to_host(self._stats_fn(
        variables, train.images[train_idx], test.images[test_idx], rng))
    shown = host_rng.choice(len(train), NUM_SUMMARY_IMAGES, replace=False)
    return stats, train.images[shown]

  def _write_epoch(self, step, eval_scalars, stats, images) -> None:
    if eval_scalars:
      self.eval_writer.write_scalars(step, eval_scalars)
    stats = jax.device_get(stats)
    self.train_writer.write_scalars(
        step, {f'sparsity/{k}': float(v)
               for k, v in stats['train_sparsity'].items()})
    self.eval_writer.write_scalars(
        step, {f'sparsity/{k}': float(v)
               for k, v in stats['test_sparsity'].items()})
    event_writer.write_histograms(
        self.train_writer, step,
        {f'activations/{k}': v for k, v in stats['histograms'].items()})
    self.train_writer.write_images(step, {'images': images})
    self.train_writer.flush()
    self.eval_writer.flush()

  # -------------------------------------------------------------------- end
  def on_train_end(self, run, step, state, result):
    wrote = self._background is not None
    try:
      if wrote:
        self._background.close()
    finally:
      self._background = None
      if self._pending is not None and (result is None or not wrote):
        # Nothing to write (failed before it, or nothing trained): no files.
        self._pending = None
      for writer in (self.train_writer, self.eval_writer):
        if writer is not None:
          writer.flush()
          writer.close()
      self.train_writer = self.eval_writer = None
    logging.info('Summaries written to %s/{train,eval}', run.workdir)
