// SPEC sections 2-3: masked AdamW / Adam / SGD in both mask modes, over
// 10-step sequences, against the double-precision model in reference_model.hpp.
#include <sstream>

#include "reference_model.hpp"

using namespace gmtk_test;

namespace {

struct Scenario {
  gmtkGroupConfig_t group;
  gmtkDtype_t grad_dtype = GMTK_FLOAT32;
  gmtkDtype_t param_dtype = GMTK_FLOAT32;
  bool master = false;
  std::vector<size_t> sizes = {257, 1000, 1};
  int steps = 10;
  Distribution distribution = Distribution::gaussian;
  float grad_scale = 1e-2f;
};

// Counts mismatches and remembers the first, so a failure prints one line, not thousands.
struct Mismatches {
  size_t count = 0;
  std::string first;
  void check(bool ok, const std::string& what) {
    if (ok) return;
    if (count++ == 0) first = what;
  }
};

std::string describe(const char* field, size_t tensor, size_t i, int step, double actual, double expected) {
  std::ostringstream text;
  text.precision(9);
  text << field << " of tensor " << tensor << " entry " << i << " at step " << step << ": " << actual
       << ", expected " << expected;
  return text.str();
}

// Tolerance of a parameter value: fp32 (or fp32 master) values carry fp32
// rounding of ~10 updates; a 16-bit parameter without master weights may land
// one 16-bit ulp away where fp32 and double round to different neighbours.
double param_rel_tolerance(const Scenario& s) {
  if (s.master || s.param_dtype == GMTK_FLOAT32) return 1e-5;
  return s.param_dtype == GMTK_FLOAT16 ? 1.0 / 1024 : 1.0 / 128;
}

void run_against_model(const Scenario& s) {
  Handle handle;
  std::vector<TensorData> data;
  std::vector<std::vector<ModelEntry>> model(s.sizes.size());
  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  for (size_t k = 0; k < s.sizes.size(); ++k) {
    data.emplace_back(s.sizes[k], s.grad_dtype, s.param_dtype, s.master);
    model[k].resize(s.sizes[k]);
    for (size_t i = 0; i < s.sizes[k]; ++i) {
      data[k].param.set(i, normal(rng));
      if (s.master) data[k].master[i] = data[k].param.get(i);
      model[k][i].param = data[k].param_value(i);
    }
  }
  std::vector<gmtkTensor_t> tensors;
  for (auto& d : data) tensors.push_back(d.describe(0));
  Plan plan(handle.get(), {s.group}, tensors);

  const double param_rel = param_rel_tolerance(s);
  const double scale = s.grad_scale;
  for (int t = 1; t <= s.steps; ++t) {
    std::vector<const Buffer*> grads;
    std::vector<std::vector<ModelEntry>*> entries;
    for (size_t k = 0; k < data.size(); ++k) {
      fill(data[k].grad, s.distribution, 1000 * t + k, s.grad_scale);
      grads.push_back(&data[k].grad);
      entries.push_back(&model[k]);
    }
    const std::vector<TensorData> before = data;

    std::vector<float> thresholds(data.size(), -1.0f);
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step = t;
    args.thresholds = thresholds.data();
    GMTK_REQUIRE_OK(plan.step(args));
    const std::vector<double> expected_thresholds = model_step(s.group, s.group.lr, t, grads, entries);

    Mismatches bad;
    for (size_t k = 0; k < data.size(); ++k) {
      bad.check(thresholds[k] == expected_thresholds[k],
                describe("threshold", k, 0, t, thresholds[k], expected_thresholds[k]));
      const TensorData& d = data[k];
      for (size_t i = 0; i < d.grad.size(); ++i) {
        ModelEntry& e = model[k][i];
        if (!s.master && s.param_dtype != GMTK_FLOAT32) e.param = round_to(s.param_dtype, static_cast<float>(e.param));
        const bool masked = !is_kept(d.grad.get(i), thresholds[k]);
        if (masked && s.group.mask_mode == GMTK_MASK_FREEZE) {
          const TensorData& b = before[k];
          const size_t width = Buffer::element_size(s.param_dtype);
          bool untouched = std::memcmp(&d.param.bytes[i * width], &b.param.bytes[i * width], width) == 0 &&
                           float_bits(d.exp_avg[i]) == float_bits(b.exp_avg[i]) &&
                           float_bits(d.exp_avg_sq[i]) == float_bits(b.exp_avg_sq[i]) &&
                           float_bits(d.max_exp_avg_sq[i]) == float_bits(b.max_exp_avg_sq[i]);
          if (s.master) untouched = untouched && float_bits(d.master[i]) == float_bits(b.master[i]);
          bad.check(untouched, describe("frozen entry changed:", k, i, t, d.param_value(i), b.param_value(i)));
        }
        bad.check(close(d.param_value(i), e.param, param_rel, 1e-6),
                  describe("param", k, i, t, d.param_value(i), e.param));
        if (s.master) {
          bad.check(d.param.get(i) == round_to(s.param_dtype, d.master[i]),
                    describe("16-bit param vs rounded master", k, i, t, d.param.get(i), d.master[i]));
        }
        bad.check(close(d.exp_avg[i], e.exp_avg, 1e-5, 1e-6 * scale),
                  describe("exp_avg", k, i, t, d.exp_avg[i], e.exp_avg));
        if (s.group.optimizer != GMTK_OPTIMIZER_SGD) {
          bad.check(close(d.exp_avg_sq[i], e.exp_avg_sq, 1e-5, 1e-6 * scale * scale),
                    describe("exp_avg_sq", k, i, t, d.exp_avg_sq[i], e.exp_avg_sq));
          if (s.group.amsgrad) {
            bad.check(close(d.max_exp_avg_sq[i], e.max_exp_avg_sq, 1e-5, 1e-6 * scale * scale),
                      describe("max_exp_avg_sq", k, i, t, d.max_exp_avg_sq[i], e.max_exp_avg_sq));
          }
        }
      }
    }
    INFO(bad.count << " mismatches; first: " << bad.first);
    REQUIRE(bad.count == 0);
  }
}

gmtkGroupConfig_t adam(gmtkOptimizer_t optimizer, double ratio, gmtkMaskMode_t mode, double weight_decay,
                       gmtkScope_t scope = GMTK_SCOPE_PER_TENSOR) {
  gmtkGroupConfig_t g = group_config(optimizer, ratio, scope, mode);
  g.lr = 1e-2;
  g.weight_decay = weight_decay;
  return g;
}

gmtkGroupConfig_t sgd(double ratio, gmtkMaskMode_t mode, double momentum, double dampening, bool nesterov,
                      double weight_decay) {
  gmtkGroupConfig_t g = group_config(GMTK_OPTIMIZER_SGD, ratio, GMTK_SCOPE_PER_TENSOR, mode);
  g.lr = 0.05;
  g.momentum = momentum;
  g.dampening = dampening;
  g.nesterov = nesterov;
  g.weight_decay = weight_decay;
  return g;
}

const double kStepRatios[] = {0.0, 0.5, 0.9, 1.0};
const gmtkMaskMode_t kModes[] = {GMTK_MASK_GRAD, GMTK_MASK_FREEZE};

const char* mode_label(gmtkMaskMode_t mode) { return mode == GMTK_MASK_GRAD ? "mask-grad" : "freeze"; }

}  // namespace

