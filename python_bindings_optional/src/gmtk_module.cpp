// gmtk._gmtk: the C API of include/gmtk/gmtk.h on DLPack arrays.
//
// The binding computes nothing itself. What it checks before calling the
// library is what the C API cannot see from raw pointers: that an array lives
// where the handle's backend reads (host for the CPU reference, the handle's
// device for CUDA), is contiguous, has a supported dtype, and holds as many
// entries as the gradient it belongs to. Every other check is the library's,
// and its message is raised as it is.
#include <gmtk/gmtk.h>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace nb = nanobind;

namespace {

using Array = nb::ndarray<>;            // any framework and device; writable
using InputArray = nb::ndarray<nb::ro>;  // only read by the library

// ---- Errors ------------------------------------------------------------------

// Exception classes, indexed by status; created at import (see define_errors).
PyObject* error_classes[GMTK_NUM_STATUSES] = {};

[[noreturn]] void raise_status(gmtkStatus_t status, const std::string& message) {
  PyObject* type = (status > GMTK_SUCCESS && status < GMTK_NUM_STATUSES) ? error_classes[status] : nullptr;
  if (type == nullptr) type = error_classes[GMTK_ERROR_INTERNAL];
  nb::object instance = nb::steal(PyObject_CallFunction(type, "s", message.c_str()));
  if (!instance.is_valid()) throw nb::python_error();
  nb::setattr(instance, "status", nb::cast(status));
  PyErr_SetObject(type, instance.ptr());
  throw nb::python_error();
}

void check(gmtkStatus_t status) {
  if (status != GMTK_SUCCESS) raise_status(status, gmtkGetLastErrorMessage());
}

[[noreturn]] void invalid_argument(const std::string& message) {
  raise_status(GMTK_ERROR_INVALID_ARGUMENT, message);
}

// ---- Arrays -------------------------------------------------------------------

const char* device_type_name(int device_type) {
  switch (device_type) {
    case nb::device::cpu::value: return "the host (CPU)";
    case nb::device::cuda::value: return "a CUDA device";
    case nb::device::cuda_host::value: return "pinned host memory";
    case nb::device::cuda_managed::value: return "CUDA managed memory";
    default: return "an unsupported device type";
  }
}

template <typename AnyArray>
void check_contiguous(const AnyArray& array, const std::string& name) {
  if (array.stride_ptr() == nullptr) return;  // DLPack: compact row-major
  if (array.size() == 0) return;              // no entries, no layout (numpy gives fresh empty arrays stride 0)
  int64_t expected = 1;
  for (size_t i = array.ndim(); i-- > 0;) {
    if (array.shape(i) != 1 && array.stride(i) != expected)
      invalid_argument(name + " is not C-contiguous: gmtk reads each buffer as one flat run of entries");
    expected *= static_cast<int64_t>(array.shape(i));
  }
}

std::string dtype_name(nb::dlpack::dtype dtype) {
  const char* kind = "?";
  switch (static_cast<nb::dlpack::dtype_code>(dtype.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
    case nb::dlpack::dtype_code::Bool: kind = "bool"; break;
    default: break;
  }
  std::string name = std::string(kind) + std::to_string(dtype.bits);
  if (dtype.lanes != 1) name += "x" + std::to_string(dtype.lanes);
  return name;
}

bool is_dtype(nb::dlpack::dtype dtype, nb::dlpack::dtype_code code, int bits) {
  return dtype.code == static_cast<uint8_t>(code) && dtype.bits == bits && dtype.lanes == 1;
}

// The gmtk dtype of a gradient or parameter array. An explicit dtype lets a
// 16-bit integer array stand for bfloat16 or float16 (numpy has no bfloat16).
gmtkDtype_t floating_dtype(const Array& array, std::optional<gmtkDtype_t> requested, const std::string& name) {
  const nb::dlpack::dtype dtype = array.dtype();
  std::optional<gmtkDtype_t> found;
  if (is_dtype(dtype, nb::dlpack::dtype_code::Float, 32)) found = GMTK_FLOAT32;
  if (is_dtype(dtype, nb::dlpack::dtype_code::Float, 16)) found = GMTK_FLOAT16;
  if (is_dtype(dtype, nb::dlpack::dtype_code::Bfloat, 16)) found = GMTK_BFLOAT16;
  const bool raw_16_bits = is_dtype(dtype, nb::dlpack::dtype_code::UInt, 16) ||
                           is_dtype(dtype, nb::dlpack::dtype_code::Int, 16);
  if (!requested) {
    if (found) return *found;
    invalid_argument(name + " has dtype " + dtype_name(dtype) +
                     "; gmtk takes float32, float16 or bfloat16 (or a 16-bit integer array with an explicit dtype)");
  }
  const bool requested_16 = *requested == GMTK_FLOAT16 || *requested == GMTK_BFLOAT16;
  if (found == requested || (requested_16 && raw_16_bits)) return *requested;
  invalid_argument(name + " has dtype " + dtype_name(dtype) + ", which cannot hold the requested dtype");
}

// Where a handle's backend reads memory.
struct Location {
  gmtkBackend_t backend = GMTK_BACKEND_CUDA;
  int device = 0;
};

template <typename AnyArray>
void check_location(const AnyArray& array, const Location& location, const std::string& name) {
  const int type = array.device_type();
  if (location.backend == GMTK_BACKEND_CPU_REFERENCE) {
    if (type != nb::device::cpu::value)
      invalid_argument(name + " is in " + device_type_name(type) +
                       ", but the handle's backend is the CPU reference, which reads host memory");
    return;
  }
  if (type == nb::device::cuda_managed::value) return;
  if (type != nb::device::cuda::value)
    invalid_argument(name + " is in " + device_type_name(type) + ", but the handle's backend is CUDA device " +
                     std::to_string(location.device));
  if (array.device_id() != location.device)
    invalid_argument(name + " is on CUDA device " + std::to_string(array.device_id()) + ", the handle on device " +
                     std::to_string(location.device));
}

// A caller-owned array of `minimum` or more entries of one dtype.
template <typename AnyArray>
void* buffer_of(const std::optional<AnyArray>& array, const Location& location, const std::string& name,
                nb::dlpack::dtype_code code, int bits, size_t minimum) {
  if (!array) return nullptr;
  check_location(*array, location, name);
  check_contiguous(*array, name);
  if (!is_dtype(array->dtype(), code, bits))
    invalid_argument(name + " has dtype " + dtype_name(array->dtype()) + ", expected " +
                     dtype_name(nb::dlpack::dtype{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1}));
  if (array->size() < minimum)
    invalid_argument(name + " has " + std::to_string(array->size()) + " entries, needs at least " +
                     std::to_string(minimum));
  return const_cast<void*>(static_cast<const void*>(array->data()));  // the C API's const says what is read
}

// cudaStream_t from None, an integer, an object with __cuda_stream__ (the CUDA
// stream protocol) or with a cuda_stream attribute (torch.cuda.Stream).
gmtkStream_t stream_of(const nb::object& stream) {
  if (stream.is_none()) return nullptr;
  nb::object handle = stream;
  if (nb::hasattr(stream, "__cuda_stream__")) {
    handle = stream.attr("__cuda_stream__")()[1];
  } else if (nb::hasattr(stream, "cuda_stream")) {
    handle = stream.attr("cuda_stream");
  }
  if (!nb::isinstance<nb::int_>(handle))
    invalid_argument("stream must be a cudaStream_t as an integer, or have __cuda_stream__ or cuda_stream");
  return reinterpret_cast<gmtkStream_t>(nb::cast<uintptr_t>(handle));
}

// ---- Handle ---------------------------------------------------------------------

class Handle {
 public:
  Handle(gmtkBackend_t backend, int device) {
    gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
    config.backend = backend;
    config.device = device;
    check(gmtkHandleCreate(&handle_, &config));
    location_ = Location{backend, device};
  }
  ~Handle() { gmtkHandleDestroy(handle_); }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  gmtkHandle_t get() const { return handle_; }
  const Location& location() const { return location_; }

 private:
  gmtkHandle_t handle_ = nullptr;
  Location location_;
};

// ---- Communicator ------------------------------------------------------------------

class Comm {
 public:
  explicit Comm(gmtkComm_t comm) : comm_(comm) {}
  ~Comm() { gmtkCommDestroy(comm_); }
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  gmtkComm_t get() const { return comm_; }
  int rank() const {
    int rank = 0;
    check(gmtkCommGetRank(comm_, &rank));
    return rank;
  }
  int size() const {
    int size = 0;
    check(gmtkCommGetSize(comm_, &size));
    return size;
  }

 private:
  gmtkComm_t comm_;
};

// ---- Group config -----------------------------------------------------------------

struct GroupConfig {
  gmtkGroupConfig_t config{};
  std::optional<InputArray> lr_device;  // kept alive: the plan reads it at every step
};

GroupConfig make_group_config(gmtkOptimizer_t optimizer) {
  GroupConfig group;
  check(gmtkGroupConfigInit(&group.config, optimizer));
  return group;
}

// ---- Tensor -------------------------------------------------------------------------

struct Tensor {
  int32_t group = 0;
  int64_t logical_numel = 0;  // a shard's logical tensor (0 with shard_offset 0: the whole tensor)
  int64_t shard_offset = 0;
  std::optional<InputArray> score;  // selects the mask instead of the gradient
  gmtkDtype_t score_dtype = GMTK_FLOAT32;
  Array grad;
  std::optional<Array> param, master_param, exp_avg, exp_avg_sq, max_exp_avg_sq;
  gmtkDtype_t grad_dtype = GMTK_FLOAT32;
  gmtkDtype_t param_dtype = GMTK_FLOAT32;

  int64_t numel() const { return static_cast<int64_t>(grad.size()); }
};

Tensor make_tensor(Array grad, int32_t group, std::optional<Array> param, std::optional<Array> master_param,
                   std::optional<Array> exp_avg, std::optional<Array> exp_avg_sq,
                   std::optional<Array> max_exp_avg_sq, std::optional<gmtkDtype_t> grad_dtype,
                   std::optional<gmtkDtype_t> param_dtype, int64_t logical_numel, int64_t shard_offset,
                   std::optional<InputArray> score) {
  Tensor tensor;
  tensor.group = group;
  tensor.logical_numel = logical_numel;
  tensor.shard_offset = shard_offset;
  tensor.grad_dtype = floating_dtype(grad, grad_dtype, "grad");
  tensor.grad = std::move(grad);
  check_contiguous(tensor.grad, "grad");
  const size_t numel = tensor.grad.size();
  auto same_size = [numel](const std::optional<Array>& array, const char* name) {
    if (array && array->size() != numel)
      invalid_argument(std::string(name) + " has " + std::to_string(array->size()) + " entries, grad has " +
                       std::to_string(numel));
    if (array) check_contiguous(*array, name);
  };
  if (param) tensor.param_dtype = floating_dtype(*param, param_dtype, "param");
  else if (param_dtype) tensor.param_dtype = *param_dtype;
  same_size(param, "param");
  const std::pair<const std::optional<Array>*, const char*> fp32_buffers[] = {
      {&master_param, "master_param"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"},
      {&max_exp_avg_sq, "max_exp_avg_sq"}};
  for (const auto& [array, name] : fp32_buffers) {
    same_size(*array, name);
    if (*array && !is_dtype((*array)->dtype(), nb::dlpack::dtype_code::Float, 32))
      invalid_argument(std::string(name) + " has dtype " + dtype_name((*array)->dtype()) +
                       ", expected float32 (optimizer state and master weights are fp32)");
  }
  if (score) {
    if (score->size() != numel)
      invalid_argument("score has " + std::to_string(score->size()) + " entries, grad has " + std::to_string(numel));
    check_contiguous(*score, "score");
    const nb::dlpack::dtype dtype = score->dtype();
    if (is_dtype(dtype, nb::dlpack::dtype_code::Float, 32)) tensor.score_dtype = GMTK_FLOAT32;
    else if (is_dtype(dtype, nb::dlpack::dtype_code::Float, 16)) tensor.score_dtype = GMTK_FLOAT16;
    else if (is_dtype(dtype, nb::dlpack::dtype_code::Bfloat, 16)) tensor.score_dtype = GMTK_BFLOAT16;
    else invalid_argument("score has dtype " + dtype_name(dtype) + "; gmtk takes float32, float16 or bfloat16");
    tensor.score = std::move(score);
  }
  tensor.param = std::move(param);
  tensor.master_param = std::move(master_param);
  tensor.exp_avg = std::move(exp_avg);
  tensor.exp_avg_sq = std::move(exp_avg_sq);
  tensor.max_exp_avg_sq = std::move(max_exp_avg_sq);
  return tensor;
}

// ---- Plan ---------------------------------------------------------------------------

struct CallOutputs {
  int64_t step = 1;
  std::optional<Array> step_count;
  std::optional<InputArray> inv_loss_scale;
  std::optional<Array> found_inf, thresholds, kept_counts, workspace;
  nb::object stream;
  gmtkGradientReduction_t gradient_reduction = GMTK_GRADIENTS_AS_GIVEN;
  std::optional<InputArray> given_thresholds, given_mask_bits;
  std::optional<Array> mask_bits;
};

class Plan {
 public:
  Plan(const Handle& handle, const std::vector<GroupConfig>& groups, const std::vector<Tensor>& tensors,
       bool allocate_workspace, bool hold_gradients, nb::object comm)
      : location_(handle.location()), tensors_(tensors), comm_(comm) {
    std::vector<gmtkGroupConfig_t> group_configs;
    group_configs.reserve(groups.size());
    for (size_t g = 0; g < groups.size(); ++g) {
      gmtkGroupConfig_t config = groups[g].config;
      config.lr_device = static_cast<const float*>(
          buffer_of(groups[g].lr_device, location_, "groups[" + std::to_string(g) + "].lr_device",
                    nb::dlpack::dtype_code::Float, 32, 1));
      group_configs.push_back(config);
      lr_devices_.push_back(groups[g].lr_device);
    }
    std::vector<gmtkTensor_t> records;
    records.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) records.push_back(record_of(tensors[i], i));

    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = group_configs.data();
    config.num_groups = static_cast<int32_t>(group_configs.size());
    config.tensors = records.empty() ? nullptr : records.data();
    config.num_tensors = static_cast<int64_t>(records.size());
    config.flags = allocate_workspace ? GMTK_PLAN_ALLOCATE_WORKSPACE : 0u;
    // Kept referenced: gmtk.h asks for the communicator to outlive its plans.
    config.comm = comm.is_none() ? nullptr : nb::cast<const Comm&>(comm).get();
    if (groups.size() > INT32_MAX) invalid_argument("groups: too many groups");
    gmtkStatus_t status;
    std::string message;
    {
      nb::gil_scoped_release unlocked;  // a CUDA plan copies its tables to the device
      status = gmtkPlanCreate(handle.get(), &config, &plan_);
      if (status != GMTK_SUCCESS) message = gmtkGetLastErrorMessage();
    }
    if (status != GMTK_SUCCESS) raise_status(status, message);
    check(gmtkPlanGetWorkspaceSize(plan_, &workspace_bytes_));
    // Borrowed gradients: the caller keeps them valid (and re-checks their
    // addresses before each call, as gmtk.torch does), so that a framework's
    // allocator can hand the same memory to the next backward.
    if (!hold_gradients) {
      for (Tensor& tensor : tensors_) tensor.grad = Array();
    }
  }
  ~Plan() { destroy(); }  // never during a call: the call holds a reference to the plan
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  void close() {
    if (busy_) invalid_argument("plan: close() while a call on this plan runs on another thread");
    destroy();
  }

  size_t workspace_size() const { return live()->workspace_bytes_; }

  uint64_t mask_words() const {
    uint64_t words = 0;
    check(gmtkPlanGetMaskLayout(live()->plan_, &words, nullptr));
    return words;
  }

  // gmtkPlanGetState: false once a call met a sticky CUDA error.
  bool usable() const {
    gmtkStatus_t state = GMTK_SUCCESS;
    check(gmtkPlanGetState(live()->plan_, &state));
    return state == GMTK_SUCCESS;
  }

  std::vector<uint64_t> mask_word_offsets() const {
    std::vector<uint64_t> offsets(tensors_.size());
    uint64_t words = 0;
    check(gmtkPlanGetMaskLayout(live()->plan_, &words, offsets.data()));
    return offsets;
  }
  int64_t num_tensors() const { return static_cast<int64_t>(live()->tensors_.size()); }

  void set_group_hyperparams(int32_t group, const GroupConfig& group_config) {
    live();
    if (group < 0 || static_cast<size_t>(group) >= lr_devices_.size())
      invalid_argument("group " + std::to_string(group) + " is not a group of this plan (it has " +
                       std::to_string(lr_devices_.size()) + ")");
    gmtkGroupConfig_t config = group_config.config;
    config.lr_device = static_cast<const float*>(
        buffer_of(group_config.lr_device, location_, "config.lr_device", nb::dlpack::dtype_code::Float, 32, 1));
    check(gmtkPlanSetGroupHyperparams(plan_, group, &config));
    lr_devices_[static_cast<size_t>(group)] = group_config.lr_device;
  }

  using Entry = gmtkStatus_t (*)(gmtkPlan_t, const gmtkStepArgs_t*, void*, size_t, gmtkStream_t);

  void call(Entry entry, const CallOutputs& outputs) {
    live();
    const size_t count = tensors_.size();
    using Code = nb::dlpack::dtype_code;
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step = outputs.step;
    args.gradient_reduction = outputs.gradient_reduction;
    args.given_thresholds = static_cast<const float*>(
        buffer_of(outputs.given_thresholds, location_, "given_thresholds", Code::Float, 32, count));
    args.given_mask_bits = static_cast<const uint32_t*>(
        buffer_of(outputs.given_mask_bits, location_, "given_mask_bits", Code::UInt, 32, mask_words()));
    args.mask_bits = static_cast<uint32_t*>(buffer_of(outputs.mask_bits, location_, "mask_bits", Code::UInt, 32,
                                                      mask_words()));
    args.step_count = static_cast<int64_t*>(buffer_of(outputs.step_count, location_, "step_count", Code::Int, 64, 1));
    args.inv_loss_scale = static_cast<const float*>(
        buffer_of(outputs.inv_loss_scale, location_, "inv_loss_scale", Code::Float, 32, 1));
    args.found_inf = static_cast<float*>(buffer_of(outputs.found_inf, location_, "found_inf", Code::Float, 32, 1));
    args.thresholds = static_cast<float*>(
        buffer_of(outputs.thresholds, location_, "thresholds", Code::Float, 32, count));
    args.kept_counts = static_cast<int64_t*>(
        buffer_of(outputs.kept_counts, location_, "kept_counts", Code::Int, 64, count));
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
    if (outputs.workspace) {
      check_location(*outputs.workspace, location_, "workspace");
      check_contiguous(*outputs.workspace, "workspace");
      workspace = outputs.workspace->data();
      workspace_bytes = outputs.workspace->nbytes();
    }
    const gmtkStream_t stream = stream_of(outputs.stream);
    // The GIL is released while the library runs: another thread must not
    // close this plan or call it meanwhile (a plan takes one call at a time).
    if (busy_) invalid_argument("plan: already running a call on another thread (one call at a time per plan)");
    busy_ = true;
    gmtkStatus_t status;
    std::string message;
    {
      nb::gil_scoped_release unlocked;
      status = entry(plan_, &args, workspace, workspace_bytes, stream);
      if (status != GMTK_SUCCESS) message = gmtkGetLastErrorMessage();
    }
    busy_ = false;
    if (status != GMTK_SUCCESS) raise_status(status, message);
  }

 private:
  void destroy() {
    if (plan_ != nullptr) gmtkPlanDestroy(plan_);
    plan_ = nullptr;
    tensors_.clear();
    lr_devices_.clear();
  }

  const Plan* live() const {
    if (plan_ == nullptr) raise_status(GMTK_ERROR_INVALID_ARGUMENT, "plan: this plan was closed");
    return this;
  }

  gmtkTensor_t record_of(const Tensor& tensor, size_t index) const {
    const std::string prefix = "tensors[" + std::to_string(index) + "].";
    auto located = [&](const std::optional<Array>& array, const char* name) -> void* {
      if (!array) return nullptr;
      check_location(*array, location_, prefix + name);
      return array->data();
    };
    gmtkTensor_t record{};
    record.group = tensor.group;
    record.numel = tensor.numel();
    record.grad_dtype = tensor.grad_dtype;
    record.grad = located(std::optional<Array>(tensor.grad), "grad");
    record.param_dtype = tensor.param_dtype;
    record.param = located(tensor.param, "param");
    record.master_param = static_cast<float*>(located(tensor.master_param, "master_param"));
    record.exp_avg = static_cast<float*>(located(tensor.exp_avg, "exp_avg"));
    record.exp_avg_sq = static_cast<float*>(located(tensor.exp_avg_sq, "exp_avg_sq"));
    record.max_exp_avg_sq = static_cast<float*>(located(tensor.max_exp_avg_sq, "max_exp_avg_sq"));
    record.logical_numel = tensor.logical_numel;
    record.shard_offset = tensor.shard_offset;
    if (tensor.score) {
      check_location(*tensor.score, location_, prefix + "score");
      record.score = tensor.score->data();
      record.score_dtype = tensor.score_dtype;
    }
    return record;
  }

  Location location_;
  gmtkPlan_t plan_ = nullptr;
  bool busy_ = false;  // read and written with the GIL held
  size_t workspace_bytes_ = 0;
  std::vector<Tensor> tensors_;                       // keeps every captured array alive
  std::vector<std::optional<InputArray>> lr_devices_;  // likewise, per group
  nb::object comm_;                                    // the Comm, or None
};

void define_errors(nb::module_& m) {
  PyObject* base = PyErr_NewExceptionWithDoc(
      "gmtk.Error", "A gmtk call failed; str() is gmtkGetLastErrorMessage(), .status the gmtk.Status.",
      PyExc_RuntimeError, nullptr);
  m.attr("Error") = nb::steal(base);
  auto derived = [&](gmtkStatus_t status, const char* name, PyObject* also) {
    const std::string qualified = std::string("gmtk.") + name;
    PyObject* bases = also ? PyTuple_Pack(2, base, also) : PyTuple_Pack(1, base);
    PyObject* type = PyErr_NewException(qualified.c_str(), bases, nullptr);
    Py_DECREF(bases);
    m.attr(name) = nb::steal(type);
    error_classes[status] = type;
  };
  derived(GMTK_ERROR_INVALID_ARGUMENT, "InvalidArgumentError", PyExc_ValueError);
  derived(GMTK_ERROR_NOT_SUPPORTED, "NotSupportedError", nullptr);
  derived(GMTK_ERROR_INSUFFICIENT_WORKSPACE, "InsufficientWorkspaceError", PyExc_ValueError);
  derived(GMTK_ERROR_OUT_OF_MEMORY, "OutOfMemoryError", PyExc_MemoryError);
  derived(GMTK_ERROR_DEVICE_UNAVAILABLE, "DeviceUnavailableError", nullptr);
  derived(GMTK_ERROR_CUDA, "CudaError", nullptr);
  derived(GMTK_ERROR_INTERNAL, "InternalError", nullptr);
}

}  // namespace

NB_MODULE(_gmtk, m) {
  m.doc() = "gmtk's C API (include/gmtk/gmtk.h) on DLPack arrays; see docs/python.md";
  m.attr("__version__") = std::to_string(GMTK_VERSION_MAJOR) + "." + std::to_string(GMTK_VERSION_MINOR) + "." +
                          std::to_string(GMTK_VERSION_PATCH);

  nb::enum_<gmtkStatus_t>(m, "Status")
      .value("SUCCESS", GMTK_SUCCESS)
      .value("INVALID_ARGUMENT", GMTK_ERROR_INVALID_ARGUMENT)
      .value("NOT_SUPPORTED", GMTK_ERROR_NOT_SUPPORTED)
      .value("INSUFFICIENT_WORKSPACE", GMTK_ERROR_INSUFFICIENT_WORKSPACE)
      .value("OUT_OF_MEMORY", GMTK_ERROR_OUT_OF_MEMORY)
      .value("DEVICE_UNAVAILABLE", GMTK_ERROR_DEVICE_UNAVAILABLE)
      .value("CUDA", GMTK_ERROR_CUDA)
      .value("INTERNAL", GMTK_ERROR_INTERNAL);
  nb::enum_<gmtkBackend_t>(m, "Backend")
      .value("CUDA", GMTK_BACKEND_CUDA)
      .value("CPU_REFERENCE", GMTK_BACKEND_CPU_REFERENCE);
  nb::enum_<gmtkDtype_t>(m, "Dtype")
      .value("FLOAT32", GMTK_FLOAT32)
      .value("FLOAT16", GMTK_FLOAT16)
      .value("BFLOAT16", GMTK_BFLOAT16);
  nb::enum_<gmtkOptimizer_t>(m, "Optimizer")
      .value("ADAMW", GMTK_OPTIMIZER_ADAMW)
      .value("ADAM", GMTK_OPTIMIZER_ADAM)
      .value("SGD", GMTK_OPTIMIZER_SGD);
  nb::enum_<gmtkScope_t>(m, "Scope")
      .value("PER_TENSOR", GMTK_SCOPE_PER_TENSOR)
      .value("GLOBAL", GMTK_SCOPE_GLOBAL);
  nb::enum_<gmtkMaskMode_t>(m, "MaskMode")
      .value("GRAD", GMTK_MASK_GRAD)
      .value("FREEZE", GMTK_MASK_FREEZE);
  nb::enum_<gmtkGradientReduction_t>(m, "GradientReduction")
      .value("AS_GIVEN", GMTK_GRADIENTS_AS_GIVEN)
      .value("SUM", GMTK_GRADIENTS_SUM)
      .value("AVERAGE", GMTK_GRADIENTS_AVERAGE);

  define_errors(m);

  m.def("library_version", [] {
    int version = 0;
    check(gmtkGetVersion(&version));
    return version;
  }, "GMTK_VERSION of the loaded library: major * 10000 + minor * 100 + patch.");

  nb::class_<Handle>(m, "Handle", "A gmtk handle: one backend, one device (gmtkHandleCreate).")
      .def(nb::init<gmtkBackend_t, int>(), nb::arg("backend") = GMTK_BACKEND_CUDA, nb::arg("device") = 0)
      .def_prop_ro("backend", [](const Handle& h) { return h.location().backend; })
      .def_prop_ro("device", [](const Handle& h) { return h.location().device; });

  // Keyword arguments left as None keep gmtkGroupConfigInit's (torch.optim's) defaults.
  nb::class_<GroupConfig>(m, "GroupConfig", "A parameter group's optimizer and mask settings (gmtkGroupConfig_t).")
      .def(
          "__init__",
          [](GroupConfig* self, gmtkOptimizer_t optimizer, std::optional<double> lr,
             std::optional<InputArray> lr_device, std::optional<double> weight_decay, std::optional<bool> maximize,
             std::optional<double> beta1, std::optional<double> beta2, std::optional<double> eps,
             std::optional<bool> amsgrad, std::optional<double> momentum, std::optional<double> dampening,
             std::optional<bool> nesterov, std::optional<double> mask_ratio, std::optional<gmtkScope_t> scope,
             std::optional<gmtkMaskMode_t> mask_mode) {
            new (self) GroupConfig(make_group_config(optimizer));
            gmtkGroupConfig_t& c = self->config;
            if (lr) c.lr = *lr;
            self->lr_device = std::move(lr_device);
            if (weight_decay) c.weight_decay = *weight_decay;
            if (maximize) c.maximize = *maximize;
            if (beta1) c.beta1 = *beta1;
            if (beta2) c.beta2 = *beta2;
            if (eps) c.eps = *eps;
            if (amsgrad) c.amsgrad = *amsgrad;
            if (momentum) c.momentum = *momentum;
            if (dampening) c.dampening = *dampening;
            if (nesterov) c.nesterov = *nesterov;
            if (mask_ratio) c.mask_ratio = *mask_ratio;
            if (scope) c.scope = *scope;
            if (mask_mode) c.mask_mode = *mask_mode;
          },
          nb::arg("optimizer") = GMTK_OPTIMIZER_ADAMW, nb::kw_only(), nb::arg("lr") = nb::none(),
          nb::arg("lr_device") = nb::none(), nb::arg("weight_decay") = nb::none(), nb::arg("maximize") = nb::none(),
          nb::arg("beta1") = nb::none(), nb::arg("beta2") = nb::none(), nb::arg("eps") = nb::none(),
          nb::arg("amsgrad") = nb::none(), nb::arg("momentum") = nb::none(), nb::arg("dampening") = nb::none(),
          nb::arg("nesterov") = nb::none(), nb::arg("mask_ratio") = nb::none(), nb::arg("scope") = nb::none(),
          nb::arg("mask_mode") = nb::none())
      .def_prop_rw("optimizer", [](const GroupConfig& g) { return g.config.optimizer; },
                   [](GroupConfig& g, gmtkOptimizer_t v) { g.config.optimizer = v; })
      .def_prop_rw("lr", [](const GroupConfig& g) { return g.config.lr; },
                   [](GroupConfig& g, double v) { g.config.lr = v; })
      .def_prop_rw("lr_device", [](const GroupConfig& g) { return g.lr_device; },
                   [](GroupConfig& g, std::optional<InputArray> v) { g.lr_device = std::move(v); },
                   nb::arg("value").none())
      .def_prop_rw("weight_decay", [](const GroupConfig& g) { return g.config.weight_decay; },
                   [](GroupConfig& g, double v) { g.config.weight_decay = v; })
      .def_prop_rw("maximize", [](const GroupConfig& g) { return g.config.maximize != 0; },
                   [](GroupConfig& g, bool v) { g.config.maximize = v; })
      .def_prop_rw("beta1", [](const GroupConfig& g) { return g.config.beta1; },
                   [](GroupConfig& g, double v) { g.config.beta1 = v; })
      .def_prop_rw("beta2", [](const GroupConfig& g) { return g.config.beta2; },
                   [](GroupConfig& g, double v) { g.config.beta2 = v; })
      .def_prop_rw("eps", [](const GroupConfig& g) { return g.config.eps; },
                   [](GroupConfig& g, double v) { g.config.eps = v; })
      .def_prop_rw("amsgrad", [](const GroupConfig& g) { return g.config.amsgrad != 0; },
                   [](GroupConfig& g, bool v) { g.config.amsgrad = v; })
      .def_prop_rw("momentum", [](const GroupConfig& g) { return g.config.momentum; },
                   [](GroupConfig& g, double v) { g.config.momentum = v; })
      .def_prop_rw("dampening", [](const GroupConfig& g) { return g.config.dampening; },
                   [](GroupConfig& g, double v) { g.config.dampening = v; })
      .def_prop_rw("nesterov", [](const GroupConfig& g) { return g.config.nesterov != 0; },
                   [](GroupConfig& g, bool v) { g.config.nesterov = v; })
      .def_prop_rw("mask_ratio", [](const GroupConfig& g) { return g.config.mask_ratio; },
                   [](GroupConfig& g, double v) { g.config.mask_ratio = v; })
      .def_prop_rw("scope", [](const GroupConfig& g) { return g.config.scope; },
                   [](GroupConfig& g, gmtkScope_t v) { g.config.scope = v; })
      .def_prop_rw("mask_mode", [](const GroupConfig& g) { return g.config.mask_mode; },
                   [](GroupConfig& g, gmtkMaskMode_t v) { g.config.mask_mode = v; });

  nb::class_<Comm>(m, "Comm", "The ranks of a sharded plan (gmtkComm_t); see docs/distributed.md.")
      .def_static(
          "in_process",
          [](int num_ranks) {
            std::vector<gmtkComm_t> comms(num_ranks > 0 ? static_cast<size_t>(num_ranks) : 1);
            check(gmtkCommCreateInProcess(num_ranks, comms.data()));
            std::vector<std::unique_ptr<Comm>> out;
            for (gmtkComm_t c : comms) out.push_back(std::make_unique<Comm>(c));
            nb::list ranks;
            for (auto& c : out) ranks.append(nb::cast(c.release(), nb::rv_policy::take_ownership));
            return ranks;
          },
          nb::arg("num_ranks"),
          "num_ranks linked communicators for threads of this process (CPU reference backend): element r is rank r.")
      .def_static(
          "from_nccl",
          [](uintptr_t nccl_comm, int device) {
            gmtkComm_t comm = nullptr;
            check(gmtkCommCreateFromNccl(reinterpret_cast<void*>(nccl_comm), device, &comm));
            return new Comm(comm);
          },
          nb::arg("nccl_comm"), nb::arg("device"),
          "Wraps a caller's ncclComm_t (its address as an integer, e.g. torch's backend._comm_ptr()); "
          "destroy this before the NCCL communicator.")
      .def_prop_ro("rank", &Comm::rank)
      .def_prop_ro("size", &Comm::size);

  nb::class_<Tensor>(m, "Tensor", "One parameter tensor's buffers (gmtkTensor_t); numel is grad's entry count.")
      .def(nb::new_(&make_tensor), nb::arg("grad"), nb::kw_only(), nb::arg("group") = 0,
           nb::arg("param") = nb::none(), nb::arg("master_param") = nb::none(), nb::arg("exp_avg") = nb::none(),
           nb::arg("exp_avg_sq") = nb::none(), nb::arg("max_exp_avg_sq") = nb::none(),
           nb::arg("grad_dtype") = nb::none(), nb::arg("param_dtype") = nb::none(), nb::arg("logical_numel") = 0,
           nb::arg("shard_offset") = 0, nb::arg("score") = nb::none())
      .def_prop_ro("numel", &Tensor::numel)
      .def_ro("logical_numel", &Tensor::logical_numel)
      .def_ro("shard_offset", &Tensor::shard_offset)
      .def_ro("group", &Tensor::group)
      .def_ro("grad_dtype", &Tensor::grad_dtype)
      .def_ro("param_dtype", &Tensor::param_dtype);

  auto call_entry = [](Plan::Entry entry) {
    return [entry](Plan& plan, int64_t step, std::optional<Array> step_count, std::optional<InputArray> inv_loss_scale,
                   std::optional<Array> found_inf, std::optional<Array> thresholds, std::optional<Array> kept_counts,
                   std::optional<Array> workspace, nb::object stream, gmtkGradientReduction_t gradient_reduction,
                   std::optional<InputArray> given_thresholds, std::optional<InputArray> given_mask_bits,
                   std::optional<Array> mask_bits) {
      CallOutputs outputs;
      outputs.gradient_reduction = gradient_reduction;
      outputs.given_thresholds = std::move(given_thresholds);
      outputs.given_mask_bits = std::move(given_mask_bits);
      outputs.mask_bits = std::move(mask_bits);
      outputs.step = step;
      outputs.step_count = std::move(step_count);
      outputs.inv_loss_scale = std::move(inv_loss_scale);
      outputs.found_inf = std::move(found_inf);
      outputs.thresholds = std::move(thresholds);
      outputs.kept_counts = std::move(kept_counts);
      outputs.workspace = std::move(workspace);
      outputs.stream = std::move(stream);
      plan.call(entry, outputs);
    };
  };
  auto call_arguments = [](auto& cls, const char* name, Plan::Entry entry, auto&& call, const char* doc) {
    cls.def(name, call(entry), nb::kw_only(), nb::arg("step") = 1, nb::arg("step_count") = nb::none(),
            nb::arg("inv_loss_scale") = nb::none(), nb::arg("found_inf") = nb::none(),
            nb::arg("thresholds") = nb::none(), nb::arg("kept_counts") = nb::none(),
            nb::arg("workspace") = nb::none(), nb::arg("stream") = nb::none(),
            nb::arg("gradient_reduction") = GMTK_GRADIENTS_AS_GIVEN, nb::arg("given_thresholds") = nb::none(),
            nb::arg("given_mask_bits") = nb::none(), nb::arg("mask_bits") = nb::none(), doc);
  };

  nb::class_<Plan> plan(m, "Plan", "A validated set of groups and tensors (gmtkPlanCreate).");
  plan.def(nb::init<const Handle&, const std::vector<GroupConfig>&, const std::vector<Tensor>&, bool, bool, nb::object>(),
           nb::arg("handle"), nb::arg("groups"), nb::arg("tensors"), nb::kw_only(),
           nb::arg("allocate_workspace") = true, nb::arg("hold_gradients") = true, nb::arg("comm") = nb::none())
      .def_prop_ro("workspace_size", &Plan::workspace_size,
                   "Bytes of workspace a call needs (0 for a plan that allocated its own).")
      .def_prop_ro("num_tensors", &Plan::num_tensors)
      .def_prop_ro("mask_words", &Plan::mask_words, "32-bit words of a mask bitmap (gmtkPlanGetMaskLayout).")
      .def_prop_ro("mask_word_offsets", &Plan::mask_word_offsets, "Each tensor's first word in a mask bitmap.")
      .def_prop_ro("usable", &Plan::usable,
                   "False once a call met a sticky CUDA error (gmtkPlanGetState): destroy the plan.")
      .def("set_group_hyperparams", &Plan::set_group_hyperparams, nb::arg("group"), nb::arg("config"))
      .def("close", &Plan::close, "Destroys the plan now and releases the arrays it holds.")
      .def("__enter__", [](Plan& p) -> Plan& { return p; }, nb::rv_policy::reference)
      .def("__exit__", [](Plan& p, nb::args) { p.close(); });
  call_arguments(plan, "step", &gmtkStep, call_entry,
                 "Selects thresholds, then applies the masked optimizer update (gmtkStep).");
  call_arguments(plan, "select_thresholds", &gmtkSelectThresholds, call_entry,
                 "Writes thresholds, kept_counts and found_inf only (gmtkSelectThresholds).");
  call_arguments(plan, "mask_gradients", &gmtkMaskGradients, call_entry,
                 "Sets masked gradient entries to +0 in place (gmtkMaskGradients).");
}
