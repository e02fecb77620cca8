// Helpers shared by the GPU test files: status checks, the 16-bit formats
// rebuilt from their IEEE layouts, gradient contents, and owners of streams,
// device memory, host arenas and handles. Written from SPEC.md,
// docs/semantics.md, docs/api.md and gmtk.h alone: nothing here comes from
// host/ or kernels/.
#ifndef GMTK_TESTS_GPU_GPU_TEST_SUPPORT_H_
#define GMTK_TESTS_GPU_GPU_TEST_SUPPORT_H_

#include <gmtk/gmtk.h>

#include <catch2/catch.hpp>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace gpu_test {

// ---- Status checks -------------------------------------------------------------

#define GPU_CUDA_OK(call)                                         \
  do {                                                            \
    const cudaError_t gpu_cuda_error_ = (call);                   \
    INFO(#call << " -> " << cudaGetErrorString(gpu_cuda_error_)); \
    REQUIRE(gpu_cuda_error_ == cudaSuccess);                      \
  } while (0)

#define GPU_GMTK_OK(call)                                                                               \
  do {                                                                                                  \
    const gmtkStatus_t gpu_gmtk_status_ = (call);                                                       \
    INFO(#call << " -> " << gmtkGetErrorString(gpu_gmtk_status_) << ": " << gmtkGetLastErrorMessage()); \
    REQUIRE(gpu_gmtk_status_ == GMTK_SUCCESS);                                                          \
  } while (0)

// gmtk must leave no sticky CUDA error behind, and the legacy default stream
// must still answer normally. Called at the end of every test.
inline void check_no_cuda_error_left() {
  CHECK(cudaGetLastError() == cudaSuccess);
  const cudaError_t legacy = cudaStreamQuery(cudaStreamLegacy);
  INFO("cudaStreamQuery(cudaStreamLegacy) -> " << cudaGetErrorString(legacy));
  CHECK((legacy == cudaSuccess || legacy == cudaErrorNotReady));
}

// ---- Bits and dtypes -------------------------------------------------------------

inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}
inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline constexpr gmtkDtype_t kDtypes[] = {GMTK_FLOAT32, GMTK_FLOAT16, GMTK_BFLOAT16};

inline size_t element_size(gmtkDtype_t dtype) { return dtype == GMTK_FLOAT32 ? 4 : 2; }
inline const char* dtype_name(gmtkDtype_t dtype) {
  return dtype == GMTK_FLOAT32 ? "fp32" : dtype == GMTK_FLOAT16 ? "fp16" : "bf16";
}

// "1.5 (0x3fc00000)": the value and the bits, since the bits are what must agree.
inline std::string float_text(uint32_t bits) {
  std::ostringstream out;
  out << std::setprecision(9) << float_from_bits(bits) << " (0x" << std::hex << std::setw(8) << std::setfill('0')
      << bits << ")";
  return out.str();
}
inline std::string hex_text(uint32_t bits) {
  std::ostringstream out;
  out << "0x" << std::hex << bits;
  return out.str();
}

// ---- 16-bit formats, from their IEEE layouts -----------------------------------
// Only exact double arithmetic: frexp and ldexp split and scale a float exactly,
// and nearbyint rounds to nearest-even in the default rounding mode.

struct Format16 {
  int mantissa_bits;   // stored fraction bits
  int min_exponent;    // exponent of the smallest normal
  int max_exponent;    // exponent of the largest finite value
  uint16_t infinity;   // bits of +inf
  uint16_t quiet_nan;  // bits of the canonical +NaN
};
inline constexpr Format16 kHalf{10, -14, 15, 0x7C00, 0x7E00};
inline constexpr Format16 kBfloat{7, -126, 127, 0x7F80, 0x7FC0};
inline const Format16& format_of(gmtkDtype_t dtype) { return dtype == GMTK_FLOAT16 ? kHalf : kBfloat; }

// value rounded to nearest-even; beyond the largest finite value, infinity.
inline uint16_t narrow_to_16(float value, const Format16& format) {
  const uint32_t sign = std::signbit(value) ? 0x8000u : 0u;
  if (std::isnan(value)) return static_cast<uint16_t>(sign | format.quiet_nan);
  if (std::isinf(value)) return static_cast<uint16_t>(sign | format.infinity);
  const double magnitude = std::fabs(static_cast<double>(value));
  if (magnitude == 0.0) return static_cast<uint16_t>(sign);
  const int m = format.mantissa_bits;
  int exponent = 0;
  std::frexp(magnitude, &exponent);
  exponent -= 1;  // magnitude is in [2^exponent, 2^(exponent + 1))
  if (exponent < format.min_exponent) {
    // Subnormal: a count of the smallest step 2^(min_exponent - m). A count of
    // 2^m is the smallest normal, whose bit pattern is that same number.
    const double steps = std::nearbyint(std::ldexp(magnitude, m - format.min_exponent));
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(steps));
  }
  double significand = std::nearbyint(std::ldexp(magnitude, m - exponent));  // in [2^m, 2^(m+1)]
  if (significand == std::ldexp(1.0, m + 1)) {
    significand = std::ldexp(1.0, m);
    ++exponent;
  }
  if (exponent > format.max_exponent) return static_cast<uint16_t>(sign | format.infinity);
  const uint32_t biased = static_cast<uint32_t>(exponent - format.min_exponent + 1);
  const uint32_t fraction = static_cast<uint32_t>(significand) - (1u << m);
  return static_cast<uint16_t>(sign | (biased << m) | fraction);
}

