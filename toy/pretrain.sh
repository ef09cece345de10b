#!/usr/bin/env bash
# Pretrain the toy world from nothing and write the shipped weights (models/toy/):
#   1. the KL-VAE          python main.py --base configs/toy/vae.yaml -t -n toy_vae
#   2. the text-to-image   python main.py --base configs/toy/sd.yaml -t -n toy_sd   (VAE of step 1, frozen)
#      -> models/toy/sd.safetensors (fp16, sd-v1 layout; loads with configs/toy/sd.yaml)
#   3. the captioner       toy/pretrain_captioner.sh -> models/toy/blip2/ (HF BLIP-2 folder)
#   and the DreamBooth subject's photos, data/toy_subject/.
# Measured wall times on this project's 2-core CPU machine are in README.md ("The toy world").
# Usage: bash toy/pretrain.sh [python]   (default: .venv/bin/python if present, else python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RUNS=logs/toy_pretrain
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the measured times are for one thread
latest() { ls -d "$RUNS"/*_"$1" | tail -n 1; }

"$PY" -m toy.shapes --subject data/toy_subject --num 4

"$PY" main.py --base configs/toy/vae.yaml -t -n toy_vae --logdir "$RUNS"
VAE=$(latest toy_vae)/checkpoints/last.ckpt

"$PY" main.py --base configs/toy/sd.yaml -t -n toy_sd --logdir "$RUNS" \
    model.params.first_stage_config.params.ckpt_path="$VAE"
mkdir -p models/toy
"$PY" scripts/export.py "$(latest toy_sd)/checkpoints/last.ckpt" models/toy/sd.safetensors --dtype fp16 --no-ema

bash toy/pretrain_captioner.sh "$PY"
du -sh models/toy
