// cuda_step_on_host: gmtkStep as the CUDA backend runs it (selection, then the
// fused update of kernels/step_kernels.cu, then the outputs), run on the host
// by HostSelectionEngine over the same tables, items and __host__ __device__
// arithmetic, against the CPU reference backend through the public API. Both
// sides round every fp32 operation the same way, so the comparison is bit for
// bit: parameters, masters, every state buffer, gradients (untouched),
// thresholds, kept counts, found_inf and the step counter, over multi-step
// sequences. (On the GPU the bound is docs/semantics.md's 4 ulp; here it is 0.)
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <limits>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../../host/cpu_reference/dtypes.hpp"
#include "gradient_contents.hpp"
#include "host_selection_engine.hpp"

namespace gmtk_test {
namespace {

// ---- A case ------------------------------------------------------------------------

struct StepTensorSpec {
  int64_t numel;
  gmtkDtype_t grad_dtype;
  gmtkDtype_t param_dtype;
  bool master;
  int32_t group;
  size_t misalignment = 0;        // entries past a 256-byte boundary, for every buffer of the tensor
  size_t state_misalignment = 0;  // extra entries for the fp32 state buffers only (breaks the common vector phase)
  bool score = false;             // the mask is chosen on a score buffer of score_dtype (SPEC section 8)
  gmtkDtype_t score_dtype = GMTK_FLOAT32;
};

// Where a call's mask comes from (SPEC section 8): selection, or a given input.
enum class MaskInput {
  selected,
  thresholds_of_last_call,  // step 1 selects; later calls take the last call's thresholds
  bits_of_last_call,        // step 1 selects and writes its bitmap; later calls take it
  random_thresholds,        // per call: entries' values, values between them, and specials
  random_bits,              // per call: random words, garbage past each tensor's entries included
};

struct StepCase {
  std::string name;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<StepTensorSpec> tensors;
  Contents contents = Contents::gaussian;
  uint64_t seed = 1;
  int steps = 3;
  bool use_step_count = false;
  bool with_scale = false;
  bool want_kept_counts = true;  // without them, a global large set may defer its boundary bin too
  int non_finite_at_step = 0;  // 1-based step whose last tensor gets an inf gradient (0: none)
  float inv_loss_scale = 0.5f;  // with_scale
  std::vector<float> lr_device_values;  // per step, when groups read lr_device
  EngineCall call = EngineCall::step;   // or gmtkSelectThresholds / gmtkMaskGradients
  MaskInput input = MaskInput::selected;
  bool write_mask_bits = false;         // args.mask_bits
};

gmtkGroupConfig_t make_group(gmtkOptimizer_t optimizer, double ratio, gmtkMaskMode_t mode,
                             gmtkScope_t scope = GMTK_SCOPE_PER_TENSOR) {
  gmtkGroupConfig_t group;
  gmtkGroupConfigInit(&group, optimizer);
  group.mask_ratio = ratio;
  group.mask_mode = mode;
  group.scope = scope;
  group.lr = 1e-2;
  return group;
}

// Every optimizer path of docs/semantics.md.
struct OptimizerVariant {
  const char* name;
  gmtkGroupConfig_t (*make)(double ratio, gmtkMaskMode_t mode);
};

const OptimizerVariant kOptimizers[] = {
    {"adamw", [](double r, gmtkMaskMode_t m) { return make_group(GMTK_OPTIMIZER_ADAMW, r, m); }},
    {"adamw_no_decay",
     [](double r, gmtkMaskMode_t m) {
       gmtkGroupConfig_t g = make_group(GMTK_OPTIMIZER_ADAMW, r, m);
       g.weight_decay = 0;
       return g;
     }},
    {"adam_l2",
     [](double r, gmtkMaskMode_t m) {
       gmtkGroupConfig_t g = make_group(GMTK_OPTIMIZER_ADAM, r, m);
       g.weight_decay = 0.05;
       return g;
     }},
    {"adam_amsgrad_maximize",
     [](double r, gmtkMaskMode_t m) {
       gmtkGroupConfig_t g = make_group(GMTK_OPTIMIZER_ADAM, r, m);
       g.amsgrad = 1;
       g.maximize = 1;
       g.beta1 = 0.8;
       g.beta2 = 0.95;
       g.eps = 1e-6;
       return g;
     }},
    {"adamw_amsgrad",
     [](double r, gmtkMaskMode_t m) {
       gmtkGroupConfig_t g = make_group(GMTK_OPTIMIZER_ADAMW, r, m);
       g.amsgrad = 1;
       return g;
     }},
    {"sgd", [](double r, gmtkMaskMode_t m) { return make_group(GMTK_OPTIMIZER_SGD, r, m); }},
    {"sgd_momentum_dampening_decay",
     [](double r, gmtkMaskMode_t m) {
       gmtkGroupConfig_t g = make_group(GMTK_OPTIMIZER_SGD, r, m);
       g.momentum = 0.9;
       g.dampening = 0.25;
       g.weight_decay = 0.01;
       return g;
     }},
    {"sgd_nesterov_maximize",
     [](double r, gmtkMaskMode_t m) {
       gmtkGroupConfig_t g = make_group(GMTK_OPTIMIZER_SGD, r, m);
       g.momentum = 0.5;
       g.nesterov = 1;
       g.maximize = 1;
       return g;
     }},
};

const gmtkDtype_t kDtypes[] = {GMTK_FLOAT32, GMTK_FLOAT16, GMTK_BFLOAT16};

const char* dtype_name(gmtkDtype_t dtype) {
  return dtype == GMTK_FLOAT32 ? "f32" : dtype == GMTK_FLOAT16 ? "f16" : "bf16";
}

// ---- The buffers of one side -----------------------------------------------------

// Every buffer of every tensor in one arena, at the case's misalignments.
class World {
 public:
  enum Buffer { kGrad, kParam, kMaster, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kScore, kBuffers };

