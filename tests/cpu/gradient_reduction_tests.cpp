// Data parallel: gmtkStepArgs_t.gradient_reduction on the CPU reference
// backend, ranks as threads of one in-process communicator. Each rank's
// replica gradients become the ranks' sum or mean (fp32, rank order, one
// rounding: docs/distributed.md), shards are left alone, and the step that
// follows equals an unsharded plan stepping on those reduced gradients.
#include <catch2/catch.hpp>

#include <gmtk/gmtk.h>

#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

using namespace gmtk_test;

namespace {

struct Replica {
  gmtkDtype_t dtype;
  size_t numel;
};

const Replica kReplicas[] = {{GMTK_FLOAT32, 1000}, {GMTK_BFLOAT16, 777}, {GMTK_FLOAT16, 64}, {GMTK_FLOAT32, 3}};
constexpr size_t kReplicaCount = sizeof(kReplicas) / sizeof(kReplicas[0]);

// One rank's buffers: its replica gradients (its own micro-batch's) and params/state.
struct RankBuffers {
  std::vector<Buffer> grad;  // test_support.hpp's: raw bytes of the replica's dtype
  std::vector<std::vector<float>> param, exp_avg, exp_avg_sq;

  RankBuffers() {
    for (const Replica& r : kReplicas) {
      grad.emplace_back(r.dtype, r.numel);
      param.emplace_back(r.numel, 0.25f);
      exp_avg.emplace_back(r.numel, 0.0f);
      exp_avg_sq.emplace_back(r.numel, 0.0f);
    }
  }

  std::vector<gmtkTensor_t> records() {
    std::vector<gmtkTensor_t> out;
    for (size_t t = 0; t < kReplicaCount; ++t) {
      gmtkTensor_t r{};
      r.group = 0;
      r.numel = static_cast<int64_t>(kReplicas[t].numel);
      r.grad_dtype = kReplicas[t].dtype;
      r.grad = grad[t].data();
      r.param_dtype = GMTK_FLOAT32;
      r.param = param[t].data();
      r.exp_avg = exp_avg[t].data();
      r.exp_avg_sq = exp_avg_sq[t].data();
      out.push_back(r);
    }
    return out;
  }
};

void fill(RankBuffers& buffers, uint32_t seed) {
  std::mt19937 random(seed);
  for (size_t t = 0; t < kReplicaCount; ++t) {
    for (size_t i = 0; i < kReplicas[t].numel; ++i) {
      buffers.grad[t].set(i, static_cast<float>(static_cast<int>(random() % 2001) - 1000) / 300.0f);
    }
  }
}

gmtkPlanConfig_t plan_config(gmtkGroupConfig_t* group, std::vector<gmtkTensor_t>& records, gmtkComm_t comm) {
  gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
  pc.groups = group;
  pc.num_groups = 1;
  pc.tensors = records.data();
  pc.num_tensors = static_cast<int64_t>(records.size());
  pc.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
  pc.comm = comm;
  return pc;
}

void run_ranks(int ranks, gmtkGradientReduction_t reduction) {
  INFO(ranks << " ranks, " << (reduction == GMTK_GRADIENTS_SUM ? "sum" : "mean"));
  gmtkGroupConfig_t group;
  REQUIRE(gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW) == GMTK_SUCCESS);
  group.mask_ratio = 0.7;
  group.lr = 0.01;

  std::vector<RankBuffers> rank_buffers(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) fill(rank_buffers[r], 100u + static_cast<uint32_t>(r));

  // The expected reduced gradients, computed here: fp32 sum in rank order,
  // divided by the rank count for the mean, rounded once to the dtype.
  RankBuffers expected;
  for (size_t t = 0; t < kReplicaCount; ++t) {
    for (size_t i = 0; i < kReplicas[t].numel; ++i) {
      float sum = 0.0f;
      for (int r = 0; r < ranks; ++r) sum += rank_buffers[r].grad[t].get(i);
      if (reduction == GMTK_GRADIENTS_AVERAGE) sum = sum / static_cast<float>(ranks);
      expected.grad[t].set(i, sum);
    }
  }
  const std::vector<Buffer> expected_grads = expected.grad;

