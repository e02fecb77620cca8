// gmtkSelectThresholds and gmtkMaskGradients on the CUDA backend, against the
// CPU reference backend, the oracle of SPEC section 6: thresholds, kept counts,
// found_inf and every gradient byte after masking must be bitwise equal. Each
// run is also checked against the definition itself (docs/semantics.md,
// "Selection"), computed here from the gradients' keys, so that a mistake both
// backends share is caught as well.
//
// Written from SPEC.md, docs/semantics.md, docs/api.md and gmtk.h alone: it
// shares no code with host/ or kernels/ (the 16-bit formats are rebuilt in
// gpu_test_support.h from their IEEE layouts).
//
// Tags: [selection] on every test; [small] on the quick subset run under
// compute-sanitizer; [.large] (hidden) for one fp32 tensor above 2^31 entries,
// about 9 GB of device memory.
#include "gpu_test_support.h"

#include <gmtk/gmtk.h>

#include <catch2/catch.hpp>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iomanip>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

using namespace gpu_test;  // NOLINT: the shared helpers (gpu_test_support.h)

namespace {

// ---- Cases -------------------------------------------------------------------------

struct TensorSpec {
  int32_t group = 0;
  int64_t numel = 0;
  gmtkDtype_t dtype = GMTK_FLOAT32;
  Content content = Content::gaussian;
  float scale = 1e-3f;
  size_t misalign = 0;        // bytes past a 256-byte boundary of the allocation
  bool null_if_empty = true;  // numel 0: NULL grad (else a valid, distinct address)
};

TensorSpec tensor(int32_t group, int64_t numel, gmtkDtype_t dtype, Content content, size_t misalign = 0) {
  TensorSpec spec;
  spec.group = group;
  spec.numel = numel;
  spec.dtype = dtype;
  spec.content = content;
  spec.scale = default_scale(content);
  spec.misalign = misalign;
  return spec;
}

gmtkGroupConfig_t selection_group(double ratio, gmtkScope_t scope) {
  gmtkGroupConfig_t group;
  GPU_GMTK_OK(gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW));
  group.mask_ratio = ratio;
  group.scope = scope;
  return group;
}

// The ratios of the issue for a set of n entries: 0, 1/n, 0.5, 0.9, 0.99,
// 1 - 1/n, 1 (1/n and 1 - 1/n become 0.5 for an empty set).
std::vector<double> ratio_sweep(int64_t n) {
  const double one_over_n = n > 0 ? 1.0 / static_cast<double>(n) : 0.5;
  return {0.0, one_over_n, 0.5, 0.9, 0.99, 1.0 - one_over_n, 1.0};
}

// All padding around the tensors holds this byte: all-ones is NaN in every
// dtype, so a kernel that reads past a tensor changes found_inf and is seen,
// and one that writes past it is caught by the padding check.
constexpr unsigned char kPadByte = 0xFF;
constexpr size_t kGuardBytes = 16;  // at least this much padding after each tensor

struct Case {
  std::string name;
  uint64_t seed = 0;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<TensorSpec> tensors;
  bool plan_owned_workspace = false;  // GMTK_PLAN_ALLOCATE_WORKSPACE on both backends
  size_t workspace_misalign = 0;      // CUDA caller workspace offset: "any address" (docs/api.md)
  bool use_inv_scale = false;
  float inv_scale = 1.0f;
  // Set by lay_out() and fill(): every tensor lives in one arena of bytes.
  std::vector<size_t> offsets;
  size_t arena_bytes = 0;
  std::vector<unsigned char> grads;
};

void lay_out(Case& c) {
  c.offsets.clear();
  size_t cursor = 0;
  for (const TensorSpec& spec : c.tensors) {
    const size_t start = round_up(cursor, 256) + spec.misalign;
    c.offsets.push_back(start);
    cursor = start + static_cast<size_t>(spec.numel) * element_size(spec.dtype) + kGuardBytes;
  }
  c.arena_bytes = round_up(cursor, 256) + 256;
}

void fill(Case& c) {
  c.grads.assign(c.arena_bytes, kPadByte);
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    const TensorSpec& spec = c.tensors[t];
    fill_gradient(c.grads.data() + c.offsets[t], spec.dtype, spec.numel, spec.content, spec.scale,
                  c.seed * 1000003u + t);
  }
}

void prepare(Case& c) {
  lay_out(c);
  fill(c);
}

int64_t group_entries(const Case& c, int32_t group) {
  int64_t total = 0;
  for (const TensorSpec& spec : c.tensors) total += spec.group == group ? spec.numel : 0;
  return total;
}

std::string describe(const Case& c) {
  std::ostringstream out;
  int64_t total = 0;
  for (const TensorSpec& spec : c.tensors) total += spec.numel;
  out << "case '" << c.name << "' (seed " << c.seed << "): " << c.tensors.size() << " tensors, " << total << " entries";
  out << std::setprecision(17);
  for (size_t g = 0; g < c.groups.size(); ++g) {
    size_t count = 0;
    for (const TensorSpec& spec : c.tensors) count += spec.group == static_cast<int32_t>(g) ? 1 : 0;
    out << "\n  group " << g << ": " << (c.groups[g].scope == GMTK_SCOPE_GLOBAL ? "global" : "per-tensor")
        << ", mask_ratio " << c.groups[g].mask_ratio << ", " << count << " tensors, "
        << group_entries(c, static_cast<int32_t>(g)) << " entries";
  }
  if (c.tensors.size() <= 8) {
    for (size_t t = 0; t < c.tensors.size(); ++t) {
      const TensorSpec& spec = c.tensors[t];
      out << "\n  tensor " << t << ": group " << spec.group << ", " << dtype_name(spec.dtype) << ", numel "
          << spec.numel << ", " << content_name(spec.content) << ", start +" << spec.misalign << " bytes";
    }
  }
  out << "\n  workspace: "
      << (c.plan_owned_workspace ? std::string("plan-owned")
                                 : "caller's, at +" + std::to_string(c.workspace_misalign) + " bytes");
  if (c.use_inv_scale) out << "; inv_loss_scale " << std::setprecision(9) << c.inv_scale;
  return out.str();
}

std::string tensor_label(const Case& c, size_t t) {
  const TensorSpec& spec = c.tensors[t];
  std::ostringstream out;
  out << "tensor " << t << " (group " << spec.group << ", " << dtype_name(spec.dtype) << ", numel " << spec.numel
      << ", " << content_name(spec.content) << ", start +" << spec.misalign << ")";
  return out.str();
}

std::vector<gmtkTensor_t> describe_tensors(const Case& c, unsigned char* arena) {
  std::vector<gmtkTensor_t> tensors;
  tensors.reserve(c.tensors.size());
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    const TensorSpec& spec = c.tensors[t];
    gmtkTensor_t described{};  // gradients only: a plan for select and mask needs no more
    described.group = spec.group;
    described.numel = spec.numel;
    described.grad_dtype = spec.dtype;
    described.grad = spec.numel == 0 && spec.null_if_empty ? nullptr : arena + c.offsets[t];
    described.param_dtype = spec.dtype;
    tensors.push_back(described);
  }
  return tensors;
}

struct PlanOwner {
  gmtkPlan_t plan = nullptr;
  PlanOwner(gmtkHandle_t handle, const Case& c, unsigned char* arena) {
    const std::vector<gmtkTensor_t> tensors = describe_tensors(c, arena);
    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = c.groups.data();
    config.num_groups = static_cast<int32_t>(c.groups.size());
    config.tensors = tensors.empty() ? nullptr : tensors.data();
    config.num_tensors = static_cast<int64_t>(tensors.size());
    config.flags = c.plan_owned_workspace ? GMTK_PLAN_ALLOCATE_WORKSPACE : 0u;
    GPU_GMTK_OK(gmtkPlanCreate(handle, &config, &plan));
  }
  ~PlanOwner() { gmtkPlanDestroy(plan); }
  PlanOwner(const PlanOwner&) = delete;
  PlanOwner& operator=(const PlanOwner&) = delete;
};

// ---- One plan on each backend ----------------------------------------------------------

enum class Call { select, mask };
const char* call_name(Call call) { return call == Call::select ? "gmtkSelectThresholds" : "gmtkMaskGradients"; }

gmtkStatus_t invoke(Call call, gmtkPlan_t plan, const gmtkStepArgs_t& args, void* workspace, size_t bytes,
                    cudaStream_t stream) {
  return call == Call::select ? gmtkSelectThresholds(plan, &args, workspace, bytes, stream)
                              : gmtkMaskGradients(plan, &args, workspace, bytes, stream);
}

// What a call writes, as bits.
struct Outputs {
  std::vector<uint32_t> threshold_bits;
  std::vector<int64_t> kept;
  uint32_t found_inf_bits = 0;
};

// Before a call every output holds all-ones bytes (a NaN threshold, a kept
// count of -1, a NaN found_inf), so an output left unwritten is seen.
constexpr unsigned char kUnwrittenByte = 0xFF;

