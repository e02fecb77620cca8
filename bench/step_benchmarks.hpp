// The benchmarks of a gmtk call (step, selection, mask), the CUB baselines of
// selection, and their registries, which the reporter uses to pair each run
// with its baselines.
#pragma once

#include <gmtk/gmtk.h>

#include <map>
#include <string>
#include <vector>

#include "bench_shapes.hpp"
#include "gradient_values.hpp"

namespace gmtk_bench {

enum class Call { step, select, mask };

// Where a run's mask comes from (SPEC section 8): selected each call, the
// thresholds of one selecting call given back each call, or the bitmap of
// one selecting call given each call (a SIFT-style fixed mask).
enum class MaskInput { selected, given_thresholds, fixed_bitmap };

struct StepSpec {
  std::string device;  // "cpu" or "gpu"
  Call call = Call::step;
  gmtkOptimizer_t optimizer = GMTK_OPTIMIZER_ADAMW;
  gmtkDtype_t grad_dtype = GMTK_FLOAT32;
  gmtkDtype_t param_dtype = GMTK_FLOAT32;
  bool master = false;
  double ratio = 0.0;
  gmtkScope_t scope = GMTK_SCOPE_PER_TENSOR;
  gmtkMaskMode_t mode = GMTK_MASK_GRAD;
  Distribution distribution = Distribution::student_t3;
  ShapeList shapes;
  MaskInput input = MaskInput::selected;

  std::string name() const;
  // The group config of the run: torch defaults (SGD with momentum 0.9) plus ratio, scope and mode.
  gmtkGroupConfig_t group() const;
  // Calls the gmtk entry point of `call`.
  gmtkStatus_t invoke(gmtkPlan_t plan, const gmtkStepArgs_t& args, void* workspace, size_t workspace_bytes,
                      gmtkStream_t stream) const;
  // The same run as a plain step: ratio 0, per-tensor, mask-grad, selected.
  StepSpec plain() const;
  // Bytes of the given input the run needs (0 when it selects).
  size_t input_bytes(gmtkPlan_t plan) const;
  // Makes the given input in `buffer` (input_bytes of memory the plan's
  // backend reads) with one selecting call at the run's ratio, and points
  // `args` at it. Returns the call's status.
  gmtkStatus_t prepare_input(gmtkPlan_t plan, void* buffer, void* workspace, size_t workspace_bytes,
                             gmtkStream_t stream, gmtkStepArgs_t* args) const;
  // The same run with per-tensor scope.
  StepSpec per_tensor() const;
  // Bytes the run must move at the least (PERFORMANCE.md): the floor of a
  // plain step for steps; one read of the gradients for selection; a read and
  // a write of them for masking.
  double floor_bytes() const;
};

// The runs both devices measure on `base`: a step at each of `ratios`, global
// scope at 0.9, freeze mode at 0.9 and 0.99 (PERFORMANCE.md's targets), bf16
// gradients and parameters with fp32 master weights at 0, 0.5, 0.9 and 0.99,
// given thresholds at 0.9 and a fixed-bitmap freeze step at 0.9 and 0.99
// (mask schedules, each over the plain step), and selection alone at 0.9 for
// fp32 and bf16 gradients over `select_shapes`.
std::vector<StepSpec> standard_specs(const StepSpec& base, const std::vector<double>& ratios,
                                     const ShapeList& select_shapes);

// Every registered spec by benchmark name.
std::map<std::string, StepSpec>& registered_specs();

// Two host-side figures of one call of a spec (PERFORMANCE.md), each with its
// own benchmark name and registry:
//   launches   the call captured into a CUDA graph on a non-default stream:
//              counters "kernel_nodes", "memset_nodes", "other_nodes";
//   host time  the host time of the call alone (validation included, no GPU
//              wait): counter "host_us_median".
std::string launches_benchmark_name(const StepSpec& spec);
std::string host_time_benchmark_name(const StepSpec& spec);
std::map<std::string, StepSpec>& registered_launch_counts();
std::map<std::string, StepSpec>& registered_host_times();

// The copy benchmark whose bandwidth is the roofline of each device.
std::string copy_benchmark_name(const std::string& device);

// The GPU one-read roofline: a kernel that reads `bytes` once and writes one
// value, the floor of a selection (PERFORMANCE.md: selection time / one read).
std::string read_roofline_name(int64_t bytes);
bool is_read_roofline(const std::string& benchmark_name);

// A selection built from CUB radix sorts, the baseline that gmtk's selection
// is compared with. Each run writes the |g| keys (the gradient bits with the
// sign cleared) with a transform, sorts them and reads T = the k-th largest
// key, k = n - floor(r n) as gmtk counts it:
//   sort_per_tensor    one DeviceRadixSort per tensor, one tensor after another;
//   sort_concatenated  the keys of all tensors in one buffer, one sort (global scope);
//   segmented_sort     the keys of all tensors in one buffer, one
//                      DeviceSegmentedRadixSort with a segment per tensor.
enum class SortBaseline { sort_per_tensor, sort_concatenated, segmented_sort };

struct SortBaselineSpec {
  SortBaseline method = SortBaseline::sort_per_tensor;
  gmtkDtype_t grad_dtype = GMTK_FLOAT32;
  double ratio = 0.9;
  Distribution distribution = Distribution::student_t3;
  ShapeList shapes;

  // The CUB way to make the selection of `select`: the concatenated sort for
  // global scope; per tensor, a loop of sorts over a few tensors and the
  // segmented sort over many (a loop over hundreds would time its launches).
  static SortBaselineSpec for_selection(const StepSpec& select);

  std::string name() const;
  const char* method_name() const;
  // Bytes a selection must move at the least: one read of the gradients.
  double floor_bytes() const;
};

// Every registered CUB baseline by benchmark name.
std::map<std::string, SortBaselineSpec>& registered_sort_baselines();

void register_cpu_benchmarks(bool large);
// Returns false, with the reason, when no CUDA device is usable.
bool register_gpu_benchmarks(int llama_layers, std::string* reason);
// Registers a CUB baseline (once per name; cub_baselines.cu).
void register_sort_baseline(const SortBaselineSpec& spec);

}  // namespace gmtk_bench
