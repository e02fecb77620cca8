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

// ---- The histogram passes over large sets: one chunk -----------------------------
//
// In order: the sample pass (the coarse bins of the first entries of every
// chunk: the window), pass A (level 0 for every large set, found_inf for every
// chunk), then up to 3 level passes, each taking every large set that is not
// done one level further, over its gradients or its gathered candidates.

// `deferred`: after a step's update, the last level of the sets whose
// boundary bin the update deferred, over the deferred entries' keys.
enum class HistogramPass : uint32_t { sample, level_0, level, deferred };

struct ChunkWork {
  ChunkSource source;      // where the keys to count come from (skip: none)
  bool check_non_finite;   // pass A: apply found_inf's rule to every entry
  bool gather;             // append the in-range keys to the candidate region
  bool count_above;        // the window's level: keys above the range go to kAboveSlot
  LevelRange range;        // the level's bins
  Range entries;           // entries of the chunk to read (the sample pass reads the first few)
  Range candidates;        // from candidates: this chunk's share of the set's keys

  GMTK_HD bool idle() const { return source == ChunkSource::skip && !check_non_finite; }
};

// The contiguous run of chunks [0, chunk_end) that block `block` of `blocks`
// takes in a histogram pass: neighbouring chunks mostly share a set, so a
// block flushes its shared histogram about once per set it meets.
GMTK_HD Range block_chunks(uint32_t block, uint32_t blocks, uint64_t chunk_end) {
  const uint64_t per_block = (chunk_end + blocks - 1) / blocks;
  const uint64_t begin = per_block * block < chunk_end ? per_block * block : chunk_end;
  return {begin, begin + per_block < chunk_end ? begin + per_block : chunk_end};
}

// Whether a call selects at all: given thresholds or a given bitmap decide
// the mask without selection.
GMTK_HD bool selects(const SelectionLaunch& p) { return p.mask_source == static_cast<uint32_t>(MaskSource::selected); }

// Whether chunk `c` belongs to a large set that selects in this call.
GMTK_HD bool selects_large(const SelectionLaunch& p, const SetRecord& set) {
  return selects(p) && set.large && set_target(p.mask_ratio[set.group], set.logical_numel).goal == SetGoal::select;
}

// How this call decides tensor `t`'s entries once selection is over (in the
// update and apply passes, and for the outputs): its set's selected
// threshold, its given threshold taken to its keys' dtype, or its bits of
// the given bitmap.
GMTK_HD KeepTest tensor_keep_test(const SelectionLaunch& p, uint32_t t) {
  const TensorRecord tensor = p.tensors[t];
  if (p.mask_source == static_cast<uint32_t>(MaskSource::given_bits)) {
    return {kKeepAllKey, p.given_mask_bits + tensor.mask_word_offset};
  }
  if (p.mask_source == static_cast<uint32_t>(MaskSource::given_thresholds)) {
    return {threshold_key(p.given_thresholds[t], tensor.key_dtype), nullptr};
  }
  const SetRecord set = p.sets[tensor.set];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.logical_numel);
  return {min_kept_key(target, target.goal == SetGoal::select ? p.states[tensor.set] : SetState{}), nullptr};
}

// What the block that takes chunk `c` does in `pass`. Depends on the chunk's
// data only, so it is the same for every thread.
GMTK_HD ChunkWork chunk_work(const SelectionLaunch& p, HistogramPass pass, uint64_t c) {
  const ChunkRecord chunk = p.chunks[c];
  const SetRecord set = p.sets[chunk.set];
  ChunkWork work{};
  work.check_non_finite = pass == HistogramPass::level_0 && p.check_non_finite != 0;
  work.entries = {chunk.begin, chunk.begin + chunk.length};
  work.source = ChunkSource::skip;
  // A replica's keys are counted on rank 0 alone (SetRecord::counts_here); its
  // found_inf is checked everywhere all the same.
  if (!selects_large(p, set) || !set.counts_here) return work;
  if (pass == HistogramPass::sample) {
    work.source = ChunkSource::gradients;
    work.range = full_range(set.dtype);
    const uint64_t sampled = chunk.length < p.sample_entries ? chunk.length : p.sample_entries;
    work.entries = {chunk.begin, chunk.begin + sampled};
    return work;
  }
  // Field by field: during a gathering pass other blocks advance the
  // candidate cursor of the same record, which only later passes read.
  const SetState& state = p.states[chunk.set];
  // Before the update a deferring set waits; after it, only deferring sets count.
  if (state.done || (state.defer != 0) != (pass == HistogramPass::deferred)) return work;
  work.range = current_range(state);
  work.count_above = state.windowed != 0 && state.level == 0;
  if (state.from_candidates || state.defer) {
    work.source = ChunkSource::candidates;
    // Never past the region, whatever the cursor says.
    const uint64_t capacity = state.defer ? set.deferral_capacity : set.candidate_capacity;
    const uint64_t cursor = state.candidates_gathered;
    const uint64_t gathered = cursor < capacity ? cursor : capacity;
    work.candidates = candidate_slice(gathered, chunk.ordinal, set.chunk_count);
  } else {
    work.source = ChunkSource::gradients;
    work.gather = state.gather != 0;
  }
  return work;
}

