// Mask schedules (SPEC section 8; docs/semantics.md, "Mask schedules") on the
// CUDA backend against the CPU reference backend, the oracle. Both backends get
// the same plan over the same starting bytes and make the same call; then
//  - found_inf, thresholds, kept_counts and the mask_bits words are bitwise
//    equal, and so are gradients after gmtkMaskGradients;
//  - every updated fp32 value of gmtkStep is within 4 ulp of the reference's,
//    a 16-bit param with a master is the nearest-even rounding of its own
//    master, one without is within one 16-bit ulp of the reference's
//    (docs/semantics.md, "CPU reference versus CUDA");
//  - both backends change the same entries in a step (up to updates that the
//    4 ulp bound cannot tell from no update);
// and both are held against a model of the contract computed here from the
// bytes alone (no code is shared with host/ or kernels/):
//  - selection: T is the k-th largest key, k = n - floor(r * n), ties kept,
//    r = 0 keeps all with T = 0, k = 0 keeps none with T = +inf;
//  - given thresholds: T taken to the key's dtype by rounding UP (the smallest
//    key whose value is >= T), T <= 0 keeps all, NaN keeps no non-NaN entry;
//    the thresholds output is the value of the key used (NaN for a NaN T);
//  - given bitmaps: exactly the set bits are kept, bits past a tensor's end
//    are ignored; thresholds are NaN, kept_counts the set bits;
//  - mask_bits out: entry j of tensor i is bit j % 32 of word
//    word_offsets[i] + j / 32, bits past each tensor's end written 0 (the
//    output buffer starts as all-ones garbage);
//  - scores choose the mask (their keys, their dtype), found_inf only looks
//    at the gradients; a non-finite gradient makes a step a no-op but every
//    output is still written;
//  - freeze: an entry the mask clears keeps every bit of param, master and
//    state; inputs, unrequested outputs and the bytes around every buffer
//    keep their bits.
//
// Tags: [mask_schedule] on every test; [small] on the ones cheap enough for
// compute-sanitizer. Like step_tests.cpp, the file can be run with the CPU
// reference on both sides (mask_schedule_tests::g_cpu_reference_under_test),
// which checks the model and the harness on a machine without a GPU.
#include "gpu_test_support.h"

#include <gmtk/gmtk.h>

#include <catch2/catch.hpp>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace mask_schedule_tests {
// The backend held against the CPU reference: CUDA, unless a host harness sets
// this to run every test with the CPU reference on both sides.
bool g_cpu_reference_under_test = false;
}  // namespace mask_schedule_tests

namespace gpu_test {
namespace {

bool cuda_under_test() { return !mask_schedule_tests::g_cpu_reference_under_test; }
gmtkBackend_t backend_under_test() { return cuda_under_test() ? GMTK_BACKEND_CUDA : GMTK_BACKEND_CPU_REFERENCE; }
const char* under_test_name() { return cuda_under_test() ? "CUDA" : "CPU(self-check)"; }

constexpr uint64_t kUlpBound = 4;  // fp32 values after one step (docs/semantics.md)
// Padding and every output start as all-ones: a NaN threshold and found_inf, a
// kept count of -1, bitmap words with every bit set (so that tail bits left
// unwritten are seen), and NaN in every dtype around the gradients.
constexpr unsigned char kPadByte = 0xFF;
constexpr size_t kGuardBytes = 64;
constexpr uint32_t kPositiveInfinity = 0x7F800000u;

// ---- Floats and ulps -----------------------------------------------------------------

// The same for 16-bit values of one format.
uint64_t ulp_distance_16(uint32_t a, uint32_t b, gmtkDtype_t dtype) {
  const bool a_nan = key_is_nan(dtype, a & 0x7FFFu), b_nan = key_is_nan(dtype, b & 0x7FFFu);
  if (a_nan || b_nan) return a_nan && b_nan ? 0 : std::numeric_limits<uint64_t>::max();
  auto position = [](uint32_t bits) {
    return (bits & 0x8000u) != 0 ? -static_cast<int64_t>(bits & 0x7FFFu) : static_cast<int64_t>(bits & 0x7FFFu);
  };
  const int64_t difference = position(a) - position(b);
  return static_cast<uint64_t>(difference < 0 ? -difference : difference);
}


// The key a given threshold T > 0 (not NaN) is taken to in `dtype`: the
// smallest key whose value is >= T (docs/semantics.md: "rounding up").
uint32_t rounded_up_key(float threshold, gmtkDtype_t dtype) {
  if (dtype == GMTK_FLOAT32) return bits_of(threshold);
  const Format16& format = format_of(dtype);
  uint32_t key = narrow_to_16(threshold, format) & 0x7FFFu;
  if (widen_from_16(static_cast<uint16_t>(key), format) < threshold) ++key;  // max finite + 1 is +inf
  return key;
}

// ---- What a case holds ---------------------------------------------------------------

struct TensorDef {
  int32_t group = 0;
  int64_t numel = 0;
  gmtkDtype_t grad_dtype = GMTK_FLOAT32;
  Content content = Content::gaussian;
  float scale = 1e-2f;  // gradient magnitude as stored
  size_t misalign = 0;  // elements past a 256-byte boundary, in each of the tensor's buffers
  gmtkDtype_t param_dtype = GMTK_FLOAT32;
  bool master = false;  // fp32 master weights (16-bit params only)
  bool score = false;   // a score buffer chooses the mask
  gmtkDtype_t score_dtype = GMTK_FLOAT32;
  Content score_content = Content::gaussian;
  float score_scale = 1.0f;
};

TensorDef grad_tensor(int32_t group, int64_t numel, gmtkDtype_t dtype, size_t misalign = 0,
                      Content content = Content::gaussian) {
  TensorDef def;
  def.group = group;
  def.numel = numel;
  def.grad_dtype = dtype;
  def.misalign = misalign;
  def.content = content;
  def.scale = default_scale(content);
  return def;
}
TensorDef with_param(TensorDef def, gmtkDtype_t param_dtype, bool master) {
  def.param_dtype = param_dtype;
  def.master = master && param_dtype != GMTK_FLOAT32;
  return def;
}
TensorDef with_score(TensorDef def, gmtkDtype_t score_dtype, Content content = Content::gaussian, float scale = 1.0f) {
  def.score = true;
  def.score_dtype = score_dtype;
  def.score_content = content;
  def.score_scale = scale;
  return def;
}
// The dtype of the keys the mask is chosen on.
gmtkDtype_t key_dtype(const TensorDef& def) { return def.score ? def.score_dtype : def.grad_dtype; }

gmtkGroupConfig_t group_of(gmtkOptimizer_t optimizer, double ratio, gmtkScope_t scope, gmtkMaskMode_t mode) {
  gmtkGroupConfig_t group;
  GPU_GMTK_OK(gmtkGroupConfigInit(&group, optimizer));
  if (optimizer == GMTK_OPTIMIZER_SGD) {
    group.lr = 1e-2;
    group.momentum = 0.9;
    group.weight_decay = 1e-3;
  }
  if (optimizer == GMTK_OPTIMIZER_ADAM) {
    group.weight_decay = 1e-2;
    group.amsgrad = 1;
  }
  group.mask_ratio = ratio;
  group.scope = scope;
  group.mask_mode = mode;
  return group;
}

// The buffers of a tensor, in arena order.
enum class Buf { grad, score, param, master, exp_avg, exp_avg_sq, max_exp_avg_sq };
constexpr int kBufs = 7;
constexpr Buf kValueBufs[] = {Buf::param, Buf::master, Buf::exp_avg, Buf::exp_avg_sq, Buf::max_exp_avg_sq};

const char* buf_name(Buf buf) {
  switch (buf) {
    case Buf::grad: return "grad";
    case Buf::score: return "score";
    case Buf::param: return "param";
    case Buf::master: return "master_param";
    case Buf::exp_avg: return "exp_avg";
    case Buf::exp_avg_sq: return "exp_avg_sq";
    case Buf::max_exp_avg_sq: return "max_exp_avg_sq";
  }
  return "?";
}

bool needs(const gmtkGroupConfig_t& group, const TensorDef& def, Buf buf) {
  const bool adam = group.optimizer != GMTK_OPTIMIZER_SGD;
  switch (buf) {
    case Buf::grad:
    case Buf::param: return true;
    case Buf::score: return def.score;
    case Buf::master: return def.master;
    case Buf::exp_avg: return adam || group.momentum != 0.0;
    case Buf::exp_avg_sq: return adam;
    case Buf::max_exp_avg_sq: return adam && group.amsgrad != 0;
  }
  return false;
}

// One buffer inside a case's arena (the same offsets on host and device).
struct Region {
  std::string name;
  size_t offset = 0;  // from the arena's start, which is 256-byte aligned
  size_t count = 0;   // entries
  size_t width = 0;   // bytes per entry
  gmtkDtype_t dtype = GMTK_FLOAT32;
  size_t bytes() const { return count * width; }
};

struct Setup {
  std::string name;
  uint64_t seed = 1;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<TensorDef> tensors;
  // Set by lay_out().
  std::vector<Region> regions;
  std::vector<std::array<int, kBufs>> buffers;  // region index per tensor and Buf, -1: none
  int found_inf = -1, thresholds = -1, kept_counts = -1, given_thresholds = -1, mask_out = -1, given_bits = -1;
  std::vector<uint64_t> word_offsets;  // the documented layout: each tensor's first word
  uint64_t words = 0;
  size_t arena_bytes = 0;