class CpuRun {
 public:
  explicit CpuRun(const Case& c)
      : case_(c),
        handle_(GMTK_BACKEND_CPU_REFERENCE),
        arena_(c.arena_bytes),
        plan_(handle_.handle, c, load_and_get(c)),
        thresholds_(c.tensors.size()),
        kept_(c.tensors.size()),
        inv_scale_(c.inv_scale) {
    size_t bytes = 0;
    GPU_GMTK_OK(gmtkPlanGetWorkspaceSize(plan_.plan, &bytes));
    workspace_.resize(bytes);
    reset_outputs();
  }

  void load(const std::vector<unsigned char>& grads) { std::memcpy(arena_.data(), grads.data(), grads.size()); }
  void set_inv_scale(float value) { inv_scale_ = value; }
  void set_group(int32_t group, const gmtkGroupConfig_t& config) {
    GPU_GMTK_OK(gmtkPlanSetGroupHyperparams(plan_.plan, group, &config));
  }
  const unsigned char* grads() const { return arena_.data(); }

  Outputs call(Call call, bool reset = true) {
    if (reset) reset_outputs();
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.thresholds = thresholds_.empty() ? nullptr : thresholds_.data();
    args.kept_counts = kept_.empty() ? nullptr : kept_.data();
    args.found_inf = &found_inf_;
    args.inv_loss_scale = case_.use_inv_scale ? &inv_scale_ : nullptr;
    GPU_GMTK_OK(
        invoke(call, plan_.plan, args, workspace_.empty() ? nullptr : workspace_.data(), workspace_.size(), nullptr));
    Outputs out;
    out.threshold_bits.resize(thresholds_.size());
    for (size_t t = 0; t < thresholds_.size(); ++t) out.threshold_bits[t] = bits_of(thresholds_[t]);
    out.kept = kept_;
    out.found_inf_bits = bits_of(found_inf_);
    return out;
  }

 private:
  unsigned char* load_and_get(const Case& c) {
    load(c.grads);
    return arena_.data();
  }
  void reset_outputs() {
    std::memset(thresholds_.data(), kUnwrittenByte, thresholds_.size() * sizeof(float));
    std::memset(kept_.data(), kUnwrittenByte, kept_.size() * sizeof(int64_t));
    std::memset(&found_inf_, kUnwrittenByte, sizeof(float));
  }

  const Case& case_;
  HandleOwner handle_;
  HostArena arena_;
  PlanOwner plan_;
  std::vector<unsigned char> workspace_;
  std::vector<float> thresholds_;
  std::vector<int64_t> kept_;
  float found_inf_ = 0.0f;
  float inv_scale_ = 1.0f;
};

class CudaRun {
 public:
  CudaRun(const Case& c, cudaStream_t stream)
      : case_(c),
        stream_(stream),
        handle_(GMTK_BACKEND_CUDA),
        arena_(c.arena_bytes),
        plan_(handle_.handle, c, arena_.bytes()),
        thresholds_(c.tensors.size() * sizeof(float)),
        kept_(c.tensors.size() * sizeof(int64_t)),
        found_inf_(sizeof(float)),
        inv_scale_(sizeof(float)) {
    GPU_GMTK_OK(gmtkPlanGetWorkspaceSize(plan_.plan, &workspace_bytes_));
    if (c.plan_owned_workspace) {
      INFO("a plan made with GMTK_PLAN_ALLOCATE_WORKSPACE reports 0 bytes (docs/api.md)");
      CHECK(workspace_bytes_ == 0);
      workspace_bytes_ = 0;
    } else if (workspace_bytes_ > 0) {
      workspace_.allocate(workspace_bytes_ + c.workspace_misalign);
    }
    load(c.grads);
    set_inv_scale(c.inv_scale);
    reset_outputs();
    sync();
  }

  void sync() { GPU_CUDA_OK(cudaStreamSynchronize(stream_)); }  // never cudaDeviceSynchronize

  // Gradient bytes in, with a copy ordered on the caller's stream.
  void load(const std::vector<unsigned char>& grads) {
    GPU_CUDA_OK(cudaMemcpyAsync(arena_.bytes(), grads.data(), grads.size(), cudaMemcpyHostToDevice, stream_));
    sync();
  }
  void set_inv_scale(float value) {
    host_inv_scale_ = value;
    GPU_CUDA_OK(cudaMemcpyAsync(inv_scale_.bytes(), &host_inv_scale_, sizeof(float), cudaMemcpyHostToDevice, stream_));
    sync();
  }
  void set_group(int32_t group, const gmtkGroupConfig_t& config) {
    GPU_GMTK_OK(gmtkPlanSetGroupHyperparams(plan_.plan, group, &config));
  }
  void reset_outputs() {
    const size_t n = case_.tensors.size();
    GPU_CUDA_OK(cudaMemsetAsync(thresholds_.bytes(), kUnwrittenByte, n * sizeof(float), stream_));
    GPU_CUDA_OK(cudaMemsetAsync(kept_.bytes(), kUnwrittenByte, n * sizeof(int64_t), stream_));
    GPU_CUDA_OK(cudaMemsetAsync(found_inf_.bytes(), kUnwrittenByte, sizeof(float), stream_));
  }

  gmtkStepArgs_t args() const {
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.thresholds = reinterpret_cast<float*>(thresholds_.bytes());
    args.kept_counts = reinterpret_cast<int64_t*>(kept_.bytes());
    args.found_inf = reinterpret_cast<float*>(found_inf_.bytes());
    args.inv_loss_scale = case_.use_inv_scale ? reinterpret_cast<const float*>(inv_scale_.bytes()) : nullptr;
    return args;
  }
  void* workspace() const { return workspace_bytes_ > 0 ? workspace_.bytes() + case_.workspace_misalign : nullptr; }
  size_t workspace_bytes() const { return workspace_bytes_; }
  gmtkPlan_t plan() const { return plan_.plan; }
  unsigned char* device_grads() const { return arena_.bytes(); }

  // Queues the call on the stream and returns; nothing waits for it.
  gmtkStatus_t launch(Call call) { return invoke(call, plan_.plan, args(), workspace(), workspace_bytes_, stream_); }

  Outputs call(Call call, bool reset = true) {
    if (reset) reset_outputs();
    GPU_GMTK_OK(launch(call));
    return fetch_outputs();
  }

  Outputs fetch_outputs() {
    Outputs out = empty_outputs();
    const size_t n = case_.tensors.size();
    GPU_CUDA_OK(cudaMemcpyAsync(out.threshold_bits.data(), thresholds_.bytes(), n * sizeof(float),
                                cudaMemcpyDeviceToHost, stream_));
    GPU_CUDA_OK(cudaMemcpyAsync(out.kept.data(), kept_.bytes(), n * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    GPU_CUDA_OK(
        cudaMemcpyAsync(&out.found_inf_bits, found_inf_.bytes(), sizeof(float), cudaMemcpyDeviceToHost, stream_));
    sync();
    return out;
  }
  std::vector<unsigned char> fetch_grads() {
    std::vector<unsigned char> grads(case_.arena_bytes);
    GPU_CUDA_OK(cudaMemcpyAsync(grads.data(), arena_.bytes(), grads.size(), cudaMemcpyDeviceToHost, stream_));
    sync();
    return grads;
  }

  // Reads outputs and gradients through the legacy default stream, which does
  // not wait for a non-blocking stream: it shows what has run so far.
  cudaError_t peek_through_legacy_stream(Outputs* out, std::vector<unsigned char>* grads) const {
    *out = empty_outputs();
    grads->resize(case_.arena_bytes);
    const size_t n = case_.tensors.size();
    cudaError_t error =
        cudaMemcpy(out->threshold_bits.data(), thresholds_.bytes(), n * sizeof(float), cudaMemcpyDeviceToHost);
    if (error == cudaSuccess) {
      error = cudaMemcpy(out->kept.data(), kept_.bytes(), n * sizeof(int64_t), cudaMemcpyDeviceToHost);
    }
    if (error == cudaSuccess) {
      error = cudaMemcpy(&out->found_inf_bits, found_inf_.bytes(), sizeof(float), cudaMemcpyDeviceToHost);
    }
    if (error == cudaSuccess) error = cudaMemcpy(grads->data(), arena_.bytes(), grads->size(), cudaMemcpyDeviceToHost);
    return error;
  }

 private:
  Outputs empty_outputs() const {
    Outputs out;
    out.threshold_bits.assign(case_.tensors.size(), 0);
    out.kept.assign(case_.tensors.size(), 0);
    return out;
  }

  const Case& case_;
  cudaStream_t stream_;
  HandleOwner handle_;
  DeviceMemory arena_;
  PlanOwner plan_;
  DeviceMemory thresholds_, kept_, found_inf_, inv_scale_;
  DeviceMemory workspace_;
  size_t workspace_bytes_ = 0;
  float host_inv_scale_ = 1.0f;
};

// ---- Comparisons ------------------------------------------------------------------------

void compare_outputs(const Case& c, const std::string& what, const Outputs& want, const Outputs& got) {
  size_t mismatches = 0;
  std::ostringstream first;
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    if (want.threshold_bits[t] == got.threshold_bits[t] && want.kept[t] == got.kept[t]) continue;
    if (++mismatches <= kReportedMismatches) {
      first << "\n  " << tensor_label(c, t) << ": threshold " << float_text(want.threshold_bits[t]) << " vs "
            << float_text(got.threshold_bits[t]) << ", kept " << want.kept[t] << " vs " << got.kept[t];
    }
  }
  INFO(what << ": " << mismatches << " of " << c.tensors.size() << " tensors differ (first vs second)" << first.str());
  CHECK(mismatches == 0);
  INFO(what << ": found_inf " << float_text(want.found_inf_bits) << " vs " << float_text(got.found_inf_bits));
  CHECK(want.found_inf_bits == got.found_inf_bits);
}

// Every gradient byte of every tensor after masking, CPU against CUDA.
void compare_grads(const Case& c, const unsigned char* original, const unsigned char* cpu, const unsigned char* cuda) {
  size_t mismatches = 0;
  std::ostringstream first;
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    const TensorSpec& spec = c.tensors[t];
    const size_t offset = c.offsets[t];
    const size_t width = element_size(spec.dtype);
    if (std::memcmp(cpu + offset, cuda + offset, static_cast<size_t>(spec.numel) * width) == 0) continue;
    for (int64_t i = 0; i < spec.numel; ++i) {
      const uint32_t want = raw_bits_at(spec.dtype, cpu + offset, static_cast<size_t>(i));
      const uint32_t got = raw_bits_at(spec.dtype, cuda + offset, static_cast<size_t>(i));
      if (want == got) continue;
      if (++mismatches <= kReportedMismatches) {
        first << "\n  " << tensor_label(c, t) << " entry " << i << ": was "
              << hex_text(raw_bits_at(spec.dtype, original + offset, static_cast<size_t>(i))) << ", CPU "
              << hex_text(want) << ", CUDA " << hex_text(got);
      }
    }
  }
  INFO("gmtkMaskGradients: " << mismatches << " gradient entries differ between CPU and CUDA" << first.str());
  CHECK(mismatches == 0);
}

