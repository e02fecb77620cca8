// SPEC section 1 (selection) and the selection/mask-only entry points, checked
// against the definition: T is the k-th largest |g|, count(|g| > T) < k <=
// count(|g| >= T), k = n - floor(r * n).
#include "test_support.hpp"

using namespace gmtk_test;

namespace {

struct SelectionOutputs {
  std::vector<float> thresholds;
  std::vector<int64_t> kept;
  float found_inf = -1.0f;
};

// Runs gmtkSelectThresholds on a plan of the given tensors (grad only).
SelectionOutputs select(std::vector<Buffer*> grads, const std::vector<gmtkGroupConfig_t>& groups,
                        const std::vector<int32_t>& group_of_tensor) {
  Handle handle;
  std::vector<gmtkTensor_t> tensors;
  for (size_t t = 0; t < grads.size(); ++t) {
    gmtkTensor_t tensor{};
    tensor.group = group_of_tensor[t];
    tensor.numel = static_cast<int64_t>(grads[t]->size());
    tensor.grad_dtype = grads[t]->dtype;
    tensor.grad = grads[t]->data();
    tensor.param_dtype = GMTK_FLOAT32;
    tensors.push_back(tensor);
  }
  Plan plan(handle.get(), groups, tensors);
  SelectionOutputs out;
  out.thresholds.assign(grads.size(), -1.0f);
  out.kept.assign(grads.size(), -1);
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.thresholds = out.thresholds.data();
  args.kept_counts = out.kept.data();
  args.found_inf = &out.found_inf;
  GMTK_REQUIRE_OK(plan.select(args));
  return out;
}

void check_against_definition(const std::vector<const Buffer*>& set, double ratio, float threshold,
                              uint64_t kept_in_set) {
  const ExpectedSelection expected = expected_selection(set, ratio);
  uint64_t n = 0;
  for (const Buffer* buffer : set) n += buffer->size();
  INFO("n = " << n << ", ratio = " << ratio << ", k = " << expected.k);
  CHECK(static_cast<double>(threshold) == expected.threshold);
  CHECK(kept_in_set == expected.kept);
  if (expected.k > 0 && expected.k < n) {
    uint64_t greater = 0;
    uint64_t greater_or_equal = 0;
    for (const Buffer* buffer : set) {
      for (size_t i = 0; i < buffer->size(); ++i) {
        const double magnitude = std::fabs(static_cast<double>(buffer->get(i)));
        greater += magnitude > threshold ? 1 : 0;
        greater_or_equal += magnitude >= threshold ? 1 : 0;
      }
    }
    CHECK(greater < expected.k);
    CHECK(expected.k <= greater_or_equal);
  }
}

const double kRatios[] = {0.0, 0.001, 0.2, 0.5, 0.8, 0.9, 0.99, 1.0};
const size_t kSizes[] = {1, 2, 3, 255, 256, 257, 1023, 1025, 4097};
const gmtkDtype_t kDtypes[] = {GMTK_FLOAT32, GMTK_FLOAT16, GMTK_BFLOAT16};
const Distribution kDistributions[] = {Distribution::gaussian, Distribution::student_t3, Distribution::quantized,
                                       Distribution::zeros, Distribution::signed_zeros_and_tiny};

}  // namespace

TEST_CASE("kept target is n - floor(r * n) with the product in double precision", "[selection]") {
  // The cases a torch user would compute with int(r * n).
  CHECK(expected_kept_target(0.3, 10) == 7);
  CHECK(expected_kept_target(0.9, 10) == 1);
  CHECK(expected_kept_target(0.99, 100) == 1);
  CHECK(expected_kept_target(0.5, 3) == 2);
  // The library agrees: 10 distinct magnitudes, ratio 0.3 keeps the top 7.
  Buffer grad(GMTK_FLOAT32, 10);
  for (size_t i = 0; i < 10; ++i) grad.set(i, static_cast<float>(i + 1));
  const auto out = select({&grad}, {group_config(GMTK_OPTIMIZER_SGD, 0.3)}, {0});
  CHECK(out.thresholds[0] == 4.0f);
  CHECK(out.kept[0] == 7);
}

TEST_CASE("per-tensor thresholds meet the definition for every dtype, distribution, size and ratio",
          "[selection]") {
  uint64_t seed = 1;
  for (gmtkDtype_t dtype : kDtypes) {
    for (Distribution distribution : kDistributions) {
      for (size_t n : kSizes) {
        Buffer grad(dtype, n);
        fill(grad, distribution, seed++);
        const Buffer before = grad;
        for (double ratio : kRatios) {
          INFO(dtype_label(dtype) << ", " << distribution_label(distribution) << ", n = " << n);
          const auto out = select({&grad}, {group_config(GMTK_OPTIMIZER_ADAMW, ratio)}, {0});
          check_against_definition({&grad}, ratio, out.thresholds[0], static_cast<uint64_t>(out.kept[0]));
          CHECK(out.found_inf == 0.0f);
          CHECK(grad.bytes == before.bytes);  // selection writes no tensor
        }
      }
    }
  }
}