  World(const StepCase& c) : case_(c), offsets_(c.tensors.size()) {
    size_t size = 0;
    for (size_t t = 0; t < c.tensors.size(); ++t) {
      const StepTensorSpec& spec = c.tensors[t];
      for (int b = 0; b < kBuffers; ++b) {
        offsets_[t][b] = kAbsent;
        if (!has(t, static_cast<Buffer>(b)) || spec.numel == 0) continue;
        const size_t misalignment =
            (spec.misalignment + (b >= kMaster ? spec.state_misalignment : 0)) * bytes_of(t, static_cast<Buffer>(b));
        size = (size + 255) / 256 * 256 + misalignment;
        offsets_[t][b] = size;
        size += static_cast<size_t>(spec.numel) * bytes_of(t, static_cast<Buffer>(b));
      }
    }
    bytes_.assign(size + 512, 0);
    shift_ = (256 - reinterpret_cast<uintptr_t>(bytes_.data()) % 256) % 256;
  }

  bool has(size_t t, Buffer b) const {
    const StepTensorSpec& spec = case_.tensors[t];
    const gmtkGroupConfig_t& group = case_.groups[spec.group];
    const bool adam = group.optimizer != GMTK_OPTIMIZER_SGD;
    switch (b) {
      case kGrad:
      case kParam: return true;
      case kMaster: return spec.master;
      case kExpAvg: return adam || group.momentum != 0;
      case kExpAvgSq: return adam;
      case kMaxExpAvgSq: return adam && group.amsgrad;
      case kScore: return spec.score;
      case kBuffers: break;
    }
    return false;
  }

  size_t bytes_of(size_t t, Buffer b) const {
    if (b == kGrad) return element_bytes(case_.tensors[t].grad_dtype);
    if (b == kParam) return element_bytes(case_.tensors[t].param_dtype);
    if (b == kScore) return element_bytes(case_.tensors[t].score_dtype);
    return 4;
  }

  void* at(size_t t, Buffer b) {
    return offsets_[t][b] == kAbsent ? nullptr : bytes_.data() + shift_ + offsets_[t][b];
  }

  std::vector<gmtkTensor_t> records() {
    std::vector<gmtkTensor_t> records(case_.tensors.size());
    for (size_t t = 0; t < records.size(); ++t) {
      const StepTensorSpec& spec = case_.tensors[t];
      gmtkTensor_t& r = records[t];
      r = gmtkTensor_t{};
      r.group = spec.group;
      r.numel = spec.numel;
      r.grad_dtype = spec.grad_dtype;
      r.param_dtype = spec.param_dtype;
      r.grad = at(t, kGrad);
      r.param = at(t, kParam);
      r.master_param = static_cast<float*>(at(t, kMaster));
      r.exp_avg = static_cast<float*>(at(t, kExpAvg));
      r.exp_avg_sq = static_cast<float*>(at(t, kExpAvgSq));
      r.max_exp_avg_sq = static_cast<float*>(at(t, kMaxExpAvgSq));
      r.score = at(t, kScore);
      r.score_dtype = spec.score_dtype;
    }
    return records;
  }

  // Parameters and state of a trained model: masters near the params,
  // non-negative second moments, v_max >= v.
  void fill_state(uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 0.5f);
    std::uniform_real_distribution<float> positive(0.0f, 1e-4f);
    for (size_t t = 0; t < case_.tensors.size(); ++t) {
      const StepTensorSpec& spec = case_.tensors[t];
      for (int64_t i = 0; i < spec.numel; ++i) {
        const float p = normal(rng);
        if (has(t, kMaster)) put_float(t, kMaster, i, p);
        put_raw(t, kParam, i, stored_bits(p, spec.param_dtype));
        if (has(t, kExpAvg)) put_float(t, kExpAvg, i, normal(rng) * 1e-3f);
        const float v = positive(rng);
        if (has(t, kExpAvgSq)) put_float(t, kExpAvgSq, i, v);
        if (has(t, kMaxExpAvgSq)) put_float(t, kMaxExpAvgSq, i, v * (1.0f + positive(rng) * 1e4f));
      }
    }
  }

  // The gradients of step `step` (1-based): the case's contents, with the
  // scale jumping between steps (x1e6 for fp32, x64 for 16-bit), and an inf
  // in the last tensor at the case's non-finite step.
  void fill_gradients(int step) {
    std::mt19937_64 rng(case_.seed * 1000 + static_cast<uint64_t>(step));
    for (size_t t = 0; t < case_.tensors.size(); ++t) {
      const StepTensorSpec& spec = case_.tensors[t];
      const float scale = step % 2 == 0 ? (spec.grad_dtype == GMTK_FLOAT32 ? 1e6f : 64.0f) : 1.0f;
      for (int64_t i = 0; i < spec.numel; ++i) {
        uint32_t raw = entry_bits(case_.contents, spec.grad_dtype, static_cast<uint64_t>(i),
                                  static_cast<uint64_t>(spec.numel), rng);
        if (scale != 1.0f && case_.contents == Contents::gaussian) {
          raw = stored_bits(stored_value(raw, spec.grad_dtype) * scale, spec.grad_dtype);
        }
        put_raw(t, kGrad, i, raw);
      }
      // A score of its own dtype and contents (an accumulated |g|, say): not the gradient's order.
      std::mt19937_64 score_rng(case_.seed * 7919 + static_cast<uint64_t>(step) * 31 + t);
      for (int64_t i = 0; has(t, kScore) && i < spec.numel; ++i) {
        put_raw(t, kScore, i, entry_bits(case_.contents, spec.score_dtype, static_cast<uint64_t>(i),
                                         static_cast<uint64_t>(spec.numel), score_rng));
      }
      // An inf score over a finite gradient: found_inf checks the gradient only.
      if (has(t, kScore) && spec.numel > 0 && step == 1) {
        put_raw(t, kScore, spec.numel / 3, stored_bits(std::numeric_limits<float>::infinity(), spec.score_dtype));
      }
    }
    if (step == case_.non_finite_at_step) {
      const size_t last = case_.tensors.size() - 1;
      const StepTensorSpec& spec = case_.tensors[last];
      REQUIRE(spec.numel > 0);
      put_raw(last, kGrad, spec.numel / 2, stored_bits(std::numeric_limits<float>::infinity(), spec.grad_dtype));
    }
  }