// Bytes of the arena outside every tensor must keep the padding.
void check_padding(const Case& c, const unsigned char* arena, const std::string& what) {
  size_t changed = 0;
  size_t first = 0;
  size_t region_start = 0;
  auto scan = [&](size_t from, size_t to) {
    for (size_t b = from; b < to; ++b) {
      if (arena[b] != kPadByte) {
        if (changed++ == 0) first = b;
      }
    }
  };
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    scan(region_start, c.offsets[t]);
    region_start = c.offsets[t] + static_cast<size_t>(c.tensors[t].numel) * element_size(c.tensors[t].dtype);
  }
  scan(region_start, c.arena_bytes);
  INFO(what << ": " << changed << " bytes outside every tensor were written; the first at arena byte " << first);
  CHECK(changed == 0);
}

// Whole arenas that must be byte-identical; says where they first differ.
void check_same_bytes(const std::string& what, const std::vector<unsigned char>& want,
                      const std::vector<unsigned char>& got) {
  REQUIRE(want.size() == got.size());
  size_t differing = 0;
  size_t first = 0;
  for (size_t b = 0; b < want.size(); ++b) {
    if (want[b] != got[b] && differing++ == 0) first = b;
  }
  INFO(what << ": " << differing << " bytes differ; the first at arena byte " << first);
  CHECK(differing == 0);
}

// ---- The definition, computed here ------------------------------------------------------------

// How a set of entries (one tensor, or a global group) is cut.
struct Cut {
  enum Kind { keep_all, keep_none, by_key } kind = keep_all;
  uint32_t key = 0;  // by_key: the key of T, the k-th largest
  gmtkDtype_t dtype = GMTK_FLOAT32;
  bool has_non_finite = false;

  bool keeps(uint32_t entry_key) const { return kind == keep_all || (kind == by_key && entry_key >= key); }
};

// k = n - floor(r * n), the product in double (docs/semantics.md).
Cut cut_by_definition(std::vector<uint32_t>& keys, double ratio, gmtkDtype_t dtype) {
  Cut cut;
  cut.dtype = dtype;
  for (uint32_t key : keys) cut.has_non_finite |= key >= infinity_key(dtype);
  const uint64_t n = keys.size();
  const uint64_t masked = static_cast<uint64_t>(std::floor(ratio * static_cast<double>(n)));
  const uint64_t k = n - masked;
  if (masked == 0) return cut;  // also the empty set
  if (k == 0) {
    cut.kind = Cut::keep_none;
    return cut;
  }
  std::nth_element(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(k - 1), keys.end(),
                   std::greater<uint32_t>());
  cut.kind = Cut::by_key;
  cut.key = keys[k - 1];
  return cut;
}

std::vector<uint32_t> keys_of(const Case& c, const unsigned char* arena, size_t t) {
  const TensorSpec& spec = c.tensors[t];
  std::vector<uint32_t> keys(static_cast<size_t>(spec.numel));
  for (size_t i = 0; i < keys.size(); ++i)
    keys[i] = key_of_bits(spec.dtype, raw_bits_at(spec.dtype, arena + c.offsets[t], i));
  return keys;
}

// One cut per tensor: its own, or its global group's.
std::vector<Cut> cuts_by_definition(const Case& c, const unsigned char* arena) {
  std::vector<Cut> cuts(c.tensors.size());
  for (size_t g = 0; g < c.groups.size(); ++g) {
    const gmtkGroupConfig_t& group = c.groups[g];
    std::vector<size_t> members;
    for (size_t t = 0; t < c.tensors.size(); ++t) {
      if (c.tensors[t].group == static_cast<int32_t>(g)) members.push_back(t);
    }
    if (members.empty()) continue;
    if (group.scope == GMTK_SCOPE_GLOBAL) {
      std::vector<uint32_t> keys;
      for (size_t t : members) {
        const std::vector<uint32_t> own = keys_of(c, arena, t);
        keys.insert(keys.end(), own.begin(), own.end());
      }
      const Cut cut = cut_by_definition(keys, group.mask_ratio, c.tensors[members[0]].dtype);
      for (size_t t : members) cuts[t] = cut;
    } else {
      for (size_t t : members) {
        std::vector<uint32_t> keys = keys_of(c, arena, t);
        cuts[t] = cut_by_definition(keys, group.mask_ratio, c.tensors[t].dtype);
      }
    }
  }
  return cuts;
}

// found_inf: any gradient not finite after unscaling (a float product, as the
// step computes it).
bool any_non_finite(const Case& c, const unsigned char* arena) {
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    const TensorSpec& spec = c.tensors[t];
    for (int64_t i = 0; i < spec.numel; ++i) {
      float value = value_of_bits(spec.dtype, raw_bits_at(spec.dtype, arena + c.offsets[t], static_cast<size_t>(i)));
      if (c.use_inv_scale) value = value * c.inv_scale;
      if (!std::isfinite(value)) return true;
    }
  }
  return false;
}

