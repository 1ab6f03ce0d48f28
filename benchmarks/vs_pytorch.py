r"""The project against the PyTorch reference, side by side on this machine.

  python benchmarks/vs_pytorch.py --torch_python /work/torch-venv/bin/python
  TORCH_PYTHON=~/.venvs/torch-ref/bin/python python benchmarks/vs_pytorch.py \
      --rounds 3 --out benchmarks/results/   # the default: vs_pytorch_<cpu>.json

Throughput mode (default) interleaves, `--rounds` times, A B A B ...:
  A  PyTorch eager (`../shared/bench/torch_cnn.py --mode throughput`, a
     subprocess with its own Python; the same network, loss, Adam, batch 512);
  B  the project: the bare compiled train_fn (`throughput.make_bare_epoch`,
     one epoch of dispatches a window, compiled once before round 1) and then
     end-to-end training (`throughput.end_to_end`: `train_and_evaluate` with
     the default hooks, one timed epoch after a compiling one).
In bfloat16 (`--set dtype=bfloat16`), PyTorch runs under CPU autocast to
bfloat16 (`torch_autocast.py`), its own mixed precision; `--torch_args
--channels-last` gives it NHWC, its fastest layout in bfloat16 here.
With `--xla_baseline`, every round also times the bare step compiled without
the oneDNN kernels (`MNIST_JAX_NO_ONEDNN=1`: the pure-XLA lowering), after the
project's. Each project figure is divided by the PyTorch figure of its own round, so a
ratio never mixes load conditions further apart than one round. The load
average is recorded before every measurement.

Accuracy mode (`--mode accuracy --epochs N`) trains both on real MNIST once
(PyTorch first) and reports the training seconds until the test accuracy first
reaches `--target` (evaluated after every epoch by both).
"""

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mnist_jax  # noqa: E402,F401  (XLA flags first)

from benchmarks import common  # noqa: E402
from benchmarks import throughput  # noqa: E402
from configs import default  # noqa: E402
from mnist_jax import onednn  # noqa: E402
from mnist_jax import train  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED = os.path.join(_HERE, '..', '..', 'shared')
_RESULT_RE = re.compile(r'^RESULT (.*)$', re.M)


def _load() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def _torch_bf16(args) -> bool:
  """PyTorch runs under bfloat16 autocast when the project computes in
  bfloat16: each framework's mixed precision, compared like with like."""
  return _config(args).dtype == 'bfloat16'


def run_torch(args, mode: str, extra: list[str]) -> dict:
  """Runs torch_cnn.py in its own interpreter; returns its RESULT fields."""
  cmd = [args.torch_python]
  if _torch_bf16(args):
    cmd.append(os.path.join(_HERE, 'torch_autocast.py'))
  cmd += ([args.torch_script, '--mode', mode, '--threads', str(args.threads)]
          + args.torch_args.split() + extra)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  match = _RESULT_RE.search(proc.stdout)
  if proc.returncode or not match:
    raise RuntimeError(f'{" ".join(cmd)} failed (exit {proc.returncode}):\n'
                       f'{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}')
  fields = dict(f.split('=', 1) for f in match.group(1).split())
  fields['stdout'] = proc.stdout
  return fields


def _config(args):
  config = default.get_config()
  config.data.source = 'idx'
  config.data.dir = args.data_dir
  for assignment in args.set:
    common.override(config, assignment)
  return config


