// The C API: argument checks that need no backend, then dispatch. Every entry
// point catches everything, so no exception crosses the C ABI.
#include <gmtk/gmtk.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <memory>
#include <new>
#include <vector>

#include "backend.hpp"
#include "comm.hpp"
#include "plan.hpp"
#include "shards.hpp"
#include "status.hpp"
#include "validate.hpp"

namespace gmtk {
namespace {

template <typename Body>
gmtkStatus_t guarded(Body&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return fail(GMTK_ERROR_OUT_OF_MEMORY, "a host allocation failed");
  } catch (const std::exception& error) {
    return fail(GMTK_ERROR_INTERNAL, "unexpected exception: %s", error.what());
  } catch (...) {
    return fail(GMTK_ERROR_INTERNAL, "unexpected exception");
  }
}

// Everything a call checks before it runs; fills `call`.
gmtkStatus_t check_call(gmtkPlan& plan, Operation operation, const gmtkStepArgs_t* args, void* workspace,
                        size_t workspace_bytes, gmtkStream_t stream, Call* call) {
  GMTK_CHECK(validate_call_arguments(plan, operation, args, workspace, workspace_bytes, stream, call));
  // The walk over every tensor only when the plan's kept answer says a buffer is missing (for the message).
  if (operation == Operation::step && !plan.step_buffers_complete) GMTK_CHECK(check_step_buffers(plan));
  Backend& backend = *plan.backend;
  GMTK_CHECK(backend.check_reachable(call->buffers, call->buffer_count));
  if (plan.owned_workspace != nullptr && workspace == nullptr) {
    call->workspace = plan.owned_workspace;
    call->workspace_bytes = plan.owned_workspace_bytes;
    return GMTK_SUCCESS;
  }
  size_t required = 0;
  GMTK_CHECK(backend.workspace_size(plan, &required));
  if (workspace_bytes < required) {
    return fail(GMTK_ERROR_INSUFFICIENT_WORKSPACE,
                "workspace_bytes is %zu; this plan needs %zu (gmtkPlanGetWorkspaceSize)", workspace_bytes, required);
  }
  return GMTK_SUCCESS;
}

gmtkStatus_t run_operation(gmtkPlan* plan, Operation operation, const gmtkStepArgs_t* args, void* workspace,
                           size_t workspace_bytes, gmtkStream_t stream) {
  GMTK_REQUIRE(plan != nullptr, "plan is NULL");
  if (plan->unusable.load(std::memory_order_acquire)) {
    return fail(GMTK_ERROR_CUDA, "this plan is unusable since an earlier call met a sticky CUDA error: %s",
                plan->unusable_reason);
  }
  Call call{};
  // Guarded here too: a sharded call must reach the agreement below whatever happened.
  gmtkStatus_t status =
      guarded([&] { return check_call(*plan, operation, args, workspace, workspace_bytes, stream, &call); });
  // A sharded plan's call is collective: a rank refused here still meets the
  // others, so that all of them fail instead of waiting for it. (On a device
  // communicator that exchange would cost a host synchronization per call:
  // there, as with NCCL's own calls, the ranks' agreement is the caller's.)
  if (plan->comm != nullptr && !plan->comm->on_device()) {
    const bool valid = status == GMTK_SUCCESS;
    // The kind of input, and whether the bitmap is written (on CUDA it decides the deferral).
    const uint32_t mask_inputs =
        !valid ? 0u
               : (call.args.given_thresholds != nullptr ? 1u : call.args.given_mask_bits != nullptr ? 2u : 0u) |
                     (call.args.mask_bits != nullptr ? 4u : 0u);
    status = agree_on_call(*plan, operation, valid ? call.args.gradient_reduction : GMTK_GRADIENTS_AS_GIVEN,
                           mask_inputs, status);
  }
  if (status == GMTK_SUCCESS) status = plan->backend->run(*plan, call);
  // A sticky CUDA error (met by this call, or found pending by its checks:
  // the context is lost either way) leaves the plan unusable.
  if (status == GMTK_ERROR_CUDA && plan->backend->context_lost() && !plan->unusable.load()) {
    std::snprintf(plan->unusable_reason, sizeof(plan->unusable_reason), "%s", last_error_message());
    plan->unusable.store(true, std::memory_order_release);
  }
  return status;
}

// What gmtkPlanCreate checks and builds on this rank.
gmtkStatus_t create_plan(gmtkHandle_t handle, const gmtkPlanConfig_t* config, gmtkPlan* created) {
  GMTK_REQUIRE(handle != nullptr, "handle is NULL");
  created->backend = handle->backend;
  GMTK_CHECK(build_plan(config, created));
  if (created->comm != nullptr) {
    // The communicator moves the memory its backend computes in: host memory
    // for the CPU reference (in-process), the handle's device for CUDA (NCCL).
    const Communicator& comm = *created->comm;
    const bool cuda = created->backend->kind() == GMTK_BACKEND_CUDA;
    GMTK_REQUIRE(comm.on_device() == cuda,
                 "config->comm is %s communicator but the handle's backend is %s: the CPU reference takes "
                 "gmtkCommCreateInProcess's, CUDA takes gmtkCommCreateFromNccl's",
                 comm.on_device() ? "an NCCL (device)" : "an in-process (host)", cuda ? "CUDA" : "the CPU reference");
    GMTK_REQUIRE(!cuda || comm.device() == created->backend->device(),
                 "config->comm runs on CUDA device %d but the handle on device %d", comm.device(),
                 created->backend->device());
  }
  created->step_buffers_complete = step_buffers_complete(*created);
  Backend& backend = *created->backend;
  GMTK_CHECK(backend.check_reachable(created->sorted_buffers.data(), created->sorted_buffers.size()));
  GMTK_CHECK(backend.check_reachable(created->sorted_scalars.data(), created->sorted_scalars.size()));
  GMTK_CHECK(backend.prepare_plan(*created));
  if (created->comm != nullptr) {
    created->call_verdicts.resize(2 * static_cast<size_t>(created->comm->size()));
    for (const gmtkTensor_t& tensor : created->tensors) {
      if (is_shard(tensor)) continue;
      created->replica_grads.push_back(tensor.grad);
      created->replica_numels.push_back(static_cast<uint64_t>(tensor.numel));
      created->replica_dtypes.push_back(tensor.grad_dtype);
    }
  }
  if (config->flags & GMTK_PLAN_ALLOCATE_WORKSPACE) {
    size_t bytes = 0;
    GMTK_CHECK(backend.workspace_size(*created, &bytes));
    if (bytes > 0) GMTK_CHECK(backend.allocate_workspace(bytes, &created->owned_workspace));
    created->owned_workspace_bytes = bytes;
  }
  return GMTK_SUCCESS;
}

}  // namespace
}  // namespace gmtk

