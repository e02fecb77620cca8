// The selection engine's kernels: thin loops, shared memory and atomics
// around the decisions of selection_logic.hpp, launched in the order of
// selection_schedule() (docs/design.md, "Selection"). Every index is 64-bit.
#include "selection_kernels.hpp"

#include "selection_passes.hpp"

#include <cuda_runtime.h>

namespace gmtk::kernels {
namespace {

// Launch shapes, in one place.
struct SelectionPolicy {
  static constexpr int kHistogramThreads = 768;  // histogram passes: persistent blocks over the chunk table, 2 per SM at <= 40 registers
  static constexpr int kScanThreads = 256;        // one block per large set
  static constexpr int kSmallSetThreads = 512;    // one block per small set
  static constexpr int kApplyThreads = 256;
  static constexpr int kOutputThreads = 256;
  // Pass B stages candidate keys in shared memory and appends them with one
  // global atomic per flush; one loop round adds at most one 16-byte vector
  // (4 fp32 keys) per thread.
  static constexpr int kLevelPassItems = 2;  // items a thread keeps in flight in a level pass (pass A: 4)
  static constexpr uint32_t kStageKeys = 8192;
  // A round of a gathering pass appends at most kLevelPassItems 16-byte
  // vectors (4 fp32 keys each; 16-bit sets never gather) a thread: flushing
  // above this leaves room for one more round.
  static constexpr uint32_t kStageFlushAt = kStageKeys - kLevelPassItems * 4 * kHistogramThreads;
  static_assert(kStageFlushAt > 0 && kStageFlushAt < kStageKeys, "a round must fit the stage");
};

// Up to 8 stored gradients of one item, zero-extended to 32 bits.
struct ItemValues {
  uint32_t raw[8];
  uint32_t count;
};

__device__ __forceinline__ ItemValues load_item(uint64_t base, uint32_t dtype, Range entries) {
  ItemValues item;
  item.count = static_cast<uint32_t>(entries.end - entries.begin);
  const uint32_t element_bytes = dtype_bytes(dtype);
  const uint64_t address = base + entries.begin * element_bytes;
  if (item.count == 1) {
    item.raw[0] = element_bytes == 4 ? *reinterpret_cast<const uint32_t*>(address)
                                     : *reinterpret_cast<const uint16_t*>(address);
    return item;
  }
  const uint4 vector = *reinterpret_cast<const uint4*>(address);
  const uint32_t words[4] = {vector.x, vector.y, vector.z, vector.w};
  if (element_bytes == 4) {
    for (int i = 0; i < 4; ++i) item.raw[i] = words[i];
  } else {
    for (int i = 0; i < 4; ++i) {
      item.raw[2 * i] = words[i] & 0xFFFFu;
      item.raw[2 * i + 1] = words[i] >> 16;
    }
  }
  return item;
}

__device__ __forceinline__ void store_item(uint64_t base, uint32_t dtype, Range entries, const ItemValues& item) {
  const uint32_t element_bytes = dtype_bytes(dtype);
  const uint64_t address = base + entries.begin * element_bytes;
  if (item.count == 1) {
    if (element_bytes == 4) {
      *reinterpret_cast<uint32_t*>(address) = item.raw[0];
    } else {
      *reinterpret_cast<uint16_t*>(address) = static_cast<uint16_t>(item.raw[0]);
    }
    return;
  }
  uint32_t words[4];
  for (int i = 0; i < 4; ++i) words[i] = element_bytes == 4 ? item.raw[i] : (item.raw[2 * i] | (item.raw[2 * i + 1] << 16));
  *reinterpret_cast<uint4*>(address) = make_uint4(words[0], words[1], words[2], words[3]);
}

// Adds a thread's consecutive counts of one bin with one shared atomic: on
// all-equal, all-zero or quantized gradients most of an item's entries fall
// in one bin, where separate atomics would serialize.
class BinRun {
 public:
  __device__ __forceinline__ void add(uint32_t* histogram, uint32_t bin) {
    if (bin == bin_) {
      ++count_;
      return;
    }
    flush(histogram);
    bin_ = bin;
    count_ = 1;
  }
  __device__ __forceinline__ void flush(uint32_t* histogram) {
    if (count_ != 0) atomicAdd(&histogram[bin_], count_);
    count_ = 0;
  }