// One entry of a chunk: whether it trips found_inf, and whether (and in which
// bin) it is counted, or counted above the window.
struct EntryVisit {
  bool non_finite;
  bool counted;
  bool above;
  uint32_t bin;
  uint32_t key;
};

GMTK_HD EntryVisit visit_key(const ChunkWork& work, uint32_t key) {
  EntryVisit visit{};
  visit.key = key;
  visit.bin = range_bin(key, work.range);
  visit.counted = visit.bin < work.range.bins;
  visit.above = work.count_above && visit.bin == kAboveRange;
  return visit;
}

GMTK_HD EntryVisit visit_entry(const ChunkWork& work, uint32_t raw, uint32_t dtype, bool has_scale,
                               float inv_loss_scale) {
  EntryVisit visit{};
  if (work.source == ChunkSource::gradients) visit = visit_key(work, magnitude_key(raw, dtype));
  visit.non_finite = work.check_non_finite && non_finite_after_unscaling(raw, dtype, has_scale, inv_loss_scale);
  return visit;
}

// A candidate key of a pass over candidates.
GMTK_HD EntryVisit visit_candidate(const ChunkWork& work, uint32_t key) { return visit_key(work, key); }

// A block's shared histogram holds one set's counts: it is flushed before a
// chunk of another set is counted, and before a 32-bit counter could wrap.
GMTK_HD bool must_flush_before(uint32_t pending_set, uint64_t pending_entries, const ChunkRecord& chunk) {
  return pending_set != chunk.set || pending_entries + chunk.length > 0xFFFFFFFFull;
}
constexpr uint32_t kNoPendingSet = 0xFFFFFFFFu;

// ---- Scans (one block per large set) -----------------------------------------

// After the sample pass: whether set `set_index` selects; if so, `state`
// begins its selection. The block sums the sample's segments first.
GMTK_HD bool sample_scan_begins(const SelectionLaunch& p, uint32_t set_index) {
  return selects_large(p, p.sets[set_index]);
}

// Picks the window from the sample's coarse counts (and their segment sums),
// begins the set's selection in it and stores the state.
GMTK_HD void sample_scan_finishes(const SelectionLaunch& p, uint32_t set_index, const uint64_t* segment_sums,
                                  uint32_t segments) {
  const SetRecord set = p.sets[set_index];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.logical_numel);
  const unsigned long long* counts = p.histograms + set.histogram_offset;
  uint64_t sampled = 0;
  for (uint32_t s = 0; s < segments; ++s) sampled += segment_sums[s];
  Window window{false, full_range(set.dtype)};
  if (sampled > 0) {
    const SampleRanks ranks = window_ranks(target.kept, set.logical_numel, sampled);
    const uint32_t high_bin = pick_from_segments(counts, segment_sums, segments, kLevelBins, ranks.high).bin;
    const uint32_t low_bin = pick_from_segments(counts, segment_sums, segments, kLevelBins, ranks.low).bin;
    window = choose_window(set.dtype, low_bin, high_bin);
  }
  SetState state{};
  begin_selection(state, target.kept, window);
  p.states[set_index] = state;
}

// After a level pass (`after_update`: the deferred entries' pass): whether
// set `set_index` scans; if so `state` is where it stands. A deferring set
// is scanned only after its deferred entries were counted.
GMTK_HD bool scan_begins(const SelectionLaunch& p, uint32_t set_index, bool after_update, SetState* state) {
  if (!selects_large(p, p.sets[set_index])) return false;
  *state = p.states[set_index];
  return !state->done && (state->defer != 0) == after_update;
}

