// The CUDA selection engine run on the host: the launches of
// kernels/selection_kernels.cu in the same order (launch_selection_passes, launch_selection_outputs), each
// kernel's blocks one after another, over the same tables, the same workspace
// layout and the same __host__ __device__ decisions (kernels/selection_passes.hpp).
// What only CUDA has (threads of a block, shared-memory atomics, pass B's
// staging of candidate keys) is replaced by its sequential meaning.
#pragma once

#include <gmtk/gmtk.h>

#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "../../kernels/selection_passes.hpp"
#include "../../kernels/step_passes.hpp"
#include "../../host/workspace.hpp"

namespace gmtk_test {

using namespace gmtk::kernels;

// What a run went through, so that tests can show every branch was taken.
struct EngineTrace {
  int launches = 0;
  int large_sets_selected = 0;
  int small_sets_selected = 0;
  int sets_gathering = 0;        // a level pass read gathered candidates
  int sets_overflowing = 0;      // a bin with 2+ levels left did not fit the candidate region: re-read gradients
  int windows_used = 0;          // pass A counted a sampled window
  int window_misses = 0;         // ... which did not hold the k-th key: restart over the whole key space
  int windows_too_wide = 0;      // the sample spread over too many coarse bins: no window
  int histogram_flushes = 0;
  // The fused update (gmtkStep)
  bool update_ran = false;        // the update launch ran and found every gradient finite
  int64_t idle_chunks = 0;        // freeze at ratio 1: the chunk is not even read
  int64_t vector_items = 0;
  int64_t scalar_items = 0;
  int64_t untouched_items = 0;    // freeze: all 4 entries masked, state neither read nor written
  int64_t entries_updated = 0;
  int64_t entries_fed_zero = 0;   // mask-grad: masked entries updated with +0
  int64_t entries_frozen = 0;
  int64_t param_bits_loaded_with_master = 0;  // freeze: items that reload 16-bit params beside a master
  int64_t misaligned_vector_items = 0;  // a vector item whose load would fault on the device: must stay 0
  int64_t entries_deferred = 0;          // left by the update to the finish pass
  int sets_deferring = 0;                // sets whose boundary bin the update deferred
  int exchanges = 0;                     // sharded: points where the ranks summed counters
  // Mask schedules (SPEC section 8)
  int64_t items_by_bits = 0;             // update items decided by a given bitmap
  int64_t items_by_score = 0;            // update items decided by a score's keys
  int64_t items_without_gradient = 0;    // ... whose gradient was not even read (freeze, all masked)
  int64_t found_inf_rereads = 0;         // pass A chunks whose gradient was read apart from their score
  int64_t mask_bits_set = 0;             // bits the apply pass ORed into the bitmap out
};

// Sizes small enough that every path (large sets of many chunks, windows,
// candidate regions, the one-block path) shows up on a few thousand entries:
// the step and sharded schedule tests' tuning.
inline SelectionTuning tiny_step_tuning() {
  SelectionTuning tuning;
  tuning.chunk_entries = 64;
  tuning.small_set_limit_fp32 = 200;
  tuning.small_set_limit_16bit = 200;
  tuning.candidate_share = 8;
  tuning.min_candidates = 16;
  tuning.sample_entries = 8;
  return tuning;
}

class HostSelectionEngine {
 public:
  // The grid sizes stand in for the device's resident blocks; any value must
  // give the same answer.
  // `exchange`, for a sharded plan: sums `count` counters over the ranks
  // (what the CUDA backend does with NCCL between launches); `rank` is this
  // engine's in the communicator.
  using Exchange = std::function<void(unsigned long long* values, uint64_t count)>;

  HostSelectionEngine(const std::vector<gmtkGroupConfig_t>& groups, const std::vector<gmtkTensor_t>& tensors,
                      const SelectionTuning& tuning, uint32_t persistent_blocks = 3, int rank = 0,
                      Exchange exchange = nullptr)
      : groups_(groups), tables_(build_selection_tables(groups, tensors, tuning, rank)),
        exchange_(std::move(exchange)),
        layout_(selection_workspace(tables_)), persistent_blocks_(persistent_blocks),
        step_tensors_(build_step_tensors(tensors)), step_(std::make_unique<StepLaunch>()) {
    bind_table_sizes(tables_, &launch_);
    launch_.tensors = tables_.tensors.data();
    launch_.sets = tables_.sets.data();
    launch_.members = tables_.members.data();
    launch_.chunks = tables_.chunks.data();
    launch_.large_sets = tables_.large_sets.data();
    launch_.small_sets = tables_.small_sets.data();
    workspace_.resize(layout_.required_bytes);
    step_->tensors = step_tensors_.data();
  }