 private:
  uint32_t bin_ = 0xFFFFFFFFu;
  uint32_t count_ = 0;
};

__device__ __forceinline__ void zero_shared(uint32_t* counters, uint32_t n) {
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) counters[i] = 0;
}

// Adds a block's shared histogram to the set's global one and clears it.
// Called by the whole block.
__device__ void flush_histogram(uint32_t* shared_counts, uint32_t bins, unsigned long long* global_counts) {
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < bins; i += blockDim.x) {
    const uint32_t count = shared_counts[i];
    if (count != 0) {
      atomicAdd(global_counts + i, static_cast<unsigned long long>(count));
      shared_counts[i] = 0;
    }
  }
  __syncthreads();
}

// Pass B: appends the staged keys to the set's candidate region. Whole block.
__device__ void flush_stage(const uint32_t* stage, uint32_t* stage_count, unsigned long long* stage_base,
                            SetState* state, uint32_t* region, uint64_t capacity) {
  __syncthreads();
  const uint32_t count = *stage_count;
  if (count != 0) {
    if (threadIdx.x == 0) *stage_base = atomicAdd(&state->candidates_gathered, static_cast<unsigned long long>(count));
    __syncthreads();
    const uint64_t base = *stage_base;
    // The region holds the whole boundary bin (should_gather_candidates), so
    // the bound never cuts; it is there so that no logic error writes past it.
    for (uint32_t i = threadIdx.x; i < count; i += blockDim.x) {
      if (base + i < capacity) region[base + i] = stage[i];
    }
    __syncthreads();
    if (threadIdx.x == 0) *stage_count = 0;
  }
  __syncthreads();
}

// An item as loaded: one 16-byte vector (or one scalar in .x), entries
// unpacked only where they are used, so two items in flight cost 8 registers.
struct PackedItem {
  uint4 words;
  uint32_t count;
};

template <uint32_t kDtype>
__device__ __forceinline__ PackedItem load_packed(uint64_t base, Range entries) {
  constexpr uint32_t kBytes = kDtype == kFloat32 ? 4u : 2u;
  const uint64_t address = base + entries.begin * kBytes;
  PackedItem item;
  item.count = static_cast<uint32_t>(entries.end - entries.begin);
  if (item.count == 1) {
    item.words = make_uint4(kBytes == 4 ? *reinterpret_cast<const uint32_t*>(address)
                                        : *reinterpret_cast<const uint16_t*>(address), 0u, 0u, 0u);
  } else {
    item.words = *reinterpret_cast<const uint4*>(address);
  }
  return item;
}

// Entry `e` (a constant after unrolling) of a packed item, zero-extended.
template <uint32_t kDtype>
__device__ __forceinline__ uint32_t packed_raw(const PackedItem& item, uint32_t e) {
  const uint32_t word_index = kDtype == kFloat32 ? e : e / 2;
  const uint32_t word = word_index == 0 ? item.words.x
                        : word_index == 1 ? item.words.y
                        : word_index == 2 ? item.words.z
                                          : item.words.w;
  if (kDtype == kFloat32) return word;
  return (e & 1u) ? word >> 16 : word & 0xFFFFu;
}

// One chunk's gradients in a histogram pass.
struct GradientChunk {
  ChunkWork work;
  uint64_t grad;
  uint32_t* region;  // the set's candidate keys
  uint64_t capacity;
  SetState* state;
  bool has_scale;
  float inv_loss_scale;
};

