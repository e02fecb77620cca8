// GPU benchmarks: the device-to-device copy and one-read rooflines, and the
// gmtk calls on the shapes of PERFORMANCE.md. Each sample flushes L2 first and
// is timed with CUDA events around the call alone (Google Benchmark's manual
// time); see gpu_support.cuh. The CUB baselines are in cub_baselines.cu.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "gpu_support.cuh"
#include "step_benchmarks.hpp"

namespace gmtk_bench {
namespace {

void d2d_copy(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(state.range(0));
  DeviceMemory memory;
  void* source = memory.allocate(bytes);
  void* destination = memory.allocate(bytes);
  if (source == nullptr || destination == nullptr) {
    state.SkipWithError(memory.error().c_str());
    return;
  }
  cudaMemset(source, 1, bytes);
  time_iterations(state, [&] {
    cudaMemcpyAsync(destination, source, bytes, cudaMemcpyDeviceToDevice, nullptr);
    return std::string();
  });
  state.SetBytesProcessed(static_cast<int64_t>(2 * bytes * state.iterations()));  // read + write
}

constexpr int kReadThreads = 256;
constexpr int kReadUnroll = 4;

// Reads `vectors` 16-byte words once and adds them into *sum, so that nothing
// is optimized away: the fastest plain read of memory, with kReadUnroll
// independent loads in flight per thread.
__global__ void sum_vectors(const uint4* __restrict__ data, int64_t vectors, unsigned int* sum) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  unsigned int total = 0;
  for (; i + (kReadUnroll - 1) * stride < vectors; i += kReadUnroll * stride) {
    uint4 v[kReadUnroll];
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) v[u] = data[i + u * stride];
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) total += v[u].x + v[u].y + v[u].z + v[u].w;
  }
  for (; i < vectors; i += stride) {
    const uint4 v = data[i];
    total += v.x + v.y + v.z + v.w;
  }
  for (int offset = 16; offset > 0; offset /= 2) total += __shfl_down_sync(0xffffffffu, total, offset);
  if (threadIdx.x % 32 == 0) atomicAdd(sum, total);
}

// One read of `bytes` (a multiple of 16): the floor of a selection pass, so
// that selection time / one read of the gradients comes from the same run.
void read_roofline(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(state.range(0));
  DeviceMemory memory;
  void* data = memory.allocate(bytes);
  auto* sum = memory.allocate_array<unsigned int>(1);
  if (data == nullptr || sum == nullptr) {
    state.SkipWithError(memory.error().c_str());
    return;
  }
  cudaMemset(data, 1, bytes);
  // One full wave of resident blocks; the grid-stride loop covers the rest.
  int device = 0, multiprocessors = 0, blocks_per_multiprocessor = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, sum_vectors, kReadThreads, 0);
  const int blocks = multiprocessors * blocks_per_multiprocessor;
  const auto vectors = static_cast<int64_t>(bytes / sizeof(uint4));
  time_iterations(state, [&] {
    sum_vectors<<<blocks, kReadThreads>>>(static_cast<const uint4*>(data), vectors, sum);
    return std::string();
  });
  state.SetBytesProcessed(static_cast<int64_t>(bytes * state.iterations()));
}

template <typename T>
__global__ void fill_params(T* out, int64_t n, uint64_t tensor) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = from_float<T>(0.02f * standard_normal(static_cast<uint64_t>(i) * 7 + tensor));
  }
}

struct HandleDestroyer {
  void operator()(gmtkHandle_t handle) const { gmtkHandleDestroy(handle); }
};
struct PlanDestroyer {
  void operator()(gmtkPlan_t plan) const { gmtkPlanDestroy(plan); }
};
using OwnedHandle = std::unique_ptr<gmtkHandle, HandleDestroyer>;
using OwnedPlan = std::unique_ptr<gmtkPlan, PlanDestroyer>;

