// SPEC section 6: every bad input gets a clear status, a message naming the
// argument, and nothing is written.
#include <functional>

#include "test_support.hpp"

using namespace gmtk_test;

namespace {

void expect_rejected(gmtkStatus_t status, gmtkStatus_t expected, const std::string& must_mention) {
  const std::string message = gmtkGetLastErrorMessage();
  INFO("status " << gmtkGetErrorString(status) << ", message: " << message);
  CHECK(status == expected);
  CHECK(message.find(must_mention) != std::string::npos);
}

// A valid two-group plan description over three tensors in host memory:
// group 0 AdamW (tensors 0 and 2), group 1 SGD with momentum (tensor 1).
struct Setup {
  std::vector<TensorData> data;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<gmtkTensor_t> tensors;

  Setup() {
    data.emplace_back(64, GMTK_FLOAT32, GMTK_FLOAT32);
    data.emplace_back(33, GMTK_FLOAT32, GMTK_FLOAT32);
    data.emplace_back(50, GMTK_BFLOAT16, GMTK_BFLOAT16, true);
    for (TensorData& d : data) {
      fill(d.grad, Distribution::gaussian, 1);
      fill(d.param, Distribution::gaussian, 2, 1.0f);
    }
    groups = {group_config(GMTK_OPTIMIZER_ADAMW, 0.5), group_config(GMTK_OPTIMIZER_SGD, 0.5)};
    groups[1].momentum = 0.9;
    tensors = {data[0].describe(0), data[1].describe(1), data[2].describe(0)};
  }

  std::vector<unsigned char> snapshot() const {
    std::vector<unsigned char> bytes;
    for (const TensorData& d : data) {
      bytes.insert(bytes.end(), d.grad.bytes.begin(), d.grad.bytes.end());
      bytes.insert(bytes.end(), d.param.bytes.begin(), d.param.bytes.end());
      for (const auto* v : {&d.master, &d.exp_avg, &d.exp_avg_sq, &d.max_exp_avg_sq}) {
        const auto* b = reinterpret_cast<const unsigned char*>(v->data());
        bytes.insert(bytes.end(), b, b + v->size() * 4);
      }
    }
    return bytes;
  }
};

gmtkPlan_t const kUntouched = reinterpret_cast<gmtkPlan_t>(static_cast<uintptr_t>(0xDEADBEEF));

// Makes a plan from a mutated Setup and expects the rejection.
void expect_plan_rejected(const std::function<void(Setup&)>& mutate, gmtkStatus_t expected,
                          const std::string& must_mention) {
  Setup setup;
  mutate(setup);
  Handle handle;
  gmtkPlan_t plan = kUntouched;
  const gmtkStatus_t status = Plan::create(handle.get(), setup.groups, setup.tensors, 0, &plan);
  expect_rejected(status, expected, must_mention);
  CHECK(plan == kUntouched);
  if (status == GMTK_SUCCESS) gmtkPlanDestroy(plan);
}

}  // namespace

TEST_CASE("gmtkHandleCreate rejects bad arguments", "[validation]") {
  gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
  config.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  expect_rejected(gmtkHandleCreate(nullptr, &config), GMTK_ERROR_INVALID_ARGUMENT, "handle is NULL");
  expect_rejected(gmtkHandleCreate(&handle, nullptr), GMTK_ERROR_INVALID_ARGUMENT, "config is NULL");
  gmtkHandleConfig_t wrong_size = config;
  wrong_size.struct_size = 8;
  expect_rejected(gmtkHandleCreate(&handle, &wrong_size), GMTK_ERROR_INVALID_ARGUMENT, "config->struct_size");
  gmtkHandleConfig_t wrong_backend = config;
  wrong_backend.backend = static_cast<gmtkBackend_t>(7);
  expect_rejected(gmtkHandleCreate(&handle, &wrong_backend), GMTK_ERROR_INVALID_ARGUMENT, "config->backend");
  gmtkHandleConfig_t wrong_device = GMTK_HANDLE_CONFIG_INIT;
  wrong_device.device = -1;
  expect_rejected(gmtkHandleCreate(&handle, &wrong_device), GMTK_ERROR_INVALID_ARGUMENT, "config->device");
  CHECK(handle == nullptr);
}