TEST_CASE("ratio 0 keeps everything and reports T = 0; ratio 1 keeps nothing and reports T = +inf",
          "[selection]") {
  Buffer grad(GMTK_FLOAT32, 100);
  fill(grad, Distribution::gaussian, 7);
  auto all = select({&grad}, {group_config(GMTK_OPTIMIZER_SGD, 0.0)}, {0});
  CHECK(all.thresholds[0] == 0.0f);
  CHECK(all.kept[0] == 100);
  auto none = select({&grad}, {group_config(GMTK_OPTIMIZER_SGD, 1.0)}, {0});
  CHECK(std::isinf(none.thresholds[0]));
  CHECK(none.thresholds[0] > 0);
  CHECK(none.kept[0] == 0);
  // A ratio too small to mask one entry is the same as 0.
  auto tiny = select({&grad}, {group_config(GMTK_OPTIMIZER_SGD, 0.009)}, {0});
  CHECK(tiny.thresholds[0] == 0.0f);
  CHECK(tiny.kept[0] == 100);
}

TEST_CASE("ties at T are all kept and the kept count says so", "[selection]") {
  Buffer grad(GMTK_FLOAT32, 8);
  const float values[] = {3, -2, 2, 2, -2, 1, 0.5f, -0.0f};
  for (size_t i = 0; i < 8; ++i) grad.set(i, values[i]);
  // ratio 0.5: k = 4; sorted |g| = 3 2 2 2 2 1 0.5 0: T = 2, kept = 5 > k.
  const auto out = select({&grad}, {group_config(GMTK_OPTIMIZER_SGD, 0.5)}, {0});
  CHECK(out.thresholds[0] == 2.0f);
  CHECK(out.kept[0] == 5);
}

TEST_CASE("-0 and +0 are equal magnitudes", "[selection]") {
  Buffer grad(GMTK_FLOAT16, 4);
  grad.set(0, -0.0f);
  grad.set(1, 0.0f);
  grad.set(2, -0.0f);
  grad.set(3, 1.0f);
  // k = 2: T = 0, and all three zeros tie with it.
  const auto out = select({&grad}, {group_config(GMTK_OPTIMIZER_SGD, 0.5)}, {0});
  CHECK(out.thresholds[0] == 0.0f);
  CHECK(out.kept[0] == 4);
}

TEST_CASE("tensors of 0 entries are valid: T = 0, kept 0", "[selection]") {
  Buffer empty(GMTK_BFLOAT16, 0);
  Buffer some(GMTK_BFLOAT16, 10);
  fill(some, Distribution::gaussian, 3);
  const auto out = select({&empty, &some, &empty},
                          {group_config(GMTK_OPTIMIZER_ADAM, 0.5), group_config(GMTK_OPTIMIZER_ADAM, 0.5,
                                                                                GMTK_SCOPE_GLOBAL)},
                          {0, 1, 1});
  CHECK(out.thresholds[0] == 0.0f);
  CHECK(out.kept[0] == 0);
  CHECK(out.kept[2] == 0);
  check_against_definition({&some}, 0.5, out.thresholds[1], static_cast<uint64_t>(out.kept[1] + out.kept[2]));
}

TEST_CASE("global scope: one threshold over the union of a group's tensors, beside per-tensor groups",
          "[selection]") {
  for (gmtkDtype_t dtype : kDtypes) {
    INFO(dtype_label(dtype));
    std::vector<Buffer> grads;
    const size_t sizes[] = {1000, 3, 0, 4099, 517, 64};
    uint64_t seed = 100;
    for (size_t n : sizes) {
      grads.emplace_back(dtype, n);
      fill(grads.back(), seed % 2 ? Distribution::student_t3 : Distribution::gaussian, seed);
      ++seed;
    }
    // Scale one tensor up so that a global threshold differs from per-tensor ones.
    for (size_t i = 0; i < grads[3].size(); ++i) grads[3].set(i, grads[3].get(i) * 8.0f);

    // groups: 0 = global (tensors 0, 1, 2, 3), 1 = per-tensor (4, 5)
    const std::vector<gmtkGroupConfig_t> groups = {group_config(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_SCOPE_GLOBAL),
                                                   group_config(GMTK_OPTIMIZER_SGD, 0.5)};
    std::vector<Buffer*> pointers;
    for (Buffer& g : grads) pointers.push_back(&g);
    const auto out = select(pointers, groups, {0, 0, 0, 0, 1, 1});

    for (size_t t = 1; t < 4; ++t) CHECK(out.thresholds[t] == out.thresholds[0]);
    const int64_t kept_in_group = out.kept[0] + out.kept[1] + out.kept[2] + out.kept[3];
    check_against_definition({&grads[0], &grads[1], &grads[2], &grads[3]}, 0.9, out.thresholds[0],
                             static_cast<uint64_t>(kept_in_group));
    for (size_t t = 0; t < 4; ++t) {  // each tensor's count is its own share
      int64_t own = 0;
      for (size_t i = 0; i < grads[t].size(); ++i) own += is_kept(grads[t].get(i), out.thresholds[t]) ? 1 : 0;
      CHECK(out.kept[t] == own);
    }
    check_against_definition({&grads[4]}, 0.5, out.thresholds[4], static_cast<uint64_t>(out.kept[4]));
    check_against_definition({&grads[5]}, 0.5, out.thresholds[5], static_cast<uint64_t>(out.kept[5]));
  }
}

