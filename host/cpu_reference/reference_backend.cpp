// The CPU reference backend: the oracle for the CUDA kernels' tests, and a way
// to run without a GPU. Written for clarity: one pass for the non-finite check,
// a few radix-select passes per threshold, one pass for the update. Synchronous;
// the stream argument is ignored.
#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "../backend.hpp"
#include "../comm.hpp"
#include "../plan.hpp"
#include "../shards.hpp"
#include "../status.hpp"
#include "../workspace.hpp"
#include "dtypes.hpp"
#include "optimizer_math.hpp"
#include "selection.hpp"

namespace gmtk::reference {
namespace {

struct WorkspaceOffsets {
  size_t histogram;
  size_t rules;
  size_t decisions;
  size_t kept_counts;
  size_t required_bytes;
};

WorkspaceOffsets workspace_offsets(const Plan& plan) {
  WorkspaceLayout layout;
  WorkspaceOffsets offsets{};
  offsets.histogram = layout.reserve(kHistogramBins * sizeof(uint64_t));
  offsets.rules = layout.reserve(plan.tensors.size() * sizeof(KeepRule));
  offsets.decisions = layout.reserve(plan.tensors.size() * sizeof(KeepDecision));
  // Kept counts, and one word more for found_inf: summed over the ranks together.
  offsets.kept_counts = layout.reserve((plan.tensors.size() + 1) * sizeof(uint64_t));
  offsets.required_bytes = layout.required_bytes();
  return offsets;
}

// What a tensor is selected on: its score if it has one, else its gradient.
GradientSpan span_of(const gmtkTensor_t& tensor) {
  return tensor.score != nullptr ? GradientSpan{tensor.score_dtype, tensor.score, static_cast<uint64_t>(tensor.numel)}
                                 : GradientSpan{tensor.grad_dtype, tensor.grad, static_cast<uint64_t>(tensor.numel)};
}

// The selection key of entry i: of the score, else of the gradient.
uint32_t selection_key(const GradientSpan& span, uint64_t i) {
  return with_storage_type(span.dtype, [&](auto type) {
    using T = decltype(type);
    return magnitude_key(static_cast<const T*>(span.data)[i]);
  });
}

template <typename GradT>
float unscaled(GradT stored, const float* inv_loss_scale) {
  const float grad = to_float(stored);
  return inv_loss_scale != nullptr ? grad * *inv_loss_scale : grad;
}

bool has_non_finite_gradient(const gmtkTensor_t& tensor, const float* inv_loss_scale) {
  return with_storage_type(tensor.grad_dtype, [&](auto type) {
    using GradT = decltype(type);
    const auto* grad = static_cast<const GradT*>(tensor.grad);
    for (int64_t i = 0; i < tensor.numel; ++i) {
      if (!std::isfinite(unscaled(grad[i], inv_loss_scale))) return true;
    }
    return false;
  });
}

// What the reference backend keeps for a plan: the gradient spans of every
// group's tensors, group after group, built once at plan creation so that a
// call allocates nothing. Group g's spans are spans[first[g]] to
// spans[first[g + 1]], in the order of plan.tensors_of_group[g].
struct ReferencePlanState final : BackendPlanState {
  std::vector<GradientSpan> spans;
  std::vector<size_t> first;
};

const ReferencePlanState& state_of(const Plan& plan) {
  return static_cast<const ReferencePlanState&>(*plan.backend_state);
}

// The rule of a set: over this rank's spans alone, or, for shards, over the
// logical tensors' entries on every rank.
KeepRule set_rule(const Plan& plan, const GradientSpan* spans, const int64_t* members, size_t count,
                  double mask_ratio, uint64_t* histogram, gmtkStatus_t* status) {
  if (!is_shard(plan.tensors[members[0]])) return select_keep_rule(spans, count, mask_ratio, histogram);
  uint64_t total = 0;
  for (size_t m = 0; m < count; ++m) total += logical_numel(plan.tensors[members[m]]);
  return select_sharded_keep_rule(spans, count, mask_ratio, total, *plan.comm, histogram, status);
}

// One rule per tensor: its own (per-tensor scope) or its group's (global
// scope). A failed collective is recorded in *status.
void select_rules(const Plan& plan, uint64_t* histogram, KeepRule* rules, gmtkStatus_t* status) {
  const ReferencePlanState& state = state_of(plan);
  for (size_t g = 0; g < plan.groups.size(); ++g) {
    const std::vector<int64_t>& members = plan.tensors_of_group[g];
    const double mask_ratio = plan.groups[g].mask_ratio;
    const GradientSpan* spans = state.spans.data() + state.first[g];
    if (plan.groups[g].scope == GMTK_SCOPE_GLOBAL) {
      if (members.empty()) continue;
      const KeepRule rule = set_rule(plan, spans, members.data(), members.size(), mask_ratio, histogram, status);
      for (int64_t t : members) rules[t] = rule;
    } else {
      for (size_t m = 0; m < members.size(); ++m) {
        rules[members[m]] = set_rule(plan, &spans[m], &members[m], 1, mask_ratio, histogram, status);
      }
    }
  }
}

// Kept counts of every tensor in counts[0..n) and the found_inf flag in
// counts[n]. With a communicator they are summed over the ranks: a shard's
// count becomes its logical tensor's, found_inf the OR of the ranks'; a
// replica is counted by rank 0 alone, as every rank holds the same entries.
gmtkStatus_t count_kept_and_found_inf(const Plan& plan, const KeepDecision* decisions, bool found_inf, bool counts_wanted,
                                      uint64_t* counts) {
  const size_t n = plan.tensors.size();
  const bool counts_replicas = plan.comm == nullptr || plan.comm->rank() == 0;
  // Every rank of a sharded plan counts, whatever its own arguments ask: the
  // ranks' collectives must be the same.
  for (size_t t = 0; t < n && (counts_wanted || plan.comm != nullptr); ++t) {
    const gmtkTensor_t& tensor = plan.tensors[t];
    counts[t] = is_shard(tensor) || counts_replicas ? count_kept(span_of(tensor), decisions[t]) : 0;
  }
  counts[n] = found_inf ? 1 : 0;
  return plan.comm != nullptr ? plan.comm->all_reduce_sum(counts, n + 1, nullptr) : GMTK_SUCCESS;
}

// The tensor's kept-mask as bits, word by word (bits past its entries 0).
void write_mask_bits(const gmtkTensor_t& tensor, const KeepDecision& decision, uint32_t* words) {
  const GradientSpan keys = span_of(tensor);
  const auto numel = static_cast<uint64_t>(tensor.numel);
  for (uint64_t w = 0; w < (numel + 31) / 32; ++w) {
    uint32_t word = 0;
    for (uint64_t i = w * 32; i < numel && i < w * 32 + 32; ++i) {
      if (decision.keeps(i, selection_key(keys, i))) word |= 1u << (i % 32);
    }
    words[w] = word;
  }
}

void zero_masked_gradients(const gmtkTensor_t& tensor, const KeepDecision& decision) {
  const GradientSpan keys = span_of(tensor);
  with_storage_type(tensor.grad_dtype, [&](auto type) {
    using GradT = decltype(type);
    auto* grad = static_cast<GradT*>(tensor.grad);
    for (int64_t i = 0; i < tensor.numel; ++i) {
      if (!decision.keeps(static_cast<uint64_t>(i), selection_key(keys, static_cast<uint64_t>(i)))) {
        grad[i] = from_float<GradT>(0.0f);
      }
    }
  });
}

// Walks one tensor: decides each entry (kept, masked to a zero gradient, or
// frozen), loads the fp32 parameter (master if present), lets `update_entry`
// change it with the optimizer's state, and stores master and parameter.
template <typename GradT, typename ParamT, typename EntryUpdate>
void update_tensor(const gmtkTensor_t& tensor, const KeepDecision& decision, bool freeze, const float* inv_loss_scale,
                   EntryUpdate&& update_entry) {
  const GradientSpan keys = span_of(tensor);
  const auto* grad = static_cast<const GradT*>(tensor.grad);
  auto* param = static_cast<ParamT*>(tensor.param);
  float* master = tensor.master_param;
  for (int64_t i = 0; i < tensor.numel; ++i) {
    const bool kept = decision.keeps(static_cast<uint64_t>(i), selection_key(keys, static_cast<uint64_t>(i)));
    if (!kept && freeze) continue;
    const float g = kept ? unscaled(grad[i], inv_loss_scale) : 0.0f;
    float p = master != nullptr ? master[i] : to_float(param[i]);
    update_entry(i, g, p);
    if (master != nullptr) master[i] = p;
    param[i] = from_float<ParamT>(p);
  }
}

template <typename EntryUpdate>
void update_tensor_any_dtype(const gmtkTensor_t& tensor, const KeepDecision& decision, bool freeze,
                             const float* inv_loss_scale,
                             EntryUpdate&& update_entry) {
  with_storage_type(tensor.grad_dtype, [&](auto grad_type) {
    with_storage_type(tensor.param_dtype, [&](auto param_type) {
      update_tensor<decltype(grad_type), decltype(param_type)>(tensor, decision, freeze, inv_loss_scale, update_entry);
    });
  });
}

void apply_optimizer(const gmtkTensor_t& tensor, const gmtkGroupConfig_t& group, const KeepDecision& decision,
                     int64_t step,
                     const float* inv_loss_scale) {
  const double lr = group.lr_device != nullptr ? static_cast<double>(*group.lr_device) : group.lr;
  const bool freeze = group.mask_mode == GMTK_MASK_FREEZE;
  if (group.optimizer == GMTK_OPTIMIZER_SGD) {
    const SgdCoefficients c = sgd_coefficients(group, lr, step);
    float* momentum_buffer = tensor.exp_avg;
    update_tensor_any_dtype(tensor, decision, freeze, inv_loss_scale, [&](int64_t i, float g, float& p) {
      sgd_update_entry(g, p, c.has_momentum ? &momentum_buffer[i] : nullptr, c);
    });
  } else {
    const AdamCoefficients c = adam_coefficients(group, lr, step);
    float* max_exp_avg_sq = group.amsgrad ? tensor.max_exp_avg_sq : nullptr;
    update_tensor_any_dtype(tensor, decision, freeze, inv_loss_scale, [&](int64_t i, float g, float& p) {
      adam_update_entry(g, p, tensor.exp_avg[i], tensor.exp_avg_sq[i],
                        max_exp_avg_sq != nullptr ? &max_exp_avg_sq[i] : nullptr, c);
    });
  }
}

class ReferenceBackend final : public Backend {
 public:
  gmtkBackend_t kind() const override { return GMTK_BACKEND_CPU_REFERENCE; }