// Asks a one-tensor plan for its workspace size: cheap, and tells whether the
// CUDA backend runs this configuration before gigabytes are allocated.
bool backend_supports(gmtkHandle_t handle, const StepSpec& spec, std::string* reason) {
  // Runs the call once on a 256-entry plan with every buffer the spec uses:
  // cheap, and tells whether the CUDA backend runs this configuration before
  // gigabytes are allocated and filled.
  constexpr int64_t kEntries = 256;
  DeviceMemory memory;
  gmtkTensor_t tensor{};
  tensor.numel = kEntries;
  tensor.grad_dtype = spec.grad_dtype;
  tensor.param_dtype = spec.param_dtype;
  tensor.grad = memory.allocate(kEntries * sizeof(float));
  if (spec.call == Call::step) {
    tensor.param = memory.allocate(kEntries * sizeof(float));
    tensor.exp_avg = memory.allocate_array<float>(kEntries);
    tensor.exp_avg_sq = memory.allocate_array<float>(kEntries);
    if (spec.master) tensor.master_param = memory.allocate_array<float>(kEntries);
  }
  const gmtkGroupConfig_t group = spec.group();
  gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
  config.groups = &group;
  config.num_groups = 1;
  config.tensors = &tensor;
  config.num_tensors = 1;
  config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
  gmtkPlan_t plan = nullptr;
  const gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  bool supported = memory.error().empty() && gmtkPlanCreate(handle, &config, &plan) == GMTK_SUCCESS &&
                   spec.invoke(plan, args, nullptr, 0, nullptr) == GMTK_SUCCESS;
  if (!supported) *reason = memory.error().empty() ? gmtkGetLastErrorMessage() : memory.error();
  gmtkPlanDestroy(plan);
  if (supported && cudaDeviceSynchronize() != cudaSuccess) {
    *reason = cuda_error_text("a 256-entry trial call", cudaGetLastError());
    supported = false;
  }
  return supported;
}

// Everything one GPU run of a spec calls gmtk with: its buffers (freed last),
// handle, plan, workspace and arguments.
struct PreparedRun {
  DeviceMemory memory;
  Gradients gradients;
  std::vector<gmtkTensor_t> tensors;
  OwnedHandle handle;
  OwnedPlan plan;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  // gmtkMaskGradients zeroes the masked entries in place: a pristine copy of
  // the gradients to restore before each sample (mask runs only).
  void* pristine = nullptr;
};

