// What the GPU benchmark files share: device memory that turns a failed
// allocation into a skip reason, the synthetic gradients of a parameter list,
// and the timing loop (L2 flushed before each sample, CUDA events around the
// measured work alone, reported as Google Benchmark's manual time).
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bench_shapes.hpp"
#include "gradient_values.hpp"

namespace gmtk_bench {

inline std::string cuda_error_text(const std::string& what, cudaError_t error) {
  return what + ": " + cudaGetErrorString(error);
}

// Memory of one benchmark run, freed on scope exit. A failed allocation
// returns null and keeps the reason, so the run can skip instead of crash
// (the 1e9-entry shapes do not fit every GPU).
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    for (void* p : blocks_) cudaFree(p);
  }
  void* allocate(size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    const cudaError_t error = cudaMalloc(&p, bytes);
    if (error != cudaSuccess) {
      error_ = cuda_error_text("cudaMalloc of " + std::to_string(bytes) + " bytes", error);
      cudaGetLastError();
      return nullptr;
    }
    blocks_.push_back(p);
    return p;
  }
  template <typename T>
  T* allocate_array(size_t count) {
    return static_cast<T*>(allocate(count * sizeof(T)));
  }
  // Empty until an allocation fails.
  const std::string& error() const { return error_; }

 private:
  std::vector<void*> blocks_;
  std::string error_;
};

// ---- Synthetic gradients -------------------------------------------------

template <typename T>
__device__ T from_float(float value);
template <>
__device__ inline float from_float<float>(float value) {
  return value;
}
template <>
__device__ inline __half from_float<__half>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

template <typename T>
__global__ void fill_gradients(T* out, int64_t n, Distribution distribution, uint64_t tensor) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = from_float<T>(gradient_value(distribution, 1, tensor, static_cast<uint64_t>(i)));
  }
}

// Calls fill(T*) with `out` typed as the element type of `dtype`.
template <typename Fill>
void launch_fill(gmtkDtype_t dtype, void* out, Fill&& fill) {
  switch (dtype) {
    case GMTK_FLOAT32: fill(static_cast<float*>(out)); break;
    case GMTK_FLOAT16: fill(static_cast<__half*>(out)); break;
    case GMTK_BFLOAT16: fill(static_cast<__nv_bfloat16*>(out)); break;
  }
}

// Threads and blocks of a grid-stride fill over n entries: enough blocks to
// fill the GPU, no more than the entries need (20,000 tiny tensors).
constexpr int kFillThreads = 256;
inline int fill_blocks(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>((n + kFillThreads - 1) / kFillThreads, 1, 4096));
}

// The gradients of a parameter list, packed back to back in one allocation
// as a flat-parameter buffer holds them: the concatenation of all tensors is
// the buffer itself, and a mask run restores every tensor with one copy.
// (The lists here have byte sizes that keep every tensor 256-byte aligned.)
struct Gradients {
  gmtkDtype_t dtype = GMTK_FLOAT32;
  void* data = nullptr;
  size_t bytes = 0;
  std::vector<int64_t> offsets;  // entries before each tensor

  void* tensor(size_t t) const {
    return static_cast<unsigned char*>(data) + static_cast<size_t>(offsets[t]) * dtype_bytes(dtype);
  }
};

// Allocates and fills the gradients of `shapes` (tensor t with the values of
// gradient_value(distribution, 1, t, i)). Returns false with the reason.
inline bool make_gradients(DeviceMemory& memory, const ShapeList& shapes, gmtkDtype_t dtype, Distribution distribution,
                           Gradients* gradients, std::string* failure) {
  gradients->dtype = dtype;
  gradients->offsets.clear();
  int64_t total = 0;
  for (int64_t n : shapes.numels) {
    gradients->offsets.push_back(total);
    total += n;
  }
  gradients->bytes = static_cast<size_t>(total) * dtype_bytes(dtype);
  gradients->data = memory.allocate(gradients->bytes);
  if (gradients->data == nullptr && gradients->bytes > 0) {
    *failure = memory.error();
    return false;
  }
  for (size_t t = 0; t < shapes.numels.size(); ++t) {
    const int64_t n = shapes.numels[t];
    if (n == 0) continue;
    launch_fill(dtype, gradients->tensor(t), [&](auto* out) {
      fill_gradients<<<fill_blocks(n), kFillThreads>>>(out, n, distribution, t);
    });
  }
  const cudaError_t error = cudaDeviceSynchronize();
  if (error != cudaSuccess) {
    *failure = cuda_error_text("filling the gradients", error);
    return false;
  }
  return true;
}

// ---- Timing ----------------------------------------------------------------

// Timing events and an L2-sized buffer to overwrite before every sample.
class SampleTimer {
 public:
  SampleTimer() {
    int device = 0;
    cudaGetDevice(&device);
    int l2_bytes = 0;
    cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device);
    flush_bytes_ = 2 * static_cast<size_t>(l2_bytes);
    const cudaError_t error = cudaMalloc(&flush_, flush_bytes_);
    if (error != cudaSuccess) {
      error_ = cuda_error_text("cudaMalloc of the L2 flush buffer", error);
      flush_ = nullptr;
      cudaGetLastError();
    }
    cudaEventCreate(&start_);
    cudaEventCreate(&stop_);
  }
  SampleTimer(const SampleTimer&) = delete;
  SampleTimer& operator=(const SampleTimer&) = delete;
  ~SampleTimer() {
    cudaFree(flush_);
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  // Empty unless the flush buffer could not be allocated.
  const std::string& error() const { return error_; }
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
  std::string error_;
};

// The benchmark loop of every GPU benchmark: per iteration, `prepare` (not
// timed: e.g. restoring gradients that the last sample masked), an L2 flush,
// then `work` between CUDA events on the default stream, whose time becomes
// the iteration's manual time. `work` returns an empty string, or the reason
// it failed, which ends the benchmark as skipped (as does any CUDA error).
template <typename Prepare, typename Work>
void time_iterations(benchmark::State& state, Prepare&& prepare, Work&& work) {
  SampleTimer timer;
  if (!timer.error().empty()) {
    state.SkipWithError(timer.error().c_str());
    return;
  }
  for (auto _ : state) {
    prepare();
    std::string failure;
    const double seconds = timer.time(nullptr, [&] { failure = work(); });
    const cudaError_t error = cudaGetLastError();
    if (failure.empty() && error != cudaSuccess) failure = cuda_error_text("timed work", error);
    if (!failure.empty()) {
      state.SkipWithError(failure.c_str());
      break;
    }
    state.SetIterationTime(seconds);
  }
}

template <typename Work>
void time_iterations(benchmark::State& state, Work&& work) {
  time_iterations(state, [] {}, work);
}

}  // namespace gmtk_bench
