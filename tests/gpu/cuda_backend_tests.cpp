// The CUDA backend's handles, plans over device memory, the pointer checks,
// and that every call (selection, masking and the step) runs after its
// arguments are validated. What they compute is tested in selection_tests.cpp
// and step_tests.cpp.
// Tag [small] is the subset run under compute-sanitizer.
#include <gmtk/gmtk.h>

#include <catch2/catch.hpp>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace {

#define CUDA_REQUIRE(call) REQUIRE((call) == cudaSuccess)

struct DeviceBuffer {
  void* pointer = nullptr;
  explicit DeviceBuffer(size_t bytes) { CUDA_REQUIRE(cudaMalloc(&pointer, bytes)); }
  ~DeviceBuffer() { cudaFree(pointer); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  float* f32() const { return static_cast<float*>(pointer); }
};

gmtkHandle_t make_cuda_handle() {
  gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
  gmtkHandle_t handle = nullptr;
  const gmtkStatus_t status = gmtkHandleCreate(&handle, &config);
  INFO(gmtkGetLastErrorMessage());
  REQUIRE(status == GMTK_SUCCESS);
  return handle;
}

gmtkStatus_t make_plan(gmtkHandle_t handle, const gmtkTensor_t& tensor, gmtkPlan_t* plan) {
  gmtkGroupConfig_t group;
  gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW);
  group.mask_ratio = 0.5;
  gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
  config.groups = &group;
  config.num_groups = 1;
  config.tensors = &tensor;
  config.num_tensors = 1;
  return gmtkPlanCreate(handle, &config, plan);
}

gmtkTensor_t adam_tensor(int64_t n, void* grad, void* param, float* m, float* v) {
  gmtkTensor_t tensor{};
  tensor.numel = n;
  tensor.grad_dtype = GMTK_FLOAT32;
  tensor.grad = grad;
  tensor.param_dtype = GMTK_FLOAT32;
  tensor.param = param;
  tensor.exp_avg = m;
  tensor.exp_avg_sq = v;
  return tensor;
}

bool mentions(const char* text) { return std::string(gmtkGetLastErrorMessage()).find(text) != std::string::npos; }

}  // namespace

TEST_CASE("a CUDA handle is created on the device and leaves the current device alone", "[small]") {
  int before = -1;
  CUDA_REQUIRE(cudaGetDevice(&before));
  gmtkHandle_t handle = make_cuda_handle();
  int after = -2;
  CUDA_REQUIRE(cudaGetDevice(&after));
  CHECK(after == before);
  gmtkBackend_t backend = GMTK_BACKEND_CPU_REFERENCE;
  REQUIRE(gmtkHandleGetBackend(handle, &backend) == GMTK_SUCCESS);
  CHECK(backend == GMTK_BACKEND_CUDA);
  gmtkHandleDestroy(handle);
}

