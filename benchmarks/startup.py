r"""Time from launch to the first completed training dispatch, cold and warm.

  python benchmarks/startup.py --out benchmarks/results/startup.json

Runs `python launch.py --config configs/default.py` in fresh processes and
measures the wall time from process start until the loop logs `First dispatch
done` (the first `steps_per_dispatch` steps have finished on the device):
  * cold: empty JAX compilation cache and empty decoded-data cache;
  * cold compile, warm data: empty compilation cache, data cache filled;
  * warm: both caches filled by an earlier run (the usual second launch).
Each case runs `--repeats` times; median and spread are reported.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = 'First dispatch done'


def first_dispatch_seconds(jax_cache: str, data_cache: str, tfds_dir: str,
                           timeout: float = 300) -> float:
  workdir = tempfile.mkdtemp(prefix='bench_startup_')
  cmd = [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
         os.path.join(ROOT, 'configs/default.py'), '--workdir', workdir,
         f'--config.compilation_cache_dir={jax_cache}',
         f'--config.data.cache_dir={data_cache}', '--alsologtostderr']
  env = dict(os.environ, TFDS_DATA_DIR=tfds_dir, PYTHONUNBUFFERED='1')
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
  seen = []
  try:
    for line in proc.stderr:
      if MARKER in line:
        return time.perf_counter() - t0
      seen.append(line)
      if time.perf_counter() - t0 > timeout:
        break
    errors = [l.strip() for l in seen if l.startswith('Error:')]
    raise SystemExit(errors[-1] if errors else  # the run's own one line
                     f'Error: no "{MARKER}" line from {" ".join(cmd)}; its '
                     f'output ended with: {"".join(seen[-5:])}')
  finally:
    proc.kill()
    proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--tfds_dir', default=os.environ.get(
      'TFDS_DATA_DIR', os.path.join(ROOT, '..', 'shared', 'tensorflow_datasets')))
  parser.add_argument('--out', default='benchmarks/results/startup.json')
  args = parser.parse_args()
  results = {'cold': [], 'cold_compile_warm_data': [], 'warm': []}
  for _ in range(args.repeats):
    scratch = tempfile.mkdtemp(prefix='bench_caches_')
    jax_cache = os.path.join(scratch, 'jax')
    data_cache = os.path.join(scratch, 'data')
    results['cold'].append(
        first_dispatch_seconds(jax_cache, data_cache, args.tfds_dir))
    shutil.rmtree(jax_cache, ignore_errors=True)
    results['cold_compile_warm_data'].append(
        first_dispatch_seconds(jax_cache, data_cache, args.tfds_dir))
    results['warm'].append(
        first_dispatch_seconds(jax_cache, data_cache, args.tfds_dir))
    shutil.rmtree(scratch, ignore_errors=True)
  summary = {k: common.summarize(v) for k, v in results.items()}
  machine = common.machine_info()
  print(common.machine_line(machine))
  print(f"{'case':>24} {'seconds to first dispatch (median, min-max)':>45}")
  for k, s in summary.items():
    print(f"{k:>24} {s['median']:8.2f} ({s['min']:.2f}-{s['max']:.2f})")
  common.write_json(args.out, {'machine': machine,
                               'results': summary,
                               'load_average': os.getloadavg()})


if __name__ == '__main__':
  main()