  std::vector<unsigned char>& bytes() { return bytes_; }

  // Entry i of tensor t's keys (its score, else its gradient) as a float.
  float key_value(size_t t, int64_t i) {
    const Buffer b = has(t, kScore) ? kScore : kGrad;
    const gmtkDtype_t dtype = b == kScore ? case_.tensors[t].score_dtype : case_.tensors[t].grad_dtype;
    uint32_t raw = 0;
    std::memcpy(&raw, static_cast<unsigned char*>(at(t, b)) + i * bytes_of(t, b), bytes_of(t, b));
    return stored_value(raw, dtype);
  }

  // Where two worlds first differ: tensor, buffer, entry.
  std::string first_difference(World& other) {
    for (size_t t = 0; t < case_.tensors.size(); ++t) {
      for (int b = 0; b < kBuffers; ++b) {
        const auto buffer = static_cast<Buffer>(b);
        if (at(t, buffer) == nullptr) continue;
        const size_t element = bytes_of(t, buffer);
        for (int64_t i = 0; i < case_.tensors[t].numel; ++i) {
          const void* mine = static_cast<unsigned char*>(at(t, buffer)) + i * element;
          const void* theirs = static_cast<unsigned char*>(other.at(t, buffer)) + i * element;
          if (std::memcmp(mine, theirs, element) != 0) {
            static const char* names[] = {"grad",       "param",          "master_param", "exp_avg",
                                          "exp_avg_sq", "max_exp_avg_sq", "score"};
            std::ostringstream out;
            out << "tensors[" << t << "]." << names[b] << "[" << i << "]: reference 0x" << std::hex
                << raw_at(mine, element) << ", host-run CUDA schedule 0x" << raw_at(theirs, element);
            return out.str();
          }
        }
      }
    }
    return "";
  }

 private:
  static constexpr size_t kAbsent = ~size_t{0};

  static uint32_t raw_at(const void* p, size_t element) {
    uint32_t raw = 0;
    std::memcpy(&raw, p, element);
    return raw;
  }
  void put_raw(size_t t, Buffer b, int64_t i, uint32_t raw) {
    std::memcpy(static_cast<unsigned char*>(at(t, b)) + i * bytes_of(t, b), &raw, bytes_of(t, b));
  }
  void put_float(size_t t, Buffer b, int64_t i, float value) { put_raw(t, b, i, bits_of(value)); }

  const StepCase& case_;
  std::vector<std::array<size_t, kBuffers>> offsets_;
  std::vector<unsigned char> bytes_;
  size_t shift_ = 0;
};

struct CallOutputs {
  std::vector<float> thresholds;
  std::vector<int64_t> kept;
  float found_inf = -1.0f;
  int64_t step_count = 0;
  std::vector<uint32_t> mask_bits;  // written when the case asks for the bitmap
};

// A call's given input, the same bytes for both sides.
struct GivenInput {
  std::vector<float> thresholds;
  std::vector<uint32_t> bits;
  bool use_thresholds = false;
  bool use_bits = false;
};

gmtkStepArgs_t step_args(CallOutputs& out, const StepCase& c, int step, const float* inv_loss_scale,
                         const GivenInput& given) {
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.given_thresholds = given.use_thresholds ? given.thresholds.data() : nullptr;
  args.given_mask_bits = given.use_bits ? given.bits.data() : nullptr;
  const bool bits_out = c.write_mask_bits || (c.input == MaskInput::bits_of_last_call && step == 1);
  if (bits_out) {
    std::fill(out.mask_bits.begin(), out.mask_bits.end(), 0xDEADBEEFu);  // every word must be written
    args.mask_bits = out.mask_bits.data();
  }
  args.step = step;
  args.step_count = c.use_step_count ? &out.step_count : nullptr;
  args.thresholds = out.thresholds.data();
  args.kept_counts = c.want_kept_counts ? out.kept.data() : nullptr;
  args.found_inf = &out.found_inf;
  args.inv_loss_scale = c.with_scale ? inv_loss_scale : nullptr;
  return args;
}

// Sums the traces of a case's steps (or of several cases).
void add(EngineTrace& total, const EngineTrace& trace) {
  total.update_ran = total.update_ran || trace.update_ran;
  total.launches = std::max(total.launches, trace.launches);
  total.idle_chunks += trace.idle_chunks;
  total.vector_items += trace.vector_items;
  total.scalar_items += trace.scalar_items;
  total.untouched_items += trace.untouched_items;
  total.entries_updated += trace.entries_updated;
  total.entries_fed_zero += trace.entries_fed_zero;
  total.entries_frozen += trace.entries_frozen;
  total.param_bits_loaded_with_master += trace.param_bits_loaded_with_master;
  total.large_sets_selected += trace.large_sets_selected;
  total.small_sets_selected += trace.small_sets_selected;
  total.entries_deferred += trace.entries_deferred;
  total.sets_deferring += trace.sets_deferring;
  total.items_by_bits += trace.items_by_bits;
  total.items_by_score += trace.items_by_score;
  total.items_without_gradient += trace.items_without_gradient;
  total.found_inf_rereads += trace.found_inf_rereads;
  total.mask_bits_set += trace.mask_bits_set;
}

// The given thresholds of a random_thresholds call: for each tensor one of
// an entry's value, a value just above or below one (between two 16-bit
// values), or a special (0, -0, negative, the smallest subnormal, inf, NaN).
std::vector<float> random_thresholds(World& world, const StepCase& c, std::mt19937_64& rng) {
  std::vector<float> thresholds(c.tensors.size());
  const float specials[] = {0.0f, -0.0f, -1.0f, 1e-45f, std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), stored_value(0x7FA12345u, GMTK_FLOAT32), 65519.0f, 1e-7f};
  for (size_t t = 0; t < thresholds.size(); ++t) {
    const int64_t numel = c.tensors[t].numel;
    const uint64_t pick = rng() % 10;
    if (numel == 0 || pick == 0) {
      thresholds[t] = specials[rng() % (sizeof(specials) / sizeof(specials[0]))];
      continue;
    }
    const float value = std::fabs(world.key_value(t, static_cast<int64_t>(rng() % static_cast<uint64_t>(numel))));
    thresholds[t] = pick < 5   ? value
                    : pick < 8 ? std::nextafter(value, std::numeric_limits<float>::infinity())
                               : std::nextafter(value, 0.0f);
  }
  return thresholds;
}

