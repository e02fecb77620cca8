// The API's own promises: version, error strings, defaults, the thread-local
// message, workspace handling, backends.
#include <thread>

#include "test_support.hpp"

using namespace gmtk_test;

TEST_CASE("version macros and gmtkGetVersion agree", "[api]") {
  int version = 0;
  GMTK_REQUIRE_OK(gmtkGetVersion(&version));
  CHECK(version == GMTK_VERSION);
  CHECK(GMTK_VERSION == GMTK_VERSION_MAJOR * 10000 + GMTK_VERSION_MINOR * 100 + GMTK_VERSION_PATCH);
}

TEST_CASE("every status has its own message", "[api]") {
  std::vector<std::string> seen;
  for (int s = 0; s < GMTK_NUM_STATUSES; ++s) {
    const std::string text = gmtkGetErrorString(static_cast<gmtkStatus_t>(s));
    CHECK(!text.empty());
    CHECK(text != "unknown status");
    CHECK(std::find(seen.begin(), seen.end(), text) == seen.end());
    seen.push_back(text);
  }
  CHECK(std::string(gmtkGetErrorString(static_cast<gmtkStatus_t>(99))) == "unknown status");
}

TEST_CASE("gmtkGroupConfigInit gives torch.optim's defaults", "[api]") {
  gmtkGroupConfig_t adamw;
  GMTK_REQUIRE_OK(gmtkGroupConfigInit(&adamw, GMTK_OPTIMIZER_ADAMW));
  CHECK(adamw.struct_size == sizeof(gmtkGroupConfig_t));
  CHECK(adamw.lr == 1e-3);
  CHECK(adamw.beta1 == 0.9);
  CHECK(adamw.beta2 == 0.999);
  CHECK(adamw.eps == 1e-8);
  CHECK(adamw.weight_decay == 1e-2);
  CHECK(adamw.amsgrad == 0);
  CHECK(adamw.maximize == 0);
  CHECK(adamw.lr_device == nullptr);
  CHECK(adamw.mask_ratio == 0.0);
  CHECK(adamw.scope == GMTK_SCOPE_PER_TENSOR);
  CHECK(adamw.mask_mode == GMTK_MASK_GRAD);
  gmtkGroupConfig_t adam;
  GMTK_REQUIRE_OK(gmtkGroupConfigInit(&adam, GMTK_OPTIMIZER_ADAM));
  CHECK(adam.weight_decay == 0.0);
  gmtkGroupConfig_t sgd;
  GMTK_REQUIRE_OK(gmtkGroupConfigInit(&sgd, GMTK_OPTIMIZER_SGD));
  CHECK(sgd.lr == 1e-3);
  CHECK(sgd.momentum == 0.0);
  CHECK(sgd.dampening == 0.0);
  CHECK(sgd.nesterov == 0);
  CHECK(sgd.weight_decay == 0.0);
}

