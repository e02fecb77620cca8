// The CUDA backend: device and pointer checks, the plan's device tables, the
// workspace, and the launches of a call: the selection engine
// (kernels/selection_*) and, for gmtkStep, the fused update (kernels/step_*).
#include <cuda_runtime_api.h>

#include <cstdio>
#include <mutex>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../../kernels/arch_probe.hpp"
#include "../../kernels/selection_kernels.hpp"
#include "../../kernels/selection_plan.hpp"
#include "../../kernels/step_kernels.hpp"
#include "../../kernels/step_plan.hpp"
#include "../backend.hpp"
#include "../comm.hpp"
#include "cuda_util.hpp"
#include "../plan.hpp"
#include "../shards.hpp"
#include "../status.hpp"
#include "../workspace.hpp"

#ifndef GMTK_CUDA_ARCHITECTURES
#define GMTK_CUDA_ARCHITECTURES "unknown"
#endif

namespace gmtk {
namespace {

// A sharded call's exchanges (kernels::ExchangeHook): the spans the point
// names, summed over the ranks on the call's stream. A failure keeps the
// communicator's status and message for run() to return.
struct Exchange {
  Communicator* comm;
  const kernels::SelectionTables* tables;
  const kernels::SelectionSchedule* schedule;
  const kernels::SelectionLaunch* launch;
  gmtkStatus_t status;

  static cudaError_t sum(void* context, kernels::ExchangePoint point, cudaStream_t stream) {
    auto& self = *static_cast<Exchange*>(context);
    for (const kernels::ExchangeSpan& span :
         kernels::exchange_spans(*self.tables, *self.schedule, *self.launch, point).span) {
      if (span.count == 0) continue;
      self.status = self.comm->all_reduce_sum(reinterpret_cast<uint64_t*>(span.values), span.count,
                                              reinterpret_cast<gmtkStream_t>(stream));
      if (self.status != GMTK_SUCCESS) return cudaErrorUnknown;
    }
    return cudaSuccess;
  }
};

// Device memory of a plan's tables, freed with it.
class DeviceTables {
 public:
  explicit DeviceTables(int device) : device_(device) {}
  ~DeviceTables() {
    CurrentDeviceGuard guard(device_);
    cudaFree(memory_);
  }
  DeviceTables(const DeviceTables&) = delete;
  DeviceTables& operator=(const DeviceTables&) = delete;

  // Copies the tables to one device allocation; fills the table pointers of `launch`.
  gmtkStatus_t upload(const kernels::SelectionTables& tables, const std::vector<kernels::StepTensorRecord>& step_tensors,
                      kernels::SelectionLaunch* launch, kernels::StepLaunch* step) {
    struct Piece {
      size_t offset;
      const void* data;
      size_t bytes;
    };
    Piece pieces[7];
    size_t piece_count = 0;
    WorkspaceLayout layout;
    const auto place = [&](const auto& table) {
      const size_t bytes = table.size() * sizeof(typename std::decay_t<decltype(table)>::value_type);
      pieces[piece_count] = Piece{layout.reserve(bytes), table.data(), bytes};
      return pieces[piece_count++].offset;
    };
    const size_t tensors = place(tables.tensors);
    const size_t sets = place(tables.sets);
    const size_t members = place(tables.members);
    const size_t chunks = place(tables.chunks);
    const size_t large_sets = place(tables.large_sets);
    const size_t small_sets = place(tables.small_sets);
    const size_t step_records = place(step_tensors);
    const size_t bytes = layout.required_bytes();
    if (bytes == 0) return GMTK_SUCCESS;
    std::vector<unsigned char> image(bytes);
    unsigned char* host_base = WorkspaceLayout::aligned_base(image.data());
    for (size_t i = 0; i < piece_count; ++i) {
      if (pieces[i].bytes != 0) std::memcpy(host_base + pieces[i].offset, pieces[i].data, pieces[i].bytes);
    }

    CurrentDeviceGuard guard(device_);
    cudaError_t error = cudaMalloc(&memory_, bytes);
    if (error != cudaSuccess) return cuda_failure("cudaMalloc of the plan's device tables", error);
    // Offsets are from the aligned base on both sides; the payload is what
    // follows it (the size asked for includes the alignment slack).
    unsigned char* device_base = WorkspaceLayout::aligned_base(memory_);
    const size_t payload = bytes - (WorkspaceLayout::kAlignment - 1);
    error = cudaMemcpy(device_base, host_base, payload, cudaMemcpyHostToDevice);
    if (error != cudaSuccess) return cuda_failure("uploading the plan's device tables", error);
    launch->tensors = reinterpret_cast<const kernels::TensorRecord*>(device_base + tensors);
    launch->sets = reinterpret_cast<const kernels::SetRecord*>(device_base + sets);
    launch->members = reinterpret_cast<const uint32_t*>(device_base + members);
    launch->chunks = reinterpret_cast<const kernels::ChunkRecord*>(device_base + chunks);
    launch->large_sets = reinterpret_cast<const uint32_t*>(device_base + large_sets);
    launch->small_sets = reinterpret_cast<const uint32_t*>(device_base + small_sets);
    step->tensors = reinterpret_cast<const kernels::StepTensorRecord*>(device_base + step_records);
    return GMTK_SUCCESS;
  }