TEST_CASE("gmtkPlanCreate rejects bad plan configs", "[validation]") {
  Setup setup;
  Handle handle;
  gmtkPlan_t plan = kUntouched;
  gmtkPlanConfig_t good = GMTK_PLAN_CONFIG_INIT;
  good.groups = setup.groups.data();
  good.num_groups = 2;
  good.tensors = setup.tensors.data();
  good.num_tensors = 3;
  expect_rejected(gmtkPlanCreate(nullptr, &good, &plan), GMTK_ERROR_INVALID_ARGUMENT, "handle is NULL");
  expect_rejected(gmtkPlanCreate(handle.get(), &good, nullptr), GMTK_ERROR_INVALID_ARGUMENT, "plan is NULL");
  expect_rejected(gmtkPlanCreate(handle.get(), nullptr, &plan), GMTK_ERROR_INVALID_ARGUMENT, "config is NULL");
  const struct {
    std::function<void(gmtkPlanConfig_t&)> mutate;
    const char* mention;
  } cases[] = {
      {[](gmtkPlanConfig_t& c) { c.struct_size = 3; }, "config->struct_size"},
      {[](gmtkPlanConfig_t& c) { c.group_struct_size = 16; }, "config->group_struct_size"},
      {[](gmtkPlanConfig_t& c) { c.tensor_struct_size = 16; }, "config->tensor_struct_size"},
      {[](gmtkPlanConfig_t& c) { c.num_groups = 0; }, "config->num_groups"},
      {[](gmtkPlanConfig_t& c) { c.groups = nullptr; }, "config->groups is NULL"},
      {[](gmtkPlanConfig_t& c) { c.num_tensors = -1; }, "config->num_tensors"},
      {[](gmtkPlanConfig_t& c) { c.tensors = nullptr; }, "config->tensors is NULL"},
      {[](gmtkPlanConfig_t& c) { c.flags = 0x80u; }, "config->flags"},
  };
  for (const auto& c : cases) {
    gmtkPlanConfig_t config = good;
    c.mutate(config);
    expect_rejected(gmtkPlanCreate(handle.get(), &config, &plan), GMTK_ERROR_INVALID_ARGUMENT, c.mention);
    CHECK(plan == kUntouched);
  }
}

TEST_CASE("gmtkPlanCreate rejects bad group hyper-parameters, naming the group and field", "[validation]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const struct {
    std::function<void(Setup&)> mutate;
    const char* mention;
  } cases[] = {
      {[](Setup& s) { s.groups[0].struct_size = 4; }, "groups[0].struct_size"},
      {[](Setup& s) { s.groups[0].optimizer = static_cast<gmtkOptimizer_t>(5); }, "groups[0].optimizer"},
      {[](Setup& s) { s.groups[0].lr = -1e-3; }, "groups[0].lr"},
      {[&](Setup& s) { s.groups[1].lr = nan; }, "groups[1].lr"},
      {[](Setup& s) { s.groups[0].weight_decay = -0.1; }, "groups[0].weight_decay"},
      {[](Setup& s) { s.groups[0].beta1 = 1.0; }, "groups[0].beta1"},
      {[](Setup& s) { s.groups[0].beta2 = -0.5; }, "groups[0].beta2"},
      {[&](Setup& s) { s.groups[0].eps = nan; }, "groups[0].eps"},
      {[](Setup& s) { s.groups[1].momentum = -1; }, "groups[1].momentum"},
      {[](Setup& s) {
         s.groups[1].momentum = 0;
         s.groups[1].nesterov = 1;
       },
       "groups[1].nesterov"},
      {[](Setup& s) {
         s.groups[1].nesterov = 1;
         s.groups[1].dampening = 0.1;
       },
       "groups[1].nesterov"},
      {[](Setup& s) { s.groups[1].mask_ratio = 1.5; }, "groups[1].mask_ratio"},
      {[](Setup& s) { s.groups[1].mask_ratio = -0.1; }, "groups[1].mask_ratio"},
      {[&](Setup& s) { s.groups[0].mask_ratio = nan; }, "groups[0].mask_ratio"},
      {[](Setup& s) { s.groups[0].scope = static_cast<gmtkScope_t>(7); }, "groups[0].scope"},
      {[](Setup& s) { s.groups[0].mask_mode = static_cast<gmtkMaskMode_t>(9); }, "groups[0].mask_mode"},
      {[](Setup& s) {
         s.groups[0].lr_device = reinterpret_cast<const float*>(reinterpret_cast<uintptr_t>(s.data[0].exp_avg.data()) + 1);
       },
       "groups[0].lr_device"},
      {[](Setup& s) { s.groups[1].lr_device = s.data[1].exp_avg.data() + 5; }, "groups[1].lr_device overlaps tensors[1].exp_avg"},
  };
  for (const auto& c : cases) expect_plan_rejected(c.mutate, GMTK_ERROR_INVALID_ARGUMENT, c.mention);
}

