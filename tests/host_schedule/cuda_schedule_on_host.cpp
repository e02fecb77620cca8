// cuda_schedule_on_host: the CUDA selection engine's schedule, run on the host
// by HostSelectionEngine, against the CPU reference backend (through the
// public API), bit for bit: thresholds, kept counts, found_inf and every
// gradient bit after masking. Each case runs under the product's tuning and
// under a tiny one that makes every set large, cut into many chunks, with
// candidate regions small enough to overflow.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gradient_contents.hpp"
#include "host_selection_engine.hpp"

namespace gmtk_test {
namespace {

// ---- A case: tensors laid out in one byte buffer ---------------------------------

struct TensorSpec {
  int64_t numel;
  gmtkDtype_t dtype;
  int32_t group;
  size_t misalignment;  // bytes past a 256-byte boundary (a multiple of the element size)
};

struct Case {
  std::string name;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<TensorSpec> tensors;
  Contents contents = Contents::gaussian;
  uint64_t seed = 1;
  bool with_scale = false;
  float inv_loss_scale = 1.0f;
};

gmtkGroupConfig_t group_of(double ratio, gmtkScope_t scope) {
  gmtkGroupConfig_t group;
  gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW);
  group.mask_ratio = ratio;
  group.scope = scope;
  return group;
}

// Gradient bytes of every tensor, each at its own misalignment.
struct Gradients {
  std::vector<unsigned char> bytes;
  std::vector<size_t> offsets;

  void* at(size_t t) { return bytes.data() + offsets[t]; }
};

Gradients make_gradients(const Case& c) {
  Gradients g;
  size_t size = 0;
  for (const TensorSpec& t : c.tensors) {
    size = (size + 255) / 256 * 256 + t.misalignment;
    g.offsets.push_back(size);
    size += static_cast<size_t>(t.numel) * element_bytes(t.dtype);
  }
  g.bytes.assign(size + 512, 0);
  // Offsets are from an aligned base inside the buffer.
  const size_t shift = (256 - reinterpret_cast<uintptr_t>(g.bytes.data()) % 256) % 256;
  std::mt19937_64 rng(c.seed);
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    g.offsets[t] += shift;
    const TensorSpec& spec = c.tensors[t];
    for (int64_t i = 0; i < spec.numel; ++i) {
      const uint32_t raw = entry_bits(c.contents, spec.dtype, static_cast<uint64_t>(i), static_cast<uint64_t>(spec.numel), rng);
      const size_t element = element_bytes(spec.dtype);
      std::memcpy(g.bytes.data() + g.offsets[t] + static_cast<size_t>(i) * element, &raw, element);
    }
  }
  return g;
}

std::vector<gmtkTensor_t> tensor_records(const Case& c, Gradients& g) {
  std::vector<gmtkTensor_t> records(c.tensors.size());
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    records[t] = gmtkTensor_t{};
    records[t].group = c.tensors[t].group;
    records[t].numel = c.tensors[t].numel;
    records[t].grad_dtype = c.tensors[t].dtype;
    records[t].param_dtype = c.tensors[t].dtype;
    records[t].grad = c.tensors[t].numel == 0 ? nullptr : g.at(t);
  }
  return records;
}

// One call's outputs, from either side.
struct Outputs {
  std::vector<float> thresholds;
  std::vector<int64_t> kept;
  float found_inf = -1.0f;
  std::vector<unsigned char> gradient_bytes;  // after the call

  explicit Outputs(size_t tensors) : thresholds(tensors, -7.0f), kept(tensors, -7) {}
};

gmtkStepArgs_t args_for(Outputs& out, const Case& c) {
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.thresholds = out.thresholds.empty() ? nullptr : out.thresholds.data();
  args.kept_counts = out.kept.empty() ? nullptr : out.kept.data();
  args.found_inf = &out.found_inf;
  args.inv_loss_scale = c.with_scale ? &c.inv_loss_scale : nullptr;
  return args;
}

// The oracle: the CPU reference backend on its own copy of the gradients.
class Reference {
 public:
  Reference(const Case& c, Gradients gradients) : case_(c), gradients_(std::move(gradients)) {
    gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
    hc.backend = GMTK_BACKEND_CPU_REFERENCE;
    REQUIRE(gmtkHandleCreate(&handle_, &hc) == GMTK_SUCCESS);
    const std::vector<gmtkTensor_t> records = tensor_records(c, gradients_);
    gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
    pc.groups = c.groups.data();
    pc.num_groups = static_cast<int32_t>(c.groups.size());
    pc.tensors = records.data();
    pc.num_tensors = static_cast<int64_t>(records.size());
    pc.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
    const gmtkStatus_t status = gmtkPlanCreate(handle_, &pc, &plan_);
    INFO(gmtkGetLastErrorMessage());
    REQUIRE(status == GMTK_SUCCESS);
  }
  ~Reference() {
    gmtkPlanDestroy(plan_);
    gmtkHandleDestroy(handle_);
  }