// Checks a backend's outputs (and, after a mask, its gradients) against the
// definition computed from the original gradient bytes.
void check_definition(const Case& c, const unsigned char* original, const Outputs& got, const unsigned char* masked) {
  const bool non_finite = any_non_finite(c, original);
  {
    INFO("found_inf must be " << (non_finite ? "1.0f" : "0.0f") << ", is " << float_text(got.found_inf_bits));
    CHECK(got.found_inf_bits == bits_of(non_finite ? 1.0f : 0.0f));
  }

  const std::vector<Cut> cuts = cuts_by_definition(c, original);
  size_t mismatches = 0;
  std::ostringstream first;
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    const Cut& cut = cuts[t];
    const TensorSpec& spec = c.tensors[t];
    // T: 0 when nothing is masked (or the set is empty), +inf when everything
    // is, else the k-th largest magnitude as a float. A NaN T is only checked
    // to be NaN: how its payload widens to fp32 is not specified.
    bool threshold_ok;
    std::string want_threshold;
    if (cut.kind == Cut::keep_all) {
      threshold_ok = got.threshold_bits[t] == bits_of(0.0f);
      want_threshold = "0";
    } else if (cut.kind == Cut::keep_none) {
      threshold_ok = got.threshold_bits[t] == bits_of(std::numeric_limits<float>::infinity());
      want_threshold = "+inf";
    } else if (key_is_nan(cut.dtype, cut.key)) {
      threshold_ok = std::isnan(float_from_bits(got.threshold_bits[t]));
      want_threshold = "NaN (key " + hex_text(cut.key) + ")";
    } else {
      const uint32_t want = bits_of(value_of_bits(cut.dtype, cut.key));
      threshold_ok = got.threshold_bits[t] == want;
      want_threshold = float_text(want);
    }
    // Kept: entries whose key is >= T's. At ratio 1 with non-finite entries
    // the contract is silent on whether +inf / NaN entries count as kept
    // (T = +inf, "nothing is kept"), so that count is not checked here.
    int64_t want_kept = 0;
    bool kept_checked = true;
    if (cut.kind == Cut::keep_all) {
      want_kept = spec.numel;
    } else if (cut.kind == Cut::keep_none) {
      kept_checked = !cut.has_non_finite;
    } else {
      for (int64_t i = 0; i < spec.numel; ++i) {
        const uint32_t key =
            key_of_bits(spec.dtype, raw_bits_at(spec.dtype, original + c.offsets[t], static_cast<size_t>(i)));
        want_kept += cut.keeps(key) ? 1 : 0;
      }
    }
    const bool kept_ok = !kept_checked || got.kept[t] == want_kept;
    if (threshold_ok && kept_ok) continue;
    if (++mismatches <= kReportedMismatches) {
      first << "\n  " << tensor_label(c, t) << ": threshold " << float_text(got.threshold_bits[t]) << ", want "
            << want_threshold << "; kept " << got.kept[t] << ", want " << want_kept;
    }
  }
  {
    INFO("against the definition: " << mismatches << " tensors have a wrong threshold or kept count" << first.str());
    CHECK(mismatches == 0);
  }

  if (masked == nullptr) return;
  // Mask: kept entries keep their bits, masked ones become +0; with a
  // non-finite gradient anywhere, nothing changes.
  size_t wrong_entries = 0;
  std::ostringstream first_entries;
  for (size_t t = 0; t < c.tensors.size(); ++t) {
    const TensorSpec& spec = c.tensors[t];
    const unsigned char* before = original + c.offsets[t];
    const unsigned char* after = masked + c.offsets[t];
    for (int64_t i = 0; i < spec.numel; ++i) {
      const uint32_t was = raw_bits_at(spec.dtype, before, static_cast<size_t>(i));
      const uint32_t now = raw_bits_at(spec.dtype, after, static_cast<size_t>(i));
      const bool kept = non_finite || cuts[t].keeps(key_of_bits(spec.dtype, was));
      const uint32_t want = kept ? was : 0u;
      if (now == want) continue;
      if (++wrong_entries <= kReportedMismatches) {
        first_entries << "\n  " << tensor_label(c, t) << " entry " << i << ": was " << hex_text(was) << ", is "
                      << hex_text(now) << ", want " << hex_text(want);
      }
    }
  }
  {
    INFO("masked gradients against the definition: " << wrong_entries << " entries wrong" << first_entries.str());
    CHECK(wrong_entries == 0);
  }
  check_padding(c, masked, "gmtkMaskGradients");
}

// ---- The differential run ----------------------------------------------------------------------

struct CudaResults {
  Outputs select, mask;
  std::vector<unsigned char> masked_grads;
};

// Select, then mask, on both backends from the same gradient bytes; compares
// them bit for bit and checks both calls' CUDA results against the definition.
CudaResults run_differential(const Case& c, cudaStream_t stream) {
  INFO(describe(c));
  CpuRun cpu(c);
  CudaRun cuda(c, stream);
  CudaResults results;

  const Outputs cpu_select = cpu.call(Call::select);
  results.select = cuda.call(Call::select);
  compare_outputs(c, "gmtkSelectThresholds, CPU vs CUDA", cpu_select, results.select);
  check_definition(c, c.grads.data(), results.select, nullptr);
  check_same_bytes("gmtkSelectThresholds must write no gradient or padding byte", c.grads, cuda.fetch_grads());

  const Outputs cpu_mask = cpu.call(Call::mask);
  results.mask = cuda.call(Call::mask);
  compare_outputs(c, "gmtkMaskGradients, CPU vs CUDA", cpu_mask, results.mask);
  compare_outputs(c, "CUDA: gmtkSelectThresholds vs gmtkMaskGradients (same outputs, docs/api.md)", results.select,
                  results.mask);
  results.masked_grads = cuda.fetch_grads();
  compare_grads(c, c.grads.data(), cpu.grads(), results.masked_grads.data());
  check_definition(c, c.grads.data(), results.mask, results.masked_grads.data());
  return results;
}

// With a non-finite gradient in the plan: both calls report found_inf, and
// the mask leaves every gradient byte as it was.
void check_found_inf_leaves_gradients(const Case& c, const CudaResults& results) {
  CHECK(results.select.found_inf_bits == bits_of(1.0f));
  CHECK(results.mask.found_inf_bits == bits_of(1.0f));
  check_same_bytes("with found_inf set, gmtkMaskGradients leaves the gradients", c.grads, results.masked_grads);
}

}  // namespace

// ---- Tests ------------------------------------------------------------------------------------------

TEST_CASE("the tests' own fp16 and bf16 rounding gives the known bit patterns", "[selection][small]") {
  // Exact values, the largest finite, the overflow boundary (ties to even go
  // to infinity), subnormals and their ties, signed zero, NaN.
  CHECK(narrow_to_16(1.0f, kHalf) == 0x3C00);
  CHECK(narrow_to_16(-2.0f, kHalf) == 0xC000);
  CHECK(narrow_to_16(65504.0f, kHalf) == 0x7BFF);
  CHECK(narrow_to_16(65519.0f, kHalf) == 0x7BFF);
  CHECK(narrow_to_16(65520.0f, kHalf) == 0x7C00);
  CHECK(narrow_to_16(std::ldexp(1.0f, -24), kHalf) == 0x0001);
  CHECK(narrow_to_16(std::ldexp(1.0f, -25), kHalf) == 0x0000);                      // tie to even: 0
  CHECK(narrow_to_16(std::ldexp(3.0f, -25), kHalf) == 0x0002);                      // tie to even: 2
  CHECK(narrow_to_16(std::ldexp(1.0f, -14) * (1 - 1.0f / 2048), kHalf) == 0x0400);  // rounds up to the smallest normal
  CHECK(narrow_to_16(1.0f + 1.0f / 2048, kHalf) == 0x3C00);                         // tie to even
  CHECK(narrow_to_16(1.0f + 3.0f / 2048, kHalf) == 0x3C02);
  CHECK(narrow_to_16(-0.0f, kHalf) == 0x8000);
  CHECK(narrow_to_16(std::numeric_limits<float>::quiet_NaN(), kHalf) == 0x7E00);
  CHECK(narrow_to_16(1.0f, kBfloat) == 0x3F80);
  CHECK(narrow_to_16(1.0f + 1.0f / 256, kBfloat) == 0x3F80);  // tie to even
  CHECK(narrow_to_16(1.0f + 3.0f / 256, kBfloat) == 0x3F82);
  CHECK(narrow_to_16(std::numeric_limits<float>::max(), kBfloat) == 0x7F80);
  CHECK(narrow_to_16(float_from_bits(0x7F7F7FFF), kBfloat) == 0x7F7F);
  CHECK(narrow_to_16(float_from_bits(0x00000001), kBfloat) == 0x0000);
  CHECK(narrow_to_16(float_from_bits(0x00010000), kBfloat) == 0x0001);
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {  // every finite 16-bit value survives a round trip
    for (gmtkDtype_t dtype : {GMTK_FLOAT16, GMTK_BFLOAT16}) {
      const Format16& format = format_of(dtype);
      if ((bits & format.infinity) == format.infinity && (bits & 0x7FFFu) != format.infinity) continue;  // NaN
      const uint16_t back = narrow_to_16(widen_from_16(static_cast<uint16_t>(bits), format), format);
      if (back != bits) {
        INFO(dtype_name(dtype) << " bits " << hex_text(bits) << " came back as " << hex_text(back));
        CHECK(back == bits);
      }
    }
  }
}

TEST_CASE("CUDA selection and masking equal the CPU reference bit for bit: a small plan per dtype",
          "[selection][small]") {
  Stream stream;
  for (gmtkDtype_t dtype : kDtypes) {
    Case c;
    c.name = std::string("small, ") + dtype_name(dtype);
    c.seed = 10 + static_cast<uint64_t>(dtype);
    c.groups = {selection_group(0.7, GMTK_SCOPE_PER_TENSOR), selection_group(0.5, GMTK_SCOPE_GLOBAL)};
    c.tensors = {tensor(0, 1000, dtype, Content::gaussian, misalign_for(dtype, 1)),
                 tensor(0, 1, dtype, Content::gaussian),
                 tensor(0, 0, dtype, Content::gaussian),
                 tensor(0, 257, dtype, Content::quantized_256, misalign_for(dtype, 2)),
                 tensor(1, 300, dtype, Content::heavy_tail, misalign_for(dtype, 3)),
                 tensor(1, 129, dtype, Content::two_values),
                 tensor(1, 0, dtype, Content::gaussian, misalign_for(dtype, 5))};
    c.tensors.back().null_if_empty = false;  // an empty tensor at a real address
    c.plan_owned_workspace = dtype == GMTK_BFLOAT16;
    c.workspace_misalign = dtype == GMTK_FLOAT16 ? 4 : 0;
    prepare(c);
    const CudaResults results = run_differential(c, stream.get());
    CHECK(results.select.found_inf_bits == bits_of(0.0f));
  }

  // Non-finite gradients: found_inf is 1 and the mask leaves every byte.
  Case c;
  c.name = "small, NaN and inf, fp16";
  c.seed = 20;
  c.groups = {selection_group(0.5, GMTK_SCOPE_PER_TENSOR), selection_group(0.9, GMTK_SCOPE_GLOBAL)};
  c.tensors = {tensor(0, 200, GMTK_FLOAT16, Content::nan_and_inf, 2), tensor(1, 150, GMTK_FLOAT16, Content::gaussian),
               tensor(1, 90, GMTK_FLOAT16, Content::nan_and_inf, 6)};
  prepare(c);
  const CudaResults results = run_differential(c, stream.get());
  check_found_inf_leaves_gradients(c, results);
  check_no_cuda_error_left();
}

