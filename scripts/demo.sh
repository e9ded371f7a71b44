#!/usr/bin/env bash
# Set up (see setup.sh) and run the demo on the built-in phantom. Extra arguments go to `medssl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
medssl demo "$@"