  const SelectionTables& tables() const { return tables_; }
  size_t workspace_bytes() const { return layout_.required_bytes; }
  void set_mask_ratio(int group, double ratio) { groups_[group].mask_ratio = ratio; }
  void set_group(int group, const gmtkGroupConfig_t& config) { groups_[group] = config; }

  // gmtkSelectThresholds (mask_gradients false) or gmtkMaskGradients on host
  // memory. The workspace holds garbage from before, as a caller's may.
  EngineTrace run(const gmtkStepArgs_t& args, bool mask_gradients) {
    return run(args, mask_gradients ? EngineCall::mask_gradients : EngineCall::select_thresholds);
  }

  // Any of the three calls, gmtkStep's update included (the CUDA backend's run()).
  EngineTrace run(const gmtkStepArgs_t& args, EngineCall call) {
    std::memset(workspace_.data(), 0xA5, workspace_.size());
    unsigned char* base = gmtk::WorkspaceLayout::aligned_base(workspace_.data());
    SelectionLaunch& p = launch_;
    const SelectionSchedule schedule = bind_call(tables_, layout_, base, groups_, args, call, &p);
    trace_ = EngineTrace{};
    trace_.launches = schedule.launches();

    std::memset(base, 0, layout_.zeroed_bytes);  // the cudaMemsetAsync
    if (schedule.write_mask_bits) std::memset(p.mask_bits, 0, p.mask_words * sizeof(uint32_t));
    const auto exchange = [&](ExchangePoint point) {
      if (!schedule.exchange) return;
      for (const ExchangeSpan& span : exchange_spans(tables_, schedule, p, point).span) {
        if (span.count > 0) exchange_(span.values, span.count);
      }
      ++trace_.exchanges;
    };
    if (schedule.sample) {
      histogram_pass(HistogramPass::sample, p.large_chunks);
      exchange(ExchangePoint::sample);
      scan_sample();
    }
    if (schedule.pass_a) {
      histogram_pass(HistogramPass::level_0, schedule.pass_a_chunks);
      exchange(ExchangePoint::level_0);
    }
    if (schedule.large_scan) scan_level();
    for (int level = 0; level < schedule.level_passes; ++level) {
      histogram_pass(HistogramPass::level, p.large_chunks);
      exchange(ExchangePoint::level);
      scan_level();
    }
    if (schedule.small_sets) select_small_sets();
    if (schedule.apply) {
      apply_keep_rule();
      exchange(ExchangePoint::apply);
    }
    // As the CUDA backend: the deferred level does not depend on this rank's
    // chunks (a sharded rank without any still takes part in its exchange).
    if (schedule.update || schedule.deferred) {
      bind_step_call(groups_, args, step_.get());
      if (schedule.update) fused_update();
      if (schedule.deferred) {
        histogram_pass(HistogramPass::deferred, p.large_chunks);
        exchange(ExchangePoint::deferred);
        scan_level(true);
        finish_deferred();
      }
    }
    for (uint64_t t = 0; t < p.tensor_count; ++t) write_tensor_outputs(p, t);
    write_call_outputs(p);
    return trace_;
  }

 private:
  static uint32_t load_raw(uint64_t base, uint32_t dtype, uint64_t entry) {
    if (dtype == kFloat32) {
      uint32_t raw;
      std::memcpy(&raw, reinterpret_cast<const void*>(base + entry * 4), 4);
      return raw;
    }
    uint16_t raw;
    std::memcpy(&raw, reinterpret_cast<const void*>(base + entry * 2), 2);
    return raw;
  }

  static void store_zero(uint64_t base, uint32_t dtype, uint64_t entry) {
    std::memset(reinterpret_cast<void*>(base + entry * dtype_bytes(dtype)), 0, dtype_bytes(dtype));
  }

