"""Times the MNIST CNN's training step for each op lowering and XLA flag set.

For every configuration (lowering variant x XLA flag set / process
environment) this measures

* the training step jitted per step (one dispatch per 512-image batch),
* k training steps inside one ``lax.scan`` over device-resident uint8 data
  (batches gathered by index and normalised /255 inside the step),
* forward-only evaluation of 10,000 images,

with warm-up excluded and several timed windows, and prints a table of
images/s (median and min-max over windows). XLA flags are read once, when
JAX initialises its backend, so each flag set runs in its own subprocess.

The network and optimiser are the tutorial's: conv1 32@5x5 SAME + ReLU,
2x2 max-pool, conv2 64@5x5 SAME + ReLU, 2x2 max-pool, fc3 1024@7x7 VALID +
ReLU, dropout 0.5, fc4 10@1x1; mean softmax cross-entropy; Adam with decoupled
weight decay 5e-4 on kernels. Data are fixed random images, so only speed is
meaningful.

Usage:
  python benchmarks/lowering.py [--variants fast,reference] \
      [--flagsets default,ynn_off] [--k 10] [--windows 5] [--out result.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# Flag sets: name -> (XLA_FLAGS, extra environment, description).
FLAG_SETS = {
    'default': ('', {}, 'jaxlib defaults'),
    'ynn_off': ('--xla_cpu_experimental_ynn_fusion_type=', {},
                'YNNPACK library fusions off (Eigen kernels for dot/conv)'),
    'onednn': ('--xla_cpu_use_onednn=true', {}, 'oneDNN rewrites on'),
    'onednn_cc': ('--xla_cpu_use_onednn=true '
                  '--xla_cpu_experimental_onednn_custom_call=true', {},
                  'oneDNN custom calls'),
    'ynn_noconv': ('--xla_cpu_experimental_ynn_fusion_type='
                   '-individual_convolution', {},
                   'YNNPACK fusions except individual convolutions'),
    'xnnpack': ('--xla_cpu_use_xnnpack=true', {}, 'XNNPACK on'),
    'xnn_graph': ('--xla_cpu_experimental_xnn_graph_fusion_mode='
                  'XNN_GRAPH_FUSION_MODE_GREEDY', {}, 'XNN graph fusion'),
    'no_eigen_mt': ('--xla_cpu_multi_thread_eigen=false', {},
                    'single-threaded Eigen'),
    'thp': ('', {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
            'default flags; malloc asks for transparent huge pages'),
    'ynn_off_thp': ('--xla_cpu_experimental_ynn_fusion_type=',
                    {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
                    'YNN fusions off + malloc transparent huge pages'),
}

VARIANTS = ('fast', 'fast_canonical', 'fast_autodiff_conv', 'reference')
# Variants whose convolution gradients are pathologically slow inside loops
# (jax-ml/jax#12868): their scan timing is skipped unless --scan-all.
_SCAN_PATHOLOGICAL = ('reference', 'fast_autodiff_conv')

BATCH = 512
EVAL_IMAGES = 10_000


# --------------------------------------------------------------------------
# Worker: runs inside the subprocess, after XLA_FLAGS are set.
# --------------------------------------------------------------------------


def _make_ops(variant):
  """Returns (conv1, conv2, pool, dense) implementations for a variant."""
  from mnist_jax import ops  # pylint: disable=g-import-not-at-top

  def canonical(x, k, padding):
    pads = ops._explicit_padding(k.shape[:2], padding)  # pylint: disable=protected-access
    return ops._conv2d_canonical_grads(x, k, pads)  # pylint: disable=protected-access

  if variant == 'fast':
    return ops.conv2d, ops.conv2d, ops.max_pool_2x2, ops.dense_conv
  if variant == 'fast_canonical':  # every conv via the canonical custom_vjp
    return canonical, canonical, ops.max_pool_2x2, ops.dense_conv
  if variant == 'fast_autodiff_conv':  # conv2 left to JAX's autodiff
    return ops.conv2d, ops.reference_conv2d, ops.max_pool_2x2, ops.dense_conv
  if variant == 'reference':
    return (ops.reference_conv2d, ops.reference_conv2d,
            ops.reference_max_pool_2x2, ops.reference_dense_conv)
  raise ValueError(f'unknown variant {variant!r}')


def _build(variant, k_steps):
  """Builds init, train step, scanned train steps and eval for a variant."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  conv1, conv2, pool, dense = _make_ops(variant)
  shapes = {'conv1': (5, 5, 1, 32), 'conv2': (5, 5, 32, 64),
            'fc3': (7, 7, 64, 1024), 'fc4': (1, 1, 1024, 10)}

  def init(key):
    params = {}
    for i, (name, shape) in enumerate(shapes.items()):
      fan_in = shape[0] * shape[1] * shape[2]
      params[name] = {
          'kernel': jax.random.truncated_normal(
              jax.random.fold_in(key, i), -2., 2., shape) / fan_in ** 0.5,
          'bias': jnp.full((shape[-1],), 0.1, jnp.float32)}
    return params

  def apply(params, images, dropout_key=None):
    x = jax.nn.relu(conv1(images, params['conv1']['kernel'], 'SAME')
                    + params['conv1']['bias'])
    x = pool(x)
    x = jax.nn.relu(conv2(x, params['conv2']['kernel'], 'SAME')
                    + params['conv2']['bias'])
    x = pool(x)
    x = jax.nn.relu(dense(x, params['fc3']['kernel']) + params['fc3']['bias'])
    if dropout_key is not None:
      keep = jax.random.bernoulli(dropout_key, 0.5, x.shape)
      x = jnp.where(keep, x / 0.5, 0.)
    x = dense(x, params['fc4']['kernel']) + params['fc4']['bias']
    return x.reshape(x.shape[0], -1)

  mask = lambda p: jax.tree.map_with_path(  # noqa: E731
      lambda path, _: path[-1].key == 'kernel', p)
  tx = optax.chain(optax.add_decayed_weights(5e-4, mask=mask),
                   optax.adam(1e-4))

  def loss_fn(params, images, labels, dropout_key):
    logits = apply(params, images, dropout_key)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  def train_step(params, opt_state, images_u8, labels, key, step):
    images = images_u8.astype(jnp.float32) / 255.
    loss, grads = jax.value_and_grad(loss_fn)(
        params, images, labels, jax.random.fold_in(key, step))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def scan_steps(params, opt_state, data, labels, indices, key, step0):
    def body(carry, idx):
      params, opt_state, step = carry
      params, opt_state, loss = train_step(
          params, opt_state, jnp.take(data, idx, axis=0),
          jnp.take(labels, idx, axis=0), key, step)
      return (params, opt_state, step + 1), loss
    (params, opt_state, _), losses = jax.lax.scan(
        body, (params, opt_state, step0), indices)
    return params, opt_state, losses

  scan_steps = jax.jit(scan_steps, donate_argnums=(0, 1))
  step_fn = jax.jit(train_step, donate_argnums=(0, 1))

  @jax.jit
  def eval_batch(params, images_u8):
    return jnp.argmax(apply(params, images_u8.astype(jnp.float32) / 255.), -1)

  return init, tx, step_fn, scan_steps, eval_batch


