// gmtkStep on the CUDA backend against the CPU reference backend, the oracle
// (docs/semantics.md, "CPU reference versus CUDA"). Both backends run the same
// plan from the same starting bytes; then
//  - thresholds, kept_counts, found_inf and step_count are bitwise equal;
//  - every updated fp32 value (param, master_param, exp_avg, exp_avg_sq,
//    max_exp_avg_sq) is within 4 ulp of the reference's (NaN equals NaN);
//  - a 16-bit param with a master is exactly the nearest-even rounding of its
//    own side's master; without a master it equals the reference's, or is the
//    rounding of an fp32 value within 4 ulp of the reference's fp32 result (a
//    rounding boundary lies between them: one 16-bit ulp at most);
//  - freeze mode: masked entries keep every bit of param, master and state;
//  - found_inf set: nothing but the outputs changes, step_count included;
//  - gradients, inv_loss_scale, lr_device and every byte around the buffers
//    stay as they were.
// Which entries were masked is pinned by the thresholds (bitwise equal) and by
// the values: a kept entry updated as masked, or the reverse, is far more than
// 4 ulp off, and in freeze mode it changes bits that must not change.
//
// Multi-step sequences copy the reference's state into both backends before
// every step, so that the ulp bound does not compound; gradients, scales and
// hyper-parameters change between steps.
//
// Written from SPEC.md, docs/semantics.md, docs/api.md and gmtk.h alone: it
// shares no code with host/ or kernels/. The fp32 result behind a 16-bit
// parameter without a master is obtained from the reference itself, by
// re-running the step with a master equal to the widened parameter (the same
// fp32 arithmetic, docs/semantics.md, "Mixed precision").
//
// Tags: [step] on every test; [small] on the quick subset run under
// compute-sanitizer.
#include "gpu_test_support.h"

#include <gmtk/gmtk.h>

#include <catch2/catch.hpp>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iomanip>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace step_tests {
// The backend held against the CPU reference: CUDA, except in the host
// self-check of this harness (step_harness_on_host.cpp), which sets this to run
// every test with the CPU reference on both sides, where nothing may differ.
bool g_cpu_reference_under_test = false;
}  // namespace step_tests

namespace {

using namespace gpu_test;  // NOLINT: the shared helpers (gpu_test_support.h)

bool cuda_under_test() { return !step_tests::g_cpu_reference_under_test; }
gmtkBackend_t backend_under_test() { return cuda_under_test() ? GMTK_BACKEND_CUDA : GMTK_BACKEND_CPU_REFERENCE; }
const char* under_test_name() { return cuda_under_test() ? "CUDA" : "CPU(self-check)"; }

constexpr uint64_t kUlpBound = 4;  // fp32 values after one step (docs/semantics.md)

// All padding holds this byte: all-ones is NaN in every dtype, so a kernel
// that reads past a gradient sets found_inf, and one that writes past any
// buffer is caught by the padding check.
constexpr unsigned char kPadByte = 0xFF;
// Outputs hold all-ones before a step (a NaN threshold and found_inf, a kept
// count of -1), so an output left unwritten is seen.
constexpr unsigned char kUnwrittenByte = 0xFF;
constexpr size_t kGuardBytes = 16;  // at least this much padding after each buffer

// ---- Floats, ulps and 16-bit rounding ------------------------------------------------

float from_ordered(int64_t position) {
  return position < 0 ? float_from_bits(0x80000000u | static_cast<uint32_t>(-position))
                      : float_from_bits(static_cast<uint32_t>(position));
}

bool is_nan_16(uint16_t bits, const Format16& format) { return (bits & 0x7FFFu) > format.infinity; }

// A 16-bit result `got` is acceptable for the reference's fp32 result `exact`
// when it is the nearest-even rounding of some float within kUlpBound ulp of
// `exact`: the two sides' fp32 values may differ that much, and only a
// rounding boundary between them makes their 16-bit roundings differ.
bool rounds_from_nearby(float exact, uint16_t got, const Format16& format) {
  if (std::isnan(exact)) return is_nan_16(got, format);
  const int64_t bound = static_cast<int64_t>(kUlpBound);
  for (int64_t k = -bound; k <= bound; ++k) {
    const float nearby = from_ordered(ordered(exact) + k);
    if (!std::isnan(nearby) && narrow_to_16(nearby, format) == got) return true;
  }
  return false;
}


// ---- Buffers of a case ------------------------------------------------------------------

enum class Role {
  grad,
  param,
  master_param,
  exp_avg,
  exp_avg_sq,
  max_exp_avg_sq,  // the six buffers of a tensor, in this order
  thresholds,
  kept_counts,
  found_inf,
  step_count,
  inv_loss_scale,
  lr_device
};
constexpr int kTensorRoles = 6;
constexpr Role kValueRoles[] = {Role::param, Role::master_param, Role::exp_avg, Role::exp_avg_sq, Role::max_exp_avg_sq};

const char* role_name(Role role) {
  switch (role) {
    case Role::grad: return "grad";
    case Role::param: return "param";
    case Role::master_param: return "master_param";
    case Role::exp_avg: return "exp_avg";
    case Role::exp_avg_sq: return "exp_avg_sq";
    case Role::max_exp_avg_sq: return "max_exp_avg_sq";
    case Role::thresholds: return "thresholds";
    case Role::kept_counts: return "kept_counts";
    case Role::found_inf: return "found_inf";
    case Role::step_count: return "step_count";
    case Role::inv_loss_scale: return "inv_loss_scale";
    case Role::lr_device: return "lr_device";
  }
  return "?";
}
bool is_output(Role role) { return role == Role::thresholds || role == Role::kept_counts || role == Role::found_inf; }

// One buffer inside a case's arena of bytes (host and device alike).
struct Region {
  Role role;
  int64_t owner;  // the tensor (tensor buffers), the group (lr_device), or -1
  size_t offset;  // from the arena's start, which is 256-byte aligned
  size_t count;   // entries
  size_t width;   // bytes per entry
  gmtkDtype_t dtype;
  size_t bytes() const { return count * width; }
};

struct TensorSpec {
  int32_t group = 0;
  int64_t numel = 0;
  gmtkDtype_t grad_dtype = GMTK_FLOAT32;
  gmtkDtype_t param_dtype = GMTK_FLOAT32;
  bool master = false;  // fp32 master weights (16-bit params only)
  Content content = Content::gaussian;
  float scale = 1e-2f;        // gradient magnitude as stored
  size_t misalign = 0;        // bytes past a 256-byte boundary (rounded up to each buffer's element size)
  bool null_if_empty = true;  // numel 0: NULL pointers (else valid, distinct addresses)
};

TensorSpec tensor(int32_t group, int64_t numel, gmtkDtype_t grad_dtype, gmtkDtype_t param_dtype, bool master = false,
                  size_t misalign = 0, Content content = Content::gaussian) {
  TensorSpec spec;
  spec.group = group;
  spec.numel = numel;
  spec.grad_dtype = grad_dtype;
  spec.param_dtype = param_dtype;
  spec.master = master && param_dtype != GMTK_FLOAT32;
  spec.misalign = misalign;
  spec.content = content;
  return spec;
}

struct Case {
  std::string name;
  uint64_t seed = 1;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<TensorSpec> tensors;
  bool plan_owned_workspace = false;  // GMTK_PLAN_ALLOCATE_WORKSPACE on both backends
  size_t workspace_misalign = 0;      // the caller's workspace "may be at any address" (docs/api.md)
  bool garbage_workspace = true;      // fill the caller's workspace with random bytes before every call
  bool device_counter = false;        // args.step_count in the arena, else args.step
  int64_t first_step = 1;             // t of the first step (the counter starts at first_step - 1)
  bool use_inv_scale = false;
  float inv_scale = 1.0f;
  bool lr_on_device = false;       // every group reads lr from its own float in the arena
  bool zero_state = false;         // optimizer state starts zeroed (torch's zeros_like), else random
  bool outputs_under_test = true;  // false: CUDA gets no thresholds, kept_counts or found_inf (the CPU does)
  bool reset_outputs = true;       // outputs hold kUnwrittenByte before each step, else the last step's
  // Set by lay_out().
  std::vector<Region> regions;
  std::vector<std::array<int, kTensorRoles>> tensor_regions;  // index into regions, -1: none
  std::vector<int> lr_regions;
  int step_count_region = -1, inv_region = -1, found_inf_region = -1, thresholds_region = -1, kept_region = -1;
  size_t arena_bytes = 0;
};

bool needs_role(const gmtkGroupConfig_t& group, const TensorSpec& spec, Role role) {
  const bool adam = group.optimizer != GMTK_OPTIMIZER_SGD;
  switch (role) {
    case Role::grad:
    case Role::param: return true;
    case Role::master_param: return spec.master;
    case Role::exp_avg: return adam || group.momentum != 0.0;
    case Role::exp_avg_sq: return adam;
    case Role::max_exp_avg_sq: return adam && group.amsgrad != 0;
    default: return false;
  }
}

void lay_out(Case& c) {
  c.regions.clear();
  c.tensor_regions.clear();
  c.lr_regions.clear();
  size_t cursor = 0;
  auto place = [&](Role role, int64_t owner, size_t count, size_t width, gmtkDtype_t dtype, size_t misalign) {
    const size_t start = round_up(cursor, 256) + round_up(misalign, width);
    c.regions.push_back(Region{role, owner, start, count, width, dtype});
    cursor = start + count * width + kGuardBytes;
    return static_cast<int>(c.regions.size() - 1);
  };
  const size_t n = c.tensors.size();
  c.step_count_region = place(Role::step_count, -1, 1, 8, GMTK_FLOAT32, 0);
  c.inv_region = place(Role::inv_loss_scale, -1, 1, 4, GMTK_FLOAT32, 4);
  c.found_inf_region = place(Role::found_inf, -1, 1, 4, GMTK_FLOAT32, 8);
  c.thresholds_region = place(Role::thresholds, -1, n, 4, GMTK_FLOAT32, 4);
  c.kept_region = place(Role::kept_counts, -1, n, 8, GMTK_FLOAT32, 8);
  for (size_t g = 0; g < c.groups.size(); ++g) {
    c.lr_regions.push_back(place(Role::lr_device, static_cast<int64_t>(g), 1, 4, GMTK_FLOAT32, 12));
  }
  for (size_t t = 0; t < n; ++t) {
    const TensorSpec& spec = c.tensors[t];
    REQUIRE(spec.group >= 0);
    REQUIRE(static_cast<size_t>(spec.group) < c.groups.size());
    const gmtkGroupConfig_t& group = c.groups[static_cast<size_t>(spec.group)];
    std::array<int, kTensorRoles> indexes;
    indexes.fill(-1);
    const auto count = static_cast<size_t>(spec.numel);
    for (int r = 0; r < kTensorRoles; ++r) {
      const auto role = static_cast<Role>(r);
      if (!needs_role(group, spec, role)) continue;
      const gmtkDtype_t dtype = role == Role::grad    ? spec.grad_dtype
                                : role == Role::param ? spec.param_dtype
                                                      : GMTK_FLOAT32;
      indexes[static_cast<size_t>(r)] =
          place(role, static_cast<int64_t>(t), count, element_size(dtype), dtype, spec.misalign);
    }
    c.tensor_regions.push_back(indexes);
  }
  c.arena_bytes = round_up(cursor, 256) + 256;
}

const Region* tensor_region(const Case& c, size_t t, Role role) {
  const int index = c.tensor_regions[t][static_cast<size_t>(role)];
  return index < 0 ? nullptr : &c.regions[static_cast<size_t>(index)];
}
// The region of a role and owner, or nullptr.
const Region* find_region(const Case& c, Role role, int64_t owner) {
  switch (role) {
    case Role::step_count: return &c.regions[static_cast<size_t>(c.step_count_region)];
    case Role::inv_loss_scale: return &c.regions[static_cast<size_t>(c.inv_region)];
    case Role::found_inf: return &c.regions[static_cast<size_t>(c.found_inf_region)];
    case Role::thresholds: return &c.regions[static_cast<size_t>(c.thresholds_region)];
    case Role::kept_counts: return &c.regions[static_cast<size_t>(c.kept_region)];
    case Role::lr_device: return &c.regions[static_cast<size_t>(c.lr_regions[static_cast<size_t>(owner)])];
    default: return tensor_region(c, static_cast<size_t>(owner), role);
  }
}

// ---- Reading and writing entries in an arena --------------------------------------------

// bits_at, put_value, int64_at, ...: gpu_test_support.h.

// Gradients of every tensor from its spec's content and scale.
void write_gradients(const Case& c, unsigned char* arena, uint64_t seed) {
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    const TensorSpec& spec = c.tensors[t];
    const Region& r = *tensor_region(c, t, Role::grad);
    fill_gradient(arena + r.offset, spec.grad_dtype, spec.numel, spec.content, spec.scale, seed * 1000003u + t);
  }
}