// Fills `run` for `spec` (a handle on device 0, every tensor's buffers, the
// plan, a caller workspace, thresholds and found_inf as outputs). Returns an
// empty string, or why the run cannot be made (the backend refuses the
// configuration, the memory does not fit, ...).
std::string prepare_run(const StepSpec& spec, PreparedRun* run) {
  gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
  gmtkHandle_t created_handle = nullptr;
  if (gmtkHandleCreate(&created_handle, &handle_config) != GMTK_SUCCESS) return gmtkGetLastErrorMessage();
  run->handle.reset(created_handle);
  std::string failure;
  if (!backend_supports(run->handle.get(), spec, &failure)) return failure;

  DeviceMemory& memory = run->memory;
  if (!make_gradients(memory, spec.shapes, spec.grad_dtype, spec.distribution, &run->gradients, &failure)) {
    return failure;
  }
  std::vector<gmtkTensor_t>& tensors = run->tensors;
  tensors.resize(spec.shapes.numels.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = spec.shapes.numels[t];
    gmtkTensor_t& d = tensors[t];
    d = gmtkTensor_t{};
    d.numel = n;
    d.grad_dtype = spec.grad_dtype;
    d.param_dtype = spec.param_dtype;
    d.grad = run->gradients.tensor(t);
    if (spec.call != Call::step) continue;
    const int blocks = fill_blocks(n);
    d.param = memory.allocate(n * dtype_bytes(spec.param_dtype));
    launch_fill(spec.param_dtype, d.param, [&](auto* out) { fill_params<<<blocks, kFillThreads>>>(out, n, t); });
    d.exp_avg = memory.allocate_array<float>(n);
    if (d.exp_avg != nullptr) cudaMemset(d.exp_avg, 0, n * sizeof(float));
    if (spec.optimizer != GMTK_OPTIMIZER_SGD) {
      d.exp_avg_sq = memory.allocate_array<float>(n);
      if (d.exp_avg_sq != nullptr) cudaMemset(d.exp_avg_sq, 0, n * sizeof(float));
    }
    if (spec.master) {
      d.master_param = memory.allocate_array<float>(n);
      launch_fill(GMTK_FLOAT32, d.master_param, [&](auto* out) { fill_params<<<blocks, kFillThreads>>>(out, n, t); });
    }
    if (!memory.error().empty()) return memory.error();
  }
  if (spec.call == Call::mask) {
    run->pristine = memory.allocate(run->gradients.bytes);
    if (run->pristine == nullptr) return memory.error();
    cudaMemcpy(run->pristine, run->gradients.data, run->gradients.bytes, cudaMemcpyDeviceToDevice);
  }
  const cudaError_t fill_error = cudaDeviceSynchronize();
  if (fill_error != cudaSuccess) return cuda_error_text("filling the tensors", fill_error);

  const gmtkGroupConfig_t group = spec.group();
  gmtkPlanConfig_t plan_config = GMTK_PLAN_CONFIG_INIT;
  plan_config.groups = &group;
  plan_config.num_groups = 1;
  plan_config.tensors = tensors.data();
  plan_config.num_tensors = static_cast<int64_t>(tensors.size());
  gmtkPlan_t created_plan = nullptr;
  if (gmtkPlanCreate(run->handle.get(), &plan_config, &created_plan) != GMTK_SUCCESS) return gmtkGetLastErrorMessage();
  run->plan.reset(created_plan);
  if (gmtkPlanGetWorkspaceSize(run->plan.get(), &run->workspace_bytes) != GMTK_SUCCESS) {
    return gmtkGetLastErrorMessage();
  }
  run->workspace = memory.allocate(run->workspace_bytes);
  auto* outputs = static_cast<float*>(memory.allocate(tensors.size() * sizeof(float) + 256));
  if (!memory.error().empty()) return memory.error();
  run->args.thresholds = outputs;
  run->args.found_inf = outputs + tensors.size();
  // A mask schedule's given input, made by one selecting call at the run's ratio.
  const size_t input_bytes = spec.input_bytes(run->plan.get());
  if (input_bytes > 0) {
    void* input = memory.allocate(input_bytes);
    if (input == nullptr) return memory.error();
    if (spec.prepare_input(run->plan.get(), input, run->workspace, run->workspace_bytes, nullptr, &run->args) !=
        GMTK_SUCCESS) {
      return gmtkGetLastErrorMessage();
    }
    const cudaError_t input_error = cudaDeviceSynchronize();
    if (input_error != cudaSuccess) return cuda_error_text("making the given mask input", input_error);
  }
  return std::string();
}

// A stream of the run's own: graph capture needs one other than the legacy
// default stream, and host timing should not wait on the default stream.
class OwnedStream {
 public:
  OwnedStream() { error_ = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking); }
  ~OwnedStream() {
    if (error_ == cudaSuccess) cudaStreamDestroy(stream_);
  }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  cudaStream_t get() const { return stream_; }
  gmtkStream_t gmtk() const { return reinterpret_cast<gmtkStream_t>(stream_); }
  cudaError_t error() const { return error_; }

 private:
  cudaStream_t stream_ = nullptr;
  cudaError_t error_ = cudaSuccess;
};

// The device time of the call (PERFORMANCE.md's ratios): each sample flushes
// L2, then times the call alone with CUDA events.
void gpu_call(benchmark::State& state, const StepSpec& spec) {
  PreparedRun run;
  const std::string failure = prepare_run(spec, &run);
  if (!failure.empty()) return state.SkipWithError(failure.c_str());
  int64_t step = 0;
  time_iterations(
      state,
      [&] {
        if (run.pristine != nullptr) {
          cudaMemcpyAsync(run.gradients.data, run.pristine, run.gradients.bytes, cudaMemcpyDeviceToDevice, nullptr);
        }
      },
      [&] {
        run.args.step = ++step;
        const gmtkStatus_t status = spec.invoke(run.plan.get(), run.args, run.workspace, run.workspace_bytes, nullptr);
        return status == GMTK_SUCCESS ? std::string() : std::string(gmtkGetLastErrorMessage());
      });
  state.SetBytesProcessed(static_cast<int64_t>(spec.floor_bytes() * static_cast<double>(state.iterations())));
  state.counters["entries"] = static_cast<double>(spec.shapes.total());
  state.counters["tensors"] = static_cast<double>(run.tensors.size());
}

