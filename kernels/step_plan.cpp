#include "step_plan.hpp"

namespace gmtk::kernels {
namespace {

uint64_t address_of(const void* pointer) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(pointer)); }

// The common vector phase of a tensor's buffers, or kScalarOnly when two of
// them start their 4-entry vectors at different entries (a caller's views
// at odd offsets): such a tensor is updated entry by entry.
uint32_t common_vector_phase(const gmtkTensor_t& tensor) {
  const struct {
    const void* pointer;
    uint32_t element_bytes;
  } buffers[] = {
      {tensor.grad, dtype_bytes(static_cast<uint32_t>(tensor.grad_dtype))},
      {tensor.param, dtype_bytes(static_cast<uint32_t>(tensor.param_dtype))},
      {tensor.master_param, 4},
      {tensor.exp_avg, 4},
      {tensor.exp_avg_sq, 4},
      {tensor.max_exp_avg_sq, 4},
      // the update loads its keys too (score_dtype is read only where there is a score)
      {tensor.score, tensor.score != nullptr ? dtype_bytes(static_cast<uint32_t>(tensor.score_dtype)) : 4u},
  };
  uint32_t phase = kScalarOnly;
  for (const auto& buffer : buffers) {
    if (buffer.pointer == nullptr) continue;
    const uint32_t own = vector_phase(address_of(buffer.pointer), buffer.element_bytes);
    if (phase == kScalarOnly) {
      phase = own;
    } else if (phase != own) {
      return kScalarOnly;
    }
  }
  return phase == kScalarOnly ? 0u : phase;
}

}  // namespace

std::vector<StepTensorRecord> build_step_tensors(const std::vector<gmtkTensor_t>& tensors) {
  std::vector<StepTensorRecord> records(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const gmtkTensor_t& tensor = tensors[t];
    records[t] = StepTensorRecord{address_of(tensor.param),
                                  address_of(tensor.master_param),
                                  address_of(tensor.exp_avg),
                                  address_of(tensor.exp_avg_sq),
                                  address_of(tensor.max_exp_avg_sq),
                                  static_cast<uint32_t>(tensor.param_dtype),
                                  common_vector_phase(tensor)};
  }
  return records;
}

StepGroup step_group(const gmtkGroupConfig_t& group) {
  StepGroup g{};
  const bool sgd = group.optimizer == GMTK_OPTIMIZER_SGD;
  g.optimizer = sgd ? kSgd : kAdam;
  g.flags = (group.maximize ? kMaximize : 0u) | (group.mask_mode == GMTK_MASK_FREEZE ? kFreeze : 0u) |
            (group.weight_decay != 0 ? kHasWeightDecay : 0u);
  if (sgd) {
    g.flags |= (group.momentum != 0 ? kHasMomentum : 0u) | (group.nesterov ? kNesterov : 0u);
  } else {
    g.flags |= (group.amsgrad ? kAmsgrad : 0u) | (group.optimizer == GMTK_OPTIMIZER_ADAMW ? kDecoupledDecay : 0u);
  }
  // The same double-to-float roundings as the CPU reference's coefficients.
  g.beta1 = static_cast<float>(group.beta1);
  g.one_minus_beta1 = static_cast<float>(1.0 - group.beta1);
  g.beta2 = static_cast<float>(group.beta2);
  g.one_minus_beta2 = static_cast<float>(1.0 - group.beta2);
  g.eps = static_cast<float>(group.eps);
  g.weight_decay = static_cast<float>(group.weight_decay);
  g.momentum = static_cast<float>(group.momentum);
  g.one_minus_dampening = static_cast<float>(1.0 - group.dampening);
  g.lr = group.lr;
  g.beta1_double = group.beta1;
  g.beta2_double = group.beta2;
  g.weight_decay_double = group.weight_decay;
  g.lr_device = group.lr_device;
  return g;
}

void bind_step_call(const std::vector<gmtkGroupConfig_t>& groups, const gmtkStepArgs_t& args, StepLaunch* launch) {
  launch->step_count = args.step_count;
  launch->step = args.step;
  for (size_t g = 0; g < groups.size(); ++g) launch->groups[g] = step_group(groups[g]);
}

}  // namespace gmtk::kernels