// The multi-block path (pass A's histograms, the scans, pass B's staged
// candidates, pass C from candidates and from a re-read, fp16/bf16's 15-bit
// histogram) starts at 2^18 fp32 or 2^21 16-bit entries a set: this case puts
// it in the [small] subset that compute-sanitizer runs.
TEST_CASE("CUDA equals the CPU reference on the large-set path, gathering and overflowing candidates",
          "[selection][small]") {
  Stream stream;
  Case c;
  c.name = "small, large sets";
  c.seed = 30;
  c.groups = {selection_group(0.9, GMTK_SCOPE_PER_TENSOR), selection_group(0.5, GMTK_SCOPE_GLOBAL),
              selection_group(0.99, GMTK_SCOPE_PER_TENSOR)};
  c.tensors = {tensor(0, (int64_t{1} << 18) + 5, GMTK_FLOAT32, Content::gaussian, 4),    // candidates fit
               tensor(0, (int64_t{1} << 18) + 3, GMTK_FLOAT32, Content::two_values, 8),  // they overflow
               tensor(1, 150001, GMTK_FLOAT32, Content::heavy_tail),                     // one global set of
               tensor(1, 150003, GMTK_FLOAT32, Content::quantized_256, 12),              // two tensors
               tensor(2, (int64_t{1} << 21) + 3, GMTK_BFLOAT16, Content::gaussian, 2)};   // 15-bit histogram
  prepare(c);
  run_differential(c, stream.get());
  check_no_cuda_error_left();
}

TEST_CASE("CUDA equals the CPU reference for every gradient content, dtype and ratio, in both scopes", "[selection]") {
  Stream stream;
  std::vector<Content> contents(std::begin(kFiniteContents), std::end(kFiniteContents));
  contents.push_back(Content::nan_and_inf);
  contents.push_back(Content::raw_bits);
  uint64_t seed = 1000;
  for (gmtkDtype_t dtype : kDtypes) {
    for (Content content : contents) {
      Case c;
      c.name = std::string(content_name(content)) + ", " + dtype_name(dtype);
      c.seed = seed++;
      // Group 0 per-tensor, group 1 global; sizes straddle vector widths.
      c.tensors = {tensor(0, 4097, dtype, content),
                   tensor(0, 1, dtype, content, misalign_for(dtype, 1)),
                   tensor(0, 0, dtype, content),
                   tensor(0, 1023, dtype, content, misalign_for(dtype, 2)),
                   tensor(1, 16385, dtype, content, misalign_for(dtype, 3)),
                   tensor(1, 255, dtype, content),
                   tensor(1, 0, dtype, content, misalign_for(dtype, 1))};
      c.tensors.back().null_if_empty = false;
      prepare(c);
      const std::vector<double> per_tensor_ratios = ratio_sweep(4097);
      const std::vector<double> global_ratios = ratio_sweep(group_entries(c, 1));
      for (size_t r = 0; r < per_tensor_ratios.size(); ++r) {
        // Different ratios in the two groups of one plan.
        c.groups = {selection_group(per_tensor_ratios[r], GMTK_SCOPE_PER_TENSOR),
                    selection_group(global_ratios[(r + 3) % global_ratios.size()], GMTK_SCOPE_GLOBAL)};
        c.plan_owned_workspace = r == 6;
        c.workspace_misalign = r == 2 ? 1 : r == 4 ? 100 : 0;
        const CudaResults results = run_differential(c, stream.get());
        if (content == Content::nan_and_inf) {
          check_found_inf_leaves_gradients(c, results);
        }
      }
    }
  }
  check_no_cuda_error_left();
}

TEST_CASE("CUDA equals the CPU reference for sizes 0, 1, 2^k - 1, 2^k + 1 up to 2^22 + 1 and a few million",
          "[selection]") {
  Stream stream;
  struct Size {
    int64_t numel;
    gmtkDtype_t dtype;
  };
  std::vector<Size> sizes;
  for (gmtkDtype_t dtype : kDtypes) {
    sizes.push_back({0, dtype});
    sizes.push_back({1, dtype});
  }
  for (int k = 1; k <= 16; ++k) {
    for (gmtkDtype_t dtype : kDtypes) {
      sizes.push_back({(int64_t{1} << k) - 1, dtype});
      sizes.push_back({(int64_t{1} << k) + 1, dtype});
    }
  }
  // The larger ones once each, the dtype rotating, to keep the CPU oracle's time down.
  const Size large[] = {{(1 << 17) - 1, GMTK_FLOAT32}, {(1 << 17) + 1, GMTK_BFLOAT16}, {(1 << 18) - 1, GMTK_FLOAT16},
                        {(1 << 18) + 1, GMTK_FLOAT32}, {(1 << 20) - 1, GMTK_BFLOAT16}, {(1 << 20) + 1, GMTK_FLOAT16},
                        {(1 << 22) - 1, GMTK_FLOAT32}, {(1 << 22) + 1, GMTK_BFLOAT16}};
  sizes.insert(sizes.end(), std::begin(large), std::end(large));

  const Content contents[] = {Content::gaussian, Content::heavy_tail, Content::quantized_256, Content::raw_finite_bits,
                              Content::two_values};
  for (size_t i = 0; i < sizes.size(); ++i) {
    const Size size = sizes[i];
    const Content content = contents[i % 5];
    const gmtkScope_t scope = i % 2 == 0 ? GMTK_SCOPE_PER_TENSOR : GMTK_SCOPE_GLOBAL;
    Case c;
    c.seed = 2000 + i;
    c.groups = {selection_group(ratio_sweep(size.numel)[i % 7], scope)};
    c.tensors = {tensor(0, size.numel, size.dtype, content, misalign_for(size.dtype, i))};
    c.name = "single tensor of " + std::to_string(size.numel) + " entries, " + dtype_name(size.dtype) + ", " +
             content_name(content);
    c.plan_owned_workspace = i % 5 == 4;
    prepare(c);
    run_differential(c, stream.get());
  }

  {  // Multi-million tensors, per-tensor: fp32 heavy tails beside a gaussian.
    Case c;
    c.name = "multi-million, fp32, per-tensor";
    c.seed = 2900;
    c.groups = {selection_group(0.99, GMTK_SCOPE_PER_TENSOR)};
    c.tensors = {tensor(0, 6000011, GMTK_FLOAT32, Content::heavy_tail, 4),
                 tensor(0, 1000003, GMTK_FLOAT32, Content::gaussian)};
    prepare(c);
    run_differential(c, stream.get());
  }
  {  // Global over three bf16 tensors, 5 million entries in all.
    Case c;
    c.name = "multi-million, bf16, global";
    c.seed = 2901;
    c.groups = {selection_group(0.9, GMTK_SCOPE_GLOBAL)};
    c.tensors = {tensor(0, 3000017, GMTK_BFLOAT16, Content::gaussian, 2),
                 tensor(0, 1999993, GMTK_BFLOAT16, Content::heavy_tail),
                 tensor(0, 5, GMTK_BFLOAT16, Content::quantized_256, 6)};
    prepare(c);
    run_differential(c, stream.get());
  }
  {  // fp16 random finite bits (a huge dynamic range), ratio 1 - 1/n.
    Case c;
    c.name = "multi-million, fp16, per-tensor, ratio 1 - 1/n";
    c.seed = 2902;
    const int64_t n = (int64_t{1} << 22) + 1;
    c.groups = {selection_group(1.0 - 1.0 / static_cast<double>(n), GMTK_SCOPE_PER_TENSOR)};
    c.tensors = {tensor(0, n, GMTK_FLOAT16, Content::raw_finite_bits, 12)};
    c.plan_owned_workspace = true;
    prepare(c);
    run_differential(c, stream.get());
  }
  check_no_cuda_error_left();
}

TEST_CASE("CUDA equals the CPU reference for unaligned gradient starts and sizes around vector widths", "[selection]") {
  Stream stream;
  uint64_t seed = 3000;
  for (gmtkDtype_t dtype : kDtypes) {
    const size_t starts = dtype == GMTK_FLOAT32 ? 4 : 6;  // 0, 4, 8, 12 or 0, 2, 4, 6, 8, 12 bytes
    for (gmtkScope_t scope : {GMTK_SCOPE_PER_TENSOR, GMTK_SCOPE_GLOBAL}) {
      Case c;
      c.name = std::string("unaligned starts, ") + dtype_name(dtype) +
               (scope == GMTK_SCOPE_GLOBAL ? ", global" : ", per-tensor");
      c.seed = seed++;
      c.groups = {selection_group(0.5, scope)};
      const int64_t sizes[] = {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 1023, 4099};
      size_t index = 0;
      for (size_t start = 0; start < starts; ++start) {
        for (int64_t n : sizes) {
          c.tensors.push_back(tensor(0, n, dtype, index % 3 == 0 ? Content::raw_finite_bits : Content::gaussian,
                                     misalign_for(dtype, start)));
          ++index;
        }
      }
      prepare(c);
      run_differential(c, stream.get());
    }
  }
  check_no_cuda_error_left();
}

