// What the fused update knows of a plan and of a call, beside the selection
// engine's tables (selection_plan.hpp): a per-tensor table of the parameter
// and state buffers (uploaded once at gmtkPlanCreate), and the per-call
// launch parameters (the groups' settings by value, the step index source).
// Plain C++: the CUDA backend uploads the table, tests/host_schedule/ runs the
// same update over it on the host.
#pragma once

#include <gmtk/gmtk.h>

#include <cstdint>
#include <vector>

#include "selection_plan.hpp"
#include "step_logic.hpp"

namespace gmtk::kernels {

struct StepTensorRecord {
  uint64_t param;
  uint64_t master;          // 0: none
  uint64_t exp_avg;         // 0: none (SGD without momentum)
  uint64_t exp_avg_sq;      // 0: none
  uint64_t max_exp_avg_sq;  // 0: none
  uint32_t param_dtype;     // GradDtype's values
  uint32_t vector_phase;    // where every buffer starts a 4-entry vector (kScalarOnly: nowhere common)
};

// One record per tensor of the plan, in plan order.
std::vector<StepTensorRecord> build_step_tensors(const std::vector<gmtkTensor_t>& tensors);

// The update's parameters, by value in its launch (with SelectionLaunch's):
// a captured graph keeps the settings it was captured with, and reads lr_device
// and step_count when it replays.
struct StepLaunch {
  const StepTensorRecord* tensors;
  const int64_t* step_count;  // NULL: `step` is the index of this update
  int64_t step;
  StepGroup groups[kMaxGroupsOnCuda];
};

// The group's settings as the update reads them.
StepGroup step_group(const gmtkGroupConfig_t& group);

// Fills the per-call fields of `launch` (the table pointer stays). The
// selection part of a step is bind_call(..., EngineCall::step, ...).
void bind_step_call(const std::vector<gmtkGroupConfig_t>& groups, const gmtkStepArgs_t& args, StepLaunch* launch);

}  // namespace gmtk::kernels