inline float widen_from_16(uint16_t bits, const Format16& format) {
  const int m = format.mantissa_bits;
  const uint32_t exponent_field = (bits & 0x7FFFu) >> m;
  const uint32_t fraction = bits & ((1u << m) - 1u);
  const uint32_t all_ones = static_cast<uint32_t>(format.infinity) >> m;
  double magnitude;
  if (exponent_field == all_ones) {
    magnitude = fraction != 0 ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exponent_field == 0) {
    magnitude = std::ldexp(static_cast<double>(fraction), format.min_exponent - m);
  } else {
    magnitude = std::ldexp(static_cast<double>((1u << m) + fraction),
                           static_cast<int>(exponent_field) + format.min_exponent - 1 - m);
  }
  return static_cast<float>((bits & 0x8000u) != 0 ? -magnitude : magnitude);
}

// Entry i of a gradient buffer: its raw bits, its key and its value.
inline uint32_t raw_bits_at(gmtkDtype_t dtype, const unsigned char* data, size_t i) {
  if (dtype == GMTK_FLOAT32) {
    uint32_t bits;
    std::memcpy(&bits, data + 4 * i, 4);
    return bits;
  }
  uint16_t bits;
  std::memcpy(&bits, data + 2 * i, 2);
  return bits;
}
// The selection key (docs/semantics.md): the bits with the sign cleared, which
// order magnitudes as unsigned integers, NaN above +inf.
inline uint32_t key_of_bits(gmtkDtype_t dtype, uint32_t bits) {
  return bits & (dtype == GMTK_FLOAT32 ? 0x7FFFFFFFu : 0x7FFFu);
}
inline uint32_t infinity_key(gmtkDtype_t dtype) {
  return dtype == GMTK_FLOAT32 ? 0x7F800000u : format_of(dtype).infinity;
}
inline bool key_is_nan(gmtkDtype_t dtype, uint32_t key) { return key > infinity_key(dtype); }
inline float value_of_bits(gmtkDtype_t dtype, uint32_t bits) {
  return dtype == GMTK_FLOAT32 ? float_from_bits(bits) : widen_from_16(static_cast<uint16_t>(bits), format_of(dtype));
}

// ---- Gradient contents ------------------------------------------------------------

enum class Content {
  gaussian,
  all_equal,        // one magnitude, random signs
  zeros,            // +0 only
  signed_zeros,     // +0 and -0 mixed
  subnormals,       // nonzero subnormals of the dtype only
  one_nonzero,      // zeros but one entry
  two_values,       // two distinct magnitudes
  nan_and_inf,      // gaussian with NaNs (quiet and signalling), +inf and -inf planted
  quantized_256,    // 256 distinct magnitudes (0 included): many ties
  heavy_tail,       // Cauchy
  raw_bits,         // uniformly random bit patterns: NaN and inf included
  raw_finite_bits,  // random bit patterns of finite values
  big_outlier,      // gaussian with one entry of magnitude 8 (for a scale that overflows it)
  mostly_zeros      // 90% exact +0 (an embedding's untouched rows), the rest gaussian
};

