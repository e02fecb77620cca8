// What the ranks of a sharded plan check together: at gmtkPlanCreate that
// their plans agree and that each logical tensor's shards tile it exactly; at
// every call that they make the same call. A rank whose own checks failed
// still takes part, so that every rank fails together instead of waiting for
// it forever.
#pragma once

#include "backend.hpp"
#include "plan.hpp"

namespace gmtk {

// `plan` is the rank's validated plan, or null when `local_status` says its
// own checks failed (its message is then kept as it is).
// On success, stores the plan's signature in plan->signature for the calls.
gmtkStatus_t agree_on_plan(Communicator& comm, Plan* plan, gmtkStatus_t local_status);

// Before a call on a plan with a communicator runs: the same plan (its
// signature: ranks that call two plans of one communicator in different
// orders are caught), operation and mask ratios on every rank, every rank's
// arguments valid.
// `mask_inputs`: 1 with given thresholds, 2 with a given bitmap, else 0;
// plus 4 when the call writes a bitmap.
gmtkStatus_t agree_on_call(const Plan& plan, Operation operation, gmtkGradientReduction_t gradient_reduction,
                           uint32_t mask_inputs, gmtkStatus_t local_status);

// A call's gradient_reduction: the replica records' gradients summed or
// averaged over the ranks, in place (no-op for GMTK_GRADIENTS_AS_GIVEN).
gmtkStatus_t reduce_replica_gradients(const Plan& plan, gmtkGradientReduction_t reduction, gmtkStream_t stream);

}  // namespace gmtk