// Runs a case's steps on the CPU reference and on the host-run CUDA schedule
// (under `tuning`) from the same bytes, comparing after every step. Returns
// the engine's traces, summed.
EngineTrace run_case(const StepCase& c, const SelectionTuning& tuning) {
  INFO("case: " << c.name);
  World reference_world(c), engine_world(c);
  reference_world.fill_state(c.seed);
  engine_world.fill_state(c.seed);

  float lr_device = c.lr_device_values.empty() ? 0.0f : c.lr_device_values[0];
  std::vector<gmtkGroupConfig_t> groups = c.groups;
  for (gmtkGroupConfig_t& g : groups) {
    if (!c.lr_device_values.empty()) g.lr_device = &lr_device;
  }
  const float inv_loss_scale = c.inv_loss_scale;

  gmtkHandle_t handle = nullptr;
  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  hc.backend = GMTK_BACKEND_CPU_REFERENCE;
  REQUIRE(gmtkHandleCreate(&handle, &hc) == GMTK_SUCCESS);
  const std::vector<gmtkTensor_t> reference_records = reference_world.records();
  gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
  pc.groups = groups.data();
  pc.num_groups = static_cast<int32_t>(groups.size());
  pc.tensors = reference_records.data();
  pc.num_tensors = static_cast<int64_t>(reference_records.size());
  pc.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
  gmtkPlan_t plan = nullptr;
  {
    const gmtkStatus_t status = gmtkPlanCreate(handle, &pc, &plan);
    INFO(gmtkGetLastErrorMessage());
    REQUIRE(status == GMTK_SUCCESS);
  }
  HostSelectionEngine engine(groups, engine_world.records(), tuning);

  const size_t n = c.tensors.size();
  // The bitmap layout: the plan's (gmtkPlanGetMaskLayout) is the engine's.
  uint64_t mask_words = 0;
  std::vector<uint64_t> word_offsets(n);
  REQUIRE(gmtkPlanGetMaskLayout(plan, &mask_words, word_offsets.data()) == GMTK_SUCCESS);
  REQUIRE(engine.tables().mask_words == mask_words);
  for (size_t t = 0; t < n; ++t) REQUIRE(engine.tables().tensors[t].mask_word_offset == word_offsets[t]);

  CallOutputs expected{std::vector<float>(n, -7.0f), std::vector<int64_t>(n, -7), -1.0f, 0,
                       std::vector<uint32_t>(mask_words)};
  CallOutputs got{std::vector<float>(n, -9.0f), std::vector<int64_t>(n, -9), -1.0f, 0,
                  std::vector<uint32_t>(mask_words)};
  GivenInput given;
  std::mt19937_64 input_rng(c.seed * 101);
  EngineTrace total;
  for (int step = 1; step <= c.steps; ++step) {
    INFO("step " << step);
    if (!c.lr_device_values.empty()) lr_device = c.lr_device_values[static_cast<size_t>(step - 1)];
    reference_world.fill_gradients(step);
    engine_world.fill_gradients(step);
    // This call's given input, from the last call's outputs (compared equal on both sides) or at random.
    given.use_thresholds = false;
    given.use_bits = false;
    switch (c.input) {
      case MaskInput::selected: break;
      case MaskInput::thresholds_of_last_call:
        given.thresholds = expected.thresholds;
        given.use_thresholds = step > 1;
        break;
      case MaskInput::bits_of_last_call:
        given.bits = expected.mask_bits;
        given.use_bits = step > 1;
        break;
      case MaskInput::random_thresholds:
        given.thresholds = random_thresholds(reference_world, c, input_rng);
        given.use_thresholds = true;
        break;
      case MaskInput::random_bits:
        given.bits.resize(mask_words);
        for (uint32_t& word : given.bits) word = static_cast<uint32_t>(input_rng() & input_rng());  // ~1/4 kept
        given.use_bits = true;
        break;
    }
    const gmtkStepArgs_t reference_args = step_args(expected, c, step, &inv_loss_scale, given);
    {
      const gmtkStatus_t status = c.call == EngineCall::step ? gmtkStep(plan, &reference_args, nullptr, 0, nullptr)
                                  : c.call == EngineCall::mask_gradients
                                      ? gmtkMaskGradients(plan, &reference_args, nullptr, 0, nullptr)
                                      : gmtkSelectThresholds(plan, &reference_args, nullptr, 0, nullptr);
      INFO(gmtkGetLastErrorMessage());
      REQUIRE(status == GMTK_SUCCESS);
    }
    const gmtkStepArgs_t engine_args = step_args(got, c, step, &inv_loss_scale, given);
    const EngineTrace trace = engine.run(engine_args, c.call);
    CHECK(trace.misaligned_vector_items == 0);  // a device vector load there would fault

    CHECK(got.found_inf == expected.found_inf);
    CHECK(got.step_count == expected.step_count);
    for (size_t t = 0; t < n; ++t) {
      INFO("tensor " << t);
      CHECK(bits_of(got.thresholds[t]) == bits_of(expected.thresholds[t]));
      if (c.want_kept_counts) CHECK(got.kept[t] == expected.kept[t]);
    }
    if (reference_args.mask_bits != nullptr) {
      for (uint64_t w = 0; w < mask_words; ++w) {
        INFO("mask word " << w);
        CHECK(got.mask_bits[w] == expected.mask_bits[w]);
        if (got.mask_bits[w] != expected.mask_bits[w]) break;
      }
    }
    const std::string difference = reference_world.first_difference(engine_world);
    CHECK(difference.empty());
    if (!difference.empty()) {
      FAIL_CHECK(difference);
      break;  // later steps would only repeat it
    }

    add(total, trace);
  }
  gmtkPlanDestroy(plan);
  gmtkHandleDestroy(handle);
  return total;
}