  const Region& region(int index) const { return regions[static_cast<size_t>(index)]; }
  const Region* buffer(size_t t, Buf buf) const {
    const int index = buffers[t][static_cast<size_t>(buf)];
    return index < 0 ? nullptr : &regions[static_cast<size_t>(index)];
  }
  const gmtkGroupConfig_t& group_of_tensor(size_t t) const {
    return groups[static_cast<size_t>(tensors[t].group)];
  }
};

void lay_out(Setup& s) {
  s.regions.clear();
  s.buffers.clear();
  s.word_offsets.clear();
  size_t cursor = 0;
  auto place = [&](std::string name, size_t count, size_t width, gmtkDtype_t dtype, size_t misalign_elements) {
    const size_t start = round_up(cursor, 256) + misalign_elements * width;
    s.regions.push_back(Region{std::move(name), start, count, width, dtype});
    cursor = start + count * width + kGuardBytes;
    return static_cast<int>(s.regions.size() - 1);
  };
  const size_t n = s.tensors.size();
  s.words = 0;
  for (const TensorDef& def : s.tensors) {
    s.word_offsets.push_back(s.words);
    s.words += static_cast<uint64_t>((def.numel + 31) / 32);
  }
  // The outputs and inputs of a call, at small odd-ish offsets.
  s.found_inf = place("found_inf", 1, 4, GMTK_FLOAT32, 1);
  s.thresholds = place("thresholds", n, 4, GMTK_FLOAT32, 3);
  s.kept_counts = place("kept_counts", n, 8, GMTK_FLOAT32, 1);
  s.given_thresholds = place("given_thresholds", n, 4, GMTK_FLOAT32, 2);
  s.mask_out = place("mask_bits", static_cast<size_t>(s.words), 4, GMTK_FLOAT32, 1);
  s.given_bits = place("given_mask_bits", static_cast<size_t>(s.words), 4, GMTK_FLOAT32, 3);
  for (size_t t = 0; t < n; ++t) {
    const TensorDef& def = s.tensors[t];
    REQUIRE(def.group >= 0);
    REQUIRE(static_cast<size_t>(def.group) < s.groups.size());
    std::array<int, kBufs> indexes;
    indexes.fill(-1);
    for (int b = 0; b < kBufs; ++b) {
      const auto buf = static_cast<Buf>(b);
      if (!needs(s.group_of_tensor(t), def, buf)) continue;
      const gmtkDtype_t dtype = buf == Buf::grad    ? def.grad_dtype
                                : buf == Buf::score ? def.score_dtype
                                : buf == Buf::param ? def.param_dtype
                                                    : GMTK_FLOAT32;
      indexes[static_cast<size_t>(b)] = place(std::string(buf_name(buf)) + " of tensor " + std::to_string(t),
                                              static_cast<size_t>(def.numel), element_size(dtype), dtype, def.misalign);
    }
    s.buffers.push_back(indexes);
  }
  s.arena_bytes = round_up(cursor, 256) + 256;
}

// ---- Reading and writing an arena ------------------------------------------------------

// bits_at, put_value, int64_at, ...: gpu_test_support.h.
uint32_t word_at(const unsigned char* arena, const Region& r, uint64_t w) {
  uint32_t word;
  std::memcpy(&word, arena + r.offset + 4 * w, 4);
  return word;
}
void put_word(unsigned char* arena, const Region& r, uint64_t w, uint32_t word) {
  std::memcpy(arena + r.offset + 4 * w, &word, 4);
}
// Entry j of tensor t in a bitmap region, by the documented layout.
bool bit_at(const unsigned char* arena, const Setup& s, const Region& bitmap, size_t t, int64_t j) {
  const uint64_t word = s.word_offsets[t] + static_cast<uint64_t>(j) / 32;
  return ((word_at(arena, bitmap, word) >> (j % 32)) & 1u) != 0;
}
// The key of entry i of tensor t (the score's, when the tensor has one).
uint32_t key_at(const Setup& s, const unsigned char* arena, size_t t, size_t i) {
  const Region& r = *s.buffer(t, s.tensors[t].score ? Buf::score : Buf::grad);
  return key_of_bits(r.dtype, bits_at(arena, r, i));
}

// The starting bytes: gradients and scores from their contents, params ~
// N(0, 0.5), moments of a gradient's size, every output and input all-ones.
std::vector<unsigned char> initial_bytes(const Setup& s, uint64_t seed) {
  std::vector<unsigned char> arena(s.arena_bytes, kPadByte);
  unsigned char* a = arena.data();
  for (size_t t = 0; t < s.tensors.size(); ++t) {
    const TensorDef& def = s.tensors[t];
    fill_gradient(a + s.buffer(t, Buf::grad)->offset, def.grad_dtype, def.numel, def.content, def.scale,
                  seed * 1000003u + t);
    if (def.score) {
      fill_gradient(a + s.buffer(t, Buf::score)->offset, def.score_dtype, def.numel, def.score_content,
                    def.score_scale, seed * 7777777u + t + 99u);
    }
    std::mt19937_64 rng(seed * 7919u + t * 104729u + 17u);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    const Region* param = s.buffer(t, Buf::param);
    const Region* master = s.buffer(t, Buf::master);
    const Region* m = s.buffer(t, Buf::exp_avg);
    const Region* v = s.buffer(t, Buf::exp_avg_sq);
    const Region* v_max = s.buffer(t, Buf::max_exp_avg_sq);
    for (size_t i = 0; i < param->count; ++i) {
      const float p = 0.5f * normal(rng);
      put_value(a, *param, i, p);
      if (master != nullptr) put_value(a, *master, i, p);
      const float root = 1e-3f * normal(rng);
      if (m != nullptr) put_value(a, *m, i, 1e-3f * normal(rng));
      if (v != nullptr) put_value(a, *v, i, root * root);
      if (v_max != nullptr) put_value(a, *v_max, i, root * root * (1.0f + uniform(rng)));
    }
  }
  return arena;
}

// Puts one value into tensor t's gradient (an inf, say) at entry i.
void plant_gradient(const Setup& s, std::vector<unsigned char>& arena, size_t t, size_t i, float value) {
  const Region& r = *s.buffer(t, Buf::grad);
  REQUIRE(i < r.count);
  put_value(arena.data(), r, i, value);
}

// ---- Descriptions ------------------------------------------------------------------------

const char* optimizer_name(gmtkOptimizer_t optimizer) {
  return optimizer == GMTK_OPTIMIZER_ADAMW ? "AdamW" : optimizer == GMTK_OPTIMIZER_ADAM ? "Adam(amsgrad)" : "SGD";
}

std::string tensor_label(const Setup& s, size_t t) {
  const TensorDef& def = s.tensors[t];
  std::ostringstream out;
  out << "tensor " << t << " (group " << def.group << ", grad " << dtype_name(def.grad_dtype) << " "
      << content_name(def.content);
  if (def.score) out << ", score " << dtype_name(def.score_dtype) << " " << content_name(def.score_content);
  out << ", param " << dtype_name(def.param_dtype) << (def.master ? "+master" : "") << ", numel " << def.numel
      << ", start +" << def.misalign << " elements)";
  return out.str();
}

std::string describe(const Setup& s) {
  std::ostringstream out;
  out << "case '" << s.name << "': " << s.tensors.size() << " tensors, " << s.words << " bitmap words";
  for (size_t g = 0; g < s.groups.size(); ++g) {
    const gmtkGroupConfig_t& group = s.groups[g];
    out << "\n  group " << g << ": " << optimizer_name(group.optimizer) << ", "
        << (group.scope == GMTK_SCOPE_GLOBAL ? "global" : "per-tensor") << ", "
        << (group.mask_mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad") << ", mask_ratio " << group.mask_ratio;
  }
  for (size_t t = 0; t < s.tensors.size() && t < 12; ++t) out << "\n  " << tensor_label(s, t);
  if (s.tensors.size() > 12) out << "\n  ...";
  return out.str();
}

// ---- One call ------------------------------------------------------------------------------

enum class Op { step, select, mask };

struct Call {
  Op op = Op::step;
  bool given_thresholds = false;
  bool given_bits = false;
  bool mask_out = true;  // request the bitmap output
};

std::string call_text(const Call& call) {
  std::string text = call.op == Op::step ? "gmtkStep" : call.op == Op::select ? "gmtkSelectThresholds" : "gmtkMaskGradients";
  text += call.given_thresholds ? " with given_thresholds" : call.given_bits ? " with given_mask_bits" : " (selecting)";
  text += call.mask_out ? ", mask_bits out" : ", no mask_bits out";
  return text;
}

// BackendMemory: gpu_test_support.h.

// One backend's plan over its own copy of the arena, with a caller's
// workspace that holds garbage before every call.
class Side {
 public:
  Side(const Setup& s, gmtkBackend_t backend, cudaStream_t stream)
      : s_(s),
        stream_(backend == GMTK_BACKEND_CUDA ? stream : nullptr),
        backend_(backend),
        handle_(backend),
        memory_(backend, s.arena_bytes) {
    std::vector<gmtkTensor_t> tensors;
    for (size_t t = 0; t < s.tensors.size(); ++t) {
      const TensorDef& def = s.tensors[t];
      // A tensor of 0 entries gets NULL pointers, but for its score: a NULL
      // score is no score, and its dtype still decides how a given threshold
      // is rounded (and reported).
      auto pointer = [&](Buf buf) -> void* {
        const Region* r = s.buffer(t, buf);
        return r == nullptr || (def.numel == 0 && buf != Buf::score) ? nullptr : memory_.data() + r->offset;
      };
      gmtkTensor_t record{};
      record.group = def.group;
      record.numel = def.numel;
      record.grad_dtype = def.grad_dtype;
      record.grad = pointer(Buf::grad);
      record.param_dtype = def.param_dtype;
      record.param = pointer(Buf::param);
      record.master_param = static_cast<float*>(pointer(Buf::master));
      record.exp_avg = static_cast<float*>(pointer(Buf::exp_avg));
      record.exp_avg_sq = static_cast<float*>(pointer(Buf::exp_avg_sq));
      record.max_exp_avg_sq = static_cast<float*>(pointer(Buf::max_exp_avg_sq));
      if (def.score) {
        record.score = pointer(Buf::score);
        record.score_dtype = def.score_dtype;
      }
      tensors.push_back(record);
    }
    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = s.groups.data();
    config.num_groups = static_cast<int32_t>(s.groups.size());
    config.tensors = tensors.empty() ? nullptr : tensors.data();
    config.num_tensors = static_cast<int64_t>(tensors.size());
    GPU_GMTK_OK(gmtkPlanCreate(handle_.handle, &config, &plan_));
    GPU_GMTK_OK(gmtkPlanGetWorkspaceSize(plan_, &workspace_bytes_));
    if (workspace_bytes_ > 0) workspace_ = std::make_unique<BackendMemory>(backend, workspace_bytes_);
  }
  ~Side() { gmtkPlanDestroy(plan_); }
  Side(const Side&) = delete;
  Side& operator=(const Side&) = delete;

  gmtkPlan_t plan() const { return plan_; }

  void upload(const std::vector<unsigned char>& bytes) {
    REQUIRE(bytes.size() == s_.arena_bytes);
    memory_.write(0, bytes.data(), bytes.size(), stream_);
    memory_.wait(stream_);
  }
  std::vector<unsigned char> download() {
    std::vector<unsigned char> bytes(s_.arena_bytes);
    memory_.read(0, bytes.data(), bytes.size(), stream_);
    return bytes;
  }
  // The workspace's contents need not survive between calls (docs/api.md).
  void scramble_workspace(uint64_t seed) {
    if (workspace_ == nullptr) return;
    std::vector<unsigned char> garbage(workspace_bytes_);
    std::mt19937_64 rng(seed);
    for (unsigned char& byte : garbage) byte = static_cast<unsigned char>(rng());
    workspace_->write(0, garbage.data(), garbage.size(), stream_);
    workspace_->wait(stream_);
  }

  gmtkStatus_t call(const Call& c) {
    unsigned char* base = memory_.data();
    auto at = [&](int region) { return base + s_.region(region).offset; };
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step = 1;
    args.found_inf = reinterpret_cast<float*>(at(s_.found_inf));
    if (!s_.tensors.empty()) {
      args.thresholds = reinterpret_cast<float*>(at(s_.thresholds));
      args.kept_counts = reinterpret_cast<int64_t*>(at(s_.kept_counts));
      if (c.given_thresholds) args.given_thresholds = reinterpret_cast<const float*>(at(s_.given_thresholds));
    }
    if (s_.words > 0) {
      if (c.mask_out) args.mask_bits = reinterpret_cast<uint32_t*>(at(s_.mask_out));
      if (c.given_bits) args.given_mask_bits = reinterpret_cast<const uint32_t*>(at(s_.given_bits));
    }
    void* workspace = workspace_ == nullptr ? nullptr : workspace_->data();
    const gmtkStatus_t status =
        c.op == Op::step     ? gmtkStep(plan_, &args, workspace, workspace_bytes_, stream_)
        : c.op == Op::select ? gmtkSelectThresholds(plan_, &args, workspace, workspace_bytes_, stream_)
                             : gmtkMaskGradients(plan_, &args, workspace, workspace_bytes_, stream_);
    if (backend_ == GMTK_BACKEND_CUDA && status == GMTK_SUCCESS) GPU_CUDA_OK(cudaStreamSynchronize(stream_));
    return status;
  }

 private:
  const Setup& s_;
  cudaStream_t stream_;
  gmtkBackend_t backend_;
  HandleOwner handle_;
  BackendMemory memory_;
  gmtkPlan_t plan_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::unique_ptr<BackendMemory> workspace_;
};

// ---- The model of a call ------------------------------------------------------------------

enum Keep : int8_t { kMasked = 0, kKept = 1, kUnknown = 2 };  // unknown: a NaN key against a NaN threshold
enum class ThresholdRule { exact, nan, not_modelled };

struct Expected {
  bool found_inf = false;
  std::vector<std::vector<int8_t>> keep;  // per tensor and entry
  std::vector<ThresholdRule> threshold_rule;
  std::vector<uint32_t> threshold_bits;  // when the rule is exact
};

// The float value of a key of `dtype`, as the thresholds output reports it.
uint32_t reported_bits(gmtkDtype_t dtype, uint32_t key) { return bits_of(value_of_bits(dtype, key)); }

// What the contract says a call writes, from its starting bytes.
Expected expect(const Setup& s, const unsigned char* before, const Call& call) {
  const size_t n = s.tensors.size();
  Expected e;
  e.keep.resize(n);
  e.threshold_rule.assign(n, ThresholdRule::exact);
  e.threshold_bits.assign(n, 0u);
  for (size_t t = 0; t < n; ++t) {
    e.keep[t].assign(static_cast<size_t>(s.tensors[t].numel), kMasked);
    const Region& grad = *s.buffer(t, Buf::grad);
    for (size_t i = 0; i < grad.count; ++i) {
      e.found_inf |= key_of_bits(grad.dtype, bits_at(before, grad, i)) >= infinity_key(grad.dtype);
    }
  }

  if (call.given_bits) {  // exactly the set bits; no threshold decided the mask
    const Region& bits = s.region(s.given_bits);
    for (size_t t = 0; t < n; ++t) {
      e.threshold_rule[t] = ThresholdRule::nan;
      for (int64_t j = 0; j < s.tensors[t].numel; ++j) {
        e.keep[t][static_cast<size_t>(j)] = bit_at(before, s, bits, t, j) ? kKept : kMasked;
      }
    }
    return e;
  }

  if (call.given_thresholds) {  // T_i rounded up to the key dtype
    const Region& given = s.region(s.given_thresholds);
    for (size_t t = 0; t < n; ++t) {
      const float threshold = value_at(before, given, t);
      const gmtkDtype_t dtype = key_dtype(s.tensors[t]);
      for (size_t i = 0; i < e.keep[t].size(); ++i) {
        const uint32_t key = key_at(s, before, t, i);
        if (std::isnan(threshold)) {
          // That NaN in the dtype, above every non-NaN key; its order among
          // NaN keys depends on the payload, which only the CPU comparison pins.
          e.keep[t][i] = key_is_nan(dtype, key) ? kUnknown : kMasked;
        } else if (threshold <= 0.0f) {
          e.keep[t][i] = kKept;
        } else {
          e.keep[t][i] = key >= rounded_up_key(threshold, dtype) ? kKept : kMasked;
        }
      }
      if (std::isnan(threshold)) {
        e.threshold_rule[t] = ThresholdRule::nan;
      } else {
        // "reports the value of the key used": T <= 0 uses key 0, i.e. +0.
        e.threshold_bits[t] = threshold <= 0.0f ? 0u : reported_bits(dtype, rounded_up_key(threshold, dtype));
      }
    }
    return e;
  }

  // Selection: per tensor, or over each global group's tensors together.
  std::vector<std::vector<size_t>> sets;
  for (size_t g = 0; g < s.groups.size(); ++g) {
    std::vector<size_t> members;
    for (size_t t = 0; t < n; ++t) {
      if (s.tensors[t].group == static_cast<int32_t>(g)) members.push_back(t);
    }
    if (s.groups[g].scope == GMTK_SCOPE_GLOBAL) {
      if (!members.empty()) sets.push_back(members);
    } else {
      for (size_t t : members) sets.push_back({t});
    }
  }
  for (const std::vector<size_t>& set : sets) {
    const gmtkDtype_t dtype = key_dtype(s.tensors[set.front()]);
    std::vector<uint32_t> keys;
    for (size_t t : set) {
      INFO("the model needs one key dtype per global group");
      REQUIRE(key_dtype(s.tensors[t]) == dtype);
      for (size_t i = 0; i < e.keep[t].size(); ++i) keys.push_back(key_at(s, before, t, i));
    }
    const double ratio = s.group_of_tensor(set.front()).mask_ratio;
    const auto total = static_cast<int64_t>(keys.size());
    const auto masked = static_cast<int64_t>(std::floor(ratio * static_cast<double>(total)));
    const int64_t k = total - masked;
    uint32_t threshold_key = 0;  // keeps everything
    bool keep_none = false;
    uint32_t reported = 0u;  // +0 for an empty set or nothing masked
    ThresholdRule rule = ThresholdRule::exact;
    if (total > 0 && masked > 0) {
      if (k == 0) {
        keep_none = true;
        reported = kPositiveInfinity;
      } else {
        std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint32_t>());
        threshold_key = keys[static_cast<size_t>(k - 1)];
        if (key_is_nan(dtype, threshold_key)) {
          rule = ThresholdRule::nan;
        } else {
          reported = reported_bits(dtype, threshold_key);
        }
      }
    }
    for (size_t t : set) {
      e.threshold_rule[t] = rule;
      e.threshold_bits[t] = reported;
      for (size_t i = 0; i < e.keep[t].size(); ++i) {
        e.keep[t][i] = !keep_none && key_at(s, before, t, i) >= threshold_key ? kKept : kMasked;
      }
    }
  }
  return e;
}

// ---- Reports ---------------------------------------------------------------------------------

// Mismatches grouped by check: a count and the first few, described.
class Checks {
 public:
  // Counts a mismatch of a check; true when it is among the first few, which
  // the caller then describes with line().
  bool fail(const std::string& title) {
    Entry& entry = find(title);
    return ++entry.count <= kReportedMismatches;
  }
  void line(const std::string& title, const std::string& text) { find(title).lines += "\n    " + text; }
  size_t total() const {
    size_t sum = 0;
    for (const Entry& entry : entries_) sum += entry.count;
    return sum;
  }
  void expect_clean(const std::string& context) const {
    for (const Entry& entry : entries_) {
      INFO(context);
      INFO(entry.title << ": " << entry.count << " mismatch(es)"
                       << (entry.count > kReportedMismatches ? " (the first few)" : "") << entry.lines);
      CHECK(entry.count == 0);
    }
    CHECK(total() == 0);
  }