// The counting of a chunk that gathers nothing, with the items' index
// arithmetic out of the loop: the scalar head and tail entries one a thread,
// then the 16-byte vectors as a plain array (the loop is instruction-bound
// otherwise). The same visits as the general loop, in another order.
template <uint32_t kDtype, int kItems>
__device__ __forceinline__ void count_gradients_fast(const GradientChunk& g, const VectorSplit& split,
                                                     uint32_t* histogram, bool* non_finite, uint32_t* above) {
  constexpr uint32_t kBytes = kDtype == kFloat32 ? 4u : 2u;
  constexpr uint32_t kPerVector = 16u / kBytes;
  const ChunkWork& work = g.work;
  bool found = false;
  uint32_t over = 0;
  const auto visit = [&](uint32_t raw) {
    const EntryVisit v = visit_entry(work, raw, kDtype, g.has_scale, g.inv_loss_scale);
    found = found || v.non_finite;
    over += v.above ? 1u : 0u;
    return v;
  };
  const uint64_t scalars = split.head + split.tail;
  const uint64_t tail_begin = split.begin + split.head + split.vectors * kPerVector;
  for (uint64_t i = threadIdx.x; i < scalars; i += blockDim.x) {
    const uint64_t entry = i < split.head ? split.begin + i : tail_begin + (i - split.head);
    const uint64_t address = g.grad + entry * kBytes;
    const uint32_t raw = kBytes == 4 ? *reinterpret_cast<const uint32_t*>(address)
                                     : *reinterpret_cast<const uint16_t*>(address);
    const EntryVisit v = visit(raw);
    if (v.counted) atomicAdd(&histogram[v.bin], 1u);
  }
  const uint4* vectors = reinterpret_cast<const uint4*>(g.grad + (split.begin + split.head) * kBytes);
  const uint32_t count = static_cast<uint32_t>(split.vectors);  // a chunk holds < 2^32 vectors
  for (uint32_t round = 0; round < count; round += kItems * blockDim.x) {
    uint4 words[kItems];
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const uint32_t index = round + u * blockDim.x + threadIdx.x;
      words[u] = index < count ? __ldg(vectors + index) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      if (round + u * blockDim.x + threadIdx.x >= count) break;
      PackedItem item{words[u], kPerVector};
      BinRun run;
#pragma unroll
      for (uint32_t e = 0; e < kPerVector; ++e) {
        const EntryVisit v = visit(packed_raw<kDtype>(item, e));
        if (v.counted) run.add(histogram, v.bin);
      }
      run.flush(histogram);
    }
  }
  *non_finite = *non_finite || found;
  *above += over;
}


// The general loop of a gathering pass: counts and appends the in-range keys
// to the candidates (staged in shared memory). Whole block.
template <uint32_t kDtype, int kItems>
__device__ __forceinline__ void gather_gradients(const GradientChunk& g, const VectorSplit& split, uint32_t* histogram,
                                                 uint32_t* stage, uint32_t* stage_count,
                                                 unsigned long long* stage_base, bool* non_finite, uint32_t* above) {
  const ChunkWork& work = g.work;
  constexpr uint32_t kPerVector = 16u / (kDtype == kFloat32 ? 4u : 2u);
  // kItems items a thread per round, all loads in flight before any is counted.
  for (uint64_t round = 0; round < split.items(); round += kItems * blockDim.x) {
    PackedItem items[kItems];
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const uint64_t i = round + u * blockDim.x + threadIdx.x;
      items[u].count = 0;
      if (i < split.items()) items[u] = load_packed<kDtype>(g.grad, item_entries(split, i));
    }
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const PackedItem& item = items[u];
      BinRun run;
      uint32_t matched = 0;
#pragma unroll
      for (uint32_t e = 0; e < kPerVector; ++e) {
        if (e >= item.count) break;
        const EntryVisit visit = visit_entry(work, packed_raw<kDtype>(item, e), kDtype, g.has_scale, g.inv_loss_scale);
        *non_finite = *non_finite || visit.non_finite;
        *above += visit.above ? 1u : 0u;
        if (visit.counted) {
          run.add(histogram, visit.bin);
          ++matched;
        }
      }
      run.flush(histogram);
      if (matched != 0) {
        // One reservation in the stage per item, then the keys in order.
        uint32_t slot = atomicAdd(stage_count, matched);
#pragma unroll
        for (uint32_t e = 0; e < kPerVector; ++e) {
          if (e >= item.count) break;
          const EntryVisit visit = visit_key(work, magnitude_key(packed_raw<kDtype>(item, e), kDtype));
          if (visit.counted) stage[slot++] = visit.key;
        }
      }
    }
    // Every append of this round lands before any thread reads the count,
    // and all threads take the same decision before the next round appends.
    __syncthreads();
    if (__syncthreads_or(*stage_count > SelectionPolicy::kStageFlushAt)) {
      flush_stage(stage, stage_count, stage_base, g.state, g.region, g.capacity);
    }
  }
  flush_stage(stage, stage_count, stage_base, g.state, g.region, g.capacity);
}