def throughput_campaign(args) -> dict:
  config = _config(args)
  bare_epoch, _ = throughput.make_bare_epoch(config)
  bare_epoch()  # compiles every dispatch length
  if args.xla_baseline:
    os.environ[onednn.DISABLE_ENV_VAR] = '1'  # read when tracing
    xla_epoch, _ = throughput.make_bare_epoch(config)
    xla_epoch()
    del os.environ[onednn.DISABLE_ENV_VAR]
  torch_extra = ['--windows', str(args.torch_windows)]
  rounds = []
  for r in range(args.rounds):
    row = {'round': r}
    row['load_torch'] = _load()
    res = run_torch(args, 'throughput', torch_extra)
    row['torch'] = {k: res[k] for k in ('images_per_s', 'ips_min', 'ips_max',
                                        'cpu_util', 'torch_version')}
    torch_ips = float(res['images_per_s'])
    row['load_bare'] = _load()
    bare = [bare_epoch() for _ in range(args.bare_windows)]
    row['bare'] = common.summarize(bare)
    row['bare_ratio'] = row['bare']['median'] / torch_ips
    if args.xla_baseline:
      row['load_xla_only'] = _load()
      row['bare_xla_only'] = common.summarize(
          xla_epoch() for _ in range(args.bare_windows))
      row['xla_only_ratio'] = row['bare_xla_only']['median'] / torch_ips
    if not args.skip_e2e:
      row['load_e2e'] = _load()
      e2e_config = config.copy_and_resolve_references()
      e2e_config.write_report = False
      train_phase, whole, _ = throughput.end_to_end(e2e_config, 1)
      row['e2e_train'], row['e2e_whole_loop'] = train_phase, whole
      row['e2e_ratio'] = train_phase['median'] / torch_ips
      row['whole_loop_vs_train'] = whole['median'] / train_phase['median']
    rounds.append(row)
    print(f"round {r}: torch {torch_ips:7.0f} img/s "
          f"({res['ips_min']}-{res['ips_max']}) | bare "
          f"{row['bare']['median']:7.0f} ({row['bare_ratio']:.2f}x)"
          + (f" | bare pure XLA {row['bare_xla_only']['median']:7.0f} "
             f"({row['xla_only_ratio']:.2f}x)" if args.xla_baseline else '')
          + ('' if args.skip_e2e else
             f" | e2e train {row['e2e_train']['median']:7.0f} "
             f"({row['e2e_ratio']:.2f}x), whole loop "
             f"{row['e2e_whole_loop']['median']:7.0f}")
          + f" | load {row['load_torch']}", flush=True)

  summary = {'torch': common.summarize(
      float(r['torch']['images_per_s']) for r in rounds)}
  summary['bare'] = common.summarize(r['bare']['median'] for r in rounds)
  summary['bare_ratio'] = common.summarize(r['bare_ratio'] for r in rounds)
  if args.xla_baseline:
    summary['bare_xla_only'] = common.summarize(
        r['bare_xla_only']['median'] for r in rounds)
    summary['xla_only_ratio'] = common.summarize(
        r['xla_only_ratio'] for r in rounds)
  if not args.skip_e2e:
    summary['e2e_train'] = common.summarize(
        r['e2e_train']['median'] for r in rounds)
    summary['e2e_whole_loop'] = common.summarize(
        r['e2e_whole_loop']['median'] for r in rounds)
    summary['e2e_ratio'] = common.summarize(r['e2e_ratio'] for r in rounds)
    summary['whole_loop_vs_train'] = common.summarize(
        r['whole_loop_vs_train'] for r in rounds)
  variant = (' bf16 AMP' if _torch_bf16(args) else '') + (
      ' NHWC' if '--channels-last' in args.torch_args else '')
  return {'rounds': rounds, 'summary': summary, 'torch_variant': variant,
          'project_dtype': config.dtype}


def _print_summary(machine, out):
  s = out['summary']
  fmt = lambda x, f='7.0f': (f"{x['median']:{f}} ({x['min']:{f.replace('7', '')}}"
                             f"-{x['max']:{f.replace('7', '')}})")
  print('\n' + common.machine_line(machine))
  print(f"  PyTorch eager{out['torch_variant']:12s}{fmt(s['torch'])} img/s")
  print(f"  project bare step        {fmt(s['bare'])} img/s   ratio "
        f"{fmt(s['bare_ratio'], '7.2f')}")
  if 'bare_xla_only' in s:
    print(f"  bare step, pure XLA      {fmt(s['bare_xla_only'])} img/s   ratio "
          f"{fmt(s['xla_only_ratio'], '7.2f')}")
  if 'e2e_train' in s:
    print(f"  project end to end       {fmt(s['e2e_train'])} img/s   ratio "
          f"{fmt(s['e2e_ratio'], '7.2f')}")
    print(f"  whole loop (eval, ckpt)  {fmt(s['e2e_whole_loop'])} img/s   "
          f"{fmt(s['whole_loop_vs_train'], '7.3f')} of the training phase")


def _time_to_target(epochs, target):
  seconds = 0.0
  for e in epochs:
    seconds += e['train_s']
    if e['test_acc'] >= target:
      return {'epoch': e['epoch'], 'train_seconds': seconds}
  return None