  // The reference: one plan without a communicator on the reduced gradients.
  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  hc.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  REQUIRE(gmtkHandleCreate(&handle, &hc) == GMTK_SUCCESS);
  std::vector<gmtkTensor_t> reference_records = expected.records();
  gmtkPlanConfig_t reference_config = plan_config(&group, reference_records, nullptr);
  gmtkPlan_t reference = nullptr;
  REQUIRE(gmtkPlanCreate(handle, &reference_config, &reference) == GMTK_SUCCESS);
  std::vector<float> want_thresholds(kReplicaCount);
  gmtkStepArgs_t want_args = GMTK_STEP_ARGS_INIT;
  want_args.thresholds = want_thresholds.data();
  REQUIRE(gmtkStep(reference, &want_args, nullptr, 0, nullptr) == GMTK_SUCCESS);

  std::vector<gmtkComm_t> comms(static_cast<size_t>(ranks));
  REQUIRE(gmtkCommCreateInProcess(ranks, comms.data()) == GMTK_SUCCESS);
  std::vector<gmtkStatus_t> statuses(static_cast<size_t>(ranks), GMTK_ERROR_INTERNAL);
  std::vector<std::vector<float>> thresholds(static_cast<size_t>(ranks), std::vector<float>(kReplicaCount));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      std::vector<gmtkTensor_t> records = rank_buffers[r].records();
      gmtkPlanConfig_t pc = plan_config(&group, records, comms[r]);
      gmtkPlan_t plan = nullptr;
      statuses[r] = gmtkPlanCreate(handle, &pc, &plan);
      if (statuses[r] != GMTK_SUCCESS) return;
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.thresholds = thresholds[r].data();
      args.gradient_reduction = reduction;
      statuses[r] = gmtkStep(plan, &args, nullptr, 0, nullptr);
      gmtkPlanDestroy(plan);
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (gmtkComm_t comm : comms) gmtkCommDestroy(comm);

  for (int r = 0; r < ranks; ++r) {
    INFO("rank " << r);
    REQUIRE(statuses[r] == GMTK_SUCCESS);
    for (size_t t = 0; t < kReplicaCount; ++t) {
      INFO("tensor " << t);
      CHECK(rank_buffers[r].grad[t].bytes == expected_grads[t].bytes);  // reduced in place, the same bits everywhere
      CHECK(float_bits(thresholds[r][t]) == float_bits(want_thresholds[t]));
      CHECK(std::memcmp(rank_buffers[r].param[t].data(), expected.param[t].data(), kReplicas[t].numel * 4) == 0);
      CHECK(std::memcmp(rank_buffers[r].exp_avg_sq[t].data(), expected.exp_avg_sq[t].data(),
                        kReplicas[t].numel * 4) == 0);
    }
  }
  gmtkPlanDestroy(reference);
  gmtkHandleDestroy(handle);
}

}  // namespace

TEST_CASE("gradient_reduction sums or averages replica gradients over the ranks before the step", "[reduction]") {
  for (int ranks : {1, 2, 3, 8}) {
    run_ranks(ranks, GMTK_GRADIENTS_AVERAGE);
    run_ranks(ranks, GMTK_GRADIENTS_SUM);
  }
}