// ---- The cases ------------------------------------------------------------------------

TEST_CASE("every optimizer x mask mode x dtype pair, with and without masters, over 3 steps",
          "[cuda_step_on_host]") {
  EngineTrace total;
  for (const OptimizerVariant& optimizer : kOptimizers) {
    for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
      for (gmtkDtype_t grad : kDtypes) {
        for (gmtkDtype_t param : kDtypes) {
          for (bool master : {false, true}) {
            if (master && param == GMTK_FLOAT32) continue;
            StepCase c;
            c.name = std::string(optimizer.name) + (mode == GMTK_MASK_FREEZE ? " freeze" : " mask-grad") + " g=" +
                     dtype_name(grad) + " p=" + dtype_name(param) + (master ? "+master" : "");
            c.groups = {optimizer.make(0.5, mode), optimizer.make(0.9, mode)};
            c.tensors = {{1000 + 3, grad, param, master, 0, 0},
                         {77, grad, param, master, 1, 3},
                         {300, grad, param, master, 0, 0}};
            c.seed = 11 + total.entries_updated % 7;
            c.with_scale = grad != GMTK_FLOAT16;
            add(total, run_case(c, SelectionTuning{}));
          }
        }
      }
    }
  }
  CHECK(total.update_ran);
  CHECK(total.vector_items > 0);
  CHECK(total.scalar_items > 0);
  CHECK(total.entries_updated > 0);
  CHECK(total.entries_fed_zero > 0);
  CHECK(total.entries_frozen > 0);
  CHECK(total.untouched_items > 0);
  CHECK(total.param_bits_loaded_with_master > 0);
}

TEST_CASE("ratios 0 to 1 in both scopes, on the large-set path and the one-block path", "[cuda_step_on_host]") {
  EngineTrace total;
  for (double ratio : {0.0, 0.3, 0.5, 0.9, 0.99, 1.0}) {
    for (gmtkScope_t scope : {GMTK_SCOPE_PER_TENSOR, GMTK_SCOPE_GLOBAL}) {
      for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
        for (gmtkDtype_t dtype : {GMTK_FLOAT32, GMTK_BFLOAT16}) {
          StepCase c;
          c.name = "ratio " + std::to_string(ratio) + (scope == GMTK_SCOPE_GLOBAL ? " global" : " per-tensor") +
                   (mode == GMTK_MASK_FREEZE ? " freeze " : " mask-grad ") + dtype_name(dtype);
          c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, ratio, mode, scope)};
          c.groups[0].amsgrad = 1;
          c.tensors = {{1500, dtype, dtype, dtype != GMTK_FLOAT32, 0, 2},
                       {640, dtype, dtype, dtype != GMTK_FLOAT32, 0, 0},
                       {3, dtype, dtype, dtype != GMTK_FLOAT32, 0, 0}};
          c.contents = ratio == 0.5 ? Contents::quantized : Contents::gaussian;
          add(total, run_case(c, SelectionTuning{}));
          add(total, run_case(c, tiny_step_tuning()));
        }
      }
    }
  }
  CHECK(total.large_sets_selected > 0);
  CHECK(total.small_sets_selected > 0);
  CHECK(total.idle_chunks > 0);  // freeze at ratio 1
  CHECK(total.sets_deferring > 0);  // the update deferred boundary bins ...
  CHECK(total.entries_deferred > 0);  // ... and the finish pass settled their entries
  CHECK(total.untouched_items > 0);
}

TEST_CASE("every gradient content: ties, zeros, subnormals, NaN keys, shared top bits", "[cuda_step_on_host]") {
  for (Contents contents : kAllContents) {
    if (contents == Contents::non_finite || contents == Contents::random_bits) continue;  // the no-op case below
    for (gmtkDtype_t dtype : kDtypes) {
      StepCase c;
      c.name = std::string(name_of(contents)) + " " + dtype_name(dtype);
      c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_MASK_GRAD),
                  make_group(GMTK_OPTIMIZER_SGD, 0.5, GMTK_MASK_FREEZE, GMTK_SCOPE_GLOBAL)};
      c.groups[1].momentum = 0.9;
      c.tensors = {{900, dtype, GMTK_FLOAT32, false, 0, 0}, {400, dtype, GMTK_FLOAT32, false, 1, 0},
                   {129, dtype, GMTK_FLOAT32, false, 1, 0}};
      c.contents = contents;
      run_case(c, SelectionTuning{});
      run_case(c, tiny_step_tuning());
    }
  }
}

TEST_CASE("a non-finite gradient makes the step a no-op: outputs written, step_count not advanced",
          "[cuda_step_on_host]") {
  for (bool with_scale : {false, true}) {
    for (int at_step : {1, 2}) {
      StepCase c;
      c.name = std::string("inf at step ") + std::to_string(at_step) + (with_scale ? " scaled" : "");
      c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_MASK_GRAD),
                  make_group(GMTK_OPTIMIZER_SGD, 0.9, GMTK_MASK_FREEZE)};
      c.tensors = {{20000, GMTK_FLOAT32, GMTK_FLOAT32, false, 0, 0},  // under tiny tuning: a window, a deferral
                   {300, GMTK_BFLOAT16, GMTK_BFLOAT16, true, 1, 0},
                   {200, GMTK_FLOAT16, GMTK_FLOAT16, false, 0, 0}};
      c.use_step_count = true;
      c.with_scale = with_scale;
      c.non_finite_at_step = at_step;
      const EngineTrace trace = run_case(c, SelectionTuning{});
      CHECK(trace.update_ran);  // the other steps applied
      // Large sets, whose boundary bins a step defers: not when a gradient
      // is not finite (the update does nothing; the outputs still need T).
      const EngineTrace large = run_case(c, tiny_step_tuning());
      CHECK(large.sets_deferring > 0);  // on the steps without the inf
    }
  }
  // Finite fp32 gradients that only the scale overflows: step 2's x1e6
  // gradients times 1e30 are inf after unscaling, step 1's are not.
  StepCase c;
  c.name = "finite gradients overflowed by the scale";
  c.groups = {make_group(GMTK_OPTIMIZER_ADAM, 0.5, GMTK_MASK_GRAD)};
  c.tensors = {{257, GMTK_FLOAT32, GMTK_FLOAT32, false, 0, 0}};
  c.with_scale = true;
  c.inv_loss_scale = 1e30f;
  c.use_step_count = true;
  c.steps = 2;
  run_case(c, SelectionTuning{});
}

