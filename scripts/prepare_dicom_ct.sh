#!/usr/bin/env bash
# Example: turn a folder of CT studies (one sub-folder per DICOM series) into a medgen dataset with
# labels, check it, and train the 3D VQ-GAN on it with a soft-tissue HU window.
#   scripts/prepare_dicom_ct.sh /data/ct_studies labels.csv runs/ct_vqgan
# labels.csv: `series_folder,label,patient_id` (one row per series folder name).
set -euo pipefail
src=${1:?folder of DICOM series folders}; labels=${2:?labels.csv}; out=${3:?run dir}
manifest="$src/../medgen_manifest.csv"   # written beside the input; the input folder is not touched
{
  echo "path,label,subject_id"
  tail -n +2 "$labels" | while IFS=, read -r series label patient; do
    echo "$(basename "$src")/$series,$label,$patient"
  done
} > "$manifest"
medgen data check "$manifest" --shape 128 128 128
medgen train autoencoder --config configs/medical_diffusion_vqgan_3d.yaml --out "$out" \
  data.path="$manifest" 'data.intensity={mode: ct, window: [-160, 240]}' data.spacing='[1.5,1.5,1.5]'
