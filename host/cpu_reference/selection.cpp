#include "selection.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "../comm.hpp"
#include "../plan.hpp"
#include "dtypes.hpp"

namespace gmtk::reference {
namespace {

// Counts, among the keys whose bits under prefix_mask equal prefix, the 8-bit
// digit at `shift`.
template <typename T>
void add_digit_histogram(const T* data, uint64_t numel, uint32_t prefix, uint32_t prefix_mask, int shift,
                         uint64_t* histogram) {
  for (uint64_t i = 0; i < numel; ++i) {
    const uint32_t key = magnitude_key(data[i]);
    if ((key & prefix_mask) == prefix) ++histogram[(key >> shift) & 0xFFu];
  }
}

// The k-th largest key over the spans (and, with a communicator, over the
// other ranks' spans of the set), 1 <= k <= total entries.
uint32_t kth_largest_key(const GradientSpan* spans, size_t span_count, uint64_t k, Communicator* comm,
                         uint64_t* histogram, gmtkStatus_t* status) {
  const int key_bits = spans[0].dtype == GMTK_FLOAT32 ? 31 : 15;
  uint32_t prefix = 0;
  uint32_t prefix_mask = 0;
  uint64_t rank = k;  // rank of the wanted key among the keys that match the prefix, from the top
  for (int shift = (key_bits - 1) / 8 * 8; shift >= 0; shift -= 8) {
    std::fill(histogram, histogram + kHistogramBins, uint64_t{0});
    for (size_t s = 0; s < span_count; ++s) {
      with_storage_type(spans[s].dtype, [&](auto type) {
        using T = decltype(type);
        add_digit_histogram(static_cast<const T*>(spans[s].data), spans[s].numel, prefix, prefix_mask, shift,
                            histogram);
      });
    }
    // The ranks' histograms summed: every rank then takes the same digit.
    if (comm != nullptr) {
      const gmtkStatus_t summed = comm->all_reduce_sum(histogram, kHistogramBins, nullptr);
      if (summed != GMTK_SUCCESS) *status = summed;
    }
    uint32_t digit = kHistogramBins - 1;
    while (histogram[digit] < rank) {
      rank -= histogram[digit];
      --digit;
    }
    prefix |= digit << shift;
    prefix_mask |= 0xFFu << shift;
  }
  return prefix;
}

}  // namespace

KeepRule select_keep_rule(const GradientSpan* spans, size_t span_count, double mask_ratio, uint64_t* histogram) {
  uint64_t total = 0;
  for (size_t s = 0; s < span_count; ++s) total += spans[s].numel;
  const uint64_t k = kept_target(mask_ratio, total);
  if (k == total) return kKeepAll;
  if (k == 0) return kKeepNone;
  gmtkStatus_t unused = GMTK_SUCCESS;
  return KeepRule{kth_largest_key(spans, span_count, k, nullptr, histogram, &unused)};
}

KeepRule select_sharded_keep_rule(const GradientSpan* spans, size_t span_count, double mask_ratio, uint64_t total,
                                  Communicator& comm, uint64_t* histogram, gmtkStatus_t* status) {
  const uint64_t k = kept_target(mask_ratio, total);
  if (k == total) return kKeepAll;
  if (k == 0) return kKeepNone;
  return KeepRule{kth_largest_key(spans, span_count, k, &comm, histogram, status)};
}

KeepRule rule_of_threshold(gmtkDtype_t dtype, float threshold) {
  if (!std::isnan(threshold) && !(threshold > 0.0f)) return kKeepAll;
  return with_storage_type(dtype, [&](auto type) {
    using T = decltype(type);
    const T nearest = from_float<T>(threshold);
    uint32_t key = magnitude_key(nearest);
    if (!std::isnan(threshold) && to_float(nearest) < threshold) ++key;  // rounded down: the next value up
    return KeepRule{key};
  });
}

uint64_t count_kept(const GradientSpan& span, const KeepDecision& decision) {
  return with_storage_type(span.dtype, [&](auto type) {
    using T = decltype(type);
    const T* data = static_cast<const T*>(span.data);
    uint64_t kept = 0;
    for (uint64_t i = 0; i < span.numel; ++i) kept += decision.keeps(i, magnitude_key(data[i])) ? 1 : 0;
    return kept;
  });
}

float threshold_value(gmtkDtype_t dtype, KeepRule rule) {
  if (rule.min_kept_key == kKeepAll.min_kept_key) return 0.0f;
  if (rule.min_kept_key == kKeepNone.min_kept_key) return std::numeric_limits<float>::infinity();
  switch (dtype) {
    case GMTK_FLOAT16: return to_float(Half{static_cast<uint16_t>(rule.min_kept_key)});
    case GMTK_BFLOAT16: return to_float(BFloat16{static_cast<uint16_t>(rule.min_kept_key)});
    case GMTK_FLOAT32: break;
  }
  return float_from_bits(rule.min_kept_key);
}

}  // namespace gmtk::reference
