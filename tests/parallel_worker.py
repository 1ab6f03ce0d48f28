"""Short training runs in a fresh process, for tests/test_parallel.py.

  python tests/parallel_worker.py SPEC.json OUT.json

The process's devices come from XLA_FLAGS and its place in a multi-process
run from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, all set
by the test before JAX starts. SPEC: {"idx_dir", "runs": [{"name",
"overrides": {dotted field: value}, "workdir", "checkpoint": bool}]}.
Writes, per run, the per-step training losses, the final metrics, the dtypes
of parameters and optimizer state, how many examples each evaluation split
counted, and the dataset rows this process's devices gathered for step 0.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402  (puts the repo on sys.path; tiny config)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from mnist_jax import input_pipeline  # noqa: E402
from mnist_jax import parallel  # noqa: E402
from mnist_jax import steps  # noqa: E402
from mnist_jax import train  # noqa: E402
from mnist_jax.hooks import base  # noqa: E402
from mnist_jax.hooks import checkpoint  # noqa: E402


class Recorder(base.Hook):
  """Collects what the test compares, from what the loop hands the hooks."""

  def __init__(self):
    self.losses = []
    self.out = {}

  def on_metrics(self, run, first_step, metrics):
    self.losses += list(np.asarray(metrics.loss.total / metrics.loss.count,
                                   np.float64))

  def on_train_end(self, run, step, state, result):
    leaves = jax.tree.leaves((state.params, state.opt_state))
    self.out['param_dtypes'] = sorted(
        {str(x.dtype) for x in jax.tree.leaves(state.params)})
    self.out['float_state_dtypes'] = sorted(
        {str(x.dtype) for x in leaves if jax.numpy.issubdtype(
            x.dtype, jax.numpy.floating)})
    self.out['eval_counts'] = {
        name: int(jax.device_get(run.eval_fn(state.variables, split))
                  .accuracy.count)
        for name, split in run.eval_splits.items()}
    self.out['local_rows'] = local_batch_rows(run)


def local_batch_rows(run):
  """Rows of step 0's global batch that this process's devices gather, with
  the same index code and sharding as the training step."""
  config, n = run.config, len(run.data.train)
  mesh = run.mesh
  perm = jax.jit(lambda key: input_pipeline.epoch_permutation(key, 0, n),
                 out_shardings=jax.NamedSharding(mesh, jax.P()))(
                     run.rngs['data'])
  idx = jax.jit(lambda p: steps.batch_indices(
      p, 0, batch_size=config.batch_size, spe=run.steps_per_epoch),
                out_shardings=jax.NamedSharding(mesh, jax.P('data')))(perm)
  shards = sorted(idx.addressable_shards, key=lambda s: s.index[0].start or 0)
  return {'rows': [int(r) for s in shards for r in np.asarray(s.data)],
          'global_batch': [int(r) for r in
                           np.asarray(perm.addressable_data(0))[
                               :config.batch_size]]}


def main(spec_path, out_path):
  with open(spec_path) as f:
    spec = json.load(f)
  results = {}
  for run in spec['runs']:
    config = conftest.tiny_config_for(spec['idx_dir'])
    config.write_report = False
    for key, value in run.get('overrides', {}).items():
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
    if run is spec['runs'][0]:
      parallel.initialize_distributed(config)  # from the environment
    recorder = Recorder()
    hooks = [recorder]
    if run.get('checkpoint'):
      hooks.insert(0, checkpoint.CheckpointHook())
    result = train.train_and_evaluate(config, run['workdir'], hooks=hooks)
    results[run['name']] = dict(
        recorder.out, losses=recorder.losses, final=result['final'],
        step=result['step'],
        compile_seconds=result['epochs'][0].get('compile_seconds'),
        process=jax.process_index(),
        processes=jax.process_count(), devices=jax.device_count())
  with open(out_path, 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
