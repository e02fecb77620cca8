// A double-precision model of a GMT step, written from SPEC sections 2-4 and
// torch.optim's documented update rules, independently of host/. The tests run
// the library and this model side by side over multi-step sequences.
#pragma once

#include "test_support.hpp"

namespace gmtk_test {

struct ModelEntry {
  double param = 0, exp_avg = 0, exp_avg_sq = 0, max_exp_avg_sq = 0;
};

// torch.optim.Adam / AdamW for one entry, step t (1-based).
inline void model_adam(const gmtkGroupConfig_t& h, double lr, int64_t t, double grad, ModelEntry& e) {
  if (h.maximize) grad = -grad;
  if (h.weight_decay != 0) {
    if (h.optimizer == GMTK_OPTIMIZER_ADAMW) {
      e.param *= 1 - lr * h.weight_decay;
    } else {
      grad += h.weight_decay * e.param;
    }
  }
  e.exp_avg = h.beta1 * e.exp_avg + (1 - h.beta1) * grad;
  e.exp_avg_sq = h.beta2 * e.exp_avg_sq + (1 - h.beta2) * grad * grad;
  double second = e.exp_avg_sq;
  if (h.amsgrad) {
    e.max_exp_avg_sq = std::max(e.max_exp_avg_sq, e.exp_avg_sq);
    second = e.max_exp_avg_sq;
  }
  const double bias_correction1 = 1 - std::pow(h.beta1, static_cast<double>(t));
  const double bias_correction2 = 1 - std::pow(h.beta2, static_cast<double>(t));
  e.param -= lr / bias_correction1 * e.exp_avg / (std::sqrt(second) / std::sqrt(bias_correction2) + h.eps);
}

// torch.optim.SGD for one entry; the momentum buffer starts as the first
// gradient (torch's "buf is None" branch) at t == 1.
inline void model_sgd(const gmtkGroupConfig_t& h, double lr, int64_t t, double grad, ModelEntry& e) {
  if (h.maximize) grad = -grad;
  if (h.weight_decay != 0) grad += h.weight_decay * e.param;
  if (h.momentum != 0) {
    e.exp_avg = t == 1 ? grad : h.momentum * e.exp_avg + (1 - h.dampening) * grad;
    grad = h.nesterov ? grad + h.momentum * e.exp_avg : e.exp_avg;
  }
  e.param -= lr * grad;
}

inline void model_update(const gmtkGroupConfig_t& h, double lr, int64_t t, double grad, ModelEntry& e) {
  if (h.optimizer == GMTK_OPTIMIZER_SGD) {
    model_sgd(h, lr, t, grad, e);
  } else {
    model_adam(h, lr, t, grad, e);
  }
}

// One GMT step of the model over a group's tensors: selection by sorting
// (SPEC 1), then the masked update in the group's mode (SPEC 2). `grads` are
// the stored gradients; `inv_loss_scale` multiplies them (SPEC 4). Returns the
// threshold of each tensor.
inline std::vector<double> model_step(const gmtkGroupConfig_t& h, double lr, int64_t t, const std::vector<const Buffer*>& grads,
                       std::vector<std::vector<ModelEntry>*> entries, double inv_loss_scale = 1.0) {
  std::vector<double> thresholds;
  if (h.scope == GMTK_SCOPE_GLOBAL) {
    thresholds.assign(grads.size(), expected_selection(grads, h.mask_ratio).threshold);
  } else {
    for (const Buffer* g : grads) thresholds.push_back(expected_selection({g}, h.mask_ratio).threshold);
  }
  for (size_t k = 0; k < grads.size(); ++k) {
    for (size_t i = 0; i < grads[k]->size(); ++i) {
      const float stored = grads[k]->get(i);
      const bool kept = is_kept(stored, thresholds[k]);
      if (!kept && h.mask_mode == GMTK_MASK_FREEZE) continue;
      const double grad = kept ? static_cast<double>(stored) * inv_loss_scale : 0.0;
      model_update(h, lr, t, grad, (*entries[k])[i]);
    }
  }
  return thresholds;
}

}  // namespace gmtk_test
