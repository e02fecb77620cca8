// The GMTK_ERROR_CUDA rows of docs/errors.md on a real device: a CUDA error
// left pending by the caller's own work refuses every call on a CUDA plan
// before gmtk makes any CUDA call, writes nothing, and stays in place for
// its owner (cudaGetLastError still returns it afterwards).
#include "gpu_test_support.h"

namespace gpu_test {
namespace {

// A failed allocation of the caller's leaves cudaErrorMemoryAllocation as the
// thread's last error (cudaMalloc sets it, like a failed launch).
cudaError_t leave_pending_error() {
  void* pointer = nullptr;
  const cudaError_t error = cudaMalloc(&pointer, size_t{1} << 62);
  return error;
}

TEST_CASE("a CUDA error pending from the caller's work: every call refuses, writes nothing, leaves it in place",
          "[errors][small]") {
  constexpr int64_t n = 1000;
  DeviceMemory grad(n * 4), param(n * 4), exp_avg(n * 4), exp_avg_sq(n * 4), outputs(256);
  GPU_CUDA_OK(cudaMemset(grad.bytes(), 0x3C, n * 4));
  GPU_CUDA_OK(cudaMemset(param.bytes(), 0x3F, n * 4));
  GPU_CUDA_OK(cudaMemset(exp_avg.bytes(), 0, n * 4));
  GPU_CUDA_OK(cudaMemset(exp_avg_sq.bytes(), 0, n * 4));
  GPU_CUDA_OK(cudaMemset(outputs.bytes(), 0xAB, 256));
  HandleOwner owner(GMTK_BACKEND_CUDA);
  gmtkGroupConfig_t group;
  gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW);
  group.mask_ratio = 0.5;
  gmtkTensor_t tensor{};
  tensor.numel = n;
  tensor.grad_dtype = tensor.param_dtype = GMTK_FLOAT32;
  tensor.grad = grad.bytes();
  tensor.param = param.bytes();
  tensor.exp_avg = reinterpret_cast<float*>(exp_avg.bytes());
  tensor.exp_avg_sq = reinterpret_cast<float*>(exp_avg_sq.bytes());
  gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
  config.groups = &group;
  config.num_groups = 1;
  config.tensors = &tensor;
  config.num_tensors = 1;
  config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
  gmtkPlan_t plan = nullptr;
  GPU_GMTK_OK(gmtkPlanCreate(owner.handle, &config, &plan));

  const auto device_bytes = [&]() {
    GPU_CUDA_OK(cudaDeviceSynchronize());
    std::vector<unsigned char> all(4 * n * 4 + 256);
    const DeviceMemory* buffers[] = {&grad, &param, &exp_avg, &exp_avg_sq};
    for (int b = 0; b < 4; ++b) GPU_CUDA_OK(cudaMemcpy(all.data() + b * n * 4, buffers[b]->bytes(), n * 4, cudaMemcpyDeviceToHost));
    GPU_CUDA_OK(cudaMemcpy(all.data() + 4 * n * 4, outputs.bytes(), 256, cudaMemcpyDeviceToHost));
    return all;
  };
  const std::vector<unsigned char> before = device_bytes();

  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.thresholds = reinterpret_cast<float*>(outputs.bytes());
  args.found_inf = reinterpret_cast<float*>(outputs.bytes() + 64);
  args.step_count = reinterpret_cast<int64_t*>(outputs.bytes() + 128);
  for (int call = 0; call < 4; ++call) {
    INFO("call " << call);
    REQUIRE(leave_pending_error() == cudaErrorMemoryAllocation);
    gmtkStatus_t status = GMTK_SUCCESS;
    gmtkPlan_t second = nullptr;
    switch (call) {
      case 0: status = gmtkStep(plan, &args, nullptr, 0, nullptr); break;
      case 1: status = gmtkSelectThresholds(plan, &args, nullptr, 0, nullptr); break;
      case 2: status = gmtkMaskGradients(plan, &args, nullptr, 0, nullptr); break;
      case 3: status = gmtkPlanCreate(owner.handle, &config, &second); break;
    }
    INFO(gmtkGetLastErrorMessage());
    CHECK(status == GMTK_ERROR_CUDA);
    CHECK(std::string(gmtkGetLastErrorMessage()).find("pending") != std::string::npos);
    CHECK(second == nullptr);
    // Still the caller's to find, and then cleared by the caller.
    CHECK(cudaGetLastError() == cudaErrorMemoryAllocation);
    CHECK(cudaGetLastError() == cudaSuccess);
  }
  CHECK(device_bytes() == before);
  // Refused, not failed: the plan stays usable (gmtkPlanGetState).
  gmtkStatus_t state = GMTK_ERROR_INTERNAL;
  GPU_GMTK_OK(gmtkPlanGetState(plan, &state));
  CHECK(state == GMTK_SUCCESS);
  // Once the caller has taken its error, the plan runs as usual.
  GPU_GMTK_OK(gmtkStep(plan, &args, nullptr, 0, nullptr));
  CHECK(device_bytes() != before);
  gmtkPlanDestroy(plan);
  check_no_cuda_error_left();
}

}  // namespace
}  // namespace gpu_test
