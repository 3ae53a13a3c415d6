#!/usr/bin/env bash
# Run every benchmark on a GPU machine and keep the logs (the numbers in eval/RESULTS.md come from here).
#   scripts/gpu_bench.sh [LOG_DIR]
set -uo pipefail
logs=${1:-eval/logs/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')}
mkdir -p "$logs"
for bench in diffusion autoencoder metrics audit; do
  echo "=== bench_$bench"
  PYTHONUNBUFFERED=1 python eval/bench_$bench.py 2>&1 | tee "$logs/bench_$bench.log"
done