// Counts a chunk's gradient keys into the shared histogram (keys above a
// window into `above`), applies found_inf's rule, and appends the counted keys
// to the candidates when the work gathers. Whole block.
template <uint32_t kDtype, bool kMayGather, int kItems>
__device__ __forceinline__ void count_gradients(const GradientChunk& g, uint32_t* histogram, uint32_t* stage,
                                                uint32_t* stage_count, unsigned long long* stage_base,
                                                bool* non_finite, uint32_t* above) {
  const ChunkWork& work = g.work;
  const VectorSplit split = split_for_vectors(g.grad, dtype_bytes(kDtype), work.entries.begin, work.entries.end);
  if (!kMayGather || !work.gather) {
    count_gradients_fast<kDtype, kItems>(g, split, histogram, non_finite, above);
    return;
  }
  if constexpr (kMayGather) gather_gradients<kDtype, kItems>(g, split, histogram, stage, stage_count, stage_base,
                                                             non_finite, above);
}


// The histogram passes (selection_passes.hpp): the sample pass, pass A and
// the level passes. Each persistent block takes a contiguous run of the chunk
// table; each chunk belongs to one set, whose histogram the block accumulates
// in shared memory (keys above a window in a register) and flushes when the
// set changes (so about once per block and per set).
template <HistogramPass kPass>
__global__ void __launch_bounds__(SelectionPolicy::kHistogramThreads, 2)
    histogram_pass(SelectionLaunch p, uint64_t chunk_end) {
  constexpr bool kMayGather = kPass == HistogramPass::level;
  extern __shared__ uint32_t shared[];
  uint32_t* histogram = shared;                  // kHistogramSlots counters
  uint32_t* stage = shared + kHistogramSlots;    // level passes only
  __shared__ uint32_t stage_count;
  __shared__ unsigned long long stage_base;

  zero_shared(histogram, kHistogramSlots);
  if (threadIdx.x == 0) stage_count = 0;
  __syncthreads();

  bool non_finite = false;
  const bool has_scale = p.inv_loss_scale != nullptr;
  const float inv_loss_scale = has_scale ? *p.inv_loss_scale : 1.0f;
  uint32_t pending_set = kNoPendingSet;
  uint64_t pending_entries = 0;
  uint32_t above = 0;  // this thread's keys above the pending set's window
  const auto flush = [&]() {
    if (above != 0) atomicAdd(&histogram[kAboveSlot], above);
    above = 0;
    flush_histogram(histogram, kHistogramSlots, p.histograms + p.sets[pending_set].histogram_offset);
  };

  const Range chunks = block_chunks(blockIdx.x, gridDim.x, chunk_end);
  for (uint64_t c = chunks.begin; c < chunks.end; ++c) {
    const ChunkWork work = chunk_work(p, kPass, c);
    if (work.idle()) continue;  // the same decision in every thread
    const ChunkRecord chunk = p.chunks[c];
    const SetRecord set = p.sets[chunk.set];
    if (work.source != ChunkSource::skip) {
      if (must_flush_before(pending_set, pending_entries, chunk)) {
        if (pending_set != kNoPendingSet) flush();
        pending_set = chunk.set;
        pending_entries = 0;
      }
      pending_entries += chunk.length;
    }

    if (work.source == ChunkSource::candidates) {
      const uint32_t* keys = p.candidates + set.candidate_offset;
      for (uint64_t i = work.candidates.begin + threadIdx.x; i < work.candidates.end; i += blockDim.x) {
        const EntryVisit visit = visit_candidate(work, keys[i]);
        if (visit.counted) atomicAdd(&histogram[visit.bin], 1u);
      }
      continue;
    }

    const TensorRecord tensor = p.tensors[chunk.tensor];
    // A score's keys are counted, and found_inf's rule is the gradient's:
    // then two reads of the chunk, the second for found_inf alone.
    const bool keys_apart = tensor.keys != tensor.grad;
    GradientChunk g{work, tensor.keys, p.candidates + set.candidate_offset, set.candidate_capacity,
                    p.states + chunk.set, has_scale, inv_loss_scale};
    if (keys_apart) g.work.check_non_finite = false;
    // The dtype as a template argument: the per-entry work compiles to a few
    // integer operations (the loop is instruction-bound otherwise). Pass A,
    // the one full read of every pass, keeps 4 items a thread in flight; the
    // others 2 (the stage must hold a gathering round's appends).
    constexpr int kItems = kPass == HistogramPass::level_0 ? 4 : SelectionPolicy::kLevelPassItems;
    const auto count = [&](const GradientChunk& read, uint32_t dtype) {
      switch (dtype) {
        case kFloat32: count_gradients<kFloat32, kMayGather, kItems>(read, histogram, stage, &stage_count, &stage_base, &non_finite, &above); break;
        case kFloat16: count_gradients<kFloat16, kMayGather, kItems>(read, histogram, stage, &stage_count, &stage_base, &non_finite, &above); break;
        default: count_gradients<kBFloat16, kMayGather, kItems>(read, histogram, stage, &stage_count, &stage_base, &non_finite, &above); break;
      }
    };
    if (!g.work.idle()) count(g, set.dtype);
    if (keys_apart && work.check_non_finite) {
      GradientChunk found_inf_only = g;
      found_inf_only.grad = tensor.grad;
      found_inf_only.work.source = ChunkSource::skip;
      found_inf_only.work.gather = false;
      found_inf_only.work.check_non_finite = true;
      count(found_inf_only, tensor.dtype);
    }
  }
  if (pending_set != kNoPendingSet) flush();
  if (non_finite) atomicOr(p.flags, 1u);
}