  Outputs run(bool mask) {
    Outputs out(case_.tensors.size());
    gmtkStepArgs_t args = args_for(out, case_);
    const gmtkStatus_t status = mask ? gmtkMaskGradients(plan_, &args, nullptr, 0, nullptr)
                                     : gmtkSelectThresholds(plan_, &args, nullptr, 0, nullptr);
    INFO(gmtkGetLastErrorMessage());
    REQUIRE(status == GMTK_SUCCESS);
    out.gradient_bytes = gradients_.bytes;
    return out;
  }

  void set_ratio(int group, double ratio) {
    gmtkGroupConfig_t config = case_.groups[group];
    config.mask_ratio = ratio;
    REQUIRE(gmtkPlanSetGroupHyperparams(plan_, group, &config) == GMTK_SUCCESS);
  }
  Gradients& gradients() { return gradients_; }

 private:
  const Case& case_;
  Gradients gradients_;
  gmtkHandle_t handle_ = nullptr;
  gmtkPlan_t plan_ = nullptr;
};

// The engine under test on its own copy of the gradients.
class Engine {
 public:
  Engine(const Case& c, Gradients gradients, const SelectionTuning& tuning, uint32_t blocks)
      : case_(c), gradients_(std::move(gradients)),
        engine_(c.groups, tensor_records(c, gradients_), tuning, blocks) {}

  Outputs run(bool mask, EngineTrace* trace) {
    Outputs out(case_.tensors.size());
    const gmtkStepArgs_t args = args_for(out, case_);
    *trace = engine_.run(args, mask);
    out.gradient_bytes = gradients_.bytes;
    return out;
  }
  void set_ratio(int group, double ratio) { engine_.set_mask_ratio(group, ratio); }
  Gradients& gradients() { return gradients_; }
  const SelectionTables& tables() const { return engine_.tables(); }

 private:
  const Case& case_;
  Gradients gradients_;
  HostSelectionEngine engine_;
};

// "" when equal; else where they first differ.
std::string first_difference(const Outputs& want, const Outputs& got) {
  std::ostringstream out;
  for (size_t t = 0; t < want.thresholds.size(); ++t) {
    if (bits_of(want.thresholds[t]) != bits_of(got.thresholds[t])) {
      out << "thresholds[" << t << "]: reference " << want.thresholds[t] << " (0x" << std::hex
          << bits_of(want.thresholds[t]) << "), engine " << got.thresholds[t] << " (0x" << bits_of(got.thresholds[t])
          << ")";
      return out.str();
    }
    if (want.kept[t] != got.kept[t]) {
      out << "kept_counts[" << t << "]: reference " << want.kept[t] << ", engine " << got.kept[t];
      return out.str();
    }
  }
  if (bits_of(want.found_inf) != bits_of(got.found_inf)) {
    out << "found_inf: reference " << want.found_inf << ", engine " << got.found_inf;
    return out.str();
  }
  for (size_t i = 0; i < want.gradient_bytes.size(); ++i) {
    if (want.gradient_bytes[i] != got.gradient_bytes[i]) {
      out << "gradient byte " << i << ": reference " << int(want.gradient_bytes[i]) << ", engine "
          << int(got.gradient_bytes[i]);
      return out.str();
    }
  }
  return "";
}

SelectionTuning tiny_tuning() {
  SelectionTuning tuning;
  tuning.chunk_entries = 64;
  tuning.small_set_limit_fp32 = 200;
  tuning.small_set_limit_16bit = 200;
  tuning.candidate_share = 32;
  tuning.min_candidates = 8;
  tuning.sample_entries = 8;  // an eighth of each chunk: windows that the sample can mislead
  return tuning;
}

// Everything a sweep went through, to show each branch was taken.
struct Coverage {
  int cases = 0;
  EngineTrace total;
  void add(const EngineTrace& t) {
    total.large_sets_selected += t.large_sets_selected;
    total.small_sets_selected += t.small_sets_selected;
    total.sets_gathering += t.sets_gathering;
    total.sets_overflowing += t.sets_overflowing;
    total.histogram_flushes += t.histogram_flushes;
    total.windows_used += t.windows_used;
    total.window_misses += t.window_misses;
    total.windows_too_wide += t.windows_too_wide;
  }
};