  // Calls visit(entry) for every entry of [begin, end), item by item as a
  // block's threads take them (scalar head, 16-byte vectors, scalar tail).
  template <typename Visit>
  static void for_each_item_entry(uint64_t base, uint32_t dtype, uint64_t begin, uint64_t end, Visit&& visit) {
    const VectorSplit split = split_for_vectors(base, dtype_bytes(dtype), begin, end);
    for (uint64_t i = 0; i < split.items(); ++i) {
      const Range entries = item_entries(split, i);
      for (uint64_t e = entries.begin; e < entries.end; ++e) visit(e);
    }
  }

  void flush(std::vector<uint32_t>& shared, uint32_t set) {
    unsigned long long* counts = launch_.histograms + launch_.sets[set].histogram_offset;
    for (uint32_t i = 0; i < kHistogramSlots; ++i) {
      counts[i] += shared[i];
      shared[i] = 0;
    }
    ++trace_.histogram_flushes;
  }

  // histogram_pass<pass>: persistent blocks over chunks [0, chunk_end).
  void histogram_pass(HistogramPass pass, uint64_t chunk_end) {
    const SelectionLaunch& p = launch_;
    const bool has_scale = p.inv_loss_scale != nullptr;
    const float inv_loss_scale = has_scale ? *p.inv_loss_scale : 1.0f;
    std::vector<uint32_t> shared(kHistogramSlots);
    for (uint32_t block = 0; block < persistent_blocks_; ++block) {
      uint32_t pending_set = kNoPendingSet;
      uint64_t pending_entries = 0;
      bool non_finite = false;
      const Range chunks = block_chunks(block, persistent_blocks_, chunk_end);
      for (uint64_t c = chunks.begin; c < chunks.end; ++c) {
        const ChunkWork work = chunk_work(p, pass, c);
        if (work.idle()) continue;
        const ChunkRecord chunk = p.chunks[c];
        const SetRecord set = p.sets[chunk.set];
        if (work.source != ChunkSource::skip) {
          if (must_flush_before(pending_set, pending_entries, chunk)) {
            if (pending_set != kNoPendingSet) flush(shared, pending_set);
            pending_set = chunk.set;
            pending_entries = 0;
          }
          pending_entries += chunk.length;
        }
        if (work.source == ChunkSource::candidates) {
          const uint32_t* keys = p.candidates + set.candidate_offset;
          for (uint64_t i = work.candidates.begin; i < work.candidates.end; ++i) {
            const EntryVisit visit = visit_candidate(work, keys[i]);
            if (visit.counted) ++shared[visit.bin];
          }
          continue;
        }
        const TensorRecord tensor = p.tensors[chunk.tensor];
        SetState& state = p.states[chunk.set];
        // A score's keys are counted; found_inf's rule reads the gradient apart.
        const bool keys_apart = tensor.keys != tensor.grad;
        if (keys_apart && work.check_non_finite) {
          ++trace_.found_inf_rereads;
          ChunkWork found_inf_only{};
          found_inf_only.source = ChunkSource::skip;
          found_inf_only.check_non_finite = true;
          for_each_item_entry(tensor.grad, tensor.dtype, work.entries.begin, work.entries.end, [&](uint64_t e) {
            non_finite = non_finite || visit_entry(found_inf_only, load_raw(tensor.grad, tensor.dtype, e),
                                                   tensor.dtype, has_scale, inv_loss_scale).non_finite;
          });
        }
        ChunkWork key_work = work;
        if (keys_apart) key_work.check_non_finite = false;
        if (key_work.idle()) continue;
        for_each_item_entry(tensor.keys, set.dtype, work.entries.begin, work.entries.end, [&](uint64_t e) {
          const EntryVisit visit = visit_entry(key_work, load_raw(tensor.keys, set.dtype, e), set.dtype, has_scale,
                                               inv_loss_scale);
          non_finite = non_finite || visit.non_finite;
          if (visit.above) ++shared[kAboveSlot];
          if (!visit.counted) return;
          ++shared[visit.bin];
          if (work.gather) {  // flush_stage's append, bounded the same way
            const uint64_t slot = state.candidates_gathered++;
            if (slot < set.candidate_capacity) p.candidates[set.candidate_offset + slot] = visit.key;
          }
        });
      }
      if (pending_set != kNoPendingSet) flush(shared, pending_set);
      if (non_finite) *p.flags |= 1u;
    }
  }

