#!/usr/bin/env bash
# Run the benchmarks on a GPU machine and keep the logs (the GPU numbers in eval/RESULTS.md come
# from here). Each benchmark gets its own time limit, so one slow or failing benchmark does not
# cost the others.
#   scripts/gpu_bench.sh [LOG_DIR] [BENCHES]
#   scripts/gpu_bench.sh eval/logs/h100 "autoencoder diffusion"     # what issues 3 and 4 still need
set -uo pipefail
logs=${1:-eval/logs/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')}
benches=${2:-"autoencoder diffusion metrics audit"}
limit=${BENCH_TIMEOUT:-240}
mkdir -p "$logs"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
for bench in $benches; do
  case $bench in
    # channels-last vs channels-first for the VQ-GAN step (CUDA GroupNorm may copy channels-last
    # inputs), and MONAI's VQVAE at the same plan
    autoencoder) args=(--variants medgen:gan,medgen:gan:cf,medgen:ae,medgen:ae:cf,monai:ae) ;;
    # both plans (the 2D one has no GPU numbers yet); BENCH_COMPILE=1 adds torch.compile'd variants
    diffusion) args=(--dims 3,2 ${BENCH_COMPILE:+--compile}) ;;
    *) args=() ;;
  esac
  echo "=== bench_$bench ${args[*]}"
  PYTHONUNBUFFERED=1 timeout "$limit" python eval/bench_$bench.py "${args[@]}" 2>&1 | tee "$logs/bench_$bench.log"
done