 private:
  struct Entry {
    std::string title;
    size_t count = 0;
    std::string lines;
  };
  Entry& find(const std::string& title) {
    for (Entry& entry : entries_) {
      if (entry.title == title) return entry;
    }
    entries_.push_back(Entry{title, 0, ""});
    return entries_.back();
  }
  std::vector<Entry> entries_;
};

struct Outcome {
  std::vector<unsigned char> before, cpu, got;
  Expected expected;
};

// Byte-exact comparison of one region between two arenas.
void compare_region(Checks& checks, const std::string& title, const Region& r, const unsigned char* want,
                    const char* want_name, const unsigned char* got, const char* got_name) {
  if (r.bytes() == 0 || std::memcmp(want + r.offset, got + r.offset, r.bytes()) == 0) return;
  for (size_t i = 0; i < r.count; ++i) {
    const bool same = r.width == 8 ? int64_at(want, r, i) == int64_at(got, r, i) : bits_at(want, r, i) == bits_at(got, r, i);
    if (same || !checks.fail(title)) continue;
    std::ostringstream line;
    line << r.name << " [" << i << "]: " << want_name << " ";
    if (r.width == 8) {
      line << int64_at(want, r, i) << ", " << got_name << " " << int64_at(got, r, i);
    } else {
      line << value_text(r.dtype, bits_at(want, r, i)) << ", " << got_name << " " << value_text(r.dtype, bits_at(got, r, i));
    }
    checks.line(title, line.str());
  }
}

// Bytes outside every region keep their bits.
void compare_padding(Checks& checks, const Setup& s, const unsigned char* before, const unsigned char* got,
                     const char* name) {
  std::vector<std::pair<size_t, size_t>> spans;
  for (const Region& r : s.regions) spans.emplace_back(r.offset, r.offset + r.bytes());
  std::sort(spans.begin(), spans.end());
  size_t from = 0;
  auto scan = [&](size_t begin, size_t end) {
    if (begin >= end || std::memcmp(before + begin, got + begin, end - begin) == 0) return;
    for (size_t b = begin; b < end; ++b) {
      if (before[b] != got[b] && checks.fail("bytes outside every buffer keep their bits")) {
        checks.line("bytes outside every buffer keep their bits", std::string(name) + ": arena byte " +
                                                                      std::to_string(b) + " " + hex_text(before[b]) +
                                                                      " became " + hex_text(got[b]));
      }
    }
  };
  for (const auto& span : spans) {
    scan(from, span.first);
    from = std::max(from, span.second);
  }
  scan(from, s.arena_bytes);
}

// Whether entry i of tensor t has any param, master or state bit changed.
bool entry_changed(const Setup& s, size_t t, size_t i, const unsigned char* before, const unsigned char* after) {
  for (Buf buf : kValueBufs) {
    const Region* r = s.buffer(t, buf);
    if (r != nullptr && bits_at(before, *r, i) != bits_at(after, *r, i)) return true;
  }
  return false;
}
// Whether every buffer of the entry is within the backends' bound of its
// value before: a change the bound cannot tell from no change.
bool entry_within_bound(const Setup& s, size_t t, size_t i, const unsigned char* before, const unsigned char* after) {
  for (Buf buf : kValueBufs) {
    const Region* r = s.buffer(t, buf);
    if (r == nullptr) continue;
    const uint64_t distance = r->dtype == GMTK_FLOAT32
                                  ? ulp_distance(value_at(before, *r, i), value_at(after, *r, i))
                                  : ulp_distance_16(bits_at(before, *r, i), bits_at(after, *r, i), r->dtype);
    if (distance > (r->dtype == GMTK_FLOAT32 ? kUlpBound : 1u)) return false;
  }
  return true;
}

std::string keep_text(int8_t keep) { return keep == kKept ? "kept" : keep == kMasked ? "masked" : "unknown"; }

// Every check of one call: the backend under test against the CPU, and both
// against the model.
void check_call(Checks& checks, const Setup& s, const Call& call, const Outcome& o) {
  const Expected& e = o.expected;
  const unsigned char* before = o.before.data();
  const unsigned char* cpu = o.cpu.data();
  const unsigned char* got = o.got.data();
  const std::pair<const char*, const unsigned char*> sides[] = {{"CPU", cpu}, {under_test_name(), got}};
  const size_t n = s.tensors.size();

  // -- The outputs, bit for bit against the CPU.
  compare_region(checks, "found_inf: bitwise equal to the CPU's", s.region(s.found_inf), cpu, "CPU", got,
                 under_test_name());
  compare_region(checks, "thresholds: bitwise equal to the CPU's", s.region(s.thresholds), cpu, "CPU", got,
                 under_test_name());
  compare_region(checks, "kept_counts: equal to the CPU's", s.region(s.kept_counts), cpu, "CPU", got,
                 under_test_name());
  if (call.mask_out) {
    compare_region(checks, "mask_bits words: bitwise equal to the CPU's", s.region(s.mask_out), cpu, "CPU", got,
                   under_test_name());
  } else {
    compare_region(checks, "mask_bits not requested: left as it was", s.region(s.mask_out), before, "before", got,
                   under_test_name());
  }

  // -- The outputs against the model, on both sides.
  for (const auto& side : sides) {
    const std::string name = side.first;
    const unsigned char* arena = side.second;
    const uint32_t found_inf = bits_at(arena, s.region(s.found_inf), 0);
    const uint32_t want_found_inf = bits_of(e.found_inf ? 1.0f : 0.0f);
    if (found_inf != want_found_inf && checks.fail("model: found_inf = any gradient (not score) non-finite")) {
      checks.line("model: found_inf = any gradient (not score) non-finite",
                  name + " wrote " + float_text(found_inf) + ", want " + float_text(want_found_inf));
    }
    for (size_t t = 0; t < n; ++t) {
      const TensorDef& def = s.tensors[t];
      const uint32_t threshold = bits_at(arena, s.region(s.thresholds), t);
      if (e.threshold_rule[t] == ThresholdRule::exact && threshold != e.threshold_bits[t] &&
          checks.fail("model: thresholds")) {
        checks.line("model: thresholds", name + ": " + tensor_label(s, t) + " reports " + float_text(threshold) +
                                             ", want " + float_text(e.threshold_bits[t]));
      }
      if (e.threshold_rule[t] == ThresholdRule::nan && !std::isnan(float_from_bits(threshold)) &&
          checks.fail("model: thresholds are NaN (given bitmap, or a NaN threshold)")) {
        checks.line("model: thresholds are NaN (given bitmap, or a NaN threshold)",
                    name + ": " + tensor_label(s, t) + " reports " + float_text(threshold));
      }
      int64_t want_kept = 0;
      bool kept_known = true;
      for (int8_t keep : e.keep[t]) {
        want_kept += keep == kKept ? 1 : 0;
        kept_known &= keep != kUnknown;
      }
      const int64_t kept = int64_at(arena, s.region(s.kept_counts), t);
      if (kept_known && kept != want_kept && checks.fail("model: kept_counts")) {
        checks.line("model: kept_counts",
                    name + ": " + tensor_label(s, t) + " kept " + std::to_string(kept) + ", want " +
                        std::to_string(want_kept));
      }
      if (!call.mask_out) continue;
      // The bitmap: kept entries' bits, popcount = kept_counts, 0 past the end.
      const Region& bitmap = s.region(s.mask_out);
      int64_t set_bits = 0;
      const int64_t padded = (def.numel + 31) / 32 * 32;
      for (int64_t j = 0; j < padded; ++j) {
        const bool bit = bit_at(arena, s, bitmap, t, j);
        if (j >= def.numel) {
          if (bit && checks.fail("model: mask_bits past a tensor's end are written 0")) {
            checks.line("model: mask_bits past a tensor's end are written 0",
                        name + ": " + tensor_label(s, t) + " bit " + std::to_string(j));
          }
          continue;
        }
        set_bits += bit ? 1 : 0;
        const int8_t keep = e.keep[t][static_cast<size_t>(j)];
        if (keep != kUnknown && bit != (keep == kKept) && checks.fail("model: mask_bits = the kept entries")) {
          checks.line("model: mask_bits = the kept entries",
                      name + ": " + tensor_label(s, t) + " entry " + std::to_string(j) + " (key " +
                          hex_text(key_at(s, before, t, static_cast<size_t>(j))) + ") bit " +
                          std::to_string(bit) + ", model " + keep_text(keep));
        }
      }
      if (set_bits != kept && checks.fail("mask_bits: set bits = kept_counts")) {
        checks.line("mask_bits: set bits = kept_counts", name + ": " + tensor_label(s, t) + " has " +
                                                             std::to_string(set_bits) + " set bits, kept_counts " +
                                                             std::to_string(kept));
      }
    }
  }

  // -- Inputs keep their bits; so do tensors a call does not write; and the padding.
  for (const auto& side : sides) {
    for (int input : {s.given_thresholds, s.given_bits}) {
      compare_region(checks, "given inputs keep their bits", s.region(input), before, "before", side.second,
                     side.first);
    }
    for (size_t t = 0; t < n; ++t) {
      if (const Region* score = s.buffer(t, Buf::score)) {
        compare_region(checks, "scores keep their bits", *score, before, "before", side.second, side.first);
      }
      if (call.op != Op::mask || e.found_inf) {
        compare_region(checks, "gradients keep their bits (no mask call, or found_inf)", *s.buffer(t, Buf::grad),
                       before, "before", side.second, side.first);
      }
      if (call.op != Op::step || e.found_inf) {
        for (Buf buf : kValueBufs) {
          if (const Region* r = s.buffer(t, buf)) {
            compare_region(checks, "param, master and state keep their bits (no step, or found_inf)", *r, before,
                           "before", side.second, side.first);
          }
        }
      }
    }
    compare_padding(checks, s, before, side.second, side.first);
  }

  // -- gmtkMaskGradients: +0 over masked entries, kept entries' bits untouched.
  if (call.op == Op::mask && !e.found_inf) {
    for (size_t t = 0; t < n; ++t) {
      const Region& grad = *s.buffer(t, Buf::grad);
      compare_region(checks, "masked gradients: bitwise equal to the CPU's", grad, cpu, "CPU", got, under_test_name());
      for (const auto& side : sides) {
        for (size_t i = 0; i < grad.count; ++i) {
          const uint32_t was = bits_at(before, grad, i);
          const uint32_t now = bits_at(side.second, grad, i);
          const int8_t keep = e.keep[t][i];
          const bool ok = keep == kKept ? now == was : keep == kMasked ? now == 0u : (now == was || now == 0u);
          if (ok || !checks.fail("model: masked gradients (+0 where masked, bits kept where kept)")) continue;
          checks.line("model: masked gradients (+0 where masked, bits kept where kept)",
                      std::string(side.first) + ": " + tensor_label(s, t) + " entry " + std::to_string(i) + " (" +
                          keep_text(keep) + ") was " + value_text(grad.dtype, was) + ", now " +
                          value_text(grad.dtype, now));
        }
      }
    }
  }

  // -- gmtkStep's update.
  if (call.op != Op::step || e.found_inf) return;
  bool can_change = false, cpu_changed = false;
  for (size_t t = 0; t < n; ++t) {
    const gmtkGroupConfig_t& group = s.group_of_tensor(t);
    const bool freeze = group.mask_mode == GMTK_MASK_FREEZE;
    const size_t count = static_cast<size_t>(s.tensors[t].numel);
    for (size_t i = 0; i < count; ++i) can_change |= !freeze || e.keep[t][i] != kMasked;

    // fp32 buffers within kUlpBound of the CPU's.
    for (Buf buf : kValueBufs) {
      const Region* r = s.buffer(t, buf);
      if (r == nullptr) continue;
      cpu_changed |= std::memcmp(before + r->offset, cpu + r->offset, r->bytes()) != 0;
      if (r->dtype != GMTK_FLOAT32 || std::memcmp(cpu + r->offset, got + r->offset, r->bytes()) == 0) continue;
      for (size_t i = 0; i < count; ++i) {
        const uint64_t distance = ulp_distance(value_at(cpu, *r, i), value_at(got, *r, i));
        if (distance <= kUlpBound || !checks.fail("fp32 values within 4 ulp of the CPU's")) continue;
        checks.line("fp32 values within 4 ulp of the CPU's",
                    r->name + " [" + std::to_string(i) + "] (" + keep_text(e.keep[t][i]) + "): before " +
                        float_text(bits_at(before, *r, i)) + ", CPU " + float_text(bits_at(cpu, *r, i)) + ", " +
                        under_test_name() + " " + float_text(bits_at(got, *r, i)));
      }
    }
    // 16-bit params: from their own master, else within one 16-bit ulp of the CPU's.
    const Region& param = *s.buffer(t, Buf::param);
    if (param.dtype != GMTK_FLOAT32) {
      const Region* master = s.buffer(t, Buf::master);
      for (size_t i = 0; i < count; ++i) {
        if (master != nullptr) {
          for (const auto& side : sides) {
            const float own = value_at(side.second, *master, i);
            const uint32_t value = bits_at(side.second, param, i);
            const uint32_t want = narrow_to_16(own, format_of(param.dtype));
            if (value == want || !checks.fail("16-bit param = nearest-even rounding of its own master")) continue;
            checks.line("16-bit param = nearest-even rounding of its own master",
                        std::string(side.first) + ": " + param.name + " [" + std::to_string(i) + "] " +
                            value_text(param.dtype, value) + ", master " + float_text(bits_of(own)));
          }
        } else if (ulp_distance_16(bits_at(cpu, param, i), bits_at(got, param, i), param.dtype) > 1 &&
                   checks.fail("16-bit param without master within one 16-bit ulp of the CPU's")) {
          checks.line("16-bit param without master within one 16-bit ulp of the CPU's",
                      param.name + " [" + std::to_string(i) + "]: CPU " +
                          value_text(param.dtype, bits_at(cpu, param, i)) + ", " + under_test_name() + " " +
                          value_text(param.dtype, bits_at(got, param, i)));
        }
      }
    }
    // Freeze: an entry the mask clears keeps every bit, on both sides.
    for (size_t i = 0; freeze && i < count; ++i) {
      if (e.keep[t][i] != kMasked) continue;
      for (const auto& side : sides) {
        if (!entry_changed(s, t, i, before, side.second) || !checks.fail("freeze: masked entries keep every bit")) {
          continue;
        }
        checks.line("freeze: masked entries keep every bit",
                    std::string(side.first) + ": " + tensor_label(s, t) + " entry " + std::to_string(i));
      }
    }
    // Both sides change the same entries (up to changes within the bound).
    for (size_t i = 0; i < count; ++i) {
      const bool cpu_entry = entry_changed(s, t, i, before, cpu);
      const bool got_entry = entry_changed(s, t, i, before, got);
      if (cpu_entry == got_entry) continue;
      const unsigned char* changed_side = cpu_entry ? cpu : got;
      if (entry_within_bound(s, t, i, before, changed_side)) continue;
      if (!checks.fail("the same entries change on both sides")) continue;
      checks.line("the same entries change on both sides",
                  tensor_label(s, t) + " entry " + std::to_string(i) + " (" + keep_text(e.keep[t][i]) +
                      "): changed on " + (cpu_entry ? "the CPU" : under_test_name()) + " only");
    }
  }
  if (can_change && !cpu_changed && checks.fail("harness: the CPU's step changed something")) {
    checks.line("harness: the CPU's step changed something", "no param or state changed: this call tests nothing");
  }
}

// ---- The driver ----------------------------------------------------------------------------

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

Setup laid_out(Setup s) {
  lay_out(s);
  return s;
}

// A case's plans on both backends; each run() makes one call on both from the
// same bytes and checks it.
class Harness {
 public:
  explicit Harness(Setup setup)
      : s_(laid_out(std::move(setup))),
        cpu_(s_, GMTK_BACKEND_CPU_REFERENCE, nullptr),
        got_(s_, backend_under_test(), stream_.get()) {
    // The documented layout, on both backends: a bitmap saved on one loads on the other.
    for (const auto& side : {std::make_pair("CPU", &cpu_), std::make_pair(under_test_name(), &got_)}) {
      INFO(describe(s_) << "\n" << side.first << "'s gmtkPlanGetMaskLayout");
      uint64_t total = 0;
      std::vector<uint64_t> offsets(s_.tensors.size(), ~uint64_t{0});
      GPU_GMTK_OK(gmtkPlanGetMaskLayout(side.second->plan(), &total, offsets.empty() ? nullptr : offsets.data()));
      CHECK(total == s_.words);
      CHECK(offsets == s_.word_offsets);
    }
  }
  const Setup& setup() const { return s_; }
  std::vector<unsigned char> fresh(uint64_t seed) const { return initial_bytes(s_, seed); }

