#!/usr/bin/env bash
# Sets up .venv for scripts/demo.sh and scripts/test.sh: creates it (seeing the system's packages,
# so an installed torch is reused), installs torch only when none is importable, and installs
# msdiff_fast in place with its compiled kernels and the given extras.
#   bash scripts/setup_env.sh [EXTRAS]    e.g. "test,triton"; triton is added on a CUDA machine
# A re-run costs seconds: while pyproject.toml, setup.py, the extras and the Python are those of
# the last successful run, nothing is installed and CMake (in build/cmake-*) recompiles only the
# kernel sources that changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=${1:-}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
# The fast path imports nothing heavy: importing torch alone takes 2-12 s on a busy 2-core machine.
stamp=.venv/msdiff_fast-setup.stamp
state="$("$PY" --version) extras=[$extras] $(cat pyproject.toml setup.py scripts/setup_env.sh | sha256sum)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$state" ] &&
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
  "$PY" setup.py --quiet build_ext --inplace
  exit 0
fi

torch_sees_cuda() { "$PY" -c "import torch; print(int(torch.cuda.is_available()))"; }
if ! cuda=$(torch_sees_cuda 2>/dev/null); then
  # torch 2.13.0 has wheels for Python 3.10 and later; 2.8.0 is the newest for Python 3.9.
  if "$PY" -c "import sys; sys.exit(sys.version_info < (3, 10))"; then
    "$PY" -m pip install -q torch==2.13.0
  else
    "$PY" -m pip install -q torch==2.8.0
  fi
  cuda=$(torch_sees_cuda)
fi
# Triton's kernels run natively only on a CUDA GPU (on a CPU only in its slow interpreter, which
# the tests ask for themselves), so the demo gets it only there.
if [ "$cuda" = 1 ]; then
  extras=${extras:+$extras,}triton
fi

# The build requirements live in .venv and the build runs without isolation, so CMake's folder
# (build/cmake-*) stays valid between runs. The stable-ABI build (Python >= 3.12) needs CMake 3.26.
build_tools=("setuptools>=77" wheel "nanobind>=2.2")
cmake_floor=$("$PY" -c "import sys; print('3.26' if sys.version_info >= (3, 12) else '3.18')")
cmake_version=$(cmake --version 2>/dev/null | head -n 1 | awk '{print $3}' || true)
if [ -z "$cmake_version" ] || ! printf '%s\n%s\n' "$cmake_floor" "$cmake_version" | sort -V -C; then
  build_tools+=("cmake>=$cmake_floor")
fi
command -v ninja >/dev/null || build_tools+=(ninja)
"$PY" -m pip install -q "${build_tools[@]}"
"$PY" -m pip install -q --no-build-isolation -e ".${extras:+[$extras]}"
echo "$state" >"$stamp"
