// Host-side entry to kernels/selection_kernels.cu.
#pragma once

#include <cuda_runtime_api.h>

#include "selection_plan.hpp"

namespace gmtk::kernels {

// Resident blocks of each persistent kernel on the whole device.
struct SelectionOccupancy {
  int multiprocessors = 0;
  int sample_pass = 0;
  int pass_a = 0;
  int level_pass = 0;
  int apply = 0;
  int update = 0;  // gmtkStep's fused update (step_kernels.cu)
};

// Measures the persistent kernels' occupancy. Once per device (current), before any launch.
cudaError_t configure_selection_kernels(int device, SelectionOccupancy* occupancy);

// A sharded plan's exchanges between launches (selection_plan.hpp's
// ExchangePoint): `sum` queues on the stream the ranks' sum of the counters
// the point names (the CUDA backend calls NCCL there). Null without a
// communicator.
struct ExchangeHook {
  cudaError_t (*sum)(void* context, ExchangePoint point, cudaStream_t stream);
  void* context;
};

// Enqueues a call's selection on `stream`, in schedule order: the memset of
// the workspace's zeroed part, then the passes the schedule names, up to the
// mask / count pass, with the schedule's exchanges between them. Never
// synchronizes, never allocates.
cudaError_t launch_selection_passes(const SelectionLaunch& launch, const SelectionSchedule& schedule, void* zeroed,
                                    size_t zeroed_bytes, const SelectionOccupancy& occupancy, cudaStream_t stream,
                                    const ExchangeHook* exchange = nullptr);

// gmtkStep, after the update: the last level of the sets whose boundary bin
// the update deferred, over the deferred entries' keys, and its scan.
cudaError_t launch_deferred_level(const SelectionLaunch& launch, const SelectionOccupancy& occupancy,
                                  cudaStream_t stream, const ExchangeHook* exchange = nullptr);

// Enqueues the call's last launch: thresholds, kept counts, found_inf, and
// gmtkStep's step_count. A step's update goes between the two.
cudaError_t launch_selection_outputs(const SelectionLaunch& launch, const SelectionOccupancy& occupancy,
                                     cudaStream_t stream);

}  // namespace gmtk::kernels
