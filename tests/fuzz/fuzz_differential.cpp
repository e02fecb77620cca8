// fuzz_differential: the host-run CUDA schedules (HostSelectionEngine, the
// same tables, passes and __host__ __device__ decisions as the kernels)
// against the CPU reference backend, on gradients made of the fuzzer's own
// bit patterns (NaN payloads, infs, ties, subnormals, signed zeros all come
// from the bytes), fuzzed ratios, scopes, modes, dtypes, sizes, optimizers,
// scores and mask inputs, under the product's tuning and a tiny one that
// makes every large-set path reachable at small sizes. Any difference in
// thresholds, kept counts, found_inf, bitmaps, gradients, parameters or
// optimizer state is a finding (abort with a description).
#include <gmtk/gmtk.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../host_schedule/host_selection_engine.hpp"
#include "choices.hpp"

namespace {

using gmtk::kernels::EngineCall;
using gmtk_test::HostSelectionEngine;

using gmtk_fuzz::Choices;

[[noreturn]] void finding(const char* what, size_t tensor, size_t index) {
  std::fprintf(stderr, "fuzz_differential finding: %s (tensor %zu, entry/word %zu)\n", what, tensor, index);
  std::abort();
}

size_t dtype_bytes(gmtkDtype_t dtype) { return dtype == GMTK_FLOAT32 ? 4 : 2; }

// Bit for bit (NaN payloads included), empty buffers alike.
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// One tensor's buffers on one side.
struct TensorBuffers {
  std::vector<unsigned char> grad, param, score;
  std::vector<float> exp_avg, exp_avg_sq, max_exp_avg_sq;
};

// A case: the same bytes on both sides.
struct Case {
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<gmtkTensor_t> shapes;  // group, numel, dtypes, score_dtype (pointers filled per side)
  std::vector<bool> scored;
  std::vector<TensorBuffers> initial;
  EngineCall call = EngineCall::step;
  int input = 0;  // 0 selected, 1 given thresholds, 2 given bits
  bool write_bits = false;
  std::vector<float> given_thresholds;
  std::vector<uint32_t> given_bits;
  bool tiny = false;
};

gmtkDtype_t dtype_of(uint8_t b) { return static_cast<gmtkDtype_t>(b % 3); }

// Raw bits for `n` entries of `dtype` from the fuzzer, mostly close to a few
// magnitudes (ties and shared top bits), sometimes any pattern at all.
std::vector<unsigned char> raw_values(Choices& in, gmtkDtype_t dtype, size_t n, bool finite_only) {
  std::vector<unsigned char> bytes(n * dtype_bytes(dtype));
  const uint32_t base = in.u32();
  const uint8_t spread = in.byte();
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits = in.remaining() > 0 && (i % 3 == 0) ? in.u32() : base ^ (static_cast<uint32_t>(i) * 2654435761u >> (spread % 32));
    if (dtype == GMTK_FLOAT32) {
      if (finite_only && (bits & 0x7F800000u) == 0x7F800000u) bits &= ~0x40000000u;
      std::memcpy(bytes.data() + 4 * i, &bits, 4);
    } else {
      uint16_t half = static_cast<uint16_t>(bits);
      const uint16_t exponent = dtype == GMTK_FLOAT16 ? 0x7C00u : 0x7F80u;
      if (finite_only && (half & exponent) == exponent) half = static_cast<uint16_t>(half & ~0x4000u);
      std::memcpy(bytes.data() + 2 * i, &half, 2);
    }
  }
  return bytes;
}

