// The fused update of gmtkStep: one launch over every tensor of the plan,
// after selection has fixed each set's threshold. A thread takes items of 4
// entries and loads each buffer of the item as one vector (16 bytes of fp32,
// 8 of fp16/bf16): the gradient, then, unless freeze mode masks the whole
// item, the parameter (or master), m, v and v_max; it runs the optimizer in
// registers (step_logic.hpp) and stores what changed. Every index is 64-bit.
#include "step_kernels.hpp"

#include "step_passes.hpp"

#include <cuda_runtime.h>

namespace gmtk::kernels {
namespace {

struct UpdatePolicy {
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocksPerMultiprocessor = 3;
  // Each 64K-entry chunk is taken in this many parts, so that the grid's
  // last round is short.
  static constexpr uint32_t kPartsPerChunk = 4;
};

constexpr uint32_t kNoGroup = 0xFFFFFFFFu;

// Up to 4 raw values of a buffer of `element_bytes` (4 or 2), zero-extended.
__device__ __forceinline__ void load_raw(uint64_t base, uint32_t element_bytes, Range entries, uint32_t* raw) {
  const uint64_t address = base + entries.begin * element_bytes;
  if (entries.end - entries.begin == 1) {
    raw[0] = element_bytes == 4 ? *reinterpret_cast<const uint32_t*>(address)
                                : *reinterpret_cast<const uint16_t*>(address);
    return;
  }
  if (element_bytes == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(address);
    raw[0] = v.x;
    raw[1] = v.y;
    raw[2] = v.z;
    raw[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(address);
    raw[0] = v.x & 0xFFFFu;
    raw[1] = v.x >> 16;
    raw[2] = v.y & 0xFFFFu;
    raw[3] = v.y >> 16;
  }
}

__device__ __forceinline__ void store_raw(uint64_t base, uint32_t element_bytes, Range entries, const uint32_t* raw) {
  const uint64_t address = base + entries.begin * element_bytes;
  if (entries.end - entries.begin == 1) {
    if (element_bytes == 4) {
      *reinterpret_cast<uint32_t*>(address) = raw[0];
    } else {
      *reinterpret_cast<uint16_t*>(address) = static_cast<uint16_t>(raw[0]);
    }
    return;
  }
  if (element_bytes == 4) {
    *reinterpret_cast<uint4*>(address) = make_uint4(raw[0], raw[1], raw[2], raw[3]);
  } else {
    *reinterpret_cast<uint2*>(address) = make_uint2(raw[0] | (raw[1] << 16), raw[2] | (raw[3] << 16));
  }
}

// An fp32 state buffer of the item: loaded into, and stored from, one field of EntryValues.
template <float EntryValues::*kField>
__device__ __forceinline__ void load_state(uint64_t base, Range entries, EntryValues* values) {
  uint32_t raw[kStepVectorEntries];
  load_raw(base, 4, entries, raw);
#pragma unroll
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) values[e].*kField = __uint_as_float(raw[e]);
}

template <float EntryValues::*kField>
__device__ __forceinline__ void store_state(uint64_t base, Range entries, const EntryValues* values) {
  uint32_t raw[kStepVectorEntries];
#pragma unroll
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) raw[e] = __float_as_uint(values[e].*kField);
  store_raw(base, 4, entries, raw);
}

// Where a unit's deferred entries go: found through the launch parameters
// only when an item has one, so that it costs the hot loop no registers.
struct DeferralTarget {
  const SelectionLaunch& launch;  // the kernel's parameters (inlined: read from the parameter space)
  uint64_t chunk;
};

// Appends an item's deferred entries (rare: the boundary bin holds a few per
// ten thousand) with one atomic per item.
__device__ __forceinline__ void defer_entries(const ItemPlan& item, const uint32_t* grad_raw, uint32_t grad_dtype,
                                              Range entries, const DeferralTarget& target) {
  const SelectionLaunch& p = target.launch;
  const ChunkRecord chunk = p.chunks[target.chunk];
  const SetRecord set = p.sets[chunk.set];
  uint64_t slot = atomicAdd(&p.states[chunk.set].candidates_gathered, static_cast<unsigned long long>(item.deferred));
#pragma unroll
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) {
    if (e >= item.count) break;
    if (item.fate[e] != EntryFate::deferred) continue;
    // The bin fits the region (advance_selection); the bound is a guard.
    if (slot < set.deferral_capacity) {
      p.candidates[set.candidate_offset + slot] = magnitude_key(grad_raw[e], grad_dtype);
      p.deferred_positions[set.deferral_offset + slot] = deferred_position(target.chunk, entries.begin + e - chunk.begin);
    }
    ++slot;
  }
}

