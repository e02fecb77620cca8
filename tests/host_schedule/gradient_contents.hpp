// Gradient contents for the host-run schedule tests: every kind that
// stresses selection (ties, zeros, subnormals, NaN, shared top bits), as
// stored bits of any dtype.
#pragma once

#include <gmtk/gmtk.h>

#include <cstdint>
#include <cstring>
#include <random>

#include "../half_float.hpp"

namespace gmtk_test {

// ---- Gradient contents -----------------------------------------------------------

enum class Contents {
  gaussian, heavy_tail, all_equal, all_zero, signed_zeros, subnormals, one_nonzero, two_values, quantized,
  non_finite, random_bits, shared_top_bits, sample_skewed
};

inline const char* name_of(Contents c) {
  switch (c) {
    case Contents::gaussian: return "gaussian";
    case Contents::heavy_tail: return "heavy_tail";
    case Contents::all_equal: return "all_equal";
    case Contents::all_zero: return "all_zero";
    case Contents::signed_zeros: return "signed_zeros";
    case Contents::subnormals: return "subnormals";
    case Contents::one_nonzero: return "one_nonzero";
    case Contents::two_values: return "two_values";
    case Contents::quantized: return "quantized";
    case Contents::non_finite: return "non_finite";
    case Contents::random_bits: return "random_bits";
    case Contents::shared_top_bits: return "shared_top_bits";
    case Contents::sample_skewed: return "sample_skewed";
  }
  return "?";
}

inline const Contents kAllContents[] = {Contents::gaussian,  Contents::heavy_tail,  Contents::all_equal,
                                 Contents::all_zero,  Contents::signed_zeros, Contents::subnormals,
                                 Contents::one_nonzero, Contents::two_values, Contents::quantized,
                                 Contents::non_finite, Contents::random_bits, Contents::shared_top_bits,
                                 Contents::sample_skewed};

inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}

inline size_t element_bytes(gmtkDtype_t dtype) { return dtype == GMTK_FLOAT32 ? 4 : 2; }

// The stored bits of `value` in `dtype` (16-bit by truncation: any bit
// pattern is a valid input to selection).
inline uint32_t stored_bits(float value, gmtkDtype_t dtype) {
  if (dtype == GMTK_FLOAT32) return bits_of(value);
  if (dtype == GMTK_BFLOAT16) return bits_of(value) >> 16;
  return half_float::half_from_float(value);
}

// The value of stored bits, the inverse of stored_bits where it is exact.
inline float stored_value(uint32_t raw, gmtkDtype_t dtype) {
  float value;
  if (dtype == GMTK_FLOAT16) {
    return half_float::half_to_float(static_cast<uint16_t>(raw));
  }
  const uint32_t bits = dtype == GMTK_BFLOAT16 ? raw << 16 : raw;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline uint32_t entry_bits(Contents contents, gmtkDtype_t dtype, uint64_t i, uint64_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1e-3f);
  const uint32_t sign = (rng() & 1) ? (dtype == GMTK_FLOAT32 ? 0x80000000u : 0x8000u) : 0u;
  switch (contents) {
    case Contents::gaussian: return stored_bits(normal(rng), dtype);
    case Contents::heavy_tail: {
      std::cauchy_distribution<float> cauchy(0.0f, 1e-4f);
      return stored_bits(cauchy(rng), dtype);
    }
    case Contents::all_equal: return stored_bits(0.125f, dtype) | sign;
    case Contents::all_zero: return 0u;
    case Contents::signed_zeros: return sign;
    case Contents::subnormals: return (dtype == GMTK_FLOAT32 ? rng() % 0x7FFFFFu : rng() % 0x3FFu) | sign;
    case Contents::one_nonzero: return i == n / 2 ? stored_bits(-3.0f, dtype) : 0u;
    case Contents::two_values: return stored_bits((rng() % 3 == 0) ? 2.0f : 0.5f, dtype) | sign;
    case Contents::quantized: return stored_bits(0.25f * static_cast<float>(static_cast<int>(rng() % 256) - 128), dtype);
    case Contents::non_finite: {
      const uint64_t pick = rng() % 64;
      if (pick == 0) return dtype == GMTK_FLOAT32 ? 0x7F800000u | sign : (dtype == GMTK_FLOAT16 ? 0x7C00u : 0x7F80u);
      if (pick == 1) return dtype == GMTK_FLOAT32 ? 0x7FC00001u + static_cast<uint32_t>(rng() % 5) : (dtype == GMTK_FLOAT16 ? 0x7E01u : 0x7FC1u);
      return stored_bits(normal(rng), dtype);
    }
    case Contents::random_bits: return static_cast<uint32_t>(rng()) & (dtype == GMTK_FLOAT32 ? 0xFFFFFFFFu : 0xFFFFu);
    case Contents::sample_skewed:  // tiny where the large-set sample looks (the first entries of each
                                   // chunk, product and tiny tunings), ordinary elsewhere: the window misses
      return ((i % 64) < 8 || (i % 65536) < 1024) ? stored_bits(1e-6f, dtype) | sign
                                                   : stored_bits(normal(rng), dtype);
    case Contents::shared_top_bits:  // one 11-bit bucket, differing in the low bits: every fp32 level decides
      return dtype == GMTK_FLOAT32 ? (0x3A800000u | static_cast<uint32_t>(rng() % 0x100000u)) | sign
                                   : (0x3A00u | static_cast<uint32_t>(rng() % 0x10u)) | sign;
  }
  return 0u;
}

}  // namespace gmtk_test
