#include "validate.hpp"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "comm.hpp"
#include "status.hpp"

namespace gmtk {
namespace {

bool is_valid_dtype(int dtype) { return dtype == GMTK_FLOAT32 || dtype == GMTK_FLOAT16 || dtype == GMTK_BFLOAT16; }

const char* dtype_name(gmtkDtype_t dtype) {
  switch (dtype) {
    case GMTK_FLOAT32: return "float32";
    case GMTK_FLOAT16: return "float16";
    case GMTK_BFLOAT16: return "bfloat16";
  }
  return "invalid";
}

const char* scope_name(gmtkScope_t scope) { return scope == GMTK_SCOPE_GLOBAL ? "global" : "per-tensor"; }

bool is_adam(gmtkOptimizer_t optimizer) {
  return optimizer == GMTK_OPTIMIZER_ADAMW || optimizer == GMTK_OPTIMIZER_ADAM;
}

bool is_aligned(const void* pointer, size_t alignment) {
  return reinterpret_cast<uintptr_t>(pointer) % alignment == 0;
}

using Owner = BufferRange::Owner;

// Up to N ranges in place: appending never allocates. A call's own buffers
// are kept in one, so that validating a call allocates nothing.
template <size_t N>
struct FixedRanges {
  BufferRange items[N];
  size_t count = 0;