  Outcome run(const std::vector<unsigned char>& before, const Call& call, const std::string& label) {
    Outcome o;
    o.before = before;
    o.expected = expect(s_, before.data(), call);
    cpu_.upload(before);
    got_.upload(before);
    cpu_.scramble_workspace(++calls_ * 31u);
    got_.scramble_workspace(calls_ * 37u);
    const std::string context = describe(s_) + "\n" + label + ": " + call_text(call);
    for (auto& side : {std::make_pair("CPU", &cpu_), std::make_pair(under_test_name(), &got_)}) {
      const gmtkStatus_t status = side.second->call(call);
      INFO(context);
      INFO(side.first << " returned " << gmtkGetErrorString(status) << ": "
                      << (status == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage()));
      REQUIRE(status == GMTK_SUCCESS);
    }
    o.cpu = cpu_.download();
    o.got = got_.download();
    Checks checks;
    check_call(checks, s_, call, o);
    checks.expect_clean(context);
    return o;
  }

 private:
  TestStream stream_;  // before the sides, which use it
  Setup s_;
  Side cpu_;
  Side got_;
  uint64_t calls_ = 0;
};

void finish_test() {
  if (cuda_under_test()) check_no_cuda_error_left();
}

// Copies a region's bytes from one arena into another.
void copy_region(const Region& from, const unsigned char* source, const Region& to, std::vector<unsigned char>& dest) {
  REQUIRE(from.bytes() == to.bytes());
  if (from.bytes() > 0) std::memcpy(dest.data() + to.offset, source + from.offset, from.bytes());
}

// The thresholds, kept counts and bitmap of a call, on one side.
struct Selection {
  std::vector<uint32_t> thresholds;
  std::vector<int64_t> kept;
  std::vector<uint32_t> words;
};
Selection selection_of(const Setup& s, const unsigned char* arena) {
  Selection out;
  for (size_t t = 0; t < s.tensors.size(); ++t) {
    out.thresholds.push_back(bits_at(arena, s.region(s.thresholds), t));
    out.kept.push_back(int64_at(arena, s.region(s.kept_counts), t));
  }
  for (uint64_t w = 0; w < s.words; ++w) out.words.push_back(word_at(arena, s.region(s.mask_out), w));
  return out;
}

// Random bitmap words; bits past each tensor's end are random garbage
// whatever the pattern, and must be ignored.
void write_given_bits(const Setup& s, std::vector<unsigned char>& arena, int pattern, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const Region& bits = s.region(s.given_bits);
  for (uint64_t w = 0; w < s.words; ++w) {
    const auto r = static_cast<uint32_t>(rng());
    const uint32_t word = pattern == 0   ? r & static_cast<uint32_t>(rng())  // about a quarter kept
                          : pattern == 1 ? r                                 // about half
                          : pattern == 2 ? 0xFFFFFFFFu
                          : pattern == 3 ? 0u
                                         : 0xAAAAAAAAu;
    put_word(arena.data(), bits, w, word);
  }
  for (size_t t = 0; t < s.tensors.size(); ++t) {
    const int64_t numel = s.tensors[t].numel;
    if (numel % 32 == 0) continue;
    const uint64_t last = s.word_offsets[t] + static_cast<uint64_t>(numel / 32);
    const uint32_t valid = (1u << (numel % 32)) - 1u;
    const uint32_t garbage = static_cast<uint32_t>(rng()) | 0x80000000u;  // at least the top bit
    put_word(arena.data(), bits, last, (word_at(arena.data(), bits, last) & valid) | (garbage & ~valid));
  }
}

const char* pattern_name(int pattern) {
  switch (pattern) {
    case 0: return "random, a quarter set";
    case 1: return "random, half set";
    case 2: return "all set";
    case 3: return "none set";
    default: return "alternating";
  }
}

// Given thresholds worth trying for a tensor whose keys are of `dtype`: values
// of its own gradients (or scores), the floats just above and below them, the
// midpoint between a 16-bit value and the next (rounding up must take the
// upper one, nearest-even might not), and the special values.
std::vector<float> threshold_candidates(const Setup& s, const unsigned char* arena, size_t t, uint64_t seed) {
  const TensorDef& def = s.tensors[t];
  const gmtkDtype_t dtype = key_dtype(def);
  std::vector<uint32_t> keys;
  for (size_t i = 0; i < static_cast<size_t>(def.numel); ++i) {
    const uint32_t key = key_at(s, arena, t, i);
    if (key != 0 && key < infinity_key(dtype)) keys.push_back(key);
  }
  std::mt19937_64 rng(seed);
  auto pick = [&]() -> uint32_t {
    return keys.empty() ? rounded_up_key(1.0f, dtype) : keys[static_cast<size_t>(rng() % keys.size())];
  };
  const uint32_t a = pick(), b = pick();
  const float va = value_of_bits(dtype, a), vb = value_of_bits(dtype, b);
  const float next_value = value_of_bits(dtype, a + 1);  // a + 1 <= the infinity key
  const float midpoint = dtype == GMTK_FLOAT32 || std::isinf(next_value)
                             ? vb
                             : static_cast<float>((static_cast<double>(va) + static_cast<double>(next_value)) / 2);
  return {va,
          std::nextafter(va, std::numeric_limits<float>::infinity()),
          std::nextafter(va, 0.0f),
          midpoint,
          -vb,  // negative: keeps everything
          0.0f,
          -0.0f,
          -std::numeric_limits<float>::infinity(),
          std::numeric_limits<float>::infinity(),
          float_from_bits(0x7FC00000u),  // quiet NaN
          float_from_bits(0xFFC01234u),  // -NaN with a payload
          float_from_bits(0x00000001u),  // 1e-45, the smallest fp32 subnormal
          1e-40f,                        // an fp32 (and bf16) subnormal
          6.0e-8f,                       // just above fp16's smallest subnormal 2^-24: rounds up to 2^-23
          65520.0f,                      // fp16's overflow boundary: above every finite fp16
          3.0e38f};
}
constexpr size_t kCandidates = 16;

std::string threshold_list(const std::vector<unsigned char>& arena, const Setup& s) {
  std::ostringstream out;
  out << "given thresholds:";
  for (size_t t = 0; t < s.tensors.size(); ++t) {
    out << " " << float_text(bits_at(arena.data(), s.region(s.given_thresholds), t));
  }
  return out.str();
}

// ---- Tests ------------------------------------------------------------------------------------

// Tensors of every dtype at starts 1-3 elements past an aligned boundary, sizes
// around word multiples, ties, subnormals, signed zeros, an empty tensor, in
// per-tensor groups and global groups of each dtype, ratios 0, 0.3-0.9 and 1.
Setup feedback_setup(gmtkMaskMode_t mode) {
  Setup s;
  s.name = std::string("every dtype and scope, ") + (mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad");
  s.groups = {group_of(GMTK_OPTIMIZER_ADAMW, 0.7, GMTK_SCOPE_PER_TENSOR, mode),
              group_of(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_SCOPE_GLOBAL, mode),
              group_of(GMTK_OPTIMIZER_ADAMW, 0.0, GMTK_SCOPE_PER_TENSOR, mode),
              group_of(GMTK_OPTIMIZER_ADAM, 0.3, GMTK_SCOPE_GLOBAL, mode),
              group_of(GMTK_OPTIMIZER_SGD, 0.9, GMTK_SCOPE_GLOBAL, mode),
              group_of(GMTK_OPTIMIZER_ADAMW, 1.0, GMTK_SCOPE_GLOBAL, mode)};
  s.tensors = {grad_tensor(0, 1000, GMTK_FLOAT32, 1),
               grad_tensor(0, 333, GMTK_FLOAT16, 2, Content::quantized_256),
               with_param(grad_tensor(0, 4097, GMTK_BFLOAT16, 3, Content::heavy_tail), GMTK_BFLOAT16, true),
               grad_tensor(0, 1, GMTK_FLOAT32, 1),
               grad_tensor(0, 0, GMTK_FLOAT16),
               grad_tensor(0, 64, GMTK_BFLOAT16, 1, Content::subnormals),
               grad_tensor(0, 31, GMTK_FLOAT32, 2, Content::signed_zeros),
               with_param(grad_tensor(1, 100, GMTK_BFLOAT16, 1), GMTK_FLOAT16, false),
               grad_tensor(1, 2000, GMTK_BFLOAT16, 3, Content::two_values),
               grad_tensor(1, 33, GMTK_BFLOAT16, 2),
               grad_tensor(2, 50, GMTK_FLOAT32, 1),
               grad_tensor(3, 700, GMTK_FLOAT16, 1, Content::mostly_zeros),
               with_param(grad_tensor(3, 95, GMTK_FLOAT16, 3), GMTK_FLOAT16, true),
               grad_tensor(4, 777, GMTK_FLOAT32, 1, Content::heavy_tail),
               grad_tensor(4, 64, GMTK_FLOAT32, 2),
               grad_tensor(5, 40, GMTK_FLOAT32, 3),
               grad_tensor(5, 70, GMTK_FLOAT32, 1)};
  return s;
}

// A selecting call, then the same call given back its thresholds, then given
// back its bitmap: the kept entries, kept counts and bitmaps must not change.
void check_feedback(Harness& h, const std::vector<unsigned char>& before, Op op, const std::string& label) {
  const Setup& s = h.setup();
  const Outcome selected = h.run(before, Call{op, false, false, true}, label + ", selecting");

  std::vector<unsigned char> by_threshold = before;
  copy_region(s.region(s.thresholds), selected.cpu.data(), s.region(s.given_thresholds), by_threshold);
  const Outcome from_thresholds =
      h.run(by_threshold, Call{op, true, false, true}, label + ", its thresholds given back");

  std::vector<unsigned char> by_bits = before;
  copy_region(s.region(s.mask_out), selected.cpu.data(), s.region(s.given_bits), by_bits);
  const Outcome from_bits = h.run(by_bits, Call{op, false, true, true}, label + ", its bitmap given back");

  // Each side against its own selecting call.
  struct Arenas {
    const char* name;
    const unsigned char* selected;
    const unsigned char* from_thresholds;
    const unsigned char* from_bits;
  };
  const Arenas sides[] = {
      {"CPU", selected.cpu.data(), from_thresholds.cpu.data(), from_bits.cpu.data()},
      {under_test_name(), selected.got.data(), from_thresholds.got.data(), from_bits.got.data()}};
  for (const Arenas& side : sides) {
    INFO(describe(s) << "\n" << label << ": " << side.name << "'s selecting call against the calls given back its "
                     << "outputs");
    const Selection first = selection_of(s, side.selected);
    const Selection again = selection_of(s, side.from_thresholds);
    const Selection bits_again = selection_of(s, side.from_bits);
    CHECK(again.words == first.words);  // the same entries kept
    CHECK(again.kept == first.kept);
    CHECK(again.thresholds == first.thresholds);  // T is a value of the dtype: its own key
    CHECK(bits_again.words == first.words);
    CHECK(bits_again.kept == first.kept);
    if (op == Op::mask) {  // the same gradients masked
      for (size_t t = 0; t < s.tensors.size(); ++t) {
        const Region& grad = *s.buffer(t, Buf::grad);
        CHECK(std::memcmp(side.selected + grad.offset, side.from_thresholds + grad.offset, grad.bytes()) == 0);
        CHECK(std::memcmp(side.selected + grad.offset, side.from_bits + grad.offset, grad.bytes()) == 0);
      }
    }
  }
  // On the oracle the same mask gives the same step, to the bit.
  if (op == Op::step) {
    for (size_t t = 0; t < s.tensors.size(); ++t) {
      for (Buf buf : kValueBufs) {
        const Region* r = s.buffer(t, buf);
        if (r == nullptr || r->bytes() == 0) continue;
        INFO(describe(s) << "\n" << label << ": CPU steps from the selection, its thresholds and its bitmap, "
                         << r->name);
        CHECK(std::memcmp(selected.cpu.data() + r->offset, from_thresholds.cpu.data() + r->offset, r->bytes()) == 0);
        CHECK(std::memcmp(selected.cpu.data() + r->offset, from_bits.cpu.data() + r->offset, r->bytes()) == 0);
      }
    }
  }
}

TEST_CASE("mask schedules: a selecting call's thresholds and bitmap, given back, keep exactly its entries",
          "[mask_schedule][small]") {
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    Harness h(feedback_setup(mode));
    const std::vector<unsigned char> before = h.fresh(11);
    for (Op op : {Op::step, Op::select, Op::mask}) {
      if (op != Op::step && mode == GMTK_MASK_FREEZE) continue;  // the mode changes only the step
      check_feedback(h, before, op, "feedback");
    }
  }
  finish_test();
}

TEST_CASE("mask schedules: the bitmap a selecting call writes equals the CPU's, 0 past each tensor's end",
          "[mask_schedule][small]") {
  // The output starts all-ones (initial_bytes), so tail bits left unwritten show.
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    Setup s;
    s.name = std::string("word-straddling sizes at odd starts, ") + (mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad");
    s.groups = {group_of(GMTK_OPTIMIZER_ADAMW, 0.6, GMTK_SCOPE_PER_TENSOR, mode),
                group_of(GMTK_OPTIMIZER_ADAMW, 0.4, GMTK_SCOPE_GLOBAL, mode),
                group_of(GMTK_OPTIMIZER_SGD, 0.5, GMTK_SCOPE_PER_TENSOR, mode)};
    const int64_t sizes[] = {1, 31, 32, 33, 95, 1000, 4099, 0, 63, 65};
    const gmtkDtype_t dtypes[] = {GMTK_FLOAT32, GMTK_FLOAT16, GMTK_BFLOAT16};
    for (size_t i = 0; i < 10; ++i) {
      TensorDef def = grad_tensor(i % 3 == 2 ? 2 : 0, sizes[i], dtypes[i % 3], 1 + i % 3);
      if (i % 4 == 1) def = with_param(def, GMTK_BFLOAT16, true);
      if (i % 4 == 3) def = with_param(def, GMTK_FLOAT16, false);
      s.tensors.push_back(def);
    }
    for (int64_t numel : {47, 1, 500}) s.tensors.push_back(grad_tensor(1, numel, GMTK_FLOAT16, 3, Content::quantized_256));
    Harness h(std::move(s));
    const std::vector<unsigned char> before = h.fresh(5);
    for (Op op : {Op::step, Op::select, Op::mask}) h.run(before, Call{op, false, false, true}, "selecting");
    // Without the output requested, its buffer is left alone.
    h.run(before, Call{Op::step, false, false, false}, "selecting");
  }
  finish_test();
}

TEST_CASE("mask schedules: given bitmaps keep exactly their set bits, ignoring the bits past each tensor's end",
          "[mask_schedule][small]") {
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    Setup s;
    s.name = std::string("given bitmaps, ") + (mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad");
    s.groups = {group_of(GMTK_OPTIMIZER_ADAMW, 0.6, GMTK_SCOPE_PER_TENSOR, mode),
                group_of(GMTK_OPTIMIZER_ADAM, 0.4, GMTK_SCOPE_GLOBAL, mode),
                group_of(GMTK_OPTIMIZER_SGD, 0.5, GMTK_SCOPE_PER_TENSOR, mode)};
    const int64_t sizes[] = {1, 31, 32, 33, 95, 1000, 4099, 0, 63, 65, 7};
    const gmtkDtype_t dtypes[] = {GMTK_FLOAT32, GMTK_FLOAT16, GMTK_BFLOAT16};
    for (size_t i = 0; i < 11; ++i) {
      TensorDef def = grad_tensor(i % 3 == 2 ? 2 : 0, sizes[i], dtypes[i % 3], 1 + i % 3);
      if (i % 4 == 1) def = with_param(def, GMTK_FLOAT16, true);
      if (i % 4 == 3) def = with_param(def, GMTK_BFLOAT16, false);
      s.tensors.push_back(def);
    }
    s.tensors.push_back(grad_tensor(1, 300, GMTK_BFLOAT16, 1));
    s.tensors.push_back(grad_tensor(1, 45, GMTK_BFLOAT16, 2, Content::zeros));
    Harness h(std::move(s));
    const std::vector<unsigned char> fresh = h.fresh(3);
    for (int pattern = 0; pattern < 5; ++pattern) {
      std::vector<unsigned char> before = fresh;
      write_given_bits(h.setup(), before, pattern, 100u + static_cast<uint64_t>(pattern));
      const std::string label = std::string("bitmap ") + pattern_name(pattern);
      for (bool mask_out : {true, false}) h.run(before, Call{Op::step, false, true, mask_out}, label);
      if (mode == GMTK_MASK_GRAD) {
        h.run(before, Call{Op::mask, false, true, true}, label);
        h.run(before, Call{Op::select, false, true, true}, label);
      }
    }
  }
  finish_test();
}

TEST_CASE("mask schedules: given thresholds between 16-bit values, 0, -0, negative, inf, NaN, 1e-45",
          "[mask_schedule][small]") {
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    Setup s;
    s.name = std::string("given thresholds, ") + (mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad");
    s.groups = {group_of(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_SCOPE_PER_TENSOR, mode),
                group_of(GMTK_OPTIMIZER_ADAM, 0.5, GMTK_SCOPE_GLOBAL, mode)};
    TensorDef wide_fp16 = grad_tensor(0, 1500, GMTK_FLOAT16, 2);
    wide_fp16.scale = 100.0f;  // values up to a few hundred: fp16's top exponents
    s.tensors = {grad_tensor(0, 2000, GMTK_FLOAT32, 1),
                 wide_fp16,
                 with_param(grad_tensor(0, 1000, GMTK_BFLOAT16, 3, Content::quantized_256), GMTK_BFLOAT16, true),
                 grad_tensor(0, 300, GMTK_FLOAT32, 1, Content::subnormals),
                 with_param(grad_tensor(0, 200, GMTK_FLOAT16, 2, Content::subnormals), GMTK_FLOAT16, false),
                 grad_tensor(0, 100, GMTK_BFLOAT16, 3, Content::signed_zeros),
                 grad_tensor(0, 0, GMTK_FLOAT16),
                 grad_tensor(0, 129, GMTK_BFLOAT16, 1, Content::subnormals),
                 grad_tensor(1, 700, GMTK_BFLOAT16, 1),
                 grad_tensor(1, 500, GMTK_BFLOAT16, 2, Content::heavy_tail)};
    Harness h(std::move(s));
    const Setup& setup = h.setup();
    const std::vector<unsigned char> fresh = h.fresh(21);
    std::vector<std::vector<float>> candidates;
    for (size_t t = 0; t < setup.tensors.size(); ++t) {
      candidates.push_back(threshold_candidates(setup, fresh.data(), t, 1000u + t));
      REQUIRE(candidates.back().size() == kCandidates);
    }
    for (size_t round = 0; round < kCandidates; ++round) {
      std::vector<unsigned char> before = fresh;
      for (size_t t = 0; t < setup.tensors.size(); ++t) {
        // Per-tensor groups rotate through their candidates; a global group
        // gives every tensor its first tensor's candidate (SPEC: all equal).
        const bool global = setup.group_of_tensor(t).scope == GMTK_SCOPE_GLOBAL;
        const float value = global ? candidates[8][round] : candidates[t][(round + t) % kCandidates];
        put_value(before.data(), setup.region(setup.given_thresholds), t, value);
      }
      const std::string label = "round " + std::to_string(round) + ", " + threshold_list(before, setup);
      h.run(before, Call{Op::step, true, false, round % 2 == 0}, label);
      if (mode == GMTK_MASK_GRAD) {
        h.run(before, Call{Op::select, true, false, true}, label);
        h.run(before, Call{Op::mask, true, false, round % 2 == 1}, label);
      }
    }
  }
  finish_test();
}

TEST_CASE("mask schedules: given thresholds over gradients holding NaN and inf: outputs written, gradients left",
          "[mask_schedule][small]") {
  // found_inf is set by every call here; thresholds, kept counts and bitmaps
  // are still written, NaN keys order above +inf (and by payload: the CPU
  // comparison pins a NaN threshold against NaN entries).
  Setup s;
  s.name = "raw bits";
  s.groups = {group_of(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE)};
  s.tensors = {grad_tensor(0, 1000, GMTK_FLOAT32, 1, Content::raw_bits),
               grad_tensor(0, 1000, GMTK_FLOAT16, 2, Content::raw_bits),
               grad_tensor(0, 1000, GMTK_BFLOAT16, 3, Content::raw_bits),
               grad_tensor(0, 77, GMTK_FLOAT16, 1, Content::nan_and_inf)};
  Harness h(std::move(s));
  const Setup& setup = h.setup();
  const std::vector<unsigned char> fresh = h.fresh(8);
  const float specials[] = {std::numeric_limits<float>::infinity(), float_from_bits(0x7FC00000u),
                            float_from_bits(0x7FFFFFFFu), float_from_bits(0xFFC01234u), 0.0f, -1.0f, 1e-45f, 3.0e38f};
  for (size_t round = 0; round < 8; ++round) {
    std::vector<unsigned char> before = fresh;
    for (size_t t = 0; t < setup.tensors.size(); ++t) {
      put_value(before.data(), setup.region(setup.given_thresholds), t, specials[(round + t) % 8]);
    }
    const std::string label = "round " + std::to_string(round) + ", " + threshold_list(before, setup);
    for (Op op : {Op::select, Op::mask, Op::step}) h.run(before, Call{op, true, false, true}, label);
  }
  finish_test();
}

// Score buffers of a dtype other than the gradient's, per tensor and global;
// one score holds NaN and inf while its gradient is finite.
Setup score_setup(gmtkMaskMode_t mode) {
  Setup s;
  s.name = std::string("scores, ") + (mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad");
  s.groups = {group_of(GMTK_OPTIMIZER_ADAMW, 0.7, GMTK_SCOPE_PER_TENSOR, mode),
              group_of(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_SCOPE_GLOBAL, mode)};
  s.tensors = {with_score(grad_tensor(0, 1000, GMTK_FLOAT16, 1), GMTK_FLOAT32),
               with_score(grad_tensor(0, 777, GMTK_BFLOAT16, 2), GMTK_FLOAT16),
               with_score(grad_tensor(0, 2048, GMTK_FLOAT32, 3), GMTK_BFLOAT16, Content::quantized_256, 1.0f / 64),
               grad_tensor(0, 500, GMTK_FLOAT32, 1),  // no score: its gradient chooses
               with_score(grad_tensor(0, 300, GMTK_FLOAT16, 2), GMTK_FLOAT16, Content::nan_and_inf),
               with_score(grad_tensor(0, 0, GMTK_FLOAT32), GMTK_FLOAT16),
               with_score(grad_tensor(1, 600, GMTK_FLOAT16, 3), GMTK_FLOAT32, Content::heavy_tail),
               with_score(grad_tensor(1, 400, GMTK_FLOAT16, 1), GMTK_FLOAT32)};
  return s;
}

TEST_CASE("mask schedules: a score chooses the mask; an inf score does not set found_inf, an inf gradient does",
          "[mask_schedule][small]") {
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    Harness h(score_setup(mode));
    const Setup& setup = h.setup();
    const std::vector<unsigned char> fresh = h.fresh(31);
    // Selection on |score|, with the score's NaN and inf among the keys.
    for (Op op : {Op::step, Op::select, Op::mask}) {
      const Outcome o = h.run(fresh, Call{op, false, false, true}, "finite gradients, a score with NaN and inf");
      INFO(describe(setup) << "\nan inf or NaN score with finite gradients leaves found_inf 0");
      CHECK(bits_at(o.got.data(), setup.region(setup.found_inf), 0) == bits_of(0.0f));
    }
    // Its thresholds and bitmap given back keep the same entries.
    check_feedback(h, fresh, Op::step, "score feedback");
    // An inf gradient sets found_inf: the step is a no-op, the outputs are written.
    std::vector<unsigned char> with_inf = fresh;
    plant_gradient(setup, with_inf, 1, 123, std::numeric_limits<float>::infinity());
    for (Op op : {Op::step, Op::mask}) {
      const Outcome o = h.run(with_inf, Call{op, false, false, true}, "an inf gradient in tensor 1");
      INFO(describe(setup) << "\nan inf gradient sets found_inf");
      CHECK(bits_at(o.got.data(), setup.region(setup.found_inf), 0) == bits_of(1.0f));
    }
  }
  finish_test();
}

TEST_CASE("mask schedules: given thresholds with scores are rounded up to the score's dtype",
          "[mask_schedule][small]") {
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    Harness h(score_setup(mode));
    const Setup& setup = h.setup();
    const std::vector<unsigned char> fresh = h.fresh(41);
    std::vector<std::vector<float>> candidates;
    for (size_t t = 0; t < setup.tensors.size(); ++t) {
      candidates.push_back(threshold_candidates(setup, fresh.data(), t, 2000u + t));
    }
    for (size_t round = 0; round < kCandidates; ++round) {
      std::vector<unsigned char> before = fresh;
      for (size_t t = 0; t < setup.tensors.size(); ++t) {
        const bool global = setup.group_of_tensor(t).scope == GMTK_SCOPE_GLOBAL;
        const float value = global ? candidates[6][round] : candidates[t][(round + 2 * t) % kCandidates];
        put_value(before.data(), setup.region(setup.given_thresholds), t, value);
      }
      const std::string label = "round " + std::to_string(round) + ", " + threshold_list(before, setup);
      h.run(before, Call{Op::step, true, false, true}, label);
      if (mode == GMTK_MASK_GRAD) h.run(before, Call{Op::mask, true, false, true}, label);
    }
    // A given bitmap ignores the scores.
    std::vector<unsigned char> before = fresh;
    write_given_bits(setup, before, 1, 77);
    h.run(before, Call{Op::step, false, true, true}, "a given bitmap with scores");
  }
  finish_test();
}

TEST_CASE("mask schedules: a found_inf step with given thresholds or a bitmap writes its outputs and nothing else",
          "[mask_schedule][small]") {
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    Setup s;
    s.name = std::string("found_inf, ") + (mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad");
    s.groups = {group_of(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_SCOPE_PER_TENSOR, mode),
                group_of(GMTK_OPTIMIZER_SGD, 0.5, GMTK_SCOPE_GLOBAL, mode)};
    s.tensors = {grad_tensor(0, 1000, GMTK_FLOAT32, 1),
                 with_param(grad_tensor(0, 333, GMTK_FLOAT16, 2), GMTK_FLOAT16, true),
                 with_score(grad_tensor(0, 500, GMTK_BFLOAT16, 3), GMTK_FLOAT32),
                 grad_tensor(1, 200, GMTK_BFLOAT16, 1),
                 grad_tensor(1, 99, GMTK_BFLOAT16, 2)};
    Harness h(std::move(s));
    const Setup& setup = h.setup();
    std::vector<unsigned char> before = h.fresh(51);
    plant_gradient(setup, before, 0, 17, -std::numeric_limits<float>::infinity());
    plant_gradient(setup, before, 4, 98, std::numeric_limits<float>::quiet_NaN());
    for (size_t t = 0; t < setup.tensors.size(); ++t) {
      put_value(before.data(), setup.region(setup.given_thresholds), t, t % 2 == 0 ? 1e-2f : 3e-3f);
    }
    write_given_bits(setup, before, 0, 9);
    for (Op op : {Op::step, Op::mask}) {
      for (const Call& call : {Call{op, true, false, true}, Call{op, false, true, true}}) {
        const Outcome o = h.run(before, call, "an inf and a NaN gradient");
        INFO(describe(setup) << "\n" << call_text(call));
        CHECK(bits_at(o.got.data(), setup.region(setup.found_inf), 0) == bits_of(1.0f));
      }
    }
  }
  finish_test();
}

TEST_CASE("mask schedules on the multi-block path: fp32 tensors of 2^18 + 3 entries", "[mask_schedule]") {
  constexpr int64_t kLarge = (int64_t{1} << 18) + 3;
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    Setup s;
    s.name = std::string("2^18 + 3 entries, ") + (mode == GMTK_MASK_FREEZE ? "freeze" : "mask-grad");
    s.groups = {group_of(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_SCOPE_PER_TENSOR, mode),
                group_of(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_SCOPE_GLOBAL, mode)};
    s.tensors = {grad_tensor(0, kLarge, GMTK_FLOAT32, 1), grad_tensor(0, 1000, GMTK_FLOAT32, 2),
                 grad_tensor(1, kLarge, GMTK_FLOAT32, 3, Content::quantized_256),
                 grad_tensor(1, 4097, GMTK_FLOAT32, 1)};
    Harness h(std::move(s));
    const std::vector<unsigned char> fresh = h.fresh(61);
    check_feedback(h, fresh, Op::step, "large feedback");
    if (mode == GMTK_MASK_GRAD) check_feedback(h, fresh, Op::mask, "large feedback");
    std::vector<unsigned char> before = fresh;
    write_given_bits(h.setup(), before, 0, 5);
    h.run(before, Call{Op::step, false, true, true}, "a random bitmap");
  }
  finish_test();
}

