// CUB baselines of selection (SortBaselineSpec in step_benchmarks.hpp): the
// thresholds gmtk selects, computed the way a CUB user would, by radix-sorting
// the |g| keys. Timed like the gmtk calls (gpu_support.cuh): the key transform,
// the sorts and the read of each T are timed; the key buffers and CUB's
// temporary storage are allocated once, outside the timed region.
#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cub/device/device_transform.cuh>
#include <string>
#include <vector>

#include "gpu_support.cuh"
#include "step_benchmarks.hpp"

namespace gmtk_bench {
namespace {

// Keys are uint32 for fp32 gradients and uint16 for 16-bit ones; the sign bit
// is cleared, so only the magnitude bits need sorting.
template <typename Key>
constexpr int kMagnitudeBits = 8 * sizeof(Key) - 1;

// The radix-sortable key of |g|: the gradient's bits with the sign cleared
// (the key gmtk orders magnitudes by, docs/semantics.md).
template <typename Key>
struct ClearSignBit {
  __device__ Key operator()(Key bits) const {
    return static_cast<Key>(bits & ((Key{1} << kMagnitudeBits<Key>) - 1));
  }
};

// T as gmtk reports it: the float whose magnitude bits are `key`.
__device__ inline float key_to_float(uint32_t key, gmtkDtype_t) { return __uint_as_float(key); }
__device__ inline float key_to_float(uint16_t key, gmtkDtype_t dtype) {
  return dtype == GMTK_FLOAT16 ? __half2float(__ushort_as_half(key)) : __uint_as_float(uint32_t{key} << 16);
}

// thresholds[i] = the key at positions[i] of the keys sorted in ascending order.
template <typename Key>
__global__ void gather_thresholds(const Key* sorted_keys, const int64_t* positions, int count, gmtkDtype_t dtype,
                                  float* thresholds) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < count) thresholds[i] = key_to_float(sorted_keys[positions[i]], dtype);
}

// One CUB radix sort of `keys` over the magnitude bits, segmented when
// `segment_offsets` (segments + 1 entries, device) is given. CUB's two-phase
// convention: with temp == nullptr it only sizes temp_bytes.
template <typename Key>
cudaError_t radix_sort(void* temp, size_t& temp_bytes, cub::DoubleBuffer<Key>& keys, int64_t count,
                       const int* segment_offsets, int segments) {
  if (segment_offsets != nullptr) {
    return cub::DeviceSegmentedRadixSort::SortKeys(temp, temp_bytes, keys, static_cast<int>(count), segments,
                                                   segment_offsets, segment_offsets + 1, 0, kMagnitudeBits<Key>);
  }
  return cub::DeviceRadixSort::SortKeys(temp, temp_bytes, keys, count, 0, kMagnitudeBits<Key>);
}

// One sort of a baseline run: the keys of `count` gradients, sorted (per
// segment when segmented), then the thresholds gathered from them.
struct SortJob {
  const void* gradients;
  int64_t count;
  const int* segment_offsets;          // device; null: one run of keys
  int segments;
  const int64_t* threshold_positions;  // device: where each T sits in the sorted keys
  int threshold_count;
  float* thresholds;                   // device output
};

