#!/usr/bin/env bash
# The main job: sets up .venv (triton only on a CUDA machine), then runs `msdiff demo` (extra
# arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m msdiff_fast demo --out demo_out "$@"
