// GPU benchmarks: the device-to-device copy roofline and the gmtk calls on the
// shapes of PERFORMANCE.md. Each sample flushes L2 first and is timed with CUDA
// events around the call alone (Google Benchmark's manual time).
#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "step_benchmarks.hpp"

namespace gmtk_bench {
namespace {

std::string cuda_error_text(const char* what, cudaError_t error) {
  return std::string(what) + ": " + cudaGetErrorString(error);
}

// Memory of the bench, freed on scope exit; an allocation failure becomes a
// skipped benchmark with the reason, not a crash.
class DeviceMemory {
 public:
  ~DeviceMemory() {
    for (void* p : blocks_) cudaFree(p);
  }
  void* allocate(size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    const cudaError_t error = cudaMalloc(&p, bytes);
    if (error != cudaSuccess) {
      error_ = cuda_error_text("cudaMalloc", error);
      cudaGetLastError();
      return nullptr;
    }
    blocks_.push_back(p);
    return p;
  }
  const std::string& error() const { return error_; }

 private:
  std::vector<void*> blocks_;
  std::string error_;
};

// Timing events and an L2-sized buffer to overwrite before every sample.
class SampleTimer {
 public:
  SampleTimer() {
    int device = 0;
    cudaGetDevice(&device);
    int l2_bytes = 0;
    cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device);
    flush_bytes_ = 2 * static_cast<size_t>(l2_bytes);
    cudaMalloc(&flush_, flush_bytes_);
    cudaEventCreate(&start_);
    cudaEventCreate(&stop_);
  }
  ~SampleTimer() {
    cudaFree(flush_);
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  // Flushes L2, runs `work` between two events, returns seconds.
  template <typename Work>
  double time(cudaStream_t stream, Work&& work) {
    cudaMemsetAsync(flush_, 0, flush_bytes_, stream);
    cudaEventRecord(start_, stream);
    work();
    cudaEventRecord(stop_, stream);
    cudaEventSynchronize(stop_);
    float milliseconds = 0.0f;
    cudaEventElapsedTime(&milliseconds, start_, stop_);
    return milliseconds * 1e-3;
  }

 private:
  void* flush_ = nullptr;
  size_t flush_bytes_ = 0;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

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
  SampleTimer timer;
  for (auto _ : state) {
    state.SetIterationTime(timer.time(nullptr, [&] {
      cudaMemcpyAsync(destination, source, bytes, cudaMemcpyDeviceToDevice, nullptr);
    }));
  }
  state.SetBytesProcessed(static_cast<int64_t>(2 * bytes * state.iterations()));  // read + write
}

template <typename T>
__device__ T from_float(float value);
template <>
__device__ float from_float<float>(float value) {
  return value;
}
template <>
__device__ __half from_float<__half>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

template <typename T>
__global__ void fill_gradients(T* out, int64_t n, Distribution distribution, uint64_t tensor) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = from_float<T>(gradient_value(distribution, 1, tensor, static_cast<uint64_t>(i)));
  }
}

template <typename T>
__global__ void fill_params(T* out, int64_t n, uint64_t tensor) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = from_float<T>(0.02f * standard_normal(static_cast<uint64_t>(i) * 7 + tensor));
  }
}

template <typename Fill>
void launch_fill(gmtkDtype_t dtype, void* out, Fill&& fill) {
  switch (dtype) {
    case GMTK_FLOAT32: fill(static_cast<float*>(out)); break;
    case GMTK_FLOAT16: fill(static_cast<__half*>(out)); break;
    case GMTK_BFLOAT16: fill(static_cast<__nv_bfloat16*>(out)); break;
  }
}

// Asks a one-tensor plan for its workspace size: cheap, and tells whether the
// CUDA backend runs this configuration before gigabytes are allocated.
bool backend_supports(gmtkHandle_t handle, const StepSpec& spec, std::string* reason) {
  DeviceMemory memory;
  gmtkTensor_t tensor{};
  tensor.numel = 256;
  tensor.grad_dtype = spec.grad_dtype;
  tensor.param_dtype = spec.param_dtype;
  tensor.grad = memory.allocate(256 * sizeof(float));
  const gmtkGroupConfig_t group = spec.group();
  gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
  config.groups = &group;
  config.num_groups = 1;
  config.tensors = &tensor;
  config.num_tensors = 1;
  gmtkPlan_t plan = nullptr;
  size_t bytes = 0;
  const bool supported =
      gmtkPlanCreate(handle, &config, &plan) == GMTK_SUCCESS && gmtkPlanGetWorkspaceSize(plan, &bytes) == GMTK_SUCCESS;
  if (!supported) *reason = gmtkGetLastErrorMessage();
  gmtkPlanDestroy(plan);
  return supported;
}

