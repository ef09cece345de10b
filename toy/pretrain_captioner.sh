#!/usr/bin/env bash
# The toy world's BLIP-2 captioner from a fresh clone: caption tokenizer -> main.py pretraining
# (configs/toy/blip2.yaml) -> HF export to models/toy/blip2 -> test-split caption accuracy.
# One torch thread (the measured time in configs/toy/blip2.yaml is for one thread of a shared CPU).
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
"$PY" main.py --base configs/toy/blip2.yaml -t -n toy_blip2 --no-test
echo "pretraining: $(( $(date +%s) - start )) s"
run=$(ls -d logs/*_toy_blip2 | sort | tail -n 1)
"$PY" -m blip2.export --ckpt "$run/checkpoints/last.ckpt" --tokenizer "$TOKENIZER" --out "$OUT"
"$PY" -m toy.judge accuracy --model "$OUT" --split test --num 200
