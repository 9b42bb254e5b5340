#!/usr/bin/env bash
# Installs the CUDA toolkit that release wheels are built with (nvcc, headers, the static
# runtime: NVIDIA's CUDA 13.0 packages on PyPI) into PREFIX, for scripts/build_wheel.sh and for
# cibuildwheel's before-all in the manylinux image. Afterwards PREFIX/nvidia/cu13 is a CUDA_HOME.
# Usage: install_cuda.sh PREFIX   (PYTHON: the interpreter whose pip installs it, default python3)
set -euo pipefail
prefix=${1:?usage: install_cuda.sh PREFIX}
"${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --target "$prefix" \
  "cuda-toolkit[nvcc,crt,nvvm,cudart,cccl]==13.0.2"
# What a toolkit install has and the wheels lack: nvcc.profile and CMake's FindCUDAToolkit look
# in lib64 (the wheels install lib), and FindCUDAToolkit needs the unversioned libcudart.so to
# declare the toolkit found, even for a static runtime.
ln -sfn lib "$prefix/nvidia/cu13/lib64"
ln -sfn libcudart.so.13 "$prefix/nvidia/cu13/lib/libcudart.so"
"$prefix/nvidia/cu13/bin/nvcc" --version | tail -n 1
