"""Prediction on image files: conversion to MNIST form and the predictions."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from mnist_jax import models
from mnist_jax import predict
from mnist_jax import steps
from mnist_jax.errors import UserError


def digit_one(h=120, w=90, top=20, left=30, ink=0, paper=255):
  """A dark vertical stroke (a '1') off-centre on light paper."""
  img = np.full((h, w), paper, np.uint8)
  img[top:top + 60, left:left + 10] = ink
  return img


def centre_of_mass(img):
  img = img.astype(np.float64)
  ys, xs = np.indices(img.shape)
  return (ys * img).sum() / img.sum(), (xs * img).sum() / img.sum()


def test_dark_on_light_is_inverted_boxed_and_centred():
  out = predict.to_mnist(digit_one())
  assert out.shape == (28, 28) and out.dtype == np.uint8
  assert out.max() == 255
  # White on black: the border is background (0), the digit bright.
  assert out[0].max() == 0 and out[:, 0].max() == 0
  rows, cols = np.nonzero(out)
  assert rows.max() - rows.min() + 1 <= 20 and cols.max() - cols.min() + 1 <= 20
  assert rows.max() - rows.min() + 1 >= 19  # Long side scaled to ~20.
  cy, cx = centre_of_mass(out)
  # Where MNIST's centres of mass are (pixel 14, not 13.5).
  assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


def test_an_mnist_form_digit_survives_scanning():
  """Upscaled and printed dark on light, an MNIST-form digit converts back to
  itself (the conversion puts digits where MNIST has them)."""
  ring = np.zeros((80, 60), np.uint8)
  ys, xs = np.indices(ring.shape)
  r = np.hypot((ys - 45) / 30, (xs - 28) / 22)
  ring[(r > 0.7) & (r < 1.0)] = 255  # a '0'
  mnist = predict.to_mnist(ring)
  scan = np.asarray(Image.fromarray(255 - mnist).resize(
      (140, 140), Image.Resampling.BILINEAR))
  again = predict.to_mnist(scan)
  assert np.corrcoef(mnist.ravel(), again.ravel())[0, 1] > 0.95


def test_light_on_dark_keeps_polarity():
  dark_paper = predict.to_mnist(digit_one(ink=230, paper=10))
  light_paper = predict.to_mnist(digit_one())
  # Same digit, either polarity: the same MNIST image.
  assert np.abs(dark_paper.astype(int) - light_paper.astype(int)).max() <= 2


def test_blank_image_is_rejected():
  with pytest.raises(predict.ImageError, match='no digit'):
    predict.to_mnist(np.full((50, 50), 200, np.uint8))


@pytest.mark.parametrize('fmt,mode', [('PNG', 'RGB'), ('JPEG', 'RGB'),
                                      ('PNG', 'RGBA'), ('PNG', 'L')])
def test_files_of_any_colour_mode_load(tmp_path, fmt, mode):
  gray = digit_one()
  img = Image.fromarray(gray).convert(mode)
  if mode == 'RGBA':  # Transparent paper, opaque ink: composited on white.
    rgba = np.asarray(img).copy()
    rgba[..., 3] = np.where(gray < 128, 255, 0)
    rgba[..., :3] = np.where(gray[..., None] < 128, 0, 0)
    img = Image.fromarray(rgba, 'RGBA')
  path = tmp_path / f'digit.{fmt.lower()}'
  img.save(path, fmt)
  out = predict.load_digit(str(path))
  reference = predict.to_mnist(gray)
  assert out.shape == (28, 28)
  assert np.abs(out.astype(int) - reference.astype(int)).mean() < 8


@pytest.fixture(scope='module')
def model_params():
  model = models.create_model(default.get_config())
  return model, {'params': jax.device_get(
      models.init_params(model, jax.random.key(0)))}


def test_predict_top3_and_unreadable_files(tmp_path, model_params):
  model, params = model_params
  good = tmp_path / 'one.png'
  Image.fromarray(digit_one()).save(good)
  bad = tmp_path / 'notes.png'
  bad.write_text('not an image')
  missing = tmp_path / 'missing.jpg'
  results = predict.predict(params, model, [str(bad), str(good), str(missing),
                                            str(good)])
  assert [r.path for r in results] == [str(bad), str(good), str(missing),
                                       str(good)]
  assert 'cannot read image' in results[0].error and results[0].digit is None
  assert 'cannot read image' in results[2].error
  r = results[1]
  assert r.error is None
  logits = steps.logits_of(model, params, predict.load_digit(str(good))[None])
  probs = np.asarray(jax.nn.softmax(logits[0]))
  assert r.digit == int(probs.argmax())
  assert [d for d, _ in r.top3] == list(np.argsort(-probs)[:3])
  assert [p for _, p in r.top3] == pytest.approx(np.sort(probs)[::-1][:3],
                                                 rel=1e-5)
  assert str(r).startswith(f'{good}: {r.digit}  (top 3: ')
  assert [d for d, _ in results[3].top3] == [d for d, _ in r.top3]


def test_run_prints_errors_naming_the_file(tmp_path, monkeypatch,
                                           model_params):
  model, params = model_params
  del model
  monkeypatch.setattr(predict, 'restore_variables', lambda c, w: (7, params))
  good = tmp_path / 'a.jpg'
  Image.fromarray(digit_one()).convert('RGB').save(good)
  out, err = io.StringIO(), io.StringIO()
  code = predict.run(default.get_config(), str(tmp_path),
                     [str(good), str(tmp_path / 'nope.png')], out, err)
  assert code == 2
  assert f'{good}: ' in out.getvalue() and 'top 3' in out.getvalue()
  assert err.getvalue().startswith(f'Error: {tmp_path / "nope.png"}: cannot '
                                   'read image')
  with pytest.raises(UserError, match='needs images'):
    predict.run(default.get_config(), str(tmp_path), [], out, err)


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match='no checkpoints'):
    predict.restore_variables(default.get_config(), str(tmp_path))
