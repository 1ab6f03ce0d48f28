"""TensorBoard event files without TensorFlow.

clu's `SummaryWriter` writes through `tf.summary`, so `clu.metric_writers`
does not import where TensorFlow is missing, as on many GPU and TPU images
that carry JAX alone. `EventWriter` has the methods of clu's `MetricWriter`
that the summaries hook calls and writes the same TensorBoard 2 records
(tensor summaries tagged with the scalars, histograms, images, text and
hparams plugins) through the `tensorboard` package's own pure-Python file
writer: the same dashboards and `report.read_scalars` read them.
"""

from __future__ import annotations

import functools
import io
import os
import time
from typing import Any, Mapping

from absl import logging
import numpy as np
from PIL import Image

# The histogram buckets of `tf.summary.histogram`'s default.
NUM_HISTOGRAM_BUCKETS = 30


class EventWriter:
  """Writes scalars, histograms, images, texts and hparams to `logdir`.

  With `logdir=None` (a non-lead process, or clu's `just_logging`) it only
  logs the scalars, as clu's `LoggingWriter` does.
  """

  def __init__(self, logdir: str | None):
    # Imported here: only runs without TensorFlow need TensorBoard's writer.
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
    from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._make_tensor = tensor_util.make_tensor_proto
    self._logdir = logdir
    self._writer = None
    if logdir is not None:
      os.makedirs(logdir, exist_ok=True)
      self._writer = event_file_writer.EventFileWriter(logdir)

  # ---------------------------------------------------------------- records
  def _write(self, step: int, values) -> None:
    if self._writer is None:
      return
    summary = self._summary_pb2.Summary(value=list(values))
    self._writer.add_event(self._event_pb2.Event(
        step=int(step), wall_time=time.time(), summary=summary))

  def _value(self, tag: str, tensor, plugin: str, content: bytes = b''):
    metadata = self._summary_pb2.SummaryMetadata(
        plugin_data=self._summary_pb2.SummaryMetadata.PluginData(
            plugin_name=plugin, content=content))
    return self._summary_pb2.Summary.Value(
        tag=tag, metadata=metadata, tensor=self._make_tensor(tensor))

  # --------------------------------------------------------- MetricWriter API
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if self._writer is None:
      logging.info('[%d] %s', step, ', '.join(
          f'{k}={float(v):.6g}' for k, v in scalars.items()))
      return
    self._write(step, (self._value(k, np.float32(v), 'scalars')
                       for k, v in scalars.items()))

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    values = []
    for tag, array in arrays.items():
      buckets = (num_buckets or {}).get(tag) or NUM_HISTOGRAM_BUCKETS
      values.append(self._value(tag, histogram_buckets(array, buckets),
                                'histograms'))
    self._write(step, values)

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    """Raw tensors, each with its `SummaryMetadata` (a proto or its bytes),
    as clu's `write_summaries`."""
    if self._writer is None:
      return
    out = []
    for tag, value in values.items():
      md = (metadata or {}).get(tag)
      if isinstance(md, bytes):
        md = self._summary_pb2.SummaryMetadata.FromString(md)
      out.append(self._summary_pb2.Summary.Value(
          tag=tag, metadata=md, tensor=self._make_tensor(np.asarray(value))))
    self._write(step, out)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      if batch.ndim == 3:
        batch = batch[None]
      h, w = batch.shape[1:3]
      encoded = [str(w).encode(), str(h).encode()]
      encoded += [encode_png(image) for image in batch]
      values.append(self._value(tag, np.array(encoded, dtype=object),
                                'images'))
    self._write(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._write(step, (self._value(k, np.array(v.encode(), dtype=object),
                                   'text')
                       for k, v in texts.items()))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    # Pure protos (TensorBoard's own tf stub): no TensorFlow needed.
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=g-import-not-at-top
    self.write_summary_proto(0, summary_v2.hparams_pb(dict(hparams)))

  def write_summary_proto(self, step: int, summary) -> None:
    """Writes a ready `Summary` proto (e.g. `summary_v2.hparams_config_pb`)."""
    if self._writer is not None:
      self._writer.add_event(self._event_pb2.Event(
          step=int(step), wall_time=time.time(), summary=summary))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def write_histograms(writer, step: int, arrays: Mapping[str, Any],
                     num_buckets: int = NUM_HISTOGRAM_BUCKETS) -> None:
  """Histograms through any clu `MetricWriter`, bucketed here in numpy.

  clu's TensorFlow writer buckets with TensorFlow ops: ~9 ms per histogram of
  65,536 values, against ~1 ms here. The records are those of
  `write_histograms`: [buckets, 3] tensors of TensorBoard's histogram plugin.
  """
  md = _histogram_metadata()
  writer.write_summaries(
      step, {k: histogram_buckets(v, num_buckets) for k, v in arrays.items()},
      metadata={k: md for k in arrays})


@functools.lru_cache(maxsize=1)
def _histogram_metadata() -> bytes:
  # Imported at first use, as in `EventWriter`: TensorBoard's protos take
  # ~40 ms to import, off the start-up's path.
  from tensorboard.plugins.histogram import metadata  # pylint: disable=g-import-not-at-top
  return metadata.create_summary_metadata(
      display_name=None, description=None).SerializeToString()


def histogram_buckets(values, num_buckets: int) -> np.ndarray:
  """[num_buckets, 3] (left edge, right edge, count): TensorBoard 2's layout,
  uniform buckets over [min, max] as `tf.summary.histogram` makes them."""
  values = np.asarray(values, np.float64).ravel()
  values = values[np.isfinite(values)]
  if values.size == 0:
    return np.zeros((0, 3), np.float64)
  lo, hi = float(values.min()), float(values.max())
  if lo == hi:  # one bucket of width 1 around the single value
    return np.array([[lo - 0.5, hi + 0.5, values.size]], np.float64)
  counts, edges = np.histogram(values, bins=num_buckets, range=(lo, hi))
  return np.stack([edges[:-1], edges[1:], counts], axis=1).astype(np.float64)


def encode_png(image) -> bytes:
  """PNG of an [H, W, C] image: floats in [0, 1] (as `tf.summary.image`
  takes them) or uint8; C is 1, 3 or 4."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  if image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()
