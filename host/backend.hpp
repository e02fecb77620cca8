// The layer between the C API (api.cpp) and the two backends: what a handle and
// a plan hold, and the interface each backend implements.
#pragma once

#include <gmtk/gmtk.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace gmtk {

struct Plan;

enum class Operation { select_thresholds, mask_gradients, step };

// One validated call: the caller's arguments plus the workspace to use
// (the caller's, or the plan's own).
struct Call {
  Operation operation;
  gmtkStepArgs_t args;
  void* workspace;
  size_t workspace_bytes;
  gmtkStream_t stream;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual gmtkBackend_t kind() const = 0;
  // Checks that every buffer of a plan is memory this backend can reach.
  virtual gmtkStatus_t check_plan_buffers(const Plan& plan) = 0;
  // Checks that the call's scalar inputs and outputs are memory this backend can reach.
  virtual gmtkStatus_t check_call_buffers(const Plan& plan, const Call& call) = 0;
  virtual gmtkStatus_t workspace_size(const Plan& plan, size_t* bytes) = 0;
  virtual gmtkStatus_t allocate_workspace(size_t bytes, void** workspace) = 0;
  virtual void free_workspace(void* workspace) = 0;
  virtual gmtkStatus_t run(const Plan& plan, const Call& call) = 0;
};

gmtkStatus_t make_cpu_reference_backend(std::unique_ptr<Backend>* backend);
gmtkStatus_t make_cuda_backend(int device, std::unique_ptr<Backend>* backend);

}  // namespace gmtk

struct gmtkHandle {
  std::unique_ptr<gmtk::Backend> backend;
};
