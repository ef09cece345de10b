#!/usr/bin/env bash
# Create .venv and install the project with its test oracles (CPU torch unless TORCH_SPEC is set).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -c .ci/constraints.txt -e ".[test]"
# Only open_clip's tokenizer is used (as a test oracle); its torchvision dependency is not wanted.
python -m pip install -q --no-deps -c .ci/constraints.txt open_clip_torch