// Puts one raw gradient value (e.g. an inf) into tensor t at entry i.
void plant_gradient_bits(const Case& c, unsigned char* arena, size_t t, size_t i, uint32_t fp32_bits) {
  const Region& r = *tensor_region(c, t, Role::grad);
  REQUIRE(i < r.count);
  put_value(arena, r, i, float_from_bits(fp32_bits));
}

// The starting bytes of a case: parameters ~ N(0, 0.5), moments of a
// gradient's size (or zeros), max_exp_avg_sq >= exp_avg_sq, the counter at
// first_step - 1, outputs unwritten, padding everywhere else.
std::vector<unsigned char> initial_bytes(const Case& c) {
  std::vector<unsigned char> arena(c.arena_bytes, kPadByte);
  unsigned char* a = arena.data();
  put_int64(a, *find_region(c, Role::step_count, -1), 0, c.first_step - 1);
  put_value(a, *find_region(c, Role::inv_loss_scale, -1), 0, c.inv_scale);
  for (size_t g = 0; g < c.groups.size(); ++g) {
    put_value(a, *find_region(c, Role::lr_device, static_cast<int64_t>(g)), 0, static_cast<float>(c.groups[g].lr));
  }
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    std::mt19937_64 rng(c.seed * 7919u + t * 104729u + 17u);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    const Region* param = tensor_region(c, t, Role::param);
    const Region* master = tensor_region(c, t, Role::master_param);
    const Region* m = tensor_region(c, t, Role::exp_avg);
    const Region* v = tensor_region(c, t, Role::exp_avg_sq);
    const Region* v_max = tensor_region(c, t, Role::max_exp_avg_sq);
    for (size_t i = 0; i < param->count; ++i) {
      const float p = 0.5f * normal(rng);
      put_value(a, *param, i, p);
      if (master != nullptr) put_value(a, *master, i, p);
      const float m_value = c.zero_state ? 0.0f : 1e-3f * normal(rng);
      const float root = c.zero_state ? 0.0f : 1e-3f * normal(rng);
      const float v_value = root * root;
      if (m != nullptr) put_value(a, *m, i, m_value);
      if (v != nullptr) put_value(a, *v, i, v_value);
      if (v_max != nullptr) put_value(a, *v_max, i, c.zero_state ? 0.0f : v_value * (1.0f + uniform(rng)));
    }
  }
  write_gradients(c, a, c.seed);
  return arena;
}

void reset_outputs(const Case& c, std::vector<unsigned char>& arena) {
  for (Role role : {Role::thresholds, Role::kept_counts, Role::found_inf}) {
    const Region& r = *find_region(c, role, -1);
    std::memset(arena.data() + r.offset, kUnwrittenByte, r.bytes());
  }
}

// ---- Descriptions -------------------------------------------------------------------------

const char* optimizer_name(gmtkOptimizer_t optimizer) {
  return optimizer == GMTK_OPTIMIZER_ADAMW ? "AdamW" : optimizer == GMTK_OPTIMIZER_ADAM ? "Adam" : "SGD";
}