template <typename Key>
void run_sort_baseline(benchmark::State& state, const SortBaselineSpec& spec) {
  auto skip = [&](const std::string& reason) { state.SkipWithError(reason.c_str()); };
  DeviceMemory memory;
  Gradients gradients;
  std::string failure;
  if (!make_gradients(memory, spec.shapes, spec.grad_dtype, spec.distribution, &gradients, &failure)) {
    return skip(failure);
  }
  const std::vector<int64_t>& numels = spec.shapes.numels;
  const int64_t total = spec.shapes.total();
  const bool one_tensor_at_a_time = spec.method == SortBaseline::sort_per_tensor;
  const bool segmented = spec.method == SortBaseline::segmented_sort;
  if (segmented && total > INT_MAX) return skip("DeviceSegmentedRadixSort counts entries in int");

  // Where each T sits in its sorted keys: floor(r n) from the start of its set.
  std::vector<int64_t> positions;
  switch (spec.method) {
    case SortBaseline::sort_per_tensor:
      for (int64_t n : numels) positions.push_back(masked_entries(spec.ratio, n));
      break;
    case SortBaseline::sort_concatenated:
      positions.push_back(masked_entries(spec.ratio, total));
      break;
    case SortBaseline::segmented_sort:
      for (size_t t = 0; t < numels.size(); ++t) {
        positions.push_back(gradients.offsets[t] + masked_entries(spec.ratio, numels[t]));
      }
      break;
  }
  std::vector<int> segment_offsets;
  if (segmented) {
    segment_offsets.assign(gradients.offsets.begin(), gradients.offsets.end());
    segment_offsets.push_back(static_cast<int>(total));
  }

  // One tensor at a time reuses key buffers of the largest tensor; the others
  // hold the keys of all tensors. Two buffers: CUB's DoubleBuffer sorts
  // between them and needs little temporary storage.
  const int64_t most_keys_sorted = one_tensor_at_a_time ? *std::max_element(numels.begin(), numels.end()) : total;
  Key* keys = memory.allocate_array<Key>(static_cast<size_t>(most_keys_sorted));
  Key* spare_keys = memory.allocate_array<Key>(static_cast<size_t>(most_keys_sorted));
  auto* device_positions = memory.allocate_array<int64_t>(positions.size());
  auto* thresholds = memory.allocate_array<float>(positions.size());
  int* device_segment_offsets = segmented ? memory.allocate_array<int>(segment_offsets.size()) : nullptr;
  if (!memory.error().empty()) return skip(memory.error());
  cudaMemcpy(device_positions, positions.data(), positions.size() * sizeof(int64_t), cudaMemcpyHostToDevice);
  if (segmented) {
    cudaMemcpy(device_segment_offsets, segment_offsets.data(), segment_offsets.size() * sizeof(int),
               cudaMemcpyHostToDevice);
  }

  std::vector<SortJob> jobs;
  if (one_tensor_at_a_time) {
    for (size_t t = 0; t < numels.size(); ++t) {
      if (numels[t] == 0) continue;  // nothing to sort; gmtk reports T = 0
      jobs.push_back({gradients.tensor(t), numels[t], nullptr, 0, device_positions + t, 1, thresholds + t});
    }
  } else {
    jobs.push_back({gradients.data, total, device_segment_offsets, static_cast<int>(numels.size()), device_positions,
                    static_cast<int>(positions.size()), thresholds});
  }

  // CUB's temporary storage, sized for the most demanding sort of the run.
  size_t temp_bytes = 0;
  for (const SortJob& job : jobs) {
    cub::DoubleBuffer<Key> unused(keys, spare_keys);
    size_t job_bytes = 0;
    const cudaError_t error = radix_sort<Key>(nullptr, job_bytes, unused, job.count, job.segment_offsets, job.segments);
    if (error != cudaSuccess) return skip(cuda_error_text("sizing CUB's temporary storage", error));
    temp_bytes = std::max(temp_bytes, job_bytes);
  }
  void* temp = memory.allocate(temp_bytes);
  if (!memory.error().empty()) return skip(memory.error());
  const cudaError_t setup_error = cudaDeviceSynchronize();
  if (setup_error != cudaSuccess) return skip(cuda_error_text("setting up the baseline", setup_error));

  time_iterations(state, [&] {
    for (const SortJob& job : jobs) {
      cudaError_t error = cub::DeviceTransform::Transform(static_cast<const Key*>(job.gradients), keys, job.count,
                                                          ClearSignBit<Key>{});
      cub::DoubleBuffer<Key> sorted(keys, spare_keys);
      size_t job_temp_bytes = temp_bytes;
      if (error == cudaSuccess) {
        error = radix_sort<Key>(temp, job_temp_bytes, sorted, job.count, job.segment_offsets, job.segments);
      }
      if (error == cudaSuccess) {
        const int threads = 256;
        gather_thresholds<<<(job.threshold_count + threads - 1) / threads, threads>>>(
            sorted.Current(), job.threshold_positions, job.threshold_count, spec.grad_dtype, job.thresholds);
        error = cudaGetLastError();
      }
      if (error != cudaSuccess) return cuda_error_text(std::string("CUB ") + spec.method_name(), error);
    }
    return std::string();
  });
  state.SetBytesProcessed(static_cast<int64_t>(spec.floor_bytes() * static_cast<double>(state.iterations())));
  state.counters["entries"] = static_cast<double>(total);
  state.counters["tensors"] = static_cast<double>(numels.size());
}

void sort_baseline(benchmark::State& state, const SortBaselineSpec& spec) {
  if (spec.grad_dtype == GMTK_FLOAT32) {
    run_sort_baseline<uint32_t>(state, spec);
  } else {
    run_sort_baseline<uint16_t>(state, spec);
  }
}

}  // namespace

void register_sort_baseline(const SortBaselineSpec& spec) {
  if (!registered_sort_baselines().emplace(spec.name(), spec).second) return;
  benchmark::RegisterBenchmark(spec.name().c_str(), [spec](benchmark::State& state) { sort_baseline(state, spec); })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

}  // namespace gmtk_bench