TEST_CASE("step_count on the device and args.step agree; lr_device is read when the step runs",
          "[cuda_step_on_host]") {
  for (bool use_step_count : {false, true}) {
    StepCase c;
    c.name = use_step_count ? "step_count" : "args.step";
    c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_MASK_GRAD),
                make_group(GMTK_OPTIMIZER_SGD, 0.3, GMTK_MASK_GRAD)};
    c.groups[1].momentum = 0.9;
    c.tensors = {{333, GMTK_FLOAT32, GMTK_BFLOAT16, true, 0, 0}, {111, GMTK_BFLOAT16, GMTK_FLOAT32, false, 1, 0}};
    c.steps = 4;
    c.use_step_count = use_step_count;
    c.lr_device_values = {1e-2f, 3e-3f, 0.0f, 5e-2f};
    run_case(c, SelectionTuning{});
  }
}

TEST_CASE("vector heads and tails at every misalignment; buffers that disagree go entry by entry",
          "[cuda_step_on_host]") {
  EngineTrace total;
  for (int64_t numel = 0; numel <= 13; ++numel) {
    for (size_t misalignment : {0u, 1u, 2u, 3u}) {
      for (size_t state_misalignment : {0u, 1u, 2u}) {
        StepCase c;
        c.name = "numel " + std::to_string(numel) + " at +" + std::to_string(misalignment) + " state +" +
                 std::to_string(state_misalignment);
        c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_MASK_FREEZE)};
        c.tensors = {{numel, GMTK_FLOAT32, GMTK_FLOAT32, false, 0, misalignment, state_misalignment},
                     {numel + 5, GMTK_BFLOAT16, GMTK_BFLOAT16, true, 0, 3 - misalignment, state_misalignment}};
        c.steps = 2;
        add(total, run_case(c, SelectionTuning{}));
      }
    }
  }
  CHECK(total.vector_items > 0);
  CHECK(total.scalar_items > 0);
}

TEST_CASE("plans of 1 to 300 tensors in several groups, large sets and many chunks", "[cuda_step_on_host]") {
  for (int tensors : {1, 2, 37, 300}) {
    StepCase c;
    c.name = std::to_string(tensors) + " tensors";
    c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_MASK_GRAD, GMTK_SCOPE_GLOBAL),
                make_group(GMTK_OPTIMIZER_ADAM, 0.5, GMTK_MASK_FREEZE),
                make_group(GMTK_OPTIMIZER_SGD, 0.99, GMTK_MASK_GRAD, GMTK_SCOPE_GLOBAL)};
    for (int t = 0; t < tensors; ++t) {
      const gmtkDtype_t dtype = kDtypes[t % 3];
      c.tensors.push_back({17 + (t * 37) % 400, dtype == GMTK_FLOAT16 ? GMTK_FLOAT16 : GMTK_FLOAT32, dtype,
                           dtype != GMTK_FLOAT32 && t % 2 == 0, t % 3, 0});
    }
    // Global groups need one gradient dtype: groups 0 and 2 get fp32
    // gradients, the per-tensor group 1 fp16 ones.
    c.steps = 2;
    run_case(c, SelectionTuning{});
    run_case(c, tiny_step_tuning());
  }
}

TEST_CASE("16-bit stores round like the CPU reference: ties, subnormals, overflow, NaN payloads",
          "[cuda_step_on_host]") {
  std::mt19937_64 rng(5);
  int64_t checked = 0;
  auto check = [&](uint32_t bits) {
    const float value = gmtk::reference::float_from_bits(bits);
    const uint32_t half = gmtk::kernels::float_to_float16_bits(value);
    const uint32_t bf16 = gmtk::kernels::float_to_bfloat16_bits(value);
    if (half != gmtk::reference::from_float<gmtk::reference::Half>(value).bits ||
        bf16 != gmtk::reference::from_float<gmtk::reference::BFloat16>(value).bits) {
      FAIL_CHECK("float bits 0x" << std::hex << bits << ": fp16 0x" << half << " vs 0x"
                                 << gmtk::reference::from_float<gmtk::reference::Half>(value).bits << ", bf16 0x"
                                 << bf16 << " vs 0x"
                                 << gmtk::reference::from_float<gmtk::reference::BFloat16>(value).bits);
    }
    ++checked;
  };
  // Every exponent with mantissas at and around each rounding boundary.
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint32_t exponent = 0; exponent < 256; ++exponent) {
      for (uint32_t low : {0u, 1u, 0xFFFu, 0x1000u, 0x1001u, 0x1FFFu, 0x2000u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu,
                           0x10000u, 0x18000u}) {
        for (uint32_t high : {0u, 0x10000u, 0x20000u, 0x400000u, 0x7E0000u}) {
          check(sign | (exponent << 23) | ((high | low) & 0x7FFFFFu));
        }
      }
    }
  }
  for (int i = 0; i < 2000000; ++i) check(static_cast<uint32_t>(rng()));
  CHECK(checked > 2000000);
}

