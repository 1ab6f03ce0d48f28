r"""Where an epoch's wall time goes beyond training: the whole loop, measured.

  python benchmarks/epoch_overhead.py --epochs 10 \
      --set data.source=idx --set data.dir=../shared/data/mnist \
      --out benchmarks/results/epoch_overhead.json

Runs `train.train_and_evaluate` with the default hooks (the report off) and
times, per epoch, the training phase (`train_seconds`) against the loop: the
wall time from one epoch's evaluated record to the next, which adds that
epoch's evaluation and the previous epoch's hooks. It also times, on the
loop's thread, the evaluation and each hook's methods, and what the
checkpoint and summary hooks hand to their background threads (those times
overlap training). The steady state excludes the first two epochs (the
first one's record and hooks compile). `--set key=value` overrides the
config.
"""

import argparse
import collections
import functools
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mnist_jax  # noqa: E402,F401  (XLA flags first)
from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from mnist_jax import checkpointing  # noqa: E402
from mnist_jax import steps  # noqa: E402
from mnist_jax import train  # noqa: E402
from mnist_jax.hooks import checkpoint  # noqa: E402
from mnist_jax.hooks import progress  # noqa: E402
from mnist_jax.hooks import summaries  # noqa: E402

# (owner, attribute, label) of what is timed.
TIMED = [(steps, 'evaluate', 'evaluate (one split)'),
         (checkpointing, 'finite_copy', 'checkpoint: check + device copy'),
         (checkpointing, 'save', 'checkpoint: orbax save call'),
         (summaries.SummaryHook, '_write_epoch', 'summaries: epoch write')]
TIMED += [(cls, m, f'{cls.__name__}.{m}')
          for cls in (checkpoint.CheckpointHook, summaries.SummaryHook,
                      progress.ProgressHook)
          for m in ('on_steps', 'on_metrics', 'on_epoch_end')]


def _timed(times, label, fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    t0 = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      where = ('loop' if threading.current_thread() is threading.main_thread()
               else 'background')
      times[(label, where)].append(time.perf_counter() - t0)
  return wrapper


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--out', default='benchmarks/results/epoch_overhead.json')
  parser.add_argument('--set', action='append', default=[])
  args = parser.parse_args()
  if args.epochs < 3:
    parser.error('--epochs must be >= 3 (the steady state starts at epoch 3)')
  config = default.get_config()
  config.num_epochs = args.epochs
  config.write_report = False
  for assignment in args.set:
    common.override(config, assignment)
  times = collections.defaultdict(list)
  for owner, name, label in TIMED:
    setattr(owner, name, _timed(times, label, getattr(owner, name)))
  ends = []
  t0 = time.perf_counter()
  result = train.train_and_evaluate(
      config, tempfile.mkdtemp(prefix='mnist_overhead_'),
      on_epoch=lambda record: ends.append(time.perf_counter()))
  total = time.perf_counter() - t0
  epochs = result['epochs']
  rows = []
  for i, record in enumerate(epochs):
    loop = ends[i] - ends[i - 1] if i else None
    rows.append({'epoch': record['epoch'],
                 'train_seconds': record['train_seconds'],
                 'loop_seconds': loop})
    print(f"epoch {record['epoch']:3d}  train {record['train_seconds']:.4f} s"
          + (f'  loop {loop:.4f} s  train/loop {record["train_seconds"] / loop:.3f}'
             if loop else ''))
  train_steady = sum(r['train_seconds'] for r in epochs[2:])
  loop_steady = ends[-1] - ends[1]
  print(f'steady state, epochs 3-{len(epochs)}: training {train_steady:.3f} s,'
        f' loop {loop_steady:.3f} s, training / loop '
        f'{train_steady / loop_steady:.1%}; whole call {total:.1f} s')
  per_epoch = {}
  for (label, where), values in sorted(times.items()):
    per_epoch[f'{label} [{where}]'] = common.summarize(values)
    print(f'{label:36s} {where:10s} n={len(values):4d} median '
          f'{per_epoch[f"{label} [{where}]"]["median"] * 1e3:8.2f} ms  total '
          f'{sum(values):7.3f} s')
  common.write_json(args.out, {
      'machine': common.machine_info(), 'config': config.to_dict(),
      'epochs': rows, 'steady': {
          'epochs': [3, len(epochs)], 'train_seconds': train_steady,
          'loop_seconds': loop_steady, 'ratio': train_steady / loop_steady},
      'timed': per_epoch, 'total_seconds': total,
      'final_test_accuracy': result['final']['test_accuracy']})


if __name__ == '__main__':
  main()