  template <typename Count>
  static void sum_segments(const Count* counts, uint32_t bins, uint32_t segments, uint64_t* sums) {
    const uint32_t per_segment = bins / segments;
    for (uint32_t s = 0; s < segments; ++s) {
      sums[s] = 0;
      for (uint32_t i = 0; i < per_segment; ++i) sums[s] += counts[s * per_segment + i];
    }
  }

  static constexpr uint32_t kScanThreads = 256;  // SelectionPolicy::kScanThreads

  void scan_sample() {
    const SelectionLaunch& p = launch_;
    uint64_t sums[kScanThreads];
    for (uint32_t b = 0; b < p.large_set_count; ++b) {
      const uint32_t set_index = p.large_sets[b];
      if (!sample_scan_begins(p, set_index)) continue;
      ++trace_.large_sets_selected;
      const uint32_t segments = scan_segments(kLevelBins, kScanThreads);
      unsigned long long* counts = p.histograms + p.sets[set_index].histogram_offset;
      sum_segments(counts, kLevelBins, segments, sums);
      sample_scan_finishes(p, set_index, sums, segments);
      ++(p.states[set_index].windowed ? trace_.windows_used : trace_.windows_too_wide);
      std::fill(counts, counts + kHistogramSlots, 0ull);
    }
  }

  void scan_level(bool after_update = false) {
    const SelectionLaunch& p = launch_;
    uint64_t sums[kScanThreads];
    for (uint32_t b = 0; b < p.large_set_count; ++b) {
      const uint32_t set_index = p.large_sets[b];
      SetState state{};
      if (!scan_begins(p, set_index, after_update, &state)) continue;
      const bool window_level = state.windowed && state.level == 0;
      if (state.from_candidates) ++trace_.sets_gathering;
      const uint32_t bins = state.bins;
      const uint32_t segments = scan_segments(bins, kScanThreads);
      unsigned long long* counts = p.histograms + p.sets[set_index].histogram_offset;
      sum_segments(counts, bins, segments, sums);
      scan_finishes(p, set_index, sums, segments, &state);
      if (window_level && !state.windowed) ++trace_.window_misses;
      if (state.level > 0 && !state.done && !state.gather && !state.from_candidates && levels_to_resolve(state.shift +
          log2_of_power(state.bins)) >= 2 && p.sets[set_index].dtype == kFloat32) {
        ++trace_.sets_overflowing;
      }
      std::fill(counts, counts + kHistogramSlots, 0ull);  // as the kernel: whether or not another level follows
    }
  }

  void select_small_sets() {
    const SelectionLaunch& p = launch_;
    constexpr uint32_t kSmallSetThreads = 512;  // SelectionPolicy::kSmallSetThreads
    std::vector<uint32_t> histogram(kSmallSetBins);
    uint64_t sums[kSmallSetThreads];
    for (uint32_t b = 0; b < p.small_set_count; ++b) {
      const uint32_t set_index = p.small_sets[b];
      SetState state{};
      if (!small_set_begins(p, set_index, &state)) continue;
      ++trace_.small_sets_selected;
      const SetRecord set = p.sets[set_index];
      const DigitPlan plan = small_set_digits(set.dtype);
      for (int level = 0; level < plan.levels; ++level) {
        const Digit digit = plan.digit[level];
        const uint32_t bins = digit_bins(digit);
        std::fill(histogram.begin(), histogram.begin() + bins, 0u);
        for (uint32_t m = 0; m < set.member_count; ++m) {
          const TensorRecord tensor = p.tensors[p.members[set.first_member + m]];
          for_each_item_entry(tensor.keys, set.dtype, 0, tensor.numel, [&](uint64_t e) {
            const uint32_t key = magnitude_key(load_raw(tensor.keys, set.dtype, e), set.dtype);
            if (matches_prefix(key, state.prefix, digit)) ++histogram[digit_of(key, digit)];
          });
        }
        const uint32_t segments = scan_segments(bins, kSmallSetThreads);
        sum_segments(histogram.data(), bins, segments, sums);
        const BinPick pick = pick_from_segments(histogram.data(), sums, segments, bins, state.rank);
        advance_small_set(state, plan, pick, histogram[pick.bin]);
      }
      p.states[set_index] = state;
    }
  }

