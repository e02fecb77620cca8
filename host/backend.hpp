// The layer between the C API (api.cpp) and the two backends: what a handle
// holds, what a validated call carries, and the interface each backend
// implements.
#pragma once

#include <gmtk/gmtk.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace gmtk {

struct Plan;

// A caller buffer as an address interval, for overlap and reachability checks
// and for messages.
struct BufferRange {
  enum class Owner : uint8_t { tensor, group, call };
  uintptr_t begin;
  uintptr_t end;
  Owner owner;
  int64_t index;      // of the tensor or group; unused for call buffers
  const char* field;  // "grad", "lr_device", "args->thresholds", ...
};

// How messages name a buffer: "tensors[3].grad", "groups[1].lr_device", "args->thresholds".
struct BufferName {
  char text[64];
};
BufferName name_of(const BufferRange& range);

enum class Operation { select_thresholds, mask_gradients, step };

// A call's own buffers are at most thresholds, kept_counts, found_inf,
// step_count, workspace, mask_bits (written), inv_loss_scale,
// given_thresholds and given_mask_bits (read).
constexpr size_t kMaxCallBuffers = 9;

// One validated call: the caller's arguments, the workspace to use (the
// caller's, or the plan's own), and the call's own buffers (outputs, counter,
// scale, workspace) in a fixed array, so that a call allocates nothing.
struct Call {
  Operation operation;
  gmtkStepArgs_t args;
  void* workspace;
  size_t workspace_bytes;
  gmtkStream_t stream;
  BufferRange buffers[kMaxCallBuffers];
  size_t buffer_count;
};

// What a backend keeps for a plan beyond the validated configs (the CUDA
// backend's device tables). Destroyed with the plan.
class BackendPlanState {
 public:
  virtual ~BackendPlanState() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual gmtkBackend_t kind() const = 0;
  // The CUDA device a CUDA backend runs on; -1 for the CPU reference.
  virtual int device() const { return -1; }
  // Builds the backend's state of a validated plan (once, at gmtkPlanCreate).
  virtual gmtkStatus_t prepare_plan(Plan& plan) = 0;
  // Checks that each of the `count` ranges is memory this backend can reach.
  // Called wherever a pointer enters: plan creation, schedule changes, each
  // call (where it must not allocate).
  virtual gmtkStatus_t check_reachable(const BufferRange* ranges, size_t count) = 0;
  virtual gmtkStatus_t workspace_size(const Plan& plan, size_t* bytes) = 0;
  virtual gmtkStatus_t allocate_workspace(size_t bytes, void** workspace) = 0;
  virtual void free_workspace(void* workspace) = 0;
  virtual gmtkStatus_t run(const Plan& plan, const Call& call) = 0;
  // After a call failed: whether the failure left the device unusable (a
  // sticky CUDA error). The CPU reference backend never is.
  virtual bool context_lost() const { return false; }
};

gmtkStatus_t make_cpu_reference_backend(std::shared_ptr<Backend>* backend);
gmtkStatus_t make_cuda_backend(int device, std::shared_ptr<Backend>* backend);

}  // namespace gmtk

// Plans share the backend, so a handle and its plans may be destroyed in any order.
struct gmtkHandle {
  std::shared_ptr<gmtk::Backend> backend;
};
