// cpu_errors: one case per row of docs/errors.md that the CPU reference
// backend can provoke. Each provokes its status and checks the two promises
// of every failure: a message that names what was wrong, and no byte the
// caller owns changed (every buffer, output, counter and workspace lives in
// one arena, compared before and after). GMTK_ERROR_CUDA's rows are in
// tests/gpu/error_tests.cpp; GMTK_ERROR_INTERNAL is never returned (the
// fuzzers treat it as a finding).
#include <gmtk/gmtk.h>

#include <catch2/catch.hpp>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

// A two-tensor AdamW plan whose every buffer, output and workspace is in one arena.
class ArenaWorld {
 public:
  ArenaWorld() : bytes_(1 << 16) {
    for (size_t i = 0; i < kEntries; ++i) {
      grad()[i] = static_cast<float>(i % 13) * 1e-3f - 5e-3f;
      param()[i] = 0.25f;
    }
    gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
    hc.backend = GMTK_BACKEND_CPU_REFERENCE;
    REQUIRE(gmtkHandleCreate(&handle_, &hc) == GMTK_SUCCESS);
    gmtkGroupConfigInit(&group_, GMTK_OPTIMIZER_ADAMW);
    group_.mask_ratio = 0.5;
    for (int t = 0; t < 2; ++t) {
      gmtkTensor_t& r = tensors_[t];
      r = gmtkTensor_t{};
      r.numel = kEntries / 2;
      r.grad_dtype = r.param_dtype = GMTK_FLOAT32;
      r.grad = grad() + t * kEntries / 2;
      r.param = param() + t * kEntries / 2;
      r.exp_avg = at(kExpAvg) + t * kEntries / 2;
      r.exp_avg_sq = at(kExpAvgSq) + t * kEntries / 2;
    }
  }
  ~ArenaWorld() {
    gmtkPlanDestroy(plan_);
    gmtkHandleDestroy(handle_);
  }

  gmtkPlanConfig_t plan_config() {
    gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
    pc.groups = &group_;
    pc.num_groups = 1;
    pc.tensors = tensors_;
    pc.num_tensors = 2;
    return pc;
  }
  // The plan, made on first use: with a workspace of its own, or needing the caller's.
  gmtkPlan_t plan(bool allocate_workspace = true) {
    if (plan_ == nullptr) {
      gmtkPlanConfig_t pc = plan_config();
      pc.flags = allocate_workspace ? GMTK_PLAN_ALLOCATE_WORKSPACE : 0u;
      REQUIRE(gmtkPlanCreate(handle_, &pc, &plan_) == GMTK_SUCCESS);
    }
    return plan_;
  }
  gmtkHandle_t handle() { return handle_; }
  gmtkGroupConfig_t& group() { return group_; }
  gmtkTensor_t* tensors() { return tensors_; }

  // Outputs and workspace, in the arena too.
  gmtkStepArgs_t args() {
    gmtkStepArgs_t a = GMTK_STEP_ARGS_INIT;
    a.thresholds = at(kOutputs);
    a.found_inf = at(kOutputs) + 2;
    a.kept_counts = reinterpret_cast<int64_t*>(at(kOutputs) + 4);
    return a;
  }
  unsigned char* workspace() { return reinterpret_cast<unsigned char*>(at(kWorkspace)); }
  float* grad() { return at(kGrad); }
  float* param() { return at(kParam); }

  void snapshot() { before_ = bytes_; }
  bool unchanged() const { return before_ == bytes_; }

 private:
  static constexpr size_t kEntries = 512;
  enum Region { kGrad, kParam, kExpAvg, kExpAvgSq, kOutputs, kWorkspace };
  float* at(Region region) { return reinterpret_cast<float*>(bytes_.data()) + region * 2048; }

  std::vector<unsigned char> bytes_;
  std::vector<unsigned char> before_;
  gmtkHandle_t handle_ = nullptr;
  gmtkPlan_t plan_ = nullptr;
  gmtkGroupConfig_t group_{};
  gmtkTensor_t tensors_[2];
};

// The status, a message containing `names`, and nothing written.
#define CHECK_REFUSAL(world, call, expected_status, names)          \
  do {                                                              \
    (world).snapshot();                                             \
    const gmtkStatus_t status_ = (call);                            \
    const std::string message_ = gmtkGetLastErrorMessage();         \
    INFO(#call << " -> " << gmtkGetErrorString(status_) << ": " << message_); \
    CHECK(status_ == (expected_status));                            \
    CHECK(message_.find(names) != std::string::npos);               \
    CHECK((world).unchanged());                                     \
  } while (0)

}  // namespace

