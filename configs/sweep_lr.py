r"""Sweep: initial learning rate x batch size around the tutorial's 0.001 and 512.

The full grid (9 points of the default 20-epoch run), each point in
`runs/sweep_lr/<overrides>`, ranked by best validation accuracy in
`runs/sweep_lr/sweep_results.md`:

  python launch.py --config configs/sweep_lr.py --sweep --workdir runs/sweep_lr

A short version (2 x 2 points, 1 epoch each) that fits a busy laptop; its
measured tables, with the machine and the data source, are in docs/sweeps.md
(validation accuracies and rankings differ between the TFDS and IDX sources,
whose validation images differ: docs/data.md):

  python launch.py --config configs/sweep_lr.py:quick --sweep \
      --workdir runs/sweep_lr_quick

Every `--config.*` override applies to all points (e.g. `--config.data.source=
idx --config.data.dir=MNIST_data`); the points run as Ray Tune trials, on this
machine or on a Ray cluster (`RAY_ADDRESS`, docs/sweeps.md); `--sweep_parallel=N`
runs N points per machine. Without `--sweep` this file trains the default
config.
"""

import ml_collections

from configs import default
from mnist_jax import sweep


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg='quick'` trains each point for one epoch."""
  config = default.get_config()
  if arg == 'quick':
    config.num_epochs = 1
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'quick' or nothing.")
  return config


def get_sweep(arg: str | None = None) -> list[dict]:
  """Learning rates a factor ~3 apart, batch sizes a factor 4 (2 in 'quick')."""
  if arg == 'quick':
    return sweep.product(initial_learning_rate=[0.001, 0.003],
                         batch_size=[256, 512])
  return sweep.product(initial_learning_rate=[0.0003, 0.001, 0.003],
                       batch_size=[128, 512, 2048])
