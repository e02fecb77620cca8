// The per-entry optimizer updates of the CPU reference backend, in fp32, in the
// order docs/semantics.md gives (torch's fused CUDA kernels, term by term).
// Per-step scalars are computed once in double and rounded to fp32.
#pragma once

#include <gmtk/gmtk.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace gmtk::reference {

struct AdamCoefficients {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float step_size;              // lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float eps;
  float weight_decay;           // Adam: L2 coefficient folded into the gradient
  float decay_factor;           // AdamW: 1 - lr * weight_decay
  bool decoupled_weight_decay;
  bool has_weight_decay;
  bool maximize;
};

inline AdamCoefficients adam_coefficients(const gmtkGroupConfig_t& group, double lr, int64_t step) {
  const double t = static_cast<double>(step);
  AdamCoefficients c{};
  c.beta1 = static_cast<float>(group.beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - group.beta1);
  c.beta2 = static_cast<float>(group.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - group.beta2);
  c.step_size = static_cast<float>(lr / (1.0 - std::pow(group.beta1, t)));
  c.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(group.beta2, t)));
  c.eps = static_cast<float>(group.eps);
  c.weight_decay = static_cast<float>(group.weight_decay);
  c.decay_factor = static_cast<float>(1.0 - lr * group.weight_decay);
  c.decoupled_weight_decay = group.optimizer == GMTK_OPTIMIZER_ADAMW;
  c.has_weight_decay = group.weight_decay != 0;
  c.maximize = group.maximize != 0;
  return c;
}

// One entry of Adam / AdamW. `max_exp_avg_sq` is null without amsgrad.
inline void adam_update_entry(float grad, float& param, float& exp_avg, float& exp_avg_sq, float* max_exp_avg_sq,
                              const AdamCoefficients& c) {
  if (c.maximize) grad = -grad;
  if (c.has_weight_decay) {
    if (c.decoupled_weight_decay) {
      param = param * c.decay_factor;
    } else {
      grad = grad + c.weight_decay * param;
    }
  }
  exp_avg = c.beta1 * exp_avg + c.one_minus_beta1 * grad;
  exp_avg_sq = c.beta2 * exp_avg_sq + c.one_minus_beta2 * (grad * grad);
  float second_moment = exp_avg_sq;
  if (max_exp_avg_sq != nullptr) {
    *max_exp_avg_sq = std::max(*max_exp_avg_sq, exp_avg_sq);
    second_moment = *max_exp_avg_sq;
  }
  const float denom = std::sqrt(second_moment) / c.bias_correction2_sqrt + c.eps;
  param = param - (c.step_size * exp_avg) / denom;
}

struct SgdCoefficients {
  float lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  bool has_momentum;
  bool has_weight_decay;
  bool nesterov;
  bool first_step;  // the momentum buffer starts as the first gradient, as in torch
  bool maximize;
};

inline SgdCoefficients sgd_coefficients(const gmtkGroupConfig_t& group, double lr, int64_t step) {
  SgdCoefficients c{};
  c.lr = static_cast<float>(lr);
  c.momentum = static_cast<float>(group.momentum);
  c.one_minus_dampening = static_cast<float>(1.0 - group.dampening);
  c.weight_decay = static_cast<float>(group.weight_decay);
  c.has_momentum = group.momentum != 0;
  c.has_weight_decay = group.weight_decay != 0;
  c.nesterov = group.nesterov != 0;
  c.first_step = step == 1;
  c.maximize = group.maximize != 0;
  return c;
}

// One entry of SGD. `momentum_buffer` is null without momentum.
inline void sgd_update_entry(float grad, float& param, float* momentum_buffer, const SgdCoefficients& c) {
  if (c.maximize) grad = -grad;
  if (c.has_weight_decay) grad = grad + c.weight_decay * param;
  if (c.has_momentum) {
    *momentum_buffer = c.first_step ? grad : c.momentum * *momentum_buffer + c.one_minus_dampening * grad;
    grad = c.nesterov ? grad + c.momentum * *momentum_buffer : *momentum_buffer;
  }
  param = param - c.lr * grad;
}

}  // namespace gmtk::reference