TEST_CASE("gmtkPlanCreate rejects bad tensors: sizes, pointers, alignment, dtypes, overlaps", "[validation]") {
  const struct {
    std::function<void(Setup&)> mutate;
    gmtkStatus_t status;
    const char* mention;
  } cases[] = {
      {[](Setup& s) { s.tensors[1].group = 2; }, GMTK_ERROR_INVALID_ARGUMENT, "tensors[1].group"},
      {[](Setup& s) { s.tensors[1].group = -1; }, GMTK_ERROR_INVALID_ARGUMENT, "tensors[1].group"},
      {[](Setup& s) { s.tensors[0].numel = -1; }, GMTK_ERROR_INVALID_ARGUMENT, "tensors[0].numel"},
      {[](Setup& s) { s.tensors[0].grad = nullptr; }, GMTK_ERROR_INVALID_ARGUMENT, "tensors[0].grad is NULL"},
      {[](Setup& s) { s.tensors[2].exp_avg_sq = nullptr, s.tensors[2].param = nullptr; }, GMTK_ERROR_INVALID_ARGUMENT,
       "tensors[2].param is NULL"},
      {[](Setup& s) {
         s.tensors[0].grad = static_cast<char*>(s.tensors[0].grad) + 2;
         s.tensors[0].numel -= 1;
       },
       GMTK_ERROR_INVALID_ARGUMENT, "tensors[0].grad"},
      {[](Setup& s) {
         s.tensors[2].param = static_cast<char*>(s.tensors[2].param) + 1;
         s.tensors[2].numel -= 1;
       },
       GMTK_ERROR_INVALID_ARGUMENT, "tensors[2].param"},
      {[](Setup& s) { s.tensors[0].grad_dtype = static_cast<gmtkDtype_t>(9); }, GMTK_ERROR_INVALID_ARGUMENT,
       "tensors[0].grad_dtype"},
      {[](Setup& s) { s.tensors[1].param_dtype = static_cast<gmtkDtype_t>(3); }, GMTK_ERROR_INVALID_ARGUMENT,
       "tensors[1].param_dtype"},
      {[](Setup& s) { s.tensors[0].master_param = s.data[2].master.data(); }, GMTK_ERROR_INVALID_ARGUMENT,
       "tensors[0].master_param"},
      {[](Setup& s) { s.tensors[0].exp_avg_sq = s.tensors[0].exp_avg; }, GMTK_ERROR_INVALID_ARGUMENT, "overlaps"},
      {[](Setup& s) { s.tensors[1].grad = static_cast<float*>(s.tensors[0].grad) + 40; }, GMTK_ERROR_INVALID_ARGUMENT,
       "tensors[1].grad overlaps tensors[0].grad"},
      {[](Setup& s) { s.tensors[2].param = s.tensors[2].grad; }, GMTK_ERROR_INVALID_ARGUMENT, "overlaps"},
      {[](Setup& s) { s.tensors[1].exp_avg = s.tensors[0].exp_avg_sq + 63; }, GMTK_ERROR_INVALID_ARGUMENT,
       "overlaps"},
      {[](Setup& s) { s.groups[0].scope = GMTK_SCOPE_GLOBAL; }, GMTK_ERROR_NOT_SUPPORTED,
       "one gradient dtype per group"},
  };
  for (const auto& c : cases) expect_plan_rejected(c.mutate, c.status, c.mention);
}