void gpu_call(benchmark::State& state, const StepSpec& spec) {
  gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
  gmtkHandle_t handle = nullptr;
  if (gmtkHandleCreate(&handle, &handle_config) != GMTK_SUCCESS) {
    state.SkipWithError(gmtkGetLastErrorMessage());
    return;
  }
  std::string unsupported;
  if (!backend_supports(handle, spec, &unsupported)) {
    state.SkipWithError(unsupported.c_str());
    gmtkHandleDestroy(handle);
    return;
  }
  DeviceMemory memory;
  std::vector<gmtkTensor_t> tensors(spec.shapes.numels.size());
  const int threads = 256;
  const int blocks = 4096;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = spec.shapes.numels[t];
    gmtkTensor_t& d = tensors[t];
    d = gmtkTensor_t{};
    d.numel = n;
    d.grad_dtype = spec.grad_dtype;
    d.param_dtype = spec.param_dtype;
    d.grad = memory.allocate(n * dtype_bytes(spec.grad_dtype));
    launch_fill(spec.grad_dtype, d.grad,
                [&](auto* out) { fill_gradients<<<blocks, threads>>>(out, n, spec.distribution, t); });
    if (spec.call == Call::step) {
      d.param = memory.allocate(n * dtype_bytes(spec.param_dtype));
      launch_fill(spec.param_dtype, d.param, [&](auto* out) { fill_params<<<blocks, threads>>>(out, n, t); });
      d.exp_avg = static_cast<float*>(memory.allocate(n * sizeof(float)));
      if (d.exp_avg != nullptr) cudaMemset(d.exp_avg, 0, n * sizeof(float));
      if (spec.optimizer != GMTK_OPTIMIZER_SGD) {
        d.exp_avg_sq = static_cast<float*>(memory.allocate(n * sizeof(float)));
        if (d.exp_avg_sq != nullptr) cudaMemset(d.exp_avg_sq, 0, n * sizeof(float));
      }
      if (spec.master) {
        d.master_param = static_cast<float*>(memory.allocate(n * sizeof(float)));
        launch_fill(GMTK_FLOAT32, d.master_param, [&](auto* out) { fill_params<<<blocks, threads>>>(out, n, t); });
      }
    }
    if (!memory.error().empty()) {
      state.SkipWithError(memory.error().c_str());
      gmtkHandleDestroy(handle);
      return;
    }
  }
  const cudaError_t fill_error = cudaDeviceSynchronize();
  if (fill_error != cudaSuccess) {
    state.SkipWithError(cuda_error_text("filling the tensors", fill_error).c_str());
    gmtkHandleDestroy(handle);
    return;
  }

  const gmtkGroupConfig_t group = spec.group();
  gmtkPlanConfig_t plan_config = GMTK_PLAN_CONFIG_INIT;
  plan_config.groups = &group;
  plan_config.num_groups = 1;
  plan_config.tensors = tensors.data();
  plan_config.num_tensors = static_cast<int64_t>(tensors.size());
  gmtkPlan_t plan = nullptr;
  size_t workspace_bytes = 0;
  if (gmtkPlanCreate(handle, &plan_config, &plan) != GMTK_SUCCESS ||
      gmtkPlanGetWorkspaceSize(plan, &workspace_bytes) != GMTK_SUCCESS) {
    state.SkipWithError(gmtkGetLastErrorMessage());
    gmtkPlanDestroy(plan);
    gmtkHandleDestroy(handle);
    return;
  }
  void* workspace = memory.allocate(workspace_bytes);
  auto* outputs = static_cast<float*>(memory.allocate(tensors.size() * sizeof(float) + 256));
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  args.thresholds = outputs;
  args.found_inf = outputs + tensors.size();

  SampleTimer timer;
  int64_t step = 0;
  for (auto _ : state) {
    args.step = ++step;
    gmtkStatus_t status = GMTK_SUCCESS;
    const double seconds = timer.time(nullptr, [&] { status = spec.invoke(plan, args, workspace, workspace_bytes, nullptr); });
    if (status != GMTK_SUCCESS) {
      state.SkipWithError(gmtkGetLastErrorMessage());
      break;
    }
    state.SetIterationTime(seconds);
  }
  state.SetBytesProcessed(static_cast<int64_t>(spec.floor_bytes() * static_cast<double>(state.iterations())));
  state.counters["entries"] = static_cast<double>(spec.shapes.total());
  state.counters["tensors"] = static_cast<double>(tensors.size());
  gmtkPlanDestroy(plan);
  gmtkHandleDestroy(handle);
}

void register_spec(const StepSpec& spec) {
  registered_specs()[spec.name()] = spec;
  benchmark::RegisterBenchmark(spec.name().c_str(), [spec](benchmark::State& state) { gpu_call(state, spec); })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
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
  return true;
}

}  // namespace gmtk_bench