// Launches per call: one call captured into a CUDA graph on a non-default
// stream, its nodes counted by type. The capture runs in the strict global
// mode (what a framework's graph capture uses); if that fails, in relaxed
// mode, which the counter "relaxed_capture" says. The graph is then
// instantiated and replayed once, as a check that it runs; the replay's device
// time is the iteration time.
void gpu_launches(benchmark::State& state, const StepSpec& spec) {
  PreparedRun run;
  const std::string failure = prepare_run(spec, &run);
  if (!failure.empty()) return state.SkipWithError(failure.c_str());
  OwnedStream stream;
  if (stream.error() != cudaSuccess) return state.SkipWithError(cuda_error_text("cudaStreamCreate", stream.error()).c_str());
  run.args.step = 1;
  // One call outside the capture first: module loading and first-touch work
  // are not part of a step.
  if (spec.invoke(run.plan.get(), run.args, run.workspace, run.workspace_bytes, stream.gmtk()) != GMTK_SUCCESS) {
    return state.SkipWithError(gmtkGetLastErrorMessage());
  }
  if (const cudaError_t error = cudaStreamSynchronize(stream.get()); error != cudaSuccess) {
    return state.SkipWithError(cuda_error_text("the call before the capture", error).c_str());
  }

  cudaGraph_t graph = nullptr;
  std::string capture_failure;
  bool relaxed = false;
  for (const cudaStreamCaptureMode mode : {cudaStreamCaptureModeGlobal, cudaStreamCaptureModeRelaxed}) {
    relaxed = mode == cudaStreamCaptureModeRelaxed;
    cudaError_t error = cudaStreamBeginCapture(stream.get(), mode);
    if (error != cudaSuccess) {
      capture_failure = cuda_error_text("cudaStreamBeginCapture", error);
      cudaGetLastError();
      continue;
    }
    const gmtkStatus_t status = spec.invoke(run.plan.get(), run.args, run.workspace, run.workspace_bytes, stream.gmtk());
    const std::string message = status == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage();
    error = cudaStreamEndCapture(stream.get(), &graph);  // always ends the capture
    if (status == GMTK_SUCCESS && error == cudaSuccess) break;
    capture_failure = std::string(relaxed ? "relaxed" : "global") + "-mode capture: " +
                      (status != GMTK_SUCCESS ? message : cuda_error_text("cudaStreamEndCapture", error));
    cudaGetLastError();
    if (graph != nullptr) cudaGraphDestroy(graph);
    graph = nullptr;
  }
  if (graph == nullptr) return state.SkipWithError(capture_failure.c_str());

  size_t count = 0;
  cudaGraphGetNodes(graph, nullptr, &count);
  std::vector<cudaGraphNode_t> nodes(count);
  cudaGraphGetNodes(graph, nodes.data(), &count);
  double kernels = 0, memsets = 0, others = 0;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type = cudaGraphNodeTypeEmpty;
    cudaGraphNodeGetType(node, &type);
    (type == cudaGraphNodeTypeKernel ? kernels : type == cudaGraphNodeTypeMemset ? memsets : others) += 1;
  }
  cudaGraphExec_t exec = nullptr;
  cudaError_t error = cudaGraphInstantiate(&exec, graph, 0);
  if (error != cudaSuccess) {
    cudaGraphDestroy(graph);
    return state.SkipWithError(cuda_error_text("cudaGraphInstantiate", error).c_str());
  }
  SampleTimer timer;
  if (!timer.error().empty()) {
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    return state.SkipWithError(timer.error().c_str());
  }
  for (auto _ : state) {
    const double seconds = timer.time(stream.get(), [&] { cudaGraphLaunch(exec, stream.get()); });
    error = cudaGetLastError();
    if (error != cudaSuccess) {
      state.SkipWithError(cuda_error_text("replaying the captured graph", error).c_str());
      break;
    }
    state.SetIterationTime(seconds);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  state.counters["kernel_nodes"] = kernels;
  state.counters["memset_nodes"] = memsets;
  state.counters["other_nodes"] = others;
  state.counters["relaxed_capture"] = relaxed ? 1 : 0;
  state.counters["tensors"] = static_cast<double>(run.tensors.size());
}

