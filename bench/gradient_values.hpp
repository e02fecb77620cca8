// Synthetic gradients for the benchmarks, the same on host and device: a
// counter-based generator, so any entry can be made independently.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GMTK_BENCH_HOST_DEVICE __host__ __device__
#else
#define GMTK_BENCH_HOST_DEVICE
#endif

namespace gmtk_bench {

enum class Distribution { gaussian, student_t3, quantized, zeros };

inline const char* distribution_name(Distribution d) {
  switch (d) {
    case Distribution::gaussian: return "gaussian";
    case Distribution::student_t3: return "student_t3";
    case Distribution::quantized: return "quantized";
    case Distribution::zeros: return "zeros";
  }
  return "?";
}

GMTK_BENCH_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1), 24 bits.
GMTK_BENCH_HOST_DEVICE inline float uniform_open(uint64_t key) {
  return (static_cast<float>(splitmix64(key) >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

GMTK_BENCH_HOST_DEVICE inline float standard_normal(uint64_t key) {
  const float u1 = uniform_open(key * 2);
  const float u2 = uniform_open(key * 2 + 1);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

// Entry `index` of tensor `tensor` at step `seed`, at the scale of real gradients.
GMTK_BENCH_HOST_DEVICE inline float gradient_value(Distribution d, uint64_t seed, uint64_t tensor, uint64_t index) {
  const uint64_t key = splitmix64(seed * 0x100000001B3ull + tensor) * 4 + index * 0x9E3779B97F4A7C15ull;
  switch (d) {
    case Distribution::gaussian: return 1e-3f * standard_normal(key);
    case Distribution::student_t3: {
      const float a = standard_normal(key + 1), b = standard_normal(key + 2), c = standard_normal(key + 3);
      return 1e-3f * standard_normal(key) / sqrtf((a * a + b * b + c * c) / 3.0f);
    }
    case Distribution::quantized: return 2.5e-4f * rintf(4.0f * standard_normal(key));
    case Distribution::zeros: return 0.0f;
  }
  return 0.0f;
}

}  // namespace gmtk_bench
