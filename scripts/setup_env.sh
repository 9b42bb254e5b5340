#!/usr/bin/env bash
# Creates .venv (seeing system packages, so an installed torch is reused), installs torch==2.13.0
# only when no torch is importable, then installs msdiff_fast (and builds its compiled kernels) in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
# The build requirements live in .venv and the build runs without isolation, so CMake's build
# folder (build/) stays valid between runs and a re-run recompiles only what changed.
"$PY" -m pip install -q "setuptools>=70.1" wheel "nanobind>=2.2" \
  $(command -v cmake >/dev/null || echo "cmake>=3.18") $(command -v ninja >/dev/null || echo ninja)
"$PY" -m pip install -q --no-build-isolation -e ".[demo,test,triton]"