TEST_CASE("global sets of several tensors defer across their members when no per-tensor kept count is asked",
          "[cuda_step_on_host]") {
  EngineTrace total;
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    for (double ratio : {0.5, 0.9, 0.99}) {
      StepCase c;
      c.name = std::string("global deferral, ") + (mode == GMTK_MASK_FREEZE ? "freeze " : "mask-grad ") +
               std::to_string(ratio);
      c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, ratio, mode, GMTK_SCOPE_GLOBAL),
                  make_group(GMTK_OPTIMIZER_SGD, ratio, mode, GMTK_SCOPE_GLOBAL)};
      c.groups[1].momentum = 0.9;
      c.tensors = {{9000, GMTK_FLOAT32, GMTK_FLOAT32, false, 0, 1},
                   {7001, GMTK_FLOAT32, GMTK_BFLOAT16, true, 0, 0},
                   {5003, GMTK_FLOAT32, GMTK_FLOAT16, false, 0, 3},
                   {6000, GMTK_FLOAT32, GMTK_FLOAT32, false, 1, 0},
                   {4000, GMTK_FLOAT32, GMTK_FLOAT32, false, 1, 2}};
      c.want_kept_counts = false;
      c.steps = 2;
      add(total, run_case(c, tiny_step_tuning()));
    }
  }
  CHECK(total.sets_deferring > 0);
  CHECK(total.entries_deferred > 0);
}

TEST_CASE("a step's launches do not grow with the tensor count", "[cuda_step_on_host]") {
  int launches_3 = 0, launches_300 = 0;
  for (int tensors : {3, 300}) {
    StepCase c;
    c.name = std::to_string(tensors) + " small tensors";
    c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_MASK_GRAD)};
    for (int t = 0; t < tensors; ++t) c.tensors.push_back({64, GMTK_FLOAT32, GMTK_FLOAT32, false, 0, 0});
    c.steps = 1;
    const EngineTrace trace = run_case(c, SelectionTuning{});
    (tensors == 3 ? launches_3 : launches_300) = trace.launches;
  }
  CHECK(launches_3 == launches_300);
  CHECK(launches_3 == 5);  // memset, pass A (found_inf), small sets, update, outputs
}

}  // namespace
}  // namespace gmtk_test

namespace gmtk_test {
namespace {

TEST_CASE("the zero shortcuts of the division and the root give the IEEE results bit for bit",
          "[cuda_step_on_host]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float values[] = {0.0f, -0.0f, 1e-45f, -1e-45f, 1e-38f, 1.0f, -2.5f, 3e38f, inf, -inf,
                          std::numeric_limits<float>::quiet_NaN()};
  for (float a : values) {
    for (float b : values) {
      INFO(a << " / " << b);
      const float want = a / b;
      const float got = gmtk::kernels::div_rn_zero_fast(a, b);
      CHECK((bits_of(got) == bits_of(want) || (std::isnan(got) && std::isnan(want))));
    }
    INFO("sqrt " << a);
    const float want = std::sqrt(a);
    const float got = gmtk::kernels::sqrt_rn_zero_fast(a);
    CHECK((bits_of(got) == bits_of(want) || (std::isnan(got) && std::isnan(want))));
  }
}

}  // namespace
}  // namespace gmtk_test

// ---- Mask schedules (SPEC section 8) ----------------------------------------------------

namespace gmtk_test {
namespace {

const char* call_name(EngineCall call) {
  return call == EngineCall::step ? "step" : call == EngineCall::mask_gradients ? "mask" : "select";
}

// Tensors that put per-tensor sets on both paths (large under tiny tuning)
// and a global set of three, at misalignments that make items straddle
// bitmap words.
std::vector<StepTensorSpec> schedule_tensors(gmtkDtype_t grad, gmtkDtype_t param, bool master) {
  return {{1000 + 3, grad, param, master, 0, 1},
          {77, grad, param, master, 1, 3},
          {300, grad, param, master, 0, 0},
          {2000, grad, param, master, 1, 2}};
}

TEST_CASE("given thresholds: the last call's thresholds keep exactly its entries; random ones round up",
          "[cuda_step_on_host][mask_schedule]") {
  EngineTrace total;
  for (MaskInput input : {MaskInput::thresholds_of_last_call, MaskInput::random_thresholds}) {
    for (EngineCall call : {EngineCall::step, EngineCall::mask_gradients, EngineCall::select_thresholds}) {
      for (gmtkDtype_t dtype : kDtypes) {
        for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
          StepCase c;
          c.name = std::string(input == MaskInput::random_thresholds ? "random" : "last call's") +
                   " thresholds, " + call_name(call) + " " + dtype_name(dtype) +
                   (mode == GMTK_MASK_FREEZE ? " freeze" : " mask-grad");
          c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.9, mode),
                      make_group(GMTK_OPTIMIZER_SGD, 0.5, mode, GMTK_SCOPE_GLOBAL)};
          c.groups[1].momentum = 0.9;
          c.tensors = schedule_tensors(dtype, GMTK_FLOAT32, false);
          c.call = call;
          c.input = input;
          c.steps = 4;
          c.want_kept_counts = mode == GMTK_MASK_GRAD;  // the counts pass runs only when they are asked
          c.write_mask_bits = dtype == GMTK_BFLOAT16;
          c.seed = 3 + static_cast<uint64_t>(dtype);
          add(total, run_case(c, SelectionTuning{}));
          add(total, run_case(c, tiny_step_tuning()));
        }
      }
    }
  }
  CHECK(total.entries_updated > 0);
  CHECK(total.entries_frozen > 0);
  CHECK(total.entries_fed_zero > 0);
  CHECK(total.mask_bits_set > 0);
}

