r"""Where an epoch's wall time goes beyond training: the whole loop, measured.

  python benchmarks/epoch_overhead.py --epochs 10 --rounds 2 \
      --variant steps_per_dispatch=10,overlap_epoch_end=no --variant '' \
      --set data.source=idx --set data.dir=../shared/data/mnist \
      --out benchmarks/results/epoch_overhead.json

Runs `train.train_and_evaluate` with the default hooks (the report off) and
times, per epoch, the training phase (`train_seconds`) against the loop: the
wall time from one epoch's evaluated record to the next, which adds that
epoch's evaluation and the previous epoch's hooks. Each round also runs a
bare baseline: the same config with no hooks and evaluation only after the
last epoch, so that `loop / bare` counts everything the whole loop adds,
including what its background threads take from training. Each `--variant`
runs the whole loop once per round with its overrides, interleaved (A B
bare A B bare ...), in one process. A variant's `without=Hook[+Hook]` (e.g.
`without=SummaryHook` or `without=CheckpointHook+SummaryHook`) runs the default
hooks less those, to attribute what each costs the loop.

It also times, on the loop's thread, each hook's methods and what the
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
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mnist_jax  # noqa: E402,F401  (XLA flags first)
from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from mnist_jax import checkpointing  # noqa: E402
from mnist_jax import train  # noqa: E402
from mnist_jax.hooks import checkpoint  # noqa: E402
from mnist_jax.hooks import progress  # noqa: E402
from mnist_jax.hooks import summaries  # noqa: E402

# (owner, attribute, label) of what is timed.
TIMED = [(train._Loop, '_dispatch_evaluation', 'evaluation: dispatch'),  # pylint: disable=protected-access
         (checkpointing, 'finite_copy', 'checkpoint: copy + check dispatch'),
         (checkpointing, 'save', 'checkpoint: orbax save call'),
         (summaries.SummaryHook, '_write_epoch', 'summaries: epoch write')]
TIMED += [(cls, m, f'{cls.__name__}.{m}')
          for cls in (checkpoint.CheckpointHook, summaries.SummaryHook,
                      progress.ProgressHook)
          for m in ('on_steps', 'on_metrics', 'on_epoch_dispatched',
                    'on_epoch_end')]


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


def _run(config, times, hooks=None) -> dict:
  """One run; its per-epoch rows, steady state and timed calls."""
  times.clear()
  ends = []
  t0 = time.perf_counter()
  result = train.train_and_evaluate(
      config, common.scratch_dir('mnist_overhead_'), hooks=hooks,
      on_epoch=lambda record: ends.append(time.perf_counter()))
  total = time.perf_counter() - t0
  epochs = result['epochs']
  rows = [{'epoch': r['epoch'], 'train_seconds': r['train_seconds'],
           'loop_seconds': ends[i] - ends[i - 1] if i else None}
          for i, r in enumerate(epochs)]
  train_steady = sum(r['train_seconds'] for r in epochs[2:])
  timed = {f'{label} [{where}]': common.summarize(values)
           for (label, where), values in sorted(times.items())}
  return {'epochs': rows, 'steady': {
      'epochs': [3, len(epochs)], 'train_seconds': train_steady,
      'loop_seconds': ends[-1] - ends[1],
      'ratio': train_steady / (ends[-1] - ends[1])},
          'timed': timed, 'total_seconds': total,
          'final_test_accuracy': result['final']['test_accuracy']}


def _print_run(name, run, bare_seconds=None):
  steady = run['steady']
  print(f"{name}: epochs 3-{steady['epochs'][1]}: training "
        f"{steady['train_seconds']:.3f} s, loop {steady['loop_seconds']:.3f} "
        f"s, training / loop {steady['ratio']:.1%}"
        + (f', bare training / loop {bare_seconds / steady["loop_seconds"]:.1%}'
           if bare_seconds else '')
        + f"; whole call {run['total_seconds']:.1f} s, test accuracy "
        f"{run['final_test_accuracy']:.2%}")
  for label, summary in run['timed'].items():
    print(f"    {label:52s} n={summary['n']:4d} median "
          f"{summary['median'] * 1e3:8.2f} ms  total "
          f"{sum(summary['values']):7.3f} s")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--variant', action='append', default=[],
                      help="key=value,key=value: a whole-loop run per round "
                      "with these overrides ('' = the config as set; "
                      'without=Hook+Hook drops default hooks); repeatable, '
                      'run in the order given')
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
  variants = args.variant or ['']
  bare = config.copy_and_resolve_references()
  bare.eval_every_epochs = args.epochs  # evaluated once, after the last
  times = collections.defaultdict(list)
  for owner, name, label in TIMED:
    setattr(owner, name, _timed(times, label, getattr(owner, name)))
  runs = []
  machine = common.machine_info()
  print(common.machine_line(machine))
  for round_ in range(1, args.rounds + 1):
    measured = []
    for variant in variants:
      c = config.copy_and_resolve_references()
      hooks, without = None, []
      for assignment in filter(None, variant.split(',')):
        if assignment.startswith('without='):
          without = assignment[len('without='):].split('+')
        else:
          common.override(c, assignment)
      if without:
        defaults = train.default_hooks(c)
        hooks = [h for h in defaults if type(h).__name__ not in without]
        unknown = set(without) - {type(h).__name__ for h in defaults}
        if unknown:
          parser.error(f'--variant without={"+".join(without)}: no default '
                       f'hook named {sorted(unknown)}')
      measured.append((variant or 'whole loop', c, hooks))
    measured.append(('bare (no hooks, evaluated at the end)', bare, []))
    done = {}
    for name, c, hooks in measured:
      done[name] = _run(c, times, hooks)
    bare_seconds = done[measured[-1][0]]['steady']['train_seconds']
    for name, run in done.items():
      _print_run(f'round {round_}, {name}', run,
                 None if run is done[measured[-1][0]] else bare_seconds)
      if run is not done[measured[-1][0]]:
        run['steady']['bare_train_seconds'] = bare_seconds
        run['steady']['bare_ratio'] = bare_seconds / run['steady'][
            'loop_seconds']
      runs.append({'round': round_, 'name': name, **run})
  common.write_json(args.out, {
      'machine': machine, 'config': config.to_dict(),
      'variants': variants, 'runs': runs})


if __name__ == '__main__':
  common.run(main)
