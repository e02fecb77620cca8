// fuzz_api: random plans and calls on the CPU reference backend, built from
// the fuzzer's bytes: group and tensor descriptors (sizes, dtypes and enums
// in and out of range, ratios and hyper-parameters including NaN and inf,
// struct sizes of 0.1.0, of today and garbage), buffers that are NULL,
// misaligned, overlapping or shared, shards on a one-rank communicator, then
// up to four calls with fuzzed arguments and workspaces.
//
// Every pointer the harness hands the library lies inside one arena (or is
// NULL): a library that takes raw pointers cannot tell a wild one. The arena
// is poisoned for AddressSanitizer except the ranges handed out, so a read
// or write past what a descriptor names is reported even inside the arena.
// What is checked:
//   - no crash, no sanitizer report, no hang (sizes are small);
//   - a refused call (any status but GMTK_SUCCESS) changed no byte the caller
//     owns: the arena (buffers, outputs, workspace) is compared before and
//     after, and a failed gmtkPlanCreate leaves *plan as it was;
//   - every status is a gmtkStatus_t and comes with a message, and none is
//     GMTK_ERROR_INTERNAL (a bug by definition).
#include <gmtk/gmtk.h>

#include "choices.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/asan_interface.h>
#define GMTK_FUZZ_POISON(pointer, bytes) __asan_poison_memory_region((pointer), (bytes))
#define GMTK_FUZZ_UNPOISON(pointer, bytes) __asan_unpoison_memory_region((pointer), (bytes))
#endif
#endif
#ifndef GMTK_FUZZ_POISON
#define GMTK_FUZZ_POISON(pointer, bytes) ((void)(pointer), (void)(bytes))
#define GMTK_FUZZ_UNPOISON(pointer, bytes) ((void)(pointer), (void)(bytes))
#endif

namespace {

using gmtk_fuzz::Choices;

constexpr size_t kArenaBytes = size_t{1} << 16;

// Every buffer the library may read or write.
struct Arena {
  std::vector<unsigned char> bytes = std::vector<unsigned char>(kArenaBytes + 256);
  std::vector<std::pair<size_t, size_t>> handed;  // (offset, bytes) of every pointer given out for this input
  unsigned char* base() { return bytes.data() + (256 - reinterpret_cast<uintptr_t>(bytes.data()) % 256) % 256; }

  // The harness's own reads and writes (filling, snapshots) see everything;
  // between them only the handed-out ranges are addressable.
  void open_all() { GMTK_FUZZ_UNPOISON(bytes.data(), bytes.size()); }
  void seal() {
    GMTK_FUZZ_POISON(bytes.data(), bytes.size());
    for (const auto& range : handed) GMTK_FUZZ_UNPOISON(base() + range.first, range.second);
  }

  // Values a gradient or a state buffer may hold: normal numbers mostly,
  // with zeros, subnormals, infs and NaNs among them.
  void fill(Choices& in) {
    uint32_t state = in.u32() | 1u;
    for (size_t i = 0; i + 4 <= kArenaBytes; i += 4) {
      state = state * 1664525u + 1013904223u;
      uint32_t word = state;
      if ((state >> 28) == 0) word = 0x7F800000u | (state & 0x80400000u);  // inf or NaN
      else if ((state >> 28) == 1) word &= 0x807FFFFFu;                    // subnormal or zero
      else word = (word & 0x80FFFFFFu) | (0x3C000000u + ((state >> 8) & 0x03000000u));  // O(1e-3..1)
      std::memcpy(base() + i, &word, 4);
    }
  }

  // A pointer to `bytes` bytes: NULL, or somewhere in the arena (any
  // alignment); the same place twice now and then, so that buffers overlap.
  void* pointer(Choices& in, size_t bytes) {
    const uint8_t kind = in.byte();
    if (kind < 16 || bytes > kArenaBytes) return nullptr;  // never a range past the arena
    size_t offset = in.u16() % (kArenaBytes - bytes + 1);
    if (kind < 200) offset &= ~size_t{255};  // mostly aligned, so that most descriptors get past validation
    if (kind >= 200 && kind < 230) offset = last_offset_ < kArenaBytes - bytes ? last_offset_ : 0;  // overlap
    last_offset_ = offset;
    handed.emplace_back(offset, bytes);
    GMTK_FUZZ_UNPOISON(base() + offset, bytes);
    return base() + offset;
  }

