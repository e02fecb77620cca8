// Helpers for the CPU reference backend's tests. They use only the public C
// API and share no code with host/: the 16-bit conversions come from the
// compiler (_Float16) or are written differently, thresholds come from a sort,
// and the optimizer formulas are in double precision.
#pragma once

#include <gmtk/gmtk.h>

#include "../half_float.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace gmtk_test {

// ---- 16-bit values, independently of host/cpu_reference/dtypes.hpp --------

inline uint32_t float_bits(float value) { return half_float::bits_of_float(value); }
inline float float_from(uint32_t bits) { return half_float::float_of_bits(bits); }

// fp16 conversions: tests/half_float.hpp.
using half_float::half_from_float;
using half_float::half_to_float;

// bf16: pick the nearer of the two neighbours by exact double arithmetic,
// ties to the even bit pattern; beyond the largest finite value, infinity.
inline float bf16_to_float(uint16_t bits) { return float_from(static_cast<uint32_t>(bits) << 16); }
inline uint16_t bf16_from_float(float value) {
  if (std::isnan(value)) return 0x7FC0;
  const uint32_t bits = float_bits(value);
  const auto down = static_cast<uint16_t>(bits >> 16);  // toward zero
  if ((bits & 0xFFFFu) == 0) return down;
  const auto up = static_cast<uint16_t>(down + 1);  // away from zero; may be infinity
  // Rounding treats the neighbour above the largest finite value as 2^128.
  const double up_value = std::isinf(bf16_to_float(up)) ? std::copysign(std::ldexp(1.0, 128), value)
                                                        : static_cast<double>(bf16_to_float(up));
  const double distance_down = std::fabs(static_cast<double>(value) - bf16_to_float(down));
  const double distance_up = std::fabs(up_value - value);
  if (distance_down < distance_up) return down;
  if (distance_up < distance_down) return up;
  return (down & 1u) == 0 ? down : up;
}

// A gradient or parameter buffer of any dtype, held as raw bytes.
struct Buffer {
  gmtkDtype_t dtype = GMTK_FLOAT32;
  std::vector<unsigned char> bytes;

  Buffer() = default;
  Buffer(gmtkDtype_t type, size_t n) : dtype(type), bytes(n * element_size(type)) {}

  static size_t element_size(gmtkDtype_t type) { return type == GMTK_FLOAT32 ? 4 : 2; }
  size_t size() const { return bytes.size() / element_size(dtype); }
  void* data() { return bytes.empty() ? nullptr : bytes.data(); }

  float get(size_t i) const {
    if (dtype == GMTK_FLOAT32) {
      float value;
      std::memcpy(&value, &bytes[i * 4], 4);
      return value;
    }
    uint16_t bits;
    std::memcpy(&bits, &bytes[i * 2], 2);
    return dtype == GMTK_FLOAT16 ? half_to_float(bits) : bf16_to_float(bits);
  }
  // Stores `value` rounded to the dtype (nearest-even).
  void set(size_t i, float value) {
    if ((i + 1) * element_size(dtype) > bytes.size()) throw std::out_of_range("Buffer::set");
    if (dtype == GMTK_FLOAT32) {
      std::memcpy(bytes.data() + i * 4, &value, 4);
      return;
    }
    const uint16_t bits = dtype == GMTK_FLOAT16 ? half_from_float(value) : bf16_from_float(value);
    std::memcpy(bytes.data() + i * 2, &bits, 2);
  }
  uint16_t bits16(size_t i) const {
    uint16_t bits;
    std::memcpy(&bits, &bytes[i * 2], 2);
    return bits;
  }
};

inline float round_to(gmtkDtype_t dtype, float value) {
  if (dtype == GMTK_FLOAT16) return half_to_float(half_from_float(value));
  if (dtype == GMTK_BFLOAT16) return bf16_to_float(bf16_from_float(value));
  return value;
}

inline const char* dtype_label(gmtkDtype_t dtype) {
  return dtype == GMTK_FLOAT32 ? "fp32" : dtype == GMTK_FLOAT16 ? "fp16" : "bf16";
}

// ---- Gradient distributions --------------------------------------------

