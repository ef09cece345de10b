#!/usr/bin/env bash
# The toy world's BLIP-2 captioner from a fresh clone: caption tokenizer -> main.py ViT pretraining
# (configs/toy/vit.yaml) -> main.py captioner training on the frozen ViT (configs/toy/blip2.yaml) ->
# HF export to models/toy/blip2 -> held-out caption accuracy (300 test images).
# One torch thread (the measured times in the configs are for one thread of a 2-core CPU).
#
#   bash toy/pretrain_captioner.sh [python]   (default: .venv/bin/python if present, else python)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
TOKENIZER=models/toy/blip2-tokenizer
OUT=models/toy/blip2
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

"$PY" -m toy.captioner tokenizer --out "$TOKENIZER"
start=$(date +%s)
"$PY" main.py --base configs/toy/vit.yaml -t -n toy_vit --no-test
vit=$(ls -d logs/*_toy_vit | sort | tail -n 1)/checkpoints/last.ckpt
echo "ViT pretraining: $(( $(date +%s) - start )) s"
start=$(date +%s)
"$PY" main.py --base configs/toy/blip2.yaml -t -n toy_blip2 --no-test "toy.vit=$vit"
echo "captioner training: $(( $(date +%s) - start )) s"
run=$(ls -d logs/*_toy_blip2 | sort | tail -n 1)
"$PY" -m blip2.export --ckpt "$run/checkpoints/last.ckpt" --tokenizer "$TOKENIZER" --out "$OUT"
"$PY" -m toy.judge accuracy --model "$OUT" --split test --num 300