constexpr int kHostTimeCalls = 1000;
constexpr int kCallsBetweenSyncs = 8;

// Host time of one call: the steady clock around the call alone (validation
// included, no GPU wait) on a non-default stream. Every kCallsBetweenSyncs
// calls the stream is synchronized outside the timed region, so that a full
// launch queue never blocks a timed call. The iteration time is the host
// time; the counter is the median.
void gpu_host_time(benchmark::State& state, const StepSpec& spec) {
  PreparedRun run;
  const std::string failure = prepare_run(spec, &run);
  if (!failure.empty()) return state.SkipWithError(failure.c_str());
  OwnedStream stream;
  if (stream.error() != cudaSuccess) return state.SkipWithError(cuda_error_text("cudaStreamCreate", stream.error()).c_str());
  int64_t step = 1;
  run.args.step = step;
  if (spec.invoke(run.plan.get(), run.args, run.workspace, run.workspace_bytes, stream.gmtk()) != GMTK_SUCCESS) {
    return state.SkipWithError(gmtkGetLastErrorMessage());
  }
  std::vector<double> samples;
  samples.reserve(kHostTimeCalls);
  for (auto _ : state) {
    if (samples.size() % kCallsBetweenSyncs == 0) cudaStreamSynchronize(stream.get());
    run.args.step = ++step;
    const auto begin = std::chrono::steady_clock::now();
    const gmtkStatus_t status = spec.invoke(run.plan.get(), run.args, run.workspace, run.workspace_bytes, stream.gmtk());
    const auto end = std::chrono::steady_clock::now();
    if (status != GMTK_SUCCESS) {
      state.SkipWithError(gmtkGetLastErrorMessage());
      break;
    }
    const double seconds = std::chrono::duration<double>(end - begin).count();
    samples.push_back(seconds);
    state.SetIterationTime(seconds);
  }
  const cudaError_t error = cudaStreamSynchronize(stream.get());
  if (error != cudaSuccess) return state.SkipWithError(cuda_error_text("the timed calls", error).c_str());
  if (samples.empty()) return;
  std::sort(samples.begin(), samples.end());
  state.counters["host_us_median"] = 1e6 * samples[samples.size() / 2];
  state.counters["host_us_p90"] = 1e6 * samples[samples.size() * 9 / 10];
  state.counters["tensors"] = static_cast<double>(run.tensors.size());
}