std::string describe_group(const gmtkGroupConfig_t& g) {
  std::ostringstream out;
  out << std::setprecision(9) << optimizer_name(g.optimizer) << "(lr " << g.lr;
  if (g.weight_decay != 0.0) out << ", weight_decay " << g.weight_decay;
  if (g.optimizer == GMTK_OPTIMIZER_SGD) {
    if (g.momentum != 0.0) out << ", momentum " << g.momentum << ", dampening " << g.dampening;
    if (g.nesterov != 0) out << ", nesterov";
  } else {
    out << ", betas " << g.beta1 << "/" << g.beta2 << ", eps " << g.eps;
    if (g.amsgrad != 0) out << ", amsgrad";
  }
  if (g.maximize != 0) out << ", maximize";
  out << ") " << (g.scope == GMTK_SCOPE_GLOBAL ? "global" : "per-tensor") << ", "
      << (g.mask_mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad") << ", mask_ratio " << std::setprecision(17)
      << g.mask_ratio;
  return out.str();
}

std::string tensor_label(const Case& c, size_t t) {
  const TensorSpec& spec = c.tensors[t];
  std::ostringstream out;
  out << "tensor " << t << " (group " << spec.group << " "
      << optimizer_name(c.groups[static_cast<size_t>(spec.group)].optimizer) << ", grad " << dtype_name(spec.grad_dtype)
      << ", param " << dtype_name(spec.param_dtype) << (spec.master ? "+master" : "") << ", numel " << spec.numel
      << ", " << content_name(spec.content) << ", start +" << spec.misalign << ")";
  return out.str();
}

std::string describe(const Case& c) {
  std::ostringstream out;
  int64_t total = 0;
  for (const TensorSpec& spec : c.tensors) total += spec.numel;
  out << "case '" << c.name << "' (seed " << c.seed << "): " << c.tensors.size() << " tensors, " << total << " entries";
  for (size_t g = 0; g < c.groups.size(); ++g) {
    size_t count = 0;
    for (const TensorSpec& spec : c.tensors) count += spec.group == static_cast<int32_t>(g) ? 1 : 0;
    out << "\n  group " << g << ": " << describe_group(c.groups[g]) << ", " << count << " tensors";
  }
  for (size_t t = 0; t < c.tensors.size() && t < 8; ++t) out << "\n  " << tensor_label(c, t);
  if (c.tensors.size() > 8) out << "\n  ...";
  out << "\n  workspace: "
      << (c.plan_owned_workspace ? std::string("plan-owned")
                                 : "caller's at +" + std::to_string(c.workspace_misalign) + " bytes" +
                                       (c.garbage_workspace ? ", garbage-filled before each call" : ""));
  out << "; " << (c.device_counter ? "device step_count" : "args.step") << ", first t " << c.first_step;
  if (c.use_inv_scale) out << "; inv_loss_scale";
  if (c.lr_on_device) out << "; lr_device";
  if (!c.outputs_under_test) out << "; no outputs requested from " << under_test_name();
  out << "; state starts " << (c.zero_state ? "zeroed" : "random");
  return out.str();
}

// ---- Reports ---------------------------------------------------------------------------------

// Mismatches of one kind: a count and the first few, described.
class Report {
 public:
  explicit Report(std::string title) : title_(std::move(title)) {}
  // Counts a mismatch; true when it is among the first few, to be described.
  bool count() { return ++count_ <= kReportedMismatches; }
  void line(const std::string& text) { lines_ += "\n    " + text; }
  size_t size() const { return count_; }
  const std::string& title() const { return title_; }
  std::string text() const {
    return title_ + ": " + std::to_string(count_) + " mismatch" + (count_ == 1 ? "" : "es") +
           (count_ > kReportedMismatches ? " (the first " + std::to_string(kReportedMismatches) + ")" : "") + lines_;
  }

 private:
  std::string title_;
  size_t count_ = 0;
  std::string lines_;
};

namespace check {
const char* const kFoundInf = "found_inf (bitwise)";
const char* const kStepCount = "step_count (bitwise)";
const char* const kThresholds = "thresholds (bitwise)";
const char* const kKeptCounts = "kept_counts (bitwise)";
const char* const kUnrequested = "outputs not requested stay unwritten";
const char* const kReadOnly = "gradients, inv_loss_scale and lr_device keep their bits";
const char* const kPadding = "bytes outside every buffer keep the padding";
const char* const kNoOp = "found_inf set: nothing but the outputs changes";
const char* const kFp32 = "fp32 values within 4 ulp of the reference";
const char* const kMastered = "16-bit param = nearest-even rounding of its own master";
const char* const kUnmastered = "16-bit param without master = the reference's, or across a rounding boundary";
const char* const kFreeze = "freeze: masked entries keep every bit";
const char* const kHarness = "the harness's own assumptions";
}  // namespace check

struct Verdict {
  std::vector<Report> reports;
  Report& operator[](const std::string& title) {
    for (Report& report : reports) {
      if (report.title() == title) return report;
    }
    reports.emplace_back(title);
    return reports.back();
  }
  size_t count(const std::string& title) const {
    for (const Report& report : reports) {
      if (report.title() == title) return report.size();
    }
    return 0;
  }
  size_t total() const {
    size_t sum = 0;
    for (const Report& report : reports) sum += report.size();
    return sum;
  }
  std::string text() const {
    std::string all;
    for (const Report& report : reports) {
      if (report.size() > 0) all += "\n  " + report.text();
    }
    return all;
  }
};

void expect_clean(const Verdict& verdict, const std::string& context) {
  for (const Report& report : verdict.reports) {
    INFO(context);
    INFO(report.text());
    CHECK(report.size() == 0);
  }
}

// ---- The comparison of one step -------------------------------------------------------------

// Per tensor: the reference's fp32 result behind each 16-bit param that has no
// master (empty for other tensors). Computed only when needed.
using ShadowResults = std::vector<std::vector<float>>;
using ShadowRun = std::function<ShadowResults()>;

// Byte-exact comparison of one region; reports entries that differ.
void compare_bits(Report& report, const Case& c, const Region& r, const unsigned char* want, const unsigned char* got,
                  const char* want_name) {
  if (r.count == 0 || std::memcmp(want + r.offset, got + r.offset, r.bytes()) == 0) return;
  for (size_t i = 0; i < r.count; ++i) {
    const bool same =
        r.width == 8 ? int64_at(want, r, i) == int64_at(got, r, i) : bits_at(want, r, i) == bits_at(got, r, i);
    if (same || !report.count()) continue;
    std::ostringstream line;
    line << role_name(r.role);
    if (r.role == Role::thresholds || r.role == Role::kept_counts) {
      line << " of " << tensor_label(c, i);
    } else if (r.owner >= 0 && r.role != Role::lr_device) {
      line << " of " << tensor_label(c, static_cast<size_t>(r.owner)) << " entry " << i;
    } else if (r.role == Role::lr_device) {
      line << " of group " << r.owner;
    }
    if (r.width == 8) {
      line << ": " << want_name << " " << int64_at(want, r, i) << ", " << under_test_name() << " "
           << int64_at(got, r, i);
    } else {
      line << ": " << want_name << " " << value_text(r.dtype, bits_at(want, r, i)) << ", " << under_test_name() << " "
           << value_text(r.dtype, bits_at(got, r, i));
    }
    report.line(line.str());
  }
}

// Bytes outside every region, against the bytes before the step.
void compare_padding(Report& report, const Case& c, const unsigned char* before, const unsigned char* got) {
  std::vector<std::pair<size_t, size_t>> spans;  // [start, end) of each region
  spans.reserve(c.regions.size());
  for (const Region& r : c.regions) spans.emplace_back(r.offset, r.offset + r.bytes());
  std::sort(spans.begin(), spans.end());
  size_t from = 0;
  auto scan = [&](size_t begin, size_t end) {
    if (begin >= end || std::memcmp(before + begin, got + begin, end - begin) == 0) return;
    for (size_t b = begin; b < end; ++b) {
      if (before[b] != got[b] && report.count()) {
        report.line("arena byte " + std::to_string(b) + ": " + hex_text(before[b]) + " became " + hex_text(got[b]));
      }
    }
  };
  for (const auto& span : spans) {
    scan(from, span.first);
    from = std::max(from, span.second);
  }
  scan(from, c.arena_bytes);
}

// Compares one step of the backend under test (`got`) with the reference's
// (`cpu`), both started from `before`. `shadow` gives the reference's fp32
// results behind 16-bit params without masters, when a rounding must be judged.
Verdict compare_step(const Case& c, const unsigned char* before, const unsigned char* cpu, const unsigned char* got,
                     const ShadowRun& shadow) {
  Verdict v;
  for (const char* title : {check::kFoundInf, check::kStepCount, check::kThresholds, check::kKeptCounts,
                            check::kUnrequested, check::kReadOnly, check::kPadding, check::kNoOp, check::kFp32,
                            check::kMastered, check::kUnmastered, check::kFreeze, check::kHarness}) {
    v[title];
  }
  const Region& found_inf = *find_region(c, Role::found_inf, -1);
  const uint32_t cpu_found_inf = bits_at(cpu, found_inf, 0);
  if (cpu_found_inf != bits_of(0.0f) && cpu_found_inf != bits_of(1.0f) && v[check::kHarness].count()) {
    v[check::kHarness].line("the reference wrote found_inf " + float_text(cpu_found_inf) + ", not 0 or 1");
  }
  const bool skipped = cpu_found_inf == bits_of(1.0f);

  // The outputs and the counter, bit for bit.
  for (Role role : {Role::found_inf, Role::thresholds, Role::kept_counts}) {
    const Region& r = *find_region(c, role, -1);
    if (c.outputs_under_test) {
      compare_bits(v[role == Role::found_inf    ? check::kFoundInf
                     : role == Role::thresholds ? check::kThresholds
                                                : check::kKeptCounts],
                   c, r, cpu, got, "CPU");
    } else {
      compare_bits(v[check::kUnrequested], c, r, before, got, "before");
    }
  }
  const Region& step_count = *find_region(c, Role::step_count, -1);
  compare_bits(v[check::kStepCount], c, step_count, c.device_counter ? cpu : before, got,
               c.device_counter ? "CPU" : "before (args.step used)");

  // Read-only buffers and the padding.
  for (const Region& r : c.regions) {
    if (r.role == Role::grad || r.role == Role::inv_loss_scale || r.role == Role::lr_device) {
      compare_bits(v[check::kReadOnly], c, r, before, got, "before");
    }
  }
  compare_padding(v[check::kPadding], c, before, got);

  if (skipped) {  // a no-op: every tensor buffer keeps its bits
    for (size_t t = 0; t < c.tensors.size(); ++t) {
      for (Role role : kValueRoles) {
        if (const Region* r = tensor_region(c, t, role)) compare_bits(v[check::kNoOp], c, *r, before, got, "before");
      }
    }
    compare_bits(v[check::kNoOp], c, step_count, before, got, "before");
    return v;
  }

  // A step that could change something must change something in the
  // reference, or the case tests nothing (a zero lr, say).
  bool can_change = false;
  for (const TensorSpec& spec : c.tensors) {
    const gmtkGroupConfig_t& group = c.groups[static_cast<size_t>(spec.group)];
    can_change |= spec.numel > 0 && !(group.mask_mode == GMTK_MASK_FREEZE && group.mask_ratio == 1.0);
  }
  bool changed = false;
  for (const Region& r : c.regions) {
    const bool value = r.role == Role::param || r.role == Role::master_param || r.role == Role::exp_avg ||
                       r.role == Role::exp_avg_sq || r.role == Role::max_exp_avg_sq;
    changed |= value && std::memcmp(before + r.offset, cpu + r.offset, r.bytes()) != 0;
  }
  if (can_change && !changed && v[check::kHarness].count()) {
    v[check::kHarness].line("the reference's step changed no parameter or state: this case tests nothing");
  }

  const Region& thresholds = *find_region(c, Role::thresholds, -1);
  ShadowResults shadow_results;
  bool shadow_ran = false;
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    const TensorSpec& spec = c.tensors[t];
    const gmtkGroupConfig_t& group = c.groups[static_cast<size_t>(spec.group)];
    const size_t n = static_cast<size_t>(spec.numel);
    if (n == 0) continue;

    // fp32 buffers: within kUlpBound of the reference.
    for (Role role : kValueRoles) {
      const Region* r = tensor_region(c, t, role);
      if (r == nullptr || r->dtype != GMTK_FLOAT32) continue;
      if (std::memcmp(cpu + r->offset, got + r->offset, r->bytes()) == 0) continue;
      for (size_t i = 0; i < n; ++i) {
        const float want = value_at(cpu, *r, i);
        const float value = value_at(got, *r, i);
        const uint64_t distance = ulp_distance(want, value);
        if (distance <= kUlpBound || !v[check::kFp32].count()) continue;
        std::ostringstream line;
        line << role_name(role) << " of " << tensor_label(c, t) << " entry " << i << ": before "
             << float_text(bits_at(before, *r, i)) << ", CPU " << float_text(bits_at(cpu, *r, i)) << ", "
             << under_test_name() << " " << float_text(bits_at(got, *r, i)) << " ("
             << (distance == std::numeric_limits<uint64_t>::max() ? std::string("NaN against a number")
                                                                  : std::to_string(distance) + " ulp")
             << ")";
        v[check::kFp32].line(line.str());
      }
    }

    // 16-bit params.
    const Region& param = *tensor_region(c, t, Role::param);
    if (param.dtype != GMTK_FLOAT32) {
      const Format16& format = format_of(param.dtype);
      if (const Region* master = tensor_region(c, t, Role::master_param)) {
        for (const auto& side : {std::make_pair("CPU", cpu), std::make_pair(under_test_name(), got)}) {
          for (size_t i = 0; i < n; ++i) {
            const float own_master = value_at(side.second, *master, i);
            const auto value = static_cast<uint16_t>(bits_at(side.second, param, i));
            const uint16_t want = narrow_to_16(own_master, format);
            const bool ok = std::isnan(own_master) ? is_nan_16(value, format) : value == want;
            if (ok || !v[check::kMastered].count()) continue;
            v[check::kMastered].line(std::string(side.first) + ": param of " + tensor_label(c, t) + " entry " +
                                     std::to_string(i) + " is " + value_text(param.dtype, value) + ", its master " +
                                     float_text(bits_of(own_master)) + " rounds to " + value_text(param.dtype, want));
          }
        }
      } else if (std::memcmp(cpu + param.offset, got + param.offset, param.bytes()) != 0) {
        for (size_t i = 0; i < n; ++i) {
          const auto want = static_cast<uint16_t>(bits_at(cpu, param, i));
          const auto value = static_cast<uint16_t>(bits_at(got, param, i));
          if (want == value || (is_nan_16(want, format) && is_nan_16(value, format))) continue;
          if (!shadow_ran) {
            shadow_results = shadow();
            shadow_ran = true;
          }
          const float exact = shadow_results.at(t).at(i);
          if (narrow_to_16(exact, format) != want && !(std::isnan(exact) && is_nan_16(want, format)) &&
              v[check::kHarness].count()) {
            v[check::kHarness].line("the reference's fp32 result " + float_text(bits_of(exact)) + " for " +
                                    tensor_label(c, t) + " entry " + std::to_string(i) +
                                    " (from a run with masters) does not round to its 16-bit param " +
                                    value_text(param.dtype, want));
          }
          if (rounds_from_nearby(exact, value, format) || !v[check::kUnmastered].count()) continue;
          v[check::kUnmastered].line("param of " + tensor_label(c, t) + " entry " + std::to_string(i) + ": before " +
                                     value_text(param.dtype, bits_at(before, param, i)) + ", CPU " +
                                     value_text(param.dtype, want) + " (from fp32 " + float_text(bits_of(exact)) +
                                     "), " + under_test_name() + " " + value_text(param.dtype, value));
        }
      }
    }

    // Freeze: an entry below the reference's threshold keeps every bit.
    if (group.mask_mode == GMTK_MASK_FREEZE) {
      const Region& grad = *tensor_region(c, t, Role::grad);
      const float threshold = value_at(cpu, thresholds, t);
      for (size_t i = 0; i < n; ++i) {
        if (std::fabs(value_at(before, grad, i)) >= threshold) continue;  // kept
        for (Role role : kValueRoles) {
          const Region* r = tensor_region(c, t, role);
          if (r == nullptr || bits_at(before, *r, i) == bits_at(got, *r, i) || !v[check::kFreeze].count()) continue;
          v[check::kFreeze].line(
              std::string(role_name(role)) + " of " + tensor_label(c, t) + " entry " + std::to_string(i) + " (|grad| " +
              float_text(bits_of(std::fabs(value_at(before, grad, i)))) + " < T " + float_text(bits_of(threshold)) +
              "): before " + value_text(r->dtype, bits_at(before, *r, i)) + ", " + under_test_name() + " " +
              value_text(r->dtype, bits_at(got, *r, i)));
        }
      }
    }
  }
  return v;
}

// ---- One backend's plan over its own copy of the arena ---------------------------------------

// BackendMemory: gpu_test_support.h.

// One backend's plan over its own copy of the case's arena. The reference
// side always writes every output; the side under test only those the case
// requests.
class Side {
 public:
  Side(const Case& c, gmtkBackend_t backend, cudaStream_t stream, bool reference)
      : c_(c),
        backend_(backend),
        reference_(reference),
        stream_(backend == GMTK_BACKEND_CUDA ? stream : nullptr),
        handle_(backend),
        memory_(backend, c.arena_bytes) {
    std::vector<gmtkGroupConfig_t> groups;
    for (size_t g = 0; g < c.groups.size(); ++g) groups.push_back(bound(c.groups[g], g));
    std::vector<gmtkTensor_t> tensors;
    tensors.reserve(c.tensors.size());
    for (size_t t = 0; t < c.tensors.size(); ++t) {
      const TensorSpec& spec = c.tensors[t];
      const bool null = spec.numel == 0 && spec.null_if_empty;
      auto pointer = [&](Role role) -> void* {
        const Region* r = tensor_region(c, t, role);
        return r == nullptr || null ? nullptr : memory_.data() + r->offset;
      };
      gmtkTensor_t described{};
      described.group = spec.group;
      described.numel = spec.numel;
      described.grad_dtype = spec.grad_dtype;
      described.grad = pointer(Role::grad);
      described.param_dtype = spec.param_dtype;
      described.param = pointer(Role::param);
      described.master_param = static_cast<float*>(pointer(Role::master_param));
      described.exp_avg = static_cast<float*>(pointer(Role::exp_avg));
      described.exp_avg_sq = static_cast<float*>(pointer(Role::exp_avg_sq));
      described.max_exp_avg_sq = static_cast<float*>(pointer(Role::max_exp_avg_sq));
      tensors.push_back(described);
    }
    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = groups.data();
    config.num_groups = static_cast<int32_t>(groups.size());
    config.tensors = tensors.empty() ? nullptr : tensors.data();
    config.num_tensors = static_cast<int64_t>(tensors.size());
    config.flags = c.plan_owned_workspace ? GMTK_PLAN_ALLOCATE_WORKSPACE : 0u;
    GPU_GMTK_OK(gmtkPlanCreate(handle_.handle, &config, &plan_));
    GPU_GMTK_OK(gmtkPlanGetWorkspaceSize(plan_, &workspace_bytes_));
    if (c.plan_owned_workspace) {
      INFO("a plan made with GMTK_PLAN_ALLOCATE_WORKSPACE reports 0 workspace bytes (docs/api.md)");
      CHECK(workspace_bytes_ == 0);
      workspace_bytes_ = 0;
    } else if (workspace_bytes_ > 0) {
      workspace_ = std::make_unique<BackendMemory>(backend, workspace_bytes_ + c.workspace_misalign);
    }
  }
  ~Side() { gmtkPlanDestroy(plan_); }
  Side(const Side&) = delete;
  Side& operator=(const Side&) = delete;

