r"""The PyTorch reference on a CUDA GPU: the tutorial's network, trained on
real MNIST held on the device, for a side-by-side with the project there.

  python benchmarks/torch_gpu.py --data_dir ../shared/data/mnist \
      --epochs 20 --dtype float32 --out benchmarks/results/torch_gpu.json

`../shared/bench/torch_cnn.py` (the CPU reference) runs on the CPU only; this
is the same model, loss, L2, Adam and staircase decay (batch 512, the first
5,000 training images validate), with the data on the GPU, so that what is
timed is what `benchmarks/throughput.py`'s bare step times: an epoch of
training steps over a device-resident, per-epoch-shuffled training set. Each
epoch is timed from a `cuda.synchronize()` to the next; the test accuracy is
measured after each. `--dtype bfloat16` runs under CUDA autocast; `--layout`
picks NCHW (PyTorch's default) or NHWC (channels_last); cuDNN's autotuner
(`cudnn.benchmark`) is on unless `--cudnn_benchmark 0`.
`--compile` wraps the loss in `torch.compile`. It needs only torch and numpy,
and never imports JAX (which would take the GPU's memory).
"""

import argparse
import gzip
import json
import os
import statistics
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

BATCH, LR0, DECAY, L2, KEEP = 512, 1e-3, 0.95, 5e-4, 0.5
NUM_VALIDATION = 5000


def read_idx(path: str) -> np.ndarray:
  with gzip.open(path, 'rb') as f:
    data = f.read()
  ndim = data[3]
  dims = np.frombuffer(data, '>u4', ndim, 4)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(data_dir: str, device):
  def split(images, labels):
    x = torch.from_numpy(read_idx(os.path.join(data_dir, images)).astype(
        np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(read_idx(os.path.join(data_dir, labels)).astype(
        np.int64))
    return x.to(device), y.to(device)
  x, y = split('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz')
  test = split('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
  return (x[NUM_VALIDATION:], y[NUM_VALIDATION:]), test


def glorot_normal_(w):
  """Variance scaling 1.0, fan_avg, truncated normal (as the CPU reference)."""
  fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)  # pylint: disable=protected-access
  std = (2.0 / (fan_in + fan_out)) ** 0.5 / 0.87962566103423978
  with torch.no_grad():
    nn.init.trunc_normal_(w, 0.0, std, -2.0 * std, 2.0 * std)


class Net(nn.Module):
  """conv1 32@5x5, pool, conv2 64@5x5, pool, fc3 1024@7x7 VALID, dropout,
  fc4 10@1x1: the tutorial's fully convolutional network."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
    self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
    self.fc3 = nn.Conv2d(64, 1024, 7)
    self.fc4 = nn.Conv2d(1024, 10, 1)
    for m in (self.conv1, self.conv2, self.fc3, self.fc4):
      glorot_normal_(m.weight)
      nn.init.zeros_(m.bias)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
    x = F.dropout(F.relu(self.fc3(x)), 1.0 - KEEP, self.training)
    return torch.flatten(self.fc4(x), 1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
      'mnist'))
  parser.add_argument('--epochs', type=int, default=20)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--compile', action='store_true')
  parser.add_argument('--layout', default='nchw', choices=('nchw', 'nhwc'),
                      help='memory format (nhwc: channels_last)')
  parser.add_argument('--cudnn_benchmark', default=1, type=int,
                      help='1: cuDNN times its algorithms on first use')
  parser.add_argument('--target', type=float, default=0.99)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
  torch.manual_seed(args.seed)
  (x, y), (x_test, y_test) = load(args.data_dir, device)
  model = Net().to(device)
  if args.layout == 'nhwc':
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    x_test = x_test.contiguous(memory_format=torch.channels_last)
  kernels = [m.weight for m in (model.conv1, model.conv2, model.fc3, model.fc4)]
  biases = [m.bias for m in (model.conv1, model.conv2, model.fc3, model.fc4)]
  # Adam's coupled weight_decay adds L2 * w to the gradient: the tutorial's
  # 0.0005 * sum(w^2) / 2 on the kernels.
  opt = torch.optim.Adam([{'params': kernels, 'weight_decay': L2},
                          {'params': biases, 'weight_decay': 0.0}],
                         lr=LR0, betas=(0.9, 0.999), eps=1e-8)
  steps_per_epoch = x.shape[0] // BATCH
  sched = torch.optim.lr_scheduler.StepLR(opt, steps_per_epoch, DECAY)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=args.dtype == 'bfloat16',
                            cache_enabled=False)

  def loss_fn(xb, yb):
    with autocast:
      return F.cross_entropy(model(xb), yb)
  if args.compile:
    loss_fn = torch.compile(loss_fn)

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  def test_accuracy():
    model.eval()
    with torch.inference_mode(), autocast:
      correct = sum(int((model(x_test[i:i + 1000]).argmax(1)
                         == y_test[i:i + 1000]).sum())
                    for i in range(0, x_test.shape[0], 1000))
    model.train()
    return correct / x_test.shape[0]

  generator = torch.Generator(device=device).manual_seed(args.seed)
  epochs, train_seconds, reached = [], 0.0, None
  for epoch in range(1, args.epochs + 1):
    sync()
    t0 = time.perf_counter()
    perm = torch.randperm(x.shape[0], device=device, generator=generator)
    for i in range(steps_per_epoch):
      idx = perm[i * BATCH:(i + 1) * BATCH]
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(x[idx], y[idx])
      loss.backward()
      opt.step()
      sched.step()
    sync()
    seconds = time.perf_counter() - t0
    train_seconds += seconds
    acc = test_accuracy()
    loss = loss.item()
    epochs.append({'epoch': epoch, 'train_seconds': seconds,
                   'images_per_second': steps_per_epoch * BATCH / seconds,
                   'loss': loss, 'test_accuracy': acc})
    if reached is None and acc >= args.target:
      reached = {'epoch': epoch, 'train_seconds': train_seconds}
    print(f'epoch {epoch:3d} {seconds:7.3f} s {epochs[-1]["images_per_second"]:9.0f}'
          f' img/s loss {loss:.4f} test {acc:.2%}', flush=True)
  steady = [e['images_per_second'] for e in epochs[1:]] or [
      epochs[0]['images_per_second']]
  result = {
      'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
      'torch': torch.__version__, 'dtype': args.dtype, 'compile': args.compile,
      'layout': args.layout, 'cudnn_benchmark': bool(args.cudnn_benchmark),
      'epochs': epochs, 'train_seconds_total': train_seconds,
      'train_seconds_after_epoch_1': train_seconds - epochs[0]['train_seconds'],
      'images_per_second_median_after_epoch_1': statistics.median(steady),
      'images_per_second_min_max_after_epoch_1': [min(steady), max(steady)],
      'final_test_accuracy': epochs[-1]['test_accuracy'], 'target': args.target,
      'reached': reached}
  print(f'RESULT torch {args.dtype} {args.layout}'
        f'{" compile" if args.compile else ""}: '
        f'{result["images_per_second_median_after_epoch_1"]:.0f} img/s '
        f'(epochs 2+), training {train_seconds:.2f} s in all, final test '
        f'{result["final_test_accuracy"]:.2%}, {args.target:.0%} reached: '
        f'{reached}', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