// Picks the boundary bin from the set's histogram (and the segment sums of its
// `segments` runs), advances the state and stores it. On the window's level,
// a k-th key outside the window restarts the set over the whole key space.
// Returns whether another level follows.
GMTK_HD bool scan_finishes(const SelectionLaunch& p, uint32_t set_index, const uint64_t* segment_sums,
                           uint32_t segments, SetState* state) {
  const SetRecord set = p.sets[set_index];
  const unsigned long long* counts = p.histograms + set.histogram_offset;
  if (state->windowed && state->level == 0) {
    uint64_t inside = 0;
    for (uint32_t s = 0; s < segments; ++s) inside += segment_sums[s];
    const uint64_t above = counts[kAboveSlot];
    if (state->rank <= above || state->rank > above + inside) {
      restart_without_window(*state, state->rank, set.dtype);
      p.states[set_index] = *state;
      return true;
    }
    state->rank -= above;
    state->kept_above += above;
  }
  const BinPick pick = pick_from_segments(counts, segment_sums, segments, state->bins, state->rank);
  // A step defers only where the update can settle the set alone: fp32 (the
  // region), no non-finite gradient (the update then does nothing), and no
  // per-tensor kept counts to take from the gradients before the update.
  // Nor where the keys are a score: the update would have to re-read it.
  const bool may_defer = p.may_defer != 0 && set.dtype == kFloat32 && *p.flags == 0u && !set.scored &&
                         (set.member_count == 1 || p.count_kept_per_tensor == 0);
  advance_selection(*state, pick, counts[pick.bin], set.candidate_capacity, may_defer, set.deferral_capacity);
  p.states[set_index] = *state;
  return !state->done;
}

// ---- Small sets (one block each, shared memory) ---------------------------------

// Whether small set `set_index` selects; if so `state` starts its selection.
GMTK_HD bool small_set_begins(const SelectionLaunch& p, uint32_t set_index, SetState* state) {
  const SetRecord set = p.sets[set_index];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.logical_numel);
  if (!selects(p) || target.goal != SetGoal::select) return false;
  begin_selection(*state, target.kept, Window{false, full_range(set.dtype)});
  return true;
}

// A small set's level pick: the digit joins the prefix; at the last digit the
// prefix is the threshold key.
GMTK_HD void advance_small_set(SetState& state, const DigitPlan& plan, BinPick pick, uint64_t bin_count) {
  const Digit digit = plan.digit[state.level];
  state.prefix |= pick.bin << digit.shift;
  state.rank = pick.rank_in_bin;
  state.kept_above += pick.above;
  state.bucket_count = bin_count;
  state.level += 1;
  state.done = state.level == static_cast<uint32_t>(plan.levels) ? 1u : 0u;
}

// ---- The apply pass: mask, per-tensor counts and the bitmap ----------------------

struct ApplyWork {
  bool zero_masked;  // write +0 over the masked entries
  bool count_kept;   // add the chunk's kept entries to its tensor's count
  bool write_bits;   // OR the chunk's kept bits into the bitmap (written even when found_inf is set)
  KeepTest test;

  GMTK_HD bool idle() const { return !zero_masked && !count_kept && !write_bits; }
  // Whether an entry's decision needs its key (not under a given bitmap).
  GMTK_HD bool reads_keys() const { return test.bits == nullptr; }
};

GMTK_HD ApplyWork apply_work(const SelectionLaunch& p, uint64_t c, bool found_non_finite) {
  const ChunkRecord chunk = p.chunks[c];
  const SetRecord set = p.sets[chunk.set];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.logical_numel);
  const bool given = !selects(p);
  ApplyWork work{};
  work.test = tensor_keep_test(p, chunk.tensor);
  work.zero_masked = p.zero_masked != 0 && !found_non_finite && (given || target.goal != SetGoal::keep_all);
  work.count_kept = p.count_kept_per_tensor != 0 && set.counts_here &&
                    (given || (set.member_count > 1 && target.goal == SetGoal::select));
  work.write_bits = p.mask_bits != nullptr;
  return work;
}

// ---- Outputs ---------------------------------------------------------------------

GMTK_HD void write_tensor_outputs(const SelectionLaunch& p, uint64_t t) {
  const TensorRecord tensor = p.tensors[t];
  const SetRecord set = p.sets[tensor.set];
  const SetTarget target = set_target(p.mask_ratio[set.group], set.logical_numel);
  if (!selects(p)) {  // a given input: counted per tensor by the apply pass
    if (p.thresholds != nullptr) p.thresholds[t] = given_threshold_value(tensor_keep_test(p, t), set.dtype);
    if (p.kept_counts != nullptr) p.kept_counts[t] = static_cast<int64_t>(p.tensor_kept[t]);
    return;
  }
  const SetState state = target.goal == SetGoal::select ? p.states[tensor.set] : SetState{};
  if (p.thresholds != nullptr) p.thresholds[t] = threshold_value(target, state, set.dtype);
  if (p.kept_counts != nullptr) {
    uint64_t kept = 0;
    if (target.goal == SetGoal::keep_all) {
      kept = tensor.logical_numel;
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
