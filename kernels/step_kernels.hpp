// Host-side entry to kernels/step_kernels.cu: gmtkStep's fused update.
#pragma once

#include <cuda_runtime_api.h>

#include "selection_plan.hpp"
#include "step_plan.hpp"

namespace gmtk::kernels {

// Resident blocks of the update on the whole device. Once per device (current).
cudaError_t configure_step_kernels(int multiprocessors, int* update_blocks);

// Enqueues the fused update on `stream`, after the selection launches and
// before the outputs launch (which advances step_count). A no-op on the
// device when selection found a non-finite gradient.
cudaError_t launch_update(const SelectionLaunch& selection, const StepLaunch& step, int update_blocks,
                          cudaStream_t stream);

// Enqueues the settling of the entries the update deferred, after their
// level pass (launch_deferred_level) and before the outputs launch.
cudaError_t launch_finish(const SelectionLaunch& selection, const StepLaunch& step, int update_blocks,
                          cudaStream_t stream);

}  // namespace gmtk::kernels