TEST_CASE("the last error message is per thread and survives successful calls", "[api]") {
  CHECK(gmtkGetVersion(nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  const std::string here = gmtkGetLastErrorMessage();
  CHECK(here.find("version is NULL") != std::string::npos);
  int version = 0;
  GMTK_REQUIRE_OK(gmtkGetVersion(&version));
  CHECK(here == gmtkGetLastErrorMessage());

  std::string there_before, there_after;
  std::thread other([&] {
    there_before = gmtkGetLastErrorMessage();
    gmtkGroupConfigInit(nullptr, GMTK_OPTIMIZER_SGD);
    there_after = gmtkGetLastErrorMessage();
  });
  other.join();
  CHECK(there_before.empty());
  CHECK(there_after.find("config is NULL") != std::string::npos);
  CHECK(here == gmtkGetLastErrorMessage());
}

TEST_CASE("CPU reference handles report their backend; NULL handles and plans may be destroyed", "[api]") {
  Handle handle;
  gmtkBackend_t backend = GMTK_BACKEND_CUDA;
  GMTK_REQUIRE_OK(gmtkHandleGetBackend(handle.get(), &backend));
  CHECK(backend == GMTK_BACKEND_CPU_REFERENCE);
  CHECK(gmtkHandleDestroy(nullptr) == GMTK_SUCCESS);
  CHECK(gmtkPlanDestroy(nullptr) == GMTK_SUCCESS);
}

TEST_CASE("a plan outlives the handle it was made from", "[api]") {
  TensorData data(100, GMTK_FLOAT32, GMTK_FLOAT32);
  fill(data.grad, Distribution::gaussian, 1);
  gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
  config.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  GMTK_REQUIRE_OK(gmtkHandleCreate(&handle, &config));
  gmtkPlan_t plan = nullptr;
  GMTK_REQUIRE_OK(Plan::create(handle, {group_config(GMTK_OPTIMIZER_ADAMW, 0.5)}, {data.describe(0)},
                               GMTK_PLAN_ALLOCATE_WORKSPACE, &plan));
  GMTK_REQUIRE_OK(gmtkHandleDestroy(handle));
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  GMTK_REQUIRE_OK(gmtkStep(plan, &args, nullptr, 0, nullptr));
  GMTK_REQUIRE_OK(gmtkPlanDestroy(plan));
}

TEST_CASE("a CUDA handle is made or refused with a reason, never half-made", "[api]") {
  gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
  gmtkHandle_t handle = nullptr;
  const gmtkStatus_t status = gmtkHandleCreate(&handle, &config);
  INFO(gmtkGetErrorString(status) << ": " << gmtkGetLastErrorMessage());
  if (status == GMTK_SUCCESS) {
    gmtkBackend_t backend = GMTK_BACKEND_CPU_REFERENCE;
    GMTK_REQUIRE_OK(gmtkHandleGetBackend(handle, &backend));
    CHECK(backend == GMTK_BACKEND_CUDA);
    gmtkHandleDestroy(handle);
  } else {
    CHECK(status == GMTK_ERROR_DEVICE_UNAVAILABLE);
    CHECK(handle == nullptr);
    CHECK(std::string(gmtkGetLastErrorMessage()).find("CUDA device") != std::string::npos);
  }
}

TEST_CASE("the workspace may sit at any address; a plan may own its workspace", "[api]") {
  Handle handle;
  TensorData a(1000, GMTK_FLOAT32, GMTK_FLOAT32), b(1000, GMTK_FLOAT32, GMTK_FLOAT32), c(1000, GMTK_FLOAT32,
                                                                                          GMTK_FLOAT32);
  for (TensorData* d : {&a, &b, &c}) fill(d->param, Distribution::gaussian, 1, 1.0f);
  const gmtkGroupConfig_t group = group_config(GMTK_OPTIMIZER_ADAMW, 0.5);

  gmtkPlan_t caller_plan = nullptr;
  GMTK_REQUIRE_OK(Plan::create(handle.get(), {group}, {a.describe(0)}, 0, &caller_plan));
  size_t bytes = 0;
  GMTK_REQUIRE_OK(gmtkPlanGetWorkspaceSize(caller_plan, &bytes));
  CHECK(bytes > 0);
  std::vector<unsigned char> storage(bytes + 1);
  void* odd_address = storage.data() + 1;  // CUB-style carving aligns inside

  gmtkPlan_t owning_plan = nullptr;
  GMTK_REQUIRE_OK(Plan::create(handle.get(), {group}, {b.describe(0)}, GMTK_PLAN_ALLOCATE_WORKSPACE, &owning_plan));
  size_t owned_bytes = 99;
  GMTK_REQUIRE_OK(gmtkPlanGetWorkspaceSize(owning_plan, &owned_bytes));
  CHECK(owned_bytes == 0);

  Plan reference_plan(handle.get(), {group}, {c.describe(0)});
  for (int t = 1; t <= 3; ++t) {
    for (TensorData* d : {&a, &b, &c}) fill(d->grad, Distribution::gaussian, 10 + t);
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step = t;
    GMTK_REQUIRE_OK(gmtkStep(caller_plan, &args, odd_address, bytes, nullptr));
    GMTK_REQUIRE_OK(gmtkStep(owning_plan, &args, nullptr, 0, nullptr));
    GMTK_REQUIRE_OK(reference_plan.step(args));
  }
  CHECK(a.param.bytes == c.param.bytes);
  CHECK(b.param.bytes == c.param.bytes);
  gmtkPlanDestroy(caller_plan);
  gmtkPlanDestroy(owning_plan);
}
