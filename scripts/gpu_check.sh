#!/usr/bin/env bash
# One-command GPU check: short pretraining of every method, bf16 fine-tuning, evaluation, prediction, torchrun DDP,
# SAM refinement and propagation on the demo phantom; timings, Dice and peak memory in <out>/gpu_check.json.
# At most ~8 minutes on one GPU. Without CUDA it prints one line and exits 0 (--allow-cpu: tiny CPU run).
#   bash scripts/gpu_check.sh [--out runs/gpu_check] [--hippocampus [PATH]] [--budget SECONDS] [--allow-cpu]
# Needs a CUDA build of torch in the environment (scripts/setup.sh installs the CPU one).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
exec "$PY" benchmarks/gpu_check.py "$@"