// Sums `bins` counters in `segments` equal runs, one run per thread.
template <typename Count>
__device__ void sum_segments(const Count* counts, uint32_t bins, uint32_t segments, uint64_t* segment_sums) {
  const uint32_t per_segment = bins / segments;
  if (threadIdx.x < segments) {
    uint64_t sum = 0;
    for (uint32_t i = 0; i < per_segment; ++i) sum += counts[threadIdx.x * per_segment + i];
    segment_sums[threadIdx.x] = sum;
  }
}

// One block per large set: sums the histogram in segments, then thread 0
// decides (selection_passes.hpp); the block clears the histogram after use.
__device__ void clear_histogram(unsigned long long* counts) {
  for (uint32_t i = threadIdx.x; i < kHistogramSlots; i += blockDim.x) counts[i] = 0;
}

// After the sample pass: each large set's window.
__global__ void __launch_bounds__(SelectionPolicy::kScanThreads) scan_sample(SelectionLaunch p) {
  __shared__ uint64_t segment_sums[SelectionPolicy::kScanThreads];
  const uint32_t set_index = p.large_sets[blockIdx.x];
  if (!sample_scan_begins(p, set_index)) return;  // the same answer in every thread
  const uint32_t segments = scan_segments(kLevelBins, blockDim.x);
  unsigned long long* counts = p.histograms + p.sets[set_index].histogram_offset;
  sum_segments(counts, kLevelBins, segments, segment_sums);
  __syncthreads();
  if (threadIdx.x == 0) sample_scan_finishes(p, set_index, segment_sums, segments);
  __syncthreads();
  clear_histogram(counts);
}

// After pass A and each level pass: each large set's boundary bin.
__global__ void __launch_bounds__(SelectionPolicy::kScanThreads) scan_level(SelectionLaunch p, bool after_update) {
  __shared__ uint64_t segment_sums[SelectionPolicy::kScanThreads];
  __shared__ SetState state;
  __shared__ bool scans;
  const uint32_t set_index = p.large_sets[blockIdx.x];
  if (threadIdx.x == 0) scans = scan_begins(p, set_index, after_update, &state);
  __syncthreads();
  if (!scans) return;
  const uint32_t bins = state.bins;
  const uint32_t segments = scan_segments(bins, blockDim.x);
  unsigned long long* counts = p.histograms + p.sets[set_index].histogram_offset;
  sum_segments(counts, bins, segments, segment_sums);
  __syncthreads();
  if (threadIdx.x == 0) scan_finishes(p, set_index, segment_sums, segments, &state);
  __syncthreads();
  // Cleared even when the set is done: later exchanges of a sharded call sum
  // every counter, read or not.
  clear_histogram(counts);
}

