#include "arch_probe.hpp"

namespace gmtk::kernels {
namespace {
__global__ void arch_probe_kernel() {}
}  // namespace

cudaError_t arch_probe_attributes(cudaFuncAttributes* attributes) {
  return cudaFuncGetAttributes(attributes, arch_probe_kernel);
}

}  // namespace gmtk::kernels