TEST_CASE("AdamW: 10 masked steps match the double-precision model", "[optimizer]") {
  for (gmtkMaskMode_t mode : kModes) {
    for (double ratio : kStepRatios) {
      for (gmtkScope_t scope : {GMTK_SCOPE_PER_TENSOR, GMTK_SCOPE_GLOBAL}) {
        INFO("AdamW " << mode_label(mode) << " ratio " << ratio << (scope == GMTK_SCOPE_GLOBAL ? " global" : ""));
        Scenario s{adam(GMTK_OPTIMIZER_ADAMW, ratio, mode, 0.1, scope)};
        run_against_model(s);
      }
    }
  }
}

TEST_CASE("Adam with L2 weight decay: masked entries still get the decay term in mask-grad mode",
          "[optimizer]") {
  for (gmtkMaskMode_t mode : kModes) {
    for (double ratio : kStepRatios) {
      INFO("Adam " << mode_label(mode) << " ratio " << ratio);
      Scenario s{adam(GMTK_OPTIMIZER_ADAM, ratio, mode, 0.1)};
      s.distribution = Distribution::student_t3;
      run_against_model(s);
    }
  }
}

TEST_CASE("Adam variants: amsgrad, maximize, no weight decay, quantized gradients", "[optimizer]") {
  for (gmtkMaskMode_t mode : kModes) {
    INFO(mode_label(mode));
    Scenario amsgrad{adam(GMTK_OPTIMIZER_ADAM, 0.5, mode, 0.01)};
    amsgrad.group.amsgrad = 1;
    run_against_model(amsgrad);

    Scenario maximize{adam(GMTK_OPTIMIZER_ADAMW, 0.8, mode, 0.05)};
    maximize.group.maximize = 1;
    run_against_model(maximize);

    Scenario plain{adam(GMTK_OPTIMIZER_ADAMW, 0.5, mode, 0.0)};
    plain.distribution = Distribution::quantized;  // ties at T: kept count above k
    run_against_model(plain);
  }
}

