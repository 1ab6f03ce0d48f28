r"""PyTorch side of `op_breakdown.py`: one training step's ops, timed singly.

Runs in the PyTorch venv (needs only torch; no JAX, no project imports):

  TORCH_PYTHON benchmarks/torch_ops.py --threads 2 [--profile]

Prints one JSON object with {op name: ms} (median wall time of `--calls`
calls after two warm-up calls) and {op name: CPU ms per call}, with the names `op_breakdown.py` uses. The network is the
reference's (`../shared/bench/torch_cnn.py`: NCHW, fc3 a 7x7 convolution, fc4
a 1x1 convolution, Adam with L2 on the kernels); `--profile` adds
torch.profiler's per-op self-CPU times of whole training steps.
"""

import argparse
import json
import os
import statistics
import time


def bench(fn, calls: int) -> tuple[float, float]:
  """(median wall ms, mean CPU ms of this process) of `calls` calls."""
  fn()
  fn()
  times = []
  cpu0 = time.process_time()
  for _ in range(calls):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  cpu = (time.process_time() - cpu0) / calls
  return 1000 * statistics.median(times), 1000 * cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--calls', type=int, default=8)
  parser.add_argument('--profile', action='store_true')
  args = parser.parse_args()
  os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  b, n = args.batch, args.calls
  grad = torch.nn.grad
  x0 = torch.rand(b, 1, 28, 28)
  w1, g1 = torch.randn(32, 1, 5, 5), torch.randn(b, 32, 28, 28)
  x1, w2 = torch.randn(b, 32, 14, 14), torch.randn(64, 32, 5, 5)
  g2 = torch.randn(b, 64, 14, 14)
  x3, w3 = torch.randn(b, 64, 7, 7), torch.randn(1024, 64, 7, 7)
  g3 = torch.randn(b, 1024, 1, 1)
  x4, w4, g4 = torch.randn(b, 1024, 1, 1), torch.randn(10, 1024, 1, 1), \
      torch.randn(b, 10, 1, 1)
  a3, m3 = x3.reshape(b, -1), w3.reshape(1024, -1)
  h3 = g3.reshape(b, 1024)

  def pool(shape):
    x = torch.randn(*shape, requires_grad=True)

    def fb():
      y = F.max_pool2d(x, 2)
      y.backward(torch.ones_like(y))
    return fb

  r = {}
  r['conv1 fwd'] = bench(lambda: F.conv2d(x0, w1, padding=2), n)
  r['conv1 kernel grad'] = bench(
      lambda: grad.conv2d_weight(x0, w1.shape, g1, padding=2), n)
  r['pool1 fwd+bwd'] = bench(pool((b, 32, 28, 28)), n)
  r['conv2 fwd'] = bench(lambda: F.conv2d(x1, w2, padding=2), n)
  r['conv2 input grad'] = bench(
      lambda: grad.conv2d_input(x1.shape, w2, g2, padding=2), n)
  r['conv2 kernel grad'] = bench(
      lambda: grad.conv2d_weight(x1, w2.shape, g2, padding=2), n)
  r['pool2 fwd+bwd'] = bench(pool((b, 64, 14, 14)), n)
  r['fc3 fwd'] = bench(lambda: F.conv2d(x3, w3), n)
  r['fc3 input grad'] = bench(lambda: grad.conv2d_input(x3.shape, w3, g3), n)
  r['fc3 kernel grad'] = bench(
      lambda: grad.conv2d_weight(x3, w3.shape, g3), n)
  r['fc3 fwd as matmul'] = bench(lambda: a3 @ m3.T, n)
  r['fc3 grads as 2 matmuls'] = bench(lambda: (h3 @ m3, h3.T @ a3), n)
  r['fc4 fwd+grads'] = bench(lambda: (
      F.conv2d(x4, w4), grad.conv2d_input(x4.shape, w4, g4),
      grad.conv2d_weight(x4, w4.shape, g4)), n)

  # Adam over the network's parameters (L2 on the kernels, as the reference).
  kernels = [torch.nn.Parameter(w.clone()) for w in (w1, w2, w3, w4)]
  biases = [torch.nn.Parameter(torch.zeros(c)) for c in (32, 64, 1024, 10)]
  for p in kernels + biases:
    p.grad = torch.randn_like(p)
  opt = torch.optim.Adam([{'params': kernels, 'weight_decay': 5e-4},
                          {'params': biases, 'weight_decay': 0.0}], lr=1e-3)
  r['adam'] = bench(opt.step, n)

  # The whole training step (the reference model, written functionally).
  params = kernels + biases
  labels = torch.randint(0, 10, (b,))

  def step():
    opt.zero_grad(set_to_none=True)
    y = F.max_pool2d(F.relu(F.conv2d(x0, kernels[0], biases[0], padding=2)), 2)
    y = F.max_pool2d(F.relu(F.conv2d(y, kernels[1], biases[1], padding=2)), 2)
    y = F.dropout(F.relu(F.conv2d(y, kernels[2], biases[2])), 0.5)
    y = F.conv2d(y, kernels[3], biases[3]).flatten(1)
    F.cross_entropy(y, labels).backward()
    opt.step()

  r['whole step'] = bench(step, n)
  out = {'ms': {op: v[0] for op, v in r.items()},
         'cpu_ms': {op: v[1] for op, v in r.items()},
         'torch_version': torch.__version__,
         'threads': torch.get_num_threads(), 'params': sum(
             p.numel() for p in params)}
  if args.profile:
    from torch import profiler  # pylint: disable=g-import-not-at-top
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
      for _ in range(3):
        step()
    out['profile_self_ms_per_step'] = {
        e.key: e.self_cpu_time_total / 1000 / 3
        for e in sorted(prof.key_averages(),
                        key=lambda e: -e.self_cpu_time_total)[:20]}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
