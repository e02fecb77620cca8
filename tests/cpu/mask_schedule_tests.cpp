// Mask schedules on the CPU reference backend (SPEC section 8): thresholds as
// an input, the kept-mask as a bitmap out and in.
#include <catch2/catch.hpp>

#include <gmtk/gmtk.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

using namespace gmtk_test;

namespace {

struct Spec {
  int32_t group;
  gmtkDtype_t dtype;
  size_t numel;
};

const Spec kSpecs[] = {{0, GMTK_FLOAT32, 1000}, {0, GMTK_BFLOAT16, 333}, {0, GMTK_FLOAT16, 64},
                       {0, GMTK_FLOAT32, 1},    {1, GMTK_FLOAT32, 77},   {1, GMTK_FLOAT32, 500}};
constexpr size_t kCount = sizeof(kSpecs) / sizeof(kSpecs[0]);

// One model's buffers (fp32 params and state) and gradients of each spec's dtype.
struct Model {
  std::vector<Buffer> grad;  // test_support.hpp's: raw bytes of each spec's dtype
  std::vector<std::vector<float>> param, m, v;

  Model() {
    for (const Spec& s : kSpecs) {
      grad.emplace_back(s.dtype, s.numel);
      param.emplace_back(s.numel, 0.5f);
      m.emplace_back(s.numel, 0.0f);
      v.emplace_back(s.numel, 0.0f);
    }
  }

  void fill(uint32_t seed) {
    std::mt19937 random(seed);
    for (size_t t = 0; t < kCount; ++t) {
      for (size_t i = 0; i < kSpecs[t].numel; ++i) {
        grad[t].set(i, static_cast<float>(static_cast<int>(random() % 401) - 200) / 64.0f);
      }
    }
  }

  std::vector<gmtkTensor_t> records() {
    std::vector<gmtkTensor_t> out(kCount);
    for (size_t t = 0; t < kCount; ++t) {
      gmtkTensor_t& r = out[t];
      r = gmtkTensor_t{};
      r.group = kSpecs[t].group;
      r.numel = static_cast<int64_t>(kSpecs[t].numel);
      r.grad_dtype = kSpecs[t].dtype;
      r.grad = grad[t].data();
      r.param_dtype = GMTK_FLOAT32;
      r.param = param[t].data();
      r.exp_avg = m[t].data();
      r.exp_avg_sq = v[t].data();
    }
    return out;
  }
};

struct Planned {
  gmtkHandle_t handle = nullptr;
  gmtkPlan_t plan = nullptr;
  std::vector<gmtkTensor_t> records;

  Planned(Model& model, gmtkMaskMode_t mode) {
    gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
    hc.backend = GMTK_BACKEND_CPU_REFERENCE;
    REQUIRE(gmtkHandleCreate(&handle, &hc) == GMTK_SUCCESS);
    gmtkGroupConfig_t groups[2];
    REQUIRE(gmtkGroupConfigInit(&groups[0], GMTK_OPTIMIZER_ADAMW) == GMTK_SUCCESS);
    groups[0].mask_ratio = 0.8;
    groups[0].mask_mode = mode;
    groups[1] = groups[0];
    groups[1].scope = GMTK_SCOPE_GLOBAL;
    records = model.records();
    gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
    pc.groups = groups;
    pc.num_groups = 2;
    pc.tensors = records.data();
    pc.num_tensors = static_cast<int64_t>(kCount);
    pc.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
    REQUIRE(gmtkPlanCreate(handle, &pc, &plan) == GMTK_SUCCESS);
  }
  ~Planned() {
    gmtkPlanDestroy(plan);
    gmtkHandleDestroy(handle);
  }
};

std::vector<uint64_t> expected_offsets() {
  std::vector<uint64_t> offsets;
  uint64_t words = 0;
  for (const Spec& s : kSpecs) {
    offsets.push_back(words);
    words += (s.numel + 31) / 32;
  }
  offsets.push_back(words);  // the total, last
  return offsets;
}

}  // namespace

