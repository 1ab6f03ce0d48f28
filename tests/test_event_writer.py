"""Training without TensorFlow: TensorBoard's own event writer writes what
clu's TensorFlow writer writes, and a whole run, the TFDS error and a sweep's
HParams work with TensorFlow unimportable (as on JAX-only GPU and TPU
images)."""

import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import ROOT
from conftest import read_events
from mnist_jax.hooks import event_writer


def _write_all(writer, images, acts):
  writer.write_hparams({'batch_size': 32, 'data.source': 'idx', 'lr': 0.5})
  writer.write_scalars(3, {'loss': 0.25, 'accuracy': 0.875})
  writer.write_scalars(7, {'loss': 0.125})
  writer.write_histograms(7, {'activations/conv1': acts})
  writer.write_images(7, {'images': images})
  writer.write_texts(7, {'note': 'hello'})
  writer.flush()
  writer.close()


def test_same_records_as_clus_tensorflow_writer(tmp_path):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.random((3, 28, 28, 1)).astype(np.float32)
  acts = np.maximum(rng.normal(size=(4, 14, 14, 32)), 0).astype(np.float32)
  _write_all(metric_writers.SummaryWriter(str(tmp_path / 'tf')), images, acts)
  _write_all(event_writer.EventWriter(str(tmp_path / 'tb')), images, acts)
  ref, got = read_events(str(tmp_path / 'tf')), read_events(str(tmp_path / 'tb'))

  assert got.keys() == ref.keys()
  for tag in ref:
    assert got[tag].keys() == ref[tag].keys(), tag
    for step in ref[tag]:
      assert got[tag][step][0] == ref[tag][step][0], (tag, step)  # plugin
  for tag, step in (('loss', 3), ('loss', 7), ('accuracy', 3)):
    assert got[tag][step][1].dtype == ref[tag][step][1].dtype == np.float32
    assert got[tag][step][1] == ref[tag][step][1]
  assert got['note'][7][1] == ref['note'][7][1] == b'hello'

  hist, ref_hist = got['activations/conv1'][7][1], ref['activations/conv1'][7][1]
  assert hist.shape == ref_hist.shape == (30, 3)
  assert hist[:, 2].sum() == ref_hist[:, 2].sum() == acts.size
  assert hist[0, 0] == pytest.approx(ref_hist[0, 0])  # the data's min ...
  assert hist[-1, 1] == pytest.approx(ref_hist[-1, 1])  # ... and max
  # Zeros (the ReLU's) land in the first bucket in both.
  assert hist[0, 2] == ref_hist[0, 2] >= np.sum(acts == 0)

  png, ref_png = got['images'][7][1], ref['images'][7][1]
  assert list(png[:2]) == list(ref_png[:2]) == [b'28', b'28']
  for a, b in zip(png[2:], ref_png[2:]):
    pixels = np.asarray(Image.open(io.BytesIO(a)))
    ref_pixels = np.asarray(Image.open(io.BytesIO(b)))
    assert pixels.shape == (28, 28)
    # TensorFlow scales by 255 and rounds (saturate_cast): off by one at most.
    assert np.abs(pixels.astype(int) - ref_pixels.reshape(28, 28)).max() <= 1


def test_numpy_histograms_through_clus_writers_match_tensorflows(tmp_path):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  acts = np.maximum(np.random.default_rng(1).normal(size=(8, 14, 14, 32)),
                    0).astype(np.float32)
  ref_writer = metric_writers.SummaryWriter(str(tmp_path / 'ref'))
  ref_writer.write_histograms(7, {'a': acts})  # bucketed by TensorFlow
  ref_writer.close()
  writers = {'tf': metric_writers.create_default_writer(str(tmp_path / 'tf')),
             'tb': event_writer.EventWriter(str(tmp_path / 'tb'))}
  for writer in writers.values():
    event_writer.write_histograms(writer, 7, {'a': acts})
    writer.close()
  plugin, ref = read_events(str(tmp_path / 'ref'))['a'][7]
  assert plugin == 'histograms' and ref.shape == (30, 3)
  for name in writers:
    got_plugin, got = read_events(str(tmp_path / name))['a'][7]
    assert got_plugin == 'histograms', name
    assert got.shape == ref.shape, name
    np.testing.assert_allclose(got[:, :2], ref[:, :2], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[:, 2], ref[:, 2])
    assert got[:, 2].sum() == acts.size, name


def test_histogram_buckets_edge_cases():
  assert event_writer.histogram_buckets([], 30).shape == (0, 3)
  single = event_writer.histogram_buckets(np.full(5, 2.0), 30)
  assert single.tolist() == [[1.5, 2.5, 5.0]]
  with_nan = event_writer.histogram_buckets([0.0, np.nan, 1.0, np.inf], 4)
  assert with_nan[:, 2].sum() == 2