TEST_CASE("NaN orders above +inf (by its bits with the sign cleared) and raises found_inf", "[selection]") {
  Buffer grad(GMTK_FLOAT32, 6);
  const float values[] = {1, 2, std::numeric_limits<float>::quiet_NaN(), 4, -std::numeric_limits<float>::infinity(),
                          5};
  for (size_t i = 0; i < 6; ++i) grad.set(i, values[i]);
  // ratio 0.5: k = 3; order from the top: NaN, inf, 5, ... so T = 5.
  const auto out = select({&grad}, {group_config(GMTK_OPTIMIZER_SGD, 0.5)}, {0});
  CHECK(out.thresholds[0] == 5.0f);
  CHECK(out.kept[0] == 3);
  CHECK(out.found_inf == 1.0f);
}

TEST_CASE("selection is deterministic: repeated calls give the same bits", "[selection]") {
  Buffer grad(GMTK_BFLOAT16, 5000);
  fill(grad, Distribution::student_t3, 11);
  const auto first = select({&grad}, {group_config(GMTK_OPTIMIZER_ADAMW, 0.8)}, {0});
  for (int repeat = 0; repeat < 3; ++repeat) {
    const auto again = select({&grad}, {group_config(GMTK_OPTIMIZER_ADAMW, 0.8)}, {0});
    CHECK(float_bits(again.thresholds[0]) == float_bits(first.thresholds[0]));
    CHECK(again.kept[0] == first.kept[0]);
  }
}

TEST_CASE("gmtkMaskGradients zeroes exactly the entries with |g| < T and keeps the others' bits",
          "[selection][mask]") {
  for (gmtkDtype_t dtype : kDtypes) {
    for (gmtkScope_t scope : {GMTK_SCOPE_PER_TENSOR, GMTK_SCOPE_GLOBAL}) {
      INFO(dtype_label(dtype) << (scope == GMTK_SCOPE_GLOBAL ? ", global" : ", per-tensor"));
      Handle handle;
      std::vector<TensorData> data;
      data.emplace_back(777, dtype, GMTK_FLOAT32);
      data.emplace_back(1500, dtype, GMTK_FLOAT32);
      fill(data[0].grad, Distribution::gaussian, 5);
      fill(data[1].grad, Distribution::quantized, 6);
      const Buffer before0 = data[0].grad;
      const Buffer before1 = data[1].grad;
      std::vector<gmtkTensor_t> tensors = {data[0].describe(0), data[1].describe(0)};
      Plan plan(handle.get(), {group_config(GMTK_OPTIMIZER_ADAMW, 0.7, scope)}, tensors);
      std::vector<float> thresholds(2);
      std::vector<int64_t> kept(2);
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.thresholds = thresholds.data();
      args.kept_counts = kept.data();
      GMTK_REQUIRE_OK(plan.mask(args));

      const Buffer* befores[] = {&before0, &before1};
      for (size_t t = 0; t < 2; ++t) {
        const Buffer& before = *befores[t];
        const Buffer& after = data[t].grad;
        int64_t nonzero_kept = 0;
        for (size_t i = 0; i < before.size(); ++i) {
          if (is_kept(before.get(i), thresholds[t])) {
            const size_t width = Buffer::element_size(dtype);
            CHECK(std::memcmp(&after.bytes[i * width], &before.bytes[i * width], width) == 0);
            ++nonzero_kept;
          } else {
            CHECK(after.get(i) == 0.0f);
            CHECK(!std::signbit(after.get(i)));  // +0
          }
        }
        CHECK(kept[t] == nonzero_kept);
      }
      if (scope == GMTK_SCOPE_PER_TENSOR) {
        check_against_definition({&before0}, 0.7, thresholds[0], static_cast<uint64_t>(kept[0]));
      } else {
        check_against_definition({&before0, &before1}, 0.7, thresholds[0], static_cast<uint64_t>(kept[0] + kept[1]));
      }
    }
  }
}