 private:
  int device_;
  void* memory_ = nullptr;
};

// A CUDA plan's state: the host copy of its tables (for the schedule), their
// device copy, the workspace layout and the launch parameters that do not
// change between calls.
struct CudaPlanState final : BackendPlanState {
  explicit CudaPlanState(int device) : device_tables(device) {}
  kernels::SelectionTables tables;
  DeviceTables device_tables;
  kernels::SelectionWorkspace workspace{};
  kernels::SelectionLaunch launch{};
  kernels::StepLaunch step{};  // ~20 KB: the groups' settings travel by value in the update's launch
  std::mutex step_mutex;       // guards `step` while a call binds and launches it
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, const kernels::SelectionOccupancy& occupancy) : device_(device), occupancy_(occupancy) {}

  gmtkBackend_t kind() const override { return GMTK_BACKEND_CUDA; }
  // Not a peek at the last error: a caller's pending error (refused, left in
  // place) is still there, and need not be sticky.
  bool context_lost() const override { return sticky_error_seen(); }
  int device() const override { return device_; }

  // Both ends of each range must be device (or managed) memory of this
  // handle's device: a buffer that starts in one allocation and runs past it
  // is caught at its last byte.
  gmtkStatus_t check_reachable(const BufferRange* ranges, size_t count) override {
    GMTK_CHECK(refuse_pending_error());  // before any query of ours could clear it
    for (const BufferRange* range = ranges; range != ranges + count; ++range) {
      for (const uintptr_t address : {range->begin, range->end - 1}) GMTK_CHECK(check_device_address(*range, address));
    }
    return GMTK_SUCCESS;
  }

  gmtkStatus_t prepare_plan(Plan& plan) override {
    if (plan.groups.size() > static_cast<size_t>(kernels::kMaxGroupsOnCuda)) {
      return fail(GMTK_ERROR_NOT_SUPPORTED, "config->num_groups is %zu; the CUDA backend takes at most %d groups",
                  plan.groups.size(), kernels::kMaxGroupsOnCuda);
    }
    if (plan.tensors.size() > 0x7FFFFFFFu) {
      return fail(GMTK_ERROR_NOT_SUPPORTED, "config->num_tensors is %zu; the CUDA backend takes at most 2^31 - 1",
                  plan.tensors.size());
    }
    auto state = std::make_unique<CudaPlanState>(device_);
    const kernels::SelectionTuning tuning;
    state->tables = kernels::build_selection_tables(plan.groups, plan.tensors, tuning,
                                                    plan.comm != nullptr ? plan.comm->rank() : 0);
    state->workspace = kernels::selection_workspace(state->tables);
    kernels::SelectionLaunch& launch = state->launch;
    kernels::bind_table_sizes(state->tables, &launch);
    GMTK_CHECK(state->device_tables.upload(state->tables, kernels::build_step_tensors(plan.tensors), &launch,
                                           &state->step));
    plan.backend_state = std::move(state);
    return GMTK_SUCCESS;
  }

  gmtkStatus_t workspace_size(const Plan& plan, size_t* bytes) override {
    *bytes = state_of(plan).workspace.required_bytes;
    return GMTK_SUCCESS;
  }

  gmtkStatus_t allocate_workspace(size_t bytes, void** workspace) override {
    CurrentDeviceGuard guard(device_);
    const cudaError_t error = cudaMalloc(workspace, bytes);
    if (error != cudaSuccess) {
      char what[96];
      std::snprintf(what, sizeof(what), "cudaMalloc of %zu bytes of workspace on device %d", bytes, device_);
      return cuda_failure(what, error);
    }
    return GMTK_SUCCESS;
  }

  void free_workspace(void* workspace) override {
    CurrentDeviceGuard guard(device_);
    cudaFree(workspace);
  }