TEST_CASE("SGD: momentum, dampening, nesterov, weight decay, maximize, first-step buffer", "[optimizer]") {
  for (gmtkMaskMode_t mode : kModes) {
    for (double ratio : kStepRatios) {
      INFO("SGD " << mode_label(mode) << " ratio " << ratio);
      run_against_model(Scenario{sgd(ratio, mode, 0.0, 0.0, false, 0.0)});
      run_against_model(Scenario{sgd(ratio, mode, 0.9, 0.1, false, 0.01)});
      run_against_model(Scenario{sgd(ratio, mode, 0.9, 0.0, true, 0.01)});
      Scenario maximize{sgd(ratio, mode, 0.5, 0.0, false, 0.0)};
      maximize.group.maximize = 1;
      run_against_model(maximize);
    }
  }
}

TEST_CASE("a device-resident lr and step counter give the same bits as host values", "[optimizer]") {
  Handle handle;
  TensorData host_run(500, GMTK_FLOAT32, GMTK_FLOAT32);
  TensorData device_run(500, GMTK_FLOAT32, GMTK_FLOAT32);
  fill(host_run.param, Distribution::gaussian, 1, 1.0f);
  device_run.param = host_run.param;

  gmtkGroupConfig_t host_group = adam(GMTK_OPTIMIZER_ADAMW, 0.6, GMTK_MASK_GRAD, 0.1);
  float lr_in_device_memory = 0.0f;
  gmtkGroupConfig_t device_group = host_group;
  device_group.lr = 123.0;  // ignored: lr_device wins
  device_group.lr_device = &lr_in_device_memory;
  Plan host_plan(handle.get(), {host_group}, {host_run.describe(0)});
  Plan device_plan(handle.get(), {device_group}, {device_run.describe(0)});

  int64_t step_count = 0;
  for (int t = 1; t <= 10; ++t) {
    const float lr = 1e-2f / static_cast<float>(t);  // a schedule
    host_group.lr = lr;
    GMTK_REQUIRE_OK(gmtkPlanSetGroupHyperparams(host_plan.get(), 0, &host_group));
    lr_in_device_memory = lr;
    fill(host_run.grad, Distribution::gaussian, 77 + t);
    device_run.grad = host_run.grad;

    gmtkStepArgs_t host_args = GMTK_STEP_ARGS_INIT;
    host_args.step = t;
    GMTK_REQUIRE_OK(host_plan.step(host_args));
    gmtkStepArgs_t device_args = GMTK_STEP_ARGS_INIT;
    device_args.step = 999;  // ignored: step_count wins
    device_args.step_count = &step_count;
    GMTK_REQUIRE_OK(device_plan.step(device_args));
    REQUIRE(step_count == t);
  }
  CHECK(host_run.param.bytes == device_run.param.bytes);
  CHECK(host_run.exp_avg == device_run.exp_avg);
  CHECK(host_run.exp_avg_sq == device_run.exp_avg_sq);
}