TEST_CASE("gradient_reduction is refused without a communicator or outside the enum; 0.1.0 args are accepted",
          "[reduction]") {
  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  hc.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  REQUIRE(gmtkHandleCreate(&handle, &hc) == GMTK_SUCCESS);
  gmtkGroupConfig_t group;
  REQUIRE(gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW) == GMTK_SUCCESS);
  RankBuffers buffers;
  fill(buffers, 5);
  const RankBuffers before = buffers;
  std::vector<gmtkTensor_t> records = buffers.records();
  gmtkPlanConfig_t pc = plan_config(&group, records, nullptr);
  gmtkPlan_t plan = nullptr;
  REQUIRE(gmtkPlanCreate(handle, &pc, &plan) == GMTK_SUCCESS);

  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.gradient_reduction = GMTK_GRADIENTS_AVERAGE;
  CHECK(gmtkStep(plan, &args, nullptr, 0, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(std::string(gmtkGetLastErrorMessage()).find("args->gradient_reduction") != std::string::npos);
  args.gradient_reduction = static_cast<gmtkGradientReduction_t>(7);
  CHECK(gmtkStep(plan, &args, nullptr, 0, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(std::string(gmtkGetLastErrorMessage()).find("args->gradient_reduction") != std::string::npos);
  for (size_t t = 0; t < kReplicaCount; ++t) {  // refused: nothing written
    CHECK(buffers.grad[t].bytes == before.grad[t].bytes);
    CHECK(buffers.param[t] == before.param[t]);
  }

  // A 0.1.0 caller's arguments end before gradient_reduction; whatever follows them is not read.
  struct {
    gmtkStepArgs_t args;
    unsigned char guard[8];
  } old{};
  old.args = GMTK_STEP_ARGS_INIT;
  old.args.struct_size = GMTK_STEP_ARGS_STRUCT_SIZE_V0_1;
  std::memset(reinterpret_cast<unsigned char*>(&old.args) + GMTK_STEP_ARGS_STRUCT_SIZE_V0_1, 0x5A,
              sizeof(gmtkStepArgs_t) - GMTK_STEP_ARGS_STRUCT_SIZE_V0_1);
  CHECK(gmtkStep(plan, &old.args, nullptr, 0, nullptr) == GMTK_SUCCESS);
  gmtkPlanDestroy(plan);
  gmtkHandleDestroy(handle);
}

TEST_CASE("gmtkCommGetBytes counts the payload docs/distributed.md's table gives", "[reduction]") {
  constexpr int kRanks = 2;
  gmtkComm_t comms[kRanks];
  REQUIRE(gmtkCommCreateInProcess(kRanks, comms) == GMTK_SUCCESS);
  uint64_t bytes = 1;
  REQUIRE(gmtkCommGetBytes(comms[0], &bytes) == GMTK_SUCCESS);
  CHECK(bytes == 0);
  CHECK(gmtkCommGetBytes(nullptr, &bytes) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(gmtkCommGetBytes(comms[0], nullptr) == GMTK_ERROR_INVALID_ARGUMENT);

  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  hc.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  REQUIRE(gmtkHandleCreate(&handle, &hc) == GMTK_SUCCESS);
  gmtkGroupConfig_t group;
  REQUIRE(gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW) == GMTK_SUCCESS);
  group.mask_ratio = 0.5;
  std::vector<float> grad(100);
  for (size_t i = 0; i < grad.size(); ++i) grad[i] = static_cast<float>(i) - 50.0f;
  uint64_t after_create[kRanks] = {};
  uint64_t after_call[kRanks] = {};
  gmtkStatus_t statuses[kRanks][2] = {};
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      gmtkTensor_t shard{};  // one fp32 shard: ranks hold [0, 60) and [60, 100)
      shard.numel = r == 0 ? 60 : 40;
      shard.grad_dtype = GMTK_FLOAT32;
      shard.grad = grad.data() + (r == 0 ? 0 : 60);
      shard.logical_numel = 100;
      shard.shard_offset = r == 0 ? 0 : 60;
      std::vector<gmtkTensor_t> records{shard};
      gmtkPlanConfig_t pc = plan_config(&group, records, comms[r]);
      gmtkPlan_t plan = nullptr;
      statuses[r][0] = gmtkPlanCreate(handle, &pc, &plan);
      gmtkCommGetBytes(comms[r], &after_create[r]);
      float threshold = 0.0f;
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.thresholds = &threshold;
      statuses[r][1] = gmtkSelectThresholds(plan, &args, nullptr, 0, nullptr);
      gmtkCommGetBytes(comms[r], &after_call[r]);
      gmtkPlanDestroy(plan);
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank " << r);
    CHECK(statuses[r][0] == GMTK_SUCCESS);
    CHECK(statuses[r][1] == GMTK_SUCCESS);
    CHECK(after_create[r] == 16 + 16 * 1);  // the verdict, then each record's offset and length
    // The call's verdict, 4 radix passes of 256 counters (fp32 keys), the kept count and found_inf.
    CHECK(after_call[r] - after_create[r] == 16 + 4 * 256 * 8 + (1 + 1) * 8);
  }
  for (gmtkComm_t comm : comms) gmtkCommDestroy(comm);
  gmtkHandleDestroy(handle);
}
