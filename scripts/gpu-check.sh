#!/usr/bin/env bash
# The one prepared GPU check (PERFORMANCE.md): on a machine with a GPU, build
# for it (or use a build carried here), run the GPU and CPU tests,
# compute-sanitizer on the small GPU subset, and the GPU benchmarks (plus the
# torch anchors when .carry/torch_anchors.py is present), writing everything
# under OUTDIR. Aims to finish in well under 10 minutes.
#
# Usage: scripts/gpu-check.sh OUTDIR [BUILD_DIR]
#   BUILD_DIR: a build to use as is (scripts/build-for-gpu-machine.sh makes
#   build-gpu/); without it, builds here for the GPU that nvidia-smi reports
#   (needs Catch2 and Google Benchmark on this machine).
#
# Writes (few files, as the device tool returns at most 8): check.log (all
# steps), summary.txt, bench.json, ratios.json, anchors.json,
# compare_torch.json and compare_torch.png.
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUTDIR [BUILD_DIR]}
build=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/check.log"
summary="$out/summary.txt"
: >"$log"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
run_step() {  # run_step NAME COMMAND...: logs output, notes the exit status
  local name=$1
  shift
  echo "==== $name: $*" >>"$log"
  local start=$SECONDS
  "$@" >>"$log" 2>&1
  local status=$?
  note "$(printf '%-28s exit %3d  %4ds' "$name" "$status" $((SECONDS - start)))"
  return $status
}

built_from=unknown
if [ -n "$build" ] && [ -f "$build/BUILT_FROM" ]; then built_from=$(cat "$build/BUILT_FROM"); fi
note "gmtk GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), tree commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), binaries built from $built_from"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
  | tee -a "$summary"

if [ -z "$build" ]; then
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
  build=build-gpu-check
  run_step configure cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch"
  run_step build cmake --build "$build"
fi
for binary in "$build"/libgmtk.so "$build"/tests/gmtk_gpu_tests "$build"/tests/gmtk_cpu_tests \
  "$build"/tests/gmtk_allocation_tests "$build"/bench/gmtk_bench; do
  echo "==== ldd $binary" >>"$log"
  ldd "$binary" >>"$log" 2>&1
  if ldd "$binary" 2>&1 | grep -q "not found"; then note "MISSING LIBRARIES for $binary (see check.log)"; fi
done

# In order of what a cut-short run must not lose (the device tool keeps
# what is under OUTDIR when it stops a command): correctness, the figures,
# then the sanitizers and the >2^31 case.
# NCCL there is the pip package nvidia-nccl-cu13, off the loader's path: gmtk
# and its tests load it through GMTK_NCCL_LIBRARY (docs/distributed.md).
if [ -z "${GMTK_NCCL_LIBRARY:-}" ]; then
  GMTK_NCCL_LIBRARY=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
  export GMTK_NCCL_LIBRARY
fi
note "GMTK_NCCL_LIBRARY=${GMTK_NCCL_LIBRARY:-unset}"
run_step gpu_tests timeout 150 "$build"/tests/gmtk_gpu_tests --durations yes
# One rank through real NCCL end to end: the id file, the CUDA sharded step, the
# all-gather of the slices, checked against the CPU reference by the example.
if [ -x "$build"/examples/gmtk_example_sharded ]; then
  rm -f "$out/nccl.id"
  run_step example_sharded_nccl timeout 60 "$build"/examples/gmtk_example_sharded --ranks 1 --rank 0 \
    --id-file "$out/nccl.id" --epochs 2
  rm -f "$out/nccl.id"
fi
if [ -x .carry/acceptance/gmtk_differential ]; then
  run_step acceptance timeout 150 .carry/acceptance/gmtk_differential
fi
# No host allocation inside gmtkStep / gmtkSelectThresholds / gmtkMaskGradients, CUDA case included.
run_step no_allocations "$build"/tests/gmtk_allocation_tests
run_step bench timeout 300 "$build"/bench/gmtk_bench --benchmark_filter='^gpu/' --benchmark_min_time=0.1 \
  --benchmark_out="$out/bench.json" --benchmark_out_format=json --gmtk_ratios_out="$out/ratios.json"
sed -n '/^Ratios measured/,$p' "$log" >>"$summary"
if [ -f .carry/torch_anchors.py ]; then
  run_step torch_anchors timeout 120 python3 .carry/torch_anchors.py "$out" 2
fi
# The Python package (built by scripts/build-for-gpu-machine.sh): its tests,
# CUDA cases included, and the comparison with PyTorch's own ways of GMT.
if [ -d "$build/python/gmtk" ]; then
  run_step python_tests timeout 180 env PYTHONPATH="$build/python" python3 -m pytest -q -ra -p no:cacheprovider \
    python_bindings_optional/tests
  run_step compare_torch timeout 240 env PYTHONPATH="$build/python" PYTHONUNBUFFERED=1 python3 bench/compare_torch.py --budget 8 \
    --json "$out/compare_torch.json" --plot "$out/compare_torch.png"
  sed -n '/^==== compare_torch/,$p' "$log" >>"$summary"
else
  note "no $build/python: the Python package's tests and bench/compare_torch.py not run"
fi
if command -v compute-sanitizer >/dev/null 2>&1; then
  # KINDS.md: works on Firecracker machines, refuses the device on gVisor ones.
  # Each tool with its own exit status in the summary (9: the tool found an
  # error; 124: timed out). initcheck flags reads of memory never written:
  # gmtk's workspace is cleared by the call's memset before it is read.
  for tool in memcheck racecheck initcheck synccheck; do
    extra=()
    [ "$tool" = memcheck ] && extra=(--leak-check full)
    run_step "sanitizer_$tool" timeout 120 compute-sanitizer --tool "$tool" "${extra[@]}" --error-exitcode 9 \
      "$build"/tests/gmtk_gpu_tests "[small]"
  done
else
  note "compute-sanitizer not found: memcheck, racecheck, initcheck, synccheck not run"
fi
# One tensor above 2^31 entries (9 GB of fp32): skipped by the test where memory is short.
run_step gpu_tests_large timeout 90 "$build"/tests/gmtk_gpu_tests "[.large]"
run_step cpu_tests timeout 120 "$build"/tests/gmtk_cpu_tests
note "done in ${SECONDS}s"