  unsigned char* base() const { return memory_.data(); }
  gmtkPlan_t plan() const { return plan_; }
  cudaStream_t stream() const { return stream_; }

  // A group config with lr_device pointing into this side's arena when the case asks.
  gmtkGroupConfig_t bound(gmtkGroupConfig_t group, size_t g) const {
    if (c_.lr_on_device) {
      group.lr_device =
          reinterpret_cast<const float*>(base() + find_region(c_, Role::lr_device, static_cast<int64_t>(g))->offset);
    }
    return group;
  }
  void set_group(size_t g, const gmtkGroupConfig_t& config) {
    const gmtkGroupConfig_t own = bound(config, g);
    GPU_GMTK_OK(gmtkPlanSetGroupHyperparams(plan_, static_cast<int32_t>(g), &own));
  }

  // The whole arena in; ordered on the stream and complete on return.
  void upload(const std::vector<unsigned char>& bytes) {
    REQUIRE(bytes.size() == c_.arena_bytes);
    memory_.write(0, bytes.data(), bytes.size(), stream_);
    sync();
  }
  // One region's bytes from a host arena, queued on the stream (no sync).
  void upload_region(const Region& r, const std::vector<unsigned char>& host) {
    memory_.write(r.offset, host.data() + r.offset, r.bytes(), stream_);
  }
  std::vector<unsigned char> download() {
    std::vector<unsigned char> bytes(c_.arena_bytes);
    memory_.read(0, bytes.data(), bytes.size(), stream_);
    return bytes;
  }
  void sync() {
    if (backend_ == GMTK_BACKEND_CUDA) GPU_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  // Random bytes over the caller's workspace: its contents need not survive
  // between calls (docs/api.md).
  void scramble_workspace(uint64_t seed) {
    if (workspace_ == nullptr || !c_.garbage_workspace) return;
    std::vector<unsigned char> garbage(workspace_bytes_);
    std::mt19937_64 rng(seed);
    for (size_t b = 0; b < garbage.size(); b += 8) {
      const uint64_t word = rng();
      std::memcpy(garbage.data() + b, &word, std::min<size_t>(8, garbage.size() - b));
    }
    workspace_->write(c_.workspace_misalign, garbage.data(), garbage.size(), stream_);
    sync();
  }

  gmtkStepArgs_t args(int64_t t) const {
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    auto at = [&](Role role) { return base() + find_region(c_, role, -1)->offset; };
    if (c_.device_counter) {
      args.step_count = reinterpret_cast<int64_t*>(at(Role::step_count));
    } else {
      args.step = t;
    }
    if (c_.use_inv_scale) args.inv_loss_scale = reinterpret_cast<const float*>(at(Role::inv_loss_scale));
    if (c_.outputs_under_test || reference_) {
      args.found_inf = reinterpret_cast<float*>(at(Role::found_inf));
      if (!c_.tensors.empty()) {
        args.thresholds = reinterpret_cast<float*>(at(Role::thresholds));
        args.kept_counts = reinterpret_cast<int64_t*>(at(Role::kept_counts));
      }
    }
    return args;
  }
  void* workspace() const { return workspace_ == nullptr ? nullptr : workspace_->data() + c_.workspace_misalign; }
  size_t workspace_bytes() const { return workspace_bytes_; }

  // Queues one step on the stream and returns; nothing waits for it.
  gmtkStatus_t launch(int64_t t) {
    const gmtkStepArgs_t step_args = args(t);
    return gmtkStep(plan_, &step_args, workspace(), workspace_bytes_, stream_);
  }

 private:
  const Case& c_;
  gmtkBackend_t backend_;
  bool reference_;
  cudaStream_t stream_;
  HandleOwner handle_;
  BackendMemory memory_;
  gmtkPlan_t plan_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::unique_ptr<BackendMemory> workspace_;
};

void require_step_ok(gmtkStatus_t status, const char* backend) {
  INFO(backend << " gmtkStep returned " << gmtkGetErrorString(status) << ": "
               << (status == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage()));
  REQUIRE(status == GMTK_SUCCESS);
}

// One reference step from `before`; returns the bytes after it.
std::vector<unsigned char> reference_step(const Case& c, const std::vector<unsigned char>& before, int64_t t) {
  Side cpu(c, GMTK_BACKEND_CPU_REFERENCE, nullptr, true);
  cpu.upload(before);
  cpu.scramble_workspace(12345);
  require_step_ok(cpu.launch(t), "CPU reference");
  return cpu.download();
}

// The reference's fp32 result behind every 16-bit param without a master:
// the same step, from the same bytes, with a master equal to the widened
// param, which the step then reads and updates in fp32 as it would the
// widened param (docs/semantics.md, "Mixed precision").
ShadowResults shadow_fp32_params(const Case& c, const std::vector<unsigned char>& before, int64_t t) {
  Case shadow = c;
  shadow.name += " (re-run with masters for the 16-bit params)";
  shadow.outputs_under_test = true;
  std::vector<size_t> promoted;
  for (size_t i = 0; i < shadow.tensors.size(); ++i) {
    TensorSpec& spec = shadow.tensors[i];
    if (spec.param_dtype != GMTK_FLOAT32 && !spec.master && spec.numel > 0) {
      spec.master = true;
      promoted.push_back(i);
    }
  }
  lay_out(shadow);
  std::vector<unsigned char> bytes(shadow.arena_bytes, kPadByte);
  for (const Region& r : c.regions) {
    const Region& to = *find_region(shadow, r.role, r.owner);
    std::memcpy(bytes.data() + to.offset, before.data() + r.offset, r.bytes());
  }
  for (size_t i : promoted) {
    const Region& param = *tensor_region(shadow, i, Role::param);
    const Region& master = *tensor_region(shadow, i, Role::master_param);
    for (size_t e = 0; e < param.count; ++e) put_value(bytes.data(), master, e, value_at(bytes.data(), param, e));
  }
  const std::vector<unsigned char> after = reference_step(shadow, bytes, t);
  ShadowResults results(c.tensors.size());
  for (size_t i : promoted) {
    const Region& master = *tensor_region(shadow, i, Role::master_param);
    results[i].resize(master.count);
    for (size_t e = 0; e < master.count; ++e) results[i][e] = value_at(after.data(), master, e);
  }
  return results;
}

// ---- The differential driver ------------------------------------------------------------------

// Steps a case on the reference and on the backend under test from the same
// bytes, compares each step, and carries the reference's result on as the
// next step's starting state.
class Differential {
 public:
  Differential(Case& c, cudaStream_t stream)
      : c_(c),
        cpu_(c, GMTK_BACKEND_CPU_REFERENCE, nullptr, true),
        under_test_(c, backend_under_test(), stream, false),
        state_(initial_bytes(c)),
        t_(c.first_step) {}

  // The bytes the next step starts from: tests change gradients, scales and lr here.
  std::vector<unsigned char>& state() { return state_; }
  Case& spec() { return c_; }
  Side& under_test() { return under_test_; }
  int64_t next_t() const { return t_; }

  void refill_gradients(uint64_t seed) { write_gradients(c_, state_.data(), seed); }
  void set_inv_scale(float value) {
    c_.inv_scale = value;
    put_value(state_.data(), *find_region(c_, Role::inv_loss_scale, -1), 0, value);
  }
  void set_lr_device(size_t g, float value) {
    put_value(state_.data(), *find_region(c_, Role::lr_device, static_cast<int64_t>(g)), 0, value);
  }
  void set_group(size_t g, const gmtkGroupConfig_t& config) {
    c_.groups[g] = config;
    cpu_.set_group(g, config);
    under_test_.set_group(g, config);
  }

  struct Result {
    Verdict verdict;
    std::vector<unsigned char> before, cpu, got;
    bool found_inf = false;
  };

  // One step on both backends, compared (CHECKs), then the reference's result
  // becomes the state.
  Result step(const std::string& label) {
    Result result;
    result.before = state_;
    if (c_.reset_outputs) reset_outputs(c_, result.before);
    const int64_t t = t_;
    cpu_.upload(result.before);
    under_test_.upload(result.before);
    cpu_.scramble_workspace(c_.seed * 31u + static_cast<uint64_t>(steps_));
    under_test_.scramble_workspace(c_.seed * 37u + static_cast<uint64_t>(steps_));
    require_step_ok(cpu_.launch(t), "CPU reference");
    require_step_ok(under_test_.launch(t), under_test_name());
    result.cpu = cpu_.download();
    result.got = under_test_.download();
    const std::vector<unsigned char>& before = result.before;
    result.verdict = compare_step(c_, before.data(), result.cpu.data(), result.got.data(),
                                  [&]() { return shadow_fp32_params(c_, before, t); });
    const std::string context =
        describe(c_) + "\n" + label + ", step " + std::to_string(steps_) +
        (c_.device_counter
             ? " (device step_count " +
                   std::to_string(int64_at(before.data(), *find_region(c_, Role::step_count, -1), 0)) + ")"
             : " (args.step " + std::to_string(t) + ")");
    expect_clean(result.verdict, context);
    result.found_inf = bits_at(result.cpu.data(), *find_region(c_, Role::found_inf, -1), 0) == bits_of(1.0f);
    state_ = result.cpu;
    if (!result.found_inf) ++t_;
    ++steps_;
    return result;
  }

 private:
  Case& c_;
  Side cpu_;
  Side under_test_;
  std::vector<unsigned char> state_;
  int64_t t_;
  int steps_ = 0;
};

// Steps a freshly laid-out case `steps` times, new gradients before each step
// after the first.
void run_case(Case& c, cudaStream_t stream, int steps) {
  lay_out(c);
  Differential run(c, stream);
  for (int s = 0; s < steps; ++s) {
    if (s > 0) run.refill_gradients(c.seed * 101u + static_cast<uint64_t>(s));
    run.step("run_case");
  }
}

// The caller's non-blocking stream on CUDA; none in the host self-check.
class TestStream {
 public:
  TestStream() {
    if (cuda_under_test()) stream_ = std::make_unique<Stream>();
  }
  cudaStream_t get() const { return stream_ == nullptr ? nullptr : stream_->get(); }