TEST_CASE("the mask layout: each tensor on a word boundary, 1 bit per entry", "[mask_schedule]") {
  Model model;
  Planned p(model, GMTK_MASK_GRAD);
  uint64_t total = 0;
  std::vector<uint64_t> offsets(kCount, 99);
  REQUIRE(gmtkPlanGetMaskLayout(p.plan, &total, offsets.data()) == GMTK_SUCCESS);
  const std::vector<uint64_t> expected = expected_offsets();
  CHECK(total == expected.back());
  for (size_t t = 0; t < kCount; ++t) CHECK(offsets[t] == expected[t]);
  CHECK(gmtkPlanGetMaskLayout(p.plan, nullptr, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(gmtkPlanGetMaskLayout(p.plan, &total, nullptr) == GMTK_SUCCESS);
}

TEST_CASE("a call's thresholds and bitmap, given back, reproduce its selection bit for bit", "[mask_schedule]") {
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    INFO((mode == GMTK_MASK_GRAD ? "mask-grad" : "freeze"));
    Model selected, by_threshold, by_bits;
    for (Model* m : {&selected, &by_threshold, &by_bits}) m->fill(7);
    Planned a(selected, mode), b(by_threshold, mode), c(by_bits, mode);
    const uint64_t words = expected_offsets().back();

    // Selection, with its outputs: thresholds, kept counts, the bitmap (prefilled with ones).
    std::vector<float> thresholds(kCount);
    std::vector<int64_t> kept(kCount);
    std::vector<uint32_t> bits(words, 0xFFFFFFFFu);
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.thresholds = thresholds.data();
    args.kept_counts = kept.data();
    args.mask_bits = bits.data();
    REQUIRE(gmtkStep(a.plan, &args, nullptr, 0, nullptr) == GMTK_SUCCESS);

    // The bitmap is |g| >= T, entry by entry, with 0 past each tensor's end.
    const std::vector<uint64_t> offsets = expected_offsets();
    for (size_t t = 0; t < kCount; ++t) {
      INFO("tensor " << t);
      int64_t set_bits = 0;
      for (size_t i = 0; i < (kSpecs[t].numel + 31) / 32 * 32; ++i) {
        const bool bit = (bits[offsets[t] + i / 32] >> (i % 32)) & 1u;
        if (i >= kSpecs[t].numel) {
          CHECK_FALSE(bit);
          continue;
        }
        CHECK(bit == (std::fabs(selected.grad[t].get(i)) >= thresholds[t]));
        set_bits += bit ? 1 : 0;
      }
      CHECK(set_bits == kept[t]);
    }

    // The same step from the thresholds, and from the bitmap.
    std::vector<float> given_out(kCount);
    std::vector<int64_t> given_kept(kCount);
    gmtkStepArgs_t from_thresholds = GMTK_STEP_ARGS_INIT;
    from_thresholds.given_thresholds = thresholds.data();
    from_thresholds.thresholds = given_out.data();
    from_thresholds.kept_counts = given_kept.data();
    REQUIRE(gmtkStep(b.plan, &from_thresholds, nullptr, 0, nullptr) == GMTK_SUCCESS);
    CHECK(given_kept == kept);
    for (size_t t = 0; t < kCount; ++t) CHECK(float_bits(given_out[t]) == float_bits(thresholds[t]));

    std::vector<int64_t> bits_kept(kCount);
    std::vector<float> bits_thresholds(kCount);
    gmtkStepArgs_t from_bits = GMTK_STEP_ARGS_INIT;
    from_bits.given_mask_bits = bits.data();
    from_bits.kept_counts = bits_kept.data();
    from_bits.thresholds = bits_thresholds.data();
    REQUIRE(gmtkStep(c.plan, &from_bits, nullptr, 0, nullptr) == GMTK_SUCCESS);
    CHECK(bits_kept == kept);
    for (size_t t = 0; t < kCount; ++t) CHECK(std::isnan(bits_thresholds[t]));  // no threshold decided it

    for (size_t t = 0; t < kCount; ++t) {
      INFO("tensor " << t);
      CHECK(by_threshold.param[t] == selected.param[t]);
      CHECK(by_bits.param[t] == selected.param[t]);
      CHECK(by_threshold.v[t] == selected.v[t]);
      CHECK(by_bits.v[t] == selected.v[t]);
    }
  }
}

TEST_CASE("given thresholds keep |g| >= T on new gradients, T rounded up to 16-bit dtypes", "[mask_schedule]") {
  Model model;
  model.fill(11);
  Planned p(model, GMTK_MASK_GRAD);
  // 0.7 is a value of none of the dtypes; 2.0 of all; 0 and -1 keep everything; +inf keeps no finite entry.
  for (float t_value : {0.7f, 2.0f, 0.0f, -1.0f, INFINITY, 1.0009765625f}) {
    INFO("T = " << t_value);
    std::vector<float> given(kCount, t_value);
    std::vector<int64_t> kept(kCount, -1);
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.given_thresholds = given.data();
    args.kept_counts = kept.data();
    REQUIRE(gmtkSelectThresholds(p.plan, &args, nullptr, 0, nullptr) == GMTK_SUCCESS);
    for (size_t t = 0; t < kCount; ++t) {
      int64_t expected = 0;
      for (size_t i = 0; i < kSpecs[t].numel; ++i) {
        expected += std::fabs(model.grad[t].get(i)) >= t_value ? 1 : 0;
      }
      CHECK(kept[t] == expected);
    }
  }
  // gmtkMaskGradients with a given threshold zeroes exactly the entries below it.
  const Model before = model;
  std::vector<float> given(kCount, 1.5f);
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.given_thresholds = given.data();
  REQUIRE(gmtkMaskGradients(p.plan, &args, nullptr, 0, nullptr) == GMTK_SUCCESS);
  for (size_t t = 0; t < kCount; ++t) {
    for (size_t i = 0; i < kSpecs[t].numel; ++i) {
      const float was = before.grad[t].get(i);
      const float now = model.grad[t].get(i);
      if (std::fabs(was) >= 1.5f) {
        CHECK(float_bits(now) == float_bits(was));
      } else {
        CHECK(float_bits(now) == 0u);
      }
    }
  }
}

TEST_CASE("a given bitmap keeps exactly its entries whatever the gradients; freeze leaves the rest's bits",
          "[mask_schedule]") {
  Model model;
  model.fill(3);
  Planned p(model, GMTK_MASK_FREEZE);
  const uint64_t words = expected_offsets().back();
  std::vector<uint32_t> bits(words);
  std::mt19937 random(5);
  for (uint32_t& w : bits) w = random() & random();  // about a quarter kept
  const Model before = model;
  std::vector<int64_t> kept(kCount);
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.given_mask_bits = bits.data();
  args.kept_counts = kept.data();
  REQUIRE(gmtkStep(p.plan, &args, nullptr, 0, nullptr) == GMTK_SUCCESS);
  const std::vector<uint64_t> offsets = expected_offsets();
  for (size_t t = 0; t < kCount; ++t) {
    INFO("tensor " << t);
    int64_t set_bits = 0;
    for (size_t i = 0; i < kSpecs[t].numel; ++i) {
      const bool bit = (bits[offsets[t] + i / 32] >> (i % 32)) & 1u;
      set_bits += bit ? 1 : 0;
      const bool zero_gradient = model.grad[t].get(i) == 0.0f;
      if (!bit) {
        CHECK(float_bits(model.param[t][i]) == float_bits(before.param[t][i]));  // frozen
        CHECK(float_bits(model.m[t][i]) == float_bits(before.m[t][i]));
      } else if (!zero_gradient) {
        CHECK(float_bits(model.m[t][i]) != float_bits(before.m[t][i]));  // updated
      }
    }
    CHECK(kept[t] == set_bits);  // bits past the end (random here) are ignored
  }
}

TEST_CASE("mask schedule arguments are checked before anything is written", "[mask_schedule]") {
  Model model;
  model.fill(1);
  Planned p(model, GMTK_MASK_GRAD);
  const Model before = model;
  const uint64_t words = expected_offsets().back();
  std::vector<float> given(kCount, 1.0f);
  std::vector<uint32_t> bits(words, 0u);

  gmtkStepArgs_t both = GMTK_STEP_ARGS_INIT;
  both.given_thresholds = given.data();
  both.given_mask_bits = bits.data();
  CHECK(gmtkStep(p.plan, &both, nullptr, 0, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(std::string(gmtkGetLastErrorMessage()).find("given_mask_bits") != std::string::npos);

  gmtkStepArgs_t onto_gradient = GMTK_STEP_ARGS_INIT;  // the bitmap output over a gradient
  onto_gradient.mask_bits = reinterpret_cast<uint32_t*>(model.grad[0].data());
  CHECK(gmtkStep(p.plan, &onto_gradient, nullptr, 0, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(std::string(gmtkGetLastErrorMessage()).find("args->mask_bits") != std::string::npos);

  std::vector<uint32_t> shared(words + kCount, 0u);  // the given thresholds inside the bitmap output
  gmtkStepArgs_t overlapping = GMTK_STEP_ARGS_INIT;
  overlapping.mask_bits = shared.data();
  overlapping.given_thresholds = reinterpret_cast<const float*>(shared.data() + 1);
  CHECK(gmtkStep(p.plan, &overlapping, nullptr, 0, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(std::string(gmtkGetLastErrorMessage()).find("args->given_thresholds") != std::string::npos);

  for (size_t t = 0; t < kCount; ++t) {
    CHECK(model.grad[t].bytes == before.grad[t].bytes);
    CHECK(model.param[t] == before.param[t]);
    CHECK(model.m[t] == before.m[t]);
  }
}

TEST_CASE("shards: given thresholds need no selection, kept counts are the logical tensor's, bits the slice's",
          "[mask_schedule]") {
  constexpr int kRanks = 2;
  constexpr int64_t kNumel = 1000;
  constexpr int64_t kCut = 600;  // not a multiple of 32: rank 1's bits start at its own entry 0
  std::vector<float> grad(kNumel);
  std::mt19937 random(9);
  for (float& g : grad) g = static_cast<float>(static_cast<int>(random() % 201) - 100) / 16.0f;
  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  hc.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  REQUIRE(gmtkHandleCreate(&handle, &hc) == GMTK_SUCCESS);
  gmtkGroupConfig_t group;
  REQUIRE(gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW) == GMTK_SUCCESS);
  group.mask_ratio = 0.75;

  // The unsharded selection: T, the kept count, the bitmap.
  gmtkTensor_t whole{};
  whole.numel = kNumel;
  whole.grad_dtype = GMTK_FLOAT32;
  whole.grad = grad.data();
  gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
  pc.groups = &group;
  pc.num_groups = 1;
  pc.tensors = &whole;
  pc.num_tensors = 1;
  pc.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
  gmtkPlan_t plan = nullptr;
  REQUIRE(gmtkPlanCreate(handle, &pc, &plan) == GMTK_SUCCESS);
  float threshold = 0.0f;
  int64_t kept = 0;
  std::vector<uint32_t> bits((kNumel + 31) / 32);
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.thresholds = &threshold;
  args.kept_counts = &kept;
  args.mask_bits = bits.data();
  REQUIRE(gmtkSelectThresholds(plan, &args, nullptr, 0, nullptr) == GMTK_SUCCESS);
  gmtkPlanDestroy(plan);

  gmtkComm_t comms[kRanks];
  REQUIRE(gmtkCommCreateInProcess(kRanks, comms) == GMTK_SUCCESS);
  int64_t rank_kept[kRanks] = {};
  std::vector<uint32_t> rank_bits[kRanks];
  gmtkStatus_t statuses[kRanks] = {};
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      gmtkTensor_t shard{};
      shard.numel = r == 0 ? kCut : kNumel - kCut;
      shard.grad_dtype = GMTK_FLOAT32;
      shard.grad = grad.data() + (r == 0 ? 0 : kCut);
      shard.logical_numel = kNumel;
      shard.shard_offset = r == 0 ? 0 : kCut;
      gmtkPlanConfig_t config = pc;
      config.tensors = &shard;
      config.comm = comms[r];
      gmtkPlan_t rank_plan = nullptr;
      statuses[r] = gmtkPlanCreate(handle, &config, &rank_plan);
      if (statuses[r] != GMTK_SUCCESS) return;
      uint64_t words = 0;
      gmtkPlanGetMaskLayout(rank_plan, &words, nullptr);
      rank_bits[r].assign(words, 0xFFFFFFFFu);
      gmtkStepArgs_t given = GMTK_STEP_ARGS_INIT;
      given.given_thresholds = &threshold;
      given.kept_counts = &rank_kept[r];
      given.mask_bits = rank_bits[r].data();
      statuses[r] = gmtkSelectThresholds(rank_plan, &given, nullptr, 0, nullptr);
      gmtkPlanDestroy(rank_plan);
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (gmtkComm_t comm : comms) gmtkCommDestroy(comm);
  gmtkHandleDestroy(handle);
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank " << r);
    REQUIRE(statuses[r] == GMTK_SUCCESS);
    CHECK(rank_kept[r] == kept);
    const int64_t begin = r == 0 ? 0 : kCut;
    const int64_t count = r == 0 ? kCut : kNumel - kCut;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t j = begin + i;
      CHECK(((rank_bits[r][i / 32] >> (i % 32)) & 1u) == ((bits[j / 32] >> (j % 32)) & 1u));
    }
  }
}

TEST_CASE("a score buffer chooses the mask, the gradient is what is applied", "[mask_schedule]") {
  // Three models with the same parameters: (a) gradients G, scores S; (b)
  // gradients S (its selection is the score's); (c) gradients G with (b)'s
  // bitmap given. (a) must select as (b) and update as (c).
  Model a, b, c;
  a.fill(21);
  c.fill(21);
  b.fill(22);  // b's gradients are the scores
  for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
    INFO((mode == GMTK_MASK_GRAD ? "mask-grad" : "freeze"));
    Planned pb(b, mode), pc(c, mode);
    // (a)'s plan: the same records, with scores pointing at b's gradients.
    gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
    hc.backend = GMTK_BACKEND_CPU_REFERENCE;
    gmtkHandle_t handle = nullptr;
    REQUIRE(gmtkHandleCreate(&handle, &hc) == GMTK_SUCCESS);
    gmtkGroupConfig_t groups[2];
    REQUIRE(gmtkGroupConfigInit(&groups[0], GMTK_OPTIMIZER_ADAMW) == GMTK_SUCCESS);
    groups[0].mask_ratio = 0.8;
    groups[0].mask_mode = mode;
    groups[1] = groups[0];
    groups[1].scope = GMTK_SCOPE_GLOBAL;
    std::vector<gmtkTensor_t> records = a.records();
    for (size_t t = 0; t < kCount; ++t) {
      records[t].score = b.grad[t].data();
      records[t].score_dtype = kSpecs[t].dtype;
    }
    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = groups;
    config.num_groups = 2;
    config.tensors = records.data();
    config.num_tensors = static_cast<int64_t>(kCount);
    config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
    gmtkPlan_t pa = nullptr;
    REQUIRE(gmtkPlanCreate(handle, &config, &pa) == GMTK_SUCCESS);

    const uint64_t words = expected_offsets().back();
    std::vector<float> ta(kCount), tb(kCount);
    std::vector<int64_t> ka(kCount), kb(kCount);
    std::vector<uint32_t> ba(words), bb(words);
    gmtkStepArgs_t args_a = GMTK_STEP_ARGS_INIT;
    args_a.thresholds = ta.data();
    args_a.kept_counts = ka.data();
    args_a.mask_bits = ba.data();
    gmtkStepArgs_t args_b = args_a;
    args_b.thresholds = tb.data();
    args_b.kept_counts = kb.data();
    args_b.mask_bits = bb.data();
    REQUIRE(gmtkSelectThresholds(pb.plan, &args_b, nullptr, 0, nullptr) == GMTK_SUCCESS);
    REQUIRE(gmtkStep(pa, &args_a, nullptr, 0, nullptr) == GMTK_SUCCESS);
    gmtkStepArgs_t args_c = GMTK_STEP_ARGS_INIT;
    args_c.given_mask_bits = bb.data();
    REQUIRE(gmtkStep(pc.plan, &args_c, nullptr, 0, nullptr) == GMTK_SUCCESS);

    for (size_t t = 0; t < kCount; ++t) {
      INFO("tensor " << t);
      CHECK(float_bits(ta[t]) == float_bits(tb[t]));
      CHECK(ka[t] == kb[t]);
      CHECK(a.param[t] == c.param[t]);
      CHECK(a.m[t] == c.m[t]);
      CHECK(a.v[t] == c.v[t]);
    }
    CHECK(ba == bb);
    gmtkPlanDestroy(pa);
    gmtkHandleDestroy(handle);
  }
}
