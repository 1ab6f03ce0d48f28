r"""BatchNorm's two implementations side by side: the training step of the
default config, of `batch_norm=True` with Flax's `nn.BatchNorm` (what the
'fast' lowering used before `models.BatchNorm`), and with `models.BatchNorm`
(channel sums as GEMVs), interleaved round by round in one process.

  python benchmarks/batch_norm_ab.py --rounds 7

Generated data of the real shape; prints img/s (median, min-max) and the
ratio to the default with the machine; writes JSON with `--out`.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mnist_jax  # noqa: E402,F401  (XLA flags first)
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from mnist_jax import input_pipeline  # noqa: E402
from mnist_jax import models  # noqa: E402
from mnist_jax import parallel  # noqa: E402
from mnist_jax import steps  # noqa: E402

STEPS = 5


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  mesh = parallel.create_mesh()
  num_train = 512 * STEPS * 2
  rng = np.random.default_rng(0)
  data = parallel.put_replicated({
      'image': rng.integers(0, 256, (num_train,) + input_pipeline.IMAGE_SHAPE,
                            np.uint8),
      'label': rng.integers(0, 10, num_train).astype(np.int32)}, mesh)
  perm = jax.jit(input_pipeline.epoch_permutation, static_argnums=2)(
      jax.random.key(1), 0, num_train)
  ours = models.BatchNorm
  prepared = {}
  try:
    for name, batch_norm, norm in (
        ('default', False, ours),
        ('batch_norm, flax nn.BatchNorm', True, nn.BatchNorm),
        ('batch_norm, models.BatchNorm', True, ours)):
      models.BatchNorm = norm  # what the CNN is traced (compiled) with
      config = default.get_config()
      config.batch_norm = batch_norm
      state = parallel.put_replicated(steps.create_train_state(
          config, models.create_model(config), num_train, jax.random.key(0)),
                                      mesh)
      fn = steps.make_train_fn(config, num_train, mesh)
      state, metrics = fn(state, data, perm, jax.random.key(2),
                          num_steps=STEPS)  # compiles
      jax.block_until_ready(metrics)
      prepared[name] = [fn, state]
  finally:
    models.BatchNorm = ours
  rates = {name: [] for name in prepared}
  for _ in range(args.rounds):
    for name, (fn, state) in prepared.items():
      t0 = time.perf_counter()
      state, metrics = fn(state, data, perm, jax.random.key(2),
                          num_steps=STEPS)
      jax.block_until_ready(metrics)
      rates[name].append(STEPS * 512 / (time.perf_counter() - t0))
      prepared[name][1] = state
  machine = common.machine_info()
  summary = {name: common.summarize(r) for name, r in rates.items()}
  print(common.machine_line(machine))
  for name, s in summary.items():
    ratio = s['median'] / summary['default']['median']
    print(f"{name:>32} {s['median']:7.0f} ({s['min']:.0f}-{s['max']:.0f}) "
          f'img/s {ratio:5.2f}x')
  common.write_json(args.out, {'machine': machine, 'rounds': args.rounds,
                               'results': summary,
                               'load_average': os.getloadavg()})


if __name__ == '__main__':
  common.run(main)