 private:
  std::unique_ptr<Stream> stream_;
};

void finish_test() {
  if (cuda_under_test()) check_no_cuda_error_left();
}

// ---- Groups ------------------------------------------------------------------------------------

gmtkGroupConfig_t make_group(gmtkOptimizer_t optimizer) {
  gmtkGroupConfig_t group;
  GPU_GMTK_OK(gmtkGroupConfigInit(&group, optimizer));
  return group;
}
gmtkGroupConfig_t with_mask(gmtkGroupConfig_t group, double ratio, gmtkScope_t scope, gmtkMaskMode_t mode) {
  group.mask_ratio = ratio;
  group.scope = scope;
  group.mask_mode = mode;
  return group;
}
gmtkGroupConfig_t adamw(double lr, double weight_decay) {
  gmtkGroupConfig_t group = make_group(GMTK_OPTIMIZER_ADAMW);
  group.lr = lr;
  group.weight_decay = weight_decay;
  return group;
}
gmtkGroupConfig_t adam(double lr, double weight_decay, bool amsgrad = false) {
  gmtkGroupConfig_t group = make_group(GMTK_OPTIMIZER_ADAM);
  group.lr = lr;
  group.weight_decay = weight_decay;
  group.amsgrad = amsgrad ? 1 : 0;
  return group;
}
gmtkGroupConfig_t sgd(double lr, double momentum, double dampening, bool nesterov, double weight_decay) {
  gmtkGroupConfig_t group = make_group(GMTK_OPTIMIZER_SGD);
  group.lr = lr;
  group.momentum = momentum;
  group.dampening = dampening;
  group.nesterov = nesterov ? 1 : 0;
  group.weight_decay = weight_decay;
  return group;
}

// Every optimizer path of docs/semantics.md's arithmetic.
std::vector<gmtkGroupConfig_t> optimizer_paths() {
  std::vector<gmtkGroupConfig_t> paths;
  paths.push_back(adamw(1e-2, 0.0));  // AdamW, no weight decay
  gmtkGroupConfig_t g = adamw(1e-2, 0.1);
  g.beta1 = 0.8;
  g.beta2 = 0.99;
  g.eps = 1e-6;
  paths.push_back(g);                      // AdamW, decoupled decay, other betas and eps
  paths.push_back(adam(1e-2, 0.05));       // Adam, L2 decay folded into the gradient
  paths.push_back(adam(5e-3, 0.0, true));  // Adam amsgrad
  g = adamw(1e-2, 0.01);
  g.amsgrad = 1;
  g.maximize = 1;
  paths.push_back(g);  // AdamW amsgrad, maximize
  g = adam(1e-2, 0.02);
  g.maximize = 1;
  paths.push_back(g);                                // Adam maximize with L2 decay
  paths.push_back(sgd(0.1, 0.0, 0.0, false, 0.0));   // SGD plain
  paths.push_back(sgd(0.05, 0.9, 0.1, false, 0.0));  // SGD momentum with dampening
  paths.push_back(sgd(0.05, 0.9, 0.0, true, 0.0));   // SGD nesterov
  paths.push_back(sgd(0.1, 0.0, 0.0, false, 0.01));  // SGD weight decay
  g = sgd(0.05, 0.5, 0.0, false, 0.001);
  g.maximize = 1;
  paths.push_back(g);  // SGD momentum, weight decay, maximize
  return paths;
}

// Element-aligned starts that are not 16-byte aligned: 2, 4, 6 bytes for
// 16-bit buffers (fp32 buffers round up to 4 and 8).
size_t start_offset(size_t i) {
  static const size_t offsets[] = {2, 4, 6, 0, 12};
  return offsets[i % 5];
}

}  // namespace

// ---- Tests --------------------------------------------------------------------------------------

TEST_CASE(
    "the step comparison flags a 5-ulp value, a wrong mask, a mis-rounded 16-bit param and a change under found_inf",
    "[step][small]") {
  // Host-only: both sides are the CPU reference; the "under test" bytes are
  // perturbed on purpose, and each perturbation must be reported where it belongs.
  CHECK(ulp_distance(1.0f, std::nextafter(1.0f, 2.0f)) == 1);
  CHECK(ulp_distance(-0.0f, 0.0f) == 0);
  CHECK(ulp_distance(-std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::denorm_min()) == 2);
  CHECK(ulp_distance(std::nanf(""), std::nanf("1")) == 0);
  CHECK(ulp_distance(std::nanf(""), 1.0f) == std::numeric_limits<uint64_t>::max());
  CHECK(from_ordered(ordered(-3.5f) + 1) == std::nextafter(-3.5f, 0.0f));
  // bf16 1.0 is 0x3F80, the next is 0x3F81; their midpoint 1 + 2^-8 ties to even (0x3F80).
  const float midpoint = 1.0f + 1.0f / 256;
  CHECK(narrow_to_16(midpoint, kBfloat) == 0x3F80);
  CHECK(rounds_from_nearby(from_ordered(ordered(midpoint) - 2), 0x3F81, kBfloat));        // boundary 3 ulp away
  CHECK_FALSE(rounds_from_nearby(from_ordered(ordered(midpoint) - 4), 0x3F81, kBfloat));  // 5 ulp away
  CHECK_FALSE(rounds_from_nearby(1.0f, 0x3F81, kBfloat));
  CHECK_FALSE(rounds_from_nearby(midpoint, 0x3F82, kBfloat));  // two bf16 ulps

  Case c;
  c.name = "comparison self-check";
  c.seed = 90;
  c.groups = {with_mask(adamw(1e-2, 0.01), 0.5, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE),
              with_mask(adam(1e-2, 0.0, true), 0.5, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD)};
  c.tensors = {tensor(0, 2000, GMTK_FLOAT32, GMTK_FLOAT32), tensor(1, 2000, GMTK_FLOAT32, GMTK_BFLOAT16, false, 2),
               tensor(1, 1000, GMTK_FLOAT16, GMTK_FLOAT16, true, 6)};
  lay_out(c);
  std::vector<unsigned char> before = initial_bytes(c);
  reset_outputs(c, before);
  const std::vector<unsigned char> after = reference_step(c, before, 1);
  auto shadow = [&]() { return shadow_fp32_params(c, before, 1); };
  auto verdict_of = [&](const std::vector<unsigned char>& got) {
    return compare_step(c, before.data(), after.data(), got.data(), shadow);
  };
  {
    const Verdict same = verdict_of(after);
    INFO(same.text());
    CHECK(same.total() == 0);
  }
  const Region& grad0 = *tensor_region(c, 0, Role::grad);
  const Region& param0 = *tensor_region(c, 0, Role::param);
  const float threshold0 = value_at(after.data(), *find_region(c, Role::thresholds, -1), 0);
  size_t kept = 0, masked = 0;
  while (kept < grad0.count && std::fabs(value_at(before.data(), grad0, kept)) < threshold0) ++kept;
  while (masked < grad0.count && std::fabs(value_at(before.data(), grad0, masked)) >= threshold0) ++masked;
  REQUIRE(kept < grad0.count);
  REQUIRE(masked < grad0.count);

  auto shifted = [&](const Region& r, size_t i, int64_t ulps) {
    std::vector<unsigned char> got = after;
    put_value(got.data(), r, i, from_ordered(ordered(value_at(after.data(), r, i)) + ulps));
    return got;
  };
  {
    INFO("4 ulp on a kept fp32 param is within the bound");
    CHECK(verdict_of(shifted(param0, kept, 4)).total() == 0);
    CHECK(verdict_of(shifted(param0, kept, -4)).total() == 0);
  }
  {
    INFO("5 ulp on a kept fp32 param, or on exp_avg_sq, is flagged");
    const Verdict five = verdict_of(shifted(param0, kept, 5));
    CHECK(five.count(check::kFp32) == 1);
    CHECK(five.total() == 1);
    CHECK(verdict_of(shifted(*tensor_region(c, 1, Role::exp_avg_sq), 17, -5)).count(check::kFp32) == 1);
    CHECK(verdict_of(shifted(*tensor_region(c, 2, Role::max_exp_avg_sq), 3, 5)).count(check::kFp32) == 1);
  }
  {
    INFO("freeze: one ulp on a masked entry's exp_avg is flagged");
    const Verdict frozen = verdict_of(shifted(*tensor_region(c, 0, Role::exp_avg), masked, 1));
    CHECK(frozen.count(check::kFreeze) == 1);
  }
  {
    INFO("a wrong mask (ratio 0.3 instead of 0.5) is flagged in thresholds, kept counts, values and freeze");
    Case other = c;
    other.groups[0].mask_ratio = 0.3;
    other.groups[1].mask_ratio = 0.3;
    const std::vector<unsigned char> wrong = reference_step(other, before, 1);
    const Verdict v = verdict_of(wrong);
    CHECK(v.count(check::kThresholds) == 3);
    CHECK(v.count(check::kKeptCounts) == 3);
    CHECK(v.count(check::kFp32) > 100);
    CHECK(v.count(check::kFreeze) > 100);
  }
  {
    INFO("a 16-bit param with a master that is not its master's rounding is flagged");
    std::vector<unsigned char> got = after;
    const Region& param2 = *tensor_region(c, 2, Role::param);
    put_bits(got.data(), param2, 5, bits_at(after.data(), param2, 5) ^ 1u);
    CHECK(verdict_of(got).count(check::kMastered) == 1);
  }
  {
    INFO("a 16-bit param without master one ulp off, its fp32 value far from a boundary, is flagged");
    const Region& param1 = *tensor_region(c, 1, Role::param);
    const ShadowResults exact = shadow();
    size_t i = 0;
    while (i < param1.count &&
           rounds_from_nearby(exact[1][i], static_cast<uint16_t>(bits_at(after.data(), param1, i) ^ 1u), kBfloat)) {
      ++i;
    }
    REQUIRE(i < param1.count);
    std::vector<unsigned char> got = after;
    put_bits(got.data(), param1, i, bits_at(after.data(), param1, i) ^ 1u);
    const Verdict v = verdict_of(got);
    CHECK(v.count(check::kUnmastered) == 1);
    CHECK(v.count(check::kHarness) == 0);  // the re-run with masters agrees with the reference
  }
  {
    INFO("outputs, padding and gradients are compared bit for bit");
    std::vector<unsigned char> got = after;
    const Region& thresholds = *find_region(c, Role::thresholds, -1);
    put_bits(got.data(), thresholds, 1, bits_at(after.data(), thresholds, 1) + 1);
    const Region& kept_counts = *find_region(c, Role::kept_counts, -1);
    put_int64(got.data(), kept_counts, 2, int64_at(after.data(), kept_counts, 2) + 1);
    got[param0.offset + param0.bytes()] ^= 0x01;  // the first padding byte after a param
    const Region& grad1 = *tensor_region(c, 1, Role::grad);
    put_bits(got.data(), grad1, 0, 0);
    const Verdict v = verdict_of(got);
    CHECK(v.count(check::kThresholds) == 1);
    CHECK(v.count(check::kKeptCounts) == 1);
    CHECK(v.count(check::kPadding) == 1);
    CHECK(v.count(check::kReadOnly) == (bits_at(after.data(), grad1, 0) == 0 ? 0u : 1u));
  }
  {
    INFO("a reference step that changed no parameter or state is reported: such a case tests nothing");
    std::vector<unsigned char> unchanged = after;
    for (size_t t = 0; t < c.tensors.size(); ++t) {
      for (Role role : kValueRoles) {
        if (const Region* r = tensor_region(c, t, role)) {
          std::memcpy(unchanged.data() + r->offset, before.data() + r->offset, r->bytes());
        }
      }
    }
    const Verdict v = compare_step(c, before.data(), unchanged.data(), unchanged.data(), shadow);
    CHECK(v.count(check::kHarness) == 1);
    CHECK(v.total() == 1);
  }
  {
    INFO("with an inf gradient: the reference skips; any other change is flagged");
    std::vector<unsigned char> with_inf = before;
    plant_gradient_bits(c, with_inf.data(), 2, 999, 0x7F800000u);
    const std::vector<unsigned char> skipped = reference_step(c, with_inf, 1);
    CHECK(bits_at(skipped.data(), *find_region(c, Role::found_inf, -1), 0) == bits_of(1.0f));
    CHECK(compare_step(c, with_inf.data(), skipped.data(), skipped.data(), shadow).total() == 0);
    std::vector<unsigned char> got = skipped;
    const Region& v1 = *tensor_region(c, 1, Role::exp_avg);
    put_bits(got.data(), v1, 7, bits_at(skipped.data(), v1, 7) ^ 1u);
    CHECK(compare_step(c, with_inf.data(), skipped.data(), got.data(), shadow).count(check::kNoOp) == 1);
    got = skipped;
    put_bits(got.data(), *find_region(c, Role::found_inf, -1), 0, bits_of(0.0f));
    CHECK(compare_step(c, with_inf.data(), skipped.data(), got.data(), shadow).count(check::kFoundInf) == 1);
  }
}