// One block per small set: every level in shared memory, re-reading the set's
// tensors (L2-resident at these sizes) once per level.
__global__ void __launch_bounds__(SelectionPolicy::kSmallSetThreads) select_small_sets(SelectionLaunch p) {
  __shared__ uint32_t histogram[kSmallSetBins];
  __shared__ uint64_t segment_sums[SelectionPolicy::kSmallSetThreads];
  __shared__ SetState state;
  __shared__ bool selects;
  const uint32_t set_index = p.small_sets[blockIdx.x];
  if (threadIdx.x == 0) selects = small_set_begins(p, set_index, &state);
  __syncthreads();
  if (!selects) return;
  const SetRecord set = p.sets[set_index];
  const DigitPlan plan = small_set_digits(set.dtype);
  for (int level = 0; level < plan.levels; ++level) {
    const Digit digit = plan.digit[level];
    const uint32_t bins = digit_bins(digit);
    zero_shared(histogram, bins);
    __syncthreads();
    const uint32_t prefix = state.prefix;
    for (uint32_t m = 0; m < set.member_count; ++m) {
      const TensorRecord tensor = p.tensors[p.members[set.first_member + m]];
      const VectorSplit split = split_for_vectors(tensor.keys, dtype_bytes(set.dtype), 0, tensor.numel);
      for (uint64_t i = threadIdx.x; i < split.items(); i += blockDim.x) {
        const ItemValues item = load_item(tensor.keys, set.dtype, item_entries(split, i));
        BinRun run;
#pragma unroll
        for (uint32_t e = 0; e < 8; ++e) {
          if (e >= item.count) break;  // constant indexes keep item.raw in registers
          const uint32_t key = magnitude_key(item.raw[e], set.dtype);
          if (matches_prefix(key, prefix, digit)) run.add(histogram, digit_of(key, digit));
        }
        run.flush(histogram);
      }
    }
    __syncthreads();
    const uint32_t segments = scan_segments(bins, blockDim.x);
    sum_segments(histogram, bins, segments, segment_sums);
    __syncthreads();
    if (threadIdx.x == 0) {
      const BinPick pick = pick_from_segments(histogram, segment_sums, segments, bins, state.rank);
      advance_small_set(state, plan, pick, histogram[pick.bin]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) p.states[set_index] = state;
}

__device__ __forceinline__ uint64_t warp_sum(uint64_t value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
  return value;
}

__device__ __forceinline__ uint32_t load_scalar(uint64_t base, uint32_t dtype, uint64_t entry) {
  return dtype == kFloat32 ? *reinterpret_cast<const uint32_t*>(base + entry * 4u)
                           : *reinterpret_cast<const uint16_t*>(base + entry * 2u);
}

// ORs a warp's item bits into the bitmap (cleared by the call's memset):
// lanes whose bits share a word combine them first, then one atomicOr a
// word. Called by all 32 lanes together; an inactive lane adds nothing.
__device__ __forceinline__ void or_mask_bits(uint32_t* words, uint64_t first, uint32_t bits, bool active) {
  const BitsPlacement place = place_mask_bits(first, bits);
  const uint32_t lane = threadIdx.x & 31u;
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    const uint64_t word = active ? place.word + part : ~0ull;
    const uint32_t value = active ? (part == 0 ? place.low : place.high) : 0u;
    const uint32_t peers = __match_any_sync(0xFFFFFFFFu, word);
    const uint32_t combined = __reduce_or_sync(peers, value);
    if (combined != 0u && lane == static_cast<uint32_t>(__ffs(peers) - 1)) atomicOr(words + word, combined);
  }
}

// The mask (gmtkMaskGradients: +0 over every masked entry, unless a gradient
// is not finite), the per-tensor kept counts (of multi-tensor sets, or of
// every tensor under a given input) and the bitmap out. Keys come from the
// gradient's items, a score (entry by entry) or a given bitmap.
__global__ void __launch_bounds__(SelectionPolicy::kApplyThreads) apply_keep_rule(SelectionLaunch p) {
  const bool found_non_finite = *p.flags != 0u;
  for (uint64_t c = blockIdx.x; c < p.chunk_count; c += gridDim.x) {
    const ApplyWork work = apply_work(p, c, found_non_finite);
    if (work.idle()) continue;  // the same decision in every thread
    const ChunkRecord chunk = p.chunks[c];
    const TensorRecord tensor = p.tensors[chunk.tensor];
    const bool keys_apart = tensor.keys != tensor.grad;
    const bool loads_grad = work.zero_masked || (work.reads_keys() && !keys_apart);
    const VectorSplit split = split_for_vectors(tensor.grad, dtype_bytes(tensor.dtype), chunk.begin,
                                                chunk.begin + chunk.length);
    uint32_t* words = p.mask_bits + tensor.mask_word_offset;
    uint64_t kept = 0;
    // A trip count the same for every lane of a warp: the bitmap's warp-wide OR needs them all.
    const uint64_t items = split.items();
    const uint64_t rounds = (items + blockDim.x - 1) / blockDim.x * blockDim.x;
    for (uint64_t i = threadIdx.x; i < rounds; i += blockDim.x) {
      const bool active = i < items;
      Range entries{0, 0};
      uint32_t bits = 0;
      if (active) {
        entries = item_entries(split, i);
        ItemValues item{};
        item.count = static_cast<uint32_t>(entries.end - entries.begin);
        if (loads_grad) item = load_item(tensor.grad, tensor.dtype, entries);
        uint32_t keys[8] = {};
#pragma unroll
        for (uint32_t e = 0; e < 8; ++e) {
          if (e >= item.count || !work.reads_keys()) break;  // constant indexes keep item.raw in registers
          keys[e] = keys_apart ? magnitude_key(load_scalar(tensor.keys, tensor.key_dtype, entries.begin + e),
                                               tensor.key_dtype)
                               : magnitude_key(item.raw[e], tensor.dtype);
        }
        bits = item_kept_bits(work.test, entries.begin, item.count, keys);
        kept += __popc(bits);
        bool changed = false;
#pragma unroll
        for (uint32_t e = 0; e < 8; ++e) {
          if (e >= item.count || !work.zero_masked) break;
          if ((bits >> e) & 1u) continue;
          item.raw[e] = 0u;  // +0 in every dtype
          changed = true;
        }
        if (changed) store_item(tensor.grad, tensor.dtype, entries, item);
      }
      if (work.write_bits) or_mask_bits(words, entries.begin, bits, active);
    }
    if (work.count_kept) {
      kept = warp_sum(kept);
      if ((threadIdx.x & 31u) == 0 && kept != 0) {
        atomicAdd(p.tensor_kept + chunk.tensor, static_cast<unsigned long long>(kept));
      }
    }
  }
}

// Thresholds, kept counts and found_inf.
__global__ void __launch_bounds__(SelectionPolicy::kOutputThreads) write_outputs(SelectionLaunch p) {
  for (uint64_t t = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; t < p.tensor_count;
       t += uint64_t{gridDim.x} * blockDim.x) {
    write_tensor_outputs(p, t);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) write_call_outputs(p);
}

template <typename T>
uint32_t grid_for(T items, uint32_t cap) {
  return static_cast<uint32_t>(items < T{1} ? 1 : (items < T{cap} ? items : T{cap}));
}

}  // namespace

