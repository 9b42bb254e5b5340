#!/usr/bin/env bash
# The compatibility matrix: for each row, installs the wheel that scripts/build_wheel.sh left in
# wheelhouse/ into a fresh virtual environment with that row's torch (and the triton it pins, or
# the package's `triton` extra), then runs scripts/smoke_test.py there from outside the checkout.
#
#   bash scripts/check_compat.sh                     # the declared ends: 3.9/2.6.0 and 3.13/2.14.1
#   bash scripts/check_compat.sh 3.11:2.13.0 ...     # rows PYTHON:TORCH of your choice
#
# pip must pick the wheel by its tags (the cp39 one, the cp312-abi3 one, ...): a row whose Python
# no wheel serves fails. torch from PyPI is a CUDA build: each row downloads about 3 GB the
# first time (pip's cache keeps it), and its environment is deleted after the row passes
# (KEEP_VENVS=1 keeps it). Prints the matrix as a Markdown table and exits non-zero if a row failed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(3.9:2.6.0 3.13:2.14.1)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
[ -n "$(ls wheelhouse/msdiff_fast-"$version"-*.whl 2>/dev/null)" ] || {
  echo "check_compat.sh: expected msdiff_fast-$version wheels in wheelhouse/ (bash scripts/build_wheel.sh 3.9 3.12), found none" >&2
  exit 1
}

find_python() {
  local wanted=$1 candidate
  for candidate in "python$wanted" "$(pyenv root 2>/dev/null)"/versions/"$wanted".*/bin/python"$wanted"; do
    if "$candidate" -c "" 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  return 1
}

outside=$(mktemp -d)
trap 'rm -rf "$outside"' EXIT
table=("| Python | torch | triton | wheel | result | install |" "|---|---|---|---|---|---|")
failed=0
for row in "${rows[@]}"; do
  python_version=${row%%:*} torch_version=${row#*:}
  venv=build/compat/py$python_version-torch$torch_version
  log=build/compat/py$python_version-torch$torch_version.log
  echo "== Python $python_version, torch $torch_version"
  rm -rf "$venv" && mkdir -p build/compat
  result=FAILED triton_version=- wheel=- install_seconds=-
  if ! python=$(find_python "$python_version"); then
    echo "   no Python $python_version here (python$python_version or a pyenv install)" | tee "$log"
  else
    start=$SECONDS
    pip_install=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    if "$python" -m venv "$venv" >"$log" 2>&1 &&
      "${pip_install[@]}" --no-index --find-links wheelhouse --only-binary :all: --no-deps "msdiff_fast==$version" >>"$log" 2>&1 &&
      "${pip_install[@]}" --find-links wheelhouse --only-binary msdiff_fast "msdiff_fast[triton]==$version" "torch==$torch_version" >>"$log" 2>&1; then
      install_seconds=$((SECONDS - start))
      wheel=$(sed -n 's/^Tag: //p' "$venv"/lib/python*/site-packages/msdiff_fast-*.dist-info/WHEEL | head -n 1)
      triton_version=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('triton'))")
      if (cd "$outside" && "$repo/$venv/bin/python" "$repo/scripts/smoke_test.py" --expect-cuda-module --require-triton) 2>&1 | tee -a "$log"; then
        result=passed
        [ "${KEEP_VENVS:-0}" = 1 ] || rm -rf "$venv"
      fi
    else
      tail -n 5 "$log"
    fi
  fi
  [ "$result" = passed ] || failed=1
  table+=("| $python_version | $torch_version | $triton_version | $wheel | $result | ${install_seconds} s |")
done
printf '%s\n' "${table[@]}" | tee build/compat/matrix.md
exit $failed