TEST_CASE("valid edge cases are accepted: empty tensors with NULL pointers, no tensors, shared lr_device",
          "[validation]") {
  Handle handle;
  Setup setup;
  setup.tensors[1].numel = 0;
  setup.tensors[1].grad = nullptr;
  setup.tensors[1].param = nullptr;
  setup.tensors[1].exp_avg = nullptr;
  float lr = 1e-3f;
  setup.groups[0].lr_device = &lr;
  setup.groups[1].lr_device = &lr;
  Plan plan(handle.get(), setup.groups, setup.tensors);
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  GMTK_REQUIRE_OK(plan.step(args));
  Plan no_tensors(handle.get(), setup.groups, {});
  GMTK_REQUIRE_OK(no_tensors.step(args));
}

TEST_CASE("calls reject bad step arguments and write nothing", "[validation]") {
  Setup setup;
  Handle handle;
  Plan plan(handle.get(), setup.groups, setup.tensors);
  size_t workspace_bytes = 0;
  GMTK_REQUIRE_OK(gmtkPlanGetWorkspaceSize(plan.get(), &workspace_bytes));
  REQUIRE(workspace_bytes > 0);
  std::vector<unsigned char> workspace(workspace_bytes);

  std::vector<float> thresholds(3, -7.0f);
  std::vector<int64_t> kept(4, -7);
  float found_inf = -7.0f;
  int64_t step_counts[2] = {5, 5};
  const float inv_loss_scale = 1.0f;

  const struct {
    std::function<void(gmtkStepArgs_t&, void*&, size_t&)> mutate;
    gmtkStatus_t status;
    const char* mention;
  } cases[] = {
      {[](gmtkStepArgs_t& a, void*&, size_t&) { a.struct_size = 0; }, GMTK_ERROR_INVALID_ARGUMENT,
       "args->struct_size"},
      {[](gmtkStepArgs_t& a, void*&, size_t&) {
         a.step = 0;
         a.step_count = nullptr;
       },
       GMTK_ERROR_INVALID_ARGUMENT, "args->step is 0"},
      {[](gmtkStepArgs_t&, void*& w, size_t&) { w = nullptr; }, GMTK_ERROR_INVALID_ARGUMENT, "workspace is NULL"},
      {[](gmtkStepArgs_t&, void*&, size_t& b) { b -= 1; }, GMTK_ERROR_INSUFFICIENT_WORKSPACE, "workspace_bytes"},
      {[&](gmtkStepArgs_t& a, void*&, size_t&) { a.kept_counts = reinterpret_cast<int64_t*>(thresholds.data()); },
       GMTK_ERROR_INVALID_ARGUMENT, "overlaps"},
      {[&](gmtkStepArgs_t& a, void*&, size_t&) { a.found_inf = setup.data[0].exp_avg.data() + 3; },
       GMTK_ERROR_INVALID_ARGUMENT, "args->found_inf overlaps tensors[0].exp_avg"},
      {[&](gmtkStepArgs_t&, void*& w, size_t& b) {
         w = setup.data[1].grad.data();
         b = setup.data[1].grad.bytes.size();
       },
       GMTK_ERROR_INVALID_ARGUMENT, "workspace overlaps tensors[1].grad"},
      {[&](gmtkStepArgs_t& a, void*&, size_t&) {
         a.kept_counts = reinterpret_cast<int64_t*>(reinterpret_cast<char*>(kept.data()) + 4);
       },
       GMTK_ERROR_INVALID_ARGUMENT, "args->kept_counts"},
      {[&](gmtkStepArgs_t& a, void*&, size_t&) {
         a.thresholds = reinterpret_cast<float*>(reinterpret_cast<char*>(thresholds.data()) + 1);
       },
       GMTK_ERROR_INVALID_ARGUMENT, "args->thresholds"},
      {[&](gmtkStepArgs_t& a, void*&, size_t&) {
         a.step_count = reinterpret_cast<int64_t*>(reinterpret_cast<char*>(step_counts) + 4);
       },
       GMTK_ERROR_INVALID_ARGUMENT, "args->step_count"},
      {[&](gmtkStepArgs_t& a, void*&, size_t&) { a.inv_loss_scale = &thresholds[1]; }, GMTK_ERROR_INVALID_ARGUMENT,
       "args->inv_loss_scale overlaps args->thresholds"},
      {[&](gmtkStepArgs_t& a, void*&, size_t&) { a.inv_loss_scale = setup.data[2].master.data(); },
       GMTK_ERROR_INVALID_ARGUMENT, "args->inv_loss_scale overlaps tensors[2].master_param"},
      {[&](gmtkStepArgs_t& a, void*&, size_t&) { a.step_count = reinterpret_cast<int64_t*>(&thresholds[0]); },
       GMTK_ERROR_INVALID_ARGUMENT, "overlaps"},
  };
  const std::vector<unsigned char> before = setup.snapshot();
  for (const auto& c : cases) {
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step = 3;
    args.thresholds = thresholds.data();
    args.kept_counts = kept.data();
    args.found_inf = &found_inf;
    args.step_count = &step_counts[0];
    args.inv_loss_scale = &inv_loss_scale;
    void* w = workspace.data();
    size_t bytes = workspace.size();
    c.mutate(args, w, bytes);
    expect_rejected(gmtkStep(plan.get(), &args, w, bytes, nullptr), c.status, c.mention);
    CHECK(setup.snapshot() == before);
    CHECK(thresholds == std::vector<float>(3, -7.0f));
    CHECK(kept == std::vector<int64_t>(4, -7));
    CHECK(found_inf == -7.0f);
    CHECK(step_counts[0] == 5);
  }
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  expect_rejected(gmtkStep(nullptr, &args, workspace.data(), workspace.size(), nullptr), GMTK_ERROR_INVALID_ARGUMENT,
                  "plan is NULL");
  expect_rejected(gmtkStep(plan.get(), nullptr, workspace.data(), workspace.size(), nullptr),
                  GMTK_ERROR_INVALID_ARGUMENT, "args is NULL");
  expect_rejected(gmtkSelectThresholds(plan.get(), nullptr, workspace.data(), workspace.size(), nullptr),
                  GMTK_ERROR_INVALID_ARGUMENT, "args is NULL");
  expect_rejected(gmtkMaskGradients(plan.get(), &args, nullptr, 0, nullptr), GMTK_ERROR_INSUFFICIENT_WORKSPACE,
                  "workspace_bytes is 0");
  CHECK(setup.snapshot() == before);
}