TEST_CASE("a small plan of every optimizer path steps as the CPU reference does, in both mask modes and scopes",
          "[step][small]") {
  TestStream stream;
  uint64_t seed = 100;
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    for (gmtkScope_t scope : {GMTK_SCOPE_PER_TENSOR, GMTK_SCOPE_GLOBAL}) {
      Case c;
      c.name = std::string("every optimizer path, small, ") + (mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad") +
               (scope == GMTK_SCOPE_GLOBAL ? ", global" : ", per-tensor");
      c.seed = seed++;
      const std::vector<gmtkGroupConfig_t> paths = optimizer_paths();
      for (size_t g = 0; g < paths.size(); ++g) {
        c.groups.push_back(with_mask(paths[g], scope == GMTK_SCOPE_GLOBAL ? 0.9 : 0.5, scope, mode));
        const gmtkDtype_t grad_dtype = kDtypes[g % 3];
        c.tensors.push_back(tensor(static_cast<int32_t>(g), 500 + static_cast<int64_t>(g), grad_dtype, GMTK_FLOAT32,
                                   false, grad_dtype == GMTK_FLOAT32 ? 4 : start_offset(g)));
        c.tensors.push_back(tensor(static_cast<int32_t>(g), 130, grad_dtype, g % 2 == 0 ? GMTK_BFLOAT16 : GMTK_FLOAT16,
                                   g % 4 < 2, start_offset(g + 1)));
      }
      run_case(c, stream.get(), 2);  // t = 1 (SGD's first-step buffer), then t = 2
    }
  }
  finish_test();
}

TEST_CASE(
    "one step of every optimizer path equals the CPU reference at ratios 0, 0.3, 0.5, 0.9, 0.99 and 1, "
    "in both mask modes and scopes",
    "[step]") {
  TestStream stream;
  uint64_t seed = 200;
  const std::vector<gmtkGroupConfig_t> paths = optimizer_paths();
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    for (gmtkScope_t scope : {GMTK_SCOPE_PER_TENSOR, GMTK_SCOPE_GLOBAL}) {
      for (double ratio : {0.0, 0.3, 0.5, 0.9, 0.99, 1.0}) {
        Case c;
        std::ostringstream name;
        name << "every optimizer path, " << (mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad")
             << (scope == GMTK_SCOPE_GLOBAL ? ", global" : ", per-tensor") << ", ratio " << ratio;
        c.name = name.str();
        c.seed = seed++;
        for (size_t g = 0; g < paths.size(); ++g) {
          c.groups.push_back(with_mask(paths[g], ratio, scope, mode));
          const gmtkDtype_t grad_dtype = kDtypes[g % 3];  // one gradient dtype per group (global scope)
          c.tensors.push_back(tensor(static_cast<int32_t>(g), 3001, grad_dtype, GMTK_FLOAT32, false, 4));
          c.tensors.push_back(tensor(static_cast<int32_t>(g), 1000, grad_dtype,
                                     g % 2 == 0 ? GMTK_FLOAT16 : GMTK_BFLOAT16, g % 4 < 2, start_offset(g)));
        }
        run_case(c, stream.get(), 2);
      }
    }
  }
  finish_test();
}

TEST_CASE("all nine gradient x parameter dtype pairs, 16-bit params with and without fp32 masters, over 3 steps",
          "[step][small]") {
  TestStream stream;
  struct Pair {
    gmtkDtype_t grad, param;
    bool master;
  };
  std::vector<Pair> pairs;
  for (gmtkDtype_t grad : kDtypes) {
    pairs.push_back({grad, GMTK_FLOAT32, false});
    for (gmtkDtype_t param : {GMTK_FLOAT16, GMTK_BFLOAT16}) {
      pairs.push_back({grad, param, false});
      pairs.push_back({grad, param, true});
    }
  }
  REQUIRE(pairs.size() == 15);

  // Per-tensor AdamW over every pair in one group; global groups (one per
  // gradient dtype) with SGD nesterov in freeze mode and Adam amsgrad maximize.
  struct Config {
    const char* what;
    gmtkGroupConfig_t group;
    bool by_grad_dtype;
    bool device_counter;
    bool lr_on_device;
    bool inv_scale;
  };
  gmtkGroupConfig_t amsgrad_max = adam(1e-2, 0.01, true);
  amsgrad_max.maximize = 1;
  const Config configs[] = {
      {"AdamW, per-tensor 0.5, mask-grad, args.step",
       with_mask(adamw(1e-2, 0.01), 0.5, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD), false, false, false, false},
      {"SGD nesterov, global 0.9 per gradient dtype, freeze, device step_count, inv_loss_scale",
       with_mask(sgd(0.05, 0.9, 0.0, true, 0.01), 0.9, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE), true, true, false, true},
      {"Adam amsgrad maximize, global 0.3 per gradient dtype, mask-grad, lr_device",
       with_mask(amsgrad_max, 0.3, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD), true, false, true, false}};
  uint64_t seed = 300;
  for (const Config& config : configs) {
    Case c;
    c.name = std::string("dtype pairs: ") + config.what;
    c.seed = seed++;
    c.groups = config.by_grad_dtype ? std::vector<gmtkGroupConfig_t>(3, config.group)
                                    : std::vector<gmtkGroupConfig_t>{config.group};
    for (size_t p = 0; p < pairs.size(); ++p) {
      const int32_t group = config.by_grad_dtype ? static_cast<int32_t>(pairs[p].grad) : 0;
      c.tensors.push_back(tensor(group, 1500 + 7 * static_cast<int64_t>(p), pairs[p].grad, pairs[p].param,
                                 pairs[p].master, start_offset(p)));
    }
    c.device_counter = config.device_counter;
    c.first_step = config.device_counter ? 5 : 1;
    c.lr_on_device = config.lr_on_device;
    c.use_inv_scale = config.inv_scale;
    c.inv_scale = 1.0f / 128;
    if (config.inv_scale) {
      for (TensorSpec& spec : c.tensors) spec.scale = 1.0f;  // stored x128
    }
    run_case(c, stream.get(), 3);
  }
  finish_test();
}

TEST_CASE(
    "5-step sequences with args.step and with a device step_count follow gradient scale jumps of 1e6, "
    "inv_loss_scale, lr and mask_ratio changes, and a skipped step",
    "[step][small]") {
  TestStream stream;
  auto make_case = [](const char* name, uint64_t seed) {
    Case c;
    c.name = name;
    c.seed = seed;
    c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
                with_mask(sgd(0.05, 0.9, 0.1, false, 0.0), 0.5, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE),
                with_mask(adam(5e-3, 0.0, true), 0.99, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE)};
    c.tensors = {tensor(0, 4099, GMTK_FLOAT32, GMTK_FLOAT32, false, 4),
                 tensor(0, 3001, GMTK_BFLOAT16, GMTK_BFLOAT16, true, 2),
                 tensor(1, 2047, GMTK_FLOAT16, GMTK_FLOAT16, false, 6),
                 tensor(1, 1000, GMTK_FLOAT16, GMTK_FLOAT32),
                 tensor(2, 2500, GMTK_BFLOAT16, GMTK_FLOAT32, false, 2),
                 tensor(2, 1201, GMTK_BFLOAT16, GMTK_BFLOAT16, false, 4)};
    c.zero_state = true;  // a run from the start, as torch's state begins
    c.use_inv_scale = true;
    return c;
  };
  auto set_scale = [](Differential& run, float scale, Content content, uint64_t seed) {
    for (TensorSpec& spec : run.spec().tensors) {
      spec.scale = scale;
      spec.content = content;
    }
    run.refill_gradients(seed);
  };

  SECTION("args.step: t = 1 .. 5, gmtkPlanSetGroupHyperparams between steps") {
    Case c = make_case("5 steps, args.step", 400);
    c.inv_scale = 1.0f / 16;
    lay_out(c);
    Differential run(c, stream.get());
    set_scale(run, 1e-3f, Content::gaussian, 401);
    run.step("gradients 1e-3 stored, inv_loss_scale 1/16");
    set_scale(run, 1e3f, Content::gaussian, 402);
    run.step("gradients x1e6");
    set_scale(run, 1e-3f, Content::heavy_tail, 403);
    run.set_inv_scale(0.25f);
    run.step("gradients x1e-6, inv_loss_scale 1/4");
    gmtkGroupConfig_t g0 = c.groups[0], g1 = c.groups[1], g2 = c.groups[2];
    g0.lr *= 0.5;
    g0.weight_decay = 0.05;
    g0.mask_ratio = 0.5;
    g1.lr = 0.01;
    g1.momentum = 0.5;
    g1.mask_ratio = 0.99;
    g2.beta1 = 0.5;
    g2.mask_ratio = 0.3;
    run.set_group(0, g0);
    run.set_group(1, g1);
    run.set_group(2, g2);
    set_scale(run, 5e-2f, Content::gaussian, 404);
    run.set_inv_scale(1.0f);
    run.step("after schedule changes (lr, weight_decay, momentum, beta1, mask_ratio)");
    set_scale(run, 1e-2f, Content::quantized_256, 405);
    run.set_inv_scale(1.0f / 256);
    CHECK(run.next_t() == 5);
    run.step("quantized gradients, inv_loss_scale 1/256");
  }
  SECTION("device step_count and lr_device: the skipped step leaves the counter, found_inf is overwritten") {
    Case c = make_case("5 steps, device step_count", 410);
    c.device_counter = true;
    c.first_step = 1;
    c.lr_on_device = true;
    c.reset_outputs = false;  // outputs start as the last step left them
    c.inv_scale = 1.0f / 1024;
    lay_out(c);
    Differential run(c, stream.get());
    const Region& counter = *find_region(c, Role::step_count, -1);
    const Region& found_inf = *find_region(c, Role::found_inf, -1);
    set_scale(run, 1e-2f, Content::gaussian, 411);
    run.step("first step: counter 0");
    set_scale(run, 1e4f, Content::gaussian, 412);
    run.set_lr_device(0, 5e-3f);
    run.set_lr_device(1, 0.02f);
    run.step("gradients x1e6, lr_device changed");
    set_scale(run, 1e4f, Content::gaussian, 413);
    plant_gradient_bits(c, run.state().data(), 3, 999, 0x7FC00000u);  // NaN in a later tensor
    const Differential::Result skipped = run.step("a NaN gradient in tensor 3: skipped");
    CHECK(skipped.found_inf);
    CHECK(bits_at(skipped.got.data(), found_inf, 0) == bits_of(1.0f));
    CHECK(int64_at(skipped.got.data(), counter, 0) == 2);
    set_scale(run, 1e-2f, Content::gaussian, 414);
    run.set_lr_device(2, 1e-3f);
    const Differential::Result next = run.step("finite again, found_inf was 1 before the step");
    CHECK(bits_at(next.before.data(), found_inf, 0) == bits_of(1.0f));
    CHECK(bits_at(next.got.data(), found_inf, 0) == bits_of(0.0f));
    CHECK(int64_at(next.got.data(), counter, 0) == 3);
    set_scale(run, 1e-2f, Content::heavy_tail, 415);
    run.set_inv_scale(1.0f / 2048);
    const Differential::Result last = run.step("heavy tail, inv_loss_scale 1/2048");
    CHECK(int64_at(last.got.data(), counter, 0) == 4);
  }
  finish_test();
}

