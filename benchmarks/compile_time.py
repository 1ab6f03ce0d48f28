r"""Cold compilation of the default training step's dispatch lengths.

  python benchmarks/compile_time.py --mode aot    # lower().compile(), as the loop does
  python benchmarks/compile_time.py --mode jit    # the first call of each length

The default epoch is dispatched as 10 steps ten times, then 7: two programs.
`train._precompile` compiles both, one after the other, before the first
epoch's clock starts; this times that against compiling at the first call
(which includes running the dispatch once), with the persistent compilation
cache off, in a fresh process per mode.
"""

import argparse
import os
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mode', choices=('aot', 'jit'), default='aot')
  parser.add_argument('--data_dir', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
      'mnist'))
  parser.add_argument('--set', action='append', default=[],
                      help='config override key=value (repeatable)')
  parser.add_argument('--out', default='',
                      help='JSON file for the results (default: none)')
  args = parser.parse_args()
  config = default.get_config()
  config.data.source, config.data.dir = 'idx', args.data_dir
  config.compilation_cache_dir = 'none'
  for assignment in args.set:
    common.override(config, assignment)
  ctx = train.setup(config, common.scratch_dir('bench_compile_'))
  n = len(ctx.data.train)
  state = parallel.put_replicated(steps.create_train_state(
      config, ctx.model, n, ctx.rngs['init']), ctx.mesh)
  data = parallel.put_replicated({'image': ctx.data.train.images,
                                  'label': ctx.data.train.labels}, ctx.mesh)
  fn = steps.make_train_fn(config, n, ctx.mesh)
  perm = jax.random.permutation(ctx.rngs['data'], n)
  lengths = train.dispatch_lengths(config, 0, ctx.steps_per_epoch,
                                   ctx.steps_per_epoch)
  seconds = {}
  for k in sorted(lengths, reverse=True):
    t0 = time.perf_counter()
    if args.mode == 'aot':
      fn.lower(state, data, perm, ctx.rngs['dropout'], num_steps=k).compile()
    else:
      state, metrics = fn(state, data, perm, ctx.rngs['dropout'], num_steps=k)
      jax.block_until_ready(metrics)
    seconds[k] = time.perf_counter() - t0
  machine = common.machine_info()
  print(f'COMPILE {args.mode} {config.dtype} on {common.machine_line(machine)}'
        ': '
        + ', '.join(f'k={k} {s:.2f} s' for k, s in seconds.items()))
  common.write_json(args.out, {
      'machine': machine, 'mode': args.mode, 'overrides': args.set,
      'seconds_by_dispatch_length': seconds})


if __name__ == '__main__':
  common.run(main)
