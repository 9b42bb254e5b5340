#!/usr/bin/env bash
# One GPU session: build in place, run the CUDA/Triton tests, then the GPU benchmarks.
# Usage: bash benchmarks/gpu_session.sh tests|bench  (results are copied to $OUT when it is set)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 MAX_JOBS=16
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu_device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_device.txt"
if ! python3 -c "import msdiff_fast._C_cuda" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20
fi
python3 -c "import msdiff_fast, json; print(json.dumps(msdiff_fast.backends('cuda'), indent=1))" | tee -a "$OUT/gpu_device.txt"
case "${1:-tests}" in
  tests)
    python3 -m pytest -q -p no:cacheprovider -x --timeout 300 python_tests/test_ops.py python_tests/test_compiled.py \
      python_tests/test_triton.py python_tests/test_estimators.py python_tests/test_trainer.py python_tests/test_models.py \
      2>&1 | tail -60 | tee "$OUT/gpu_tests.log"
    ;;
  bench)
    python3 benchmarks/benchmark_ops.py --device cuda --shape 32,3,256,256 2>&1 | tail -40
    python3 benchmarks/benchmark_training_step.py --device cuda 2>&1 | tail -30
    python3 benchmarks/end_to_end.py --device cuda 2>&1 | tail -30
    cp benchmarks/results/ops_cuda.* benchmarks/results/training_step_cuda.* benchmarks/results/end_to_end_cuda* "$OUT"/ 2>/dev/null
    ;;
esac