def _rate(fn, images_per_call, calls_per_window, windows):
  """Images/s per timed window; also images per CPU-second of this process.

  On a shared machine the wall-clock rate depends on what else runs; the
  CPU-time rate (user + system time of all our threads) is less sensitive to
  that and is reported alongside it.
  """
  rates, cpu_rates = [], []
  for _ in range(windows):
    cpu0 = time.process_time()
    start = time.perf_counter()
    for _ in range(calls_per_window):
      fn()
    images = images_per_call * calls_per_window
    rates.append(images / (time.perf_counter() - start))
    cpu_rates.append(images / max(time.process_time() - cpu0, 1e-9))
  return {'median': statistics.median(rates), 'min': min(rates),
          'max': max(rates), 'windows': [round(r, 1) for r in rates],
          'per_cpu_s_median': statistics.median(cpu_rates)}


def _worker(args):
  """Runs every variant in this process and prints one JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  n_data = 10_240
  data = jax.device_put(
      rng.integers(0, 256, (n_data, 28, 28, 1), dtype=np.uint8))
  labels = jax.device_put(rng.integers(0, 10, (n_data,), dtype=np.int32))
  key = jax.random.key(0)
  results = []
  for variant in args.variants.split(','):
    init, tx, step_fn, scan_steps, eval_batch = _build(variant, args.k)
    res = {'variant': variant}
    params = init(jax.random.key(1))
    opt_state = tx.init(params)
    state = {'params': params, 'opt': opt_state, 'step': 0}

    # Per-step jit: host supplies a fresh index batch each step (gathered on
    # host from the uint8 array, as a simple input pipeline would).
    data_np = np.asarray(data)
    labels_np = np.asarray(labels)

    def one_step():
      idx = rng.integers(0, n_data, BATCH)
      state['params'], state['opt'], loss = step_fn(
          state['params'], state['opt'], data_np[idx], labels_np[idx], key,
          state['step'])
      state['step'] += 1
      loss.block_until_ready()

    t0 = time.perf_counter()
    one_step()
    res['step_compile_s'] = time.perf_counter() - t0
    for _ in range(2):
      one_step()
    res['step'] = _rate(one_step, BATCH, args.steps_per_window, args.windows)

    if variant not in _SCAN_PATHOLOGICAL or args.scan_all:
      def k_steps():
        idx = jnp.asarray(rng.integers(0, n_data, (args.k, BATCH),
                                       dtype=np.int32))
        state['params'], state['opt'], losses = scan_steps(
            state['params'], state['opt'], data, labels, idx, key,
            jnp.int32(state['step']))
        state['step'] += args.k
        losses.block_until_ready()
      t0 = time.perf_counter()
      k_steps()
      res['scan_compile_s'] = time.perf_counter() - t0
      res['scan'] = _rate(k_steps, BATCH * args.k, 1, args.windows)

    eval_images = data[:EVAL_IMAGES]
    for bs in (1000, 2500):
      def evaluate(bs=bs):
        outs = [eval_batch(state['params'], eval_images[i:i + bs])
                for i in range(0, EVAL_IMAGES, bs)]
        jax.block_until_ready(outs)
      evaluate()
      res[f'eval_bs{bs}'] = _rate(evaluate, EVAL_IMAGES, 1, args.windows)
    results.append(res)
    print('#', json.dumps(res), file=sys.stderr, flush=True)
  print(json.dumps({'results': results}))


# --------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------


def _fmt(r):
  if not r:
    return '-'
  return (f"{r['median']:6.0f} ({r['min']:.0f}-{r['max']:.0f}) "
          f"[{r['per_cpu_s_median']:.0f}/cpu-s]")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', default='fast,fast_canonical,reference')
  parser.add_argument('--flagsets', default='default,ynn_off,ynn_noconv')
  parser.add_argument('--k', type=int, default=10,
                      help='training steps per lax.scan dispatch')
  parser.add_argument('--windows', type=int, default=5)
  parser.add_argument('--steps-per-window', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=1,
                      help='run the flag sets this many times, interleaved')
  parser.add_argument('--scan-all', action='store_true',
                      help='also time scans known to be pathological')
  parser.add_argument('--out', default=None, help='write JSON here')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args)
    return
  variants = ('fast', 'fast_canonical', 'fast_autodiff_conv', 'reference')
  for v in args.variants.split(','):
    if v not in variants:
      parser.error(f'--variants: unknown {v!r}; choose from {variants}')
  for f in args.flagsets.split(','):
    if f not in FLAG_SETS:
      parser.error(f'--flagsets: unknown {f!r}; choose from {tuple(FLAG_SETS)}')

  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  import jax  # pylint: disable=g-import-not-at-top  (versions only)
  import jaxlib  # pylint: disable=g-import-not-at-top
  report = {'machine': common.machine_info(),
            'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
            'user_XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
            'batch': BATCH, 'k': args.k, 'windows': args.windows,
            'steps_per_window': args.steps_per_window, 'runs': []}
  try:
    report['loadavg_start'] = os.getloadavg()
  except OSError:
    pass
  for rep in range(args.repeats):
    for name in args.flagsets.split(','):
      flags, extra_env, desc = FLAG_SETS[name]
      env = dict(os.environ)
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + flags).strip()
      env['MNIST_JAX_NO_XLA_FLAGS'] = '1'  # measure exactly this flag set
      env['PYTHONPATH'] = repo_root + os.pathsep + env.get('PYTHONPATH', '')
      env.update(extra_env)
      cmd = [sys.executable, os.path.abspath(__file__), '--worker',
             '--variants', args.variants, '--k', str(args.k),
             '--windows', str(args.windows),
             '--steps-per-window', str(args.steps_per_window)]
      if args.scan_all:
        cmd.append('--scan-all')
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            check=False)
      if proc.returncode:
        print(f'flag set {name} failed:\n{proc.stderr[-3000:]}',
              file=sys.stderr)
        continue
      out = json.loads(proc.stdout.strip().splitlines()[-1])
      for res in out['results']:
        res.update(flagset=name, XLA_FLAGS=env['XLA_FLAGS'],
                   extra_env=extra_env, description=desc, repeat=rep)
        report['runs'].append(res)
        print(f"{name:12s} {res['variant']:19s} step {_fmt(res.get('step'))}"
              f"  scan {_fmt(res.get('scan'))}"
              f"  eval(bs1000) {_fmt(res.get('eval_bs1000'))}"
              f"  eval(bs2500) {_fmt(res.get('eval_bs2500'))}", flush=True)
  try:
    report['loadavg_end'] = os.getloadavg()
  except OSError:
    pass
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  main()
