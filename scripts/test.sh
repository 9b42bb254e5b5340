#!/usr/bin/env bash
# Runs the test suite (sets up .venv first, with the test extras and triton: the Triton tests run
# its kernels on the CPU under TRITON_INTERPRET=1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test,triton
exec .venv/bin/python -m pytest python_tests -q "$@"