  // Host memory cannot be told from a wild pointer without touching it; the
  // contract (docs/api.md) is that the CPU reference backend takes host memory.
  gmtkStatus_t check_reachable(const BufferRange*, size_t) override { return GMTK_SUCCESS; }

  gmtkStatus_t prepare_plan(Plan& plan) override {
    auto state = std::make_unique<ReferencePlanState>();
    state->spans.reserve(plan.tensors.size());
    state->first.reserve(plan.groups.size() + 1);
    for (const std::vector<int64_t>& members : plan.tensors_of_group) {
      state->first.push_back(state->spans.size());
      for (int64_t t : members) state->spans.push_back(span_of(plan.tensors[t]));
    }
    state->first.push_back(state->spans.size());
    plan.backend_state = std::move(state);
    return GMTK_SUCCESS;
  }

  gmtkStatus_t workspace_size(const Plan& plan, size_t* bytes) override {
    *bytes = workspace_offsets(plan).required_bytes;
    return GMTK_SUCCESS;
  }

  gmtkStatus_t allocate_workspace(size_t bytes, void** workspace) override {
    *workspace = ::operator new(bytes, std::nothrow);
    if (*workspace == nullptr) return fail(GMTK_ERROR_OUT_OF_MEMORY, "allocating %zu bytes of workspace failed", bytes);
    return GMTK_SUCCESS;
  }