TEST_CASE("CUDA equals the CPU reference for plans of 1, 3, 300 and 20000 tensors in several groups", "[selection]") {
  Stream stream;
  std::mt19937_64 rng(4000);
  {
    Case c;
    c.name = "1 tensor, fp16, global";
    c.seed = 4001;
    c.groups = {selection_group(0.9, GMTK_SCOPE_GLOBAL)};
    c.tensors = {tensor(0, 100003, GMTK_FLOAT16, Content::heavy_tail, 2)};
    prepare(c);
    run_differential(c, stream.get());
  }
  {
    Case c;
    c.name = "3 tensors, fp32 per-tensor and bf16 global";
    c.seed = 4003;
    c.groups = {selection_group(0.5, GMTK_SCOPE_PER_TENSOR), selection_group(0.99, GMTK_SCOPE_GLOBAL)};
    c.tensors = {tensor(0, 50000, GMTK_FLOAT32, Content::gaussian, 8), tensor(0, 3, GMTK_FLOAT32, Content::two_values),
                 tensor(1, 70001, GMTK_BFLOAT16, Content::quantized_256, 4)};
    c.workspace_misalign = 1;
    prepare(c);
    run_differential(c, stream.get());
  }
  {
    // 300 tensors, log-uniform sizes 0 .. 20000, seven groups. Per-tensor
    // groups may mix dtypes; a global group has one.
    Case c;
    c.name = "300 tensors, 7 groups";
    c.seed = 4300;
    std::uniform_real_distribution<double> log_size(0.0, std::log(20001.0));
    for (size_t t = 0; t < 300; ++t) {
      const auto group = static_cast<int32_t>(t % 7);
      gmtkDtype_t dtype = kDtypes[(t / 7) % 3];  // per-tensor groups 0, 1, 5: mixed
      if (group == 1 || group == 2) dtype = GMTK_FLOAT16;
      if (group == 3) dtype = GMTK_BFLOAT16;
      if (group == 4 || group == 6) dtype = GMTK_FLOAT32;
      const auto numel = static_cast<int64_t>(std::floor(std::exp(log_size(rng)))) - 1;
      const Content content = kFiniteContents[(t / 7) % 10];  // every content in every group
      c.tensors.push_back(tensor(group, numel, dtype, content, misalign_for(dtype, t)));
    }
    c.groups = {
        selection_group(0.9, GMTK_SCOPE_PER_TENSOR),
        selection_group(0.5, GMTK_SCOPE_PER_TENSOR),
        selection_group(0.99, GMTK_SCOPE_GLOBAL),
        selection_group(0.3, GMTK_SCOPE_GLOBAL),
        selection_group(1.0 - 1.0 / static_cast<double>(std::max<int64_t>(1, group_entries(c, 4))), GMTK_SCOPE_GLOBAL),
        selection_group(1.0, GMTK_SCOPE_PER_TENSOR),
        selection_group(0.0, GMTK_SCOPE_GLOBAL)};
    c.plan_owned_workspace = true;
    prepare(c);
    run_differential(c, stream.get());
  }
  {
    // 20000 tiny tensors of 0 .. 300 entries, four groups.
    Case c;
    c.name = "20000 tensors, 4 groups";
    c.seed = 4999;
    std::uniform_int_distribution<int64_t> small_size(0, 300);
    for (size_t t = 0; t < 20000; ++t) {
      const auto group = static_cast<int32_t>(t % 4);
      const gmtkDtype_t dtype = group == 0   ? GMTK_FLOAT32
                                : group == 1 ? kDtypes[(t / 4) % 3]
                                : group == 2 ? GMTK_BFLOAT16
                                             : GMTK_FLOAT32;
      c.tensors.push_back(
          tensor(group, small_size(rng), dtype, kFiniteContents[(t / 4) % 10], misalign_for(dtype, t / 4)));
    }
    c.groups = {selection_group(0.9, GMTK_SCOPE_PER_TENSOR), selection_group(0.5, GMTK_SCOPE_PER_TENSOR),
                selection_group(0.99, GMTK_SCOPE_GLOBAL), selection_group(0.3, GMTK_SCOPE_GLOBAL)};
    prepare(c);
    run_differential(c, stream.get());
  }
  check_no_cuda_error_left();
}

TEST_CASE("an inv_loss_scale that overflows a finite gradient sets found_inf, and the mask then leaves the gradients",
          "[selection]") {
  Stream stream;
  uint64_t seed = 5000;
  for (gmtkDtype_t dtype : kDtypes) {
    struct Scaling {
      const char* what;
      float inv_scale;
      bool with_outlier;
      bool overflows;
    };
    // 8 * 1e38 overflows fp32; gaussian entries of ~1e-3 times 1e38 do not.
    const Scaling scalings[] = {{"2^-10, no overflow", std::ldexp(1.0f, -10), true, false},
                                {"1e38 over an outlier of 8: overflow", 1e38f, true, true},
                                {"1e38 over small gradients only: no overflow", 1e38f, false, false}};
    for (const Scaling& scaling : scalings) {
      Case c;
      c.name = std::string("inv_loss_scale ") + scaling.what + ", " + dtype_name(dtype);
      c.seed = seed++;
      c.groups = {selection_group(0.5, GMTK_SCOPE_PER_TENSOR), selection_group(0.9, GMTK_SCOPE_GLOBAL)};
      c.tensors = {tensor(0, 5000, dtype, Content::gaussian, misalign_for(dtype, 1)),
                   tensor(0, 3001, dtype, scaling.with_outlier ? Content::big_outlier : Content::gaussian),
                   tensor(1, 2049, dtype, Content::gaussian, misalign_for(dtype, 3)),
                   tensor(1, 100, dtype, Content::gaussian)};
      c.use_inv_scale = true;
      c.inv_scale = scaling.inv_scale;
      prepare(c);
      const CudaResults results = run_differential(c, stream.get());
      INFO(c.name);
      CHECK(results.select.found_inf_bits == bits_of(scaling.overflows ? 1.0f : 0.0f));
      if (scaling.overflows) {
        check_same_bytes("with found_inf set, gmtkMaskGradients leaves the gradients", c.grads, results.masked_grads);
      }
    }
  }
  check_no_cuda_error_left();
}

TEST_CASE("found_inf is reported even when no group masks anything (ratio 0 everywhere)", "[selection]") {
  // docs/semantics.md: found_inf is 1 when any gradient is not finite after
  // unscaling. Ratio 0 skips selection work, not the non-finite check.
  Stream stream;
  uint64_t seed = 5500;
  for (gmtkDtype_t dtype : kDtypes) {
    for (bool by_scale : {false, true}) {
      Case c;
      c.name = std::string("ratio 0 everywhere, ") + (by_scale ? "inv_loss_scale overflow" : "NaN and inf") + ", " +
               dtype_name(dtype);
      c.seed = seed++;
      c.groups = {selection_group(0.0, GMTK_SCOPE_PER_TENSOR), selection_group(0.0, GMTK_SCOPE_GLOBAL)};
      const Content content = by_scale ? Content::big_outlier : Content::nan_and_inf;
      c.tensors = {tensor(0, 3000, dtype, Content::gaussian), tensor(1, 1500, dtype, content, misalign_for(dtype, 1))};
      c.use_inv_scale = by_scale;
      c.inv_scale = by_scale ? 1e38f : 1.0f;
      prepare(c);
      const CudaResults results = run_differential(c, stream.get());
      INFO(c.name);
      check_found_inf_leaves_gradients(c, results);
    }
  }
  check_no_cuda_error_left();
}

