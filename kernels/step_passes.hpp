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
  bool defer;             // the set's boundary bin is deferred: `range`
  uint32_t group;
  KeepTest test;          // by key (entries with key >= test.min_kept_key are kept, when not deferring) or by bits
  LevelRange range;
};

// Where the update takes an item's decisions from: the gradient's keys, the
// same with the set's boundary bin deferred, a score's keys, or a given bitmap.
enum class ItemKeys : uint32_t { gradient, gradient_deferring, score, bitmap };

// Runs after selection: every set's answer is final. Called only when no
// gradient was found non-finite (the whole pass is then a no-op).
GMTK_HD UpdateWork update_work(const SelectionLaunch& p, const StepLaunch& s, uint64_t c) {
  const ChunkRecord chunk = p.chunks[c];
  const SetRecord set = p.sets[chunk.set];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.logical_numel);
  UpdateWork work{};
  work.group = set.group;
  work.freeze = (s.groups[set.group].flags & kFreeze) != 0;
  work.test = tensor_keep_test(p, chunk.tensor);
  if (!selects(p)) return work;  // a given input: nothing deferred
  const SetState state = target.goal == SetGoal::select ? p.states[chunk.set] : SetState{};
  work.defer = state.defer != 0 && !state.done;
  work.range = current_range(state);
  // Freeze at ratio 1 keeps nothing and changes nothing: not even the gradient is read.
  work.idle = work.freeze && target.goal == SetGoal::keep_none;
  return work;
}

// Where the update of a chunk of tensor `tensor` takes its decisions from.
GMTK_HD ItemKeys item_keys(const UpdateWork& work, const TensorRecord& tensor) {
  if (work.test.bits != nullptr) return ItemKeys::bitmap;
  if (work.defer) return ItemKeys::gradient_deferring;  // never a scored set (scan_finishes)
  return tensor.keys != tensor.grad ? ItemKeys::score : ItemKeys::gradient;
}

// The fate of an entry in the update pass.
GMTK_HD EntryFate update_fate(uint32_t key, const UpdateWork& work) {
  return work.defer ? deferring_entry_fate(key, work.range, work.freeze)
                    : entry_fate(key, work.test.min_kept_key, work.freeze);
}

// Where a deferred entry is: its chunk, and its entry in the chunk (< 2^16).
GMTK_HD unsigned long long deferred_position(uint64_t chunk, uint64_t entry_in_chunk) {
  return (static_cast<unsigned long long>(chunk) << 16) | entry_in_chunk;
}
GMTK_HD uint64_t deferred_chunk(unsigned long long position) { return position >> 16; }
GMTK_HD uint64_t deferred_entry_in_chunk(unsigned long long position) { return position & 0xFFFFu; }

// The finish pass: the deferred entries of chunk `c`'s share of its set,
// settled with the set's exact threshold (empty unless the set deferred).
struct FinishWork {
  bool idle;
  Range candidates;   // into the set's candidate and deferral regions
  uint32_t group;
  UpdateWork settle;  // the entries' fates under the set's exact threshold
};

GMTK_HD FinishWork finish_work(const SelectionLaunch& p, const StepLaunch& s, uint64_t c) {
  const ChunkRecord chunk = p.chunks[c];
  const SetRecord set = p.sets[chunk.set];
  FinishWork work{};
  work.idle = true;
  if (!selects_large(p, set)) return work;
  const SetState state = p.states[chunk.set];
  if (!state.defer || !state.done) return work;
  const uint64_t cursor = state.candidates_gathered;
  const uint64_t gathered = cursor < set.deferral_capacity ? cursor : set.deferral_capacity;
  work.candidates = candidate_slice(gathered, chunk.ordinal, set.chunk_count);
  work.idle = work.candidates.begin == work.candidates.end;
  work.group = set.group;
  work.settle.group = set.group;
  work.settle.freeze = (s.groups[set.group].flags & kFreeze) != 0;
  work.settle.test = {state.prefix, nullptr};
  return work;
}

// ---- An item -------------------------------------------------------------------

struct ItemPlan {
  uint32_t count;  // 1 or 4 entries
  EntryFate fate[kStepVectorEntries];
  bool touches_state;  // false: no entry updated now, so param, master and state are neither read nor written
  uint32_t deferred;   // entries left to the finish pass
};

GMTK_HD bool left_alone(EntryFate fate) { return fate == EntryFate::skip || fate == EntryFate::deferred; }

GMTK_HD void add_fate(ItemPlan& plan, uint32_t e, EntryFate fate) {
  plan.fate[e] = fate;
  plan.touches_state = plan.touches_state || fate == EntryFate::update || fate == EntryFate::update_with_zero;
  plan.deferred += fate == EntryFate::deferred ? 1u : 0u;
}

// Decides an item's entries from their stored keys (the gradient's, or a
// score's). In freeze mode an item whose entries are all masked touches
// nothing but its keys: at high ratios whole 32-byte sectors of param,
// master and state stay unread (and of the gradient too, under a score).
GMTK_HD ItemPlan plan_item(const uint32_t* key_raw, uint32_t count, uint32_t key_dtype, const UpdateWork& work) {
  ItemPlan plan{};
  plan.count = count;
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) {
    if (e >= count) break;  // constant indexes keep the arrays in registers
    add_fate(plan, e, update_fate(magnitude_key(key_raw[e], key_dtype), work));
  }
  return plan;
}

// The same from an item's bits of a given bitmap (bit e: entry e kept). A
// fixed-bitmap freeze step reads nothing else of an item whose bits are clear.
GMTK_HD ItemPlan plan_item_from_bits(uint32_t bits, uint32_t count, const UpdateWork& work) {
  ItemPlan plan{};
  plan.count = count;
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) {
    if (e >= count) break;
    const bool kept = ((bits >> e) & 1u) != 0u;
    add_fate(plan, e, kept ? EntryFate::update : work.freeze ? EntryFate::skip : EntryFate::update_with_zero);
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
    any_frozen = any_frozen || left_alone(plan.fate[e]);
  }
  return any_frozen;
}

// Updates the item's loaded values in place (frozen entries are left as loaded).
GMTK_HD void update_item(const ItemPlan& plan, const uint32_t* grad_raw, uint32_t grad_dtype, EntryValues* values,
                         const StepGroup& group, const StepScalars& scalars, bool has_scale, float inv_loss_scale) {
  for (uint32_t e = 0; e < kStepVectorEntries; ++e) {
    if (e >= plan.count) break;
    if (left_alone(plan.fate[e])) continue;
    update_entry(entry_gradient(grad_raw[e], grad_dtype, plan.fate[e], has_scale, inv_loss_scale), values[e], group,
                 scalars);
  }
}

// The parameter bits to store for an entry: its updated value rounded to the
// parameter's dtype, or, for a frozen entry, the bits it was loaded with
// (a 16-bit signalling NaN would not survive a round trip through fp32).
GMTK_HD uint32_t param_bits_to_store(EntryFate fate, uint32_t loaded_raw, float value, uint32_t param_dtype) {
  return left_alone(fate) ? loaded_raw : float_to_stored_bits(value, param_dtype);
}

}  // namespace gmtk::kernels