TEST_CASE(
    "an inf, -inf or NaN gradient in a later tensor, or one made non-finite by inv_loss_scale, makes the step "
    "a no-op that only writes its outputs",
    "[step][small]") {
  TestStream stream;
  struct Poison {
    const char* what;
    size_t tensor;
    bool at_end;      // the last entry, else the first
    uint32_t bits;    // fp32 bits planted (narrowed for 16-bit gradients); 0: none
    bool by_scale;    // an outlier of 8 times inv_loss_scale 1e38 overflows fp32
    bool ratio_zero;  // every group at ratio 0: no selection work, the check still runs
  };
  const Poison poisons[] = {{"+inf in tensor 2 (first entry)", 2, false, 0x7F800000u, false, false},
                            {"NaN in tensor 3 (last entry)", 3, true, 0x7FC00000u, false, false},
                            {"-inf in tensor 1 (last entry)", 1, true, 0xFF800000u, false, false},
                            {"a finite outlier in tensor 3 times inv_loss_scale 1e38", 3, false, 0, true, false},
                            {"NaN in tensor 2 with every ratio 0", 2, true, 0x7FC00000u, false, true}};
  uint64_t seed = 500;
  for (gmtkDtype_t dtype : kDtypes) {
    for (const Poison& poison : poisons) {
      Case c;
      c.name = std::string("found_inf: ") + poison.what + ", " + dtype_name(dtype) + " gradients";
      c.seed = seed++;
      const double ratio = poison.ratio_zero ? 0.0 : 0.5;
      c.groups = {with_mask(adamw(1e-2, 0.01), ratio, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
                  with_mask(sgd(0.05, 0.9, 0.0, false, 0.0), poison.ratio_zero ? 0.0 : 0.9, GMTK_SCOPE_GLOBAL,
                            GMTK_MASK_FREEZE)};
      c.tensors = {tensor(0, 3000, dtype, GMTK_FLOAT32), tensor(0, 1001, dtype, GMTK_BFLOAT16, true, 2),
                   tensor(1, 2049, dtype, GMTK_FLOAT16, false, 6), tensor(1, 517, dtype, GMTK_FLOAT32, false, 4)};
      c.device_counter = true;
      c.first_step = 3;
      c.use_inv_scale = true;
      c.inv_scale = 1.0f / 64;
      lay_out(c);
      Differential run(c, stream.get());
      if (poison.by_scale) {
        run.spec().tensors[poison.tensor].content = Content::big_outlier;
        run.refill_gradients(c.seed);
        run.set_inv_scale(1e38f);
      } else {
        const size_t entry = poison.at_end ? static_cast<size_t>(c.tensors[poison.tensor].numel) - 1 : 0;
        plant_gradient_bits(c, run.state().data(), poison.tensor, entry, poison.bits);
      }
      const Differential::Result skipped = run.step("the poisoned step");
      CHECK(skipped.found_inf);
      CHECK(bits_at(skipped.got.data(), *find_region(c, Role::found_inf, -1), 0) == bits_of(1.0f));
      CHECK(int64_at(skipped.got.data(), *find_region(c, Role::step_count, -1), 0) == 2);

      // Then a clean step applies: found_inf 0, the counter advances once.
      run.spec().tensors[poison.tensor].content = Content::gaussian;
      run.refill_gradients(c.seed + 7);
      run.set_inv_scale(1.0f / 64);
      const Differential::Result applied = run.step("the next, finite step");
      CHECK_FALSE(applied.found_inf);
      CHECK(int64_at(applied.got.data(), *find_region(c, Role::step_count, -1), 0) == 3);
    }
  }
  finish_test();
}

TEST_CASE(
    "a step captured in a CUDA graph and replayed 10 times with a changing lr_device gives the bits of 10 eager "
    "steps",
    "[step][small]") {
  if (!cuda_under_test()) {
    SUCCEED("graph capture needs CUDA; the host self-check skips it");
    return;
  }
  Stream stream;
  Case c;
  c.name = "graph capture";
  c.seed = 600;
  c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
              with_mask(sgd(0.05, 0.9, 0.0, true, 0.0), 0.5, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE)};
  c.tensors = {tensor(0, (int64_t{1} << 18) + 3, GMTK_FLOAT32, GMTK_FLOAT32, false, 4),  // the multi-block passes
               tensor(0, 3000, GMTK_BFLOAT16, GMTK_BFLOAT16, true, 2),
               tensor(1, 1000, GMTK_FLOAT16, GMTK_FLOAT32, false, 6), tensor(1, 0, GMTK_FLOAT16, GMTK_FLOAT16),
               tensor(1, 777, GMTK_FLOAT16, GMTK_FLOAT16, false, 2)};
  c.device_counter = true;
  c.first_step = 1;
  c.lr_on_device = true;
  c.use_inv_scale = true;
  c.inv_scale = 1.0f / 32;
  c.zero_state = true;
  lay_out(c);
  const std::vector<unsigned char> initial = initial_bytes(c);

  Side graphed(c, GMTK_BACKEND_CUDA, stream.get(), false);
  Side eager(c, GMTK_BACKEND_CUDA, stream.get(), false);
  graphed.upload(initial);
  eager.upload(initial);

  // Capture in global mode, as torch.cuda.graph does: a call that
  // synchronizes or allocates while capturing fails here.
  GPU_CUDA_OK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
  const gmtkStatus_t captured = graphed.launch(0);
  const std::string message = captured == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage();
  cudaGraph_t graph = nullptr;
  const cudaError_t end_capture = cudaStreamEndCapture(stream.get(), &graph);
  {
    INFO("gmtkStep under capture returned " << gmtkGetErrorString(captured) << ": " << message);
    CHECK(captured == GMTK_SUCCESS);
  }
  {
    INFO("cudaStreamEndCapture -> " << cudaGetErrorString(end_capture));
    REQUIRE(end_capture == cudaSuccess);
  }
  REQUIRE(captured == GMTK_SUCCESS);
  cudaGraphExec_t exec = nullptr;
  GPU_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));

  const Region& counter = *find_region(c, Role::step_count, -1);
  int64_t applied = 0;
  for (int r = 0; r < 10; ++r) {
    INFO("replay " << r);
    // The next step's inputs, written into both copies on the stream: new
    // gradients, a new lr for each group, and at replay 6 a NaN gradient.
    std::vector<unsigned char> before = graphed.download();
    write_gradients(c, before.data(), c.seed * 13u + static_cast<uint64_t>(r));
    if (r == 6) plant_gradient_bits(c, before.data(), 2, 500, 0x7FC00000u);
    const float lrs[2] = {1e-2f / static_cast<float>(r + 1), 0.05f * static_cast<float>(10 - r)};
    for (size_t g = 0; g < 2; ++g)
      put_value(before.data(), *find_region(c, Role::lr_device, static_cast<int64_t>(g)), 0, lrs[g]);
    reset_outputs(c, before);
    for (Side* side : {&graphed, &eager}) {
      for (const Region& region : c.regions) {
        if (region.role == Role::grad || region.role == Role::lr_device || is_output(region.role)) {
          side->upload_region(region, before);
        }
      }
      side->sync();
      side->scramble_workspace(c.seed + static_cast<uint64_t>(r) * 2 + (side == &eager ? 1 : 0));
    }
    GPU_CUDA_OK(cudaGraphLaunch(exec, stream.get()));
    require_step_ok(eager.launch(0), "CUDA (eager)");
    const std::vector<unsigned char> from_graph = graphed.download();
    const std::vector<unsigned char> from_eager = eager.download();

    // Bitwise: the replay equals the eager call (determinism, docs/semantics.md).
    size_t differing = 0;
    std::ostringstream first;
    for (const Region& region : c.regions) {
      if (std::memcmp(from_graph.data() + region.offset, from_eager.data() + region.offset, region.bytes()) == 0)
        continue;
      for (size_t i = 0; i < region.count; ++i) {
        const bool same = region.width == 8
                              ? int64_at(from_graph.data(), region, i) == int64_at(from_eager.data(), region, i)
                              : bits_at(from_graph.data(), region, i) == bits_at(from_eager.data(), region, i);
        if (!same && ++differing <= kReportedMismatches) {
          first << "\n  " << role_name(region.role) << " (owner " << region.owner << ") entry " << i << ": graph "
                << hex_text(bits_at(from_graph.data(), region, i)) << ", eager "
                << hex_text(bits_at(from_eager.data(), region, i));
        }
      }
    }
    {
      INFO("replay vs eager call: " << differing << " entries differ" << first.str());
      CHECK(differing == 0);
    }
    // And the replay is a correct step: against the reference from the same bytes.
    const std::vector<unsigned char> cpu = reference_step(c, before, 0);
    const Verdict verdict = compare_step(c, before.data(), cpu.data(), from_graph.data(),
                                         [&]() { return shadow_fp32_params(c, before, 0); });
    expect_clean(verdict, describe(c) + "\nreplay " + std::to_string(r) + " against the CPU reference");
    const bool skipped = bits_at(cpu.data(), *find_region(c, Role::found_inf, -1), 0) == bits_of(1.0f);
    CHECK(skipped == (r == 6));
    applied += skipped ? 0 : 1;
    CHECK(int64_at(from_graph.data(), counter, 0) == applied);
  }
  CHECK(applied == 9);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  finish_test();
}

TEST_CASE("sizes 0, 1, 7, 8, 9 and 4095 at starts 2, 4 and 6 bytes past a 256-byte boundary", "[step][small]") {
  TestStream stream;
  uint64_t seed = 700;
  for (gmtkDtype_t dtype : kDtypes) {
    Case c;
    c.name = std::string("small sizes, unaligned starts, ") + dtype_name(dtype) + " gradients";
    c.seed = seed++;
    c.groups = {with_mask(adamw(1e-2, 0.01), 0.5, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
                with_mask(sgd(0.05, 0.9, 0.1, false, 0.0), 0.9, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE),
                with_mask(adam(1e-2, 0.01, true), 0.3, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE)};
    size_t index = 0;
    for (int64_t n : {0, 1, 7, 8, 9, 4095}) {
      for (size_t offset : {size_t{2}, size_t{4}, size_t{6}}) {
        const auto group = static_cast<int32_t>(index % 3);
        const gmtkDtype_t param = dtype == GMTK_FLOAT32 ? kDtypes[index % 3] : dtype;
        TensorSpec spec = tensor(group, n, dtype, param, index % 2 == 0, offset);
        spec.null_if_empty = index % 2 == 0;  // empty tensors: NULL pointers, or real addresses
        c.tensors.push_back(spec);
        ++index;
      }
    }
    c.outputs_under_test = dtype != GMTK_BFLOAT16;  // the outputs are optional
    c.plan_owned_workspace = dtype == GMTK_FLOAT16;
    run_case(c, stream.get(), 2);
  }
  finish_test();
}

TEST_CASE("the multi-block selection path: fp32 tensors of 2^18 + 3 entries at ratio 0.9, per tensor and global",
          "[step][small]") {
  TestStream stream;
  Case c;
  c.name = "multi-block, 2^18 + 3 fp32";
  c.seed = 800;
  c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
              with_mask(sgd(0.05, 0.9, 0.0, true, 0.0), 0.9, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE)};
  const int64_t n = (int64_t{1} << 18) + 3;
  c.tensors = {tensor(0, n, GMTK_FLOAT32, GMTK_FLOAT32, false, 4),
               tensor(1, n, GMTK_FLOAT32, GMTK_FLOAT32, false, 8, Content::heavy_tail),
               tensor(1, 1000, GMTK_FLOAT32, GMTK_FLOAT32)};
  run_case(c, stream.get(), 1);
  finish_test();
}

TEST_CASE(
    "sizes 65537, 2^18 + 3 fp32 and 2^21 + 5 bf16 per tensor take the multi-block paths in both scopes and "
    "mask modes",
    "[step]") {
  TestStream stream;
  const int64_t fp32_large = (int64_t{1} << 18) + 3;
  const int64_t bf16_large = (int64_t{1} << 21) + 5;
  {
    Case c;
    c.name = "large sets A: per-tensor mask-grad, global freeze";
    c.seed = 900;
    c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
                with_mask(sgd(0.05, 0.9, 0.1, false, 0.001), 0.99, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE)};
    c.tensors = {tensor(0, bf16_large, GMTK_BFLOAT16, GMTK_BFLOAT16, true, 2),
                 tensor(0, 65537, GMTK_FLOAT32, GMTK_FLOAT32, false, 4),
                 tensor(1, fp32_large, GMTK_FLOAT32, GMTK_FLOAT32, false, 4, Content::heavy_tail),
                 tensor(1, fp32_large, GMTK_FLOAT32, GMTK_FLOAT16, true, 8)};
    run_case(c, stream.get(), 2);
  }
  {
    Case c;
    c.name = "large sets B: global mask-grad, per-tensor freeze";
    c.seed = 901;
    c.groups = {with_mask(adam(5e-3, 0.01, true), 0.5, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD),
                with_mask(adamw(1e-2, 0.1), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE)};
    c.tensors = {tensor(0, bf16_large, GMTK_BFLOAT16, GMTK_FLOAT16, false, 6),
                 tensor(0, 65537, GMTK_BFLOAT16, GMTK_BFLOAT16, false, 4),
                 tensor(1, bf16_large, GMTK_BFLOAT16, GMTK_FLOAT32, false, 2, Content::heavy_tail),
                 tensor(1, 65537, GMTK_FLOAT16, GMTK_FLOAT16, true, 2)};
    c.device_counter = true;
    c.first_step = 10;
    c.plan_owned_workspace = true;
    run_case(c, stream.get(), 2);
  }
  finish_test();
}

