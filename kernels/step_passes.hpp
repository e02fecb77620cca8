// The fused update pass, step by step, as __host__ __device__ functions over
// the launch parameters: what a block does with a chunk, what a thread does
// with an item of up to 4 entries. kernels/step_kernels.cu calls these between
// its vector loads and stores; tests/host_schedule/ calls them in the same
// order on the host.
#pragma once

#include "selection_passes.hpp"
#include "step_logic.hpp"
#include "step_plan.hpp"

namespace gmtk::kernels {

// ---- A chunk -----------------------------------------------------------------

struct UpdateWork {
  bool idle;              // nothing in the chunk changes
  bool freeze;
  uint32_t group;
  uint32_t min_kept_key;  // entries with key >= this are kept
};

// Runs after selection: every set's answer is final. Called only when no
// gradient was found non-finite (the whole pass is then a no-op).
GMTK_HD UpdateWork update_work(const SelectionLaunch& p, const StepLaunch& s, uint64_t c) {
  const ChunkRecord chunk = p.chunks[c];
  const SetRecord set = p.sets[chunk.set];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.numel);
  UpdateWork work{};
  work.group = set.group;
  work.freeze = (s.groups[set.group].flags & kFreeze) != 0;
  work.min_kept_key = min_kept_key(target, target.goal == SetGoal::select ? p.states[chunk.set] : SetState{});
  // Freeze at ratio 1 keeps nothing and changes nothing: not even the gradient is read.
  work.idle = work.freeze && target.goal == SetGoal::keep_none;
  return work;
}

// ---- An item -------------------------------------------------------------------

struct ItemPlan {
  uint32_t count;  // 1 or 4 entries
  EntryFate fate[kStepVectorEntries];
  bool touches_state;  // false: every entry frozen, so param, master and state are neither read nor written
};

// Decides an item's entries from their stored gradients. In freeze mode an
// item whose entries are all masked touches nothing but its gradient: at
// high ratios whole 32-byte sectors of param, master and state stay unread.
GMTK_HD ItemPlan plan_item(const uint32_t* grad_raw, uint32_t count, uint32_t grad_dtype, const UpdateWork& work) {
  ItemPlan plan{};
  plan.count = count;
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) {
    if (e >= count) break;  // constant indexes keep the arrays in registers
    plan.fate[e] = entry_fate(magnitude_key(grad_raw[e], grad_dtype), work.min_kept_key, work.freeze);
    plan.touches_state = plan.touches_state || plan.fate[e] != EntryFate::skip;
  }
  return plan;
}

// Whether the item's stored parameter bits must be loaded: always without a
// master (they are the fp32 value's source); with one, only when a frozen
// entry must keep its bits through the item's vector store.
GMTK_HD bool loads_param_bits(const ItemPlan& plan, bool has_master) {
  if (!has_master) return true;
  bool any_frozen = false;
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) {
    if (e >= plan.count) break;
    any_frozen = any_frozen || plan.fate[e] == EntryFate::skip;
  }
  return any_frozen;
}

// Updates the item's loaded values in place (frozen entries are left as loaded).
GMTK_HD void update_item(const ItemPlan& plan, const uint32_t* grad_raw, uint32_t grad_dtype, EntryValues* values,
                         const StepGroup& group, const StepScalars& scalars, bool has_scale, float inv_loss_scale) {
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) {
    if (e >= plan.count) break;
    if (plan.fate[e] == EntryFate::skip) continue;
    update_entry(entry_gradient(grad_raw[e], grad_dtype, plan.fate[e], has_scale, inv_loss_scale), values[e], group,
                 scalars);
  }
}

// The parameter bits to store for an entry: its updated value rounded to the
// parameter's dtype, or, for a frozen entry, the bits it was loaded with
// (a 16-bit signalling NaN would not survive a round trip through fp32).
GMTK_HD uint32_t param_bits_to_store(EntryFate fate, uint32_t loaded_raw, float value, uint32_t param_dtype) {
  return fate == EntryFate::skip ? loaded_raw : float_to_stored_bits(value, param_dtype);
}

}  // namespace gmtk::kernels
