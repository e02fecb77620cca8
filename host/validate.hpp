// Argument validation shared by both backends. Every check runs before
// anything is written, and every failure names the argument.
#pragma once

#include "backend.hpp"
#include "plan.hpp"

namespace gmtk {

gmtkStatus_t validate_handle_config(const gmtkHandleConfig_t* config);

// `name` is how the message refers to the group, e.g. "groups[2]" or "config".
gmtkStatus_t validate_group_config(const gmtkGroupConfig_t& group, const char* name);

// Checks everything in a plan config that does not depend on the backend and
// fills `plan` (groups, tensors, indexes, sorted buffers).
gmtkStatus_t build_plan(const gmtkPlanConfig_t* config, Plan* plan);

// The communicator a plan config names: read only from a config whose
// struct_size has the field (a 0.1.0 caller's does not), else NULL.
inline gmtkComm_t plan_config_comm(const gmtkPlanConfig_t* config) {
  return config != nullptr && config->struct_size == sizeof(gmtkPlanConfig_t) ? config->comm : nullptr;
}

// The groups' lr_device scalars, sorted by address (identical or disjoint),
// with capacity reserved for one per group (Plan::sorted_scalars).
gmtkStatus_t group_scalar_ranges(const std::vector<gmtkGroupConfig_t>& groups, std::vector<BufferRange>* ranges);

// Checks a schedule change of group `index`: only schedule fields may change.
// Gives the buffer the change brings in (its lr_device; *new_buffer_count is
// 0 or 1), for the backend's reachability check.
gmtkStatus_t validate_group_change(const Plan& plan, int32_t index, const gmtkGroupConfig_t* config,
                                   BufferRange* new_buffer, size_t* new_buffer_count);

// After plan->groups[index] has changed: puts its lr_device in
// plan->sorted_scalars, in place (no allocation, no failure).
void update_group_scalar(Plan* plan, int32_t index);

// Checks a call's arguments against the plan, except the workspace size,
// which the backend decides; fills `call`, its buffers included. Allocates
// nothing.
gmtkStatus_t validate_call_arguments(const Plan& plan, Operation operation, const gmtkStepArgs_t* args,
                                     void* workspace, size_t workspace_bytes, gmtkStream_t stream, Call* call);

// For gmtkStep: every tensor has the parameter and state buffers its group's
// optimizer needs (they may change with momentum, so this is checked per step).
gmtkStatus_t check_step_buffers(const Plan& plan);

// The same check without a message: kept in Plan::step_buffers_complete at
// plan creation and on each schedule change, so that a step does not walk
// every tensor again (host time per call, docs/performance.md).
bool step_buffers_complete(const Plan& plan);

}  // namespace gmtk
