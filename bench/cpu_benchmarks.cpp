// CPU reference backend benchmarks: they run anywhere, and show that the oracle
// stays usable at 1e8 entries. Timed with the wall clock.
#include <benchmark/benchmark.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "step_benchmarks.hpp"

namespace gmtk_bench {
namespace {

// Host storage of one tensor's buffers.
struct HostTensor {
  std::vector<unsigned char> grad, param;
  std::vector<float> master, exp_avg, exp_avg_sq;
};

uint16_t to_16bit(gmtkDtype_t dtype, float value) {
  if (dtype == GMTK_FLOAT16) {
    const _Float16 half = static_cast<_Float16>(value);
    uint16_t bits;
    std::memcpy(&bits, &half, 2);
    return bits;
  }
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // bf16, nearest-even (finite input)
}

void store(gmtkDtype_t dtype, std::vector<unsigned char>& bytes, size_t i, float value) {
  if (dtype == GMTK_FLOAT32) {
    std::memcpy(bytes.data() + 4 * i, &value, 4);
  } else {
    const uint16_t bits = to_16bit(dtype, value);
    std::memcpy(bytes.data() + 2 * i, &bits, 2);
  }
}

// A CPU-reference handle and a one-group plan over `tensors` (bound to `comm`
// if set: then every rank makes this call); on failure the benchmark is
// skipped with gmtk's message and false returned.
bool make_cpu_plan(benchmark::State& state, const gmtkGroupConfig_t& group, std::vector<gmtkTensor_t>& tensors,
                   gmtkComm_t comm, gmtkHandle_t* handle, gmtkPlan_t* plan) {
  gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
  handle_config.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkPlanConfig_t plan_config = GMTK_PLAN_CONFIG_INIT;
  plan_config.groups = &group;
  plan_config.num_groups = 1;
  plan_config.tensors = tensors.data();
  plan_config.num_tensors = static_cast<int64_t>(tensors.size());
  plan_config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
  plan_config.comm = comm;
  if (gmtkHandleCreate(handle, &handle_config) != GMTK_SUCCESS ||
      gmtkPlanCreate(*handle, &plan_config, plan) != GMTK_SUCCESS) {
    state.SkipWithError(gmtkGetLastErrorMessage());
    gmtkHandleDestroy(*handle);
    return false;
  }
  return true;
}

void run_cpu_call(benchmark::State& state, const StepSpec& spec) {
  const size_t count = spec.shapes.numels.size();
  std::vector<HostTensor> storage(count);
  std::vector<gmtkTensor_t> tensors(count);
  for (size_t t = 0; t < count; ++t) {
    const auto n = static_cast<size_t>(spec.shapes.numels[t]);
    HostTensor& h = storage[t];
    h.grad.resize(n * dtype_bytes(spec.grad_dtype));
    h.param.resize(n * dtype_bytes(spec.param_dtype));
    for (size_t i = 0; i < n; ++i) {
      store(spec.grad_dtype, h.grad, i, gradient_value(spec.distribution, 1, t, i));
      store(spec.param_dtype, h.param, i, 0.02f * standard_normal(i * 7 + t));
    }
    if (spec.call == Call::step) {
      h.exp_avg.assign(n, 0.0f);
      if (spec.optimizer != GMTK_OPTIMIZER_SGD) h.exp_avg_sq.assign(n, 0.0f);
      if (spec.master) h.master.assign(n, 0.0f);
    }
    gmtkTensor_t& d = tensors[t];
    d = gmtkTensor_t{};
    d.numel = static_cast<int64_t>(n);
    d.grad_dtype = spec.grad_dtype;
    d.grad = h.grad.data();
    d.param_dtype = spec.param_dtype;
    if (spec.call == Call::step) {
      d.param = h.param.data();
      d.master_param = spec.master ? h.master.data() : nullptr;
      d.exp_avg = h.exp_avg.data();
      d.exp_avg_sq = h.exp_avg_sq.empty() ? nullptr : h.exp_avg_sq.data();
    }
  }

  const gmtkGroupConfig_t group = spec.group();
  gmtkHandle_t handle = nullptr;
  gmtkPlan_t plan = nullptr;
  if (!make_cpu_plan(state, group, tensors, nullptr, &handle, &plan)) return;
  std::vector<float> thresholds(count);
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.thresholds = thresholds.data();
  std::vector<uint32_t> given_input((spec.input_bytes(plan) + 3) / 4);
  if (spec.prepare_input(plan, given_input.data(), nullptr, 0, nullptr, &args) != GMTK_SUCCESS) {
    state.SkipWithError(gmtkGetLastErrorMessage());
    return;
  }
  int64_t step = 0;
  for (auto _ : state) {
    args.step = ++step;
    if (spec.invoke(plan, args, nullptr, 0, nullptr) != GMTK_SUCCESS) {
      state.SkipWithError(gmtkGetLastErrorMessage());
      break;
    }
    benchmark::DoNotOptimize(thresholds.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(spec.floor_bytes() * static_cast<double>(state.iterations())));
  state.counters["entries"] = static_cast<double>(spec.shapes.total());
  gmtkPlanDestroy(plan);
  gmtkHandleDestroy(handle);
}

void register_spec(const StepSpec& spec, int iterations = 0) {
  registered_specs()[spec.name()] = spec;
  auto* benchmark = benchmark::RegisterBenchmark(spec.name().c_str(),
                                                 [spec](benchmark::State& state) { run_cpu_call(state, spec); });
  benchmark->UseRealTime()->Unit(benchmark::kMillisecond);
  if (iterations > 0) benchmark->Iterations(iterations);
}

// A sharded AdamW step on 2 ranks (this benchmark's 2 threads) through the
// in-process communicator, each rank holding an uneven part of every tensor:
// time, and the payload bytes each rank hands to collectives per step
// (gmtkCommGetBytes; docs/distributed.md's table for the CPU reference).
void cpu_sharded_step(benchmark::State& state, const ShapeList& shapes, gmtkScope_t scope) {
  constexpr int kRanks = 2;
  static gmtkComm_t comms[kRanks];
  static std::once_flag created;
  std::call_once(created, [] { gmtkCommCreateInProcess(kRanks, comms); });
  const int rank = state.thread_index();
  const size_t count = shapes.numels.size();
  std::vector<HostTensor> storage(count);
  std::vector<gmtkTensor_t> tensors(count);
  for (size_t t = 0; t < count; ++t) {
    const int64_t n = shapes.numels[t];
    const int64_t cut = n * 3 / 5;  // rank 0 holds [0, cut), rank 1 the rest
    const int64_t begin = rank == 0 ? 0 : cut;
    const auto held = static_cast<size_t>(rank == 0 ? cut : n - cut);
    HostTensor& h = storage[t];
    h.grad.resize(held * 4);
    h.param.resize(held * 4);
    h.exp_avg.assign(held, 0.0f);
    h.exp_avg_sq.assign(held, 0.0f);
    for (size_t i = 0; i < held; ++i) {
      store(GMTK_FLOAT32, h.grad, i, gradient_value(Distribution::gaussian, 1, t, static_cast<size_t>(begin) + i));
      store(GMTK_FLOAT32, h.param, i, 0.02f * standard_normal(i * 7 + t));
    }
    gmtkTensor_t& d = tensors[t];
    d = gmtkTensor_t{};
    d.numel = static_cast<int64_t>(held);
    d.grad_dtype = GMTK_FLOAT32;
    d.grad = h.grad.data();
    d.param_dtype = GMTK_FLOAT32;
    d.param = h.param.data();
    d.exp_avg = h.exp_avg.data();
    d.exp_avg_sq = h.exp_avg_sq.data();
    d.logical_numel = n;
    d.shard_offset = begin;
  }
  gmtkGroupConfig_t group;
  gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_ADAMW);
  group.mask_ratio = 0.9;
  group.scope = scope;
  gmtkHandle_t handle = nullptr;
  gmtkPlan_t plan = nullptr;
  // Collective: both threads make their plan (a failure fails both).
  if (!make_cpu_plan(state, group, tensors, comms[rank], &handle, &plan)) return;
  uint64_t bytes_before = 0;
  gmtkCommGetBytes(comms[rank], &bytes_before);
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  int64_t step = 0;
  for (auto _ : state) {
    args.step = ++step;
    if (gmtkStep(plan, &args, nullptr, 0, nullptr) != GMTK_SUCCESS) {
      state.SkipWithError(gmtkGetLastErrorMessage());
      break;
    }
  }
  uint64_t bytes_after = 0;
  gmtkCommGetBytes(comms[rank], &bytes_after);
  const double steps = static_cast<double>(state.iterations());
  state.counters["comm_bytes_per_step"] =
      benchmark::Counter(static_cast<double>(bytes_after - bytes_before) / steps, benchmark::Counter::kAvgThreads);
  state.counters["tensors"] = benchmark::Counter(static_cast<double>(count), benchmark::Counter::kAvgThreads);
  gmtkPlanDestroy(plan);
  gmtkHandleDestroy(handle);
}

void cpu_memcpy(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(state.range(0));
  std::vector<unsigned char> source(bytes, 1), destination(bytes, 0);
  for (auto _ : state) {
    std::memcpy(destination.data(), source.data(), bytes);
    benchmark::DoNotOptimize(destination.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(2 * bytes * state.iterations()));  // read + write
}

}  // namespace

void register_cpu_benchmarks(bool large) {
  benchmark::RegisterBenchmark("cpu/memcpy", cpu_memcpy)->Arg(int64_t{1} << 28)->ArgName("bytes")->UseRealTime()->Unit(
      benchmark::kMillisecond);

  for (const gmtkScope_t scope : {GMTK_SCOPE_PER_TENSOR, GMTK_SCOPE_GLOBAL}) {
    const ShapeList shapes = llama_shaped_mini(2);
    const std::string name = std::string("cpu/sharded_step/") + shapes.name + "/adamw/" +
                             (scope == GMTK_SCOPE_GLOBAL ? "global" : "per_tensor") + "/r0.9/ranks2";
    benchmark::RegisterBenchmark(name.c_str(), [shapes, scope](benchmark::State& state) {
      cpu_sharded_step(state, shapes, scope);
    })->Threads(2)->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);
  }

  StepSpec base;
  base.device = "cpu";
  base.shapes = llama_shaped_mini(4);
  for (const StepSpec& spec : standard_specs(base, {0.0, 0.5, 0.9, 0.99}, flat(int64_t{1} << 24))) register_spec(spec);
  if (large) {  // SPEC: the oracle handles 1e8 entries a step in seconds
    StepSpec step = base;
    step.shapes = flat(100000000);
    step.ratio = 0.9;
    register_spec(step, 2);
    StepSpec select = step;
    select.call = Call::select;
    register_spec(select, 2);
  }
}

}  // namespace gmtk_bench
