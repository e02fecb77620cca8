// The decisions and arithmetic of the fused update, as __host__ __device__
// code: the per-call optimizer scalars (from lr_device and step_count, read
// where the step runs, so a captured graph replays them), the per-entry
// AdamW / Adam / SGD in docs/semantics.md's order with every fp32 operation
// rounded to nearest (no FMA contraction on either side), the nearest-even
// 16-bit stores, and how a chunk splits into 4-entry items that every buffer
// of its tensor can load as one vector. kernels/step_kernels.cu adds only
// loads, stores and loops; tests/host_schedule/ runs the same functions on
// the host against the CPU reference backend.
#pragma once

#include <cstdint>

#include "selection_logic.hpp"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace gmtk::kernels {

// ---- fp32 operations, each rounded once ---------------------------------------
// nvcc would contract a * b + c into an FMA; the reference (compiled with
// -ffp-contract=off) rounds the product first. The intrinsics keep the
// device to the reference's rounding.

GMTK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GMTK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GMTK_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
GMTK_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
GMTK_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
// The same roundings with zero operands answered without the division or the
// root: the device's IEEE sequences take a slow path for them, and masked
// entries of a fresh optimizer (m = v = 0) would all take it. Bit-exact:
// 0 / b = 0 with the numerator's sign for b > 0 (inf included), sqrt(+-0) = +-0.
GMTK_HD float div_rn_zero_fast(float a, float b) { return a == 0.0f && b > 0.0f ? a : div_rn(a, b); }
GMTK_HD float sqrt_rn_zero_fast(float a) { return a == 0.0f ? a : sqrt_rn(a); }

GMTK_HD double pow_double(double base, double exponent) {
#if defined(__CUDA_ARCH__)
  return pow(base, exponent);
#else
  return std::pow(base, exponent);
#endif
}
// lr * weight_decay rounded before the subtraction, as on the host: nvcc
// would otherwise fuse 1 - lr * wd into one double FMA.
GMTK_HD double mul_double_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GMTK_HD double sqrt_double(double value) {
#if defined(__CUDA_ARCH__)
  return sqrt(value);
#else
  return std::sqrt(value);
#endif
}

// A parameter of `dtype` from an fp32 value, as raw bits.
GMTK_HD uint32_t float_to_stored_bits(float value, uint32_t dtype) {
  if (dtype == kFloat32) return bits_from_float(value);
  return dtype == kFloat16 ? float_to_float16_bits(value) : float_to_bfloat16_bits(value);
}

// ---- Per-group settings of a call, and the per-step scalars ------------------

enum StepFlags : uint32_t {
  kMaximize = 1u << 0,
  kAmsgrad = 1u << 1,
  kNesterov = 1u << 2,
  kFreeze = 1u << 3,          // masked entries are skipped, not fed a zero gradient
  kHasWeightDecay = 1u << 4,
  kHasMomentum = 1u << 5,
  kDecoupledDecay = 1u << 6,  // AdamW
};

enum StepOptimizer : uint32_t { kAdam = 0, kSgd = 1 };

// A group as the update reads it: fp32 values rounded on the host from the
// group's doubles, and the doubles that combine with lr and t per step.
struct StepGroup {
  uint32_t optimizer;  // StepOptimizer
  uint32_t flags;      // StepFlags
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;
  float weight_decay;
  float momentum;
  float one_minus_dampening;
  double lr;            // used when lr_device is NULL
  double beta1_double;  // for 1 - beta1^t
  double beta2_double;
  double weight_decay_double;  // for 1 - lr * weight_decay
  const float* lr_device;      // read when the step runs
};

// What every entry of a group uses in this step.
struct StepScalars {
  float lr;                     // SGD
  float step_size;              // Adam: lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // Adam: sqrt(1 - beta2^t)
  float decay_factor;           // AdamW: 1 - lr * weight_decay
  bool first_step;              // SGD: the momentum buffer starts as the gradient
};

// docs/semantics.md: computed once in double, then rounded to fp32.
GMTK_HD StepScalars step_scalars(const StepGroup& group, int64_t t) {
  const double lr = group.lr_device != nullptr ? static_cast<double>(*group.lr_device) : group.lr;
  const double step = static_cast<double>(t);
  StepScalars s{};
  s.lr = static_cast<float>(lr);
  s.step_size = static_cast<float>(lr / (1.0 - pow_double(group.beta1_double, step)));
  s.bias_correction2_sqrt = static_cast<float>(sqrt_double(1.0 - pow_double(group.beta2_double, step)));
  s.decay_factor = static_cast<float>(1.0 - mul_double_rn(lr, group.weight_decay_double));
  s.first_step = t == 1;
  return s;
}

// The 1-based index of this update: the device counter's next value, or args.step.
GMTK_HD int64_t step_index(const int64_t* step_count, int64_t step) {
  return step_count != nullptr ? *step_count + 1 : step;
}

// ---- One entry ---------------------------------------------------------------------

// An entry's fp32 values: the parameter (the master weight when there is one)
// and the optimizer state it uses (Adam: m, v, v_max; SGD: the momentum buffer in m).
struct EntryValues {
  float param;
  float exp_avg;
  float exp_avg_sq;
  float max_exp_avg_sq;
};

