#!/usr/bin/env bash
# Installs what building gmtk needs on Debian or Ubuntu, only what is missing:
# CMake, Ninja, a C/C++ compiler (and clang for the sanitizer builds), Catch2 v2
# and Google Benchmark, and a Python
# virtual environment .venv with what the Python package's build and tests
# need (PyPI; torch too, unless GMTK_SETUP_TORCH=0). The CUDA toolkit (nvcc 13,
# with CCCL and NCCL) is expected in /usr/local/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# clang and its runtimes: the sanitizer and fuzzer builds (scripts/sanitizer-tests.sh).
for package in cmake ninja-build g++ catch2 libbenchmark-dev clang libclang-rt-dev; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v nvcc >/dev/null 2>&1; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    echo "setup: nvcc is in /usr/local/cuda/bin but not on PATH; run: export PATH=/usr/local/cuda/bin:\$PATH" >&2
  else
    echo "setup: nvcc not found; install the CUDA toolkit 13 in /usr/local/cuda" >&2
  fi
  exit 1
fi
# Python: the package builds with nanobind and scikit-build-core; its tests need
# numpy and pytest, and torch for gmtk.torch (a big download: a failure there
# only makes the torch tests skip).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r python_bindings_optional/requirements-test.txt
if [ "${GMTK_SETUP_TORCH:-1}" != 0 ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch into .venv (set GMTK_SETUP_TORCH=0 to skip)"
  .venv/bin/python -m pip install -q -r python_bindings_optional/requirements-torch.txt ||
    echo "setup: torch could not be installed; gmtk.torch's tests will report skipped" >&2
fi

echo "setup: ready ($(cmake --version | head -1), $(nvcc --version | tail -1))"