TEST_CASE("schedules change between steps without a new plan and match the model", "[optimizer]") {
  Handle handle;
  TensorData data(2000, GMTK_FLOAT32, GMTK_FLOAT32);
  std::vector<ModelEntry> model(2000);
  fill(data.param, Distribution::gaussian, 5, 1.0f);
  for (size_t i = 0; i < 2000; ++i) model[i].param = data.param.get(i);
  gmtkGroupConfig_t group = adam(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_MASK_GRAD, 0.1);
  Plan plan(handle.get(), {group}, {data.describe(0)});
  for (int t = 1; t <= 10; ++t) {
    group.lr = 1e-2 * (1.0 - 0.05 * t);
    group.weight_decay = 0.01 * t;
    group.mask_ratio = 0.1 * (t % 10);
    GMTK_REQUIRE_OK(gmtkPlanSetGroupHyperparams(plan.get(), 0, &group));
    fill(data.grad, Distribution::student_t3, 300 + t);
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step = t;
    GMTK_REQUIRE_OK(plan.step(args));
    model_step(group, group.lr, t, {&data.grad}, {&model});
  }
  Mismatches bad;
  for (size_t i = 0; i < 2000; ++i) {
    bad.check(close(data.param.get(i), model[i].param, 1e-5, 1e-6), describe("param", 0, i, 10, data.param.get(i),
                                                                            model[i].param));
  }
  INFO(bad.count << " mismatches; first: " << bad.first);
  CHECK(bad.count == 0);
}

TEST_CASE("several groups with different optimizers in one plan equal separate plans, bit for bit",
          "[optimizer]") {
  const std::vector<gmtkGroupConfig_t> groups = {adam(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_MASK_GRAD, 0.1),
                                                 sgd(0.9, GMTK_MASK_FREEZE, 0.9, 0.0, true, 0.0),
                                                 adam(GMTK_OPTIMIZER_ADAM, 0.3, GMTK_MASK_FREEZE, 0.0, GMTK_SCOPE_GLOBAL)};
  std::vector<TensorData> together, apart;
  const size_t sizes[] = {300, 41, 1000, 7, 128};
  const int32_t group_of[] = {0, 1, 2, 2, 0};
  for (size_t k = 0; k < 5; ++k) {
    together.emplace_back(sizes[k], GMTK_FLOAT32, GMTK_FLOAT32);
    fill(together[k].param, Distribution::gaussian, k, 1.0f);
  }
  apart = together;
  Handle handle;
  std::vector<gmtkTensor_t> all;
  for (size_t k = 0; k < 5; ++k) all.push_back(together[k].describe(group_of[k]));
  Plan combined(handle.get(), groups, all);
  Plan plan0(handle.get(), {groups[0]}, {apart[0].describe(0), apart[4].describe(0)});
  Plan plan1(handle.get(), {groups[1]}, {apart[1].describe(0)});
  Plan plan2(handle.get(), {groups[2]}, {apart[2].describe(0), apart[3].describe(0)});
  for (int t = 1; t <= 3; ++t) {
    for (size_t k = 0; k < 5; ++k) {
      fill(together[k].grad, Distribution::gaussian, 50 * t + k);
      apart[k].grad = together[k].grad;
    }
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step = t;
    GMTK_REQUIRE_OK(combined.step(args));
    GMTK_REQUIRE_OK(plan0.step(args));
    GMTK_REQUIRE_OK(plan1.step(args));
    GMTK_REQUIRE_OK(plan2.step(args));
  }
  for (size_t k = 0; k < 5; ++k) {
    INFO("tensor " << k);
    CHECK(together[k].param.bytes == apart[k].param.bytes);
    CHECK(together[k].exp_avg == apart[k].exp_avg);
    CHECK(together[k].exp_avg_sq == apart[k].exp_avg_sq);
  }
}

// ---- SPEC section 4: dtypes, master weights, rounding ----------------------

