r"""Checkpoint benchmark: save and restore of the default model's train state.

  python benchmarks/checkpoint.py --out benchmarks/results/checkpoint.json

Times, for the default config's state (3.27M parameters + Adam moments,
~39 MB) on this machine's devices, through the same code the training run
uses (`checkpointing.finite_copy` and `checkpointing.save`, as the
checkpoint hook calls them; restore against an abstract target with the
current shardings):

  * save_blocking: how long the training loop waits for a save (the
    finiteness check and the copy of the state on its devices);
  * save_worker: orbax's synchronous part of the save (the copy off the
    devices, folders, metadata), which the hook runs on a background thread
    (in line on multi-process runs);
  * save_total: until the checkpoint is committed on disk;
  * restore: a full restore (params, opt_state, step) from disk.

Repeats each `--repeats` times into a temporary folder and reports medians.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import mnist_jax  # noqa: E402,F401  (XLA flags first)
from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from mnist_jax import checkpointing  # noqa: E402
from mnist_jax import models  # noqa: E402
from mnist_jax import parallel  # noqa: E402
from mnist_jax import steps  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='benchmarks/results/checkpoint.json')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dir', default='', help='where to write (default tmp)')
  args = parser.parse_args()
  if args.dir and not os.path.isdir(args.dir):
    parser.error(f'--dir {args.dir}: no such folder (the saves go into a '
                 'temporary folder made inside it).')
  config = default.get_config()
  model = models.create_model(config)
  mesh = parallel.create_mesh()
  state = parallel.put_replicated(steps.create_train_state(
      config, model, 55000, jax.random.key(0)), mesh)
  tree = checkpointing.state_tree(state)
  num_bytes = sum(x.nbytes for x in jax.tree.leaves(tree))
  root = tempfile.mkdtemp(prefix='mnist_ckpt_bench_', dir=args.dir or None)
  times = {'save_blocking': [], 'save_worker': [], 'save_total': [],
           'restore': []}
  try:
    directory = os.path.join(root, 'checkpoints')
    manager = checkpointing.create_manager(directory, max_to_keep=2)
    abstract = checkpointing.abstract_like(tree)
    for i in range(args.repeats + 1):  # the first round warms up (compiles)
      t0 = time.perf_counter()
      copy, finite = checkpointing.finite_copy(tree)
      assert bool(finite)
      t1 = time.perf_counter()
      checkpointing.save(manager, i, copy, config, {'reason': 'benchmark'})
      t5 = time.perf_counter()
      manager.wait_until_finished()
      t2 = time.perf_counter()
      reader = checkpointing.create_manager(directory, read_only=True)
      t3 = time.perf_counter()
      restored = checkpointing.restore_items(reader, i, abstract)
      jax.block_until_ready(restored.state)
      t4 = time.perf_counter()
      reader.close()
      if i:
        times['save_blocking'].append(t1 - t0)
        times['save_worker'].append(t5 - t1)
        times['save_total'].append(t2 - t0)
        times['restore'].append(t4 - t3)
    manager.close()
  finally:
    shutil.rmtree(root)  # our own temporary folder only
  stats = {k: common.summarize(v) for k, v in times.items()}
  machine = common.machine_info()
  print(common.machine_line(machine))
  print(f'state: {num_bytes / 1e6:.1f} MB on {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}')
  for k, s in stats.items():
    print(f"{k:14s} median {s['median'] * 1e3:7.1f} ms  (min "
          f"{s['min'] * 1e3:.1f}, max {s['max'] * 1e3:.1f}, n {s['n']})")
  common.write_json(args.out, {'machine': machine,
                               'state_bytes': num_bytes, 'seconds': stats})


if __name__ == '__main__':
  common.run(main)
