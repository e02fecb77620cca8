#!/usr/bin/env bash
# Prepares, on the build machine, what a lent GPU machine runs: an sm_90
# Release build with static cudart and $ORIGIN rpaths in build-gpu/, with the
# shared libraries the GPU machine lacks copied beside the binaries, and the
# torch anchor script in .carry/. Then, with the device tool:
#   run(command="bash scripts/gpu-check.sh $OUT build-gpu", carry=["build-gpu", ".carry"])
set -euo pipefail
cd "$(dirname "$0")/.."

cmake --preset gpu-machine
cmake --build --preset gpu-machine
# The GPU machine's copy of the tree may carry another .git HEAD: say what was built.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench/results' || echo '+uncommitted changes')" \
  >build-gpu/BUILT_FROM
# Debian ships Google Benchmark only as libbenchmark.so.1debian; the GPU image has none.
benchmark_library=$(ldd build-gpu/bench/gmtk_bench | awk '/libbenchmark/ {print $3}')
# A rebuild finds the copy made last time through $ORIGIN: nothing to copy then.
if [ "$(realpath "$benchmark_library")" != "$(realpath -m build-gpu/bench/"$(basename "$benchmark_library")")" ]; then
  cp -L "$benchmark_library" build-gpu/bench/
fi
# The Python package for the GPU image's python3 (3.12), built here against
# build-gpu's library and installed as a plain folder, build-gpu/python
# (PYTHONPATH there); the image has torch, numpy and pytest.
gpu_python=${GMTK_GPU_PYTHON:-}
if [ -z "$gpu_python" ]; then  # a pyenv shim may exist and fail: take the first that runs
  for candidate in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 $(command -v python3.12 || true); do
    if "$candidate" --version >/dev/null 2>&1; then gpu_python=$candidate; break; fi
  done
fi
if [ -n "$gpu_python" ]; then
  [ -x .venv-gpu-python/bin/python ] || "$gpu_python" -m venv .venv-gpu-python
  .venv-gpu-python/bin/python -m pip install -q -r python_bindings_optional/requirements-test.txt
  rm -rf build-gpu/python
  .venv-gpu-python/bin/python -m pip install -q --no-build-isolation --no-deps --target build-gpu/python \
    ./python_bindings_optional --config-settings=cmake.define.gmtk_DIR="$PWD/build-gpu" \
    --config-settings=build-dir="$PWD/build-gpu-python"
else
  echo "build-for-gpu-machine: no python3.12 here: the Python package will not travel" >&2
fi
mkdir -p .carry
if [ -f ../shared/tools/torch_anchors.py ]; then cp ../shared/tools/torch_anchors.py .carry/; fi
# The independent differential test (../shared/acceptance), beside the library it tests.
if [ -f ../shared/acceptance/build.sh ]; then
  bash ../shared/acceptance/build.sh . build-gpu .carry/acceptance
  cp -a build-gpu/libgmtk.so* .carry/acceptance/
fi
# What travels must stay under the device tool's 64 MiB.
du -sh build-gpu .carry
for binary in build-gpu/libgmtk.so build-gpu/tests/gmtk_gpu_tests build-gpu/tests/gmtk_cpu_tests \
  build-gpu/tests/gmtk_allocation_tests build-gpu/bench/gmtk_bench; do
  echo "$binary: RUNPATH $(readelf -d "$binary" | awk '/RUNPATH|RPATH/ {print $NF}')"
done