enum class Distribution { gaussian, student_t3, quantized, zeros, signed_zeros_and_tiny };

inline const char* distribution_label(Distribution d) {
  switch (d) {
    case Distribution::gaussian: return "gaussian";
    case Distribution::student_t3: return "student-t(3)";
    case Distribution::quantized: return "quantized (many ties)";
    case Distribution::zeros: return "all zeros";
    case Distribution::signed_zeros_and_tiny: return "signed zeros and subnormals";
  }
  return "?";
}

inline void fill(Buffer& buffer, Distribution distribution, uint64_t seed, float scale = 1e-3f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::student_t_distribution<float> student(3.0f);
  std::uniform_int_distribution<int> level(-4, 4);
  for (size_t i = 0; i < buffer.size(); ++i) {
    float value = 0.0f;
    switch (distribution) {
      case Distribution::gaussian: value = scale * normal(rng); break;
      case Distribution::student_t3: value = scale * student(rng); break;
      case Distribution::quantized: value = 0.25f * scale * static_cast<float>(level(rng)); break;
      case Distribution::zeros: value = 0.0f; break;
      case Distribution::signed_zeros_and_tiny: {
        const int pick = level(rng);
        value = pick < -1 ? -0.0f : pick < 2 ? 0.0f : static_cast<float>(pick) * 1e-41f;  // fp32 subnormals
        break;
      }
    }
    buffer.set(i, value);
  }
}

// ---- Independent selection: the definition, by sorting ---------------------

// k = n - floor(r * n), the product in double (as Python's int(r * n)).
inline uint64_t expected_kept_target(double ratio, uint64_t n) {
  return n - static_cast<uint64_t>(std::floor(ratio * static_cast<double>(n)));
}

struct ExpectedSelection {
  uint64_t k;
  double threshold;  // the k-th largest |g|; 0 when k == n, +inf when k == 0
  uint64_t kept;     // entries with |g| >= threshold
};

// Magnitudes of all entries of the given buffers, as doubles (|NaN| sorts above inf).
inline ExpectedSelection expected_selection(const std::vector<const Buffer*>& buffers, double ratio) {
  std::vector<double> magnitudes;
  for (const Buffer* buffer : buffers) {
    for (size_t i = 0; i < buffer->size(); ++i) magnitudes.push_back(std::fabs(static_cast<double>(buffer->get(i))));
  }
  const uint64_t n = magnitudes.size();
  ExpectedSelection result{expected_kept_target(ratio, n), 0.0, n};
  if (result.k == n) return result;
  if (result.k == 0) return {0, std::numeric_limits<double>::infinity(), 0};
  std::sort(magnitudes.begin(), magnitudes.end(), [](double a, double b) {
    if (std::isnan(a)) return !std::isnan(b);
    if (std::isnan(b)) return false;
    return a > b;
  });
  result.threshold = magnitudes[result.k - 1];
  result.kept = static_cast<uint64_t>(
      std::count_if(magnitudes.begin(), magnitudes.end(), [&](double m) { return std::isnan(m) || m >= result.threshold; }));
  return result;
}

inline bool is_kept(float grad, double threshold) { return std::fabs(static_cast<double>(grad)) >= threshold; }

// ---- RAII over the C API -----------------------------------------------------