TEST_CASE("consecutive calls on one plan follow gradient scale jumps of 1e6 and 1e-6 and mask_ratio changes",
          "[selection]") {
  Stream stream;
  Case c;
  c.name = "consecutive calls";
  c.seed = 6000;
  // Group 0 starts at ratio 0: the workspace queried then must serve the
  // ratios set later (mask_ratio may change without rebuilding the plan).
  c.groups = {selection_group(0.0, GMTK_SCOPE_PER_TENSOR), selection_group(0.9, GMTK_SCOPE_GLOBAL),
              selection_group(0.5, GMTK_SCOPE_GLOBAL)};
  c.tensors = {tensor(0, 65537, GMTK_FLOAT16, Content::gaussian, 2), tensor(0, 1000, GMTK_BFLOAT16, Content::gaussian),
               tensor(1, 30001, GMTK_FLOAT32, Content::gaussian, 4), tensor(1, 7, GMTK_FLOAT32, Content::gaussian),
               tensor(2, 4097, GMTK_BFLOAT16, Content::gaussian, 6), tensor(2, 0, GMTK_BFLOAT16, Content::gaussian, 8)};
  c.tensors.back().null_if_empty = false;
  prepare(c);

  struct SequenceCall {
    float scale;
    Content content;
    double ratios[3];
  };
  const SequenceCall calls[] = {
      {1e-2f, Content::gaussian, {0.0, 0.9, 0.5}},     {1e4f, Content::gaussian, {0.5, 0.99, 0.9}},  // x1e6
      {1e-2f, Content::heavy_tail, {0.9, 0.5, 0.0}},                                                 // x1e-6
      {1e-8f, Content::gaussian, {0.99, 1.0, 0.3}},     // x1e-6: fp16 entries go subnormal or to zero
      {1e-2f, Content::nan_and_inf, {0.3, 0.5, 0.99}},  // found_inf 1
      {1e4f, Content::gaussian, {1.0, 0.0, 0.5}},       // x1e6; found_inf back to 0: overwritten, not OR-ed
  };

  CpuRun cpu(c);
  CudaRun cuda(c, stream.get());
  const size_t workspace_bytes = cuda.workspace_bytes();
  for (size_t j = 0; j < sizeof(calls) / sizeof(calls[0]); ++j) {
    for (TensorSpec& spec : c.tensors) {
      spec.scale = calls[j].scale;
      spec.content = calls[j].content;
    }
    c.seed = 6001 + j;
    fill(c);  // overwrite the gradients, same layout
    cpu.load(c.grads);
    cuda.load(c.grads);
    for (int32_t g = 0; g < 3; ++g) {
      c.groups[static_cast<size_t>(g)].mask_ratio = calls[j].ratios[g];
      cpu.set_group(g, c.groups[static_cast<size_t>(g)]);
      cuda.set_group(g, c.groups[static_cast<size_t>(g)]);
    }
    INFO("call " << j << " of the sequence, gradient scale " << calls[j].scale);
    INFO(describe(c));
    size_t bytes_now = 0;
    GPU_GMTK_OK(gmtkPlanGetWorkspaceSize(cuda.plan(), &bytes_now));
    {
      INFO("a mask_ratio change must not make the plan need more workspace than it first said");
      CHECK(bytes_now <= workspace_bytes);
    }
    // Outputs are not reset between calls: each call must overwrite them.
    const Outputs cpu_select = cpu.call(Call::select, false);
    const Outputs cuda_select = cuda.call(Call::select, false);
    compare_outputs(c, "gmtkSelectThresholds, CPU vs CUDA", cpu_select, cuda_select);
    check_definition(c, c.grads.data(), cuda_select, nullptr);
    const Outputs cpu_mask = cpu.call(Call::mask, false);
    const Outputs cuda_mask = cuda.call(Call::mask, false);
    compare_outputs(c, "gmtkMaskGradients, CPU vs CUDA", cpu_mask, cuda_mask);
    const std::vector<unsigned char> masked = cuda.fetch_grads();
    compare_grads(c, c.grads.data(), cpu.grads(), masked.data());
    check_definition(c, c.grads.data(), cuda_mask, masked.data());
    CHECK(cuda_mask.found_inf_bits == bits_of(calls[j].content == Content::nan_and_inf ? 1.0f : 0.0f));
  }
  check_no_cuda_error_left();
}

TEST_CASE("a call captured in a CUDA graph and replayed gives the bits of eager calls", "[selection][small]") {
  Stream stream;
  Case c;
  c.name = "graph capture";
  c.seed = 7000;
  c.groups = {selection_group(0.9, GMTK_SCOPE_PER_TENSOR), selection_group(0.5, GMTK_SCOPE_GLOBAL)};
  c.tensors = {tensor(0, 1000, GMTK_FLOAT32, Content::gaussian, 4), tensor(0, 0, GMTK_FLOAT32, Content::gaussian),
               tensor(0, 513, GMTK_FLOAT32, Content::quantized_256),
               tensor(0, (int64_t{1} << 18) + 1, GMTK_FLOAT32, Content::gaussian),  // the multi-block passes
               tensor(1, 700, GMTK_BFLOAT16, Content::gaussian, 2),
               tensor(1, 1025, GMTK_BFLOAT16, Content::heavy_tail)};
  c.use_inv_scale = true;
  lay_out(c);

  // Three gradient sets; between replays only device memory changes (the
  // gradients and the inverse loss scale), as in a training loop.
  struct Replay {
    float scale;
    Content content;
    float inv_scale;
  };
  const Replay replays[] = {{1e-3f, Content::gaussian, std::ldexp(1.0f, -10)},
                            {1e3f, Content::gaussian, 1.0f},        // gradients x1e6
                            {1e-3f, Content::big_outlier, 1e38f}};  // the outlier overflows: found_inf 1
  std::vector<std::vector<unsigned char>> grads;
  for (size_t j = 0; j < 3; ++j) {
    for (TensorSpec& spec : c.tensors) {
      spec.scale = replays[j].scale;
      spec.content =
          replays[j].content == Content::big_outlier && spec.group == 1 ? Content::gaussian : replays[j].content;
    }
    c.seed = 7001 + j;
    fill(c);
    grads.push_back(c.grads);
  }

  for (Call call : {Call::select, Call::mask}) {
    INFO(call_name(call) << " captured in a graph");
    CudaRun cuda(c, stream.get());
    CpuRun cpu(c);

    // Eager calls first, on the same plan and data; also checked against the CPU.
    std::vector<Outputs> eager;
    std::vector<std::vector<unsigned char>> eager_grads;
    for (size_t j = 0; j < 3; ++j) {
      INFO("eager call " << j);
      c.grads = grads[j];
      c.inv_scale = replays[j].inv_scale;
      cuda.load(grads[j]);
      cuda.set_inv_scale(replays[j].inv_scale);
      cpu.load(grads[j]);
      cpu.set_inv_scale(replays[j].inv_scale);
      eager.push_back(cuda.call(call));
      eager_grads.push_back(cuda.fetch_grads());
      compare_outputs(c, std::string(call_name(call)) + ", CPU vs CUDA", cpu.call(call), eager.back());
      if (call == Call::mask) compare_grads(c, grads[j].data(), cpu.grads(), eager_grads.back().data());
      check_definition(c, grads[j].data(), eager.back(), call == Call::mask ? eager_grads.back().data() : nullptr);
    }
    CHECK(eager[2].found_inf_bits == bits_of(1.0f));

    // Capture in global mode, as torch.cuda.graph does: a call that
    // synchronizes or allocates while capturing fails here.
    GPU_CUDA_OK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
    const gmtkStatus_t captured = cuda.launch(call);
    const std::string message = captured == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage();
    cudaGraph_t graph = nullptr;
    const cudaError_t end_capture = cudaStreamEndCapture(stream.get(), &graph);
    {
      INFO("the call under capture returned " << gmtkGetErrorString(captured) << ": " << message);
      CHECK(captured == GMTK_SUCCESS);
    }
    INFO("cudaStreamEndCapture -> " << cudaGetErrorString(end_capture));
    REQUIRE(end_capture == cudaSuccess);
    REQUIRE(captured == GMTK_SUCCESS);
    cudaGraphExec_t exec = nullptr;
    GPU_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));

    for (size_t j = 0; j < 3; ++j) {
      INFO("replay " << j);
      // New gradient bytes (restored before each mask replay) and a new scale,
      // copied outside the graph on the same stream.
      GPU_CUDA_OK(
          cudaMemcpyAsync(cuda.device_grads(), grads[j].data(), grads[j].size(), cudaMemcpyHostToDevice, stream.get()));
      cuda.set_inv_scale(replays[j].inv_scale);
      cuda.reset_outputs();
      GPU_CUDA_OK(cudaGraphLaunch(exec, stream.get()));
      const Outputs replayed = cuda.fetch_outputs();
      compare_outputs(c, std::string(call_name(call)) + ", eager vs graph replay", eager[j], replayed);
      check_same_bytes("gradient bytes after the replay vs after the eager call", eager_grads[j], cuda.fetch_grads());
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  check_no_cuda_error_left();
}