// Loads an item's parameter (the master when there is one, else the stored
// parameter widened) and its state; the stored parameter bits too when asked.
__device__ __forceinline__ void load_item_state(const StepTensorRecord& buffers, uint32_t param_bytes,
                                                uint32_t param_dtype, Range entries, bool param_bits,
                                                uint32_t* param_raw, EntryValues* values) {
  if (param_bits) load_raw(buffers.param, param_bytes, entries, param_raw);
  if (buffers.master != 0) {
    load_state<&EntryValues::param>(buffers.master, entries, values);
  } else {
#pragma unroll
    for (uint32_t e = 0; e < kStepVectorEntries; ++e) values[e].param = gradient_to_float(param_raw[e], param_dtype);
  }
  if (buffers.exp_avg != 0) load_state<&EntryValues::exp_avg>(buffers.exp_avg, entries, values);
  if (buffers.exp_avg_sq != 0) load_state<&EntryValues::exp_avg_sq>(buffers.exp_avg_sq, entries, values);
  if (buffers.max_exp_avg_sq != 0) load_state<&EntryValues::max_exp_avg_sq>(buffers.max_exp_avg_sq, entries, values);
}

// Stores an updated item: the parameter (entries left alone keep their
// loaded bits), the master and the state.
__device__ __forceinline__ void store_item_state(const StepTensorRecord& buffers, uint32_t param_bytes,
                                                 uint32_t param_dtype, Range entries, const ItemPlan& item,
                                                 uint32_t* param_raw, const EntryValues* values) {
#pragma unroll
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) {
    param_raw[e] = param_bits_to_store(e < item.count ? item.fate[e] : EntryFate::skip, param_raw[e],
                                       values[e].param, param_dtype);
  }
  store_raw(buffers.param, param_bytes, entries, param_raw);
  if (buffers.master != 0) store_state<&EntryValues::param>(buffers.master, entries, values);
  if (buffers.exp_avg != 0) store_state<&EntryValues::exp_avg>(buffers.exp_avg, entries, values);
  if (buffers.exp_avg_sq != 0) store_state<&EntryValues::exp_avg_sq>(buffers.exp_avg_sq, entries, values);
  if (buffers.max_exp_avg_sq != 0) store_state<&EntryValues::max_exp_avg_sq>(buffers.max_exp_avg_sq, entries, values);
}

// The items of one work unit, for one gradient x parameter dtype pair (as
// template arguments: the conversions compile to a few instructions each)
// and one source of decisions.
template <uint32_t kGrad, uint32_t kParam, ItemKeys kKeys>
__device__ __forceinline__ void update_items(const VectorSplit& split, const TensorRecord& tensor,
                                             const StepTensorRecord& buffers, const UpdateWork& work,
                                             const StepGroup& group, const StepScalars& scalars, bool has_scale,
                                             float inv_loss_scale, const DeferralTarget& deferral) {
  constexpr uint32_t kGradBytes = kGrad == kFloat32 ? 4u : 2u;
  constexpr uint32_t kParamBytes = kParam == kFloat32 ? 4u : 2u;
  constexpr bool kDefer = kKeys == ItemKeys::gradient_deferring;
  const uint64_t grad = tensor.grad;
  for (uint64_t i = threadIdx.x; i < split.items(); i += blockDim.x) {
    const Range entries = item_entries(split, i);
    const uint32_t count = static_cast<uint32_t>(entries.end - entries.begin);
    uint32_t grad_raw[kStepVectorEntries] = {};
    EntryValues values[kStepVectorEntries] = {};
    uint32_t param_raw[kStepVectorEntries] = {};
    const bool has_master = buffers.master != 0;
    const auto load_item_state_now = [&](bool param_bits) {
      load_item_state(buffers, kParamBytes, kParam, entries, param_bits, param_raw, values);
    };
    ItemPlan item;
    if constexpr (kKeys == ItemKeys::bitmap || kKeys == ItemKeys::score) {
      // Decided before the gradient is read: in freeze mode an item whose
      // entries are all masked reads nothing but its bits (or score).
      if constexpr (kKeys == ItemKeys::bitmap) {
        item = plan_item_from_bits(mask_bits_of(work.test.bits, entries.begin, count), count, work);
      } else {
        uint32_t key_raw[kStepVectorEntries] = {};
        load_raw(tensor.keys, dtype_bytes(tensor.key_dtype), entries, key_raw);
        item = plan_item(key_raw, count, tensor.key_dtype, work);
      }
      if (!item.touches_state) continue;
      load_raw(grad, kGradBytes, entries, grad_raw);
      load_item_state_now(loads_param_bits(item, has_master));
      update_item(item, grad_raw, kGrad, values, group, scalars, has_scale, inv_loss_scale);
      store_item_state(buffers, kParamBytes, kParam, entries, item, param_raw, values);
      continue;
    }
    load_raw(grad, kGradBytes, entries, grad_raw);
    if (kDefer || work.freeze) {
      // The state loads wait for the gradient: an item whose entries are all
      // masked (or deferred) reads and writes nothing else (the sectors freeze skips).
      item = plan_item(grad_raw, count, kGrad, work);
      if (kDefer && item.deferred != 0) defer_entries(item, grad_raw, kGrad, entries, deferral);
      if (!item.touches_state) continue;
      load_item_state_now(loads_param_bits(item, has_master));
    } else {
      // Every entry is updated: all loads of the item are in flight at once.
      load_item_state_now(!has_master);
      item = plan_item(grad_raw, count, kGrad, work);
    }

    update_item(item, grad_raw, kGrad, values, group, scalars, has_scale, inv_loss_scale);
    store_item_state(buffers, kParamBytes, kParam, entries, item, param_raw, values);
  }
}

