// The selection passes, step by step, as __host__ __device__ functions over
// the launch parameters: what a block does with a chunk, what a scan decides
// for a set, what the apply pass does, what the outputs are. The kernels in
// selection_kernels.cu call these between their loads, shared-memory
// histograms and barriers; tests/host_schedule/ calls the same functions in
// the same order on the host.
#pragma once

#include "selection_logic.hpp"
#include "selection_plan.hpp"

namespace gmtk::kernels {

// ---- Passes A, B, C: one chunk -----------------------------------------------

struct ChunkWork {
  ChunkSource source;      // where the keys to histogram come from (skip: none)
  bool check_non_finite;   // pass A: apply found_inf's rule to every entry
  bool gather;             // pass B: append the prefix-matching keys to the candidate region
  Digit digit;             // the level's digit of the set
  uint32_t prefix;         // the set's decided bits
  Range candidates;        // pass C from candidates: this chunk's share of the set's keys

  GMTK_HD bool idle() const { return source == ChunkSource::skip && !check_non_finite; }
};

// The contiguous run of chunks [0, chunk_end) that block `block` of `blocks`
// takes in passes A, B and C: neighbouring chunks mostly share a set, so a
// block flushes its shared histogram about once per set it meets.
GMTK_HD Range block_chunks(uint32_t block, uint32_t blocks, uint64_t chunk_end) {
  const uint64_t per_block = (chunk_end + blocks - 1) / blocks;
  const uint64_t begin = per_block * block < chunk_end ? per_block * block : chunk_end;
  return {begin, begin + per_block < chunk_end ? begin + per_block : chunk_end};
}

// What the block that takes chunk `c` does at `level` (0: pass A, 1: B, 2: C).
// Depends on the chunk's data only, so it is the same for every thread.
GMTK_HD ChunkWork chunk_work(const SelectionLaunch& p, int level, uint64_t c) {
  const ChunkRecord chunk = p.chunks[c];
  const SetRecord set = p.sets[chunk.set];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.numel);
  const bool selecting = set.large && target.goal == SetGoal::select;
  ChunkWork work{};
  work.check_non_finite = level == 0 && p.check_non_finite != 0;
  work.source = selecting ? ChunkSource::gradients : ChunkSource::skip;
  work.digit = digit_plan(set.dtype, true).digit[level];
  if (level > 0 && selecting) {
    // Field by field: during pass B other blocks advance the candidate
    // cursor of the same record, which only pass C reads.
    const SetState& state = p.states[chunk.set];
    work.source = refinement_source(state, level);
    work.prefix = state.prefix;
    work.gather = level == 1 && work.source == ChunkSource::gradients && state.gather != 0;
    if (work.source == ChunkSource::candidates) {
      // Never past the region, whatever the cursor says.
      const uint64_t cursor = state.candidates_gathered;
      const uint64_t gathered = cursor < set.candidate_capacity ? cursor : set.candidate_capacity;
      work.candidates = candidate_slice(gathered, chunk.ordinal, set.chunk_count);
    }
  }
  return work;
}

// One entry of a chunk: whether it trips found_inf, and whether (and in which
// bin) it is counted.
struct EntryVisit {
  bool non_finite;
  bool counted;
  uint32_t bin;
  uint32_t key;
};

GMTK_HD EntryVisit visit_entry(const ChunkWork& work, uint32_t raw, uint32_t dtype, bool has_scale,
                               float inv_loss_scale) {
  EntryVisit visit{};
  visit.key = magnitude_key(raw, dtype);
  visit.non_finite = work.check_non_finite && non_finite_after_unscaling(raw, dtype, has_scale, inv_loss_scale);
  visit.counted = work.source == ChunkSource::gradients && matches_prefix(visit.key, work.prefix, work.digit);
  visit.bin = digit_of(visit.key, work.digit);
  return visit;
}

// A candidate key of pass C.
GMTK_HD EntryVisit visit_candidate(const ChunkWork& work, uint32_t key) {
  return {false, matches_prefix(key, work.prefix, work.digit), digit_of(key, work.digit), key};
}

// A block's shared histogram holds one set's counts: it is flushed before a
// chunk of another set is counted, and before a 32-bit counter could wrap.
GMTK_HD bool must_flush_before(uint32_t pending_set, uint64_t pending_entries, const ChunkRecord& chunk) {
  return pending_set != chunk.set || pending_entries + chunk.length > 0xFFFFFFFFull;
}
constexpr uint32_t kNoPendingSet = 0xFFFFFFFFu;

// ---- Scans (one block per large set) -----------------------------------------