inline const char* content_name(Content content) {
  switch (content) {
    case Content::gaussian: return "gaussian";
    case Content::all_equal: return "all equal";
    case Content::zeros: return "all zeros";
    case Content::signed_zeros: return "+0 and -0";
    case Content::subnormals: return "subnormals only";
    case Content::one_nonzero: return "one non-zero";
    case Content::two_values: return "two distinct values";
    case Content::nan_and_inf: return "NaN and inf present";
    case Content::quantized_256: return "quantized (256 values)";
    case Content::heavy_tail: return "heavy tail (Cauchy)";
    case Content::raw_bits: return "random raw bits";
    case Content::raw_finite_bits: return "random finite bits";
    case Content::big_outlier: return "gaussian with an outlier of 8";
    case Content::mostly_zeros: return "90% zeros";
  }
  return "?";
}

inline constexpr Content kFiniteContents[] = {
    Content::gaussian,    Content::all_equal,  Content::zeros,         Content::signed_zeros, Content::subnormals,
    Content::one_nonzero, Content::two_values, Content::quantized_256, Content::heavy_tail,   Content::raw_finite_bits};

// The scale a content is drawn at unless a test says otherwise: quantized
// levels are multiples of a power of two, exact in every dtype.
inline float default_scale(Content content) { return content == Content::quantized_256 ? 1.0f / 64 : 1e-3f; }

inline void fill_gradient(unsigned char* data, gmtkDtype_t dtype, int64_t n, Content content, float scale,
                          uint64_t seed) {
  std::mt19937_64 rng(seed);
  const bool fp32 = dtype == GMTK_FLOAT32;
  const uint32_t width_mask = fp32 ? 0xFFFFFFFFu : 0xFFFFu;
  const uint32_t sign_bit = fp32 ? 0x80000000u : 0x8000u;
  const uint32_t exponent_mask = infinity_key(dtype);
  const uint32_t fraction_mask = fp32 ? 0x7FFFFFu : (1u << format_of(dtype).mantissa_bits) - 1u;
  const uint32_t quiet_bit = (fraction_mask >> 1) + 1u;  // top fraction bit
  auto put_bits = [&](int64_t i, uint32_t bits) {
    if (fp32) {
      std::memcpy(data + 4 * i, &bits, 4);
    } else {
      const uint16_t half = static_cast<uint16_t>(bits);
      std::memcpy(data + 2 * i, &half, 2);
    }
  };
  auto put = [&](int64_t i, float value) {
    put_bits(i, fp32 ? bits_of(value) : narrow_to_16(value, format_of(dtype)));
  };
  auto random_sign = [&]() { return (rng() & 1u) != 0 ? -1.0f : 1.0f; };
  auto random_index = [&]() { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); };
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::cauchy_distribution<float> cauchy(0.0f, 1.0f);

  switch (content) {
    case Content::gaussian:
    case Content::nan_and_inf:
    case Content::big_outlier:
      for (int64_t i = 0; i < n; ++i) put(i, scale * normal(rng));
      break;
    case Content::all_equal:
      for (int64_t i = 0; i < n; ++i) put(i, random_sign() * 0.75f * scale);
      break;
    case Content::zeros:
    case Content::one_nonzero:
      for (int64_t i = 0; i < n; ++i) put(i, 0.0f);
      break;
    case Content::signed_zeros:
      for (int64_t i = 0; i < n; ++i) put(i, random_sign() * 0.0f);
      break;
    case Content::subnormals:
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t fraction = 1u + static_cast<uint32_t>(rng() % fraction_mask);  // 1 .. all ones
        put_bits(i, ((rng() & 1u) != 0 ? sign_bit : 0u) | fraction);
      }
      break;
    case Content::two_values:
      for (int64_t i = 0; i < n; ++i) put(i, random_sign() * (rng() % 4 == 0 ? 2.0f : 1.0f) * scale);
      break;
    case Content::quantized_256:
      for (int64_t i = 0; i < n; ++i) put(i, random_sign() * static_cast<float>(rng() % 256) * scale);
      break;
    case Content::mostly_zeros:
      for (int64_t i = 0; i < n; ++i) {
        const float value = scale * normal(rng);
        put(i, rng() % 10 == 0 ? value : 0.0f);
      }
      break;
    case Content::heavy_tail:
      for (int64_t i = 0; i < n; ++i) put(i, scale * cauchy(rng));
      break;
    case Content::raw_bits:
      for (int64_t i = 0; i < n; ++i) put_bits(i, static_cast<uint32_t>(rng()) & width_mask);
      break;
    case Content::raw_finite_bits:
      for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        do {
          bits = static_cast<uint32_t>(rng()) & width_mask;
        } while ((bits & exponent_mask) == exponent_mask);
        put_bits(i, bits);
      }
      break;
  }
  if (n == 0) return;
  if (content == Content::one_nonzero) put(random_index(), random_sign() * 1.5f * scale);
  if (content == Content::big_outlier) put(random_index(), random_sign() * 8.0f);
  if (content == Content::nan_and_inf) {
    // On small tensors the plants may land on one another; what is left is
    // still non-finite, and the expectations are computed from the bytes.
    const uint32_t payload = static_cast<uint32_t>(rng()) & (quiet_bit - 1u);
    put_bits(random_index(), exponent_mask | quiet_bit | payload);                       // quiet NaN
    put_bits(random_index(), exponent_mask);                                             // +inf
    put_bits(random_index(), sign_bit | exponent_mask);                                  // -inf
    put_bits(random_index(), sign_bit | exponent_mask | (payload == 0 ? 1u : payload));  // -signalling NaN
  }
}

