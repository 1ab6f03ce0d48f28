"""The report: valid PNGs of sensible size and a report.md with the numbers."""

import os
import types
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config_for
from mnist_jax import input_pipeline
from mnist_jax import models
from mnist_jax import report
from mnist_jax import steps
from mnist_jax.hooks import report as report_hook


@pytest.fixture(scope='module')
def written(idx_dir, tmp_path_factory):
  config = tiny_config_for(idx_dir)
  workdir = str(tmp_path_factory.mktemp('report'))
  model = models.create_model(config)
  params = models.init_params(model, jax.random.key(0))
  test = input_pipeline.load(config).test
  # No event files here: the curves come from metrics.json's epoch records.
  history = {'step': 36, 'final': {'validation_accuracy': 0.125,
                                   'validation_loss': 2.25},
             'epochs': [{'step': 18, 'train_loss': 2.0, 'train_accuracy': 0.2,
                         'validation_loss': 2.5, 'validation_accuracy': 0.1,
                         'test_loss': 2.4, 'test_accuracy': 0.11},
                        {'step': 36, 'train_loss': 1.0, 'train_accuracy': 0.6,
                         'validation_loss': 2.25, 'validation_accuracy': 0.125,
                         'test_loss': 2.3, 'test_accuracy': 0.12}]}
  out = report.write_report(workdir, config, {'params': params}, test=test,
                            history=history)
  logits = steps.logits_of(model, {'params': params}, test.images)
  return out, test, logits, history


@pytest.mark.parametrize('name,min_size', [
    ('learning_curves.png', (800, 300)), ('confusion_matrix.png', (500, 500)),
    ('misclassified.png', (800, 500))])
def test_pngs_are_valid_images_of_sensible_size(written, name, min_size):
  path = os.path.join(written[0], name)
  with Image.open(path) as img:
    img.verify()
  with Image.open(path) as img:
    assert img.format == 'PNG'
    assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
    assert img.size[0] <= 2000 and img.size[1] <= 2000
    # Not blank: a plot has many distinct colours.
    assert len(np.unique(np.asarray(img.convert('L')))) > 20


def test_report_md_carries_the_numbers(written):
  out, test, logits, _ = written
  accuracy = float(np.mean(logits.argmax(-1) == test.labels))
  mistakes = int(np.sum(logits.argmax(-1) != test.labels))
  loss = float(np.mean(steps.cross_entropy(logits, test.labels)))
  with open(os.path.join(out, 'report.md')) as f:
    md = f.read()
  assert f'| test_accuracy | {accuracy:.2%} |' in md
  assert f'| test_loss | {loss:.4g} |' in md
  assert '| validation_accuracy | 12.50% |' in md
  assert f'{len(test) - mistakes} of {len(test)} correct, {mistakes} mistakes' in md
  assert 'Trained for 36 steps.' in md
  assert 'batch_size: 32' in md  # The config.
  for name in ('learning_curves.png', 'confusion_matrix.png',
               'misclassified.png'):
    assert f']({name})' in md


def test_curves_fall_back_on_metrics_json_records(written):
  curves = report.learning_curves(written[0], written[3])
  assert list(curves['train']['loss'][1]) == [2.0, 1.0]
  assert list(curves['validation']['accuracy'][1]) == [0.1, 0.125]
  assert list(curves['test']['loss'][0]) == [18, 36]


def test_confusion_matrix_counts():
  cm = report.confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])


def test_misclassified_orders_by_confidence(tmp_path, monkeypatch):
  probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.05, 0.95], [0.4, 0.6]])
  labels = np.array([0, 0, 0, 1])
  shown = []
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  real_subplot = Figure.add_subplot

  def add_subplot(fig, *args, **kwargs):
    ax = real_subplot(fig, *args, **kwargs)
    real_title = ax.set_title
    ax.set_title = lambda t, **kw: (shown.append(t), real_title(t, **kw))
    return ax

  monkeypatch.setattr(Figure, 'add_subplot', add_subplot)
  images = np.zeros((4, 28, 28, 1), np.uint8)
  n = report.plot_misclassified(images, labels, probs,
                                str(tmp_path / 'm.png'))
  assert n == 2
  assert shown == ['true 0 / pred 1\n95.0%', 'true 0 / pred 1\n70.0%']



def test_a_stopped_run_writes_no_report(tmp_path):
  """A pre-empted run resumes: no report in its grace time, and the last
  completed run's report (here a stand-in) stays until the run ends."""
  os.makedirs(tmp_path / 'report')
  (tmp_path / 'report' / 'report.md').write_text('the last run\'s')
  run = types.SimpleNamespace(workdir=str(tmp_path), config=None, data=None)
  report_hook.ReportHook().on_train_end(
      run, 5, None, {'stopped_early': True, 'stop_reason': 'SIGTERM',
                     'epochs': [], 'final': {}, 'step': 5})
  assert os.listdir(tmp_path / 'report') == ['report.md']
  assert (tmp_path / 'report' / 'report.md').read_text() == "the last run's"


def test_curves_of_a_run_without_any_are_drawn_without_a_warning(tmp_path):
  empty = {split: {} for split in report.SPLITS}
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # matplotlib's "No artists with labels"
    report.plot_learning_curves(empty, str(tmp_path / 'curves.png'))
  assert os.path.getsize(tmp_path / 'curves.png')