// Runs select then mask on both sides, under both tunings and two grid sizes,
// and requires bitwise equality.
void check_case(const Case& c, Coverage* coverage = nullptr) {
  const Gradients gradients = make_gradients(c);
  struct Variant {
    const char* name;
    SelectionTuning tuning;
    uint32_t blocks;
  };
  const Variant variants[] = {{"product tuning", SelectionTuning{}, 4}, {"tiny tuning", tiny_tuning(), 3},
                              {"tiny tuning, one block", tiny_tuning(), 1}};
  for (const Variant& variant : variants) {
    for (const bool mask : {false, true}) {
      INFO("case " << c.name << ", contents " << name_of(c.contents) << ", " << variant.name << ", "
                   << (mask ? "gmtkMaskGradients" : "gmtkSelectThresholds"));
      Reference reference(c, gradients);
      Engine engine(c, gradients, variant.tuning, variant.blocks);
      EngineTrace trace;
      const Outputs want = reference.run(mask);
      const Outputs got = engine.run(mask, &trace);
      REQUIRE(first_difference(want, got) == "");
      REQUIRE(trace.launches <= 14);  // SelectionSchedule::launches(): 15 with a step's update
      if (coverage != nullptr) {
        ++coverage->cases;
        coverage->add(trace);
      }
    }
  }
}

Case single(const std::string& name, int64_t n, gmtkDtype_t dtype, double ratio, Contents contents,
            size_t misalignment = 0) {
  Case c;
  c.name = name + " n=" + std::to_string(n) + " ratio=" + std::to_string(ratio);
  c.groups = {group_of(ratio, GMTK_SCOPE_PER_TENSOR)};
  c.tensors = {{n, dtype, 0, misalignment}};
  c.contents = contents;
  c.seed = static_cast<uint64_t>(n) * 31 + static_cast<uint64_t>(ratio * 1000);
  return c;
}

const gmtkDtype_t kDtypes[] = {GMTK_FLOAT32, GMTK_FLOAT16, GMTK_BFLOAT16};

}  // namespace

TEST_CASE("every kind of gradient contents, every dtype, the issue's ratios", "[cuda_schedule_on_host]") {
  Coverage coverage;
  for (const gmtkDtype_t dtype : kDtypes) {
    for (const Contents contents : kAllContents) {
      for (const int64_t n : {int64_t{1}, int64_t{2}, int64_t{255}, int64_t{4097}}) {
        const double dn = static_cast<double>(n);
        for (const double ratio : {0.0, 1.0 / dn, 0.5, 0.9, 0.99, 1.0 - 1.0 / dn, 1.0}) {
          Case c = single("dtype " + std::to_string(dtype), n, dtype, ratio, contents, element_bytes(dtype));
          check_case(c, &coverage);
        }
      }
    }
  }
  // Every branch of the schedule was taken somewhere in the sweep.
  CHECK(coverage.total.large_sets_selected > 0);
  CHECK(coverage.total.small_sets_selected > 0);
  CHECK(coverage.total.sets_gathering > 0);
  CHECK(coverage.total.sets_overflowing > 0);
  CHECK(coverage.total.windows_used > 0);
  CHECK(coverage.total.window_misses > 0);
  CHECK(coverage.total.windows_too_wide > 0);
}

TEST_CASE("sizes 0, 1, 2^k - 1, 2^k + 1 at every misalignment", "[cuda_schedule_on_host]") {
  for (const gmtkDtype_t dtype : kDtypes) {
    const size_t element = element_bytes(dtype);
    for (int k = 0; k <= 12; ++k) {
      for (const int64_t n : {(int64_t{1} << k) - 1, (int64_t{1} << k) + 1}) {
        for (size_t misalignment = 0; misalignment < 16; misalignment += element) {
          check_case(single("sizes", n, dtype, 0.7, Contents::gaussian, misalignment));
        }
      }
    }
  }
}

TEST_CASE("large sets under the product's tuning: several chunks, candidates and their overflow",
          "[cuda_schedule_on_host]") {
  // fp32 sets of 2^18 entries and more, 16-bit sets of 2^21 and more, take
  // the sample pass, pass A over their window and the level passes.
  for (const Contents contents : {Contents::heavy_tail, Contents::quantized, Contents::shared_top_bits,
                                  Contents::sample_skewed}) {
    check_case(single("large fp32", (int64_t{1} << 18) + 3, GMTK_FLOAT32, 0.9, contents, 8));
  }
  check_case(single("large bf16", (int64_t{1} << 21) + 1, GMTK_BFLOAT16, 0.99, Contents::gaussian, 6));
}