TEST_CASE("gmtkStep needs the optimizer's buffers; selection and masking do not", "[validation]") {
  Handle handle;
  const struct {
    std::function<void(Setup&)> mutate;
    const char* mention;
  } cases[] = {
      {[](Setup& s) { s.tensors[0].exp_avg = nullptr; }, "tensors[0].exp_avg is NULL"},
      {[](Setup& s) { s.tensors[2].exp_avg_sq = nullptr; }, "tensors[2].exp_avg_sq is NULL"},
      {[](Setup& s) {
         s.groups[0].amsgrad = 1;
         s.tensors[2].max_exp_avg_sq = nullptr;
       },
       "tensors[2].max_exp_avg_sq is NULL"},
      {[](Setup& s) { s.tensors[1].exp_avg = nullptr; }, "momentum buffer"},
      {[](Setup& s) {
         for (gmtkTensor_t& t : s.tensors) {
           t.param = nullptr;
           t.master_param = t.exp_avg = t.exp_avg_sq = t.max_exp_avg_sq = nullptr;
         }
       },
       "tensors[0].param is NULL"},
  };
  for (const auto& c : cases) {
    Setup setup;
    c.mutate(setup);
    const std::vector<unsigned char> before = setup.snapshot();
    Plan plan(handle.get(), setup.groups, setup.tensors);
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    std::vector<float> thresholds(3, -1.0f);
    args.thresholds = thresholds.data();
    expect_rejected(plan.step(args), GMTK_ERROR_INVALID_ARGUMENT, c.mention);
    CHECK(setup.snapshot() == before);
    CHECK(thresholds == std::vector<float>(3, -1.0f));
    GMTK_REQUIRE_OK(plan.select(args));
    CHECK(thresholds[0] > 0.0f);
    GMTK_REQUIRE_OK(plan.mask(args));
  }
  // Momentum turned on later needs the buffer from then on.
  Setup setup;
  setup.groups[1].momentum = 0;
  setup.tensors[1].exp_avg = nullptr;
  Plan plan(handle.get(), setup.groups, setup.tensors);
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  GMTK_REQUIRE_OK(plan.step(args));
  gmtkGroupConfig_t with_momentum = setup.groups[1];
  with_momentum.momentum = 0.9;
  GMTK_REQUIRE_OK(gmtkPlanSetGroupHyperparams(plan.get(), 1, &with_momentum));
  expect_rejected(plan.step(args), GMTK_ERROR_INVALID_ARGUMENT, "tensors[1].exp_avg (the momentum buffer) is NULL");
  // ... and off again does not (the plan keeps its answer to "are the step's buffers all there").
  GMTK_REQUIRE_OK(gmtkPlanSetGroupHyperparams(plan.get(), 1, &setup.groups[1]));
  GMTK_REQUIRE_OK(plan.step(args));
}