TEST_CASE("an out-of-range device ordinal is rejected", "[small]") {
  int count = 0;
  CUDA_REQUIRE(cudaGetDeviceCount(&count));
  gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
  config.device = count;
  gmtkHandle_t handle = nullptr;
  CHECK(gmtkHandleCreate(&handle, &config) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(mentions("config->device"));
  CHECK(handle == nullptr);
}

TEST_CASE("plans over device memory are accepted; host memory is rejected by name", "[small]") {
  const int64_t n = 1000;
  gmtkHandle_t handle = make_cuda_handle();
  DeviceBuffer grad(n * 4), param(n * 4), m(n * 4), v(n * 4);
  gmtkPlan_t plan = nullptr;
  REQUIRE(make_plan(handle, adam_tensor(n, grad.pointer, param.pointer, m.f32(), v.f32()), &plan) == GMTK_SUCCESS);
  gmtkPlanDestroy(plan);

  std::vector<float> host(n);
  gmtkPlan_t untouched = nullptr;
  CHECK(make_plan(handle, adam_tensor(n, host.data(), param.pointer, m.f32(), v.f32()), &untouched) ==
        GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(mentions("tensors[0].grad"));
  CHECK(mentions("host memory"));
  CHECK(untouched == nullptr);

  void* pinned = nullptr;
  CUDA_REQUIRE(cudaMallocHost(&pinned, n * 4));
  CHECK(make_plan(handle, adam_tensor(n, grad.pointer, param.pointer, m.f32(), static_cast<float*>(pinned)),
                  &untouched) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(mentions("tensors[0].exp_avg_sq"));
  CHECK(mentions("pinned host"));
  cudaFreeHost(pinned);
  gmtkHandleDestroy(handle);
}

TEST_CASE("selection, masking and steps run on CUDA once their arguments pass validation", "[small]") {
  const int64_t n = 4096;
  gmtkHandle_t handle = make_cuda_handle();
  DeviceBuffer grad(n * 4), param(n * 4), m(n * 4), v(n * 4), outputs(256);
  gmtkPlan_t plan = nullptr;
  REQUIRE(make_plan(handle, adam_tensor(n, grad.pointer, param.pointer, m.f32(), v.f32()), &plan) == GMTK_SUCCESS);

  size_t bytes = 0;
  REQUIRE(gmtkPlanGetWorkspaceSize(plan, &bytes) == GMTK_SUCCESS);
  CHECK(bytes > 0);
  DeviceBuffer workspace(bytes);
  for (const DeviceBuffer* buffer : {&grad, &param, &m, &v}) CUDA_REQUIRE(cudaMemset(buffer->pointer, 0, n * 4));

  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.thresholds = outputs.f32();
  CHECK(gmtkStep(plan, nullptr, workspace.pointer, bytes, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);  // validation first
  CHECK(mentions("args"));
  CHECK(gmtkStep(plan, &args, workspace.pointer, bytes - 1, nullptr) == GMTK_ERROR_INSUFFICIENT_WORKSPACE);
  {
    const gmtkStatus_t status = gmtkStep(plan, &args, workspace.pointer, bytes, nullptr);
    INFO(gmtkGetErrorString(status) << ": " << (status == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage()));
    CHECK(status == GMTK_SUCCESS);
  }
  CHECK(gmtkSelectThresholds(plan, &args, workspace.pointer, bytes, nullptr) == GMTK_SUCCESS);
  CHECK(gmtkMaskGradients(plan, &args, workspace.pointer, bytes, nullptr) == GMTK_SUCCESS);
  CHECK(gmtkSelectThresholds(plan, &args, workspace.pointer, bytes - 1, nullptr) == GMTK_ERROR_INSUFFICIENT_WORKSPACE);
  CUDA_REQUIRE(cudaDeviceSynchronize());
  float threshold = -1.0f;
  CUDA_REQUIRE(cudaMemcpy(&threshold, outputs.pointer, 4, cudaMemcpyDeviceToHost));
  CHECK(threshold == 0.0f);  // all zeros: T is +0

  std::vector<float> host_thresholds(1);
  args.thresholds = host_thresholds.data();
  CHECK(gmtkStep(plan, &args, workspace.pointer, bytes, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(mentions("args->thresholds"));

  // A schedule change brings a new pointer in: it is checked like the plan's.
  gmtkGroupConfig_t group;
  gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW);
  group.mask_ratio = 0.5;
  const float host_lr = 1e-3f;
  group.lr_device = &host_lr;
  CHECK(gmtkPlanSetGroupHyperparams(plan, 0, &group) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(mentions("config->lr_device"));
  group.lr_device = outputs.f32() + 8;
  CHECK(gmtkPlanSetGroupHyperparams(plan, 0, &group) == GMTK_SUCCESS);

  gmtkPlanDestroy(plan);
  gmtkHandleDestroy(handle);
  CHECK(cudaGetLastError() == cudaSuccess);  // gmtk leaves no sticky error behind
}