  void apply_keep_rule() {
    const SelectionLaunch& p = launch_;
    const bool found_non_finite = *p.flags != 0u;
    for (uint64_t c = 0; c < p.chunk_count; ++c) {
      const ApplyWork work = apply_work(p, c, found_non_finite);
      if (work.idle()) continue;
      const ChunkRecord chunk = p.chunks[c];
      const TensorRecord tensor = p.tensors[chunk.tensor];
      uint64_t kept = 0;
      // The kernel's items are the gradient's; each item's bits are placed
      // (place_mask_bits) and ORed in, as its warp does with one atomicOr a word.
      const VectorSplit split = split_for_vectors(tensor.grad, dtype_bytes(tensor.dtype), chunk.begin,
                                                  chunk.begin + chunk.length);
      for (uint64_t i = 0; i < split.items(); ++i) {
        const Range entries = item_entries(split, i);
        const auto count = static_cast<uint32_t>(entries.end - entries.begin);
        uint32_t keys[8] = {};
        for (uint32_t e = 0; e < count && work.reads_keys(); ++e) {
          keys[e] = magnitude_key(load_raw(tensor.keys, tensor.key_dtype, entries.begin + e), tensor.key_dtype);
        }
        const uint32_t bits = item_kept_bits(work.test, entries.begin, count, keys);
        kept += static_cast<uint64_t>(count_bits(bits));
        for (uint32_t e = 0; e < count && work.zero_masked; ++e) {
          if (((bits >> e) & 1u) == 0u) store_zero(tensor.grad, tensor.dtype, entries.begin + e);
        }
        if (work.write_bits && bits != 0) {
          uint32_t* words = p.mask_bits + tensor.mask_word_offset;
          const BitsPlacement place = place_mask_bits(entries.begin, bits);
          words[place.word] |= place.low;
          if (place.high != 0) words[place.word + 1] |= place.high;
          trace_.mask_bits_set += count_bits(bits);
        }
      }
      if (work.count_kept) p.tensor_kept[chunk.tensor] += kept;
    }
  }

  static int count_bits(uint32_t bits) {
    int n = 0;
    for (; bits != 0; bits &= bits - 1) ++n;
    return n;
  }

  static void store_raw(uint64_t base, uint32_t dtype, uint64_t entry, uint32_t raw) {
    if (dtype == kFloat32) {
      std::memcpy(reinterpret_cast<void*>(base + entry * 4), &raw, 4);
    } else {
      const auto bits = static_cast<uint16_t>(raw);
      std::memcpy(reinterpret_cast<void*>(base + entry * 2), &bits, 2);
    }
  }
  static float load_float(uint64_t base, uint64_t entry) { return float_from_bits(load_raw(base, kFloat32, entry)); }
  static void store_float(uint64_t base, uint64_t entry, float value) {
    store_raw(base, kFloat32, entry, bits_from_float(value));
  }

