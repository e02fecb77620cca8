#!/usr/bin/env bash
# Installs what building gmtk needs on Debian or Ubuntu, only what is missing:
# CMake, Ninja, a C/C++ compiler, Catch2 v2 and Google Benchmark. The CUDA
# toolkit (nvcc 13, with CCCL and NCCL) is expected in /usr/local/cuda.
set -euo pipefail

missing=()
for package in cmake ninja-build g++ catch2 libbenchmark-dev; do
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
echo "setup: ready ($(cmake --version | head -1), $(nvcc --version | tail -1))"
