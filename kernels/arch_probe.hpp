// Host-side entry to kernels/arch_probe.cu.
#pragma once

#include <cuda_runtime_api.h>

namespace gmtk::kernels {

// Attributes of an empty kernel compiled like every gmtk kernel: fails with
// cudaErrorNoKernelImageForDevice (or InvalidDeviceFunction) when this build
// carries no code the current device can run.
cudaError_t arch_probe_attributes(cudaFuncAttributes* attributes);

}  // namespace gmtk::kernels
