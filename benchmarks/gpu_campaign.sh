#!/usr/bin/env bash
# The GPU campaign behind docs/performance.md's GPU section, in one go:
# cold compilation (jit call vs ahead of time), the default 20-epoch run in
# float32 and bfloat16 from an empty compilation cache, then 2 rounds of the
# PyTorch reference and the project's throughput, alternating, then the whole
# loop against its training phase (epoch_overhead.py) in each dtype, and
# what each background hook costs the bfloat16 loop.
#   bash benchmarks/gpu_campaign.sh <MNIST IDX folder> <results folder>
# Needs torch (CUDA) beside the project; works without TensorFlow.
set -u
D=${1:?IDX folder}; R=${2:?results folder}
mkdir -p "$R"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run() { name=$1; shift; echo "=== $name start"; s=$(date +%s.%N); timeout "$@"; rc=$?
        echo "=== $name rc=$rc wall=$(python3 -c "import time;print(round(time.time()-$s,1))") s"; }
for m in jit aot; do run compile_$m 60 python3 benchmarks/compile_time.py --mode $m --data_dir "$D"; done
# The default 20-epoch runs start cold: a compilation cache of their own (in
# the results folder), never the user's ~/.cache/mnist_jax/jax_cache.
C="$R/jax_cache_cold"; rm -rf "$C"
run acc_f32 300 python3 benchmarks/accuracy.py --set data.source=idx --set data.dir="$D" --set compilation_cache_dir="$C/f32" --out "$R/accuracy_gpu.json"
run acc_bf16 300 python3 benchmarks/accuracy.py --set data.source=idx --set data.dir="$D" --set dtype=bfloat16 --set compilation_cache_dir="$C/bf16" --out "$R/accuracy_gpu_bfloat16.json"
for r in 1 2; do
  run torch_f32_$r 120 python3 benchmarks/torch_gpu.py --data_dir "$D" --epochs 6 --out "$R/sbs_torch_f32_$r.json"
  run proj_f32_$r 120 python3 benchmarks/throughput.py --data_dir "$D" --out "$R/sbs_proj_f32_$r.json"
  run torch_bf16_$r 120 python3 benchmarks/torch_gpu.py --data_dir "$D" --epochs 6 --dtype bfloat16 --out "$R/sbs_torch_bf16_$r.json"
  run proj_bf16_$r 120 python3 benchmarks/throughput.py --data_dir "$D" --set dtype=bfloat16 --out "$R/sbs_proj_bf16_$r.json"
done
for dt in float32 bfloat16; do  # the whole loop against bare training; the old dispatch settings beside it
  run overhead_$dt 120 python3 benchmarks/epoch_overhead.py --epochs 10 --rounds 2 --set data.source=idx --set data.dir="$D" --set dtype=$dt --variant steps_per_dispatch=10,overlap_epoch_end=no --variant= --out "$R/epoch_overhead_$dt.json"
done
# What each background hook costs the bfloat16 loop (its Python shares the interpreter with a dispatch every ~0.13 s).
run attribution_bfloat16 180 python3 benchmarks/epoch_overhead.py --epochs 10 --rounds 2 --set data.source=idx --set data.dir="$D" --set dtype=bfloat16 --variant= --variant without=SummaryHook --variant without=CheckpointHook --variant without=CheckpointHook+SummaryHook --out "$R/epoch_overhead_attribution_bfloat16.json"