TEST_CASE("gradients full of ties at ratio 0.9: all equal, 90% zeros, two values, 256 values, in every dtype",
          "[step]") {
  TestStream stream;
  uint64_t seed = 1000;
  for (gmtkDtype_t dtype : kDtypes) {
    for (Content content : {Content::all_equal, Content::mostly_zeros, Content::two_values, Content::quantized_256}) {
      Case c;
      c.name = std::string("ties: ") + content_name(content) + ", " + dtype_name(dtype);
      c.seed = seed++;
      c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
                  with_mask(sgd(0.05, 0.9, 0.0, false, 0.0), 0.9, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE),
                  with_mask(adam(1e-2, 0.0), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE)};
      for (int32_t g = 0; g < 3; ++g) {
        c.tensors.push_back(tensor(g, 20000, dtype, GMTK_FLOAT32, false, 4, content));
        c.tensors.push_back(tensor(g, 4097, dtype, GMTK_BFLOAT16, g == 1, 2, content));
        c.tensors.push_back(tensor(g, 1, dtype, GMTK_FLOAT16, false, 6, content));
      }
      for (TensorSpec& spec : c.tensors) spec.scale = default_scale(content);
      c.device_counter = true;
      c.first_step = 10;
      run_case(c, stream.get(), 1);
    }
  }
  {  // Ties on the multi-block paths.
    Case c;
    c.name = "ties on large sets";
    c.seed = 1100;
    c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE),
                with_mask(adam(1e-2, 0.0), 0.9, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD)};
    c.tensors = {tensor(0, (int64_t{1} << 18) + 3, GMTK_FLOAT32, GMTK_FLOAT32, false, 4, Content::all_equal),
                 tensor(1, (int64_t{1} << 21) + 5, GMTK_BFLOAT16, GMTK_BFLOAT16, true, 2, Content::mostly_zeros)};
    run_case(c, stream.get(), 1);
  }
  finish_test();
}

TEST_CASE("plans of 1, 3, 300 and 20000 tensors in several groups mixing optimizers", "[step]") {
  TestStream stream;
  std::mt19937_64 rng(1200);
  const std::vector<gmtkGroupConfig_t> paths = optimizer_paths();
  {
    Case c;
    c.name = "1 tensor, fp16 + master, global";
    c.seed = 1201;
    c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD)};
    c.tensors = {tensor(0, 100003, GMTK_FLOAT16, GMTK_FLOAT16, true, 2, Content::heavy_tail)};
    run_case(c, stream.get(), 2);
  }
  {
    Case c;
    c.name = "3 tensors, SGD nesterov per-tensor and Adam amsgrad global";
    c.seed = 1203;
    c.groups = {with_mask(sgd(0.05, 0.9, 0.0, true, 0.01), 0.5, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE),
                with_mask(adam(1e-2, 0.0, true), 0.99, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD)};
    c.tensors = {tensor(0, 50000, GMTK_FLOAT32, GMTK_FLOAT32, false, 8), tensor(0, 3, GMTK_FLOAT16, GMTK_FLOAT32),
                 tensor(1, 70001, GMTK_BFLOAT16, GMTK_BFLOAT16, false, 4, Content::quantized_256)};
    c.workspace_misalign = 1;
    run_case(c, stream.get(), 2);
  }
  {
    // 300 tensors, log-uniform sizes 0 .. 20000, one group per optimizer path
    // with its own scope, mode and ratio; per-tensor groups mix dtypes.
    Case c;
    c.name = "300 tensors, 11 groups";
    c.seed = 1300;
    const double ratios[] = {0.9, 0.5, 0.99, 0.3, 1.0, 0.0, 0.9, 0.5, 0.99, 0.3, 0.9};
    for (size_t g = 0; g < paths.size(); ++g) {
      c.groups.push_back(with_mask(paths[g], ratios[g], g % 3 == 1 ? GMTK_SCOPE_GLOBAL : GMTK_SCOPE_PER_TENSOR,
                                   g % 2 == 0 ? GMTK_MASK_GRAD : GMTK_MASK_FREEZE));
    }
    std::uniform_real_distribution<double> log_size(0.0, std::log(20001.0));
    for (size_t t = 0; t < 300; ++t) {
      const size_t g = t % paths.size();
      const bool global = c.groups[g].scope == GMTK_SCOPE_GLOBAL;
      const gmtkDtype_t grad = global ? kDtypes[g % 3] : kDtypes[(t / paths.size()) % 3];
      const gmtkDtype_t param = kDtypes[(t / 3) % 3];
      const auto numel = static_cast<int64_t>(std::floor(std::exp(log_size(rng)))) - 1;
      c.tensors.push_back(tensor(static_cast<int32_t>(g), numel, grad, param, t % 2 == 0, start_offset(t),
                                 kFiniteContents[(t / paths.size()) % 10]));
    }
    c.plan_owned_workspace = true;
    run_case(c, stream.get(), 2);
  }
  {
    // 20000 small tensors of 0 .. 300 entries, four groups.
    Case c;
    c.name = "20000 tensors, 4 groups";
    c.seed = 1400;
    c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
                with_mask(sgd(0.05, 0.9, 0.1, false, 0.0), 0.5, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE),
                with_mask(adam(1e-2, 0.0, true), 0.3, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE),
                with_mask(sgd(0.1, 0.0, 0.0, false, 0.0), 0.99, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD)};
    std::uniform_int_distribution<int64_t> small_size(0, 300);
    for (size_t t = 0; t < 20000; ++t) {
      const auto group = static_cast<int32_t>(t % 4);
      const gmtkDtype_t grad = group == 1 ? GMTK_BFLOAT16 : group == 3 ? GMTK_FLOAT32 : kDtypes[(t / 4) % 3];
      const gmtkDtype_t param = kDtypes[(t / 12) % 3];
      c.tensors.push_back(
          tensor(group, small_size(rng), grad, param, t % 8 < 4, start_offset(t / 4), kFiniteContents[(t / 4) % 10]));
    }
    c.device_counter = true;
    run_case(c, stream.get(), 2);
  }
  finish_test();
}

TEST_CASE(
    "a caller workspace filled with garbage before every call, at any address, and a plan-owned workspace give "
    "the same bits",
    "[step]") {
  TestStream stream;
  struct Mode {
    const char* what;
    bool plan_owned;
    size_t misalign;
  };
  const Mode modes[] = {{"caller's workspace", false, 0},
                        {"caller's workspace at +100 bytes", false, 100},
                        {"plan-owned workspace", true, 0}};
  std::vector<std::vector<std::vector<unsigned char>>> results;  // per mode, per step: the bytes after the step
  for (const Mode& mode : modes) {
    Case c;
    c.name = std::string("workspace: ") + mode.what;
    c.seed = 1500;  // the same case each time
    c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
                with_mask(adam(1e-2, 0.0, true), 0.5, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE)};
    c.tensors = {tensor(0, 100000, GMTK_FLOAT32, GMTK_FLOAT32, false, 4),
                 tensor(0, 5000, GMTK_FLOAT16, GMTK_FLOAT16, true, 2),
                 tensor(1, 30001, GMTK_BFLOAT16, GMTK_BFLOAT16, false, 6),
                 tensor(1, (int64_t{1} << 18) + 3, GMTK_BFLOAT16, GMTK_FLOAT32, false, 2)};
    c.plan_owned_workspace = mode.plan_owned;
    c.workspace_misalign = mode.misalign;
    c.device_counter = true;
    lay_out(c);
    Differential run(c, stream.get());
    results.emplace_back();
    for (int s = 0; s < 3; ++s) {
      if (s > 0) run.refill_gradients(1500u + static_cast<uint64_t>(s));
      results.back().push_back(run.step(mode.what).got);
    }
  }
  for (size_t m = 1; m < results.size(); ++m) {
    for (size_t s = 0; s < 3; ++s) {
      INFO(modes[m].what << " vs " << modes[0].what << ", step " << s);
      const auto& want = results[0][s];
      const auto& got = results[m][s];
      REQUIRE(want.size() == got.size());
      size_t differing = 0;
      for (size_t b = 0; b < want.size(); ++b) differing += want[b] != got[b] ? 1 : 0;
      INFO(differing << " bytes differ");
      CHECK(differing == 0);
    }
  }
  finish_test();
}

TEST_CASE("gmtkStep queues its work on the caller's non-blocking stream and does not wait for it", "[step]") {
  if (!cuda_under_test()) {
    SUCCEED("stream order needs CUDA; the host self-check skips it");
    return;
  }
  Stream stream;
  Case c;
  c.name = "stream order";
  c.seed = 1600;
  c.groups = {with_mask(adamw(1e-2, 0.01), 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_GRAD),
              with_mask(sgd(0.05, 0.9, 0.0, false, 0.0), 0.5, GMTK_SCOPE_GLOBAL, GMTK_MASK_FREEZE)};
  c.tensors = {tensor(0, 20000, GMTK_FLOAT32, GMTK_FLOAT32), tensor(0, 3000, GMTK_FLOAT16, GMTK_FLOAT16, true, 2),
               tensor(1, 5000, GMTK_BFLOAT16, GMTK_FLOAT32, false, 4)};
  c.device_counter = true;
  c.lr_on_device = true;
  c.use_inv_scale = true;
  c.inv_scale = 0.5f;
  lay_out(c);
  std::vector<unsigned char> before = initial_bytes(c);
  reset_outputs(c, before);
  const std::vector<unsigned char> cpu = reference_step(c, before, 0);

  Side cuda(c, GMTK_BACKEND_CUDA, stream.get(), false);
  cuda.upload(before);
  cuda.scramble_workspace(1);
  // Hold the stream at a gate, queue the step behind it, look at device
  // memory through the legacy stream (which does not wait for a non-blocking
  // stream), then open the gate.
  Gate gate;
  GPU_CUDA_OK(cudaLaunchHostFunc(stream.get(), hold_stream_until_open, &gate));
  const gmtkStatus_t status = cuda.launch(0);
  const std::string message = status == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage();
  const bool returned_while_held = !gate.timed_out.load();
  std::vector<unsigned char> peeked(c.arena_bytes);
  const cudaError_t peek = cudaMemcpy(peeked.data(), cuda.base(), peeked.size(), cudaMemcpyDeviceToHost);
  gate.open = true;
  cuda.sync();
  {
    INFO("gmtkStep: " << gmtkGetErrorString(status) << ": " << message);
    REQUIRE(status == GMTK_SUCCESS);
  }
  {
    INFO("gmtkStep returned only after the held stream ran on by itself: it waited for the stream");
    CHECK(returned_while_held);
  }
  {
    INFO("reading device memory through the legacy stream: " << cudaGetErrorString(peek));
    REQUIRE(peek == cudaSuccess);
  }
  {
    size_t differing = 0;
    for (size_t b = 0; b < before.size(); ++b) differing += before[b] != peeked[b] ? 1 : 0;
    INFO("bytes written before the caller's stream reached the step (work on another stream): " << differing);
    CHECK(differing == 0);
  }
  const std::vector<unsigned char> got = cuda.download();
  const Verdict verdict =
      compare_step(c, before.data(), cpu.data(), got.data(), [&]() { return shadow_fp32_params(c, before, 0); });
  expect_clean(verdict, describe(c) + "\nthe step queued behind the gate");
  finish_test();
}