constexpr size_t kCountingShared = kHistogramSlots * sizeof(uint32_t);  // 8 KB
constexpr size_t kGatheringShared = (kHistogramSlots + SelectionPolicy::kStageKeys) * sizeof(uint32_t);  // 40 KB

cudaError_t configure_selection_kernels(int device, SelectionOccupancy* occupancy) {
  cudaError_t error = cudaDeviceGetAttribute(&occupancy->multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) return error;
  // Persistent grids fill the device exactly once.
  const struct {
    int* blocks;
    const void* kernel;
    int threads;
    size_t shared;
  } kernels[] = {
      {&occupancy->pass_a, reinterpret_cast<const void*>(histogram_pass<HistogramPass::level_0>),
       SelectionPolicy::kHistogramThreads, kCountingShared},
      {&occupancy->sample_pass, reinterpret_cast<const void*>(histogram_pass<HistogramPass::sample>),
       SelectionPolicy::kHistogramThreads, kCountingShared},
      {&occupancy->level_pass, reinterpret_cast<const void*>(histogram_pass<HistogramPass::level>),
       SelectionPolicy::kHistogramThreads, kGatheringShared},
      {&occupancy->apply, reinterpret_cast<const void*>(apply_keep_rule), SelectionPolicy::kApplyThreads, 0},
  };
  for (const auto& k : kernels) {
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(k.blocks, k.kernel, k.threads, k.shared);
    if (error != cudaSuccess) return error;
    *k.blocks = (*k.blocks < 1 ? 1 : *k.blocks) * occupancy->multiprocessors;
  }
  return cudaSuccess;
}

