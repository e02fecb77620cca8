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
// (Not __half2float: it returns a canonical NaN, and thresholds report NaN
// keys with their payload, as the CPU reference does.)
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

// ---- fp32 to 16 bits: nearest-even, as the CPU reference rounds ----------------
// (parameter stores, and given thresholds taken to a 16-bit dtype)

GMTK_HD uint32_t float_to_bfloat16_bits(float value) {
  const uint32_t bits = bits_from_float(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return ((bits >> 16) | 0x0040u) & 0xFFFFu;  // quiet NaN
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return ((bits + rounding_bias) >> 16) & 0xFFFFu;
}

GMTK_HD uint32_t float_to_float16_bits(float value) {
  const uint32_t bits = bits_from_float(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu);  // quiet NaN
  if (magnitude >= 0x477FF000u) return sign | 0x7C00u;  // rounds to infinity
  if (magnitude >= 0x38800000u) {                       // a normal half: rebias 127 -> 15, round off 13 bits
    const uint32_t rebiased = magnitude - (112u << 23);
    return sign | ((rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13);
  }
  // A subnormal half (or zero): round(|value| * 2^24) to nearest-even. A
  // float subnormal is far below half of 2^-24.
  const uint32_t exponent = magnitude >> 23;
  if (exponent == 0) return sign;
  const uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - exponent;  // >= 14: |value| * 2^24 = significand * 2^(exponent - 126)
  if (shift >= 32u) return sign;
  uint32_t quotient = significand >> shift;
  const uint32_t remainder = significand & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (remainder > half || (remainder == half && (quotient & 1u))) ++quotient;
  return sign | quotient;  // 1024 is 2^-14, the smallest normal: still the right encoding
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
  if (!has_scale) {  // the stored exponent says it: widening to fp32 keeps inf and NaN, and only them
    if (dtype == kFloat32) return (raw & 0x7F800000u) == 0x7F800000u;
    return dtype == kFloat16 ? (raw & 0x7C00u) == 0x7C00u : (raw & 0x7F80u) == 0x7F80u;
  }
#if defined(__CUDA_ARCH__)
  const float value = __fmul_rn(gradient_to_float(raw, dtype), inv_loss_scale);
#else
  const float value = gradient_to_float(raw, dtype) * inv_loss_scale;
#endif
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

// ---- Digits (small sets) ---------------------------------------------------------

// One radix digit of the key: `bits` bits starting at bit `shift`.
struct Digit {
  uint32_t shift;
  uint32_t bits;
};

constexpr int kMaxLevels = 3;
constexpr uint32_t kSmallSetBins = 2048;  // the one-block path's shared histogram

// The digits a small set's selection resolves in shared memory, most
// significant first: fp32 11 + 11 + 9 bits, fp16/bf16 11 + 4.
struct DigitPlan {
  int levels;
  Digit digit[kMaxLevels];
};

GMTK_HD DigitPlan small_set_digits(uint32_t dtype) {
  if (dtype == kFloat32) return {3, {{20, 11}, {9, 11}, {0, 9}}};
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

// ---- Levels of a large set: bins over a range of keys ---------------------------
//
// Every level of a large set counts the keys of a range [base, base + bins <<
// shift) in at most 2048 bins of 2^shift keys. The first range comes from a
// sample (the window): pass A counts only the keys inside it in shared
// memory, and the keys above it in a register, so that most entries cost no
// atomic. When the k-th key lies outside the window (the sample misled), the
// set starts again over the whole key space (the fallback, slower, same answer).

constexpr uint32_t kLevelBins = 2048;             // 8 KB of shared counters
constexpr uint32_t kAboveSlot = kLevelBins;       // the histogram slot counting keys above the window
constexpr uint32_t kHistogramSlots = kLevelBins + 1;
constexpr uint32_t kBelowRange = 0xFFFFFFFFu;
constexpr uint32_t kAboveRange = 0xFFFFFFFEu;

struct LevelRange {
  uint32_t base;
  uint32_t shift;
  uint32_t bins;  // 0: the range is one key, the answer
};

// The top 11 bits of the key: the sample's bins, and the fallback's first level.
GMTK_HD uint32_t coarse_shift(uint32_t dtype) { return key_bits(dtype) - 11u; }
GMTK_HD LevelRange full_range(uint32_t dtype) { return {0u, coarse_shift(dtype), kLevelBins}; }

GMTK_HD uint32_t range_bin(uint32_t key, LevelRange range) {
  if (key < range.base) return kBelowRange;
  const uint32_t bin = (key - range.base) >> range.shift;
  return bin < range.bins ? bin : kAboveRange;
}

GMTK_HD uint32_t log2_of_power(uint32_t power_of_two) {
  uint32_t log = 0;
  while ((1u << log) < power_of_two) ++log;
  return log;
}

// The range of bin `bin` of `range`, cut into the next level's bins
// (at most 11 bits a level); bins 0 when it is a single key.
GMTK_HD LevelRange narrowed_range(LevelRange range, uint32_t bin) {
  const uint32_t base = range.base + (bin << range.shift);
  if (range.shift == 0) return {base, 0u, 0u};
  const uint32_t shift = range.shift > 11u ? range.shift - 11u : 0u;
  return {base, shift, 1u << (range.shift - shift)};
}

// Levels still needed to resolve a bin of 2^width_log2 keys.
GMTK_HD uint32_t levels_to_resolve(uint32_t width_log2) { return (width_log2 + 10u) / 11u; }

// The sample ranks that bound the k-th largest key with high probability:
// the sample's own k (scaled) -/+ 4 binomial standard deviations, plus 1.5%
// of the smaller side for entries that come in correlated runs.
struct SampleRanks {
  uint64_t high;  // 1-based rank from the top: the window's upper end
  uint64_t low;
};

GMTK_HD SampleRanks window_ranks(uint64_t k, uint64_t n, uint64_t m) {
  const double scaled = ceil(static_cast<double>(k) * static_cast<double>(m) / static_cast<double>(n));
  const double rank = scaled < 1.0 ? 1.0 : (scaled > static_cast<double>(m) ? static_cast<double>(m) : scaled);
  const double smaller_side = rank < static_cast<double>(m) - rank ? rank : static_cast<double>(m) - rank;
  const double spread = 4.0 * sqrt(rank * (static_cast<double>(m) - rank) / static_cast<double>(m)) +
                        smaller_side / 64.0 + 1.0;
  const double high = rank - spread < 1.0 ? 1.0 : rank - spread;
  const double low = rank + spread > static_cast<double>(m) ? static_cast<double>(m) : rank + spread;
  return {static_cast<uint64_t>(high), static_cast<uint64_t>(ceil(low))};
}

// The window over coarse bins [low_bin, high_bin], widened upwards to a power
// of two of coarse bins: at most two levels in all (22 bits), else no window
// (the whole key space, 3 levels for fp32).
struct Window {
  bool used;
  LevelRange range;
};

GMTK_HD Window choose_window(uint32_t dtype, uint32_t low_bin, uint32_t high_bin) {
  const uint32_t coarse = coarse_shift(dtype);
  uint32_t width = 1;
  while (width < high_bin - low_bin + 1u) width *= 2u;
  const uint32_t width_log2 = coarse + log2_of_power(width);
  if (width_log2 > 22u) return {false, full_range(dtype)};
  // Bins past the top of the key space (a window of the highest keys) stay empty.
  const uint32_t shift = width_log2 > 11u ? width_log2 - 11u : 0u;
  return {true, {low_bin << coarse, shift, 1u << (width_log2 - shift)}};
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

// ---- Per-set state of a large set (workspace, zeroed at the start of every call) --

struct SetState {
  uint64_t rank;             // 1-based rank, from the top, of the k-th key among the keys of the current range
  uint64_t kept_above;       // keys above the current range: all kept
  uint64_t bucket_count;     // keys in the current range after the last scan
  unsigned long long candidates_gathered;  // a gathering pass's cursor into the set's candidate region
  uint32_t prefix;           // the current range's first key; the threshold's key once done
  uint32_t shift;            // the current range's bins: 2^shift keys each ...
  uint32_t bins;             // ... this many (0 once done)
  uint32_t level;            // levels decided since the (re)start
  uint32_t windowed;         // level 0 counts a window (keys above it in kAboveSlot)
  uint32_t gather;           // the next pass over the gradients appends the range's keys as candidates
  uint32_t from_candidates;  // the next pass reads the candidates instead of the gradients
  uint32_t done;             // `prefix` is the k-th largest key: the threshold's key
  uint32_t defer;            // gmtkStep: the update defers the range's entries, the last level runs over them after it
  uint32_t padding[3];
};
static_assert(sizeof(SetState) == 80, "SetState is one 80-byte record");

GMTK_HD LevelRange current_range(const SetState& state) { return {state.prefix, state.shift, state.bins}; }

GMTK_HD void begin_selection(SetState& state, uint64_t k, const Window& window) {
  state.rank = k;
  state.kept_above = 0;
  state.bucket_count = 0;
  state.candidates_gathered = 0;
  state.prefix = window.range.base;
  state.shift = window.range.shift;
  state.bins = window.range.bins;
  state.level = 0;
  state.windowed = window.used ? 1u : 0u;
  state.gather = 0;
  state.from_candidates = 0;
  state.done = 0;
  state.defer = 0;
}

// Records a level's pick: the range narrows to the picked bin; once it is a
// single key, that key is the threshold's. A gathering pass's candidates
// serve every later level; a pass gathers when the picked bin fits the
// candidate region and at least two levels remain (one to gather, one to
// read). In a step (`may_defer`), a bin that one level resolves and that fits
// the deferral region is left to the update: it decides every entry outside
// the bin at once and defers the bin's entries (so the step reads the
// gradient only once more), whose last level runs after it.
GMTK_HD void advance_selection(SetState& state, BinPick pick, uint64_t bin_count, uint64_t candidate_capacity,
                               bool may_defer, uint64_t deferral_capacity) {
  const uint32_t width_log2 = state.shift;  // of the picked bin
  const LevelRange next = narrowed_range(current_range(state), pick.bin);
  state.prefix = next.base;
  state.shift = next.shift;
  state.bins = next.bins;
  state.rank = pick.rank_in_bin;
  state.kept_above += pick.above;
  state.bucket_count = bin_count;
  state.level += 1;
  state.done = next.bins == 0 ? 1u : 0u;
  if (state.defer) {  // the deferred entries' level: now exact
    return;
  }
  if (may_defer && !state.done && !state.gather && !state.from_candidates && levels_to_resolve(width_log2) == 1u &&
      bin_count <= deferral_capacity) {
    state.defer = 1;
    return;
  }
  if (state.gather) {
    state.gather = 0;
    state.from_candidates = 1;
  } else if (!state.from_candidates && !state.done && levels_to_resolve(width_log2) >= 2u &&
             bin_count <= candidate_capacity) {
    state.gather = 1;
  }
}

// The window's level found the k-th key outside the window: start again over
// the whole key space.
GMTK_HD void restart_without_window(SetState& state, uint64_t k, uint32_t dtype) {
  begin_selection(state, k, Window{false, full_range(dtype)});
}

// Where a pass's chunk takes its keys from, if anywhere.
enum class ChunkSource : uint32_t { skip, gradients, candidates };

// The share of a set's candidates that the `ordinal`-th of its `chunks` chunks
// histograms in a pass over candidates: [begin, end).
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

// ---- Mask schedules (SPEC section 8): given thresholds and bitmaps ---------------

// The key of a given threshold T for keys of `dtype`: T rounded up to the
// dtype (the smallest key whose value is >= T), so that a threshold gmtk
// reported keeps exactly its entries again; T <= 0 keeps all; a NaN T is
// that NaN in the dtype (docs/semantics.md, "Mask schedules").
GMTK_HD uint32_t threshold_key(float threshold, uint32_t dtype) {
  const uint32_t bits = bits_from_float(threshold);
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  if (!is_nan && !(threshold > 0.0f)) return kKeepAllKey;
  if (dtype == kFloat32) return bits & 0x7FFFFFFFu;
  const uint32_t nearest = dtype == kFloat16 ? float_to_float16_bits(threshold) : float_to_bfloat16_bits(threshold);
  const uint32_t key = magnitude_key(nearest, dtype);
  return !is_nan && gradient_to_float(nearest, dtype) < threshold ? key + 1u : key;
}

// How a call decides a tensor's entries: by the key against min_kept_key
// (selected, or a given threshold's), or by a given bitmap.
struct KeepTest {
  uint32_t min_kept_key;
  const uint32_t* bits;  // the tensor's first word of a given bitmap; null: by the key
};

// Bits [first, first + count) of a tensor's words, count <= 8, as bits 0..count-1.
GMTK_HD uint32_t mask_bits_of(const uint32_t* words, uint64_t first, uint32_t count) {
  const uint64_t word = first / 32u;
  const uint32_t shift = static_cast<uint32_t>(first % 32u);
  uint32_t bits = words[word] >> shift;
  if (shift + count > 32u) bits |= words[word + 1] << (32u - shift);
  return bits & ((1u << count) - 1u);
}

// The kept bits of an item (bit e: entry first + e, count <= 8): from the
// given bitmap, or each key against the threshold's (keys unread under a bitmap).
GMTK_HD uint32_t item_kept_bits(const KeepTest& test, uint64_t first, uint32_t count, const uint32_t* keys) {
  if (test.bits != nullptr) return mask_bits_of(test.bits, first, count);
  uint32_t bits = 0;
  for (uint32_t e = 0; e < 8; ++e) {
    if (e >= count) break;  // constant indexes keep `keys` in registers
    bits |= is_kept(keys[e], test.min_kept_key) ? 1u << e : 0u;
  }
  return bits;
}

// Where an item's kept bits (entries [first, first + count), count <= 8) go
// in the tensor's words: `low` ORed into word `word`, `high` into the next.
struct BitsPlacement {
  uint64_t word;
  uint32_t low;
  uint32_t high;
};

GMTK_HD BitsPlacement place_mask_bits(uint64_t first, uint32_t bits) {
  const uint32_t shift = static_cast<uint32_t>(first % 32u);
  return {first / 32u, bits << shift, shift == 0u ? 0u : bits >> (32u - shift)};
}

// T as the caller reads it under a given input: NaN for a bitmap (no
// threshold decided the mask), else the value of the given threshold's key.
GMTK_HD float given_threshold_value(const KeepTest& test, uint32_t dtype) {
  if (test.bits != nullptr) return float_from_bits(0x7FC00000u);
  return gradient_to_float(test.min_kept_key, dtype);
}

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