  // Enqueues the call on the caller's stream: no allocation, no host
  // synchronization, a launch count that does not grow with the tensors.
  gmtkStatus_t run(const Plan& plan, const Call& call) override {
    CudaPlanState& state = state_of(plan);
    const kernels::EngineCall engine_call = call.operation == Operation::step ? kernels::EngineCall::step
                                            : call.operation == Operation::mask_gradients
                                                ? kernels::EngineCall::mask_gradients
                                                : kernels::EngineCall::select_thresholds;
    // Per-call fields go into a copy: a plan may serve calls from several threads.
    kernels::SelectionLaunch launch = state.launch;
    unsigned char* base = WorkspaceLayout::aligned_base(call.workspace);
    const kernels::SelectionWorkspace& workspace = state.workspace;
    const kernels::SelectionSchedule schedule =
        kernels::bind_call(state.tables, workspace, base, plan.groups, call.args, engine_call, &launch);

    // An error left by the caller's own earlier work would surface as ours
    // after the launches, and be cleared: refuse before any CUDA call, and
    // leave it for its owner.
    GMTK_CHECK(refuse_pending_error());
    CurrentDeviceGuard guard(device_);
    const auto stream = reinterpret_cast<cudaStream_t>(call.stream);
    // A sharded plan: the communicator sums the counters between launches.
    Exchange exchange{plan.comm.get(), &state.tables, &schedule, &launch, GMTK_SUCCESS};
    const kernels::ExchangeHook hook{&Exchange::sum, &exchange};
    const kernels::ExchangeHook* hook_or_null = plan.comm != nullptr && schedule.exchange ? &hook : nullptr;
    // Data parallel: the replicas' gradients become the ranks' sum or mean first, on the stream.
    if (plan.comm != nullptr) GMTK_CHECK(reduce_replica_gradients(plan, call.args.gradient_reduction, call.stream));
    cudaError_t error = kernels::launch_selection_passes(launch, schedule, base, workspace.zeroed_bytes, occupancy_,
                                                         stream, hook_or_null);
    if (exchange.status != GMTK_SUCCESS) return exchange.status;  // the communicator's message stands
    if (error != cudaSuccess) return cuda_failure("launching the selection kernels", error);
    // `deferred` does not depend on this rank's chunks (a rank holding none
    // still takes part in the deferred level's exchange); `update` does.
    if (schedule.update || schedule.deferred) {
      // The step's settings are bound in the plan's own copy, under a lock:
      // 20 KB is too much to copy onto the stack per call.
      std::lock_guard<std::mutex> lock(state.step_mutex);
      kernels::bind_step_call(plan.groups, call.args, &state.step);
      if (schedule.update) {
        error = kernels::launch_update(launch, state.step, occupancy_.update, stream);
        if (error != cudaSuccess) return cuda_failure("launching the fused update", error);
      }
      if (schedule.deferred) {
        error = kernels::launch_deferred_level(launch, occupancy_, stream, hook_or_null);
        if (error == cudaSuccess) error = kernels::launch_finish(launch, state.step, occupancy_.update, stream);
        if (exchange.status != GMTK_SUCCESS) return exchange.status;
        // The update is queued already: say so rather than pretend nothing changed.
        if (error != cudaSuccess) {
          return cuda_failure(
              "launching the deferred entries' passes (the update of every other entry was already queued: the "
              "step is partly applied and its outputs are not written)",
              error);
        }
      }
    }
    error = kernels::launch_selection_outputs(launch, occupancy_, stream);
    if (error != cudaSuccess) return cuda_failure("launching the outputs kernel", error);
    return GMTK_SUCCESS;
  }

 private:
  static CudaPlanState& state_of(const Plan& plan) { return static_cast<CudaPlanState&>(*plan.backend_state); }

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
  kernels::SelectionOccupancy occupancy_;
};

}  // namespace

gmtkStatus_t make_cuda_backend(int device, std::shared_ptr<Backend>* backend) {
  GMTK_CHECK(check_device_exists(device, "config->device"));
  GMTK_CHECK(refuse_pending_error());

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
  kernels::SelectionOccupancy occupancy;
  const cudaError_t configure_error = kernels::configure_selection_kernels(device, &occupancy);
  if (configure_error != cudaSuccess) return cuda_failure("configuring the selection kernels", configure_error);
  const cudaError_t step_error = kernels::configure_step_kernels(occupancy.multiprocessors, &occupancy.update);
  if (step_error != cudaSuccess) return cuda_failure("configuring the update kernel", step_error);
  *backend = std::make_shared<CudaBackend>(device, occupancy);
  return GMTK_SUCCESS;
}

}  // namespace gmtk