  bool full() const { return count == N; }
  void push_back(const BufferRange& range) { items[count++] = range; }
  const BufferRange& back() const { return items[count - 1]; }
  BufferRange* begin() { return items; }
  BufferRange* end() { return items + count; }
  const BufferRange* begin() const { return items; }
  const BufferRange* end() const { return items + count; }
};

template <size_t N>
bool is_full(const FixedRanges<N>& ranges) {
  return ranges.full();
}
// A vector grows: only its reserved capacity decides whether appending allocates.
bool is_full(const std::vector<BufferRange>&) { return false; }

// Checks pointer and alignment of one buffer and appends its range. A buffer of
// zero bytes may be anything, NULL included, and is not recorded.
template <typename Ranges>
gmtkStatus_t add_buffer(const void* pointer, uint64_t bytes, size_t alignment, Owner owner, int64_t index,
                        const char* field, Ranges* ranges) {
  if (bytes == 0) return GMTK_SUCCESS;
  BufferRange range{reinterpret_cast<uintptr_t>(pointer), 0, owner, index, field};
  GMTK_REQUIRE(pointer != nullptr, "%s is NULL", name_of(range).text);
  GMTK_REQUIRE(is_aligned(pointer, alignment), "%s (%p) is not aligned to %zu bytes", name_of(range).text, pointer,
               alignment);
  GMTK_REQUIRE(range.begin <= std::numeric_limits<uintptr_t>::max() - bytes,
               "%s (%p) plus its %" PRIu64 " bytes wraps around the address space", name_of(range).text, pointer,
               bytes);
  range.end = range.begin + bytes;
  if (is_full(*ranges)) return fail(GMTK_ERROR_INTERNAL, "no room to record %s", name_of(range).text);
  ranges->push_back(range);
  return GMTK_SUCCESS;
}

// The range of [first, last) (sorted by begin, pairwise disjoint) that
// overlaps `range`, or nullptr.
const BufferRange* find_overlap(const BufferRange* first, const BufferRange* last, const BufferRange& range) {
  const BufferRange* after = std::lower_bound(first, last, range.end,
                                              [](const BufferRange& r, uintptr_t end) { return r.begin < end; });
  if (after == first) return nullptr;
  const BufferRange& candidate = *(after - 1);  // the last one starting before range.end
  return candidate.end > range.begin ? &candidate : nullptr;
}

// Sorts [first, last) by address and fails if any two overlap.
gmtkStatus_t sort_and_check_disjoint(BufferRange* first, BufferRange* last) {
  std::sort(first, last, [](const BufferRange& a, const BufferRange& b) { return a.begin < b.begin; });
  for (ptrdiff_t i = 1; i < last - first; ++i) {
    const BufferRange& previous = first[i - 1];
    const BufferRange& current = first[i];
    GMTK_REQUIRE(current.begin >= previous.end, "%s overlaps %s; buffers must not overlap",
                 name_of(current).text, name_of(previous).text);
  }
  return GMTK_SUCCESS;
}

gmtkStatus_t check_against(const BufferRange* first, const BufferRange* last, const BufferRange& range) {
  const BufferRange* other = find_overlap(first, last, range);
  GMTK_REQUIRE(other == nullptr, "%s overlaps %s; buffers must not overlap", name_of(range).text,
               other ? name_of(*other).text : "");
  return GMTK_SUCCESS;
}

gmtkStatus_t check_against(const std::vector<BufferRange>& sorted, const BufferRange& range) {
  return check_against(sorted.data(), sorted.data() + sorted.size(), range);
}

gmtkStatus_t validate_tensor(const gmtkTensor_t& tensor, int64_t index, int32_t num_groups,
                             std::vector<BufferRange>* ranges) {
  GMTK_REQUIRE(tensor.group >= 0 && tensor.group < num_groups,
               "tensors[%" PRId64 "].group is %d; the plan has %d groups", index, tensor.group, num_groups);
  GMTK_REQUIRE(tensor.numel >= 0, "tensors[%" PRId64 "].numel is %" PRId64 "; it must be >= 0", index,
               tensor.numel);
  GMTK_REQUIRE(tensor.numel <= std::numeric_limits<int64_t>::max() / 8,
               "tensors[%" PRId64 "].numel is %" PRId64 "; its buffers would not fit in memory", index, tensor.numel);
  GMTK_REQUIRE(is_valid_dtype(raw_enum(tensor.grad_dtype)), "tensors[%" PRId64 "].grad_dtype is %d; not a gmtkDtype_t",
               index, raw_enum(tensor.grad_dtype));
  GMTK_REQUIRE(is_valid_dtype(raw_enum(tensor.param_dtype)),
               "tensors[%" PRId64 "].param_dtype is %d; not a gmtkDtype_t", index, raw_enum(tensor.param_dtype));
  if (tensor.master_param != nullptr) {
    GMTK_REQUIRE(tensor.param_dtype != GMTK_FLOAT32,
                 "tensors[%" PRId64 "].master_param is set but param_dtype is float32; "
                 "master weights are for float16 and bfloat16 parameters",
                 index);
  }
  if (is_shard(tensor)) {
    GMTK_REQUIRE(tensor.logical_numel > 0 && tensor.logical_numel <= std::numeric_limits<int64_t>::max() / 8,
                 "tensors[%" PRId64 "].logical_numel is %" PRId64 " with shard_offset %" PRId64
                 "; a shard's logical tensor has at least one entry",
                 index, tensor.logical_numel, tensor.shard_offset);
    GMTK_REQUIRE(tensor.shard_offset >= 0 && tensor.shard_offset <= tensor.logical_numel &&
                     tensor.numel <= tensor.logical_numel - tensor.shard_offset,
                 "tensors[%" PRId64 "] holds entries [%" PRId64 ", %" PRId64 ") of a logical tensor of %" PRId64
                 "; a shard must lie inside it",
                 index, tensor.shard_offset, tensor.shard_offset + tensor.numel, tensor.logical_numel);
  }
  if (tensor.score != nullptr) {
    GMTK_REQUIRE(is_valid_dtype(raw_enum(tensor.score_dtype)),
                 "tensors[%" PRId64 "].score_dtype is %d; not a gmtkDtype_t", index, raw_enum(tensor.score_dtype));
  }
  if (tensor.numel == 0) return GMTK_SUCCESS;

  const uint64_t n = static_cast<uint64_t>(tensor.numel);
  if (tensor.score != nullptr) {
    GMTK_CHECK(add_buffer(tensor.score, n * dtype_size(tensor.score_dtype), dtype_size(tensor.score_dtype),
                          Owner::tensor, index, "score", ranges));
  }
  GMTK_CHECK(add_buffer(tensor.grad, n * dtype_size(tensor.grad_dtype), dtype_size(tensor.grad_dtype), Owner::tensor, index, "grad",
                        ranges));
  if (tensor.param == nullptr) {
    const bool has_other = tensor.master_param || tensor.exp_avg || tensor.exp_avg_sq || tensor.max_exp_avg_sq;
    GMTK_REQUIRE(!has_other,
                 "tensors[%" PRId64 "].param is NULL but it has master or optimizer state buffers; "
                 "give the parameters too, or none of them for a selection/mask-only plan",
                 index);
    return GMTK_SUCCESS;
  }
  GMTK_CHECK(add_buffer(tensor.param, n * dtype_size(tensor.param_dtype), dtype_size(tensor.param_dtype),
                        Owner::tensor, index, "param", ranges));
  const struct {
    const float* pointer;
    const char* field;
  } fp32_buffers[] = {{tensor.master_param, "master_param"},
                      {tensor.exp_avg, "exp_avg"},
                      {tensor.exp_avg_sq, "exp_avg_sq"},
                      {tensor.max_exp_avg_sq, "max_exp_avg_sq"}};
  for (const auto& buffer : fp32_buffers) {
    if (buffer.pointer == nullptr) continue;
    GMTK_CHECK(add_buffer(buffer.pointer, n * sizeof(float), alignof(float), Owner::tensor, index, buffer.field, ranges));
  }
  return GMTK_SUCCESS;
}

}  // namespace

gmtkStatus_t validate_handle_config(const gmtkHandleConfig_t* config) {
  GMTK_REQUIRE(config != nullptr, "config is NULL");
  GMTK_REQUIRE(config->struct_size == sizeof(gmtkHandleConfig_t),
               "config->struct_size is %zu; expected %zu (initialise it with GMTK_HANDLE_CONFIG_INIT)",
               config->struct_size, sizeof(gmtkHandleConfig_t));
  const int backend = raw_enum(config->backend);
  GMTK_REQUIRE(backend == GMTK_BACKEND_CUDA || backend == GMTK_BACKEND_CPU_REFERENCE,
               "config->backend is %d; not a gmtkBackend_t", backend);
  if (config->backend == GMTK_BACKEND_CUDA) {
    GMTK_REQUIRE(config->device >= 0, "config->device is %d; it must be a CUDA device ordinal >= 0", config->device);
  }
  return GMTK_SUCCESS;
}

namespace {

// Sorts group scalars by address, and identical addresses (a scalar shared
// between groups) by group: a total order, so that the list does not depend
// on the order it was built in. std::sort works in place (std::stable_sort
// may allocate).
void sort_scalars(std::vector<BufferRange>* ranges) {
  std::sort(ranges->begin(), ranges->end(), [](const BufferRange& a, const BufferRange& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.index < b.index;
  });
}

}  // namespace

// Group scalars (lr_device) are read-only and may be shared between groups, but
// must not alias a buffer that a call writes. Aligned 4-byte scalars are either
// identical or disjoint, so the sorted list still works with find_overlap.
gmtkStatus_t group_scalar_ranges(const std::vector<gmtkGroupConfig_t>& groups, std::vector<BufferRange>* ranges) {
  ranges->clear();
  ranges->reserve(groups.size());  // room for every group's scalar: see update_group_scalar
  for (size_t g = 0; g < groups.size(); ++g) {
    if (groups[g].lr_device == nullptr) continue;
    GMTK_CHECK(add_buffer(groups[g].lr_device, sizeof(float), alignof(float), Owner::group, static_cast<int64_t>(g),
                          "lr_device", ranges));
  }
  sort_scalars(ranges);
  return GMTK_SUCCESS;
}

void update_group_scalar(Plan* plan, int32_t index) {
  std::vector<BufferRange>& scalars = plan->sorted_scalars;
  scalars.erase(std::remove_if(scalars.begin(), scalars.end(),
                               [&](const BufferRange& range) { return range.index == index; }),
                scalars.end());
  const float* lr_device = plan->groups[index].lr_device;
  if (lr_device != nullptr) {
    // Checked by validate_group_change; capacity for every group was reserved
    // by group_scalar_ranges, so this appends in place.
    const auto begin = reinterpret_cast<uintptr_t>(lr_device);
    scalars.push_back(BufferRange{begin, begin + sizeof(float), Owner::group, index, "lr_device"});
  }
  sort_scalars(&scalars);
}

gmtkStatus_t validate_group_config(const gmtkGroupConfig_t& group, const char* name) {
  GMTK_REQUIRE(group.struct_size == sizeof(gmtkGroupConfig_t),
               "%s.struct_size is %zu; expected %zu (initialise it with gmtkGroupConfigInit)", name,
               group.struct_size, sizeof(gmtkGroupConfig_t));
  const int optimizer = raw_enum(group.optimizer);
  GMTK_REQUIRE(optimizer == GMTK_OPTIMIZER_ADAMW || optimizer == GMTK_OPTIMIZER_ADAM || optimizer == GMTK_OPTIMIZER_SGD,
               "%s.optimizer is %d; not a gmtkOptimizer_t", name, optimizer);
  GMTK_REQUIRE(std::isfinite(group.lr) && group.lr >= 0, "%s.lr is %g; it must be finite and >= 0", name, group.lr);
  GMTK_REQUIRE(group.lr_device == nullptr || is_aligned(group.lr_device, alignof(float)),
               "%s.lr_device (%p) is not aligned to 4 bytes", name, static_cast<const void*>(group.lr_device));
  GMTK_REQUIRE(std::isfinite(group.weight_decay) && group.weight_decay >= 0,
               "%s.weight_decay is %g; it must be finite and >= 0", name, group.weight_decay);
  if (is_adam(group.optimizer)) {
    GMTK_REQUIRE(group.beta1 >= 0 && group.beta1 < 1, "%s.beta1 is %g; it must be in [0, 1)", name, group.beta1);
    GMTK_REQUIRE(group.beta2 >= 0 && group.beta2 < 1, "%s.beta2 is %g; it must be in [0, 1)", name, group.beta2);
    GMTK_REQUIRE(std::isfinite(group.eps) && group.eps >= 0, "%s.eps is %g; it must be finite and >= 0", name,
                 group.eps);
  } else {
    GMTK_REQUIRE(std::isfinite(group.momentum) && group.momentum >= 0,
                 "%s.momentum is %g; it must be finite and >= 0", name, group.momentum);
    GMTK_REQUIRE(std::isfinite(group.dampening), "%s.dampening is %g; it must be finite", name, group.dampening);
    GMTK_REQUIRE(!group.nesterov || (group.momentum > 0 && group.dampening == 0),
                 "%s.nesterov is set with momentum %g and dampening %g; nesterov needs momentum > 0 and "
                 "dampening 0",
                 name, group.momentum, group.dampening);
  }
  GMTK_REQUIRE(group.mask_ratio >= 0 && group.mask_ratio <= 1, "%s.mask_ratio is %g; it must be in [0, 1]", name,
               group.mask_ratio);
  const int scope = raw_enum(group.scope);
  const int mask_mode = raw_enum(group.mask_mode);
  GMTK_REQUIRE(scope == GMTK_SCOPE_PER_TENSOR || scope == GMTK_SCOPE_GLOBAL, "%s.scope is %d; not a gmtkScope_t", name,
               scope);
  GMTK_REQUIRE(mask_mode == GMTK_MASK_GRAD || mask_mode == GMTK_MASK_FREEZE, "%s.mask_mode is %d; not a gmtkMaskMode_t",
               name, mask_mode);
  return GMTK_SUCCESS;
}

gmtkStatus_t build_plan(const gmtkPlanConfig_t* config, Plan* plan) {
  GMTK_REQUIRE(config != nullptr, "config is NULL");
  GMTK_REQUIRE(config->struct_size == sizeof(gmtkPlanConfig_t) ||
                   config->struct_size == GMTK_PLAN_CONFIG_STRUCT_SIZE_V0_1,
               "config->struct_size is %zu; expected %zu (initialise it with GMTK_PLAN_CONFIG_INIT)",
               config->struct_size, sizeof(gmtkPlanConfig_t));
  GMTK_REQUIRE(config->group_struct_size == sizeof(gmtkGroupConfig_t),
               "config->group_struct_size is %zu; expected sizeof(gmtkGroupConfig_t) = %zu",
               config->group_struct_size, sizeof(gmtkGroupConfig_t));
  GMTK_REQUIRE(config->tensor_struct_size == sizeof(gmtkTensor_t) ||
                   config->tensor_struct_size == GMTK_TENSOR_STRUCT_SIZE_V0_1,
               "config->tensor_struct_size is %zu; expected sizeof(gmtkTensor_t) = %zu", config->tensor_struct_size,
               sizeof(gmtkTensor_t));
  const gmtkComm_t comm = plan_config_comm(config);
  GMTK_REQUIRE(config->num_groups >= 1, "config->num_groups is %d; a plan needs at least one group",
               config->num_groups);
  GMTK_REQUIRE(config->groups != nullptr, "config->groups is NULL");
  GMTK_REQUIRE(config->num_tensors >= 0, "config->num_tensors is %" PRId64 "; it must be >= 0",
               config->num_tensors);
  GMTK_REQUIRE(config->num_tensors == 0 || config->tensors != nullptr,
               "config->tensors is NULL but config->num_tensors is %" PRId64, config->num_tensors);
  GMTK_REQUIRE((config->flags & ~GMTK_PLAN_ALLOCATE_WORKSPACE) == 0u, "config->flags has unknown bits 0x%x",
               config->flags & ~GMTK_PLAN_ALLOCATE_WORKSPACE);

  const auto* group_bytes = reinterpret_cast<const unsigned char*>(config->groups);
  std::vector<gmtkGroupConfig_t> groups(static_cast<size_t>(config->num_groups));
  for (int32_t g = 0; g < config->num_groups; ++g) {
    groups[g] = *reinterpret_cast<const gmtkGroupConfig_t*>(group_bytes + g * config->group_struct_size);
    char name[32];
    std::snprintf(name, sizeof(name), "groups[%d]", g);
    GMTK_CHECK(validate_group_config(groups[g], name));
  }

  const auto* tensor_bytes = reinterpret_cast<const unsigned char*>(config->tensors);
  std::vector<gmtkTensor_t> tensors(static_cast<size_t>(config->num_tensors));
  std::vector<BufferRange> ranges;
  for (int64_t t = 0; t < config->num_tensors; ++t) {
    // Records of 0.1.0 callers are shorter: the fields they lack read as 0 (unsharded).
    std::memset(&tensors[t], 0, sizeof(gmtkTensor_t));
    std::memcpy(&tensors[t], tensor_bytes + t * config->tensor_struct_size, config->tensor_struct_size);
    GMTK_CHECK(validate_tensor(tensors[t], t, config->num_groups, &ranges));
    GMTK_REQUIRE(!is_shard(tensors[t]) || comm != nullptr,
                 "tensors[%" PRId64 "] is a shard (logical_numel %" PRId64 ", shard_offset %" PRId64
                 ") but config->comm is NULL: a sharded plan needs the communicator of its ranks",
                 t, tensors[t].logical_numel, tensors[t].shard_offset);
  }
  GMTK_CHECK(sort_and_check_disjoint(ranges.data(), ranges.data() + ranges.size()));

  std::vector<BufferRange> scalars;
  GMTK_CHECK(group_scalar_ranges(groups, &scalars));
  for (const BufferRange& scalar : scalars) GMTK_CHECK(check_against(ranges, scalar));

  std::vector<std::vector<int64_t>> tensors_of_group(groups.size());
  for (int64_t t = 0; t < config->num_tensors; ++t) {
    const gmtkTensor_t& tensor = tensors[t];
    const gmtkGroupConfig_t& group = groups[tensor.group];
    if (group.scope == GMTK_SCOPE_GLOBAL && !tensors_of_group[tensor.group].empty()) {
      const gmtkTensor_t& first = tensors[tensors_of_group[tensor.group].front()];
      if (is_shard(first) != is_shard(tensor)) {
        return fail(GMTK_ERROR_NOT_SUPPORTED,
                    "tensors[%" PRId64 "] and tensors[%" PRId64
                    "] of global-scope group %d are one a shard and one a replica; a global threshold over shards "
                    "and replicas together is not supported (put them in separate groups)",
                    tensors_of_group[tensor.group].front(), t, tensor.group);
      }
      if (selection_dtype(first) != selection_dtype(tensor)) {
        return fail(GMTK_ERROR_NOT_SUPPORTED,
                    "tensors[%" PRId64 "] selects on %s %s but tensors[%" PRId64
                    "] of the same global-scope group %d on %s; a global threshold needs one gradient dtype per "
                    "group, or one score dtype (split the group)",
                    t, tensor.score != nullptr ? "a score of" : "gradients of", dtype_name(selection_dtype(tensor)),
                    tensors_of_group[tensor.group].front(), tensor.group, dtype_name(selection_dtype(first)));
      }
    }
    tensors_of_group[tensor.group].push_back(t);
  }

  plan->groups = std::move(groups);
  plan->tensors = std::move(tensors);
  plan->tensors_of_group = std::move(tensors_of_group);
  plan->sorted_buffers = std::move(ranges);
  plan->sorted_scalars = std::move(scalars);
  if (comm != nullptr) plan->comm = comm->communicator;
  plan->mask_word_offsets.resize(plan->tensors.size());
  for (size_t t = 0; t < plan->tensors.size(); ++t) {
    plan->mask_word_offsets[t] = plan->mask_words;
    plan->mask_words += (static_cast<uint64_t>(plan->tensors[t].numel) + 31) / 32;
  }
  return GMTK_SUCCESS;
}

gmtkStatus_t validate_group_change(const Plan& plan, int32_t index, const gmtkGroupConfig_t* config,
                                   BufferRange* new_buffer, size_t* new_buffer_count) {
  *new_buffer_count = 0;
  const int32_t num_groups = static_cast<int32_t>(plan.groups.size());
  GMTK_REQUIRE(index >= 0 && index < num_groups, "group is %d; the plan has %d groups", index, num_groups);
  GMTK_REQUIRE(config != nullptr, "config is NULL");
  GMTK_CHECK(validate_group_config(*config, "config"));
  const gmtkGroupConfig_t& current = plan.groups[index];
  GMTK_REQUIRE(config->optimizer == current.optimizer,
               "config->optimizer differs from group %d's; the optimizer cannot change without a new plan", index);
  GMTK_REQUIRE(!config->amsgrad == !current.amsgrad,
               "config->amsgrad differs from group %d's; amsgrad cannot change without a new plan", index);
  GMTK_REQUIRE(config->scope == current.scope,
               "config->scope is %s but group %d is %s; the scope cannot change without a new plan",
               scope_name(config->scope), index, scope_name(current.scope));
  GMTK_REQUIRE(config->mask_mode == current.mask_mode,
               "config->mask_mode differs from group %d's; the mask mode cannot change without a new plan", index);
  if (config->lr_device != nullptr) {
    FixedRanges<1> lr_device;
    GMTK_CHECK(add_buffer(config->lr_device, sizeof(float), alignof(float), Owner::call, 0, "config->lr_device",
                          &lr_device));
    GMTK_CHECK(check_against(plan.sorted_buffers, lr_device.back()));
    *new_buffer = lr_device.back();
    *new_buffer_count = 1;
  }
  return GMTK_SUCCESS;
}

gmtkStatus_t validate_call_arguments(const Plan& plan, Operation operation, const gmtkStepArgs_t* args,
                                     void* workspace, size_t workspace_bytes, gmtkStream_t stream, Call* call) {
  GMTK_REQUIRE(args != nullptr, "args is NULL");
  GMTK_REQUIRE(args->struct_size == sizeof(gmtkStepArgs_t) || args->struct_size == GMTK_STEP_ARGS_STRUCT_SIZE_V0_1,
               "args->struct_size is %zu; expected %zu (initialise it with GMTK_STEP_ARGS_INIT)", args->struct_size,
               sizeof(gmtkStepArgs_t));
  // A 0.1.0 caller's arguments end before gradient_reduction: read only what they have.
  gmtkStepArgs_t given{};
  std::memcpy(&given, args, args->struct_size);
  given.struct_size = sizeof(gmtkStepArgs_t);
  args = &given;
  const int reduction = raw_enum(args->gradient_reduction);
  GMTK_REQUIRE(reduction == GMTK_GRADIENTS_AS_GIVEN || reduction == GMTK_GRADIENTS_SUM ||
                   reduction == GMTK_GRADIENTS_AVERAGE,
               "args->gradient_reduction is %d; not a gmtkGradientReduction_t", reduction);
  GMTK_REQUIRE(args->given_thresholds == nullptr || args->given_mask_bits == nullptr,
               "args->given_thresholds and args->given_mask_bits are both set; a call keeps by one of them");
  GMTK_REQUIRE(args->gradient_reduction == GMTK_GRADIENTS_AS_GIVEN || plan.comm != nullptr,
               "args->gradient_reduction asks for the ranks' %s but the plan has no communicator",
               args->gradient_reduction == GMTK_GRADIENTS_SUM ? "sum" : "mean");
  const bool is_step = operation == Operation::step;
  if (is_step && args->step_count == nullptr) {
    GMTK_REQUIRE(args->step >= 1, "args->step is %" PRId64 "; it is the 1-based index of this update", args->step);
  }
  GMTK_REQUIRE(workspace != nullptr || workspace_bytes == 0, "workspace is NULL but workspace_bytes is %zu",
               workspace_bytes);

  // Buffers this call writes: pairwise disjoint, and disjoint from every
  // tensor buffer and group scalar. Then the scale it reads. All in place:
  // validating a call allocates nothing.
  const uint64_t num_tensors = plan.tensors.size();
  FixedRanges<kMaxCallBuffers> buffers;
  if (args->thresholds != nullptr) {
    GMTK_CHECK(add_buffer(args->thresholds, num_tensors * sizeof(float), alignof(float), Owner::call, 0,
                          "args->thresholds", &buffers));
  }
  if (args->kept_counts != nullptr) {
    GMTK_CHECK(add_buffer(args->kept_counts, num_tensors * sizeof(int64_t), alignof(int64_t), Owner::call, 0,
                          "args->kept_counts", &buffers));
  }
  if (args->found_inf != nullptr) {
    GMTK_CHECK(add_buffer(args->found_inf, sizeof(float), alignof(float), Owner::call, 0, "args->found_inf", &buffers));
  }
  if (is_step && args->step_count != nullptr) {
    GMTK_CHECK(add_buffer(args->step_count, sizeof(int64_t), alignof(int64_t), Owner::call, 0, "args->step_count", &buffers));
  }
  if (workspace != nullptr) {
    GMTK_CHECK(add_buffer(workspace, workspace_bytes, 1, Owner::call, 0, "workspace", &buffers));
  }
  if (args->mask_bits != nullptr && plan.mask_words > 0) {
    GMTK_CHECK(add_buffer(args->mask_bits, plan.mask_words * sizeof(uint32_t), alignof(uint32_t), Owner::call, 0,
                          "args->mask_bits", &buffers));
  }
  BufferRange* const written_end = buffers.end();
  GMTK_CHECK(sort_and_check_disjoint(buffers.begin(), written_end));
  for (const BufferRange& range : buffers) {
    GMTK_CHECK(check_against(plan.sorted_buffers, range));
    GMTK_CHECK(check_against(plan.sorted_scalars, range));  // scalars may repeat; find_overlap needs only sorted begins
  }
  // What the call only reads: disjoint from every buffer that is written.
  const struct {
    const void* pointer;
    size_t bytes;
    size_t alignment;
    const char* name;
  } inputs[] = {
      {args->inv_loss_scale, sizeof(float), alignof(float), "args->inv_loss_scale"},
      {args->given_thresholds, num_tensors * sizeof(float), alignof(float), "args->given_thresholds"},
      {args->given_mask_bits, plan.mask_words * sizeof(uint32_t), alignof(uint32_t), "args->given_mask_bits"},
  };
  for (const auto& input : inputs) {
    if (input.pointer == nullptr || input.bytes == 0) continue;
    GMTK_CHECK(add_buffer(input.pointer, input.bytes, input.alignment, Owner::call, 0, input.name, &buffers));
    GMTK_CHECK(check_against(plan.sorted_buffers, buffers.back()));
    GMTK_CHECK(check_against(buffers.begin(), written_end, buffers.back()));
  }

  std::copy(buffers.begin(), buffers.end(), call->buffers);
  call->buffer_count = buffers.count;
  call->operation = operation;
  call->args = *args;
  call->workspace = workspace;
  call->workspace_bytes = workspace_bytes;
  call->stream = stream;
  return GMTK_SUCCESS;
}

namespace {

// The first tensor that lacks a buffer gmtkStep needs, and which; none: -1.
enum class MissingStepBuffer { none, param, exp_avg, exp_avg_sq, max_exp_avg_sq, momentum };

MissingStepBuffer missing_step_buffer(const Plan& plan, size_t* tensor_index) {
  for (size_t t = 0; t < plan.tensors.size(); ++t) {
    const gmtkTensor_t& tensor = plan.tensors[t];
    if (tensor.numel == 0) continue;
    const gmtkGroupConfig_t& group = plan.groups[tensor.group];
    *tensor_index = t;
    if (tensor.param == nullptr) return MissingStepBuffer::param;
    if (is_adam(group.optimizer)) {
      if (tensor.exp_avg == nullptr) return MissingStepBuffer::exp_avg;
      if (tensor.exp_avg_sq == nullptr) return MissingStepBuffer::exp_avg_sq;
      if (group.amsgrad && tensor.max_exp_avg_sq == nullptr) return MissingStepBuffer::max_exp_avg_sq;
    } else if (group.momentum != 0 && tensor.exp_avg == nullptr) {
      return MissingStepBuffer::momentum;
    }
  }
  return MissingStepBuffer::none;
}

}  // namespace

bool step_buffers_complete(const Plan& plan) {
  size_t t = 0;
  return missing_step_buffer(plan, &t) == MissingStepBuffer::none;
}

gmtkStatus_t check_step_buffers(const Plan& plan) {
  size_t t = 0;
  const MissingStepBuffer missing = missing_step_buffer(plan, &t);
  if (missing == MissingStepBuffer::none) return GMTK_SUCCESS;
  const gmtkTensor_t& tensor = plan.tensors[t];
  switch (missing) {
    case MissingStepBuffer::param:
      return fail(GMTK_ERROR_INVALID_ARGUMENT,
                  "tensors[%zu].param is NULL; gmtkStep needs the parameters (a plan without them serves only "
                  "gmtkSelectThresholds and gmtkMaskGradients)",
                  t);
    case MissingStepBuffer::exp_avg:
      return fail(GMTK_ERROR_INVALID_ARGUMENT, "tensors[%zu].exp_avg is NULL; Adam needs it", t);
    case MissingStepBuffer::exp_avg_sq:
      return fail(GMTK_ERROR_INVALID_ARGUMENT, "tensors[%zu].exp_avg_sq is NULL; Adam needs it", t);
    case MissingStepBuffer::max_exp_avg_sq:
      return fail(GMTK_ERROR_INVALID_ARGUMENT, "tensors[%zu].max_exp_avg_sq is NULL; group %d uses amsgrad", t,
                  tensor.group);
    case MissingStepBuffer::momentum:
      return fail(GMTK_ERROR_INVALID_ARGUMENT,
                  "tensors[%zu].exp_avg (the momentum buffer) is NULL; group %d has momentum %g", t, tensor.group,
                  plan.groups[tensor.group].momentum);
    case MissingStepBuffer::none: break;
  }
  return GMTK_SUCCESS;
}

}  // namespace gmtk
