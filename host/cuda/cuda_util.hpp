// What the CUDA backend and the NCCL communicator share: a failed CUDA call as
// a gmtk status, and the guard that leaves the caller's current device as it
// was.
#pragma once

#include <cuda_runtime_api.h>

#include <gmtk/gmtk.h>

#include "../status.hpp"

namespace gmtk {

// Errors after which the CUDA context is lost: every later CUDA call of the
// process fails, so no plan of it is usable again.
inline bool is_sticky(cudaError_t error) {
  switch (error) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorContextIsDestroyed:
      return true;
    default:
      return false;
  }
}

// Whether this thread has seen a sticky CUDA error (in a call of gmtk's, or
// pending from the caller's work). Only ever set: a sticky error is forever.
inline bool& sticky_error_seen() {
  thread_local bool seen = false;
  return seen;
}

// A CUDA call of gmtk's that failed. Only the error the failed call left is
// cleared (a caller's earlier error would have refused the call first:
// refuse_pending_error). The message says whether the plan stays usable.
inline gmtkStatus_t cuda_failure(const char* what, cudaError_t error) {
  // Cleared if it can be: an error that survives the clearing is sticky
  // whether or not the list above knows it.
  cudaGetLastError();
  const bool sticky = is_sticky(error) || cudaPeekAtLastError() != cudaSuccess;
  if (sticky) sticky_error_seen() = true;
  if (error == cudaErrorMemoryAllocation) {
    return fail(GMTK_ERROR_OUT_OF_MEMORY, "%s failed: %s", what, cudaGetErrorString(error));
  }
  return fail(GMTK_ERROR_CUDA, "%s failed: %s%s", what, cudaGetErrorString(error),
              sticky ? " (the CUDA context is lost: no plan of it is usable again; destroy them and the "
                                 "handle)"
                               : " (the plan stays usable)");
}

// gmtk's own CUDA queries could fail and clear the thread's last error: a
// call that finds the caller's earlier CUDA error still pending refuses
// before making any, and leaves that error in place for its owner.
inline gmtkStatus_t refuse_pending_error() {
  const cudaError_t pending = cudaPeekAtLastError();
  if (pending == cudaSuccess) return GMTK_SUCCESS;
  // The caller's error stays: only the list can say whether it is sticky.
  if (is_sticky(pending)) sticky_error_seen() = true;
  return fail(GMTK_ERROR_CUDA, "a CUDA error was pending on this thread before the call (left as it is): %s",
              cudaGetErrorString(pending));
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
