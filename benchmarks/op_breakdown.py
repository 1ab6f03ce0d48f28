r"""Per-op time of one training step: XLA:CPU (mnist_jax.ops) beside PyTorch.

  python benchmarks/op_breakdown.py --torch_python /work/torch-venv/bin/python
  python benchmarks/op_breakdown.py --torch_python ... --rounds 3 \
      --out benchmarks/results/   # perf_breakdown_<cpu>.json and .md

Every op of the tutorial network's training step at batch 512 is jitted on
its own (gradients through `jax.vjp` of the op as the model lowers it, so
unused outputs are dead code) and timed as the median of `--calls` calls
after warm-up. The PyTorch side (`torch_ops.py`, run in the PyTorch venv)
times the same ops as the reference model computes them (NCHW, oneDNN; fc3
and fc4 as convolutions). The two alternate, `--rounds` times, and each op's
figure is the median over rounds. The whole step is also timed (jit of one
`steps.train_step`, fixed batch), so the sum of the ops can be compared with
it (the difference is fused elementwise work, loss and dispatch). The project
is timed twice per round: as it runs (with the oneDNN kernels of
`mnist_jax.onednn` where available) and pure XLA (`MNIST_JAX_NO_ONEDNN=1`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mnist_jax  # noqa: E402,F401  (XLA flags first)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import default  # noqa: E402
from mnist_jax import models  # noqa: E402
from mnist_jax import onednn  # noqa: E402
from mnist_jax import ops  # noqa: E402
from mnist_jax import steps  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))

# Row order of the table; (op, what it is).
OPS = (
    ('conv1 fwd', '5x5x1->32 SAME, 28x28'),
    ('conv1 kernel grad', ''),
    ('pool1 fwd+bwd', '2x2 max-pool of 28x28x32'),
    ('conv2 fwd', '5x5x32->64 SAME, 14x14'),
    ('conv2 input grad', ''),
    ('conv2 kernel grad', ''),
    ('pool2 fwd+bwd', '2x2 max-pool of 14x14x64'),
    ('fc3 fwd', '7x7x64->1024 (XLA: matmul; PyTorch: conv)'),
    ('fc3 input grad', ''),
    ('fc3 kernel grad', ''),
    ('fc4 fwd+grads', '1024->10'),
    ('adam', 'L2 + Adam over 3.27 M parameters'),
    ('whole step', 'fwd + bwd + Adam, one batch'),
)


def bench(fn, *args, calls: int) -> tuple[float, float]:
  """(median wall ms, mean CPU ms) of `calls` calls of a jitted fn.

  CPU time (user + system, all threads of this process) is less sensitive
  than wall time to other processes sharing the cores.
  """
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  cpu0 = time.process_time()
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  cpu = (time.process_time() - cpu0) / calls
  return 1000 * statistics.median(times), 1000 * cpu


def _vjp_wrt(op, which: int):
  """jit of (args..., g) -> gradient of op(*args) with respect to args[which]."""
  def f(*args):
    *inputs, g = args
    def partial_op(v):
      full = list(inputs)
      full[which] = v
      return op(*full)
    return jax.vjp(partial_op, inputs[which])[1](g)[0]
  return jax.jit(f)


def jax_ops(batch: int, calls: int, config) -> dict:
  keys = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda *shape: jax.random.normal(next(keys), shape)  # noqa: E731
  b = batch
  conv = lambda x, w: ops.conv2d(x, w, 'SAME')  # noqa: E731
  x0, w1, g1 = normal(b, 28, 28, 1), normal(5, 5, 1, 32), normal(b, 28, 28, 32)
  x1, w2, g2 = normal(b, 14, 14, 32), normal(5, 5, 32, 64), normal(
      b, 14, 14, 64)
  x3, w3, g3 = normal(b, 7, 7, 64), normal(7, 7, 64, 1024), normal(
      b, 1, 1, 1024)
  x4, w4, g4 = normal(b, 1, 1, 1024), normal(1, 1, 1024, 10), normal(
      b, 1, 1, 10)
  p1, p2 = normal(b, 28, 28, 32), normal(b, 14, 14, 64)
  r = {}
  r['conv1 fwd'] = bench(jax.jit(conv), x0, w1, calls=calls)
  r['conv1 kernel grad'] = bench(_vjp_wrt(conv, 1), x0, w1, g1, calls=calls)
  pool_fb = jax.jit(lambda x, g: jax.vjp(ops.max_pool_2x2, x)[1](g)[0])
  r['pool1 fwd+bwd'] = bench(pool_fb, p1, g1[:, ::2, ::2], calls=calls)
  r['conv2 fwd'] = bench(jax.jit(conv), x1, w2, calls=calls)
  r['conv2 input grad'] = bench(_vjp_wrt(conv, 0), x1, w2, g2, calls=calls)
  r['conv2 kernel grad'] = bench(_vjp_wrt(conv, 1), x1, w2, g2, calls=calls)
  r['pool2 fwd+bwd'] = bench(pool_fb, p2, g2[:, ::2, ::2], calls=calls)
  r['fc3 fwd'] = bench(jax.jit(ops.dense_conv), x3, w3, calls=calls)
  r['fc3 input grad'] = bench(_vjp_wrt(ops.dense_conv, 0), x3, w3, g3,
                              calls=calls)
  r['fc3 kernel grad'] = bench(_vjp_wrt(ops.dense_conv, 1), x3, w3, g3,
                               calls=calls)
  fc4 = jax.jit(lambda x, w, g: (ops.dense_conv(x, w),) + jax.vjp(
      ops.dense_conv, x, w)[1](g))
  r['fc4 fwd+grads'] = bench(fc4, x4, w4, g4, calls=calls)

  # Adam (with the L2 term) exactly as the project's optimizer, state donated.
  model = models.create_model(config)
  state = steps.create_train_state(config, model, 55_000, jax.random.key(0))
  grads = jax.tree.map(jnp.ones_like, state.params)
  apply = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
  holder = {'state': state}

  def adam():
    holder['state'] = apply(holder['state'], grads)
    return holder['state']
  r['adam'] = bench(adam, calls=calls)

  step = jax.jit(steps.train_step, donate_argnums=0)
  batch_data = {'image': jax.random.uniform(next(keys), (b, 28, 28, 1)),
                'label': jax.random.randint(next(keys), (b,), 0, 10)}
  rng = jax.random.key(1)

  def whole():
    holder['state'], metrics = step(holder['state'], batch_data, rng)
    return metrics
  r['whole step'] = bench(whole, calls=calls)
  return ({op: v[0] for op, v in r.items()},
          {op: v[1] for op, v in r.items()})


def torch_ops(args) -> dict:
  cmd = [args.torch_python, os.path.join(_HERE, 'torch_ops.py'),
         '--threads', str(args.threads), '--batch', str(args.batch),
         '--calls', str(args.calls)] + (['--profile'] if args.profile else [])
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(machine: dict, table: dict, load: list, unit: str,
             header: bool = True, batch: int = 512) -> str:
  lines = [] if not header else [
      f"# Per-op time of one training step, batch {batch}: XLA:CPU vs "
      "PyTorch",
      '',
      f"Machine: {common.machine_line(machine)}. jax "
      f"{machine['versions']['jax']}, XLA_FLAGS "
      f"`{machine['xla_flags']}`. Load averages during the runs: {load}.",
      '',
      'Per call, median over rounds (min-max over rounds) of: wall ms, the '
      'median of single calls; CPU ms, the mean CPU time of this process '
      '(all threads) per call, which other processes on the cores disturb '
      'less. Written by `benchmarks/op_breakdown.py`.',
      '']
  lines += [
      f'## {unit}',
      '',
      '| op | shape | PyTorch | XLA only | project (XLA + oneDNN) | '
      'project / PyTorch |',
      '|---|---|---|---|---|---|']
  cell = lambda x: f"{x['median']:.1f} ({x['min']:.1f}-{x['max']:.1f})"  # noqa: E731
  for op, what in OPS:
    t, x, p = (table[n][op] for n in ('torch', 'xla_only', 'jax'))
    ratio = (f"{p['median'] / t['median']:.2f}" if t['median'] > 0
             else '-')  # (an op too fast to time)
    lines.append(f"| {op} | {what} | {cell(t)} | {cell(x)} | {cell(p)} | "
                 f"{ratio} |")
  for name in ('torch', 'xla_only', 'jax'):
    parts = sum(table[name][op]['median'] for op, _ in OPS[:-1])
    lines.append(f"\nSum of the ops, {name}: {parts:.0f}; whole step "
                 f"{table[name]['whole step']['median']:.0f}.")
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--torch_python', default=os.environ.get(
      'TORCH_PYTHON', ''))
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--calls', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--profile', action='store_true',
                      help='add torch.profiler self times of whole steps')
  parser.add_argument('--out', default='benchmarks/results/')
  args = parser.parse_args()
  if not args.torch_python:
    parser.error('give --torch_python or set TORCH_PYTHON')
  config = default.get_config()
  runs = {'torch': [], 'xla_only': [], 'jax': []}
  cpu_runs = {name: [] for name in runs}
  load = []
  extra = {}
  for r in range(args.rounds):
    load.append([round(v, 2) for v in os.getloadavg()])
    t = torch_ops(args)
    runs['torch'].append(t['ms'])
    cpu_runs['torch'].append(t['cpu_ms'])
    extra = {k: v for k, v in t.items() if k != 'ms'}
    os.environ[onednn.DISABLE_ENV_VAR] = '1'
    for name in ('xla_only', 'jax'):
      if name == 'jax':
        del os.environ[onednn.DISABLE_ENV_VAR]
      wall, cpu = jax_ops(args.batch, args.calls, config)
      runs[name].append(wall)
      cpu_runs[name].append(cpu)
    print(f'round {r} (torch/xla only/project ms): ' + ', '.join(
        f"{op} " + '/'.join(f'{runs[n][-1][op]:.1f}' for n in runs)
        for op, _ in OPS), flush=True)
  table = {name: {op: common.summarize(run[op] for run in runs[name])
                  for op, _ in OPS} for name in runs}
  cpu_table = {name: {op: common.summarize(run[op] for run in cpu_runs[name])
                      for op, _ in OPS} for name in runs}
  machine = common.machine_info()
  md = markdown(machine, table, load, 'Wall ms', batch=args.batch)
  md += '\n' + markdown(machine, cpu_table, load, 'CPU ms (all threads)',
                        header=False)
  print(md)
  path = args.out
  if path.endswith('/') or os.path.isdir(path):
    path = os.path.join(path, f'perf_breakdown_{common.cpu_slug(machine)}')
  path = path.removesuffix('.json')
  common.write_json(path + '.json', {'machine': machine, 'ms': table,
                                     'cpu_ms': cpu_table,
                                     'load': load, 'torch': extra,
                                     'args': vars(args)})
  with open(path + '.md', 'w') as f:
    f.write(md)


if __name__ == '__main__':
  common.run(main)
