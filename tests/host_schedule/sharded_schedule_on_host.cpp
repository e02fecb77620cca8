// The CUDA engine's sharded schedule on the host: one HostSelectionEngine per
// rank, each on its own thread, summing its counters with the other ranks'
// through the in-process communicator at the schedule's exchange points
// (where the CUDA backend calls NCCL between launches). Every rank must end
// with the thresholds, kept counts, found_inf, masks and updates of one
// unsharded plan on the CPU reference backend, bit for bit.
#include <catch2/catch.hpp>

#include <gmtk/gmtk.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "../../host/comm.hpp"
#include "host_selection_engine.hpp"

namespace {

using namespace gmtk_test;

size_t element_bytes(gmtkDtype_t dtype) { return dtype == GMTK_FLOAT32 ? 4 : 2; }

struct LogicalTensor {
  int32_t group;
  int64_t numel;
  gmtkDtype_t grad_dtype;
  bool replica;  // the whole tensor on every rank (data parallel) instead of shards
};

// One copy of every tensor's buffers: gradients as raw bytes, fp32 params and state.
struct Buffers {
  std::vector<std::vector<unsigned char>> grad;
  std::vector<std::vector<float>> param, exp_avg, exp_avg_sq;

  explicit Buffers(const std::vector<LogicalTensor>& tensors) {
    for (const LogicalTensor& t : tensors) {
      grad.emplace_back(static_cast<size_t>(t.numel) * element_bytes(t.grad_dtype));
      param.emplace_back(static_cast<size_t>(t.numel));
      exp_avg.emplace_back(static_cast<size_t>(t.numel), 0.0f);
      exp_avg_sq.emplace_back(static_cast<size_t>(t.numel), 0.0f);
    }
  }
};

// Finite gradients with many ties (values on a coarse grid, a few magnitudes
// shared by long runs), zeros of both signs and subnormals; 16-bit ones as raw
// patterns with a finite exponent.
void fill_gradients(const std::vector<LogicalTensor>& tensors, Buffers& buffers, uint32_t seed) {
  std::mt19937 random(seed);
  for (size_t t = 0; t < tensors.size(); ++t) {
    unsigned char* bytes = buffers.grad[t].data();
    for (int64_t i = 0; i < tensors[t].numel; ++i) {
      const uint32_t draw = random();
      if (tensors[t].grad_dtype == GMTK_FLOAT32) {
        float value = static_cast<float>(static_cast<int>(draw % 257) - 128) / 64.0f;
        if (draw % 23 == 0) value = -0.0f;
        if (draw % 29 == 0) value = 1e-40f;  // subnormal
        std::memcpy(bytes + 4 * i, &value, 4);
      } else {
        const uint16_t exponent_mask = tensors[t].grad_dtype == GMTK_FLOAT16 ? 0x7C00u : 0x7F80u;
        uint16_t raw = static_cast<uint16_t>(draw & 0xFFFFu);
        if ((raw & exponent_mask) == exponent_mask) raw = static_cast<uint16_t>(raw & ~0x4000u);
        if (draw % 7 == 0) raw = static_cast<uint16_t>(0x3C00u | (draw >> 28));  // a few shared magnitudes
        std::memcpy(bytes + 2 * i, &raw, 2);
      }
    }
  }
}

void fill_params(Buffers& buffers) {
  for (size_t t = 0; t < buffers.param.size(); ++t) {
    for (size_t i = 0; i < buffers.param[t].size(); ++i) buffers.param[t][i] = 0.5f - 0.001f * static_cast<float>(i % 997);
  }
}

// Each rank's [offset, offset + numel) of each sharded tensor: uneven cuts,
// some ranks empty (trailing ones too), one tensor held by a single middle rank.
std::vector<std::vector<std::pair<int64_t, int64_t>>> split(const std::vector<LogicalTensor>& tensors, int ranks,
                                                            uint32_t seed, bool last_rank_holds_nothing) {
  std::mt19937 random(seed);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> slices(static_cast<size_t>(ranks));
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel;
    std::vector<int64_t> cuts{0, n};
    if (t % 5 == 4) {  // wholly on one middle rank
      for (int r = 0; r < ranks; ++r) {
        const bool holder = r == ranks / 2;
        slices[r].push_back(holder ? std::make_pair(int64_t{0}, n) : std::make_pair(n, int64_t{0}));
      }
      continue;
    }
    for (int r = 1; r < ranks; ++r) cuts.push_back(static_cast<int64_t>(random() % static_cast<uint32_t>(n + 1)));
    std::sort(cuts.begin(), cuts.end());
    if (ranks > 2) cuts[static_cast<size_t>(ranks) - 1] = n;  // the last rank empty
    for (int r = 0; r < ranks; ++r) slices[r].push_back({cuts[r], cuts[r + 1] - cuts[r]});
  }
  if (last_rank_holds_nothing) {  // its share goes to the rank before it: it has no chunk at all
    for (size_t t = 0; t < tensors.size(); ++t) {
      auto& last = slices[static_cast<size_t>(ranks) - 1][t];
      auto& before = slices[static_cast<size_t>(ranks) - 2][t];
      if (before.first + before.second == last.first) before.second += last.second;
      else if (last.second > 0) before = {last.first, last.second};  // the previous rank was empty
      last = {tensors[t].numel, 0};
    }
  }
  return slices;
}