// ---- Layout helpers -----------------------------------------------------------

// The unaligned starts worth trying: element-aligned, not vector-aligned.
inline size_t misalign_for(gmtkDtype_t dtype, size_t i) {
  static const size_t two_byte[] = {0, 2, 4, 6, 8, 12};
  static const size_t four_byte[] = {0, 4, 8, 12};
  return dtype == GMTK_FLOAT32 ? four_byte[i % 4] : two_byte[i % 6];
}

inline size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// ---- Ulps -------------------------------------------------------------------------

// A float's position on the number line: consecutive floats differ by 1,
// -0 and +0 are both 0.
inline int64_t ordered(float value) {
  const uint32_t bits = bits_of(value);
  return (bits & 0x80000000u) != 0 ? -static_cast<int64_t>(bits & 0x7FFFFFFFu) : static_cast<int64_t>(bits);
}
// Ulps between two floats; NaN equals NaN and is infinitely far from a number.
inline uint64_t ulp_distance(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b) ? 0 : std::numeric_limits<uint64_t>::max();
  const int64_t difference = ordered(a) - ordered(b);
  return static_cast<uint64_t>(difference < 0 ? -difference : difference);
}

inline std::string value_text(gmtkDtype_t dtype, uint32_t bits) {
  std::ostringstream out;
  out << std::setprecision(9) << value_of_bits(dtype, bits) << " (" << hex_text(bits) << ")";
  return out.str();
}

// ---- Entries of a region of a host arena ------------------------------------------
// A test lays every buffer of a case in one arena; a region (any struct with
// offset, width and dtype) is one buffer in it.

template <typename Region>
uint32_t bits_at(const unsigned char* arena, const Region& r, size_t i) {
  return raw_bits_at(r.dtype, arena + r.offset, i);
}
template <typename Region>
float value_at(const unsigned char* arena, const Region& r, size_t i) {
  return value_of_bits(r.dtype, bits_at(arena, r, i));
}
template <typename Region>
void put_bits(unsigned char* arena, const Region& r, size_t i, uint32_t bits) {
  if (r.width == 4) {
    std::memcpy(arena + r.offset + 4 * i, &bits, 4);
  } else {
    const auto half = static_cast<uint16_t>(bits);
    std::memcpy(arena + r.offset + 2 * i, &half, 2);
  }
}
// Stores a float in the region's format (16-bit: rounded to nearest-even).
template <typename Region>
void put_value(unsigned char* arena, const Region& r, size_t i, float value) {
  put_bits(arena, r, i, r.dtype == GMTK_FLOAT32 ? bits_of(value) : narrow_to_16(value, format_of(r.dtype)));
}
template <typename Region>
int64_t int64_at(const unsigned char* arena, const Region& r, size_t i) {
  int64_t value;
  std::memcpy(&value, arena + r.offset + 8 * i, 8);
  return value;
}
template <typename Region>
void put_int64(unsigned char* arena, const Region& r, size_t i, int64_t value) {
  std::memcpy(arena + r.offset + 8 * i, &value, 8);
}

