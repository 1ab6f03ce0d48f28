r"""Accuracy benchmark: the default config on real MNIST, end to end.

  TFDS_DATA_DIR=../shared/tensorflow_datasets \
    python benchmarks/accuracy.py --out benchmarks/results/accuracy.json

Trains through `train.train_and_evaluate` (exactly what launch.py runs) and
reports the test accuracy after every epoch, the time to reach 99.0% test
accuracy, the total time and the training throughput, with the machine.
Extra `--set key=value` arguments override the config (e.g. num_epochs=5).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mnist_jax  # noqa: E402,F401  (XLA flags first)
from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from mnist_jax import train  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='benchmarks/results/accuracy.json')
  parser.add_argument('--workdir', default='')
  parser.add_argument('--target', type=float, default=0.99)
  parser.add_argument('--set', action='append', default=[])
  args = parser.parse_args()
  config = default.get_config()
  for assignment in args.set:
    common.override(config, assignment)
  workdir = args.workdir or common.scratch_dir('mnist_acc_')
  t0 = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  total = time.perf_counter() - t0

  train_seconds, reached = 0.0, None
  rows = []
  for r in result['epochs']:
    train_seconds += r['train_seconds']
    rows.append((r['epoch'], r['step'], r.get('test_accuracy'),
                 r.get('validation_accuracy'), r['images_per_second'],
                 train_seconds))
    if reached is None and r.get('test_accuracy', 0) >= args.target:
      reached = {'epoch': r['epoch'], 'step': r['step'],
                 'train_seconds': train_seconds}
  final = result['final'].get('test_accuracy')
  machine = common.machine_info()
  common.write_json(args.out, {
      'machine': machine, 'config': config.to_dict(),
      'epochs': result['epochs'], 'final_test_accuracy': final,
      'total_seconds': total, 'target': args.target, 'reached': reached})
  pct = lambda x: f'{x:9.2%}' if x is not None else f'{"-":>9}'  # pylint: disable=g-long-lambda
  print(common.machine_line(machine))
  print(f"{'epoch':>5} {'step':>6} {'test acc':>9} {'val acc':>9} "
        f"{'img/s':>7} {'train s':>8}")
  for e, s, t, v, ips, ts in rows:
    print(f'{e:5d} {s:6d} {pct(t)} {pct(v)} {ips:7.0f} {ts:8.1f}')
  print(f'final test accuracy {pct(final).strip()}; total wall time '
        f'{total:.0f} s; {args.target:.1%} reached: {reached}')


if __name__ == '__main__':
  common.run(main)