struct Outputs {
  std::vector<float> thresholds;
  std::vector<int64_t> kept_counts;
  float found_inf = -1.0f;
  int64_t step_count = 0;

  const float* given_thresholds = nullptr;  // a mask schedule's input (SPEC section 8), the same on every rank
  std::vector<uint32_t> mask_bits;         // non-empty: the call writes its bitmap here (even a rank of no entry)

  explicit Outputs(size_t n) : thresholds(n, -3.0f), kept_counts(n, -3) {}

  gmtkStepArgs_t args() {
    gmtkStepArgs_t a = GMTK_STEP_ARGS_INIT;
    a.given_thresholds = given_thresholds;
    a.mask_bits = mask_bits.empty() ? nullptr : mask_bits.data();
    a.thresholds = thresholds.data();
    a.kept_counts = kept_counts.data();
    a.found_inf = &found_inf;
    a.step_count = &step_count;
    return a;
  }
};

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}

struct Scenario {
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<LogicalTensor> tensors;
};

gmtkGroupConfig_t group(gmtkOptimizer_t optimizer, double ratio, gmtkScope_t scope, gmtkMaskMode_t mode) {
  gmtkGroupConfig_t g;
  gmtkGroupConfigInit(&g, optimizer);
  g.lr = 0.01;
  g.momentum = optimizer == GMTK_OPTIMIZER_SGD ? 0.9 : 0.0;
  g.mask_ratio = ratio;
  g.scope = scope;
  g.mask_mode = mode;
  return g;
}

Scenario scenario(gmtkOptimizer_t optimizer, double ratio, gmtkMaskMode_t mode) {
  Scenario s;
  s.groups = {group(optimizer, ratio, GMTK_SCOPE_PER_TENSOR, mode), group(optimizer, ratio, GMTK_SCOPE_GLOBAL, mode),
              group(optimizer, ratio, GMTK_SCOPE_GLOBAL, mode)};
  s.tensors = {{0, 1000, GMTK_FLOAT32, false}, {0, 7, GMTK_FLOAT32, false},    {0, 900, GMTK_BFLOAT16, false},
               {0, 300, GMTK_FLOAT16, false},  {0, 640, GMTK_FLOAT32, false},  {0, 600, GMTK_FLOAT32, true},
               {0, 50, GMTK_BFLOAT16, true},   {1, 500, GMTK_FLOAT32, false},  {1, 800, GMTK_FLOAT32, false},
               {1, 3, GMTK_FLOAT32, false},    {2, 400, GMTK_BFLOAT16, false}, {2, 250, GMTK_BFLOAT16, false}};
  return s;
}

// The step test's tuning, with deferral regions large enough to be used here.
SelectionTuning tiny_tuning() {
  SelectionTuning tuning = tiny_step_tuning();
  tuning.deferral_share = 16;
  tuning.min_deferrals = 16;
  return tuning;
}

