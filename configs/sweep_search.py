r"""Sweep: a quasi-random search over learning rate, decay and batch size,
with hopeless points stopped early by ASHA on their validation accuracy.

12 points drawn (scrambled Halton, seed 0) from a log-uniform initial learning
rate in [1e-4, 1e-2], a decay factor in [0.9, 1.0) and batch sizes 128, 256,
512, each trained up to the default 20 epochs; after epochs 1, 3 and 9
(`grace_epochs=1`, `reduction_factor=3`) only the best third of the points
that reached that epoch go on. Ranked in `<workdir>/sweep_results.md`:

  python launch.py --config configs/sweep_search.py --sweep \
      --workdir runs/sweep_search

On a Ray cluster (docs/sweeps.md), one point per machine or accelerator:

  RAY_ADDRESS=HEAD_IP:6379 python launch.py --config configs/sweep_search.py \
      --sweep --workdir /mnt/shared/runs/sweep_search

`:quick` draws 6 points of 3 epochs each (ASHA then compares after epoch 1
only), for a laptop. Not measured: docs/sweeps.md has the measured
`configs/sweep_lr.py:quick`.
"""

import ml_collections

from configs import default
from mnist_jax import sweep


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg='quick'` trains each point for 3 epochs."""
  config = default.get_config()
  if arg == 'quick':
    config.num_epochs = 3
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'quick' or nothing.")
  return config


def get_sweep(arg: str | None = None) -> sweep.Sweep:
  """The search space and its early-stopping rule."""
  space = sweep.Random(
      {'initial_learning_rate': sweep.loguniform(1e-4, 1e-2),
       'learning_rate_decay_factor': sweep.uniform(0.9, 1.0),
       'batch_size': sweep.choice([128, 256, 512])},
      num_samples=6 if arg == 'quick' else 12, seed=0)
  return sweep.Sweep(space, early_stopping=sweep.EarlyStopping(
      rule='asha', grace_epochs=1, reduction_factor=3))