TEST_CASE("global scope over many tensors, and several groups in one plan", "[cuda_schedule_on_host]") {
  for (const gmtkDtype_t dtype : kDtypes) {
    for (const Contents contents : {Contents::gaussian, Contents::two_values, Contents::non_finite,
                                    Contents::all_zero}) {
      Case c;
      c.name = "three groups";
      c.contents = contents;
      c.groups = {group_of(0.9, GMTK_SCOPE_GLOBAL), group_of(0.5, GMTK_SCOPE_PER_TENSOR),
                  group_of(0.0, GMTK_SCOPE_GLOBAL), group_of(0.3, GMTK_SCOPE_GLOBAL)};  // group 3: no tensors
      const int64_t sizes[] = {0, 1, 300, 77, 1025, 4, 2049, 0, 513};
      for (size_t t = 0; t < std::size(sizes); ++t) {
        c.tensors.push_back({sizes[t], dtype, static_cast<int32_t>(t % 3),
                             (t * 2) % 16 / element_bytes(dtype) * element_bytes(dtype)});
      }
      check_case(c);
    }
  }
}

TEST_CASE("1 to 20,000 tensors, both scopes", "[cuda_schedule_on_host]") {
  for (const int count : {1, 3, 300, 20000}) {
    for (const gmtkScope_t scope : {GMTK_SCOPE_PER_TENSOR, GMTK_SCOPE_GLOBAL}) {
      Case c;
      c.name = std::to_string(count) + " tensors";
      c.groups = {group_of(0.9, scope)};
      std::mt19937_64 sizes(count);
      for (int t = 0; t < count; ++t) c.tensors.push_back({static_cast<int64_t>(sizes() % 40), GMTK_BFLOAT16, 0, static_cast<size_t>(2 * (t % 8))});
      c.contents = Contents::heavy_tail;
      check_case(c);
    }
  }
}

TEST_CASE("found_inf after unscaling: a finite gradient that the scale overflows counts",
          "[cuda_schedule_on_host]") {
  for (const gmtkDtype_t dtype : kDtypes) {
    Case c = single("scaled", 1000, dtype, 0.5, Contents::two_values);
    c.with_scale = true;
    c.inv_loss_scale = 3e38f;  // 2.0 * 3e38 overflows fp32; 0.5 * 3e38 does not
    check_case(c);
    c.inv_loss_scale = 0.5f;
    check_case(c);
  }
}

TEST_CASE("consecutive calls on one plan: T jumps by orders of magnitude, the ratio changes",
          "[cuda_schedule_on_host]") {
  for (const gmtkDtype_t dtype : {GMTK_FLOAT32, GMTK_BFLOAT16}) {
    for (const SelectionTuning& tuning : {SelectionTuning{}, tiny_tuning()}) {
      Case c = single("jumps", 5000, dtype, 0.9, Contents::gaussian);
      const Gradients gradients = make_gradients(c);
      Reference reference(c, gradients);
      Engine engine(c, gradients, tuning, 2);
      const float scales[] = {1.0f, 1e6f, 1e-6f, 1e-30f, 1.0f};
      const double ratios[] = {0.9, 0.9, 0.5, 0.99, 0.0};
      for (size_t call = 0; call < std::size(scales); ++call) {
        INFO("call " << call << ", scale " << scales[call] << ", ratio " << ratios[call]);
        // Scale every gradient on both sides the same way.
        const size_t element = element_bytes(dtype);
        for (Gradients* g : {&reference.gradients(), &engine.gradients()}) {
          for (int64_t i = 0; i < 5000; ++i) {
            uint32_t original = 0;
            std::memcpy(&original, gradients.bytes.data() + gradients.offsets[0] + i * element, element);
            const uint32_t scaled = stored_bits(stored_value(original, dtype) * scales[call], dtype);
            std::memcpy(static_cast<unsigned char*>(g->at(0)) + i * element, &scaled, element);
          }
        }
        reference.set_ratio(0, ratios[call]);
        engine.set_ratio(0, ratios[call]);
        EngineTrace trace;
        const Outputs want = reference.run(false);
        const Outputs got = engine.run(false, &trace);
        REQUIRE(first_difference(want, got) == "");
      }
    }
  }
}

TEST_CASE("the launch count does not grow with the tensor count", "[cuda_schedule_on_host]") {
  // Documented in docs/design.md: the same launches for 1, 300 and 20,000 tensors.
  for (const int count : {1, 300, 20000}) {
    Case c;
    c.groups = {group_of(0.9, GMTK_SCOPE_PER_TENSOR)};
    for (int t = 0; t < count; ++t) c.tensors.push_back({64, GMTK_FLOAT32, 0, 0});
    const Gradients gradients = make_gradients(c);
    Engine engine(c, gradients, SelectionTuning{}, 4);
    EngineTrace trace;
    engine.run(false, &trace);
    CHECK(trace.launches == 4);  // memset, pass A (found_inf), small sets, outputs
    engine.run(true, &trace);
    CHECK(trace.launches == 5);  // + the mask
  }
}

}  // namespace gmtk_test
