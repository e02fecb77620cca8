// Storage types of the CPU reference backend and their exact conversions.
// 16-bit values are stored as raw bits; every conversion from float rounds to
// nearest-even, as the spec requires of 16-bit outputs.
#pragma once

#include <gmtk/gmtk.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace gmtk::reference {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float to_float(float value) { return value; }

inline float to_float(BFloat16 value) { return float_from_bits(static_cast<uint32_t>(value.bits) << 16); }

inline float to_float(Half value) {
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = value.bits & 0x3FFu;
  if (exponent == 0x1F) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal, exact
  return sign ? -magnitude : magnitude;
}

template <typename T>
T from_float(float value);

template <>
inline float from_float<float>(float value) {
  return value;
}

template <>
inline BFloat16 from_float<BFloat16>(float value) {
  const uint32_t bits = bits_of(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<uint16_t>((bits >> 16) | 0x0040u)};  // quiet NaN
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return {static_cast<uint16_t>((bits + rounding_bias) >> 16)};
}

template <>
inline Half from_float<Half>(float value) {
  const uint32_t bits = bits_of(value);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) {  // NaN: quiet, keep the top payload bits
    return {static_cast<uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu))};
  }
  if (magnitude >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520 rounds to inf
  if (magnitude >= 0x38800000u) {  // normal half: rebias the exponent (127 -> 15), round off 13 bits
    const uint32_t rebiased = magnitude - (112u << 23);
    const uint32_t rounded = (rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13;
    return {static_cast<uint16_t>(sign | rounded)};
  }
  // Subnormal half (or zero): the encoding is round(|value| * 2^24); the
  // scaling is exact and nearbyint rounds to nearest-even. 1024 encodes 2^-14.
  const float scaled = float_from_bits(magnitude) * 16777216.0f;
  return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
}

// The selection key of a stored gradient: its bits with the sign cleared, which
// orders |g| as unsigned integers (NaNs above +inf, by payload).
inline uint32_t magnitude_key(float value) { return bits_of(value) & 0x7FFFFFFFu; }
inline uint32_t magnitude_key(Half value) { return value.bits & 0x7FFFu; }
inline uint32_t magnitude_key(BFloat16 value) { return value.bits & 0x7FFFu; }

// Calls body(T{}) with T the storage type of `dtype`.
template <typename Body>
decltype(auto) with_storage_type(gmtkDtype_t dtype, Body&& body) {
  switch (dtype) {
    case GMTK_FLOAT16: return body(Half{});
    case GMTK_BFLOAT16: return body(BFloat16{});
    case GMTK_FLOAT32: break;
  }
  return body(float{});
}

}  // namespace gmtk::reference