TEST_CASE("mask schedules on the multi-block path: 2^18 + 3 entries chosen by scores, selected and given",
          "[mask_schedule]") {
  constexpr int64_t kLarge = (int64_t{1} << 18) + 3;
  Setup s;
  s.name = "2^18 + 3 entries with scores";
  s.groups = {group_of(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_SCOPE_PER_TENSOR, GMTK_MASK_FREEZE),
              group_of(GMTK_OPTIMIZER_ADAMW, 0.8, GMTK_SCOPE_GLOBAL, GMTK_MASK_GRAD)};
  s.tensors = {with_score(grad_tensor(0, kLarge, GMTK_FLOAT32, 1), GMTK_FLOAT32, Content::heavy_tail),
               with_score(grad_tensor(1, kLarge, GMTK_FLOAT32, 2), GMTK_BFLOAT16),
               with_score(grad_tensor(1, 3000, GMTK_FLOAT32, 3), GMTK_BFLOAT16, Content::nan_and_inf)};
  Harness h(std::move(s));
  const Setup& setup = h.setup();
  const std::vector<unsigned char> fresh = h.fresh(71);
  check_feedback(h, fresh, Op::step, "large score feedback");
  // Thresholds just above and between values of the score's dtype.
  for (size_t round = 0; round < 4; ++round) {
    std::vector<unsigned char> before = fresh;
    for (size_t t = 0; t < setup.tensors.size(); ++t) {
      const std::vector<float> candidates = threshold_candidates(setup, fresh.data(), t == 0 ? 0 : 1, 3000u + round);
      put_value(before.data(), setup.region(setup.given_thresholds), t, candidates[round]);
    }
    h.run(before, Call{Op::step, true, false, true}, "round " + std::to_string(round) + ", " +
                                                           threshold_list(before, setup));
  }
  finish_test();
}

}  // namespace
}  // namespace gpu_test