#define GMTK_REQUIRE_OK(call)                                                        \
  do {                                                                               \
    const gmtkStatus_t gmtk_test_status_ = (call);                                   \
    INFO(#call << " -> " << gmtkGetErrorString(gmtk_test_status_) << ": " << gmtkGetLastErrorMessage()); \
    REQUIRE(gmtk_test_status_ == GMTK_SUCCESS);                                      \
  } while (0)

class Handle {
 public:
  explicit Handle(gmtkBackend_t backend = GMTK_BACKEND_CPU_REFERENCE) {
    gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
    config.backend = backend;
    GMTK_REQUIRE_OK(gmtkHandleCreate(&handle_, &config));
  }
  ~Handle() { gmtkHandleDestroy(handle_); }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  gmtkHandle_t get() const { return handle_; }

 private:
  gmtkHandle_t handle_ = nullptr;
};

class Plan {
 public:
  Plan() = default;
  Plan(gmtkHandle_t handle, const std::vector<gmtkGroupConfig_t>& groups, const std::vector<gmtkTensor_t>& tensors,
       unsigned flags = 0) {
    GMTK_REQUIRE_OK(create(handle, groups, tensors, flags, &plan_));
    size_t bytes = 0;
    GMTK_REQUIRE_OK(gmtkPlanGetWorkspaceSize(plan_, &bytes));
    workspace_.resize(bytes);
  }
  ~Plan() { gmtkPlanDestroy(plan_); }
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  static gmtkStatus_t create(gmtkHandle_t handle, const std::vector<gmtkGroupConfig_t>& groups,
                             const std::vector<gmtkTensor_t>& tensors, unsigned flags, gmtkPlan_t* plan) {
    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = groups.data();
    config.num_groups = static_cast<int32_t>(groups.size());
    config.tensors = tensors.empty() ? nullptr : tensors.data();
    config.num_tensors = static_cast<int64_t>(tensors.size());
    config.flags = flags;
    return gmtkPlanCreate(handle, &config, plan);
  }

  gmtkPlan_t get() const { return plan_; }
  gmtkStatus_t step(const gmtkStepArgs_t& args) { return gmtkStep(plan_, &args, ws(), workspace_.size(), nullptr); }
  gmtkStatus_t select(const gmtkStepArgs_t& args) {
    return gmtkSelectThresholds(plan_, &args, ws(), workspace_.size(), nullptr);
  }
  gmtkStatus_t mask(const gmtkStepArgs_t& args) {
    return gmtkMaskGradients(plan_, &args, ws(), workspace_.size(), nullptr);
  }

 private:
  void* ws() { return workspace_.empty() ? nullptr : workspace_.data(); }
  gmtkPlan_t plan_ = nullptr;
  std::vector<unsigned char> workspace_;
};

inline gmtkGroupConfig_t group_config(gmtkOptimizer_t optimizer, double ratio = 0.0,
                                      gmtkScope_t scope = GMTK_SCOPE_PER_TENSOR,
                                      gmtkMaskMode_t mode = GMTK_MASK_GRAD) {
  gmtkGroupConfig_t config;
  GMTK_REQUIRE_OK(gmtkGroupConfigInit(&config, optimizer));
  config.mask_ratio = ratio;
  config.scope = scope;
  config.mask_mode = mode;
  return config;
}

// A parameter tensor with every buffer an optimizer may need, in host memory.
struct TensorData {
  Buffer grad;
  Buffer param;
  std::vector<float> master, exp_avg, exp_avg_sq, max_exp_avg_sq;
  bool with_master = false;

  TensorData(size_t n, gmtkDtype_t grad_dtype, gmtkDtype_t param_dtype, bool master_weights = false)
      : grad(grad_dtype, n),
        param(param_dtype, n),
        master(master_weights ? n : 0),
        exp_avg(n, 0.0f),
        exp_avg_sq(n, 0.0f),
        max_exp_avg_sq(n, 0.0f),
        with_master(master_weights) {}

  gmtkTensor_t describe(int32_t group) {
    gmtkTensor_t tensor{};
    tensor.group = group;
    tensor.numel = static_cast<int64_t>(grad.size());
    tensor.grad_dtype = grad.dtype;
    tensor.grad = grad.data();
    tensor.param_dtype = param.dtype;
    tensor.param = param.data();
    tensor.master_param = with_master && !master.empty() ? master.data() : nullptr;
    tensor.exp_avg = exp_avg.empty() ? nullptr : exp_avg.data();
    tensor.exp_avg_sq = exp_avg_sq.empty() ? nullptr : exp_avg_sq.data();
    tensor.max_exp_avg_sq = max_exp_avg_sq.empty() ? nullptr : max_exp_avg_sq.data();
    return tensor;
  }

  // Parameter values in fp32: the master weights when present.
  float param_value(size_t i) const { return with_master ? master[i] : param.get(i); }
};

// |a - b| <= rel * |b| + abs
inline bool close(double actual, double expected, double rel, double abs) {
  return std::fabs(actual - expected) <= rel * std::fabs(expected) + abs;
}

}  // namespace gmtk_test