TEST_CASE("gmtkPlanSetGroupHyperparams rejects structural changes and bad values, keeping the old ones",
          "[validation]") {
  Setup setup;
  Setup twin;
  Handle handle;
  Plan plan(handle.get(), setup.groups, setup.tensors);
  Plan untouched(handle.get(), twin.groups, twin.tensors);
  const struct {
    int32_t group;
    std::function<void(gmtkGroupConfig_t&)> mutate;
    const char* mention;
  } cases[] = {
      {-1, [](gmtkGroupConfig_t&) {}, "group is -1"},
      {2, [](gmtkGroupConfig_t&) {}, "group is 2"},
      {0, [](gmtkGroupConfig_t& g) { g.optimizer = GMTK_OPTIMIZER_ADAM; }, "config->optimizer"},
      {0, [](gmtkGroupConfig_t& g) { g.amsgrad = 1; }, "config->amsgrad"},
      {0, [](gmtkGroupConfig_t& g) { g.scope = GMTK_SCOPE_GLOBAL; }, "config->scope"},
      {1, [](gmtkGroupConfig_t& g) { g.mask_mode = GMTK_MASK_FREEZE; }, "config->mask_mode"},
      {1, [](gmtkGroupConfig_t& g) { g.mask_ratio = 2.0; }, "config.mask_ratio"},
      {0, [](gmtkGroupConfig_t& g) { g.lr = -1.0; }, "config.lr"},
      {0, [&](gmtkGroupConfig_t& g) { g.lr_device = setup.data[2].master.data(); }, "config->lr_device overlaps"},
  };
  for (const auto& c : cases) {
    gmtkGroupConfig_t config = setup.groups[c.group < 0 || c.group > 1 ? 0 : c.group];
    config.lr = 0.5;  // a valid change that must not take effect when something else is wrong
    c.mutate(config);
    expect_rejected(gmtkPlanSetGroupHyperparams(plan.get(), c.group, &config), GMTK_ERROR_INVALID_ARGUMENT,
                    c.mention);
  }
  expect_rejected(gmtkPlanSetGroupHyperparams(plan.get(), 0, nullptr), GMTK_ERROR_INVALID_ARGUMENT,
                  "config is NULL");
  expect_rejected(gmtkPlanSetGroupHyperparams(nullptr, 0, &setup.groups[0]), GMTK_ERROR_INVALID_ARGUMENT,
                  "plan is NULL");
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  GMTK_REQUIRE_OK(plan.step(args));
  GMTK_REQUIRE_OK(untouched.step(args));
  CHECK(setup.snapshot() == twin.snapshot());
}