  // fused_update (step_kernels.cu): its work units (chunk parts), items and
  // loads, each "vector" load one entry at a time.
  void fused_update() {
    const SelectionLaunch& p = launch_;
    const StepLaunch& s = *step_;
    if (*p.flags != 0u) return;
    trace_.update_ran = true;
    const int64_t t = step_index(s.step_count, s.step);
    const bool has_scale = p.inv_loss_scale != nullptr;
    const float inv_loss_scale = has_scale ? *p.inv_loss_scale : 1.0f;
    constexpr uint32_t kParts = 4;  // UpdatePolicy::kPartsPerChunk
    for (uint64_t unit = 0; unit < p.chunk_count * kParts; ++unit) {
      const uint64_t c = unit / kParts;
      const ChunkRecord chunk = p.chunks[c];
      const Range part = candidate_slice(chunk.length, static_cast<uint32_t>(unit % kParts), kParts);
      if (part.begin == part.end) continue;
      const UpdateWork work = update_work(p, s, c);
      if (work.idle) {
        ++trace_.idle_chunks;
        continue;
      }
      const StepScalars scalars = step_scalars(s.groups[work.group], t);
      const StepGroup& group = s.groups[work.group];
      const TensorRecord tensor = p.tensors[chunk.tensor];
      const StepTensorRecord buffers = s.tensors[chunk.tensor];
      const VectorSplit split = split_for_step(buffers.vector_phase, chunk.begin + part.begin, chunk.begin + part.end);
      for (uint64_t i = 0; i < split.items(); ++i) {
        const Range entries = item_entries(split, i);
        const auto count = static_cast<uint32_t>(entries.end - entries.begin);
        ++(count > 1 ? trace_.vector_items : trace_.scalar_items);
        if (count > 1) {  // the device loads 4 entries of every buffer as one vector: aligned to 4 elements
          // A score the update loads (its keys) counts too.
          const uint64_t score = tensor.keys != tensor.grad ? tensor.keys : 0;
          const uint64_t addresses[] = {tensor.grad,        buffers.param,          buffers.master, buffers.exp_avg,
                                        buffers.exp_avg_sq, buffers.max_exp_avg_sq, score};
          const uint32_t bytes[] = {dtype_bytes(tensor.dtype), dtype_bytes(buffers.param_dtype), 4, 4, 4, 4,
                                    dtype_bytes(tensor.key_dtype)};
          for (int b = 0; b < 7; ++b) {
            if (addresses[b] != 0 && (addresses[b] + entries.begin * bytes[b]) % (4u * bytes[b]) != 0) {
              ++trace_.misaligned_vector_items;
            }
          }
        }
        uint32_t grad_raw[kStepVectorEntries] = {};
        // update_items<..., keys>: a bitmap or a score decides before the gradient is read.
        const ItemKeys keys = item_keys(work, tensor);
        ItemPlan item{};
        if (keys == ItemKeys::bitmap) {
          ++trace_.items_by_bits;
          item = plan_item_from_bits(mask_bits_of(work.test.bits, entries.begin, count), count, work);
        } else if (keys == ItemKeys::score) {
          ++trace_.items_by_score;
          uint32_t key_raw[kStepVectorEntries] = {};
          for (uint32_t e = 0; e < count; ++e) key_raw[e] = load_raw(tensor.keys, tensor.key_dtype, entries.begin + e);
          item = plan_item(key_raw, count, tensor.key_dtype, work);
        }
        const bool decided_first = keys == ItemKeys::bitmap || keys == ItemKeys::score;
        if (decided_first && !item.touches_state) ++trace_.items_without_gradient;
        if (!decided_first || item.touches_state) {
          for (uint32_t e = 0; e < count; ++e) grad_raw[e] = load_raw(tensor.grad, tensor.dtype, entries.begin + e);
        }
        if (!decided_first) item = plan_item(grad_raw, count, tensor.dtype, work);
        for (uint32_t e = 0; e < count; ++e) {
          ++(item.fate[e] == EntryFate::update             ? trace_.entries_updated
             : item.fate[e] == EntryFate::update_with_zero ? trace_.entries_fed_zero
             : item.fate[e] == EntryFate::deferred         ? trace_.entries_deferred
                                                           : trace_.entries_frozen);
        }
        if (item.deferred != 0) {  // defer_entries
          const SetRecord set = p.sets[chunk.set];
          unsigned long long& cursor = p.states[chunk.set].candidates_gathered;
          for (uint32_t e = 0; e < count; ++e) {
            if (item.fate[e] != EntryFate::deferred) continue;
            const uint64_t slot = cursor++;
            if (slot < set.deferral_capacity) {
              p.candidates[set.candidate_offset + slot] = magnitude_key(grad_raw[e], tensor.dtype);
              p.deferred_positions[set.deferral_offset + slot] =
                  deferred_position(c, entries.begin + e - chunk.begin);
            }
          }
        }
        if (!item.touches_state) {
          ++trace_.untouched_items;
          continue;
        }
        EntryValues values[kStepVectorEntries] = {};
        uint32_t param_raw[kStepVectorEntries] = {};
        const bool param_bits = loads_param_bits(item, buffers.master != 0);
        if (param_bits && buffers.master != 0) ++trace_.param_bits_loaded_with_master;
        load_item_state(buffers, entries, param_bits, param_raw, values);
        update_item(item, grad_raw, tensor.dtype, values, group, scalars, has_scale, inv_loss_scale);
        store_item_state(buffers, entries, item, param_raw, values);
      }
    }
  }

