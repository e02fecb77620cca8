// Exact threshold selection on the CPU: MSB-first radix select over the
// magnitude keys, 8 bits a pass, reading the gradients in place (no copy, no
// sort): O(passes * n) time and a 256-bin histogram of memory.
#pragma once

#include <gmtk/gmtk.h>

#include <cstddef>
#include <cstdint>

namespace gmtk {
class Communicator;
}

namespace gmtk::reference {

// Gradients of one tensor, as stored.
struct GradientSpan {
  gmtkDtype_t dtype;
  const void* data;
  uint64_t numel;
};

// Which entries of a set are kept: those with magnitude_key >= min_kept_key.
struct KeepRule {
  uint32_t min_kept_key;
};
constexpr KeepRule kKeepAll{0u};
constexpr KeepRule kKeepNone{0xFFFFFFFFu};  // above every 31-bit key

inline bool is_kept(uint32_t key, KeepRule rule) { return key >= rule.min_kept_key; }

// How a call decides a tensor's entries: by a rule on the key (selected, or
// from a given threshold), or by a given bitmap (entry i is kept iff bit
// i % 32 of word i / 32 is set).
struct KeepDecision {
  KeepRule rule;
  const uint32_t* bits;  // null: by the rule

  bool keeps(uint64_t i, uint32_t key) const {
    return bits != nullptr ? ((bits[i / 32] >> (i % 32)) & 1u) != 0 : is_kept(key, rule);
  }
};

// The rule of a given threshold T for gradients of `dtype`: keep |g| >= T.
// The key is the smallest of the dtype whose value is >= T (T is rounded up
// to the dtype: a T that is a value of the dtype, as gmtk's thresholds
// output is, gives exactly its key); T <= 0 keeps everything; a NaN T is the
// dtype's NaN of its payload (docs/semantics.md).
KeepRule rule_of_threshold(gmtkDtype_t dtype, float threshold);

constexpr size_t kHistogramBins = 256;

// The rule for a set of spans of one dtype (one tensor, or every tensor of a
// global-scope group): keeps the entries with |g| >= T, T the k-th largest |g|
// with k = n - floor(mask_ratio * n). k = n keeps all without selection work;
// k = 0 keeps none. `histogram` is scratch of kHistogramBins counters.
KeepRule select_keep_rule(const GradientSpan* spans, size_t span_count, double mask_ratio, uint64_t* histogram);

// The same over a set whose other entries the other ranks of `comm` hold
// (shards): `total` entries in all, k taken from it, each pass's histogram
// summed over the ranks. Every rank calls it with the same set and gets the
// same rule.
// A failed collective (ranks that disagree) is recorded in *status, which
// is otherwise left as it is.
KeepRule select_sharded_keep_rule(const GradientSpan* spans, size_t span_count, double mask_ratio, uint64_t total,
                                  Communicator& comm, uint64_t* histogram, gmtkStatus_t* status);

// Entries of `span` the decision keeps.
uint64_t count_kept(const GradientSpan& span, const KeepDecision& decision);

// T as a float: the k-th largest |g|; 0 when everything is kept, +inf when nothing is.
float threshold_value(gmtkDtype_t dtype, KeepRule rule);

}  // namespace gmtk::reference