TEST_CASE("a call's outputs are checked against the lr_device scalars the schedule set last", "[validation]") {
  Setup setup;
  Handle handle;
  float scalars[4] = {1e-3f, 2e-3f, 3e-3f, 4e-3f};
  setup.groups[0].lr_device = &scalars[0];
  Plan plan(handle.get(), setup.groups, setup.tensors);
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.step = 1;
  args.found_inf = &scalars[0];
  expect_rejected(plan.step(args), GMTK_ERROR_INVALID_ARGUMENT,
                  "args->found_inf overlaps groups[0].lr_device; buffers must not overlap");

  // Group 0 moves its scalar, group 1 takes the same one: the old address is free.
  gmtkGroupConfig_t group0 = setup.groups[0];
  group0.lr_device = &scalars[1];
  GMTK_REQUIRE_OK(gmtkPlanSetGroupHyperparams(plan.get(), 0, &group0));
  gmtkGroupConfig_t group1 = setup.groups[1];
  group1.lr_device = &scalars[1];
  GMTK_REQUIRE_OK(gmtkPlanSetGroupHyperparams(plan.get(), 1, &group1));
  GMTK_REQUIRE_OK(plan.select(args));
  args.found_inf = &scalars[1];
  expect_rejected(plan.select(args), GMTK_ERROR_INVALID_ARGUMENT, "args->found_inf overlaps groups[");
  gmtkStepArgs_t scaled = GMTK_STEP_ARGS_INIT;
  scaled.inv_loss_scale = &scalars[1];  // read-only scalars may be shared
  scaled.found_inf = &scalars[2];
  GMTK_REQUIRE_OK(plan.select(scaled));

  // Group 0 drops its scalar: group 1 still holds it.
  group0.lr_device = nullptr;
  GMTK_REQUIRE_OK(gmtkPlanSetGroupHyperparams(plan.get(), 0, &group0));
  expect_rejected(plan.select(args), GMTK_ERROR_INVALID_ARGUMENT,
                  "args->found_inf overlaps groups[1].lr_device; buffers must not overlap");
  // A refused change leaves the list as it was.
  group1.lr_device = &scalars[3];
  group1.mask_ratio = 2.0;
  expect_rejected(gmtkPlanSetGroupHyperparams(plan.get(), 1, &group1), GMTK_ERROR_INVALID_ARGUMENT,
                  "config.mask_ratio");
  args.found_inf = &scalars[3];
  GMTK_REQUIRE_OK(plan.select(args));
  args.found_inf = &scalars[1];
  expect_rejected(plan.select(args), GMTK_ERROR_INVALID_ARGUMENT, "groups[1].lr_device");
}

TEST_CASE("query functions reject NULL outputs", "[validation]") {
  Setup setup;
  Handle handle;
  Plan plan(handle.get(), setup.groups, setup.tensors);
  size_t bytes = 0;
  expect_rejected(gmtkPlanGetWorkspaceSize(nullptr, &bytes), GMTK_ERROR_INVALID_ARGUMENT, "plan is NULL");
  expect_rejected(gmtkPlanGetWorkspaceSize(plan.get(), nullptr), GMTK_ERROR_INVALID_ARGUMENT, "workspace_bytes is NULL");
  expect_rejected(gmtkGetVersion(nullptr), GMTK_ERROR_INVALID_ARGUMENT, "version is NULL");
  gmtkBackend_t backend;
  expect_rejected(gmtkHandleGetBackend(nullptr, &backend), GMTK_ERROR_INVALID_ARGUMENT, "handle is NULL");
  expect_rejected(gmtkHandleGetBackend(handle.get(), nullptr), GMTK_ERROR_INVALID_ARGUMENT, "backend is NULL");
  gmtkGroupConfig_t group;
  expect_rejected(gmtkGroupConfigInit(nullptr, GMTK_OPTIMIZER_SGD), GMTK_ERROR_INVALID_ARGUMENT, "config is NULL");
  expect_rejected(gmtkGroupConfigInit(&group, static_cast<gmtkOptimizer_t>(9)), GMTK_ERROR_INVALID_ARGUMENT,
                  "optimizer is 9");
}