// Registers `spec` once: lists built for different targets may share a run.
void register_spec(const StepSpec& spec) {
  if (!registered_specs().emplace(spec.name(), spec).second) return;
  benchmark::RegisterBenchmark(spec.name().c_str(), [spec](benchmark::State& state) { gpu_call(state, spec); })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

// The launches and the host time of one call of `spec`.
void register_host_figures(const StepSpec& spec) {
  const std::string launches = launches_benchmark_name(spec);
  if (registered_launch_counts().emplace(launches, spec).second) {
    benchmark::RegisterBenchmark(launches.c_str(), [spec](benchmark::State& state) { gpu_launches(state, spec); })
        ->Iterations(1)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  const std::string host_time = host_time_benchmark_name(spec);
  if (registered_host_times().emplace(host_time, spec).second) {
    benchmark::RegisterBenchmark(host_time.c_str(), [spec](benchmark::State& state) { gpu_host_time(state, spec); })
        ->Iterations(kHostTimeCalls)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

// Selection and masking alone, on the shapes of PERFORMANCE.md: selection
// time / one read of g (<= 2.2 fp32, <= 1.15 bf16) at ratios 0.5, 0.9, 0.99,
// global / per-tensor scope on the Llama list, launch overhead at 300 and
// 20,000 tensors, adversarial / Gaussian data (<= 1.5) on the flat fp32
// tensor, and ratio 0 (no selection work) in fp32 only, as that path does not
// read the gradients. Not the full cross product: the run must stay short.
std::vector<StepSpec> selection_specs(const StepSpec& base) {
  const ShapeList flat_1e9 = flat(1000000000);
  const ShapeList& llama = base.shapes;
  const ShapeList small = many_small(300, 65536);
  const ShapeList tiny = many_small(20000, 256);
  std::vector<StepSpec> specs;
  auto add = [&](Call call, gmtkDtype_t dtype, const ShapeList& shapes, double ratio,
                 gmtkScope_t scope = GMTK_SCOPE_PER_TENSOR, Distribution distribution = Distribution::student_t3) {
    StepSpec spec = base;
    spec.call = call;
    spec.grad_dtype = dtype;
    spec.shapes = shapes;
    spec.ratio = ratio;
    spec.scope = scope;
    spec.distribution = distribution;
    specs.push_back(spec);
  };
  for (gmtkDtype_t dtype : {GMTK_FLOAT32, GMTK_BFLOAT16}) {
    for (double ratio : {0.5, 0.9, 0.99}) {
      add(Call::select, dtype, flat_1e9, ratio);
      add(Call::select, dtype, llama, ratio);
      add(Call::select, dtype, llama, ratio, GMTK_SCOPE_GLOBAL);
    }
    add(Call::select, dtype, small, 0.9);
    add(Call::select, dtype, tiny, 0.9);
    for (const ShapeList* shapes : {&flat_1e9, &llama, &small, &tiny}) add(Call::mask, dtype, *shapes, 0.9);
  }
  for (const ShapeList* shapes : {&flat_1e9, &llama, &tiny}) add(Call::select, GMTK_FLOAT32, *shapes, 0.0);
  add(Call::mask, GMTK_FLOAT32, flat_1e9, 0.0);
  for (Distribution distribution : {Distribution::gaussian, Distribution::quantized, Distribution::zeros}) {
    add(Call::select, GMTK_FLOAT32, flat_1e9, 0.9, GMTK_SCOPE_PER_TENSOR, distribution);
  }
  return specs;
}

}  // namespace

bool register_gpu_benchmarks(int llama_layers, std::string* reason) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    *reason = error != cudaSuccess ? cudaGetErrorString(error) : "no CUDA device";
    cudaGetLastError();
    return false;
  }
  benchmark::RegisterBenchmark("gpu/d2d_copy", d2d_copy)
      ->Arg(int64_t{1} << 30)
      ->ArgName("bytes")
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  // One read of 1e9 fp32 and of 1e9 bf16 gradients (a name of read_roofline_name()).
  benchmark::RegisterBenchmark("gpu/read_roofline", read_roofline)
      ->Arg(4000000000)
      ->Arg(2000000000)
      ->ArgName("bytes")
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);

  StepSpec base;
  base.device = "gpu";
  base.shapes = llama2_7b_layers(llama_layers);
  for (const StepSpec& spec : standard_specs(base, {0.0, 0.2, 0.5, 0.8, 0.9, 0.99}, flat(1000000000))) {
    register_spec(spec);
  }
  for (Distribution d : {Distribution::gaussian, Distribution::quantized, Distribution::zeros}) {
    StepSpec spec = base;
    spec.distribution = d;
    spec.ratio = 0.9;
    register_spec(spec);
  }
  for (double ratio : {0.0, 0.9}) {  // launch overhead: 300 small tensors
    StepSpec small = base;
    small.shapes = many_small(300, 65536);
    small.ratio = ratio;
    register_spec(small);
  }
  // Launches per call and host time per call at 300 and 20,000 tensors, for
  // the GMT step and for selection alone (which runs where the step cannot yet).
  for (Call call : {Call::step, Call::select}) {
    for (const ShapeList& shapes : {many_small(300, 65536), many_small(20000, 256)}) {
      StepSpec spec = base;
      spec.call = call;
      spec.shapes = shapes;
      spec.ratio = 0.9;
      register_host_figures(spec);
    }
  }
  for (const StepSpec& spec : selection_specs(base)) {
    register_spec(spec);
    // CUB's way to the same thresholds, for each selection that does work on
    // realistic (heavy-tailed) gradients.
    if (spec.call == Call::select && spec.ratio > 0 && spec.distribution == Distribution::student_t3) {
      register_sort_baseline(SortBaselineSpec::for_selection(spec));
    }
  }
  return true;
}

}  // namespace gmtk_bench
