r"""What a config change costs in training speed: the bare compiled step of
the default config and of each variant, interleaved in one process.

  python benchmarks/variants.py --variant batch_norm=True \
    --variant augment_shift=2 --rounds 5

Each variant is `--set`-style assignments joined by commas
(`batch_norm=True,augment_shift=2`). The steps run on generated data of the
real shape (no dataset needed); every round times one dispatch of `--steps`
steps of each config in turn, so all see the same load. Prints images/s
(median, min-max) and the ratio to the default, with the machine; writes
JSON.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mnist_jax  # noqa: E402,F401  (XLA flags first)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from mnist_jax import input_pipeline  # noqa: E402
from mnist_jax import models  # noqa: E402
from mnist_jax import parallel  # noqa: E402
from mnist_jax import steps  # noqa: E402


def _prepared(config, data, num_train, mesh):
  """(train_fn, state, perm) of `config`, compiled and warmed up."""
  model = models.create_model(config)
  state = parallel.put_replicated(steps.create_train_state(
      config, model, num_train, jax.random.key(0)), mesh)
  fn = steps.make_train_fn(config, num_train, mesh)
  perm = jax.jit(input_pipeline.epoch_permutation, static_argnums=2)(
      jax.random.key(1), 0, num_train)
  return [fn, state, perm]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', action='append', default=[],
                      help='field=value[,field=value...]')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  if not args.variant:
    parser.error('give at least one --variant field=value')
  base = default.get_config()
  num_train = base.batch_size * max(args.steps, 1) * 2
  rng = np.random.default_rng(0)
  mesh = parallel.create_mesh()
  data = parallel.put_replicated({
      'image': rng.integers(0, 256, (num_train,) + input_pipeline.IMAGE_SHAPE,
                            np.uint8),
      'label': rng.integers(0, 10, num_train).astype(np.int32)}, mesh)
  configs = {'default': base}
  for variant in args.variant:
    config = base.copy_and_resolve_references()
    for assignment in variant.split(','):
      try:
        common.override(config, assignment)
      except SystemExit as e:  # its message names --set
        raise SystemExit(str(e).replace('--set', '--variant')) from None
    configs[variant] = config
  prepared = {}
  for name, config in configs.items():
    prepared[name] = _prepared(config, data, num_train, mesh)
    fn, state, perm = prepared[name]
    prepared[name][1], metrics = fn(state, data, perm, jax.random.key(2),
                                    num_steps=args.steps)  # compiles
    jax.block_until_ready(metrics)
  rates = {name: [] for name in configs}
  for _ in range(args.rounds):
    for name in configs:
      fn, state, perm = prepared[name]
      t0 = time.perf_counter()
      state, metrics = fn(state, data, perm, jax.random.key(2),
                          num_steps=args.steps)
      jax.block_until_ready(metrics)
      rates[name].append(args.steps * base.batch_size
                         / (time.perf_counter() - t0))
      prepared[name][1] = state
  machine = common.machine_info()
  summary = {name: common.summarize(r) for name, r in rates.items()}
  print(common.machine_line(machine))
  print(f"{'config':>36} {'bare step img/s':>22} {'vs default':>10}")
  for name, s in summary.items():
    ratio = s['median'] / summary['default']['median']
    print(f"{name:>36} {s['median']:8.0f} ({s['min']:.0f}-{s['max']:.0f})"
          f"{ratio:10.2f}x")
  common.write_json(args.out, {'machine': machine, 'steps': args.steps,
                               'rounds': args.rounds, 'results': summary,
                               'load_average': os.getloadavg()})


if __name__ == '__main__':
  common.run(main)