def test_logging_only_writer_makes_no_files(tmp_path):
  writer = event_writer.EventWriter(None)
  _write_all(writer, np.zeros((1, 4, 4, 1)), np.zeros(3))
  assert not os.listdir(tmp_path)


_NO_TF_RUN = r'''
import sys
sys.modules['tensorflow'] = None  # as if not installed: import fails
sys.path.insert(0, sys.argv[3])
from conftest import tiny_config_for
from mnist_jax import tf_setup, train
config = tiny_config_for(sys.argv[1])
config.num_epochs = 1
config.checkpoint_every_steps = 0
result = train.train_and_evaluate(config, sys.argv[2])
assert 'tensorflow' not in {m.split('.')[0] for m in sys.modules
                            if sys.modules[m] is not None}
print('available', tf_setup.hide_accelerators_from_tf())
print('accuracy', result['final']['test_accuracy'])
'''


@pytest.mark.slow
def test_training_without_tensorflow_writes_the_same_summaries(idx_dir,
                                                               tmp_path):
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-c', _NO_TF_RUN, idx_dir, workdir,
       os.path.join(ROOT, 'tests')], env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'available False' in proc.stdout
  train_events = read_events(os.path.join(workdir, 'train'))
  eval_events = read_events(os.path.join(workdir, 'eval'))
  spe = 18  # 600 training images, batch 32
  assert sorted(train_events['loss']) == [5, 10, 15, spe]
  assert train_events['loss'][spe][0] == 'scalars'
  assert train_events['images'][spe][0] == 'images'
  assert train_events['activations/conv1'][spe][0] == 'histograms'
  assert any(p == 'hparams' for s in train_events.values()
             for p, _ in s.values())
  accuracy = float(proc.stdout.split('accuracy ')[1].split()[0])
  assert eval_events['accuracy'][spe][1] == pytest.approx(accuracy)
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f)['final']['test_accuracy'] == pytest.approx(accuracy)
  # The report reads the same files: its learning curves have the losses.
  assert os.path.exists(os.path.join(workdir, 'report', 'report.md'))


_NO_TF_TFDS = r'''
import sys
sys.modules['tensorflow'] = None
from configs import default
from mnist_jax import input_pipeline
config = default.get_config()
config.data.cache_dir = 'none'
config.data.dir = sys.argv[1]
try:
  input_pipeline.load(config)
except input_pipeline.DataError as e:
  print('DataError:', e)
'''


def test_tfds_source_without_tensorflow_says_to_use_idx(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', _NO_TF_TFDS, str(tmp_path)],
                        env=env, capture_output=True, text=True, timeout=120,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  line, = [l for l in proc.stdout.splitlines() if l.startswith('DataError')]
  assert 'TensorFlow, which is not importable here' in line
  assert '--config.data.source=idx' in line


_SWEEP_HPARAMS = r'''
import sys
if sys.argv[2] == 'no-tf':
  sys.modules['tensorflow'] = None
from mnist_jax import sweep_results
out = sys.argv[1]
points = [{'initial_learning_rate': 0.001}, {'initial_learning_rate': 0.01,
                                              'batch_size': 256}]
sweep_results.write_hparams_config(out, points)
sweep_results.write_point_hparams(out + '/point', points[1], {
    'best_validation_accuracy': 0.75, 'test_accuracy': 0.5,
    'wall_seconds': 3.0, 'steps': 12})
'''


def _hparams_records(logdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import metadata  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  content = acc.PluginTagToContent('hparams')
  out = {}
  if metadata.EXPERIMENT_TAG in content:
    experiment = metadata.parse_experiment_plugin_data(
        content[metadata.EXPERIMENT_TAG])
    out['columns'] = [(h.name,
                       [v.number_value for v in h.domain_discrete.values])
                      for h in experiment.hparam_infos]
    out['metrics'] = [m.name.tag for m in experiment.metric_infos]
  if metadata.SESSION_START_INFO_TAG in content:
    info = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    out['session'] = {k: v.number_value for k, v in info.hparams.items()}
    out['best'] = float(tensor_util.make_ndarray(
        acc.Tensors('sweep/best_validation_accuracy')[-1].tensor_proto))
  return out


def test_sweep_hparams_without_tensorflow_match_the_tensorflow_ones(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  got = {}
  for mode in ('tf', 'no-tf'):
    out = str(tmp_path / mode)
    proc = subprocess.run([sys.executable, '-c', _SWEEP_HPARAMS, out, mode],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got[mode] = (_hparams_records(out), _hparams_records(out + '/point'))
  assert got['no-tf'] == got['tf']
  experiment, point = got['tf']
  assert experiment['columns'] == [('initial_learning_rate', [0.001, 0.01]),
                                   ('batch_size', [256.0])]
  assert experiment['metrics'] == ['sweep/best_validation_accuracy',
                                   'sweep/test_accuracy', 'sweep/wall_seconds']
  assert point['session'] == {'initial_learning_rate': 0.01,
                              'batch_size': 256.0}
  assert point['best'] == 0.75