// docs/semantics.md's per-entry order, term by term.
GMTK_HD void adam_entry(float grad, EntryValues& e, const StepGroup& group, const StepScalars& s) {
  if (group.flags & kMaximize) grad = -grad;
  if (group.flags & kHasWeightDecay) {
    if (group.flags & kDecoupledDecay) {
      e.param = mul_rn(e.param, s.decay_factor);
    } else {
      grad = add_rn(grad, mul_rn(group.weight_decay, e.param));
    }
  }
  e.exp_avg = add_rn(mul_rn(group.beta1, e.exp_avg), mul_rn(group.one_minus_beta1, grad));
  e.exp_avg_sq = add_rn(mul_rn(group.beta2, e.exp_avg_sq), mul_rn(group.one_minus_beta2, mul_rn(grad, grad)));
  float second_moment = e.exp_avg_sq;
  if (group.flags & kAmsgrad) {
    // std::max's rule, NaN included: the first unless it is less than the second.
    e.max_exp_avg_sq = e.max_exp_avg_sq < e.exp_avg_sq ? e.exp_avg_sq : e.max_exp_avg_sq;
    second_moment = e.max_exp_avg_sq;
  }
  const float denom = add_rn(div_rn_zero_fast(sqrt_rn_zero_fast(second_moment), s.bias_correction2_sqrt), group.eps);
  e.param = sub_rn(e.param, div_rn_zero_fast(mul_rn(s.step_size, e.exp_avg), denom));
}

GMTK_HD void sgd_entry(float grad, EntryValues& e, const StepGroup& group, const StepScalars& s) {
  if (group.flags & kMaximize) grad = -grad;
  if (group.flags & kHasWeightDecay) grad = add_rn(grad, mul_rn(group.weight_decay, e.param));
  if (group.flags & kHasMomentum) {
    e.exp_avg = s.first_step ? grad
                             : add_rn(mul_rn(group.momentum, e.exp_avg), mul_rn(group.one_minus_dampening, grad));
    grad = (group.flags & kNesterov) ? add_rn(grad, mul_rn(group.momentum, e.exp_avg)) : e.exp_avg;
  }
  e.param = sub_rn(e.param, mul_rn(s.lr, grad));
}

GMTK_HD void update_entry(float grad, EntryValues& e, const StepGroup& group, const StepScalars& s) {
  if (group.optimizer == kSgd) {
    sgd_entry(grad, e, group, s);
  } else {
    adam_entry(grad, e, group, s);
  }
}

// What the mask makes of one entry: updated with its gradient, updated with
// +0 (mask-grad), left alone (freeze), or deferred (its set's boundary bin is
// settled after the update; the entry is left alone until then).
enum class EntryFate : uint32_t { update, update_with_zero, skip, deferred };

GMTK_HD EntryFate entry_fate(uint32_t key, uint32_t min_kept_key, bool freeze) {
  if (is_kept(key, min_kept_key)) return EntryFate::update;
  return freeze ? EntryFate::skip : EntryFate::update_with_zero;
}

// The same for a set whose boundary bin `range` is deferred: above it kept,
// below it masked, inside it deferred.
GMTK_HD EntryFate deferring_entry_fate(uint32_t key, LevelRange range, bool freeze) {
  const uint32_t bin = range_bin(key, range);
  if (bin == kAboveRange) return EntryFate::update;
  if (bin == kBelowRange) return freeze ? EntryFate::skip : EntryFate::update_with_zero;
  return EntryFate::deferred;
}

// The gradient the optimizer sees: unscaled (one rounded product), or +0.
GMTK_HD float entry_gradient(uint32_t raw, uint32_t dtype, EntryFate fate, bool has_scale, float inv_loss_scale) {
  if (fate != EntryFate::update) return 0.0f;
  const float grad = gradient_to_float(raw, dtype);
  return has_scale ? mul_rn(grad, inv_loss_scale) : grad;
}

// ---- Items: 4 entries that every buffer of the tensor loads as one vector ----

constexpr uint32_t kStepVectorEntries = 4;  // 16 bytes of fp32, 8 bytes of fp16/bf16
constexpr uint32_t kScalarOnly = 0xFFFFFFFFu;

// The entry index modulo 4 at which a buffer of `element_bytes` at `address`
// starts a 4-entry vector (aligned to 4 elements).
GMTK_HD uint32_t vector_phase(uint64_t address, uint32_t element_bytes) {
  const uint64_t element = address / element_bytes;
  return static_cast<uint32_t>((kStepVectorEntries - element % kStepVectorEntries) % kStepVectorEntries);
}

// Entries [begin, end) of a tensor whose buffers all start vectors at entries
// congruent to `phase` mod 4 (kScalarOnly: the buffers disagree, every entry
// is its own item): a scalar head up to the first vector, 4-entry vectors, a
// scalar tail. item_entries() of selection_logic.hpp indexes it.
GMTK_HD VectorSplit split_for_step(uint32_t phase, uint64_t begin, uint64_t end) {
  const uint64_t count = end - begin;
  if (phase == kScalarOnly) return {begin, count, 0, 0, kStepVectorEntries};
  const uint64_t to_vector = (phase + kStepVectorEntries - begin % kStepVectorEntries) % kStepVectorEntries;
  const uint64_t head = to_vector < count ? to_vector : count;
  const uint64_t vectors = (count - head) / kStepVectorEntries;
  return {begin, head, vectors, count - head - vectors * kStepVectorEntries, kStepVectorEntries};
}

}  // namespace gmtk::kernels
