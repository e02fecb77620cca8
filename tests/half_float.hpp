// fp16 <-> fp32 for the tests, independent of gmtk's own conversions: the
// compiler's _Float16 under GCC; under clang, which has no _Float16 on
// x86-64 (the sanitizer and fuzzer builds), exact double arithmetic that
// gives the same bits (checked against _Float16 over every fp32 value).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace half_float {

inline uint32_t bits_of_float(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}
inline float float_of_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

#if defined(__GNUC__) && !defined(__clang__)
// fp16 through the compiler's _Float16 (round-to-nearest-even).
inline uint16_t half_from_float(float value) {
  const _Float16 half = static_cast<_Float16>(value);
  uint16_t bits;
  std::memcpy(&bits, &half, 2);
  return bits;
}
inline float half_to_float(uint16_t bits) {
  _Float16 half;
  std::memcpy(&half, &bits, 2);
  return static_cast<float>(half);
}
#else
// clang has no _Float16 on x86-64 (the sanitizer and fuzzer builds): fp16
// by exact double arithmetic instead. A finite |v| is a multiple of the
// spacing 2^(e - 10) of its binade (e >= -14, the subnormals' spacing below),
// rounded to the nearest multiple, ties to even; the encoding of n multiples
// in binade e is ((e + 15) << 10) + n - 1024, which also covers the carry
// into the next binade and the subnormals (e = -14, n < 1024).
inline uint16_t half_from_float(float value) {
  const uint32_t bits = bits_of_float(value);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  if (std::isnan(value)) return static_cast<uint16_t>(sign | 0x7E00u | ((bits >> 13) & 0x3FFu));
  const double magnitude = std::fabs(static_cast<double>(value));
  if (magnitude >= 65520.0) return static_cast<uint16_t>(sign | 0x7C00u);  // past the largest finite, to infinity
  if (magnitude == 0.0) return sign;
  int exponent = 0;
  std::frexp(magnitude, &exponent);  // magnitude in [2^(exponent-1), 2^exponent)
  const int binade = std::max(exponent - 1, -14);
  const double multiples = std::nearbyint(std::ldexp(magnitude, 10 - binade));  // exact quotient, ties to even
  return static_cast<uint16_t>(sign | (((binade + 15) << 10) + static_cast<int>(multiples) - 1024));
}
inline float half_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const int exponent = (bits >> 10) & 0x1F;
  const int mantissa = bits & 0x3FF;
  if (exponent == 31) {  // inf; a NaN widened quiet, as _Float16's conversion does
    return float_of_bits(sign | 0x7F800000u | (mantissa != 0 ? 0x400000u : 0u) | (static_cast<uint32_t>(mantissa) << 13));
  }
  const double magnitude = exponent == 0 ? std::ldexp(mantissa, -24) : std::ldexp(1024 + mantissa, exponent - 25);
  return sign != 0 ? -static_cast<float>(magnitude) : static_cast<float>(magnitude);
}
#endif

}  // namespace half_float
