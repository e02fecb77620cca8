#include "step_benchmarks.hpp"

#include <sstream>

namespace gmtk_bench {
namespace {

const char* optimizer_name(gmtkOptimizer_t optimizer) {
  switch (optimizer) {
    case GMTK_OPTIMIZER_ADAMW: return "adamw";
    case GMTK_OPTIMIZER_ADAM: return "adam";
    case GMTK_OPTIMIZER_SGD: return "sgd";
  }
  return "?";
}

const char* dtype_name(gmtkDtype_t dtype) {
  return dtype == GMTK_FLOAT32 ? "fp32" : dtype == GMTK_FLOAT16 ? "fp16" : "bf16";
}

const char* call_name(Call call) {
  switch (call) {
    case Call::step: return "step";
    case Call::select: return "select";
    case Call::mask: return "mask";
  }
  return "?";
}

}  // namespace

std::string StepSpec::name() const {
  std::ostringstream out;
  out << device << "/" << call_name(call) << "/" << optimizer_name(optimizer) << "_g" << dtype_name(grad_dtype)
      << "_p" << dtype_name(param_dtype) << (master ? "_master" : "") << "/" << shapes.name << "/"
      << distribution_name(distribution) << "/" << (scope == GMTK_SCOPE_GLOBAL ? "global" : "per_tensor") << "/"
      << (mode == GMTK_MASK_FREEZE ? "freeze" : "mask_grad") << "/ratio:" << ratio;
  if (input == MaskInput::given_thresholds) out << "/given_thresholds";
  if (input == MaskInput::fixed_bitmap) out << "/fixed_bitmap";
  return out.str();
}

gmtkGroupConfig_t StepSpec::group() const {
  gmtkGroupConfig_t group;
  gmtkGroupConfigInit(&group, optimizer);
  group.mask_ratio = ratio;
  group.scope = scope;
  group.mask_mode = mode;
  if (optimizer == GMTK_OPTIMIZER_SGD) group.momentum = 0.9;
  return group;
}

gmtkStatus_t StepSpec::invoke(gmtkPlan_t plan, const gmtkStepArgs_t& args, void* workspace, size_t workspace_bytes,
                              gmtkStream_t stream) const {
  switch (call) {
    case Call::step: return gmtkStep(plan, &args, workspace, workspace_bytes, stream);
    case Call::select: return gmtkSelectThresholds(plan, &args, workspace, workspace_bytes, stream);
    case Call::mask: return gmtkMaskGradients(plan, &args, workspace, workspace_bytes, stream);
  }
  return GMTK_ERROR_INTERNAL;
}

StepSpec StepSpec::plain() const {
  StepSpec spec = *this;
  spec.call = Call::step;
  spec.ratio = 0.0;
  spec.scope = GMTK_SCOPE_PER_TENSOR;
  spec.mode = GMTK_MASK_GRAD;
  spec.input = MaskInput::selected;
  return spec;
}

size_t StepSpec::input_bytes(gmtkPlan_t plan) const {
  if (input == MaskInput::given_thresholds) return shapes.numels.size() * sizeof(float);
  if (input != MaskInput::fixed_bitmap) return 0;
  uint64_t words = 0;
  if (gmtkPlanGetMaskLayout(plan, &words, nullptr) != GMTK_SUCCESS) return 0;
  return static_cast<size_t>(words) * sizeof(uint32_t);
}

gmtkStatus_t StepSpec::prepare_input(gmtkPlan_t plan, void* buffer, void* workspace, size_t workspace_bytes,
                                     gmtkStream_t stream, gmtkStepArgs_t* args) const {
  if (input == MaskInput::selected) return GMTK_SUCCESS;
  gmtkStepArgs_t select = GMTK_STEP_ARGS_INIT;
  if (input == MaskInput::given_thresholds) {
    select.thresholds = static_cast<float*>(buffer);
    args->given_thresholds = static_cast<const float*>(buffer);
  } else {
    select.mask_bits = static_cast<uint32_t*>(buffer);
    args->given_mask_bits = static_cast<const uint32_t*>(buffer);
  }
  return gmtkSelectThresholds(plan, &select, workspace, workspace_bytes, stream);
}

StepSpec StepSpec::per_tensor() const {
  StepSpec spec = *this;
  spec.scope = GMTK_SCOPE_PER_TENSOR;
  return spec;
}

double StepSpec::floor_bytes() const {
  const double entries = static_cast<double>(shapes.total());
  switch (call) {
    case Call::step: return entries * step_floor_bytes_per_entry(optimizer, grad_dtype, param_dtype, master);
    case Call::select: return entries * static_cast<double>(dtype_bytes(grad_dtype));
    case Call::mask: return 2.0 * entries * static_cast<double>(dtype_bytes(grad_dtype));
  }
  return 0.0;
}

std::vector<StepSpec> standard_specs(const StepSpec& base, const std::vector<double>& ratios,
                                     const ShapeList& select_shapes) {
  std::vector<StepSpec> specs;
  for (double ratio : ratios) {
    specs.push_back(base);
    specs.back().ratio = ratio;
  }
  specs.push_back(base);
  specs.back().ratio = 0.9;
  specs.back().scope = GMTK_SCOPE_GLOBAL;
  for (double ratio : {0.9, 0.99}) {
    specs.push_back(base);
    specs.back().ratio = ratio;
    specs.back().mode = GMTK_MASK_FREEZE;
  }
  for (double ratio : {0.0, 0.5, 0.9, 0.99}) {
    specs.push_back(base);
    specs.back().grad_dtype = specs.back().param_dtype = GMTK_BFLOAT16;
    specs.back().master = true;
    specs.back().ratio = ratio;
  }
  // Mask schedules: a selection-free step on the thresholds of an earlier
  // call, and a fixed-bitmap freeze step, which moves only the sectors that
  // hold kept entries.
  specs.push_back(base);
  specs.back().ratio = 0.9;
  specs.back().input = MaskInput::given_thresholds;
  for (double ratio : {0.9, 0.99}) {
    specs.push_back(base);
    specs.back().ratio = ratio;
    specs.back().mode = GMTK_MASK_FREEZE;
    specs.back().input = MaskInput::fixed_bitmap;
  }
  for (gmtkDtype_t dtype : {GMTK_FLOAT32, GMTK_BFLOAT16}) {
    specs.push_back(base);
    specs.back().call = Call::select;
    specs.back().grad_dtype = dtype;
    specs.back().ratio = 0.9;
    specs.back().shapes = select_shapes;
  }
  return specs;
}

std::map<std::string, StepSpec>& registered_specs() {
  static std::map<std::string, StepSpec> specs;
  return specs;
}

namespace {
// "gpu/step/..." -> "gpu/<figure>/step/...".
std::string figure_name(const std::string& figure, const StepSpec& spec) {
  const std::string name = spec.name();
  const size_t slash = name.find('/');
  return name.substr(0, slash + 1) + figure + name.substr(slash);
}
}  // namespace

std::string launches_benchmark_name(const StepSpec& spec) { return figure_name("launches", spec); }
std::string host_time_benchmark_name(const StepSpec& spec) { return figure_name("host_time", spec); }

std::map<std::string, StepSpec>& registered_launch_counts() {
  static std::map<std::string, StepSpec> specs;
  return specs;
}

std::map<std::string, StepSpec>& registered_host_times() {
  static std::map<std::string, StepSpec> specs;
  return specs;
}

std::string copy_benchmark_name(const std::string& device) {
  return device == "gpu" ? "gpu/d2d_copy/bytes:1073741824" : "cpu/memcpy/bytes:268435456";
}

namespace {
const std::string kReadRoofline = "gpu/read_roofline";
}  // namespace

std::string read_roofline_name(int64_t bytes) { return kReadRoofline + "/bytes:" + std::to_string(bytes); }

bool is_read_roofline(const std::string& benchmark_name) {
  return benchmark_name.compare(0, kReadRoofline.size() + 1, kReadRoofline + "/") == 0;
}

SortBaselineSpec SortBaselineSpec::for_selection(const StepSpec& select) {
  constexpr size_t kMostTensorsSortedOneByOne = 64;
  SortBaselineSpec spec;
  if (select.scope == GMTK_SCOPE_GLOBAL) {
    spec.method = SortBaseline::sort_concatenated;
  } else {
    spec.method = select.shapes.numels.size() <= kMostTensorsSortedOneByOne ? SortBaseline::sort_per_tensor
                                                                            : SortBaseline::segmented_sort;
  }
  spec.grad_dtype = select.grad_dtype;
  spec.ratio = select.ratio;
  spec.distribution = select.distribution;
  spec.shapes = select.shapes;
  return spec;
}

const char* SortBaselineSpec::method_name() const {
  switch (method) {
    case SortBaseline::sort_per_tensor: return "sort_per_tensor";
    case SortBaseline::sort_concatenated: return "sort_concatenated";
    case SortBaseline::segmented_sort: return "segmented_sort";
  }
  return "?";
}

std::string SortBaselineSpec::name() const {
  std::ostringstream out;
  out << "gpu/cub_baseline/" << method_name() << "/" << dtype_name(grad_dtype) << "/" << shapes.name << "/"
      << distribution_name(distribution) << "/ratio:" << ratio;
  return out.str();
}

double SortBaselineSpec::floor_bytes() const {
  return static_cast<double>(shapes.total()) * static_cast<double>(dtype_bytes(grad_dtype));
}

std::map<std::string, SortBaselineSpec>& registered_sort_baselines() {
  static std::map<std::string, SortBaselineSpec> specs;
  return specs;
}

}  // namespace gmtk_bench
