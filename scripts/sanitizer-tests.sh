#!/usr/bin/env bash
# The host code under sanitizers, and the fuzzers (issue: hardening). Two
# builds beside the default one, each for sm_90 only (the kernels are built
# but not instrumented: nvcc's device code runs nowhere here):
#   build-asan  clang, AddressSanitizer + UndefinedBehaviorSanitizer, with
#               libFuzzer coverage: every CPU test in CTest, then each
#               libFuzzer target for GMTK_FUZZ_SECONDS (default 60) from its
#               seed corpus in tests/fuzz/corpus/
#   build-tsan  ThreadSanitizer: the thread-safety tests, the sharded ones
#               (ranks are threads) and the host-run sharded schedule.
# Any sanitizer report, fuzzer finding or failed test fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:$PATH"
fuzz_seconds=${GMTK_FUZZ_SECONDS:-60}
jobs=${GMTK_JOBS:-2}

configure() {  # configure DIR SANITIZERS EXTRA...
  local dir=$1 sanitize=$2
  shift 2
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DGMTK_BUILD_BENCH=OFF -DGMTK_BUILD_EXAMPLES=OFF \
    -DGMTK_SANITIZE="$sanitize" "$@" >/dev/null
}

# ---- ASan + UBSan, and the fuzzers ------------------------------------------
configure build-asan address,undefined -DGMTK_BUILD_FUZZERS=ON
cmake --build build-asan -j "$jobs"
# protect_shadow_gap=0: the CUDA runtime maps memory where ASan's shadow gap is.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:protect_shadow_gap=0:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# Not here: the GPU tests (no GPU), the 1e8-entry case (minutes under ASan),
# and the installed package's consumer (a plain C program cannot load a
# library that expects the sanitizer runtime from its executable).
ctest --test-dir build-asan --output-on-failure -j "$jobs" \
  -E '^(gpu|cpu_large|installed_package_consumer)$'

for target in api differential; do
  corpus=tests/fuzz/corpus/$target
  found=$(mktemp -d)  # inputs the run discovers stay out of the repository
  echo "sanitizer-tests: fuzz_$target for ${fuzz_seconds}s from $(ls "$corpus" | wc -l) seeds"
  # Its progress lines go to a log; a finding prints the log's end (the input
  # that failed is written to ./crash-*, and its bytes and base64 are in the log).
  if ! ./build-asan/tests/fuzz/gmtk_fuzz_$target -max_total_time="$fuzz_seconds" -timeout=20 -rss_limit_mb=4096 \
    -print_final_stats=1 "$found" "$corpus" >"$found.log" 2>&1; then
    tail -n 80 "$found.log"
    echo "sanitizer-tests: fuzz_$target found a problem (above)" >&2
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$found.log" || true
  rm -rf "$found" "$found.log"
done

# ---- ThreadSanitizer ----------------------------------------------------------
configure build-tsan thread
cmake --build build-tsan -j "$jobs" --target gmtk_cpu_tests gmtk_sharded_schedule_on_host
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
./build-tsan/tests/gmtk_cpu_tests "[threads],[shards],[reduction]"
./build-tsan/tests/gmtk_sharded_schedule_on_host
echo "sanitizer-tests: ASan+UBSan, fuzzers and TSan all passed"
