r"""Training and evaluation throughput, end to end and of the bare step.

  python benchmarks/throughput.py --out benchmarks/results/throughput.json
  python benchmarks/throughput.py --k 1,10 --windows 3   # compare dispatch sizes
  python benchmarks/throughput.py --set dtype=bfloat16

For each `steps_per_dispatch` k it measures, after warm-up (compilation):
  * bare: the compiled `train_fn` on device-resident data, nothing else
    (windows of whole epochs' worth of dispatches, blocking at the end);
  * end to end: `train.train_and_evaluate` with the default hooks (progress,
    summaries, checkpoints, report), one epoch per window after a warm-up
    epoch: the training phase (`images_per_second` of each epoch) and the
    whole loop (epoch end to epoch end: training + evaluation of validation
    and test + per-layer summaries + checkpoint);
  * eval: the jitted evaluation of the 10,000 test images;
  * peak memory: host RSS (ru_maxrss) and, on accelerators, the device's peak.
Median and spread over the windows; the machine goes into the JSON.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mnist_jax  # noqa: E402,F401  (XLA flags first)
import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from mnist_jax import parallel  # noqa: E402
from mnist_jax import steps  # noqa: E402
from mnist_jax import train  # noqa: E402
from mnist_jax.hooks import base  # noqa: E402


class _EpochClock(base.Hook):
  """Wall time at every epoch end (after evaluation and the other hooks)."""
  order = 100  # last

  def __init__(self):
    self.times = []

  def on_train_start(self, run, state):
    self.times.append(time.perf_counter())

  def on_epoch_end(self, run, epoch, step, state, record):
    self.times.append(time.perf_counter())


def make_bare_epoch(config):
  """Compiles the train_fn on device-resident data; returns (epoch, ctx).

  `epoch()` runs one epoch of dispatches (blocking at the end) on its own
  training state and returns its images/s. The first call compiles every
  dispatch length, so time from the second call on.
  """
  ctx = train.setup(config, common.scratch_dir('bench_bare_'))
  n = len(ctx.data.train)
  holder = {'state': parallel.put_replicated(steps.create_train_state(
      config, ctx.model, n, ctx.rngs['init']), ctx.mesh)}
  data = parallel.put_replicated({'image': ctx.data.train.images,
                                  'label': ctx.data.train.labels}, ctx.mesh)
  train_fn = steps.make_train_fn(config, n, ctx.mesh)
  perm = jax.random.permutation(ctx.rngs['data'], n)
  spe = ctx.steps_per_epoch
  k = train.steps_per_dispatch(config, spe)
  lengths = [k] * (spe // k) + ([spe % k] if spe % k else [])

  def epoch() -> float:
    t0 = time.perf_counter()
    state = holder['state']
    for length in lengths:
      state, metrics = train_fn(state, data, perm, ctx.rngs['dropout'],
                                num_steps=length)
    jax.block_until_ready((state, metrics))
    holder['state'] = state
    return spe * config.batch_size / (time.perf_counter() - t0)

  epoch.holder = holder
  return epoch, ctx


def bare_step(config, windows: int):
  """img/s of the compiled train_fn alone, one epoch of dispatches a window."""
  epoch, ctx = make_bare_epoch(config)
  epoch()  # warm-up: compiles every length
  rates = [epoch() for _ in range(windows)]
  return common.summarize(rates), ctx, epoch.holder['state']


def end_to_end(config, windows: int):
  config = config.copy_and_resolve_references()
  config.num_epochs = windows + 1
  clock = _EpochClock()
  workdir = common.scratch_dir('bench_e2e_')
  result = train.train_and_evaluate(
      config, workdir, hooks=train.default_hooks(config) + [clock])
  epochs = result['epochs'][1:]  # the first epoch compiles
  spe_images = [r['step'] - p['step'] for p, r in
                zip(result['epochs'], result['epochs'][1:])]
  train_phase = [r['images_per_second'] for r in epochs]
  walls = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
  whole = [s * config.batch_size / w for s, w in zip(spe_images, walls)]
  return common.summarize(train_phase), common.summarize(whole), result


def evaluation(ctx, state, windows: int):
  split = ctx.eval_splits['test']
  jax.block_until_ready(ctx.eval_fn(state.variables, split))  # compile
  seconds = []
  for _ in range(windows):
    t0 = time.perf_counter()
    jax.block_until_ready(ctx.eval_fn(state.variables, split))
    seconds.append(time.perf_counter() - t0)
  return common.summarize(seconds)


def peak_memory():
  out = {'host_peak_rss_mb': resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024}
  stats = getattr(jax.devices()[0], 'memory_stats', lambda: None)()
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_mb'] = stats['peak_bytes_in_use'] / 2**20
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--k', default='', help='steps_per_dispatch values, '
                      'comma-separated (default: the config\'s)')
  parser.add_argument('--windows', type=int, default=3)
  parser.add_argument('--skip_e2e', action='store_true')
  parser.add_argument('--source', default='idx', choices=('idx', 'tfds'))
  parser.add_argument('--data_dir', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
      'mnist'))
  parser.add_argument('--set', action='append', default=[],
                      help='config override key=value (repeatable), e.g. '
                      'dtype=bfloat16')
  parser.add_argument('--out', default='benchmarks/results/throughput.json')
  args = parser.parse_args()
  base = default.get_config()
  base.data.source = args.source
  # --data_dir: the IDX folder, or the TFDS data dir (given on the command
  # line; else TFDS_DATA_DIR / TFDS's default as a run does).
  default_dir = parser.get_default('data_dir')
  if args.source == 'idx' or args.data_dir != default_dir:
    base.data.dir = args.data_dir
  for assignment in args.set:
    common.override(base, assignment)
  ks = [int(k) for k in args.k.split(',')] if args.k else [
      base.steps_per_dispatch]
  rows = []
  for k in ks:
    config = base.copy_and_resolve_references()
    config.steps_per_dispatch = k
    bare, ctx, state = bare_step(config, args.windows)
    ev = evaluation(ctx, state, args.windows)
    # k as run (the config's 0 is auto: 10 on the CPU, an epoch elsewhere).
    row = {'k': train.steps_per_dispatch(config, ctx.steps_per_epoch),
           'bare': bare, 'eval_test_seconds': ev,
           'eval_images_per_second': len(ctx.data.test) / ev['median']}
    if not args.skip_e2e:
      train_phase, whole, _ = end_to_end(config, args.windows)
      row.update(e2e_train=train_phase, e2e_whole_loop=whole,
                 ratio=train_phase['median'] / bare['median'])
    rows.append(row)
    del ctx, state

  machine = common.machine_info()
  print(common.machine_line(machine) + ':')
  print(f"{'k':>3} {'bare img/s':>22} {'e2e train img/s':>22} {'ratio':>6} "
        f"{'e2e incl. eval img/s':>22} {'eval 10k s':>16}")
  fmt = lambda s: f"{s['median']:7.0f} ({s['min']:.0f}-{s['max']:.0f})"
  for r in rows:
    print(f"{r['k']:3d} {fmt(r['bare']):>22} "
          f"{fmt(r['e2e_train']) if 'e2e_train' in r else '-':>22} "
          f"{format(r['ratio'], '6.1%') if 'ratio' in r else '-':>6} "
          f"{fmt(r['e2e_whole_loop']) if 'e2e_whole_loop' in r else '-':>22} "
          f"{r['eval_test_seconds']['median']:7.3f} "
          f"({r['eval_test_seconds']['min']:.3f}-"
          f"{r['eval_test_seconds']['max']:.3f})")
  memory = peak_memory()
  print('peak memory:', {k: round(v) for k, v in memory.items()})
  common.write_json(args.out, {'machine': machine,
                               'overrides': args.set,
                               'windows': args.windows, 'rows': rows,
                               'memory': memory,
                               'load_average': os.getloadavg()})


if __name__ == '__main__':
  common.run(main)