// ---- Owners -------------------------------------------------------------------------

class Stream {
 public:
  Stream() { GPU_CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(stream_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(size_t bytes) { allocate(bytes); }
  ~DeviceMemory() { cudaFree(pointer_); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  void allocate(size_t bytes) {
    REQUIRE(pointer_ == nullptr);
    GPU_CUDA_OK(cudaMalloc(&pointer_, std::max<size_t>(bytes, 1)));
  }
  unsigned char* bytes() const { return static_cast<unsigned char*>(pointer_); }

 private:
  void* pointer_ = nullptr;
};

// Host bytes whose start is 256-byte aligned, so that the CPU side sees the
// same in-block offsets as the device side.
class HostArena {
 public:
  explicit HostArena(size_t bytes) : storage_(bytes + 256) {
    const auto address = reinterpret_cast<uintptr_t>(storage_.data());
    shift_ = (256 - address % 256) % 256;
  }
  unsigned char* data() { return storage_.data() + shift_; }
  const unsigned char* data() const { return storage_.data() + shift_; }

 private:
  std::vector<unsigned char> storage_;
  size_t shift_ = 0;
};

struct HandleOwner {
  gmtkHandle_t handle = nullptr;
  explicit HandleOwner(gmtkBackend_t backend) {
    gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
    config.backend = backend;
    GPU_GMTK_OK(gmtkHandleCreate(&handle, &config));
  }
  ~HandleOwner() { gmtkHandleDestroy(handle); }
  HandleOwner(const HandleOwner&) = delete;
  HandleOwner& operator=(const HandleOwner&) = delete;
};

// The bytes a backend reads: device memory for CUDA, host memory for the CPU
// reference; both 256-byte aligned.
class BackendMemory {
 public:
  BackendMemory(gmtkBackend_t backend, size_t bytes) : cuda_(backend == GMTK_BACKEND_CUDA) {
    if (cuda_) {
      device_ = std::make_unique<DeviceMemory>(bytes);
    } else {
      host_ = std::make_unique<HostArena>(bytes);
    }
  }
  unsigned char* data() const { return cuda_ ? device_->bytes() : host_->data(); }
  // On CUDA: queued on the stream; wait() (or a later read) before reusing `source`.
  void write(size_t offset, const void* source, size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return;
    if (cuda_) {
      GPU_CUDA_OK(cudaMemcpyAsync(data() + offset, source, bytes, cudaMemcpyHostToDevice, stream));
    } else {
      std::memcpy(data() + offset, source, bytes);
    }
  }
  void read(size_t offset, void* destination, size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return;
    if (cuda_) {
      GPU_CUDA_OK(cudaMemcpyAsync(destination, data() + offset, bytes, cudaMemcpyDeviceToHost, stream));
      GPU_CUDA_OK(cudaStreamSynchronize(stream));
    } else {
      std::memcpy(destination, data() + offset, bytes);
    }
  }
  void wait(cudaStream_t stream) const {
    if (cuda_) GPU_CUDA_OK(cudaStreamSynchronize(stream));
  }

 private:
  bool cuda_;
  std::unique_ptr<DeviceMemory> device_;
  std::unique_ptr<HostArena> host_;
};

// ---- Reports ---------------------------------------------------------------

inline constexpr size_t kReportedMismatches = 5;  // per check: enough to see a pattern

// A host function that holds the stream until opened (or until a timeout, so
// that a call that waits for the stream fails the test instead of hanging it).
struct Gate {
  std::atomic<bool> open{false};
  std::atomic<bool> timed_out{false};
};
inline void CUDART_CB hold_stream_until_open(void* user_data) {
  auto* gate = static_cast<Gate*>(user_data);
  const auto start = std::chrono::steady_clock::now();
  while (!gate->open.load()) {
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(5)) {
      gate->timed_out = true;
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

}  // namespace gpu_test

#endif  // GMTK_TESTS_GPU_GPU_TEST_SUPPORT_H_