def accuracy_campaign(args) -> dict:
  """Both frameworks on real MNIST; training seconds to reach the target."""
  load = {'torch': _load()}
  res = run_torch(args, 'accuracy', ['--epochs', str(args.epochs),
                                     '--data-dir', args.data_dir])
  torch_epochs = [
      {'epoch': i + 1, 'test_acc': float(a), 'train_s': float(t)}
      for i, (a, t) in enumerate(zip(res['test_acc'].split(','),
                                     res['train_s_per_epoch'].split(',')))]
  config = _config(args)
  config.num_epochs = args.epochs
  config.write_report = False
  load['project'] = _load()
  t0 = time.perf_counter()
  result = train.train_and_evaluate(
      config, common.scratch_dir('vs_torch_acc_'))
  wall = time.perf_counter() - t0
  project_epochs = [{'epoch': r['epoch'], 'test_acc': r['test_accuracy'],
                     'train_s': r['train_seconds']} for r in result['epochs']]
  out = {'target': args.target, 'epochs': args.epochs, 'load': load,
         'torch': {'epochs': torch_epochs,
                   'reached': _time_to_target(torch_epochs, args.target)},
         'project': {'epochs': project_epochs, 'wall_seconds': wall,
                     'reached': _time_to_target(project_epochs, args.target)}}
  print(f"{'epoch':>5} {'torch acc':>10} {'torch s':>8} {'jax acc':>10} "
        f"{'jax s':>8}")
  for t, p in zip(torch_epochs, project_epochs):
    print(f"{t['epoch']:5d} {t['test_acc']:10.2%} {t['train_s']:8.1f} "
          f"{p['test_acc']:10.2%} {p['train_s']:8.1f}")
  print(f"{args.target:.1%} test accuracy reached: PyTorch "
        f"{out['torch']['reached']}, project {out['project']['reached']}")
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mode', default='throughput',
                      choices=('throughput', 'accuracy'))
  parser.add_argument('--torch_python', default=os.environ.get(
      'TORCH_PYTHON', ''), help='Python of the PyTorch venv (or TORCH_PYTHON)')
  parser.add_argument('--torch_script', default=os.path.join(
      _SHARED, 'bench', 'torch_cnn.py'))
  parser.add_argument('--torch_args', default='',
                      help="extra torch_cnn.py flags, e.g. '--channels-last' "
                      '(NHWC: PyTorch\'s fastest layout in bfloat16 here)')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--bare_windows', type=int, default=1,
                      help='bare-step epochs timed per round')
  parser.add_argument('--torch_windows', type=int, default=5,
                      help='10-step PyTorch windows per round')
  parser.add_argument('--skip_e2e', action='store_true')
  parser.add_argument('--xla_baseline', action='store_true',
                      help='also time the bare step without oneDNN kernels')
  parser.add_argument('--epochs', type=int, default=8,
                      help='accuracy mode: epochs each framework trains')
  parser.add_argument('--target', type=float, default=0.99)
  parser.add_argument('--data_dir', default=os.path.join(
      _SHARED, 'data', 'mnist'))
  parser.add_argument('--set', action='append', default=[],
                      help='config override key=value (repeatable)')
  parser.add_argument('--out', default='benchmarks/results/',
                      help='JSON path, or a folder for vs_pytorch_<cpu>.json')
  args = parser.parse_args()
  if not args.torch_python:
    parser.error('give --torch_python or set TORCH_PYTHON (see '
                 '../shared/bench/README.md for the PyTorch venv)')
  machine = common.machine_info()
  started = _load()
  if args.mode == 'throughput':
    out = throughput_campaign(args)
    _print_summary(machine, out)
  else:
    out = accuracy_campaign(args)
  out.update(machine=machine, mode=args.mode, args=vars(args),
             load_start=started, load_end=_load())
  path = args.out
  if path.endswith('/') or os.path.isdir(path):
    suffix = '' if args.mode == 'throughput' else '_accuracy'
    dtype = _config(args).dtype
    suffix += '' if dtype == 'float32' else f'_{dtype}'
    path = os.path.join(path, f'vs_pytorch_{common.cpu_slug(machine)}'
                        f'{suffix}.json')
  common.write_json(path, out)


if __name__ == '__main__':
  common.run(main)