using gmtk::fail;
using gmtk::guarded;

extern "C" {

const char* gmtkGetErrorString(gmtkStatus_t status) {
  switch (gmtk::raw_enum(status)) {  // any int a C caller passes
    case GMTK_SUCCESS: return "success";
    case GMTK_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case GMTK_ERROR_NOT_SUPPORTED: return "not supported";
    case GMTK_ERROR_INSUFFICIENT_WORKSPACE: return "insufficient workspace";
    case GMTK_ERROR_OUT_OF_MEMORY: return "out of memory";
    case GMTK_ERROR_DEVICE_UNAVAILABLE: return "device unavailable";
    case GMTK_ERROR_CUDA: return "CUDA error";
    case GMTK_ERROR_INTERNAL: return "internal error";
    case GMTK_NUM_STATUSES: break;
  }
  return "unknown status";
}

const char* gmtkGetLastErrorMessage(void) { return gmtk::last_error_message(); }

gmtkStatus_t gmtkGetVersion(int* version) {
  GMTK_REQUIRE(version != nullptr, "version is NULL");
  *version = GMTK_VERSION;
  return GMTK_SUCCESS;
}

gmtkStatus_t gmtkHandleCreate(gmtkHandle_t* handle, const gmtkHandleConfig_t* config) {
  return guarded([&]() -> gmtkStatus_t {
    GMTK_REQUIRE(handle != nullptr, "handle is NULL");
    GMTK_CHECK(gmtk::validate_handle_config(config));
    auto created = std::make_unique<gmtkHandle>();
    if (config->backend == GMTK_BACKEND_CPU_REFERENCE) {
      GMTK_CHECK(gmtk::make_cpu_reference_backend(&created->backend));
    } else {
      GMTK_CHECK(gmtk::make_cuda_backend(config->device, &created->backend));
    }
    *handle = created.release();
    return GMTK_SUCCESS;
  });
}

gmtkStatus_t gmtkHandleDestroy(gmtkHandle_t handle) {
  return guarded([&]() -> gmtkStatus_t {
    delete handle;
    return GMTK_SUCCESS;
  });
}

gmtkStatus_t gmtkHandleGetBackend(gmtkHandle_t handle, gmtkBackend_t* backend) {
  GMTK_REQUIRE(handle != nullptr, "handle is NULL");
  GMTK_REQUIRE(backend != nullptr, "backend is NULL");
  *backend = handle->backend->kind();
  return GMTK_SUCCESS;
}

gmtkStatus_t gmtkGroupConfigInit(gmtkGroupConfig_t* config, gmtkOptimizer_t optimizer) {
  GMTK_REQUIRE(config != nullptr, "config is NULL");
  const int raw_optimizer = gmtk::raw_enum(optimizer);
  GMTK_REQUIRE(raw_optimizer == GMTK_OPTIMIZER_ADAMW || raw_optimizer == GMTK_OPTIMIZER_ADAM ||
                   raw_optimizer == GMTK_OPTIMIZER_SGD,
               "optimizer is %d; not a gmtkOptimizer_t", raw_optimizer);
  gmtkGroupConfig_t defaults{};
  defaults.struct_size = sizeof(gmtkGroupConfig_t);
  defaults.optimizer = optimizer;
  defaults.lr = 1e-3;
  defaults.lr_device = nullptr;
  defaults.weight_decay = optimizer == GMTK_OPTIMIZER_ADAMW ? 1e-2 : 0.0;
  defaults.maximize = 0;
  defaults.beta1 = 0.9;
  defaults.beta2 = 0.999;
  defaults.eps = 1e-8;
  defaults.amsgrad = 0;
  defaults.momentum = 0.0;
  defaults.dampening = 0.0;
  defaults.nesterov = 0;
  defaults.mask_ratio = 0.0;
  defaults.scope = GMTK_SCOPE_PER_TENSOR;
  defaults.mask_mode = GMTK_MASK_GRAD;
  *config = defaults;
  return GMTK_SUCCESS;
}

gmtkStatus_t gmtkPlanCreate(gmtkHandle_t handle, const gmtkPlanConfig_t* config, gmtkPlan_t* plan) {
  return guarded([&]() -> gmtkStatus_t {
    // A sharded plan is made by every rank together: a rank whose own checks
    // fail still meets the others, so that all fail instead of waiting.
    const gmtkComm_t comm = gmtk::plan_config_comm(config);
    auto created = std::make_unique<gmtkPlan>();
    // Guarded on its own: an exception must not skip the ranks' agreement.
    gmtkStatus_t status = plan != nullptr ? guarded([&] { return gmtk::create_plan(handle, config, created.get()); })
                                          : fail(GMTK_ERROR_INVALID_ARGUMENT, "plan is NULL");
    if (comm != nullptr) {
      status = gmtk::agree_on_plan(*comm->communicator, status == GMTK_SUCCESS ? created.get() : nullptr, status);
    }
    if (status != GMTK_SUCCESS) return status;
    *plan = created.release();
    return GMTK_SUCCESS;
  });
}

gmtkStatus_t gmtkCommCreateInProcess(int num_ranks, gmtkComm_t* comms) {
  return guarded([&]() -> gmtkStatus_t {
    GMTK_REQUIRE(num_ranks >= 1, "num_ranks is %d; it must be >= 1", num_ranks);
    GMTK_REQUIRE(comms != nullptr, "comms is NULL");
    std::vector<std::shared_ptr<gmtk::Communicator>> communicators(static_cast<size_t>(num_ranks));
    GMTK_CHECK(gmtk::make_in_process_communicators(num_ranks, communicators.data()));
    std::vector<std::unique_ptr<gmtkComm>> created(static_cast<size_t>(num_ranks));
    for (int r = 0; r < num_ranks; ++r) {
      created[r] = std::make_unique<gmtkComm>();
      created[r]->communicator = std::move(communicators[r]);
    }
    for (int r = 0; r < num_ranks; ++r) comms[r] = created[r].release();
    return GMTK_SUCCESS;
  });
}

gmtkStatus_t gmtkCommCreateFromNccl(void* nccl_comm, int device, gmtkComm_t* comm) {
  return guarded([&]() -> gmtkStatus_t {
    GMTK_REQUIRE(comm != nullptr, "comm is NULL");
    std::shared_ptr<gmtk::Communicator> communicator;
    GMTK_CHECK(gmtk::make_nccl_communicator(nccl_comm, device, &communicator));
    auto created = std::make_unique<gmtkComm>();
    created->communicator = std::move(communicator);
    *comm = created.release();
    return GMTK_SUCCESS;
  });
}

gmtkStatus_t gmtkCommGetRank(gmtkComm_t comm, int* rank) {
  GMTK_REQUIRE(comm != nullptr, "comm is NULL");
  GMTK_REQUIRE(rank != nullptr, "rank is NULL");
  *rank = comm->communicator->rank();
  return GMTK_SUCCESS;
}

gmtkStatus_t gmtkCommGetSize(gmtkComm_t comm, int* size) {
  GMTK_REQUIRE(comm != nullptr, "comm is NULL");
  GMTK_REQUIRE(size != nullptr, "size is NULL");
  *size = comm->communicator->size();
  return GMTK_SUCCESS;
}

gmtkStatus_t gmtkCommGetBytes(gmtkComm_t comm, uint64_t* bytes) {
  GMTK_REQUIRE(comm != nullptr, "comm is NULL");
  GMTK_REQUIRE(bytes != nullptr, "bytes is NULL");
  *bytes = comm->communicator->payload_bytes();
  return GMTK_SUCCESS;
}

gmtkStatus_t gmtkCommDestroy(gmtkComm_t comm) {
  return guarded([&]() -> gmtkStatus_t {
    delete comm;
    return GMTK_SUCCESS;
  });
}

gmtkStatus_t gmtkPlanDestroy(gmtkPlan_t plan) {
  return guarded([&]() -> gmtkStatus_t {
    delete plan;
    return GMTK_SUCCESS;
  });
}

gmtkStatus_t gmtkPlanGetWorkspaceSize(gmtkPlan_t plan, size_t* workspace_bytes) {
  return guarded([&]() -> gmtkStatus_t {
    GMTK_REQUIRE(plan != nullptr, "plan is NULL");
    GMTK_REQUIRE(workspace_bytes != nullptr, "workspace_bytes is NULL");
    if (plan->owned_workspace != nullptr) {
      *workspace_bytes = 0;
      return GMTK_SUCCESS;
    }
    size_t bytes = 0;
    GMTK_CHECK(plan->backend->workspace_size(*plan, &bytes));
    *workspace_bytes = bytes;
    return GMTK_SUCCESS;
  });
}

gmtkStatus_t gmtkPlanGetState(gmtkPlan_t plan, gmtkStatus_t* state) {
  GMTK_REQUIRE(plan != nullptr, "plan is NULL");
  GMTK_REQUIRE(state != nullptr, "state is NULL");
  *state = plan->unusable.load(std::memory_order_acquire) ? GMTK_ERROR_CUDA : GMTK_SUCCESS;
  return GMTK_SUCCESS;
}

gmtkStatus_t gmtkPlanGetMaskLayout(gmtkPlan_t plan, uint64_t* total_words, uint64_t* word_offsets) {
  GMTK_REQUIRE(plan != nullptr, "plan is NULL");
  GMTK_REQUIRE(total_words != nullptr, "total_words is NULL");
  *total_words = plan->mask_words;
  if (word_offsets != nullptr) {
    std::copy(plan->mask_word_offsets.begin(), plan->mask_word_offsets.end(), word_offsets);
  }
  return GMTK_SUCCESS;
}

gmtkStatus_t gmtkPlanSetGroupHyperparams(gmtkPlan_t plan, int32_t group, const gmtkGroupConfig_t* config) {
  return guarded([&]() -> gmtkStatus_t {
    GMTK_REQUIRE(plan != nullptr, "plan is NULL");
    gmtk::BufferRange new_buffer{};
    size_t new_buffer_count = 0;
    GMTK_CHECK(gmtk::validate_group_change(*plan, group, config, &new_buffer, &new_buffer_count));
    GMTK_CHECK(plan->backend->check_reachable(&new_buffer, new_buffer_count));
    // Of what a schedule may change, only SGD's momentum turning on or off
    // changes which buffers a step needs (then walk the tensors again).
    const bool momentum_switched = (plan->groups[group].momentum != 0) != (config->momentum != 0);
    plan->groups[group] = *config;
    if (momentum_switched) plan->step_buffers_complete = gmtk::step_buffers_complete(*plan);
    gmtk::update_group_scalar(plan, group);
    return GMTK_SUCCESS;
  });
}

gmtkStatus_t gmtkStep(gmtkPlan_t plan, const gmtkStepArgs_t* args, void* workspace, size_t workspace_bytes,
                      gmtkStream_t stream) {
  return guarded([&] {
    return gmtk::run_operation(plan, gmtk::Operation::step, args, workspace, workspace_bytes, stream);
  });
}

gmtkStatus_t gmtkSelectThresholds(gmtkPlan_t plan, const gmtkStepArgs_t* args, void* workspace,
                                  size_t workspace_bytes, gmtkStream_t stream) {
  return guarded([&] {
    return gmtk::run_operation(plan, gmtk::Operation::select_thresholds, args, workspace, workspace_bytes, stream);
  });
}

gmtkStatus_t gmtkMaskGradients(gmtkPlan_t plan, const gmtkStepArgs_t* args, void* workspace, size_t workspace_bytes,
                               gmtkStream_t stream) {
  return guarded([&] {
    return gmtk::run_operation(plan, gmtk::Operation::mask_gradients, args, workspace, workspace_bytes, stream);
  });
}

}  // extern "C"
