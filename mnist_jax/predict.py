"""`--mode predict`: classify your own digit images with a trained model.

`to_mnist` prepares any PNG/JPEG the way MNIST's digits were: grayscale,
white ink on black (a light background is inverted), contrast stretched, the
digit scaled into a 20x20 box and centred by its centre of mass at (14, 14).
A file that cannot be read or holds no digit gets an error naming it; the
other files are still predicted.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from mnist_jax import checkpointing
from mnist_jax import models
from mnist_jax import steps
from mnist_jax.errors import UserError

BORDER_FRACTION = 0.1
INK_THRESHOLD = 0.1
DIGIT_BOX = 20  # MNIST fits each digit in a 20x20 box inside 28x28.
# Where MNIST's centres of mass are, in pixel indices: measured over the
# training set, mean (14.00, 14.01); not 13.5, the geometric centre. One pixel
# off matters for thin strokes.
CENTRE = 14.0


class ImageError(UserError):
  """An image file that cannot be read or holds no digit."""


@dataclasses.dataclass
class Prediction:
  """The result for one image: `digit` and `top3` [(digit, prob)], or `error`."""
  path: str
  digit: int | None = None
  top3: list[tuple[int, float]] | None = None
  error: str | None = None

  def __str__(self) -> str:
    if self.error:
      return f'{self.path}: error: {self.error}'
    top = ', '.join(f'{d}: {p:.1%}' for d, p in self.top3)
    return f'{self.path}: {self.digit}  (top 3: {top})'


def to_mnist(gray: np.ndarray) -> np.ndarray:
  """Converts a 2-D grayscale array (any size, 0..255) to MNIST's form.

  Args:
    gray: [H, W] array, 0 = black.

  Returns:
    uint8 [28, 28], white digit on black, centred by its centre of mass.

  Raises:
    ImageError: the image holds no ink (blank or uniform).
  """
  gray = np.asarray(gray, np.float32)
  h, w = gray.shape
  b = max(1, int(round(min(h, w) * BORDER_FRACTION)))
  border = np.concatenate([gray[:b].ravel(), gray[-b:].ravel(),
                           gray[:, :b].ravel(), gray[:, -b:].ravel()])
  background = float(np.median(border))
  if background > 127:  # Dark digit on light paper: make it MNIST-like.
    gray, background = 255.0 - gray, 255.0 - background
  ink = np.clip(gray - background, 0, None)
  peak = float(ink.max())
  if peak <= 0:
    raise ImageError('no digit found (the image is uniform)')
  ink = ink / peak
  ink[ink < INK_THRESHOLD] = 0
  rows, cols = np.nonzero(ink)
  ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  bh, bw = ink.shape
  scale = DIGIT_BOX / max(bh, bw)
  size = (max(1, round(bw * scale)), max(1, round(bh * scale)))  # (W, H)
  small = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).resize(
      size, Image.Resampling.LANCZOS), np.float32)
  out = np.zeros((28, 28), np.float32)
  sh, sw = small.shape
  total = small.sum()
  if total > 0:
    cy = float((small.sum(1) * np.arange(sh)).sum() / total)
    cx = float((small.sum(0) * np.arange(sw)).sum() / total)
  else:
    cy, cx = (sh - 1) / 2, (sw - 1) / 2
  top = int(np.clip(round(CENTRE - cy), 0, 28 - sh))
  left = int(np.clip(round(CENTRE - cx), 0, 28 - sw))
  out[top:top + sh, left:left + sw] = small
  return np.clip(out, 0, 255).astype(np.uint8)


def load_digit(path: str) -> np.ndarray:
  """Reads an image file and converts it with `to_mnist` (see module doc).

  Raises:
    ImageError: naming the file, if it cannot be read or holds no digit.
  """
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ('RGBA', 'LA', 'PA') or 'transparency' in img.info:
        paper = Image.new('RGBA', img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, img.convert('RGBA'))
      gray = np.asarray(img.convert('L'))
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise ImageError(f'{path}: cannot read image ({e})') from e
  try:
    return to_mnist(gray)
  except ImageError as e:
    raise ImageError(f'{path}: {e}') from e


def predict(variables, model, image_paths) -> list[Prediction]:
  """Predicts the digit in each image file.

  Args:
    variables: the CNN's variables ({'params': ..., **model_state}).
    model: the CNN (`models.create_model(config)`).
    image_paths: PNG/JPEG files of any size and colour.

  Returns:
    One `Prediction` per path, in order; unreadable files carry `error`.
  """
  results = [Prediction(str(p)) for p in image_paths]
  images, ok = [], []
  for r in results:
    try:
      images.append(load_digit(r.path))
      ok.append(r)
    except ImageError as e:
      r.error = str(e).removeprefix(f'{r.path}: ')
  if images:
    probs = np.asarray(jax.nn.softmax(jnp.asarray(
        steps.logits_of(model, variables, np.stack(images))), axis=-1))
    for r, p in zip(ok, probs):
      top = np.argsort(-p)[:3]
      r.digit = int(top[0])
      r.top3 = [(int(d), float(p[d])) for d in top]
  return results


def restore_variables(config, workdir: str):
  """(step, variables) of `workdir`'s checkpoint at `config.eval_step` (-1:
  the latest readable one), on the first local device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  step, variables, _ = checkpointing.restore_workdir_variables(
      workdir, models.abstract_variables(models.create_model(config), device),
      None if config.eval_step == -1 else config.eval_step, config)
  return step, variables


def run(config, workdir: str, image_paths, out=None, err=None) -> int:
  """`launch.py --mode predict`: restores the model, prints a line per image.

  Args:
    config: the run's config (the model's shape).
    workdir: the training run's workdir (its latest checkpoint is used).
    image_paths: the images to classify.
    out: stream for the predictions (default stdout).
    err: stream for per-image errors (default stderr).

  Returns:
    0 if every image was predicted, 2 if any could not be read.
  """
  out = sys.stdout if out is None else out
  err = sys.stderr if err is None else err
  if not image_paths:
    raise UserError('--mode predict needs images: --image a.png [b.jpg ...].')
  step, variables = restore_variables(config, workdir)
  print(f'Model: {workdir} step {step}', file=out)
  failed = 0
  for p in predict(variables, models.create_model(config), image_paths):
    if p.error:
      failed += 1
      print(f'Error: {p.path}: {p.error}', file=err, flush=True)
    else:
      print(p, file=out, flush=True)
  return 2 if failed else 0