TEST_CASE("calls queue their work on the caller's non-blocking stream and do not wait for it", "[selection]") {
  Stream stream;
  Case c;
  c.name = "stream order";
  c.seed = 8000;
  c.groups = {selection_group(0.9, GMTK_SCOPE_PER_TENSOR), selection_group(0.5, GMTK_SCOPE_GLOBAL)};
  c.tensors = {tensor(0, 20000, GMTK_FLOAT32, Content::gaussian), tensor(0, 3000, GMTK_FLOAT32, Content::heavy_tail, 4),
               tensor(1, 5000, GMTK_FLOAT16, Content::gaussian, 2), tensor(1, 77, GMTK_FLOAT16, Content::two_values)};
  prepare(c);
  INFO(describe(c));
  CpuRun cpu(c);
  const Outputs cpu_select = cpu.call(Call::select);
  const Outputs cpu_mask = cpu.call(Call::mask);
  CudaRun cuda(c, stream.get());  // uploads, resets outputs and synchronizes the stream

  // Hold the stream at a gate, queue both calls behind it, look at device
  // memory through the legacy stream, then open the gate.
  Gate gate;
  GPU_CUDA_OK(cudaLaunchHostFunc(stream.get(), hold_stream_until_open, &gate));
  const gmtkStatus_t select_status = cuda.launch(Call::select);
  const std::string select_message = select_status == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage();
  const gmtkStatus_t mask_status = cuda.launch(Call::mask);
  const std::string mask_message = mask_status == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage();
  const bool returned_while_held = !gate.timed_out.load();
  Outputs before_gate;
  std::vector<unsigned char> grads_before_gate;
  const cudaError_t peek = cuda.peek_through_legacy_stream(&before_gate, &grads_before_gate);
  gate.open = true;
  cuda.sync();

  {
    INFO("gmtkSelectThresholds: " << gmtkGetErrorString(select_status) << ": " << select_message);
    REQUIRE(select_status == GMTK_SUCCESS);
  }
  {
    INFO("gmtkMaskGradients: " << gmtkGetErrorString(mask_status) << ": " << mask_message);
    REQUIRE(mask_status == GMTK_SUCCESS);
  }
  {
    INFO("the calls returned only after the held stream ran on by itself: a call waited for the stream");
    CHECK(returned_while_held);
  }
  {
    INFO("reading device memory through the legacy stream: " << cudaGetErrorString(peek));
    REQUIRE(peek == cudaSuccess);
  }
  {
    // Work queued on the held stream cannot have run yet: anything written
    // already ran on another stream.
    INFO("outputs or gradients were written before the caller's stream reached the calls");
    CHECK(before_gate.found_inf_bits == 0xFFFFFFFFu);
    CHECK(std::all_of(before_gate.threshold_bits.begin(), before_gate.threshold_bits.end(),
                      [](uint32_t bits) { return bits == 0xFFFFFFFFu; }));
    CHECK(std::all_of(before_gate.kept.begin(), before_gate.kept.end(), [](int64_t kept) { return kept == -1; }));
    check_same_bytes("gradients before the held stream ran", c.grads, grads_before_gate);
  }

  // After the stream synchronize (only that stream): the mask's results.
  const Outputs after = cuda.fetch_outputs();
  compare_outputs(c, "gmtkMaskGradients on a held stream, CPU vs CUDA", cpu_mask, after);
  compare_outputs(c, "gmtkSelectThresholds vs gmtkMaskGradients", cpu_select, after);
  const std::vector<unsigned char> masked = cuda.fetch_grads();
  compare_grads(c, c.grads.data(), cpu.grads(), masked.data());
  check_definition(c, c.grads.data(), after, masked.data());
  check_no_cuda_error_left();
}

TEST_CASE("one fp32 tensor above 2^31 entries: thresholds and kept counts equal the analytic answer", "[.large]") {
  // Entry i holds kMagnitudes[i % 8] with sign kSigns[i % 8]: the counts of
  // each magnitude are known, so T and kept follow by counting from the top,
  // without running the CPU reference over 9 GB.
  const int64_t n = (int64_t{1} << 31) + 17;
  const float kMagnitudes[8] = {0.25f, 1.0f, 1.0f, 2.0f, 3.0f, 3.0f, 3.0f, 0.5f};
  const float kSigns[8] = {1, -1, 1, 1, -1, -1, 1, -1};
  const int64_t extra_entries = 1000;  // a second tensor of 4.0: above every entry of the large one
  const float extra_value = 4.0f;

  size_t free_bytes = 0, total_bytes = 0;
  GPU_CUDA_OK(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < static_cast<size_t>(n) * 4 + (size_t{2} << 30)) {
    WARN("not enough device memory for a " << n << "-entry fp32 tensor; skipped");
    return;
  }
  Stream stream;
  DeviceMemory big(static_cast<size_t>(n) * 4);
  DeviceMemory extra(static_cast<size_t>(extra_entries) * 4);
  {
    const size_t chunk = size_t{1} << 24;  // a multiple of the period 8
    std::vector<float> pattern(chunk);
    for (size_t i = 0; i < chunk; ++i) pattern[i] = kSigns[i % 8] * kMagnitudes[i % 8];
    for (size_t done = 0; done < static_cast<size_t>(n); done += chunk) {
      const size_t count = std::min(chunk, static_cast<size_t>(n) - done);
      GPU_CUDA_OK(cudaMemcpy(big.bytes() + done * 4, pattern.data(), count * 4, cudaMemcpyHostToDevice));
    }
    const std::vector<float> fours(static_cast<size_t>(extra_entries), extra_value);
    GPU_CUDA_OK(cudaMemcpy(extra.bytes(), fours.data(), fours.size() * 4, cudaMemcpyHostToDevice));
  }

  // (magnitude, count) from the largest down.
  std::vector<std::pair<float, int64_t>> levels;
  for (int p = 0; p < 8; ++p) {
    const int64_t count = n / 8 + (p < n % 8 ? 1 : 0);
    auto it = std::find_if(levels.begin(), levels.end(), [&](const auto& l) { return l.first == kMagnitudes[p]; });
    if (it == levels.end())
      levels.emplace_back(kMagnitudes[p], count);
    else
      it->second += count;
  }
  std::sort(levels.begin(), levels.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  // T and the kept count of the large tensor, given `above` entries over all of it.
  auto expected = [&](double ratio, int64_t total, int64_t above) {
    const int64_t k = total - static_cast<int64_t>(std::floor(ratio * static_cast<double>(total)));
    int64_t taken = above;
    for (const auto& level : levels) {
      taken += level.second;
      if (taken >= k) return std::make_pair(level.first, taken - above);
    }
    return std::make_pair(0.0f, n);
  };

  HandleOwner handle(GMTK_BACKEND_CUDA);
  DeviceMemory outputs(64);
  float* thresholds = reinterpret_cast<float*>(outputs.bytes());
  int64_t* kept = reinterpret_cast<int64_t*>(outputs.bytes() + 16);
  float* found_inf = reinterpret_cast<float*>(outputs.bytes() + 40);

  for (gmtkScope_t scope : {GMTK_SCOPE_PER_TENSOR, GMTK_SCOPE_GLOBAL}) {
    const bool global = scope == GMTK_SCOPE_GLOBAL;
    INFO((global ? "global over the large tensor and 1000 entries of 4.0" : "per-tensor") << ", n = " << n);
    gmtkGroupConfig_t group = selection_group(0.5, scope);
    gmtkTensor_t tensors[2] = {};
    tensors[0].numel = n;
    tensors[0].grad_dtype = GMTK_FLOAT32;
    tensors[0].grad = big.bytes();
    tensors[1].numel = extra_entries;
    tensors[1].grad_dtype = GMTK_FLOAT32;
    tensors[1].grad = extra.bytes();
    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = &group;
    config.num_groups = 1;
    config.tensors = tensors;
    config.num_tensors = global ? 2 : 1;
    gmtkPlan_t plan = nullptr;
    GPU_GMTK_OK(gmtkPlanCreate(handle.handle, &config, &plan));
    size_t workspace_bytes = 0;
    GPU_GMTK_OK(gmtkPlanGetWorkspaceSize(plan, &workspace_bytes));
    DeviceMemory workspace(workspace_bytes);
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.thresholds = thresholds;
    args.kept_counts = kept;
    args.found_inf = found_inf;

    for (double ratio : {0.5, 0.9, 0.3}) {
      INFO("ratio " << ratio);
      group.mask_ratio = ratio;
      GPU_GMTK_OK(gmtkPlanSetGroupHyperparams(plan, 0, &group));
      GPU_CUDA_OK(cudaMemsetAsync(outputs.bytes(), kUnwrittenByte, 64, stream.get()));
      GPU_GMTK_OK(gmtkSelectThresholds(plan, &args, workspace_bytes > 0 ? workspace.bytes() : nullptr, workspace_bytes,
                                       stream.get()));
      float got_thresholds[2] = {0, 0};
      int64_t got_kept[2] = {0, 0};
      float got_found_inf = -1;
      GPU_CUDA_OK(cudaMemcpyAsync(got_thresholds, thresholds, 8, cudaMemcpyDeviceToHost, stream.get()));
      GPU_CUDA_OK(cudaMemcpyAsync(got_kept, kept, 16, cudaMemcpyDeviceToHost, stream.get()));
      GPU_CUDA_OK(cudaMemcpyAsync(&got_found_inf, found_inf, 4, cudaMemcpyDeviceToHost, stream.get()));
      GPU_CUDA_OK(cudaStreamSynchronize(stream.get()));

      const auto want = global ? expected(ratio, n + extra_entries, extra_entries) : expected(ratio, n, 0);
      CHECK(bits_of(got_thresholds[0]) == bits_of(want.first));
      CHECK(got_kept[0] == want.second);
      CHECK(got_found_inf == 0.0f);
      if (global) {
        CHECK(bits_of(got_thresholds[1]) == bits_of(want.first));
        CHECK(got_kept[1] == extra_entries);
      }
    }
    gmtkPlanDestroy(plan);
  }
  check_no_cuda_error_left();
}