// Runs `calls` (select, mask or step, one per entry) on the unsharded CPU
// reference and on `ranks` host engines, comparing after each.
void run_and_compare(const Scenario& s, int ranks, const std::vector<EngineCall>& calls, uint32_t seed,
                     int poisoned_rank = -1, EngineTrace* total = nullptr, bool last_rank_holds_nothing = false,
                     const std::vector<float>* given_thresholds = nullptr, bool write_bits = false) {
  const size_t n = s.tensors.size();
  Buffers expected(s.tensors);
  Buffers shared(s.tensors);  // shards point into these, each rank at its slices
  std::vector<Buffers> replicas(static_cast<size_t>(ranks), Buffers(s.tensors));
  fill_params(expected);
  fill_params(shared);
  for (Buffers& b : replicas) fill_params(b);
  const auto slices = split(s.tensors, ranks, seed, last_rank_holds_nothing);
  bool sharded = false;
  for (const LogicalTensor& t : s.tensors) sharded = sharded || !t.replica;

  // The reference: one unsharded plan.
  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  hc.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  REQUIRE(gmtkHandleCreate(&handle, &hc) == GMTK_SUCCESS);
  std::vector<gmtkTensor_t> full(n);
  for (size_t t = 0; t < n; ++t) {
    gmtkTensor_t& r = full[t];
    r = gmtkTensor_t{};
    r.group = s.tensors[t].group;
    r.numel = s.tensors[t].numel;
    r.grad_dtype = s.tensors[t].grad_dtype;
    r.grad = expected.grad[t].data();
    r.param_dtype = GMTK_FLOAT32;
    r.param = expected.param[t].data();
    r.exp_avg = expected.exp_avg[t].data();
    r.exp_avg_sq = s.groups[0].optimizer == GMTK_OPTIMIZER_SGD ? nullptr : expected.exp_avg_sq[t].data();
  }
  gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
  pc.groups = s.groups.data();
  pc.num_groups = static_cast<int32_t>(s.groups.size());
  pc.tensors = full.data();
  pc.num_tensors = static_cast<int64_t>(n);
  pc.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
  gmtkPlan_t plan = nullptr;
  REQUIRE(gmtkPlanCreate(handle, &pc, &plan) == GMTK_SUCCESS);

  // The ranks: records over their slices (replicas: their own whole copy).
  std::vector<gmtkComm_t> comms(static_cast<size_t>(ranks));
  REQUIRE(gmtkCommCreateInProcess(ranks, comms.data()) == GMTK_SUCCESS);
  std::atomic<int> failed_exchanges{0};
  std::vector<std::unique_ptr<HostSelectionEngine>> engines;
  for (int r = 0; r < ranks; ++r) {
    std::vector<gmtkTensor_t> records(n);
    for (size_t t = 0; t < n; ++t) {
      const LogicalTensor& logical = s.tensors[t];
      Buffers& owner = logical.replica ? replicas[r] : shared;
      const int64_t offset = logical.replica ? 0 : slices[r][t].first;
      gmtkTensor_t& record = records[t];
      record = full[t];
      record.numel = logical.replica ? logical.numel : slices[r][t].second;
      record.grad = owner.grad[t].data() + offset * static_cast<int64_t>(element_bytes(logical.grad_dtype));
      record.param = owner.param[t].data() + offset;
      record.exp_avg = owner.exp_avg[t].data() + offset;
      record.exp_avg_sq = full[t].exp_avg_sq != nullptr ? owner.exp_avg_sq[t].data() + offset : nullptr;
      record.logical_numel = logical.replica ? 0 : logical.numel;
      record.shard_offset = logical.replica ? 0 : offset;
    }
    std::shared_ptr<gmtk::Communicator> comm = comms[r]->communicator;
    // Runs on the rank's thread: no Catch assertion there (Catch is not
    // thread-safe); a failed sum is counted and checked after the join.
    engines.push_back(std::make_unique<HostSelectionEngine>(
        s.groups, records, tiny_tuning(), 3u, r,
        [comm, &failed_exchanges](unsigned long long* values, uint64_t count) {
          if (comm->all_reduce_sum(reinterpret_cast<uint64_t*>(values), count, nullptr) != GMTK_SUCCESS) {
            ++failed_exchanges;
          }
        }));
  }

  std::vector<Outputs> got(static_cast<size_t>(ranks), Outputs(n));
  Outputs want(n);
  if (given_thresholds != nullptr) {
    want.given_thresholds = given_thresholds->data();
    for (Outputs& out : got) out.given_thresholds = given_thresholds->data();
  }
  std::vector<uint64_t> want_offsets(n);
  if (write_bits) {
    uint64_t words = 0;
    REQUIRE(gmtkPlanGetMaskLayout(plan, &words, want_offsets.data()) == GMTK_SUCCESS);
    want.mask_bits.assign(std::max<uint64_t>(words, 1), 0u);
    for (int r = 0; r < ranks; ++r) got[r].mask_bits.assign(std::max<uint64_t>(engines[r]->tables().mask_words, 1), 0u);
  }
  for (size_t call = 0; call < calls.size(); ++call) {
    INFO("call " << call << " on " << ranks << " ranks");
    const uint32_t gradient_seed = seed * 131u + static_cast<uint32_t>(call);
    fill_gradients(s.tensors, expected, gradient_seed);
    fill_gradients(s.tensors, shared, gradient_seed);
    for (Buffers& b : replicas) fill_gradients(s.tensors, b, gradient_seed);
    if (poisoned_rank >= 0) {  // an inf in the first non-empty fp32 slice of that rank
      for (size_t t = 0; t < n; ++t) {
        if (s.tensors[t].replica || s.tensors[t].grad_dtype != GMTK_FLOAT32 || slices[poisoned_rank][t].second == 0) {
          continue;
        }
        const float inf = INFINITY;
        std::memcpy(shared.grad[t].data() + 4 * slices[poisoned_rank][t].first, &inf, 4);
        std::memcpy(expected.grad[t].data() + 4 * slices[poisoned_rank][t].first, &inf, 4);
        break;
      }
    }
    const gmtkStepArgs_t want_args = want.args();
    gmtkStatus_t status = GMTK_SUCCESS;
    switch (calls[call]) {
      case EngineCall::select_thresholds: status = gmtkSelectThresholds(plan, &want_args, nullptr, 0, nullptr); break;
      case EngineCall::mask_gradients: status = gmtkMaskGradients(plan, &want_args, nullptr, 0, nullptr); break;
      case EngineCall::step: status = gmtkStep(plan, &want_args, nullptr, 0, nullptr); break;
    }
    REQUIRE(status == GMTK_SUCCESS);
    if (poisoned_rank >= 0) REQUIRE(want.found_inf == 1.0f);  // the inf landed

    std::vector<EngineTrace> traces(static_cast<size_t>(ranks));
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks; ++r) {
      threads.emplace_back([&, r] { traces[r] = engines[r]->run(got[r].args(), calls[call]); });
    }
    for (std::thread& thread : threads) thread.join();
    CHECK(failed_exchanges.load() == 0);

    for (int r = 0; r < ranks; ++r) {
      INFO("rank " << r);
      CHECK((traces[r].exchanges > 0) == sharded);  // replicas alone: each rank selects alone
      CHECK(traces[r].misaligned_vector_items == 0);
      if (total != nullptr) {
        total->windows_used += traces[r].windows_used;
        total->window_misses += traces[r].window_misses;
        total->sets_gathering += traces[r].sets_gathering;
        total->sets_deferring += traces[r].sets_deferring;
        total->large_sets_selected += traces[r].large_sets_selected;
        total->small_sets_selected += traces[r].small_sets_selected;
      }
      CHECK(got[r].found_inf == want.found_inf);
      CHECK(got[r].step_count == want.step_count);
      for (size_t t = 0; t < n; ++t) {
        INFO("tensor " << t);
        CHECK(bits_of(got[r].thresholds[t]) == bits_of(want.thresholds[t]));
        CHECK(got[r].kept_counts[t] == want.kept_counts[t]);
      }
    }
    // A rank's bitmap holds its own entries' bits: its slice of the logical tensor's.
    for (int r = 0; write_bits && r < ranks; ++r) {
      INFO("bitmap of rank " << r);
      for (size_t t = 0; t < n; ++t) {
        const uint64_t offset = s.tensors[t].replica ? 0 : static_cast<uint64_t>(slices[r][t].first);
        const uint64_t count = engines[r]->tables().tensors[t].numel;
        const uint64_t first_word = engines[r]->tables().tensors[t].mask_word_offset;
        uint64_t differing = 0;
        for (uint64_t j = 0; j < count; ++j) {
          const uint32_t mine = (got[r].mask_bits[first_word + j / 32] >> (j % 32)) & 1u;
          const uint64_t logical = want_offsets[t] * 32 + offset + j;
          const uint32_t theirs = (want.mask_bits[logical / 32] >> (logical % 32)) & 1u;
          differing += mine != theirs ? 1 : 0;
        }
        INFO("tensor " << t);
        CHECK(differing == 0);
      }
    }
    // Gradients (masks), parameters and state: shards in place, each rank's replica copy.
    const auto same_bytes = [](const void* a, const void* b, size_t bytes) { return std::memcmp(a, b, bytes) == 0; };
    for (size_t t = 0; t < n; ++t) {
      INFO("tensor " << t);
      const size_t count = static_cast<size_t>(s.tensors[t].numel);
      const std::vector<Buffers*> copies =
          s.tensors[t].replica ? [&] {
            std::vector<Buffers*> all;
            for (Buffers& b : replicas) all.push_back(&b);
            return all;
          }()
                               : std::vector<Buffers*>{&shared};
      for (const Buffers* copy : copies) {
        CHECK(same_bytes(copy->grad[t].data(), expected.grad[t].data(), expected.grad[t].size()));
        CHECK(same_bytes(copy->param[t].data(), expected.param[t].data(), count * 4));
        CHECK(same_bytes(copy->exp_avg[t].data(), expected.exp_avg[t].data(), count * 4));
        CHECK(same_bytes(copy->exp_avg_sq[t].data(), expected.exp_avg_sq[t].data(), count * 4));
      }
    }
  }
  for (gmtkComm_t comm : comms) gmtkCommDestroy(comm);
  gmtkPlanDestroy(plan);
  gmtkHandleDestroy(handle);
}

}  // namespace

