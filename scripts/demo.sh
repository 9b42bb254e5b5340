#!/usr/bin/env bash
# The main job: sets up .venv (with scikit-image, whose wheel holds the demo's photographs; triton
# only on a CUDA machine), then runs `msdiff demo` (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh demo
exec .venv/bin/python -m msdiff_fast demo --out demo_out "$@"
