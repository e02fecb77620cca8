// The CUDA backend: device checks, pointer checks and workspace allocation.
// The selection and update kernels are the next milestones (docs/design.md);
// until they land, workspace queries and calls return GMTK_ERROR_NOT_SUPPORTED
// rather than pretending.
#include <cuda_runtime_api.h>


#include "../../kernels/arch_probe.hpp"
#include "../backend.hpp"
#include "../plan.hpp"
#include "../status.hpp"

#ifndef GMTK_CUDA_ARCHITECTURES
#define GMTK_CUDA_ARCHITECTURES "unknown"
#endif

namespace gmtk {
namespace {

constexpr const char* kKernelsMissing =
    "the CUDA backend's selection and update kernels are not implemented yet in this version of gmtk; "
    "use GMTK_BACKEND_CPU_REFERENCE (docs/api.md, 'Status of the backends')";

// Restores the caller's current device on scope exit: gmtk never leaves it changed.
class CurrentDeviceGuard {
 public:
  explicit CurrentDeviceGuard(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device) {
      restore_ = cudaSetDevice(device) == cudaSuccess;
    }
  }
  ~CurrentDeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  CurrentDeviceGuard(const CurrentDeviceGuard&) = delete;
  CurrentDeviceGuard& operator=(const CurrentDeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}

  gmtkBackend_t kind() const override { return GMTK_BACKEND_CUDA; }

  // Both ends of each range must be device (or managed) memory of this
  // handle's device: a buffer that starts in one allocation and runs past it
  // is caught at its last byte.
  gmtkStatus_t check_reachable(const std::vector<BufferRange>& ranges) override {
    for (const BufferRange& range : ranges) {
      for (const uintptr_t address : {range.begin, range.end - 1}) GMTK_CHECK(check_device_address(range, address));
    }
    return GMTK_SUCCESS;
  }

  gmtkStatus_t workspace_size(const Plan&, size_t*) override { return fail(GMTK_ERROR_NOT_SUPPORTED, "%s", kKernelsMissing); }

  gmtkStatus_t allocate_workspace(size_t bytes, void** workspace) override {
    CurrentDeviceGuard guard(device_);
    const cudaError_t error = cudaMalloc(workspace, bytes);
    if (error != cudaSuccess) {
      return fail(error == cudaErrorMemoryAllocation ? GMTK_ERROR_OUT_OF_MEMORY : GMTK_ERROR_CUDA,
                  "cudaMalloc of %zu bytes of workspace on device %d failed: %s", bytes, device_,
                  cudaGetErrorString(error));
    }
    return GMTK_SUCCESS;
  }

  void free_workspace(void* workspace) override {
    CurrentDeviceGuard guard(device_);
    cudaFree(workspace);
  }

  gmtkStatus_t run(const Plan&, const Call&) override { return fail(GMTK_ERROR_NOT_SUPPORTED, "%s", kKernelsMissing); }

 private:
  gmtkStatus_t check_device_address(const BufferRange& range, uintptr_t address) {
    const void* pointer = reinterpret_cast<const void*>(address);
    cudaPointerAttributes attributes{};
    const cudaError_t error = cudaPointerGetAttributes(&attributes, pointer);
    if (error != cudaSuccess) {
      cudaGetLastError();  // the query's error must not leak into the caller's next CUDA call
      return fail(GMTK_ERROR_INVALID_ARGUMENT, "%s (%p): cudaPointerGetAttributes failed: %s", name_of(range).text,
                  pointer, cudaGetErrorString(error));
    }
    const bool on_device = attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
    GMTK_REQUIRE(on_device, "%s (%p) is %s memory; the CUDA backend needs device memory of device %d",
                 name_of(range).text, pointer,
                 attributes.type == cudaMemoryTypeHost ? "pinned host" : "unregistered host", device_);
    GMTK_REQUIRE(attributes.type == cudaMemoryTypeManaged || attributes.device == device_,
                 "%s (%p) is memory of device %d; this handle runs on device %d", name_of(range).text, pointer,
                 attributes.device, device_);
    return GMTK_SUCCESS;
  }

  int device_;
};

}  // namespace

gmtkStatus_t make_cuda_backend(int device, std::shared_ptr<Backend>* backend) {
  int count = 0;
  const cudaError_t count_error = cudaGetDeviceCount(&count);
  if (count_error != cudaSuccess) {
    cudaGetLastError();
    return fail(GMTK_ERROR_DEVICE_UNAVAILABLE, "no usable CUDA device: cudaGetDeviceCount failed: %s",
                cudaGetErrorString(count_error));
  }
  if (count == 0) return fail(GMTK_ERROR_DEVICE_UNAVAILABLE, "no usable CUDA device: cudaGetDeviceCount found none");
  GMTK_REQUIRE(device < count, "config->device is %d; this machine has %d CUDA device(s)", device, count);

  CurrentDeviceGuard guard(device);
  cudaDeviceProp properties{};
  const cudaError_t properties_error = cudaGetDeviceProperties(&properties, device);
  if (properties_error != cudaSuccess) {
    cudaGetLastError();
    return fail(GMTK_ERROR_CUDA, "cudaGetDeviceProperties(%d) failed: %s", device,
                cudaGetErrorString(properties_error));
  }
  cudaFuncAttributes attributes{};
  const cudaError_t probe_error = kernels::arch_probe_attributes(&attributes);
  if (probe_error != cudaSuccess) {
    cudaGetLastError();
    return fail(GMTK_ERROR_DEVICE_UNAVAILABLE,
                "device %d (%s) is sm_%d%d, and this build of gmtk has no code it can run (built for CUDA "
                "architectures %s): %s",
                device, properties.name, properties.major, properties.minor, GMTK_CUDA_ARCHITECTURES,
                cudaGetErrorString(probe_error));
  }
  *backend = std::make_shared<CudaBackend>(device);
  return GMTK_SUCCESS;
}

}  // namespace gmtk
