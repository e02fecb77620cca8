// Sizes past 2^31 entries (SPEC section 6): 64-bit counts and indexes end to
// end. About 4.3 GB of host memory; run by the cpu_large CTest entry.
#include "test_support.hpp"

using namespace gmtk_test;

TEST_CASE("selection over a single tensor and a total above 2^31 entries is exact", "[.large]") {
  // Entry i holds bf16 bits 0x3F00 + (i % 256) with alternating signs: 256
  // distinct magnitudes in increasing key order, with known counts.
  const uint64_t n = (uint64_t{1} << 31) + 7;
  std::vector<uint16_t> big(n);
  for (uint64_t i = 0; i < n; ++i) {
    big[i] = static_cast<uint16_t>(0x3F00u + (i % 256) + (((i / 256) % 2) << 15));
  }
  auto count_of = [&](int j) { return n / 256 + (static_cast<uint64_t>(j) < n % 256 ? 1 : 0); };
  std::vector<uint16_t> small(1000, 0x4000);  // 2.0: above every entry of `big`

  // The expected threshold and kept count, counting down from the top.
  auto expected = [&](uint64_t total, uint64_t above_all) {
    const uint64_t k = expected_kept_target(0.5, total);
    uint64_t taken = above_all;
    for (int j = 255; j >= 0; --j) {
      taken += count_of(j);
      if (taken >= k) return std::make_pair(bf16_to_float(static_cast<uint16_t>(0x3F00 + j)), taken);
    }
    return std::make_pair(0.0f, taken);
  };

  auto bf16_grads = [](int32_t group, uint64_t numel, uint16_t* data) {
    gmtkTensor_t tensor{};
    tensor.group = group;
    tensor.numel = static_cast<int64_t>(numel);
    tensor.grad_dtype = GMTK_BFLOAT16;
    tensor.grad = data;
    tensor.param_dtype = GMTK_BFLOAT16;
    return tensor;
  };

  Handle handle;
  float thresholds[2] = {-1, -1};
  int64_t kept[2] = {-1, -1};
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.thresholds = thresholds;
  args.kept_counts = kept;
  {
    Plan per_tensor(handle.get(), {group_config(GMTK_OPTIMIZER_ADAMW, 0.5)}, {bf16_grads(0, n, big.data())});
    GMTK_REQUIRE_OK(per_tensor.select(args));
    const auto want = expected(n, 0);
    CHECK(thresholds[0] == want.first);
    CHECK(static_cast<uint64_t>(kept[0]) == want.second);
  }
  {
    Plan global(handle.get(), {group_config(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_SCOPE_GLOBAL)},
                {bf16_grads(0, n, big.data()), bf16_grads(0, small.size(), small.data())});
    GMTK_REQUIRE_OK(global.select(args));
    const auto want = expected(n + small.size(), small.size());
    CHECK(thresholds[0] == want.first);
    CHECK(thresholds[1] == want.first);
    CHECK(static_cast<uint64_t>(kept[0]) == want.second - small.size());
    CHECK(kept[1] == 1000);
  }
}
