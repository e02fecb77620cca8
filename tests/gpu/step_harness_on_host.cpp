// The step tests' harness run on the host: tests/gpu/step_tests.cpp (and
// tests/gpu/mask_schedule_tests.cpp) with the
// CPU reference backend in place of CUDA, so that both sides are the oracle and
// nothing may differ. It shows, on a machine without a GPU, that the harness
// (layouts, sequences, the comparison rules, the found_inf and freeze checks)
// reports no false mismatch, and its "[step][small]" self-check shows that the
// comparisons flag what they must. The tests that need CUDA (graph capture,
// stream order) pass without running.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

namespace step_tests {
extern bool g_cpu_reference_under_test;
}  // namespace step_tests
namespace mask_schedule_tests {
extern bool g_cpu_reference_under_test;
}  // namespace mask_schedule_tests

int main(int argc, char** argv) {
  step_tests::g_cpu_reference_under_test = true;
  mask_schedule_tests::g_cpu_reference_under_test = true;
  std::printf("step and mask-schedule tests' harness on the host: the CPU reference on both sides\n");
  return Catch::Session().run(argc, argv);
}