  // finish_deferred (step_kernels.cu): each deferred entry settled alone.
  void finish_deferred() {
    const SelectionLaunch& p = launch_;
    const StepLaunch& s = *step_;
    if (*p.flags != 0u) return;
    const int64_t t = step_index(s.step_count, s.step);
    const bool has_scale = p.inv_loss_scale != nullptr;
    const float inv_loss_scale = has_scale ? *p.inv_loss_scale : 1.0f;
    for (uint32_t b = 0; b < p.large_set_count; ++b) {
      if (p.states[p.large_sets[b]].defer) ++trace_.sets_deferring;
    }
    for (uint64_t c = 0; c < p.large_chunks; ++c) {
      const FinishWork work = finish_work(p, s, c);
      if (work.idle) continue;
      const StepGroup& group = s.groups[work.group];
      const StepScalars scalars = step_scalars(group, t);
      const SetRecord set = p.sets[p.chunks[c].set];
      for (uint64_t j = work.candidates.begin; j < work.candidates.end; ++j) {
        const unsigned long long position = p.deferred_positions[set.deferral_offset + j];
        const ChunkRecord home = p.chunks[deferred_chunk(position)];
        const TensorRecord tensor = p.tensors[home.tensor];
        const StepTensorRecord buffers = s.tensors[home.tensor];
        const uint64_t entry = home.begin + deferred_entry_in_chunk(position);
        uint32_t grad_raw[kStepVectorEntries] = {load_raw(tensor.grad, tensor.dtype, entry), 0, 0, 0};
        const ItemPlan item = plan_item(grad_raw, 1, tensor.dtype, work.settle);
        if (!item.touches_state) continue;
        EntryValues values[kStepVectorEntries] = {};
        uint32_t param_raw[kStepVectorEntries] = {};
        const Range entries{entry, entry + 1};
        load_item_state(buffers, entries, loads_param_bits(item, buffers.master != 0), param_raw, values);
        update_item(item, grad_raw, tensor.dtype, values, group, scalars, has_scale, inv_loss_scale);
        store_item_state(buffers, entries, item, param_raw, values);
      }
    }
  }

  // load_item_state / store_item_state (step_kernels.cu), entry by entry.
  static void load_item_state(const StepTensorRecord& buffers, Range entries, bool param_bits, uint32_t* param_raw,
                              EntryValues* values) {
    for (uint64_t entry = entries.begin; entry < entries.end; ++entry) {
      const uint64_t e = entry - entries.begin;
      if (param_bits) param_raw[e] = load_raw(buffers.param, buffers.param_dtype, entry);
      values[e].param = buffers.master != 0 ? load_float(buffers.master, entry)
                                            : gradient_to_float(param_raw[e], buffers.param_dtype);
      if (buffers.exp_avg != 0) values[e].exp_avg = load_float(buffers.exp_avg, entry);
      if (buffers.exp_avg_sq != 0) values[e].exp_avg_sq = load_float(buffers.exp_avg_sq, entry);
      if (buffers.max_exp_avg_sq != 0) values[e].max_exp_avg_sq = load_float(buffers.max_exp_avg_sq, entry);
    }
  }

  static void store_item_state(const StepTensorRecord& buffers, Range entries, const ItemPlan& item,
                               const uint32_t* param_raw, const EntryValues* values) {
    for (uint64_t entry = entries.begin; entry < entries.end; ++entry) {
      const uint64_t e = entry - entries.begin;
      store_raw(buffers.param, buffers.param_dtype, entry,
                param_bits_to_store(item.fate[e], param_raw[e], values[e].param, buffers.param_dtype));
      if (buffers.master != 0) store_float(buffers.master, entry, values[e].param);
      if (buffers.exp_avg != 0) store_float(buffers.exp_avg, entry, values[e].exp_avg);
      if (buffers.exp_avg_sq != 0) store_float(buffers.exp_avg_sq, entry, values[e].exp_avg_sq);
      if (buffers.max_exp_avg_sq != 0) store_float(buffers.max_exp_avg_sq, entry, values[e].max_exp_avg_sq);
    }
  }

  std::vector<gmtkGroupConfig_t> groups_;
  SelectionTables tables_;
  Exchange exchange_;
  SelectionWorkspace layout_;
  uint32_t persistent_blocks_;
  SelectionLaunch launch_{};
  std::vector<unsigned char> workspace_;
  EngineTrace trace_;
  std::vector<StepTensorRecord> step_tensors_;
  std::unique_ptr<StepLaunch> step_;  // ~20 KB
};

}  // namespace gmtk_test