 private:
  size_t last_offset_ = 0;
};

size_t dtype_bytes(int dtype) { return dtype == GMTK_FLOAT32 ? 4 : 2; }

// An array of `count` structs at a fuzzed stride (today's size, 0.1.0's, or
// another): the harness copies each struct's first `stride` bytes, so a
// library that read past the stride would read past the allocation.
template <typename T>
struct StridedArray {
  std::vector<unsigned char> bytes;
  size_t stride = sizeof(T);
  void build(const std::vector<T>& items, size_t chosen_stride) {
    stride = chosen_stride;
    bytes.assign(items.size() * stride, 0);
    if (bytes.empty()) return;
    for (size_t i = 0; i < items.size(); ++i) {
      std::memcpy(bytes.data() + i * stride, &items[i], stride < sizeof(T) ? stride : sizeof(T));
    }
  }
  const T* data() const { return bytes.empty() ? nullptr : reinterpret_cast<const T*>(bytes.data()); }
};

size_t struct_size(Choices& in, size_t today, size_t v0_1) {
  switch (in.byte() % 16) {
    case 0: return v0_1;
    case 1: return 0;
    case 2: return today + 8;
    case 3: return today - 4;
    default: return today;
  }
}

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "fuzz_api finding: %s (last message: %s)\n", what, gmtkGetLastErrorMessage());
  std::abort();
}

void check_status(gmtkStatus_t status) {
  int raw;  // as an int: an out-of-range enum read as one would trip UBSan here, in the harness
  std::memcpy(&raw, &status, sizeof(raw));
  if (raw < 0 || raw >= GMTK_NUM_STATUSES) finding("status out of range");
  if (status != GMTK_SUCCESS && std::strlen(gmtkGetLastErrorMessage()) == 0) finding("a failure without a message");
  if (status == GMTK_ERROR_INTERNAL) finding("GMTK_ERROR_INTERNAL: a bug by definition (docs/errors.md)");
}

gmtkGroupConfig_t fuzzed_group(Choices& in, Arena& arena) {
  gmtkGroupConfig_t group;
  gmtkGroupConfigInit(&group, static_cast<gmtkOptimizer_t>(in.byte() % 3));
  const uint8_t edits = in.byte();
  if (edits & 0x01) group.optimizer = static_cast<gmtkOptimizer_t>(in.raw_enum());
  if (edits & 0x02) group.lr = in.number();
  if (edits & 0x04) group.weight_decay = in.number();
  if (edits & 0x08) {
    group.beta1 = in.number();
    group.beta2 = in.number();
    group.eps = in.number();
  }
  if (edits & 0x10) {
    group.momentum = in.number();
    group.dampening = in.number();
    group.nesterov = in.flag();
  }
  if (edits & 0x20) {
    group.amsgrad = in.flag();
    group.maximize = in.flag();
  }
  if (edits & 0x40) group.lr_device = static_cast<const float*>(arena.pointer(in, 4));
  group.mask_ratio = in.number();
  group.scope = static_cast<gmtkScope_t>(in.byte() < 200 ? in.byte() % 2 : in.raw_enum());
  group.mask_mode = static_cast<gmtkMaskMode_t>(in.byte() < 200 ? in.byte() % 2 : in.raw_enum());
  if (in.byte() < 8) group.struct_size = struct_size(in, sizeof(gmtkGroupConfig_t), sizeof(gmtkGroupConfig_t));
  return group;
}

