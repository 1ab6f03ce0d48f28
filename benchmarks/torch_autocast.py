"""Runs the PyTorch reference (`torch_cnn.py`) under CPU autocast to bfloat16.

  TORCH_PYTHON benchmarks/torch_autocast.py ../shared/bench/torch_cnn.py \
      --mode throughput --threads 2 [--channels-last]

PyTorch's standard mixed precision: convolutions and matmuls in bfloat16,
parameters, Adam and the loss in float32; the counterpart of the project's
`dtype=bfloat16`. Everything after the script path goes to `torch_cnn.py`.
Runs in the PyTorch virtual environment, never the project's.
"""

import os
import runpy
import sys


def main():
  script, argv = sys.argv[1], sys.argv[2:]
  # torch_cnn.py sizes OpenMP before torch starts; torch starts here first.
  if '--threads' in argv:
    os.environ.setdefault('OMP_NUM_THREADS',
                          argv[argv.index('--threads') + 1])
  import torch  # pylint: disable=g-import-not-at-top
  sys.argv = [script] + argv
  # One context around the whole script: autocast's cache of bfloat16
  # weight copies lives until it exits, so it must be off, or every step
  # would compute with the weights of the first one.
  with torch.autocast('cpu', dtype=torch.bfloat16, cache_enabled=False):
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
  main()