TEST_CASE("sharded selection and masking equal the unsharded reference on 2, 3 and 8 ranks",
          "[sharded_schedule_on_host]") {
  EngineTrace total;
  for (int ranks : {2, 3, 8}) {
    for (double ratio : {0.0, 0.3, 0.9, 0.999, 1.0}) {
      INFO("ratio " << ratio);
      const Scenario s = scenario(GMTK_OPTIMIZER_ADAMW, ratio, GMTK_MASK_GRAD);
      run_and_compare(s, ranks, {EngineCall::select_thresholds, EngineCall::mask_gradients},
                      static_cast<uint32_t>(ranks * 10 + ratio * 7), -1, &total);
    }
  }
  // The large-set machinery ran: windows, and the one-block path for the small replica.
  CHECK(total.windows_used > 0);
  CHECK(total.large_sets_selected > 0);
  CHECK(total.small_sets_selected > 0);
}

TEST_CASE("sharded steps equal the unsharded reference: AdamW both modes and SGD, 3 steps",
          "[sharded_schedule_on_host]") {
  EngineTrace total;
  const std::vector<EngineCall> steps(3, EngineCall::step);
  for (int ranks : {2, 3, 8}) {
    run_and_compare(scenario(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_MASK_GRAD), ranks, steps, 11u + ranks, -1, &total);
    run_and_compare(scenario(GMTK_OPTIMIZER_ADAMW, 0.5, GMTK_MASK_FREEZE), ranks, steps, 23u + ranks, -1, &total);
    run_and_compare(scenario(GMTK_OPTIMIZER_SGD, 0.99, GMTK_MASK_GRAD), ranks, steps, 37u + ranks, -1, &total);
  }
  // Replicas (large, unsharded) still gather and defer, counted on rank 0 alone.
  CHECK(total.sets_gathering + total.sets_deferring > 0);
}

