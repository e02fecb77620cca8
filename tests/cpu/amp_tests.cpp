// SPEC section 4 (unscaling, non-finite gradients) and 5 (found_inf output).
#include "reference_model.hpp"

using namespace gmtk_test;

namespace {

gmtkGroupConfig_t adamw(double ratio) {
  gmtkGroupConfig_t g = group_config(GMTK_OPTIMIZER_ADAMW, ratio);
  g.lr = 1e-2;
  return g;
}

// Everything a step may write, as bytes, to compare before and after.
std::vector<unsigned char> snapshot(const std::vector<TensorData>& data) {
  std::vector<unsigned char> bytes;
  auto append = [&](const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    bytes.insert(bytes.end(), b, b + n);
  };
  for (const TensorData& d : data) {
    append(d.grad.bytes.data(), d.grad.bytes.size());
    append(d.param.bytes.data(), d.param.bytes.size());
    append(d.master.data(), d.master.size() * 4);
    append(d.exp_avg.data(), d.exp_avg.size() * 4);
    append(d.exp_avg_sq.data(), d.exp_avg_sq.size() * 4);
    append(d.max_exp_avg_sq.data(), d.max_exp_avg_sq.size() * 4);
  }
  return bytes;
}

}  // namespace

TEST_CASE("unscaling by a power-of-two inverse loss scale equals stepping on the unscaled gradients",
          "[amp]") {
  for (gmtkDtype_t dtype : {GMTK_FLOAT32, GMTK_BFLOAT16, GMTK_FLOAT16}) {
    INFO(dtype_label(dtype));
    const float loss_scale = 1024.0f;
    TensorData plain(3000, dtype, GMTK_FLOAT32);
    TensorData scaled(3000, dtype, GMTK_FLOAT32);
    fill(plain.param, Distribution::gaussian, 1, 1.0f);
    scaled.param = plain.param;
    Handle handle;
    Plan plain_plan(handle.get(), {adamw(0.7)}, {plain.describe(0)});
    Plan scaled_plan(handle.get(), {adamw(0.7)}, {scaled.describe(0)});
    const float inv_loss_scale = 1.0f / loss_scale;
    for (int t = 1; t <= 5; ++t) {
      fill(plain.grad, Distribution::student_t3, 10 + t, 1e-3f);
      for (size_t i = 0; i < 3000; ++i) scaled.grad.set(i, plain.grad.get(i) * loss_scale);  // exact
      float plain_threshold = 0, scaled_threshold = 0, found_inf = -1;
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.step = t;
      args.thresholds = &plain_threshold;
      GMTK_REQUIRE_OK(plain_plan.step(args));
      args.thresholds = &scaled_threshold;
      args.inv_loss_scale = &inv_loss_scale;
      args.found_inf = &found_inf;
      GMTK_REQUIRE_OK(scaled_plan.step(args));
      CHECK(found_inf == 0.0f);
      CHECK(scaled_threshold == plain_threshold * loss_scale);  // T is reported on the stored gradient
    }
    CHECK(plain.param.bytes == scaled.param.bytes);
    CHECK(plain.exp_avg == scaled.exp_avg);
    CHECK(plain.exp_avg_sq == scaled.exp_avg_sq);
  }
}

TEST_CASE("a non-finite gradient anywhere makes the step a no-op that only reports", "[amp]") {
  struct Case {
    const char* label;
    gmtkDtype_t dtype;
    float bad_value;
    float inv_loss_scale;  // 0: none
  };
  const Case cases[] = {
      {"+inf fp32", GMTK_FLOAT32, std::numeric_limits<float>::infinity(), 0},
      {"-inf bf16", GMTK_BFLOAT16, -std::numeric_limits<float>::infinity(), 0},
      {"NaN fp16", GMTK_FLOAT16, std::numeric_limits<float>::quiet_NaN(), 0},
      {"overflow after unscaling", GMTK_FLOAT32, 3e38f, 4.0f},
  };
  for (const Case& c : cases) {
    INFO(c.label);
    std::vector<TensorData> data;
    data.emplace_back(100, GMTK_FLOAT32, GMTK_FLOAT32);
    data.emplace_back(200, c.dtype, GMTK_BFLOAT16, true);
    for (TensorData& d : data) {
      fill(d.param, Distribution::gaussian, 3, 1.0f);
      fill(d.grad, Distribution::gaussian, 4);
      for (size_t i = 0; i < d.master.size(); ++i) d.master[i] = d.param.get(i);
    }
    data[1].grad.set(123, c.bad_value);
    Handle handle;
    Plan plan(handle.get(), {adamw(0.5), group_config(GMTK_OPTIMIZER_SGD, 0.2, GMTK_SCOPE_GLOBAL)},
              {data[0].describe(0), data[1].describe(1)});
    const std::vector<unsigned char> before = snapshot(data);
    int64_t step_count = 41;
    float found_inf = -1;
    std::vector<float> thresholds(2, -1.0f);
    std::vector<int64_t> kept(2, -1);
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step_count = &step_count;
    args.found_inf = &found_inf;
    args.thresholds = thresholds.data();
    args.kept_counts = kept.data();
    if (c.inv_loss_scale != 0) args.inv_loss_scale = &c.inv_loss_scale;
    GMTK_REQUIRE_OK(plan.step(args));
    CHECK(found_inf == 1.0f);
    CHECK(step_count == 41);
    CHECK(snapshot(data) == before);
    CHECK(thresholds[0] >= 0.0f);  // the selection is still reported
    CHECK(kept[0] == 50);
    CHECK(kept[1] >= 160);

    GMTK_REQUIRE_OK(plan.mask(args));  // mask-only leaves the gradients for the caller's own check
    CHECK(found_inf == 1.0f);
    CHECK(snapshot(data) == before);

    // The next finite step applies and advances the counter.
    data[1].grad.set(123, 0.5f);
    GMTK_REQUIRE_OK(plan.step(args));
    CHECK(found_inf == 0.0f);
    CHECK(step_count == 42);
    CHECK(snapshot(data) != before);
  }
}