  void free_workspace(void* workspace) override { ::operator delete(workspace); }

  gmtkStatus_t run(const Plan& plan, const Call& call) override {
    const gmtkStepArgs_t& args = call.args;
    const WorkspaceOffsets offsets = workspace_offsets(plan);
    unsigned char* base = WorkspaceLayout::aligned_base(call.workspace);
    auto* histogram = reinterpret_cast<uint64_t*>(base + offsets.histogram);
    auto* rules = reinterpret_cast<KeepRule*>(base + offsets.rules);

    // Data parallel: the replicas' gradients become the ranks' sum or mean first.
    if (plan.comm != nullptr) GMTK_CHECK(reduce_replica_gradients(plan, args.gradient_reduction, call.stream));

    bool found_inf = false;
    for (const gmtkTensor_t& tensor : plan.tensors) {
      if (has_non_finite_gradient(tensor, args.inv_loss_scale)) {
        found_inf = true;
        break;
      }
    }
    // How each tensor's entries are decided: a given bitmap, a given
    // threshold, or the selection. The ranks of a sharded plan agreed on
    // this call (agree_on_call); a collective can still fail when they
    // interleave calls on several plans of one communicator: nothing is
    // written then.
    auto* decisions = reinterpret_cast<KeepDecision*>(base + offsets.decisions);
    gmtkStatus_t collective = GMTK_SUCCESS;
    if (args.given_mask_bits == nullptr && args.given_thresholds == nullptr) {
      select_rules(plan, histogram, rules, &collective);
    }
    for (size_t t = 0; t < plan.tensors.size(); ++t) {
      if (args.given_mask_bits != nullptr) {
        decisions[t] = KeepDecision{kKeepAll, args.given_mask_bits + plan.mask_word_offsets[t]};
      } else if (args.given_thresholds != nullptr) {
        decisions[t] = KeepDecision{rule_of_threshold(selection_dtype(plan.tensors[t]), args.given_thresholds[t]), nullptr};
      } else {
        decisions[t] = KeepDecision{rules[t], nullptr};
      }
    }
    auto* counts = reinterpret_cast<uint64_t*>(base + offsets.kept_counts);
    const gmtkStatus_t counted =
        count_kept_and_found_inf(plan, decisions, found_inf, args.kept_counts != nullptr, counts);
    if (collective != GMTK_SUCCESS) return collective;
    if (counted != GMTK_SUCCESS) return counted;
    found_inf = counts[plan.tensors.size()] != 0;

    for (size_t t = 0; t < plan.tensors.size(); ++t) {
      const gmtkTensor_t& tensor = plan.tensors[t];
      if (args.thresholds != nullptr) {  // a given bitmap has no threshold: NaN
        args.thresholds[t] = args.given_mask_bits != nullptr ? std::numeric_limits<float>::quiet_NaN()
                                                             : threshold_value(selection_dtype(tensor), decisions[t].rule);
      }
      if (args.kept_counts != nullptr) args.kept_counts[t] = static_cast<int64_t>(counts[t]);
      if (args.mask_bits != nullptr) write_mask_bits(tensor, decisions[t], args.mask_bits + plan.mask_word_offsets[t]);
    }
    if (args.found_inf != nullptr) *args.found_inf = found_inf ? 1.0f : 0.0f;
    if (call.operation == Operation::select_thresholds || found_inf) return GMTK_SUCCESS;

    if (call.operation == Operation::mask_gradients) {
      for (size_t t = 0; t < plan.tensors.size(); ++t) zero_masked_gradients(plan.tensors[t], decisions[t]);
      return GMTK_SUCCESS;
    }

    const int64_t step = args.step_count != nullptr ? *args.step_count + 1 : args.step;
    for (size_t t = 0; t < plan.tensors.size(); ++t) {
      const gmtkTensor_t& tensor = plan.tensors[t];
      apply_optimizer(tensor, plan.groups[tensor.group], decisions[t], step, args.inv_loss_scale);
    }
    if (args.step_count != nullptr) *args.step_count = step;
    return GMTK_SUCCESS;
  }
};

}  // namespace
}  // namespace gmtk::reference

namespace gmtk {

gmtkStatus_t make_cpu_reference_backend(std::shared_ptr<Backend>* backend) {
  *backend = std::make_shared<reference::ReferenceBackend>();
  return GMTK_SUCCESS;
}

}  // namespace gmtk