TEST_CASE("GMTK_ERROR_INVALID_ARGUMENT: each kind of bad argument, named, nothing written", "[errors]") {
  ArenaWorld w;
  gmtkPlan_t plan = w.plan();
  CHECK_REFUSAL(w, gmtkStep(plan, nullptr, nullptr, 0, nullptr), GMTK_ERROR_INVALID_ARGUMENT, "args");

  gmtkStepArgs_t misaligned = w.args();
  misaligned.found_inf = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(misaligned.found_inf) + 1);
  CHECK_REFUSAL(w, gmtkStep(plan, &misaligned, nullptr, 0, nullptr), GMTK_ERROR_INVALID_ARGUMENT, "args->found_inf");

  gmtkStepArgs_t overlapping = w.args();
  overlapping.thresholds = w.grad();
  CHECK_REFUSAL(w, gmtkStep(plan, &overlapping, nullptr, 0, nullptr), GMTK_ERROR_INVALID_ARGUMENT,
                "args->thresholds");

  gmtkStepArgs_t both_inputs = w.args();
  const float given[2] = {0.1f, 0.2f};
  const uint32_t bits[32] = {};
  both_inputs.given_thresholds = given;
  both_inputs.given_mask_bits = bits;
  CHECK_REFUSAL(w, gmtkStep(plan, &both_inputs, nullptr, 0, nullptr), GMTK_ERROR_INVALID_ARGUMENT,
                "given_mask_bits");

  gmtkStepArgs_t bad_step = w.args();
  bad_step.step = 0;
  CHECK_REFUSAL(w, gmtkStep(plan, &bad_step, nullptr, 0, nullptr), GMTK_ERROR_INVALID_ARGUMENT, "step");

  gmtkStepArgs_t bad_size = w.args();
  bad_size.struct_size = 3;
  CHECK_REFUSAL(w, gmtkMaskGradients(plan, &bad_size, nullptr, 0, nullptr), GMTK_ERROR_INVALID_ARGUMENT,
                "struct_size");

  gmtkGroupConfig_t bad_ratio = w.group();
  bad_ratio.mask_ratio = 1.5;
  CHECK_REFUSAL(w, gmtkPlanSetGroupHyperparams(plan, 0, &bad_ratio), GMTK_ERROR_INVALID_ARGUMENT, "mask_ratio");

  // The refusals left the plan as it was and usable: the next step runs.
  gmtkStatus_t state = GMTK_ERROR_INTERNAL;
  CHECK(gmtkPlanGetState(plan, &state) == GMTK_SUCCESS);
  CHECK(state == GMTK_SUCCESS);
  CHECK(gmtkPlanGetState(plan, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(gmtkPlanGetState(nullptr, &state) == GMTK_ERROR_INVALID_ARGUMENT);
  const gmtkStepArgs_t good = w.args();
  CHECK(gmtkStep(plan, &good, nullptr, 0, nullptr) == GMTK_SUCCESS);
}

TEST_CASE("GMTK_ERROR_NOT_SUPPORTED: a global group over two gradient dtypes", "[errors]") {
  ArenaWorld w;
  w.group().scope = GMTK_SCOPE_GLOBAL;
  w.tensors()[1].grad_dtype = GMTK_FLOAT16;
  w.tensors()[1].numel = 100;
  const gmtkPlanConfig_t pc = w.plan_config();
  gmtkPlan_t plan = reinterpret_cast<gmtkPlan_t>(&w);  // left as it is on failure
  CHECK_REFUSAL(w, gmtkPlanCreate(w.handle(), &pc, &plan), GMTK_ERROR_NOT_SUPPORTED, "tensors[1]");
  CHECK(plan == reinterpret_cast<gmtkPlan_t>(&w));
}

TEST_CASE("GMTK_ERROR_INSUFFICIENT_WORKSPACE: none, or one byte short, and the workspace untouched", "[errors]") {
  ArenaWorld w;
  gmtkPlan_t plan = w.plan(false);
  size_t needed = 0;
  REQUIRE(gmtkPlanGetWorkspaceSize(plan, &needed) == GMTK_SUCCESS);
  REQUIRE(needed > 1);
  const gmtkStepArgs_t args = w.args();
  CHECK_REFUSAL(w, gmtkStep(plan, &args, nullptr, 0, nullptr), GMTK_ERROR_INSUFFICIENT_WORKSPACE, "workspace");
  CHECK_REFUSAL(w, gmtkSelectThresholds(plan, &args, w.workspace(), needed - 1, nullptr),
                GMTK_ERROR_INSUFFICIENT_WORKSPACE, "workspace");
  // With enough, the same call runs (and writes).
  CHECK(gmtkStep(plan, &args, w.workspace(), needed, nullptr) == GMTK_SUCCESS);
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define GMTK_TEST_UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define GMTK_TEST_UNDER_SANITIZER 1
#endif
#endif

TEST_CASE("GMTK_ERROR_OUT_OF_MEMORY: a plan that does not fit the address space", "[errors]") {
#ifdef GMTK_TEST_UNDER_SANITIZER
  SUCCEED("skipped under a sanitizer, whose shadow memory needs the address space this test takes away");
#else
  // In a child process: its address space is capped just above what it uses,
  // so the plan's copy of a million tensor records cannot be allocated.
  std::fflush(nullptr);
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    std::vector<gmtkTensor_t> records(1000000, gmtkTensor_t{});  // numel 0: valid without buffers
    gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
    hc.backend = GMTK_BACKEND_CPU_REFERENCE;
    gmtkHandle_t handle = nullptr;
    if (gmtkHandleCreate(&handle, &hc) != GMTK_SUCCESS) _exit(2);
    gmtkGroupConfig_t group;
    gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_SGD);
    gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
    pc.groups = &group;
    pc.num_groups = 1;
    pc.tensors = records.data();
    pc.num_tensors = static_cast<int64_t>(records.size());
    pc.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
    long pages = 0;
    if (FILE* statm = std::fopen("/proc/self/statm", "r")) {
      if (std::fscanf(statm, "%ld", &pages) != 1) pages = 0;
      std::fclose(statm);
    }
    if (pages == 0) _exit(3);
    const rlim_t cap = static_cast<rlim_t>(pages) * static_cast<rlim_t>(sysconf(_SC_PAGESIZE)) + (rlim_t{16} << 20);
    const struct rlimit limit{cap, cap};
    if (setrlimit(RLIMIT_AS, &limit) != 0) _exit(4);
    gmtkPlan_t plan = nullptr;
    const gmtkStatus_t status = gmtkPlanCreate(handle, &pc, &plan);
    const bool named = std::strstr(gmtkGetLastErrorMessage(), "alloc") != nullptr ||
                       std::strstr(gmtkGetLastErrorMessage(), "memory") != nullptr;
    _exit(status == GMTK_ERROR_OUT_OF_MEMORY && plan == nullptr && named ? 0 : 1);
  }
  int child_status = 0;
  REQUIRE(waitpid(child, &child_status, 0) == child);
  INFO("child exit status " << (WIFEXITED(child_status) ? WEXITSTATUS(child_status) : -1)
                            << " (0: OUT_OF_MEMORY with a message; 1: another status)");
  CHECK((WIFEXITED(child_status) && WEXITSTATUS(child_status) == 0));
#endif
}