TEST_CASE("an inf in one rank's shard makes every rank's step a no-op", "[sharded_schedule_on_host]") {
  for (int ranks : {2, 3, 8}) {
    for (int poisoned : {0, ranks / 2}) {
      INFO("inf on rank " << poisoned);
      run_and_compare(scenario(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_MASK_GRAD), ranks,
                      {EngineCall::step, EngineCall::mask_gradients, EngineCall::select_thresholds}, 5u + ranks,
                      poisoned);
    }
  }
}

TEST_CASE("data parallel alone: replicas only, each rank selects its own copy, no exchange",
          "[sharded_schedule_on_host]") {
  Scenario s = scenario(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_MASK_GRAD);
  for (LogicalTensor& t : s.tensors) t.replica = true;
  for (int ranks : {2, 3}) {
    run_and_compare(s, ranks, {EngineCall::select_thresholds, EngineCall::step, EngineCall::step, EngineCall::mask_gradients},
                    41u + ranks);
  }
}

TEST_CASE("a rank that holds no entry at all still takes part in every exchange, the deferred level's included",
          "[sharded_schedule_on_host]") {
  Scenario s = scenario(GMTK_OPTIMIZER_ADAMW, 0.9, GMTK_MASK_GRAD);
  std::vector<LogicalTensor> shards;
  for (const LogicalTensor& t : s.tensors) {
    if (!t.replica) shards.push_back(t);
  }
  s.tensors = shards;  // shards only: the last rank then has no chunk at all
  // A step's deferred level runs on every rank (it is decided from the sets,
  // not this rank's chunks), so the empty rank must make its exchange too.
  for (int ranks : {2, 3, 8}) {
    run_and_compare(s, ranks, {EngineCall::step, EngineCall::step, EngineCall::select_thresholds}, 53u + ranks, -1,
                    nullptr, true);
  }
}