TEST_CASE("given bitmaps: random bits and the last call's bits, in both mask modes, at every misalignment",
          "[cuda_step_on_host][mask_schedule]") {
  EngineTrace total;
  for (MaskInput input : {MaskInput::random_bits, MaskInput::bits_of_last_call}) {
    for (EngineCall call : {EngineCall::step, EngineCall::mask_gradients, EngineCall::select_thresholds}) {
      for (gmtkDtype_t dtype : kDtypes) {
        for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
          for (size_t misalignment : {0u, 1u, 3u}) {
            StepCase c;
            c.name = std::string(input == MaskInput::random_bits ? "random" : "last call's") + " bits, " +
                     call_name(call) + " " + dtype_name(dtype) + (mode == GMTK_MASK_FREEZE ? " freeze" : " mask-grad") +
                     " +" + std::to_string(misalignment);
            c.groups = {make_group(GMTK_OPTIMIZER_ADAM, 0.99, mode),
                        make_group(GMTK_OPTIMIZER_ADAMW, 0.5, mode, GMTK_SCOPE_GLOBAL)};
            c.groups[0].amsgrad = 1;
            c.tensors = schedule_tensors(dtype, dtype, dtype != GMTK_FLOAT32);
            for (StepTensorSpec& t : c.tensors) t.misalignment = (t.misalignment + misalignment) % 4;
            c.tensors.push_back({45, dtype, dtype, false, 0, misalignment, 1});  // buffers that disagree: scalar items
            c.call = call;
            c.input = input;
            c.steps = 3;
            c.write_mask_bits = misalignment == 1;  // the given bitmap, written back out
            c.seed = 5 + misalignment;
            add(total, run_case(c, tiny_step_tuning()));
          }
        }
      }
    }
  }
  CHECK(total.items_by_bits > 0);
  CHECK(total.items_without_gradient > 0);  // freeze: items with clear bits read nothing else
  CHECK(total.vector_items > 0);
  CHECK(total.scalar_items > 0);
  CHECK(total.mask_bits_set > 0);
}

TEST_CASE("the bitmap out of a selecting call, in every call, with deferral off while it is written",
          "[cuda_step_on_host][mask_schedule]") {
  EngineTrace total;
  for (EngineCall call : {EngineCall::step, EngineCall::mask_gradients, EngineCall::select_thresholds}) {
    for (double ratio : {0.0, 0.5, 0.9, 0.99, 1.0}) {
      for (bool kept_counts : {false, true}) {
        StepCase c;
        c.name = std::string("bits out, ") + call_name(call) + " ratio " + std::to_string(ratio) +
                 (kept_counts ? " with counts" : "");
        c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, ratio, GMTK_MASK_FREEZE, GMTK_SCOPE_GLOBAL),
                    make_group(GMTK_OPTIMIZER_ADAMW, ratio, GMTK_MASK_GRAD)};
        c.tensors = {{9000, GMTK_FLOAT32, GMTK_FLOAT32, false, 0, 1},
                     {5003, GMTK_FLOAT32, GMTK_BFLOAT16, true, 0, 3},
                     {4001, GMTK_FLOAT32, GMTK_FLOAT32, false, 1, 2},
                     {333, GMTK_BFLOAT16, GMTK_BFLOAT16, false, 1, 1}};
        c.call = call;
        c.write_mask_bits = true;
        c.want_kept_counts = kept_counts;
        c.steps = 2;
        const EngineTrace trace = run_case(c, tiny_step_tuning());
        CHECK(trace.sets_deferring == 0);  // the bits are written before the update: thresholds exact by then
        add(total, trace);
        add(total, run_case(c, SelectionTuning{}));
      }
    }
  }
  CHECK(total.mask_bits_set > 0);
  CHECK(total.large_sets_selected > 0);
  CHECK(total.small_sets_selected > 0);
}

TEST_CASE("score-based selection: scores of any dtype, both scopes, every call, given thresholds on scores",
          "[cuda_step_on_host][mask_schedule]") {
  EngineTrace total;
  for (EngineCall call : {EngineCall::step, EngineCall::mask_gradients, EngineCall::select_thresholds}) {
    for (gmtkDtype_t grad : kDtypes) {
      for (gmtkDtype_t score : kDtypes) {
        for (MaskInput input : {MaskInput::selected, MaskInput::thresholds_of_last_call}) {
          StepCase c;
          c.name = std::string("scores ") + dtype_name(score) + " on " + dtype_name(grad) + " gradients, " +
                   call_name(call) + (input == MaskInput::selected ? "" : ", last call's thresholds");
          c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_MASK_FREEZE),
                      make_group(GMTK_OPTIMIZER_SGD, 0.5, GMTK_MASK_GRAD, GMTK_SCOPE_GLOBAL)};
          c.tensors = schedule_tensors(grad, GMTK_FLOAT32, false);
          for (StepTensorSpec& t : c.tensors) {
            t.score = true;
            t.score_dtype = score;
          }
          c.tensors[2].state_misalignment = 1;  // its score out of phase: scalar items
          c.call = call;
          c.input = input;
          c.write_mask_bits = grad == score;
          c.want_kept_counts = grad != GMTK_FLOAT16;
          c.non_finite_at_step = 2;  // an inf gradient under a finite score: found_inf all the same
          c.steps = 3;
          c.use_step_count = true;
          add(total, run_case(c, SelectionTuning{}));
          add(total, run_case(c, tiny_step_tuning()));
        }
      }
    }
  }
  CHECK(total.items_by_score > 0);
  CHECK(total.items_without_gradient > 0);
  CHECK(total.found_inf_rereads > 0);
  CHECK(total.large_sets_selected > 0);
  CHECK(total.small_sets_selected > 0);
  CHECK(total.sets_deferring == 0);  // a scored set never defers
}

TEST_CASE("a global group may mix scored and unscored tensors of one key dtype", "[cuda_step_on_host][mask_schedule]") {
  StepCase c;
  c.name = "mixed global group";
  c.groups = {make_group(GMTK_OPTIMIZER_ADAMW, 0.7, GMTK_MASK_GRAD, GMTK_SCOPE_GLOBAL)};
  c.tensors = {{3000, GMTK_FLOAT32, GMTK_FLOAT32, false, 0, 0},
               {2000, GMTK_BFLOAT16, GMTK_BFLOAT16, false, 0, 1, 0, true, GMTK_FLOAT32},
               {700, GMTK_FLOAT32, GMTK_FLOAT32, false, 0, 2}};
  c.steps = 2;
  c.write_mask_bits = true;
  run_case(c, SelectionTuning{});
  run_case(c, tiny_step_tuning());
}

}  // namespace
}  // namespace gmtk_test