TEST_CASE("every gradient x parameter dtype pair, with and without master weights, matches the model",
          "[mixed_precision]") {
  const gmtkDtype_t dtypes[] = {GMTK_FLOAT32, GMTK_FLOAT16, GMTK_BFLOAT16};
  for (gmtkDtype_t grad_dtype : dtypes) {
    for (gmtkDtype_t param_dtype : dtypes) {
      for (bool master : {false, true}) {
        if (master && param_dtype == GMTK_FLOAT32) continue;
        for (gmtkMaskMode_t mode : kModes) {
          INFO("grad " << dtype_label(grad_dtype) << ", param " << dtype_label(param_dtype)
                       << (master ? " + fp32 master" : "") << ", " << mode_label(mode));
          Scenario s{adam(GMTK_OPTIMIZER_ADAMW, 0.5, mode, 0.1)};
          s.grad_dtype = grad_dtype;
          s.param_dtype = param_dtype;
          s.master = master;
          s.steps = 4;
          run_against_model(s);
        }
      }
    }
  }
}

namespace {

// Values whose rounding to `dtype` is delicate: exact halfway points between
// neighbours (ties to even), values just either side of them, subnormals of
// the 16-bit type, its largest finite values and overflow to infinity.
std::vector<float> rounding_sweep(gmtkDtype_t dtype) {
  std::vector<float> values;
  std::mt19937_64 rng(9);
  std::uniform_int_distribution<uint32_t> bits(0, 0xFFFFu);
  for (int i = 0; i < 4000; ++i) {
    const auto a = static_cast<uint16_t>(bits(rng) & 0x7FFFu);
    const float low = dtype == GMTK_FLOAT16 ? half_to_float(a) : bf16_to_float(a);
    const float high = dtype == GMTK_FLOAT16 ? half_to_float(static_cast<uint16_t>(a + 1))
                                             : bf16_to_float(static_cast<uint16_t>(a + 1));
    if (!std::isfinite(low) || !std::isfinite(high)) continue;
    const float halfway = static_cast<float>((static_cast<double>(low) + high) / 2);  // exact in fp32
    for (float v : {halfway, std::nextafter(halfway, 0.0f), std::nextafter(halfway, 1e30f), low}) {
      values.push_back(v);
      values.push_back(-v);
    }
  }
  const float extremes[] = {65504.0f, 65519.0f, 65520.0f, 70000.0f, 3.0e38f, 3.4028235e38f, 5.96e-8f, 2.98e-8f,
                            2.99e-8f, 1e-40f, 9.2e-41f};
  for (float v : extremes) {
    values.push_back(v);
    values.push_back(-v);
  }
  return values;
}

}  // namespace

TEST_CASE("16-bit parameters are rounded from the fp32 result to nearest-even", "[mixed_precision]") {
  for (gmtkDtype_t param_dtype : {GMTK_FLOAT16, GMTK_BFLOAT16}) {
    for (bool master : {false, true}) {
      INFO(dtype_label(param_dtype) << (master ? " + master" : ""));
      const std::vector<float> values = rounding_sweep(param_dtype);
      // SGD with lr 1 from p = 0 computes p = 0 - 1 * g = -g exactly in fp32,
      // so the stored parameter is the rounding of -g.
      TensorData data(values.size(), GMTK_FLOAT32, param_dtype, master);
      for (size_t i = 0; i < values.size(); ++i) {
        data.grad.set(i, -values[i]);
        data.param.set(i, 0.0f);
        if (master) data.master[i] = 0.0f;
      }
      gmtkGroupConfig_t group = sgd(0.0, GMTK_MASK_GRAD, 0.0, 0.0, false, 0.0);
      group.lr = 1.0;
      Handle handle;
      Plan plan(handle.get(), {group}, {data.describe(0)});
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      GMTK_REQUIRE_OK(plan.step(args));
      Mismatches bad;
      for (size_t i = 0; i < values.size(); ++i) {
        const uint16_t expected = param_dtype == GMTK_FLOAT16 ? half_from_float(values[i]) : bf16_from_float(values[i]);
        bad.check(data.param.bits16(i) == expected, describe("rounded param bits", 0, i, 1, data.param.bits16(i), expected) +
                                                         " for value " + std::to_string(values[i]));
        if (master) bad.check(data.master[i] == values[i], describe("master", 0, i, 1, data.master[i], values[i]));
      }
      INFO(bad.count << " mismatches; first: " << bad.first);
      CHECK(bad.count == 0);
    }
  }
}