gmtkTensor_t fuzzed_tensor(Choices& in, Arena& arena, int groups) {
  gmtkTensor_t tensor{};
  tensor.group = in.byte() < 240 ? static_cast<int32_t>(in.below(static_cast<size_t>(groups))) : in.raw_enum();
  const uint8_t size_kind = in.byte();
  tensor.numel = size_kind < 240 ? static_cast<int64_t>(in.below(300)) : -static_cast<int64_t>(in.byte());
  const int grad_dtype = in.byte() < 240 ? in.byte() % 3 : in.raw_enum();
  const int param_dtype = in.byte() < 240 ? in.byte() % 3 : in.raw_enum();
  tensor.grad_dtype = static_cast<gmtkDtype_t>(grad_dtype);
  tensor.param_dtype = static_cast<gmtkDtype_t>(param_dtype);
  const size_t n = tensor.numel > 0 ? static_cast<size_t>(tensor.numel) : 0;
  tensor.grad = arena.pointer(in, n * dtype_bytes(grad_dtype));
  tensor.param = arena.pointer(in, n * dtype_bytes(param_dtype));
  const uint8_t state = in.byte();
  if (state & 1) tensor.master_param = static_cast<float*>(arena.pointer(in, n * 4));
  if (state & 2) tensor.exp_avg = static_cast<float*>(arena.pointer(in, n * 4));
  if (state & 4) tensor.exp_avg_sq = static_cast<float*>(arena.pointer(in, n * 4));
  if (state & 8) tensor.max_exp_avg_sq = static_cast<float*>(arena.pointer(in, n * 4));
  if (state & 16) {
    const int score_dtype = in.byte() < 240 ? in.byte() % 3 : in.raw_enum();
    tensor.score_dtype = static_cast<gmtkDtype_t>(score_dtype);
    tensor.score = arena.pointer(in, n * dtype_bytes(score_dtype));
  }
  if (state & 32) {  // a shard of a larger logical tensor, or a nonsensical one
    tensor.logical_numel = static_cast<int64_t>(in.u16()) - 16;
    tensor.shard_offset = static_cast<int64_t>(in.u16()) - 16;
  }
  return tensor;
}

// A call's arguments: outputs and inputs somewhere in the arena (or NULL).
gmtkStepArgs_t fuzzed_args(Choices& in, Arena& arena, size_t tensors, uint64_t mask_words) {
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  const uint8_t pick = in.byte();
  args.step = pick < 200 ? 1 + in.byte() : -static_cast<int64_t>(in.byte());
  if (pick & 0x01) args.step_count = static_cast<int64_t*>(arena.pointer(in, 8));
  if (pick & 0x02) args.inv_loss_scale = static_cast<const float*>(arena.pointer(in, 4));
  if (pick & 0x04) args.found_inf = static_cast<float*>(arena.pointer(in, 4));
  if (pick & 0x08) args.thresholds = static_cast<float*>(arena.pointer(in, tensors * 4));
  if (pick & 0x10) args.kept_counts = static_cast<int64_t*>(arena.pointer(in, tensors * 8));
  const uint8_t schedule = in.byte();
  if (schedule & 0x01) args.given_thresholds = static_cast<const float*>(arena.pointer(in, tensors * 4));
  if (schedule & 0x02) args.given_mask_bits = static_cast<const uint32_t*>(arena.pointer(in, mask_words * 4));
  if (schedule & 0x04) args.mask_bits = static_cast<uint32_t*>(arena.pointer(in, mask_words * 4));
  if (schedule & 0x08) args.gradient_reduction = static_cast<gmtkGradientReduction_t>(in.raw_enum());
  if (schedule & 0x10) {
    args.struct_size = struct_size(in, sizeof(gmtkStepArgs_t), GMTK_STEP_ARGS_STRUCT_SIZE_V0_1);
  }
  return args;
}

gmtkComm_t one_rank_comm() {
  static gmtkComm_t comm = [] {
    gmtkComm_t created = nullptr;
    if (gmtkCommCreateInProcess(1, &created) != GMTK_SUCCESS) finding("gmtkCommCreateInProcess(1) failed");
    return created;
  }();
  return comm;
}