cudaError_t launch_selection_passes(const SelectionLaunch& launch, const SelectionSchedule& schedule, void* zeroed,
                                    size_t zeroed_bytes, const SelectionOccupancy& occupancy, cudaStream_t stream,
                                    const ExchangeHook* exchange) {
  cudaError_t error = cudaMemsetAsync(zeroed, 0, zeroed_bytes, stream);
  if (error != cudaSuccess) return error;
  constexpr int kThreads = SelectionPolicy::kHistogramThreads;
  const auto resident = [](int blocks) { return static_cast<uint32_t>(blocks); };
  // A sharded call sums the pass's counters over the ranks before they are read.
  const auto exchanged = [&](ExchangePoint point) {
    return schedule.exchange && exchange != nullptr ? exchange->sum(exchange->context, point, stream) : cudaSuccess;
  };

  // Each launch is checked before the next is queued: after a failed one,
  // nothing that writes the caller's buffers (the mask) may follow.
  if (schedule.sample) {
    histogram_pass<HistogramPass::sample><<<grid_for(launch.large_chunks, resident(occupancy.sample_pass)), kThreads,
                                            kCountingShared, stream>>>(launch, launch.large_chunks);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
    if ((error = exchanged(ExchangePoint::sample)) != cudaSuccess) return error;
    scan_sample<<<launch.large_set_count, SelectionPolicy::kScanThreads, 0, stream>>>(launch);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
  }
  if (schedule.pass_a) {
    histogram_pass<HistogramPass::level_0><<<grid_for(schedule.pass_a_chunks, resident(occupancy.pass_a)), kThreads,
                                             kCountingShared, stream>>>(launch, schedule.pass_a_chunks);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
    if ((error = exchanged(ExchangePoint::level_0)) != cudaSuccess) return error;
  }
  if (schedule.large_scan) {
    scan_level<<<launch.large_set_count, SelectionPolicy::kScanThreads, 0, stream>>>(launch, false);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
  }
  for (int level = 0; level < schedule.level_passes; ++level) {
    histogram_pass<HistogramPass::level><<<grid_for(launch.large_chunks, resident(occupancy.level_pass)), kThreads,
                                           kGatheringShared, stream>>>(launch, launch.large_chunks);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
    if ((error = exchanged(ExchangePoint::level)) != cudaSuccess) return error;
    scan_level<<<launch.large_set_count, SelectionPolicy::kScanThreads, 0, stream>>>(launch, false);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
  }
  if (schedule.small_sets) {
    select_small_sets<<<launch.small_set_count, SelectionPolicy::kSmallSetThreads, 0, stream>>>(launch);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
  }
  if (schedule.apply) {
    // The bitmap out: cleared here, not earlier, so that a failed selection
    // launch leaves it as it was; the apply pass ORs the kept bits in (bits
    // past a tensor's entries stay 0).
    if (schedule.write_mask_bits) {
      error = cudaMemsetAsync(launch.mask_bits, 0, launch.mask_words * sizeof(uint32_t), stream);
      if (error != cudaSuccess) return error;
    }
    const uint32_t blocks = grid_for(launch.chunk_count, resident(occupancy.apply));
    apply_keep_rule<<<blocks, SelectionPolicy::kApplyThreads, 0, stream>>>(launch);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
    if ((error = exchanged(ExchangePoint::apply)) != cudaSuccess) return error;
  }
  return cudaGetLastError();
}

cudaError_t launch_deferred_level(const SelectionLaunch& launch, const SelectionOccupancy& occupancy,
                                  cudaStream_t stream, const ExchangeHook* exchange) {
  histogram_pass<HistogramPass::deferred><<<grid_for(launch.large_chunks, static_cast<uint32_t>(occupancy.level_pass)),
                                            SelectionPolicy::kHistogramThreads, kCountingShared, stream>>>(
      launch, launch.large_chunks);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  if (exchange != nullptr && (error = exchange->sum(exchange->context, ExchangePoint::deferred, stream)) != cudaSuccess) {
    return error;
  }
  scan_level<<<launch.large_set_count, SelectionPolicy::kScanThreads, 0, stream>>>(launch, true);
  return cudaGetLastError();
}

cudaError_t launch_selection_outputs(const SelectionLaunch& launch, const SelectionOccupancy& occupancy,
                                     cudaStream_t stream) {
  const uint32_t output_blocks =
      grid_for((uint64_t{launch.tensor_count} + SelectionPolicy::kOutputThreads - 1) / SelectionPolicy::kOutputThreads,
               static_cast<uint32_t>(occupancy.multiprocessors) * 4);
  write_outputs<<<output_blocks, SelectionPolicy::kOutputThreads, 0, stream>>>(launch);
  return cudaGetLastError();
}

}  // namespace gmtk::kernels