// A work unit's items under their source of decisions. Inlined with
// everything below it: a call that is not would copy the launch's
// parameters (20 KB) to the stack.
template <uint32_t kGrad, uint32_t kParam>
__device__ __forceinline__ void update_unit(ItemKeys keys, const VectorSplit& split, const TensorRecord& tensor,
                                            const StepTensorRecord& buffers, const UpdateWork& work,
                                            const StepGroup& group, const StepScalars& scalars, bool has_scale,
                                            float inv_loss_scale, const DeferralTarget& deferral) {
  switch (keys) {
    case ItemKeys::gradient:
      update_items<kGrad, kParam, ItemKeys::gradient>(split, tensor, buffers, work, group, scalars, has_scale,
                                                      inv_loss_scale, deferral);
      break;
    case ItemKeys::gradient_deferring:
      update_items<kGrad, kParam, ItemKeys::gradient_deferring>(split, tensor, buffers, work, group, scalars,
                                                                has_scale, inv_loss_scale, deferral);
      break;
    case ItemKeys::score:
      update_items<kGrad, kParam, ItemKeys::score>(split, tensor, buffers, work, group, scalars, has_scale,
                                                   inv_loss_scale, deferral);
      break;
    case ItemKeys::bitmap:
      update_items<kGrad, kParam, ItemKeys::bitmap>(split, tensor, buffers, work, group, scalars, has_scale,
                                                    inv_loss_scale, deferral);
      break;
  }
}

__global__ void __launch_bounds__(UpdatePolicy::kThreads, UpdatePolicy::kMinBlocksPerMultiprocessor)
    fused_update(SelectionLaunch p, StepLaunch s) {
  if (*p.flags != 0u) return;  // a gradient is not finite: the step is a no-op
  const int64_t t = step_index(s.step_count, s.step);
  const bool has_scale = p.inv_loss_scale != nullptr;
  const float inv_loss_scale = has_scale ? *p.inv_loss_scale : 1.0f;
  uint32_t scalars_group = kNoGroup;
  StepScalars scalars{};

  const uint64_t units = p.chunk_count * UpdatePolicy::kPartsPerChunk;
  for (uint64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const uint64_t c = unit / UpdatePolicy::kPartsPerChunk;
    const ChunkRecord chunk = p.chunks[c];
    const Range part = candidate_slice(chunk.length, static_cast<uint32_t>(unit % UpdatePolicy::kPartsPerChunk),
                                       UpdatePolicy::kPartsPerChunk);
    if (part.begin == part.end) continue;
    const UpdateWork work = update_work(p, s, c);
    if (work.idle) continue;
    if (work.group != scalars_group) {  // the same in every thread: neighbouring chunks share a group
      scalars = step_scalars(s.groups[work.group], t);
      scalars_group = work.group;
    }
    const StepGroup& group = s.groups[work.group];
    const TensorRecord tensor = p.tensors[chunk.tensor];
    const StepTensorRecord buffers = s.tensors[chunk.tensor];
    const VectorSplit split =
        split_for_step(buffers.vector_phase, chunk.begin + part.begin, chunk.begin + part.end);

    // One instantiation per dtype pair.
    const uint32_t pair = tensor.dtype * 3u + buffers.param_dtype;
    const DeferralTarget deferral{p, c};
    // Deferring units (large fp32 sets of a step) in their own instantiation,
    // so that the others' loop carries none of its registers.
    // Scores and given bitmaps (SPEC section 8) likewise.
    const ItemKeys keys = item_keys(work, tensor);
#define GMTK_UPDATE_UNIT(kGrad, kParam)                                                                   \
  update_unit<kGrad, kParam>(keys, split, tensor, buffers, work, group, scalars, has_scale, inv_loss_scale, \
                             deferral)
    // Direct calls (a generic lambda here was left out of line for some
    // pairs, which copied the launch's 20 KB of parameters to the stack).
    switch (pair) {
      case 0: GMTK_UPDATE_UNIT(kFloat32, kFloat32); break;
      case 1: GMTK_UPDATE_UNIT(kFloat32, kFloat16); break;
      case 2: GMTK_UPDATE_UNIT(kFloat32, kBFloat16); break;
      case 3: GMTK_UPDATE_UNIT(kFloat16, kFloat32); break;
      case 4: GMTK_UPDATE_UNIT(kFloat16, kFloat16); break;
      case 5: GMTK_UPDATE_UNIT(kFloat16, kBFloat16); break;
      case 6: GMTK_UPDATE_UNIT(kBFloat16, kFloat32); break;
      case 7: GMTK_UPDATE_UNIT(kBFloat16, kFloat16); break;
      default: GMTK_UPDATE_UNIT(kBFloat16, kBFloat16); break;
    }
#undef GMTK_UPDATE_UNIT
  }
}

