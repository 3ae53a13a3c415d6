#!/usr/bin/env bash
# Train on every GPU of this machine with accelerate (DDP, bf16).
#   scripts/launch_multi_gpu.sh autoencoder configs/medical_diffusion_vqgan_3d.yaml runs/vqgan data.path=/data/brain
#   scripts/launch_multi_gpu.sh diffusion   configs/medical_diffusion_ldm_3d.yaml runs/ldm autoencoder.run=runs/vqgan
# Resume after a crash or preemption: add `--resume latest` (same command otherwise).
# NUM_GPUS overrides the count; extra `key=value` arguments are config overrides.
set -euo pipefail
stage=${1:?stage: autoencoder|diffusion}; config=${2:?config yaml}; out=${3:?run dir}; shift 3
gpus=${NUM_GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec accelerate launch --multi_gpu --num_processes "$gpus" --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  -m medgen train "$stage" --config "$config" --out "$out" train.mixed_precision=bf16 "$@"
