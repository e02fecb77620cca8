// The decisions of the CUDA selection engine, as __host__ __device__ code:
// magnitude keys, the digit schedule, the scan that picks a boundary bin and
// the rank inside it, the per-set state machine, candidate handling, the
// found_inf rule, the 16-byte vector split of a chunk, and the values written
// out. The kernels (selection_kernels.cu) add only the parallel loops,
// shared memory and atomics around these; tests/host_schedule/ runs the same
// functions through the same pass schedule on the host, where CI can check
// them without a GPU. docs/design.md explains the schedule.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GMTK_HD __host__ __device__ __forceinline__
#else
#define GMTK_HD inline
#endif

namespace gmtk::kernels {

// gmtkDtype_t's values, without the public header's enum in device code.
enum GradDtype : uint32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

GMTK_HD uint32_t dtype_bytes(uint32_t dtype) { return dtype == kFloat32 ? 4u : 2u; }
GMTK_HD uint32_t key_bits(uint32_t dtype) { return dtype == kFloat32 ? 31u : 15u; }

// ---- Bits and values --------------------------------------------------------

GMTK_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

GMTK_HD uint32_t bits_from_float(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

GMTK_HD float bfloat16_bits_to_float(uint32_t bits) { return float_from_bits((bits & 0xFFFFu) << 16); }

// Exact: every fp16 value is an fp32 value. Subnormals are normalised by
// shifting, so no library call is involved on either side.
GMTK_HD float float16_bits_to_float(uint32_t bits) {
  const uint32_t sign = (bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0x1Fu) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return float_from_bits(sign);
  uint32_t biased = 113;  // 2^-14, the exponent of fp16's smallest normal, rebiased for fp32
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --biased;
  }
  return float_from_bits(sign | (biased << 23) | ((mantissa & 0x3FFu) << 13));
}

// A stored gradient (its raw bits, zero-extended) as fp32.
GMTK_HD float gradient_to_float(uint32_t raw, uint32_t dtype) {
  if (dtype == kFloat32) return float_from_bits(raw);
  return dtype == kFloat16 ? float16_bits_to_float(raw) : bfloat16_bits_to_float(raw);
}

// The selection key: the stored bits with the sign cleared. Unsigned order of
// keys is the order of |g|, -0 == +0, and NaNs sort above +inf by payload
// (docs/semantics.md).
GMTK_HD uint32_t magnitude_key(uint32_t raw, uint32_t dtype) {
  return dtype == kFloat32 ? (raw & 0x7FFFFFFFu) : (raw & 0x7FFFu);
}

// found_inf's rule: the gradient after unscaling (stored value times the
// inverse loss scale, one rounded fp32 product) is inf or NaN.
GMTK_HD bool non_finite_after_unscaling(uint32_t raw, uint32_t dtype, bool has_scale, float inv_loss_scale) {
  float value = gradient_to_float(raw, dtype);
  if (has_scale) {
#if defined(__CUDA_ARCH__)
    value = __fmul_rn(value, inv_loss_scale);
#else
    value = value * inv_loss_scale;
#endif
  }
  return (bits_from_float(value) & 0x7F800000u) == 0x7F800000u;
}

// ---- Kept target -------------------------------------------------------------

// k = n - floor(r * n), the product in double precision (docs/semantics.md).
GMTK_HD uint64_t kept_target(double mask_ratio, uint64_t n) {
  const double product = mask_ratio * static_cast<double>(n);
  const uint64_t masked = product >= static_cast<double>(n) ? n : static_cast<uint64_t>(floor(product));
  return n - (masked < n ? masked : n);
}

// What a set needs this call: nothing (keep all, which is also an empty set's
// answer), nothing but the answer "keep none", or a selection of its k-th key.
enum class SetGoal : uint32_t { keep_all, keep_none, select };

struct SetTarget {
  SetGoal goal;
  uint64_t kept;  // k
};

GMTK_HD SetTarget set_target(double mask_ratio, uint64_t n) {
  const uint64_t k = kept_target(mask_ratio, n);
  if (k == n) return {SetGoal::keep_all, k};
  if (k == 0) return {SetGoal::keep_none, 0};
  return {SetGoal::select, k};
}

// ---- Digits --------------------------------------------------------------------

// One radix digit of the key: `bits` bits starting at bit `shift`.
struct Digit {
  uint32_t shift;
  uint32_t bits;
};

constexpr int kMaxLevels = 3;
constexpr uint32_t kLargeFloat32Bins = 2048;   // every fp32 digit fits 11 bits
constexpr uint32_t kLargeHalfBins = 32768;     // the whole 15-bit key of fp16/bf16
constexpr uint32_t kSmallSetBins = 2048;       // the one-block path's shared histogram

// The digits a set's selection resolves, most significant first.
//  - fp32 (any set): 11 + 11 + 9 bits. Large sets run level 0 in pass A,
//    level 1 in pass B (which also gathers the boundary bin's keys as
//    candidates) and level 2 in pass C (over those candidates when they fit).
//  - fp16/bf16, large set: the whole 15-bit key in pass A, exact in one read.
//  - fp16/bf16, small set (one block, shared memory): 11 + 4 bits.
struct DigitPlan {
  int levels;
  Digit digit[kMaxLevels];
};

GMTK_HD DigitPlan digit_plan(uint32_t dtype, bool large_set) {
  if (dtype == kFloat32) return {3, {{20, 11}, {9, 11}, {0, 9}}};
  if (large_set) return {1, {{0, 15}, {0, 0}, {0, 0}}};
  return {2, {{4, 11}, {0, 4}, {0, 0}}};
}

GMTK_HD uint32_t digit_bins(Digit digit) { return 1u << digit.bits; }

GMTK_HD uint32_t digit_of(uint32_t key, Digit digit) { return (key >> digit.shift) & ((1u << digit.bits) - 1u); }

// Whether `key` is still in the running at a level: its bits above the level's
// digit equal the prefix decided so far. At level 0 every key is.
GMTK_HD bool matches_prefix(uint32_t key, uint32_t prefix, Digit digit) {
  const uint32_t high_shift = digit.shift + digit.bits;  // <= 31
  return (key >> high_shift) == (prefix >> high_shift);
}

// ---- The scan: boundary bin and rank -------------------------------------------

struct BinPick {
  uint32_t bin;          // the bin holding the wanted key
  uint64_t rank_in_bin;  // its 1-based rank from the top among the bin's keys
  uint64_t above;        // keys in the bins above
};

// Walks counts[0, n) from the top until the bin holding the `rank`-th largest
// key (1-based). The counts must add up to at least `rank`.
template <typename Count>
GMTK_HD BinPick pick_from_top(const Count* counts, uint32_t n, uint64_t rank) {
  uint64_t above = 0;
  uint32_t bin = n - 1;
  while (bin > 0 && static_cast<uint64_t>(counts[bin]) < rank) {
    rank -= counts[bin];
    above += counts[bin];
    --bin;
  }
  return {bin, rank, above};
}

// The same pick in two steps, as a block does it: first over the sums of
// `segments` equal runs of bins (summed in parallel on the device), then
// inside the chosen run.
template <typename Count>
GMTK_HD BinPick pick_from_segments(const Count* counts, const uint64_t* segment_sums, uint32_t segments,
                                   uint32_t bins, uint64_t rank) {
  const uint32_t per_segment = bins / segments;
  const BinPick segment = pick_from_top(segment_sums, segments, rank);
  const BinPick inside = pick_from_top(counts + static_cast<uint64_t>(segment.bin) * per_segment, per_segment,
                                       segment.rank_in_bin);
  return {segment.bin * per_segment + inside.bin, inside.rank_in_bin, segment.above + inside.above};
}

// How many runs a block splits `bins` into: one per thread, at most one per bin.
GMTK_HD uint32_t scan_segments(uint32_t bins, uint32_t threads) { return bins < threads ? bins : threads; }

// ---- Per-set state (workspace, zeroed at the start of every call) ---------------

struct SetState {
  uint64_t rank;             // 1-based rank, from the top, of the k-th key among the keys matching `prefix`
  uint64_t kept_above;       // keys above the prefix's range: all kept
  uint64_t bucket_count;     // keys matching the prefix after the last scan
  unsigned long long candidates_gathered;  // pass B's cursor into the set's candidate region
  uint32_t prefix;           // key bits decided so far
  uint32_t level;            // digits decided so far
  uint32_t gather;           // pass B appends the boundary bin's keys to the candidate region
  uint32_t done;             // `prefix` is the k-th largest key: the threshold's key
  uint32_t padding[4];
};
static_assert(sizeof(SetState) == 64, "SetState is one 64-byte record");

GMTK_HD void begin_selection(SetState& state, uint64_t k) {
  state.rank = k;
  state.kept_above = 0;
  state.bucket_count = 0;
  state.candidates_gathered = 0;
  state.prefix = 0;
  state.level = 0;
  state.gather = 0;
  state.done = 0;
}

// Records a level's pick: the digit joins the prefix; at the last level the
// prefix is the threshold key.
GMTK_HD void advance_selection(SetState& state, const DigitPlan& plan, BinPick pick, uint64_t bin_count) {
  const Digit digit = plan.digit[state.level];
  state.prefix |= pick.bin << digit.shift;
  state.rank = pick.rank_in_bin;
  state.kept_above += pick.above;
  state.bucket_count = bin_count;
  state.level += 1;
  state.done = state.level == static_cast<uint32_t>(plan.levels) ? 1u : 0u;
}

// After level 0 of a large fp32 set: gather the boundary bin's keys in pass B
// only if they all fit the set's region; otherwise pass C re-reads the
// gradients (slower, same answer).
GMTK_HD bool should_gather_candidates(uint64_t bucket_count, uint64_t capacity) { return bucket_count <= capacity; }

// Where a pass's chunk takes its keys from, if anywhere.
enum class ChunkSource : uint32_t { skip, gradients, candidates };

// Refinement passes (levels 1 and 2) run over large fp32 sets still selecting.
// Level 2 reads the gathered candidates when pass B kept them all.
GMTK_HD ChunkSource refinement_source(const SetState& state, int level) {
  if (state.done || static_cast<int>(state.level) != level) return ChunkSource::skip;
  if (level == 2 && state.gather) return ChunkSource::candidates;
  return ChunkSource::gradients;
}

// The share of a set's candidates that the `ordinal`-th of its `chunks` chunks
// histograms in pass C: [begin, end).
struct Range {
  uint64_t begin;
  uint64_t end;
};

GMTK_HD Range candidate_slice(uint64_t count, uint32_t ordinal, uint32_t chunks) {
  return {count * ordinal / chunks, count * (ordinal + 1ull) / chunks};
}

// ---- The answer -----------------------------------------------------------------

// Entries with key >= min_kept_key are kept.
constexpr uint32_t kKeepAllKey = 0u;
constexpr uint32_t kKeepNoneKey = 0xFFFFFFFFu;  // above every 31-bit key

GMTK_HD uint32_t min_kept_key(const SetTarget& target, const SetState& state) {
  if (target.goal == SetGoal::keep_all) return kKeepAllKey;
  if (target.goal == SetGoal::keep_none) return kKeepNoneKey;
  return state.prefix;
}

GMTK_HD bool is_kept(uint32_t key, uint32_t min_key) { return key >= min_key; }

// T as the caller reads it: 0 when all are kept, +inf when none is.
GMTK_HD float threshold_value(const SetTarget& target, const SetState& state, uint32_t dtype) {
  if (target.goal == SetGoal::keep_all) return 0.0f;
  if (target.goal == SetGoal::keep_none) return float_from_bits(0x7F800000u);
  return gradient_to_float(state.prefix, dtype);
}

// A set's kept count after its last level: keys above T plus the keys equal to T.
GMTK_HD uint64_t set_kept_count(const SetState& state) { return state.kept_above + state.bucket_count; }

// ---- Reading a range of a tensor in 16-byte vectors ------------------------------

// Entries [begin, end) of a tensor at `base` (aligned to its element size) as
// items: scalar head entries up to the first 16-byte boundary, whole 16-byte
// vectors, then scalar tail entries. Item i of a block's loop is one of them.
struct VectorSplit {
  uint64_t begin;
  uint64_t head;     // scalar entries before the first vector
  uint64_t vectors;  // 16-byte vectors
  uint64_t tail;     // scalar entries after the last vector
  uint32_t per_vector;

  GMTK_HD uint64_t items() const { return head + vectors + tail; }
};

GMTK_HD VectorSplit split_for_vectors(uintptr_t base, uint32_t element_bytes, uint64_t begin, uint64_t end) {
  const uint32_t per_vector = 16u / element_bytes;
  const uintptr_t first_address = base + begin * element_bytes;
  const uint64_t to_boundary = ((16u - first_address % 16u) % 16u) / element_bytes;
  const uint64_t count = end - begin;
  const uint64_t head = to_boundary < count ? to_boundary : count;
  const uint64_t vectors = (count - head) / per_vector;
  return {begin, head, vectors, count - head - vectors * per_vector, per_vector};
}

// The first entry and entry count of item `i`.
GMTK_HD Range item_entries(const VectorSplit& split, uint64_t i) {
  if (i < split.head) return {split.begin + i, split.begin + i + 1};
  if (i < split.head + split.vectors) {
    const uint64_t first = split.begin + split.head + (i - split.head) * split.per_vector;
    return {first, first + split.per_vector};
  }
  const uint64_t first = split.begin + split.head + split.vectors * split.per_vector + (i - split.head - split.vectors);
  return {first, first + 1};
}

}  // namespace gmtk::kernels