Case make_case(Choices& in) {
  Case c;
  const size_t group_count = 1 + in.byte() % 2;
  for (size_t g = 0; g < group_count; ++g) {
    gmtkGroupConfig_t group;
    const uint8_t kind = in.byte();
    gmtkGroupConfigInit(&group, static_cast<gmtkOptimizer_t>(kind % 3));
    group.mask_ratio = (kind & 0x80) ? (in.byte() % 3) * 0.5 : in.byte() / 255.0;
    group.scope = (kind & 0x08) ? GMTK_SCOPE_GLOBAL : GMTK_SCOPE_PER_TENSOR;
    group.mask_mode = (kind & 0x10) ? GMTK_MASK_FREEZE : GMTK_MASK_GRAD;
    group.amsgrad = (kind & 0x20) != 0 && group.optimizer != GMTK_OPTIMIZER_SGD;
    if (group.optimizer == GMTK_OPTIMIZER_SGD && (kind & 0x40)) group.momentum = 0.9;
    group.lr = 1e-2;
    c.groups.push_back(group);
  }
  // One gradient (and score) dtype a global group, as validation asks.
  const gmtkDtype_t group_dtype[2] = {dtype_of(in.byte()), dtype_of(in.byte())};
  const gmtkDtype_t score_dtype = dtype_of(in.byte());
  const bool scores = (in.byte() & 3) == 0;
  const size_t tensor_count = 1 + in.byte() % 3;
  for (size_t t = 0; t < tensor_count; ++t) {
    gmtkTensor_t shape{};
    shape.group = static_cast<int32_t>(t % group_count);
    const uint8_t size_kind = in.byte();
    shape.numel = size_kind < 200 ? size_kind : 200 + in.u16() % 3000;
    shape.grad_dtype = group_dtype[shape.group];
    shape.param_dtype = dtype_of(in.byte());
    shape.score_dtype = score_dtype;
    c.shapes.push_back(shape);
    c.scored.push_back(scores);
    TensorBuffers b;
    const size_t n = static_cast<size_t>(shape.numel);
    b.grad = raw_values(in, shape.grad_dtype, n, (size_kind & 7) != 0);
    if (scores) b.score = raw_values(in, score_dtype, n, false);
    b.param = raw_values(in, shape.param_dtype, n, true);
    b.exp_avg.assign(n, 1e-3f);
    b.exp_avg_sq.assign(n, 1e-6f);
    b.max_exp_avg_sq.assign(n, 2e-6f);
    c.initial.push_back(std::move(b));
  }
  const uint8_t call = in.byte();
  c.call = call % 3 == 0 ? EngineCall::select_thresholds : call % 3 == 1 ? EngineCall::mask_gradients : EngineCall::step;
  c.input = (call >> 2) % 3;
  c.write_bits = (call & 0x20) != 0;
  c.tiny = (call & 0x40) != 0;
  for (size_t t = 0; t < tensor_count; ++t) {
    uint32_t bits = in.u32();
    float threshold;
    std::memcpy(&threshold, &bits, 4);
    c.given_thresholds.push_back(threshold);
  }
  return c;
}

// One side: the buffers of every tensor and the records that point at them.
size_t n_of(const TensorBuffers& b) { return b.exp_avg.size(); }

struct Side {
  std::vector<TensorBuffers> buffers;
  std::vector<gmtkTensor_t> records;
  std::vector<float> thresholds;
  std::vector<int64_t> kept;
  std::vector<uint32_t> bits;
  float found_inf = -1.0f;

  Side(const Case& c, uint64_t mask_words) : buffers(c.initial), thresholds(c.shapes.size(), -1.0f),
                                               kept(c.shapes.size(), -1), bits(mask_words, 0xA5A5A5A5u) {
    for (size_t t = 0; t < c.shapes.size(); ++t) {
      gmtkTensor_t r = c.shapes[t];
      TensorBuffers& b = buffers[t];
      const bool adam = c.groups[r.group].optimizer != GMTK_OPTIMIZER_SGD;
      const bool momentum = adam || c.groups[r.group].momentum != 0;
      r.grad = b.grad.empty() ? nullptr : b.grad.data();
      r.param = b.param.empty() ? nullptr : b.param.data();
      r.exp_avg = momentum && !b.exp_avg.empty() ? b.exp_avg.data() : nullptr;
      r.exp_avg_sq = adam && !b.exp_avg_sq.empty() ? b.exp_avg_sq.data() : nullptr;
      r.max_exp_avg_sq = adam && c.groups[r.group].amsgrad && n_of(b) > 0 ? b.max_exp_avg_sq.data() : nullptr;
      r.score = c.scored[t] && !b.score.empty() ? b.score.data() : nullptr;
      records.push_back(r);
    }
  }

