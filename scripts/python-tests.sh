#!/usr/bin/env bash
# Builds the Python package from this checkout into .venv (made by
# scripts/setup.sh), reusing the gmtk library already built in the build
# folder (default build/), then runs its tests from outside the source tree so
# that they import the installed package. torch tests report skipped where
# torch is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=$(realpath "${1:-build}")
python="$PWD/.venv/bin/python"  # absolute, not resolved: the venv is in the path itself
if [ ! -x "$python" ]; then
  echo "python-tests: no .venv; run scripts/setup.sh first" >&2
  exit 1
fi
if [ ! -f "$build_dir/gmtkConfig.cmake" ]; then
  echo "python-tests: $build_dir has no built gmtk (cmake --build $build_dir first)" >&2
  exit 1
fi

echo "python-tests: building the package against $build_dir"
"$python" -m pip install -q --no-build-isolation --force-reinstall --no-deps ./python_bindings_optional \
  --config-settings=cmake.define.gmtk_DIR="$build_dir" \
  --config-settings=build-dir="$build_dir/python"

tests=$(realpath python_bindings_optional/tests)
cd "$(mktemp -d)"
"$python" -m pytest -ra -q -p no:cacheprovider "$tests"