// Whether set `set_index` scans at `level`; if so, `state` is where it stands
// (a fresh selection at level 0).
GMTK_HD bool scan_begins(const SelectionLaunch& p, int level, uint32_t set_index, SetState* state) {
  const SetRecord set = p.sets[set_index];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.numel);
  if (target.goal != SetGoal::select || level >= digit_plan(set.dtype, true).levels) return false;
  if (level == 0) {
    begin_selection(*state, target.kept);
    return true;
  }
  *state = p.states[set_index];
  return !state->done && static_cast<int>(state->level) == level;
}

// The level's digit of a large set.
GMTK_HD Digit scan_digit(const SelectionLaunch& p, int level, uint32_t set_index) {
  return digit_plan(p.sets[set_index].dtype, true).digit[level];
}

// Picks the boundary bin from the set's histogram (and the segment sums of its
// `segments` runs), advances the state, decides pass B's gathering after
// level 0, and stores the state. Returns whether the histogram is needed
// again (another level follows).
GMTK_HD bool scan_finishes(const SelectionLaunch& p, int level, uint32_t set_index, const uint64_t* segment_sums,
                           uint32_t segments, SetState* state) {
  const SetRecord set = p.sets[set_index];
  const DigitPlan plan = digit_plan(set.dtype, true);
  const unsigned long long* counts = p.histograms + set.histogram_offset;
  const BinPick pick = pick_from_segments(counts, segment_sums, segments, digit_bins(plan.digit[level]), state->rank);
  advance_selection(*state, plan, pick, counts[pick.bin]);
  if (level == 0 && set.dtype == kFloat32) {
    state->gather = should_gather_candidates(state->bucket_count, set.candidate_capacity) ? 1u : 0u;
  }
  p.states[set_index] = *state;
  return !state->done;
}

// ---- Small sets (one block each, shared memory) ---------------------------------

// Whether small set `set_index` selects; if so `state` starts its selection.
GMTK_HD bool small_set_begins(const SelectionLaunch& p, uint32_t set_index, SetState* state) {
  const SetRecord set = p.sets[set_index];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.numel);
  if (target.goal != SetGoal::select) return false;
  begin_selection(*state, target.kept);
  return true;
}

// ---- The apply pass: mask and per-tensor counts ---------------------------------

struct ApplyWork {
  bool zero_masked;  // write +0 over the masked entries
  bool count_kept;   // add the chunk's kept entries to its tensor's count
  uint32_t min_kept_key;

  GMTK_HD bool idle() const { return !zero_masked && !count_kept; }
};

GMTK_HD ApplyWork apply_work(const SelectionLaunch& p, uint64_t c, bool found_non_finite) {
  const ChunkRecord chunk = p.chunks[c];
  const SetRecord set = p.sets[chunk.set];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.numel);
  ApplyWork work{};
  work.zero_masked = p.zero_masked != 0 && !found_non_finite && target.goal != SetGoal::keep_all;
  work.count_kept = p.count_kept_per_tensor != 0 && set.member_count > 1 && target.goal == SetGoal::select;
  work.min_kept_key = min_kept_key(target, target.goal == SetGoal::select ? p.states[chunk.set] : SetState{});
  return work;
}

// ---- Outputs ---------------------------------------------------------------------

GMTK_HD void write_tensor_outputs(const SelectionLaunch& p, uint64_t t) {
  const TensorRecord tensor = p.tensors[t];
  const SetRecord set = p.sets[tensor.set];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.numel);
  const SetState state = target.goal == SetGoal::select ? p.states[tensor.set] : SetState{};
  if (p.thresholds != nullptr) p.thresholds[t] = threshold_value(target, state, set.dtype);
  if (p.kept_counts != nullptr) {
    uint64_t kept = 0;
    if (target.goal == SetGoal::keep_all) {
      kept = tensor.numel;
    } else if (target.goal == SetGoal::select) {
      kept = set.member_count == 1 ? set_kept_count(state) : p.tensor_kept[t];
    }
    p.kept_counts[t] = static_cast<int64_t>(kept);
  }
}

GMTK_HD float found_inf_value(uint32_t flag) { return flag != 0 ? 1.0f : 0.0f; }

// The call-wide outputs, once: found_inf, and gmtkStep's counter, which
// advances (t = *step_count + 1 stored) only when the step applied.
GMTK_HD void write_call_outputs(const SelectionLaunch& p) {
  const uint32_t flag = *p.flags;
  if (p.found_inf != nullptr) *p.found_inf = found_inf_value(flag);
  if (p.step_count != nullptr && flag == 0) *p.step_count = *p.step_count + 1;
}

}  // namespace gmtk::kernels
