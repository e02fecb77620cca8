// What the CUDA backend and the NCCL communicator share: a failed CUDA call as
// a gmtk status, and the guard that leaves the caller's current device as it
// was.
#pragma once

#include <cuda_runtime_api.h>

#include <gmtk/gmtk.h>

#include "../status.hpp"

namespace gmtk {

inline gmtkStatus_t cuda_failure(const char* what, cudaError_t error) {
  cudaGetLastError();  // the failed call's error must not stay behind for the caller's next CUDA call
  return fail(error == cudaErrorMemoryAllocation ? GMTK_ERROR_OUT_OF_MEMORY : GMTK_ERROR_CUDA, "%s failed: %s",
              what, cudaGetErrorString(error));
}

// That CUDA is usable and `device` (the argument `name`) is one of its
// devices: DEVICE_UNAVAILABLE without a device, INVALID_ARGUMENT past the last.
inline gmtkStatus_t check_device_exists(int device, const char* name) {
  int count = 0;
  const cudaError_t count_error = cudaGetDeviceCount(&count);
  if (count_error != cudaSuccess) {
    cudaGetLastError();
    return fail(GMTK_ERROR_DEVICE_UNAVAILABLE, "no usable CUDA device: cudaGetDeviceCount failed: %s",
                cudaGetErrorString(count_error));
  }
  if (count == 0) return fail(GMTK_ERROR_DEVICE_UNAVAILABLE, "no usable CUDA device: cudaGetDeviceCount found none");
  GMTK_REQUIRE(device < count, "%s is %d; this machine has %d CUDA device(s)", name, device, count);
  return GMTK_SUCCESS;
}

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

}  // namespace gmtk