gmtkHandle_t cpu_handle() {
  static gmtkHandle_t handle = [] {
    gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
    config.backend = GMTK_BACKEND_CPU_REFERENCE;
    gmtkHandle_t created = nullptr;
    if (gmtkHandleCreate(&created, &config) != GMTK_SUCCESS) finding("the CPU handle was refused");
    return created;
  }();
  return handle;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Choices in(data, size);
  static Arena arena;  // one allocation for the whole run: the fuzzer runs millions of inputs
  arena.open_all();
  arena.handed.clear();
  arena.fill(in);
  arena.seal();

  // 1 to 3 groups, or a count below 1 (refused before groups[] is read).
  const int num_groups = in.byte() < 240 ? 1 + static_cast<int>(in.below(3)) : -static_cast<int>(in.byte() % 3);
  std::vector<gmtkGroupConfig_t> groups;
  for (int g = 0; g < num_groups; ++g) groups.push_back(fuzzed_group(in, arena));
  const size_t num_tensors = in.below(5);
  std::vector<gmtkTensor_t> tensors;
  for (size_t t = 0; t < num_tensors; ++t) tensors.push_back(fuzzed_tensor(in, arena, num_groups));

  StridedArray<gmtkGroupConfig_t> group_array;
  group_array.build(groups, in.byte() < 8 ? struct_size(in, sizeof(gmtkGroupConfig_t), sizeof(gmtkGroupConfig_t))
                                          : sizeof(gmtkGroupConfig_t));
  StridedArray<gmtkTensor_t> tensor_array;
  tensor_array.build(tensors, in.byte() < 32 ? struct_size(in, sizeof(gmtkTensor_t), GMTK_TENSOR_STRUCT_SIZE_V0_1)
                                             : sizeof(gmtkTensor_t));
  if (tensor_array.stride == 0 || group_array.stride == 0) return 0;  // a zero stride makes an array of one place

  gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
  config.groups = group_array.data();
  config.num_groups = num_groups;
  config.group_struct_size = group_array.stride;
  config.tensors = tensor_array.data();
  config.num_tensors = in.byte() < 250 ? static_cast<int64_t>(num_tensors) : -1;
  config.tensor_struct_size = tensor_array.stride;
  const uint8_t plan_kind = in.byte();
  config.flags = (plan_kind & 1) ? GMTK_PLAN_ALLOCATE_WORKSPACE : 0u;
  if (plan_kind & 2) config.comm = one_rank_comm();
  if (plan_kind >= 250) config.struct_size = struct_size(in, sizeof(gmtkPlanConfig_t), GMTK_PLAN_CONFIG_STRUCT_SIZE_V0_1);

  gmtkPlan_t plan = reinterpret_cast<gmtkPlan_t>(&arena);  // must stay as it is on failure
  const gmtkPlan_t sentinel = plan;
  const gmtkStatus_t created = gmtkPlanCreate(cpu_handle(), &config, &plan);
  check_status(created);
  if (created != GMTK_SUCCESS) {
    if (plan != sentinel) finding("a failed gmtkPlanCreate wrote *plan");
    return 0;
  }

  uint64_t mask_words = 0;
  if (gmtkPlanGetMaskLayout(plan, &mask_words, nullptr) != GMTK_SUCCESS) finding("gmtkPlanGetMaskLayout failed");
  size_t workspace_bytes = 0;
  if (gmtkPlanGetWorkspaceSize(plan, &workspace_bytes) != GMTK_SUCCESS) finding("gmtkPlanGetWorkspaceSize failed");

  std::vector<unsigned char> before(kArenaBytes);
  const int calls = 1 + static_cast<int>(in.below(4));
  for (int c = 0; c < calls; ++c) {
    arena.open_all();
    std::memcpy(before.data(), arena.base(), kArenaBytes);
    arena.seal();
    const uint8_t what = in.byte();
    gmtkStatus_t status;
    if (what % 5 == 4) {  // a schedule change
      const gmtkGroupConfig_t group = fuzzed_group(in, arena);
      status = gmtkPlanSetGroupHyperparams(plan, static_cast<int32_t>(in.below(6)) - 1, &group);
    } else {
      const gmtkStepArgs_t args = fuzzed_args(in, arena, num_tensors, mask_words);
      // The workspace: the plan's (NULL, 0), or part of the arena, sometimes too small.
      void* workspace = nullptr;
      size_t bytes = 0;
      if (in.flag()) {
        bytes = in.flag() ? workspace_bytes : in.below(workspace_bytes + 1);
        workspace = arena.pointer(in, bytes);
      }
      status = what % 5 == 0   ? gmtkSelectThresholds(plan, &args, workspace, bytes, nullptr)
               : what % 5 == 1 ? gmtkMaskGradients(plan, &args, workspace, bytes, nullptr)
                               : gmtkStep(plan, &args, workspace, bytes, nullptr);
    }
    check_status(status);
    arena.open_all();
    const bool changed = std::memcmp(before.data(), arena.base(), kArenaBytes) != 0;
    arena.seal();
    if (status != GMTK_SUCCESS && changed) finding("a refused call changed the caller's memory");
  }
  gmtkPlanDestroy(plan);
  return 0;
}