  gmtkStepArgs_t args(const Case& c) {
    gmtkStepArgs_t a = GMTK_STEP_ARGS_INIT;
    a.thresholds = thresholds.data();
    a.kept_counts = kept.data();
    a.found_inf = &found_inf;
    if (c.input == 1) a.given_thresholds = c.given_thresholds.data();
    if (c.input == 2 && !c.given_bits.empty()) a.given_mask_bits = c.given_bits.data();
    if (c.write_bits && !bits.empty()) a.mask_bits = bits.data();
    return a;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Choices in(data, size);
  Case c = make_case(in);

  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  hc.backend = GMTK_BACKEND_CPU_REFERENCE;
  static gmtkHandle_t handle = [&] {
    gmtkHandle_t created = nullptr;
    if (gmtkHandleCreate(&created, &hc) != GMTK_SUCCESS) finding("the CPU handle was refused", 0, 0);
    return created;
  }();

  Side reference(c, 0);
  gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
  pc.groups = c.groups.data();
  pc.num_groups = static_cast<int32_t>(c.groups.size());
  pc.tensors = reference.records.data();
  pc.num_tensors = static_cast<int64_t>(reference.records.size());
  pc.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
  gmtkPlan_t plan = nullptr;
  if (gmtkPlanCreate(handle, &pc, &plan) != GMTK_SUCCESS) return 0;  // a combination validation refuses
  uint64_t mask_words = 0;
  gmtkPlanGetMaskLayout(plan, &mask_words, nullptr);
  if (c.input == 2) {
    c.given_bits.resize(mask_words);
    for (uint32_t& word : c.given_bits) word = in.u32();
  }
  reference.bits.assign(mask_words, 0xA5A5A5A5u);
  Side engine_side(c, mask_words);

  const gmtkStepArgs_t reference_args = reference.args(c);
  const gmtkStatus_t status =
      c.call == EngineCall::step            ? gmtkStep(plan, &reference_args, nullptr, 0, nullptr)
      : c.call == EngineCall::mask_gradients ? gmtkMaskGradients(plan, &reference_args, nullptr, 0, nullptr)
                                             : gmtkSelectThresholds(plan, &reference_args, nullptr, 0, nullptr);
  gmtkPlanDestroy(plan);
  if (status != GMTK_SUCCESS) return 0;

  gmtk::kernels::SelectionTuning tuning = c.tiny ? gmtk_test::tiny_step_tuning() : gmtk::kernels::SelectionTuning{};
  if (c.tiny) {  // deferral regions that hold small boundary bins too: the update's deferral path is common
    tuning.min_deferrals = 8;
    tuning.deferral_share = 4;
  }
  HostSelectionEngine engine(c.groups, engine_side.records, tuning);
  engine.run(engine_side.args(c), c.call);

  if (std::memcmp(&reference.found_inf, &engine_side.found_inf, 4) != 0) finding("found_inf differs", 0, 0);
  for (size_t t = 0; t < c.shapes.size(); ++t) {
    if (std::memcmp(&reference.thresholds[t], &engine_side.thresholds[t], 4) != 0) finding("threshold differs", t, 0);
    if (reference.kept[t] != engine_side.kept[t]) finding("kept count differs", t, 0);
    const TensorBuffers& a = reference.buffers[t];
    const TensorBuffers& b = engine_side.buffers[t];
    if (a.grad != b.grad) finding("gradient differs", t, 0);
    if (a.param != b.param) finding("parameter differs", t, 0);
    if (!same_bits(a.exp_avg, b.exp_avg)) finding("exp_avg differs", t, 0);
    if (!same_bits(a.exp_avg_sq, b.exp_avg_sq)) finding("exp_avg_sq differs", t, 0);
    if (!same_bits(a.max_exp_avg_sq, b.max_exp_avg_sq)) finding("max_exp_avg_sq differs", t, 0);
  }
  for (size_t w = 0; c.write_bits && w < mask_words; ++w) {
    if (reference.bits[w] != engine_side.bits[w]) finding("bitmap word differs", 0, w);
  }
  return 0;
}
