// cpu_threads: the thread-safety contract of docs/api.md ("Threads"), on the
// CPU reference backend: one handle shared by threads that each create,
// call and destroy their own plans at the same time; the last-error message
// kept per thread; handles created and destroyed concurrently. Each thread's
// results are compared with the same work done on one thread. CI also runs
// this test under ThreadSanitizer (scripts/sanitizer-tests.sh).
#include <gmtk/gmtk.h>

#include <catch2/catch.hpp>

#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kThreads = 8;
constexpr int kSteps = 4;

// One model's buffers and the bytes they end with after kSteps steps.
struct Model {
  std::vector<float> grad, param, exp_avg, exp_avg_sq;
  std::vector<float> thresholds = std::vector<float>(2);

  explicit Model(int seed) {
    const size_t n = 700;
    grad.resize(n);
    param.resize(n);
    for (size_t i = 0; i < n; ++i) {
      grad[i] = std::sin(static_cast<float>(i * 7 + seed * 13)) * 1e-2f;
      param[i] = 0.1f * static_cast<float>((i + static_cast<size_t>(seed)) % 17);
    }
    exp_avg.assign(n, 0.0f);
    exp_avg_sq.assign(n, 0.0f);
  }

  // Steps the model on its own plan from `handle`; returns the first failure's text, or "".
  std::string train(gmtkHandle_t handle, int seed) {
    gmtkGroupConfig_t group;
    gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW);
    group.mask_ratio = 0.3 + 0.05 * (seed % 5);
    group.scope = seed % 2 == 0 ? GMTK_SCOPE_GLOBAL : GMTK_SCOPE_PER_TENSOR;
    gmtkTensor_t tensors[2] = {};
    const size_t half = grad.size() / 2;
    for (int t = 0; t < 2; ++t) {
      const size_t begin = t == 0 ? 0 : half;
      tensors[t].numel = static_cast<int64_t>(t == 0 ? half : grad.size() - half);
      tensors[t].grad_dtype = GMTK_FLOAT32;
      tensors[t].param_dtype = GMTK_FLOAT32;
      tensors[t].grad = grad.data() + begin;
      tensors[t].param = param.data() + begin;
      tensors[t].exp_avg = exp_avg.data() + begin;
      tensors[t].exp_avg_sq = exp_avg_sq.data() + begin;
    }
    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = &group;
    config.num_groups = 1;
    config.tensors = tensors;
    config.num_tensors = 2;
    config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
    gmtkPlan_t plan = nullptr;
    if (gmtkPlanCreate(handle, &config, &plan) != GMTK_SUCCESS) return gmtkGetLastErrorMessage();
    std::string failure;
    for (int step = 1; step <= kSteps && failure.empty(); ++step) {
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.step = step;
      args.thresholds = thresholds.data();
      if (gmtkStep(plan, &args, nullptr, 0, nullptr) != GMTK_SUCCESS) failure = gmtkGetLastErrorMessage();
    }
    gmtkPlanDestroy(plan);
    return failure;
  }

  bool same_bytes(const Model& other) const {
    const auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
      return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
    };
    return same(param, other.param) && same(exp_avg, other.exp_avg) && same(exp_avg_sq, other.exp_avg_sq) &&
           same(thresholds, other.thresholds);
  }
};

// Safe on any thread (Catch's assertions are not): NULL on failure.
gmtkHandle_t make_cpu_handle() {
  gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
  config.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  return gmtkHandleCreate(&handle, &config) == GMTK_SUCCESS ? handle : nullptr;
}

}  // namespace

// Catch's assertions run on the test's own thread only: worker threads
// record what they saw, and the test checks it after joining them.

TEST_CASE("threads sharing one handle create, step and destroy their own plans at once", "[threads]") {
  gmtkHandle_t handle = make_cpu_handle();
  REQUIRE(handle != nullptr);
  // What each model ends as when trained alone.
  std::vector<Model> alone;
  for (int t = 0; t < kThreads; ++t) {
    alone.emplace_back(t);
    REQUIRE(alone.back().train(handle, t).empty());
  }
  std::vector<Model> together;
  for (int t = 0; t < kThreads; ++t) together.emplace_back(t);
  std::vector<std::string> failures(kThreads);
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ++ready;
      while (ready.load() < kThreads) std::this_thread::yield();  // start together
      failures[t] = together[t].train(handle, t);
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) {
    INFO("thread " << t);
    CHECK(failures[t].empty());
    CHECK(together[t].same_bytes(alone[t]));
  }
  gmtkHandleDestroy(handle);
}

TEST_CASE("the last-error message is the calling thread's own", "[threads]") {
  std::vector<std::string> messages(kThreads);
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      gmtkGroupConfig_t group;
      gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_SGD);
      group.mask_ratio = 2.0 + t;  // a refusal whose message names this thread's value
      gmtkHandle_t handle = make_cpu_handle();
      if (handle == nullptr) {
        messages[t] = "gmtkHandleCreate failed";
        ++ready;
        return;
      }
      gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
      config.groups = &group;
      config.num_groups = 1;
      gmtkPlan_t plan = nullptr;
      ++ready;
      while (ready.load() < kThreads) std::this_thread::yield();
      for (int repeat = 0; repeat < 50; ++repeat) {
        if (gmtkPlanCreate(handle, &config, &plan) != GMTK_SUCCESS) messages[t] = gmtkGetLastErrorMessage();
      }
      gmtkHandleDestroy(handle);
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) {
    INFO(messages[t]);
    CHECK(messages[t].find("mask_ratio is " + std::to_string(2 + t)) != std::string::npos);
  }
}

TEST_CASE("handles and plans are created and destroyed on several threads in any order", "[threads]") {
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  gmtkHandle_t shared = make_cpu_handle();
  REQUIRE(shared != nullptr);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int repeat = 0; repeat < 20; ++repeat) {
        gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
        config.backend = GMTK_BACKEND_CPU_REFERENCE;
        gmtkHandle_t own = nullptr;
        if (gmtkHandleCreate(&own, &config) != GMTK_SUCCESS) ++failures;
        Model model(t);
        // A plan of the shared handle outlives the thread's own handle's destruction order.
        if (!model.train(repeat % 2 == 0 ? shared : own, t).empty()) ++failures;
        gmtkHandleDestroy(own);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  gmtkHandleDestroy(shared);
  CHECK(failures.load() == 0);
}