// After the deferred entries' last level: each is settled with its set's
// exact threshold and updated alone (scalar loads: they are few and scattered).
__global__ void __launch_bounds__(UpdatePolicy::kThreads) finish_deferred(SelectionLaunch p, StepLaunch s) {
  if (*p.flags != 0u) return;
  const int64_t t = step_index(s.step_count, s.step);
  const bool has_scale = p.inv_loss_scale != nullptr;
  const float inv_loss_scale = has_scale ? *p.inv_loss_scale : 1.0f;
  for (uint64_t c = blockIdx.x; c < p.large_chunks; c += gridDim.x) {
    const FinishWork work = finish_work(p, s, c);
    if (work.idle) continue;
    const StepGroup& group = s.groups[work.group];
    const StepScalars scalars = step_scalars(group, t);
    const SetRecord set = p.sets[p.chunks[c].set];
    for (uint64_t j = work.candidates.begin + threadIdx.x; j < work.candidates.end; j += blockDim.x) {
      const unsigned long long position = p.deferred_positions[set.deferral_offset + j];
      const ChunkRecord home = p.chunks[deferred_chunk(position)];
      const TensorRecord tensor = p.tensors[home.tensor];
      const StepTensorRecord buffers = s.tensors[home.tensor];
      const uint64_t entry = home.begin + deferred_entry_in_chunk(position);
      const Range entries{entry, entry + 1};
      uint32_t grad_raw[kStepVectorEntries] = {};
      load_raw(tensor.grad, dtype_bytes(tensor.dtype), entries, grad_raw);
      const ItemPlan item = plan_item(grad_raw, 1, tensor.dtype, work.settle);
      if (!item.touches_state) continue;
      EntryValues values[kStepVectorEntries] = {};
      uint32_t param_raw[kStepVectorEntries] = {};
      const uint32_t param_bytes = dtype_bytes(buffers.param_dtype);
      load_item_state(buffers, param_bytes, buffers.param_dtype, entries,
                      loads_param_bits(item, buffers.master != 0), param_raw, values);
      update_item(item, grad_raw, tensor.dtype, values, group, scalars, has_scale, inv_loss_scale);
      store_item_state(buffers, param_bytes, buffers.param_dtype, entries, item, param_raw, values);
    }
  }
}

}  // namespace

cudaError_t launch_finish(const SelectionLaunch& selection, const StepLaunch& step, int update_blocks,
                          cudaStream_t stream) {
  const uint64_t chunks = selection.large_chunks;
  const uint32_t blocks = static_cast<uint32_t>(chunks < static_cast<uint64_t>(update_blocks) ? chunks : update_blocks);
  finish_deferred<<<blocks < 1 ? 1 : blocks, UpdatePolicy::kThreads, 0, stream>>>(selection, step);
  return cudaGetLastError();
}

cudaError_t configure_step_kernels(int multiprocessors, int* update_blocks) {
  int per_multiprocessor = 0;
  const cudaError_t error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, fused_update,
                                                                          UpdatePolicy::kThreads, 0);
  if (error != cudaSuccess) return error;
  *update_blocks = (per_multiprocessor < 1 ? 1 : per_multiprocessor) * multiprocessors;
  return cudaSuccess;
}

cudaError_t launch_update(const SelectionLaunch& selection, const StepLaunch& step, int update_blocks,
                          cudaStream_t stream) {
  const uint64_t units = selection.chunk_count * UpdatePolicy::kPartsPerChunk;
  const uint32_t blocks = static_cast<uint32_t>(units < static_cast<uint64_t>(update_blocks) ? units : update_blocks);
  fused_update<<<blocks < 1 ? 1 : blocks, UpdatePolicy::kThreads, 0, stream>>>(selection, step);
  return cudaGetLastError();
}

}  // namespace gmtk::kernels