TEST_CASE("GMTK_ERROR_DEVICE_UNAVAILABLE: a CUDA handle where no CUDA device is usable", "[errors]") {
  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  hc.backend = GMTK_BACKEND_CUDA;
  gmtkHandle_t handle = reinterpret_cast<gmtkHandle_t>(&hc);
  const gmtkStatus_t status = gmtkHandleCreate(&handle, &hc);
  if (status == GMTK_SUCCESS) {  // a GPU machine: the row is provoked only without one
    gmtkHandleDestroy(handle);
    hc.device = 1 << 20;
    handle = reinterpret_cast<gmtkHandle_t>(&hc);
    CHECK(gmtkHandleCreate(&handle, &hc) == GMTK_ERROR_INVALID_ARGUMENT);
    CHECK(std::string(gmtkGetLastErrorMessage()).find("config->device") != std::string::npos);
    CHECK(handle == reinterpret_cast<gmtkHandle_t>(&hc));
    return;
  }
  INFO(gmtkGetLastErrorMessage());
  CHECK(status == GMTK_ERROR_DEVICE_UNAVAILABLE);
  CHECK(std::string(gmtkGetLastErrorMessage()).find("CUDA device") != std::string::npos);
  CHECK(handle == reinterpret_cast<gmtkHandle_t>(&hc));  // *handle left as it was
}

TEST_CASE("every status has a name, and no other value is returned", "[errors]") {
  for (int s = 0; s < GMTK_NUM_STATUSES; ++s) {
    const std::string name = gmtkGetErrorString(static_cast<gmtkStatus_t>(s));
    CHECK(!name.empty());
    CHECK(name.find("unknown") == std::string::npos);
  }
  CHECK(std::string(gmtkGetErrorString(static_cast<gmtkStatus_t>(GMTK_NUM_STATUSES))).find("unknown") !=
        std::string::npos);
}