namespace {

TEST_CASE("given thresholds on shards: no selection collective, kept counts summed to the logical tensors'",
          "[sharded_schedule_on_host][mask_schedule]") {
  for (int ranks : {2, 3}) {
    for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
      const Scenario s = scenario(GMTK_OPTIMIZER_ADAMW, 0.9, mode);
      std::vector<float> thresholds(s.tensors.size());
      for (size_t t = 0; t < thresholds.size(); ++t) thresholds[t] = t % 3 == 2 ? -1.0f : 0.05f * static_cast<float>(t + 1);
      run_and_compare(s, ranks, {EngineCall::select_thresholds, EngineCall::mask_gradients, EngineCall::step},
                      static_cast<uint32_t>(ranks * 3 + mode), -1, nullptr, ranks == 3, &thresholds);
    }
  }
}

}  // namespace

namespace {

TEST_CASE("the bitmap out on shards: every rank writes its slice's bits, a rank of no entry included, and no "
          "rank defers while any writes", "[sharded_schedule_on_host][mask_schedule]") {
  for (int ranks : {2, 3}) {
    for (gmtkMaskMode_t mode : {GMTK_MASK_GRAD, GMTK_MASK_FREEZE}) {
      Scenario s = scenario(GMTK_OPTIMIZER_ADAMW, 0.9, mode);
      EngineTrace total;
      run_and_compare(s, ranks, {EngineCall::step, EngineCall::select_thresholds, EngineCall::step},
                      static_cast<uint32_t>(ranks * 5 + mode), -1, &total, ranks == 3, nullptr, true);
      // Shards only, the last rank holding nothing: its bitmap has no word,
      // and it must still skip the deferral as the others do.
      std::vector<LogicalTensor> shards;
      for (const LogicalTensor& t : s.tensors) {
        if (!t.replica) shards.push_back(t);
      }
      s.tensors = shards;
      run_and_compare(s, ranks, {EngineCall::step, EngineCall::step}, static_cast<uint32_t>(ranks * 7 + mode), -1,
                      &total, true, nullptr, true);
      CHECK(total.sets_deferring == 0);
      CHECK(total.large_sets_selected > 0);
    }
  }
}

}  // namespace
