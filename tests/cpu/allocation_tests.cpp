// docs/api.md promises that gmtkStep, gmtkSelectThresholds and
// gmtkMaskGradients never allocate host memory. This binary replaces every
// global operator new and delete with counting versions (libgmtk.so links
// libstdc++ dynamically, so its allocations resolve to these too) and checks
// that the count does not move inside those calls: on the CPU reference
// backend always, and on the CUDA backend when a CUDA device is usable (the
// case says it is skipped otherwise). A self-check proves that the counter
// sees allocations made inside libgmtk.so, so the test cannot pass vacuously.
//
// Not counted: malloc and friends (the CUDA runtime allocates with malloc;
// its internals are outside the promise).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <gmtk/gmtk.h>

#include <cuda_runtime_api.h>

#include "../half_float.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

// ---- Counting operator new / delete -----------------------------------------

namespace {

std::atomic<long long> allocations{0};
std::atomic<long long> deallocations{0};

void* allocate(std::size_t size) noexcept {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(size == 0 ? 1 : size);
}

void* allocate_aligned(std::size_t size, std::align_val_t alignment) noexcept {
  allocations.fetch_add(1, std::memory_order_relaxed);
  const std::size_t align = std::max(static_cast<std::size_t>(alignment), sizeof(void*));
  void* pointer = nullptr;
  return posix_memalign(&pointer, align, size == 0 ? align : size) == 0 ? pointer : nullptr;
}

void release(void* pointer) noexcept {
  if (pointer == nullptr) return;
  deallocations.fetch_add(1, std::memory_order_relaxed);
  std::free(pointer);
}

void* allocate_or_throw(std::size_t size) {
  if (void* pointer = allocate(size)) return pointer;
  throw std::bad_alloc();
}

void* allocate_aligned_or_throw(std::size_t size, std::align_val_t alignment) {
  if (void* pointer = allocate_aligned(size, alignment)) return pointer;
  throw std::bad_alloc();
}

}  // namespace

void* operator new(std::size_t size) { return allocate_or_throw(size); }
void* operator new[](std::size_t size) { return allocate_or_throw(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return allocate(size); }
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept { return allocate(size); }
void* operator new(std::size_t size, std::align_val_t alignment) { return allocate_aligned_or_throw(size, alignment); }
void* operator new[](std::size_t size, std::align_val_t alignment) {
  return allocate_aligned_or_throw(size, alignment);
}
void* operator new(std::size_t size, std::align_val_t alignment, const std::nothrow_t&) noexcept {
  return allocate_aligned(size, alignment);
}
void* operator new[](std::size_t size, std::align_val_t alignment, const std::nothrow_t&) noexcept {
  return allocate_aligned(size, alignment);
}
void operator delete(void* pointer) noexcept { release(pointer); }
void operator delete[](void* pointer) noexcept { release(pointer); }
void operator delete(void* pointer, std::size_t) noexcept { release(pointer); }
void operator delete[](void* pointer, std::size_t) noexcept { release(pointer); }
void operator delete(void* pointer, const std::nothrow_t&) noexcept { release(pointer); }
void operator delete[](void* pointer, const std::nothrow_t&) noexcept { release(pointer); }
void operator delete(void* pointer, std::align_val_t) noexcept { release(pointer); }
void operator delete[](void* pointer, std::align_val_t) noexcept { release(pointer); }
void operator delete(void* pointer, std::size_t, std::align_val_t) noexcept { release(pointer); }
void operator delete[](void* pointer, std::size_t, std::align_val_t) noexcept { release(pointer); }
void operator delete(void* pointer, std::align_val_t, const std::nothrow_t&) noexcept { release(pointer); }
void operator delete[](void* pointer, std::align_val_t, const std::nothrow_t&) noexcept { release(pointer); }

namespace {

struct Counts {
  long long allocations = 0;
  long long deallocations = 0;
};

// Runs `body` and returns the allocations and deallocations made meanwhile.
// Nothing else runs between the two snapshots: the caller checks afterwards.
template <typename Body>
Counts counted(Body&& body) {
  const long long allocated_before = allocations.load(std::memory_order_relaxed);
  const long long released_before = deallocations.load(std::memory_order_relaxed);
  body();
  return Counts{allocations.load(std::memory_order_relaxed) - allocated_before,
                deallocations.load(std::memory_order_relaxed) - released_before};
}

// Keeps a pointer observable so that the compiler cannot elide the allocation.
void* volatile sink = nullptr;

// ---- Buffers in host or device memory ----------------------------------------

// One block of host memory (CPU reference backend) or device memory (CUDA),
// carved into 256-byte aligned buffers. Allocated before anything is counted.
class Arena {
 public:
  Arena(bool device, size_t bytes) : device_(device), capacity_(bytes) {
    if (device_) {
      const cudaError_t error = cudaMalloc(&base_, bytes);
      if (error != cudaSuccess) FAIL("cudaMalloc of " << bytes << " bytes: " << cudaGetErrorString(error));
      REQUIRE(cudaMemset(base_, 0, bytes) == cudaSuccess);
    } else {
      base_ = ::operator new(bytes, std::align_val_t{256});
      std::memset(base_, 0, bytes);
    }
  }
  ~Arena() {
    if (device_) {
      cudaFree(base_);
    } else {
      ::operator delete(base_, std::align_val_t{256});
    }
  }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  template <typename T = unsigned char>
  T* take(size_t count, size_t element_bytes = sizeof(T)) {
    const size_t offset = (used_ + 255) / 256 * 256;
    used_ = offset + count * element_bytes;
    REQUIRE(used_ <= capacity_);
    return reinterpret_cast<T*>(static_cast<unsigned char*>(base_) + offset);
  }
  // Waits for the device first: calls on a non-blocking stream may still be reading.
  void write(void* destination, const void* source, size_t bytes) {
    if (device_) {
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      REQUIRE(cudaMemcpy(destination, source, bytes, cudaMemcpyHostToDevice) == cudaSuccess);
    } else {
      std::memcpy(destination, source, bytes);
    }
  }
  template <typename T>
  T read(const T* source) {
    T value{};
    if (device_) {
      REQUIRE(cudaMemcpy(&value, source, sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    } else {
      std::memcpy(&value, source, sizeof(T));
    }
    return value;
  }
  bool device() const { return device_; }

 private:
  bool device_;
  size_t capacity_;
  size_t used_ = 0;
  void* base_ = nullptr;
};

uint16_t bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return static_cast<uint16_t>(bits >> 16);
}

uint16_t fp16_bits(float value) { return half_float::half_from_float(value); }

size_t element_size(gmtkDtype_t dtype) { return dtype == GMTK_FLOAT32 ? 4 : 2; }

// Fills a buffer of `dtype` with deterministic, finite, distinct-ish values.
void fill(Arena& arena, void* destination, gmtkDtype_t dtype, size_t n, float scale, uint32_t seed) {
  std::vector<unsigned char> bytes(n * element_size(dtype));
  uint32_t state = seed * 2654435761u + 1u;
  for (size_t i = 0; i < n; ++i) {
    state = state * 1664525u + 1013904223u;
    const float value = scale * (static_cast<float>(state >> 8) / 8388608.0f - 1.0f);
    if (dtype == GMTK_FLOAT32) {
      std::memcpy(&bytes[4 * i], &value, 4);
    } else {
      const uint16_t bits = dtype == GMTK_BFLOAT16 ? bf16_bits(value) : fp16_bits(value);
      std::memcpy(&bytes[2 * i], &bits, 2);
    }
  }
  arena.write(destination, bytes.data(), bytes.size());
}

struct TensorShape {
  int32_t group;
  int64_t numel;
  gmtkDtype_t grad_dtype;
  gmtkDtype_t param_dtype;
  bool master;
};

// Four tensors of mixed dtypes in three groups:
//   group 0  AdamW, global scope, mask-grad, ratio 0.9       tensors 0 (fp32) and 1 (fp32 grad, bf16 param + master)
//   group 1  Adam with amsgrad, per-tensor, freeze, ratio 0.5  tensor 2 (bf16 grad, bf16 param + master)
//   group 2  SGD, momentum and nesterov, per-tensor, ratio 0.3, lr from device memory   tensor 3 (fp16)
constexpr TensorShape kShapes[] = {{0, 1000, GMTK_FLOAT32, GMTK_FLOAT32, false},
                                   {0, 777, GMTK_FLOAT32, GMTK_BFLOAT16, true},
                                   {1, 513, GMTK_BFLOAT16, GMTK_BFLOAT16, true},
                                   {2, 300, GMTK_FLOAT16, GMTK_FLOAT16, false}};
constexpr size_t kTensors = sizeof(kShapes) / sizeof(kShapes[0]);

// Everything a call of the fixture's plans reads or writes, and the plans:
// one whose calls take the caller's workspace, one made with
// GMTK_PLAN_ALLOCATE_WORKSPACE, and a gradients-only plan (selection and
// masking only) over the same gradients.
struct Fixture {
  Arena arena;
  gmtkHandle_t handle = nullptr;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<gmtkTensor_t> tensors;
  float* lr_device = nullptr;
  float* inv_loss_scale = nullptr;
  float* found_inf = nullptr;
  float* thresholds = nullptr;
  int64_t* kept_counts = nullptr;
  int64_t* step_count = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  gmtkPlan_t caller_workspace_plan = nullptr;
  gmtkPlan_t own_workspace_plan = nullptr;
  gmtkPlan_t gradients_only_plan = nullptr;

  explicit Fixture(gmtkBackend_t backend) : arena(backend == GMTK_BACKEND_CUDA, size_t{1} << 20) {
    gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
    handle_config.backend = backend;
    require_ok(gmtkHandleCreate(&handle, &handle_config), "gmtkHandleCreate");

    groups.resize(3);
    gmtkGroupConfigInit(&groups[0], GMTK_OPTIMIZER_ADAMW);
    groups[0].mask_ratio = 0.9;
    groups[0].scope = GMTK_SCOPE_GLOBAL;
    gmtkGroupConfigInit(&groups[1], GMTK_OPTIMIZER_ADAM);
    groups[1].amsgrad = 1;
    groups[1].weight_decay = 0.01;
    groups[1].mask_ratio = 0.5;
    groups[1].mask_mode = GMTK_MASK_FREEZE;
    gmtkGroupConfigInit(&groups[2], GMTK_OPTIMIZER_SGD);
    groups[2].momentum = 0.9;
    groups[2].nesterov = 1;
    groups[2].mask_ratio = 0.3;
    lr_device = arena.take<float>(1);
    const float lr = 0.01f;
    arena.write(lr_device, &lr, sizeof(lr));
    groups[2].lr_device = lr_device;

    for (size_t t = 0; t < kTensors; ++t) {
      const TensorShape& shape = kShapes[t];
      const auto n = static_cast<size_t>(shape.numel);
      gmtkTensor_t tensor{};
      tensor.group = shape.group;
      tensor.numel = shape.numel;
      tensor.grad_dtype = shape.grad_dtype;
      tensor.param_dtype = shape.param_dtype;
      tensor.grad = arena.take(n, element_size(shape.grad_dtype));
      fill(arena, tensor.grad, shape.grad_dtype, n, 1e-2f, static_cast<uint32_t>(t + 1));
      tensor.param = arena.take(n, element_size(shape.param_dtype));
      fill(arena, tensor.param, shape.param_dtype, n, 1.0f, static_cast<uint32_t>(t + 11));
      if (shape.master) {
        tensor.master_param = arena.take<float>(n);
        fill(arena, tensor.master_param, GMTK_FLOAT32, n, 1.0f, static_cast<uint32_t>(t + 11));
      }
      tensor.exp_avg = arena.take<float>(n);
      if (groups[shape.group].optimizer != GMTK_OPTIMIZER_SGD) tensor.exp_avg_sq = arena.take<float>(n);
      if (groups[shape.group].amsgrad) tensor.max_exp_avg_sq = arena.take<float>(n);
      tensors.push_back(tensor);
    }
    inv_loss_scale = arena.take<float>(1);
    const float scale = 0.5f;
    arena.write(inv_loss_scale, &scale, sizeof(scale));
    found_inf = arena.take<float>(1);
    thresholds = arena.take<float>(kTensors);
    kept_counts = arena.take<int64_t>(kTensors);
    step_count = arena.take<int64_t>(1);

    caller_workspace_plan = make_plan(tensors, 0);
    require_ok(gmtkPlanGetWorkspaceSize(caller_workspace_plan, &workspace_bytes), "gmtkPlanGetWorkspaceSize");
    REQUIRE(workspace_bytes > 0);
    workspace = arena.take(workspace_bytes);
    own_workspace_plan = make_plan(tensors, GMTK_PLAN_ALLOCATE_WORKSPACE);
    std::vector<gmtkTensor_t> gradients_only = tensors;
    for (gmtkTensor_t& tensor : gradients_only) {
      tensor.param = nullptr;
      tensor.master_param = tensor.exp_avg = tensor.exp_avg_sq = tensor.max_exp_avg_sq = nullptr;
    }
    gradients_only_plan = make_plan(gradients_only, GMTK_PLAN_ALLOCATE_WORKSPACE);
  }

  ~Fixture() {
    gmtkPlanDestroy(gradients_only_plan);
    gmtkPlanDestroy(own_workspace_plan);
    gmtkPlanDestroy(caller_workspace_plan);
    gmtkHandleDestroy(handle);
  }
  Fixture(const Fixture&) = delete;
  Fixture& operator=(const Fixture&) = delete;

  static void require_ok(gmtkStatus_t status, const char* what) {
    INFO(what << " -> " << gmtkGetErrorString(status) << ": " << gmtkGetLastErrorMessage());
    REQUIRE(status == GMTK_SUCCESS);
  }

  gmtkPlan_t make_plan(const std::vector<gmtkTensor_t>& plan_tensors, unsigned flags) {
    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = groups.data();
    config.num_groups = static_cast<int32_t>(groups.size());
    config.tensors = plan_tensors.data();
    config.num_tensors = static_cast<int64_t>(plan_tensors.size());
    config.flags = flags;
    gmtkPlan_t plan = nullptr;
    require_ok(gmtkPlanCreate(handle, &config, &plan), "gmtkPlanCreate");
    return plan;
  }

  // The args of a call with every optional output, the inverse loss scale and
  // the device step counter set.
  gmtkStepArgs_t full_args() const {
    gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
    args.step_count = step_count;
    args.inv_loss_scale = inv_loss_scale;
    args.found_inf = found_inf;
    args.thresholds = thresholds;
    args.kept_counts = kept_counts;
    return args;
  }

  // Overwrites entry 0 of tensor 0's gradient (fp32).
  void set_first_gradient(float value) { arena.write(tensors[0].grad, &value, sizeof(value)); }
};

enum class Entry { step, select, mask };

const char* entry_name(Entry entry) {
  switch (entry) {
    case Entry::step: return "gmtkStep";
    case Entry::select: return "gmtkSelectThresholds";
    case Entry::mask: return "gmtkMaskGradients";
  }
  return "?";
}

gmtkStatus_t invoke(Entry entry, gmtkPlan_t plan, const gmtkStepArgs_t* args, void* workspace, size_t bytes,
                    gmtkStream_t stream) {
  switch (entry) {
    case Entry::step: return gmtkStep(plan, args, workspace, bytes, stream);
    case Entry::select: return gmtkSelectThresholds(plan, args, workspace, bytes, stream);
    case Entry::mask: return gmtkMaskGradients(plan, args, workspace, bytes, stream);
  }
  return GMTK_ERROR_INTERNAL;
}

// One call, counted. `accepted` lists the statuses the call may answer.
void expect_no_allocation(const std::string& label, Entry entry, gmtkPlan_t plan, const gmtkStepArgs_t* args,
                          void* workspace, size_t bytes, gmtkStream_t stream,
                          std::initializer_list<gmtkStatus_t> accepted) {
  gmtkStatus_t status = GMTK_ERROR_INTERNAL;
  const Counts counts = counted([&] { status = invoke(entry, plan, args, workspace, bytes, stream); });
  INFO(entry_name(entry) << ", " << label << " -> " << gmtkGetErrorString(status) << ": "
                         << (status == GMTK_SUCCESS ? "" : gmtkGetLastErrorMessage()));
  CHECK(std::find(accepted.begin(), accepted.end(), status) != accepted.end());
  CHECK(counts.allocations == 0);
  CHECK(counts.deallocations == 0);
}

// Every accepted call shape on both workspace kinds, a few rounds (the first
// call of a plan included), then refused calls. Both backends must succeed.
void exercise(Fixture& f, gmtkStream_t stream, bool cuda) {
  const std::initializer_list<gmtkStatus_t> ok = {GMTK_SUCCESS};
  const std::initializer_list<gmtkStatus_t> step_ok = ok;
  const gmtkStepArgs_t full = f.full_args();
  gmtkStepArgs_t bare = GMTK_STEP_ARGS_INIT;
  bare.step = 1;
  gmtkStepArgs_t host_step = full;
  host_step.step_count = nullptr;
  host_step.step = 7;

  struct PlanUse {
    const char* name;
    gmtkPlan_t plan;
    void* workspace;
    size_t bytes;
  };
  const PlanUse uses[] = {{"caller workspace", f.caller_workspace_plan, f.workspace, f.workspace_bytes},
                          {"GMTK_PLAN_ALLOCATE_WORKSPACE", f.own_workspace_plan, nullptr, 0}};
  for (int round = 0; round < 3; ++round) {
    for (const PlanUse& use : uses) {
      const std::string where = std::string(use.name) + ", round " + std::to_string(round) + ", ";
      for (Entry entry : {Entry::select, Entry::mask, Entry::step}) {
        const auto& accepted = entry == Entry::step ? step_ok : ok;
        expect_no_allocation(where + "every output, inv_loss_scale, step_count", entry, use.plan, &full, use.workspace,
                             use.bytes, stream, accepted);
        expect_no_allocation(where + "no optional argument", entry, use.plan, &bare, use.workspace, use.bytes, stream,
                             accepted);
      }
      expect_no_allocation(where + "args->step instead of step_count", Entry::step, use.plan, &host_step, use.workspace,
                           use.bytes, stream, step_ok);
    }
    for (Entry entry : {Entry::select, Entry::mask}) {
      expect_no_allocation("gradients-only plan, round " + std::to_string(round), entry, f.gradients_only_plan, &full,
                           nullptr, 0, stream, ok);
    }
  }

  // A non-finite gradient: found_inf is set and the step does nothing.
  f.set_first_gradient(std::numeric_limits<float>::infinity());
  for (Entry entry : {Entry::select, Entry::mask, Entry::step}) {
    expect_no_allocation("an inf gradient", entry, f.caller_workspace_plan, &full, f.workspace, f.workspace_bytes,
                         stream, entry == Entry::step ? step_ok : ok);
  }
  f.set_first_gradient(1e-3f);

  // Refused calls: the message is written into a fixed thread-local buffer.
  const gmtkStatus_t invalid = GMTK_ERROR_INVALID_ARGUMENT;
  gmtkStepArgs_t wrong_size = full;
  wrong_size.struct_size = 8;
  gmtkStepArgs_t overlapping = full;
  overlapping.thresholds = static_cast<float*>(f.tensors[1].exp_avg) + 3;
  gmtkStepArgs_t on_lr_device = full;
  on_lr_device.found_inf = f.lr_device;
  gmtkStepArgs_t misaligned = full;
  misaligned.kept_counts = reinterpret_cast<int64_t*>(reinterpret_cast<uintptr_t>(f.kept_counts) + 4);
  gmtkStepArgs_t step_zero = bare;
  step_zero.step = 0;
  for (Entry entry : {Entry::select, Entry::mask, Entry::step}) {
    expect_no_allocation("NULL plan", entry, nullptr, &full, f.workspace, f.workspace_bytes, stream, {invalid});
    expect_no_allocation("NULL args", entry, f.caller_workspace_plan, nullptr, f.workspace, f.workspace_bytes, stream,
                         {invalid});
    expect_no_allocation("wrong struct_size", entry, f.caller_workspace_plan, &wrong_size, f.workspace,
                         f.workspace_bytes, stream, {invalid});
    expect_no_allocation("thresholds overlapping a tensor buffer", entry, f.caller_workspace_plan, &overlapping,
                         f.workspace, f.workspace_bytes, stream, {invalid});
    expect_no_allocation("found_inf on a group's lr_device", entry, f.caller_workspace_plan, &on_lr_device,
                         f.workspace, f.workspace_bytes, stream, {invalid});
    expect_no_allocation("misaligned kept_counts", entry, f.caller_workspace_plan, &misaligned, f.workspace,
                         f.workspace_bytes, stream, {invalid});
    expect_no_allocation("workspace too small", entry, f.caller_workspace_plan, &full, f.workspace,
                         f.workspace_bytes - 1, stream, {GMTK_ERROR_INSUFFICIENT_WORKSPACE});
    expect_no_allocation("NULL workspace with a size", entry, f.caller_workspace_plan, &full, nullptr,
                         f.workspace_bytes, stream, {invalid});
  }
  expect_no_allocation("step 0", Entry::step, f.caller_workspace_plan, &step_zero, f.workspace, f.workspace_bytes,
                       stream, {invalid});
  expect_no_allocation("a gradients-only plan", Entry::step, f.gradients_only_plan, &full, nullptr, 0, stream,
                       {invalid});
  if (cuda) {
    // Host memory where the CUDA backend needs device memory: refused by its reachability check.
    static float host_flag = 0.0f;
    gmtkStepArgs_t host_output = full;
    host_output.found_inf = &host_flag;
    for (Entry entry : {Entry::select, Entry::mask, Entry::step}) {
      expect_no_allocation("found_inf in host memory", entry, f.caller_workspace_plan, &host_output, f.workspace,
                           f.workspace_bytes, stream, {invalid});
    }
  }
}

}  // namespace

TEST_CASE("the counter sees allocations, libgmtk.so's included", "[cpu]") {
  const Counts here = counted([] {
    std::vector<int> values(100, 1);
    sink = values.data();
  });
  CHECK(here.allocations >= 1);
  CHECK(here.deallocations >= 1);
  const Counts variants = counted([] {
    auto* nothrow = new (std::nothrow) int[4];
    sink = nothrow;
    delete[] nothrow;
    void* aligned = ::operator new(64, std::align_val_t{128});
    sink = aligned;
    ::operator delete(aligned, std::align_val_t{128});
  });
  CHECK(variants.allocations == 2);
  CHECK(variants.deallocations == 2);

  // Plan creation copies the configs into std::vectors inside libgmtk.so.
  Fixture* fixture = nullptr;
  const Counts plan_creation = counted([&] { fixture = new Fixture(GMTK_BACKEND_CPU_REFERENCE); });
  CHECK(plan_creation.allocations > 10);
  const Counts inside_library = counted([&] {
    gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
    config.groups = fixture->groups.data();
    config.num_groups = static_cast<int32_t>(fixture->groups.size());
    config.tensors = fixture->tensors.data();
    config.num_tensors = static_cast<int64_t>(fixture->tensors.size());
    gmtkPlan_t plan = nullptr;
    if (gmtkPlanCreate(fixture->handle, &config, &plan) == GMTK_SUCCESS) gmtkPlanDestroy(plan);
  });
  CHECK(inside_library.allocations > 0);
  CHECK(inside_library.deallocations == inside_library.allocations);
  delete fixture;
}

TEST_CASE("CPU reference backend: gmtkStep, gmtkSelectThresholds, gmtkMaskGradients allocate nothing", "[cpu]") {
  Fixture fixture(GMTK_BACKEND_CPU_REFERENCE);
  exercise(fixture, nullptr, false);
  // The calls did run: each round's step with step_count advanced it, on both plans.
  CHECK(fixture.arena.read(fixture.step_count) == 6);
  CHECK(fixture.arena.read(fixture.found_inf) == 1.0f);  // the last accepted call saw the inf gradient
}

TEST_CASE("CPU reference backend: sharded calls on 3 ranks allocate nothing, collectives and gradient reduction "
          "included",
          "[cpu]") {
  // Each rank (a thread) makes its plan, then waits; the calls of every rank
  // run between the two snapshots, the threads' own set-up and checks outside.
  constexpr int kRanks = 3;
  constexpr int64_t kNumel = 3000;
  std::vector<float> grad(kNumel), param(kNumel, 0.5f), exp_avg(kNumel, 0.0f), exp_avg_sq(kNumel, 0.0f);
  for (int64_t i = 0; i < kNumel; ++i) grad[i] = static_cast<float>((i * 7919) % 1000) / 100.0f - 5.0f;
  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  hc.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkHandle_t handle = nullptr;
  REQUIRE(gmtkHandleCreate(&handle, &hc) == GMTK_SUCCESS);
  gmtkGroupConfig_t groups[2];
  REQUIRE(gmtkGroupConfigInit(&groups[0], GMTK_OPTIMIZER_ADAMW) == GMTK_SUCCESS);
  groups[0].mask_ratio = 0.9;
  groups[1] = groups[0];
  groups[1].scope = GMTK_SCOPE_GLOBAL;
  gmtkComm_t comms[kRanks];
  REQUIRE(gmtkCommCreateInProcess(kRanks, comms) == GMTK_SUCCESS);
  // And one replica per rank (data parallel), all-reduced by the step's gradient_reduction.
  constexpr int64_t kReplicaNumel = 257;
  std::vector<float> replica_grad[kRanks], replica_param[kRanks], replica_m[kRanks], replica_v[kRanks];
  for (int r = 0; r < kRanks; ++r) {
    replica_grad[r].assign(kReplicaNumel, 0.25f * static_cast<float>(r + 1));
    replica_param[r].assign(kReplicaNumel, 1.0f);
    replica_m[r].assign(kReplicaNumel, 0.0f);
    replica_v[r].assign(kReplicaNumel, 0.0f);
  }

  std::mutex mutex;
  std::condition_variable changed;
  int ready = 0;
  bool go = false;
  int finished = 0;
  gmtkStatus_t statuses[kRanks][4] = {};
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      const int64_t begin = kNumel * r / kRanks;
      const int64_t end = kNumel * (r + 1) / kRanks;
      gmtkTensor_t records[3] = {};
      records[2].group = 0;
      records[2].numel = kReplicaNumel;
      records[2].grad_dtype = GMTK_FLOAT32;
      records[2].grad = replica_grad[r].data();
      records[2].param_dtype = GMTK_FLOAT32;
      records[2].param = replica_param[r].data();
      records[2].exp_avg = replica_m[r].data();
      records[2].exp_avg_sq = replica_v[r].data();
      for (int t = 0; t < 2; ++t) {  // one per-tensor shard, one global-group shard, of the same buffers' halves
        const int64_t half = kNumel / 2;
        const int64_t b = t * half + (begin * half) / kNumel;
        const int64_t e = t * half + (end * half) / kNumel;
        records[t].group = t;
        records[t].numel = e - b;
        records[t].grad_dtype = GMTK_FLOAT32;
        records[t].grad = grad.data() + b;
        records[t].param_dtype = GMTK_FLOAT32;
        records[t].param = param.data() + b;
        records[t].exp_avg = exp_avg.data() + b;
        records[t].exp_avg_sq = exp_avg_sq.data() + b;
        records[t].logical_numel = half;
        records[t].shard_offset = b - t * half;
      }
      gmtkPlanConfig_t config = GMTK_PLAN_CONFIG_INIT;
      config.groups = groups;
      config.num_groups = 2;
      config.tensors = records;
      config.num_tensors = 3;
      config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
      config.comm = comms[r];
      gmtkPlan_t plan = nullptr;
      statuses[r][0] = gmtkPlanCreate(handle, &config, &plan);
      float thresholds[3];
      int64_t kept[3];
      float found_inf = -1.0f;
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.thresholds = thresholds;
      args.kept_counts = kept;
      args.found_inf = &found_inf;
      {
        std::unique_lock<std::mutex> lock(mutex);
        ++ready;
        changed.notify_all();
        changed.wait(lock, [&] { return go; });
      }
      if (statuses[r][0] == GMTK_SUCCESS) {
        statuses[r][1] = gmtkSelectThresholds(plan, &args, nullptr, 0, nullptr);
        args.gradient_reduction = GMTK_GRADIENTS_AVERAGE;
        statuses[r][2] = gmtkStep(plan, &args, nullptr, 0, nullptr);
        args.gradient_reduction = GMTK_GRADIENTS_AS_GIVEN;
        statuses[r][3] = gmtkMaskGradients(plan, &args, nullptr, 0, nullptr);
      }
      {
        std::unique_lock<std::mutex> lock(mutex);
        ++finished;
        changed.notify_all();
        changed.wait(lock, [&] { return finished < 0; });  // released after the second snapshot
      }
      gmtkPlanDestroy(plan);
    });
  }
  {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return ready == kRanks; });
  }
  Counts calls{};
  {
    const long long allocated_before = allocations.load();
    const long long released_before = deallocations.load();
    {
      std::unique_lock<std::mutex> lock(mutex);
      go = true;
      changed.notify_all();
      changed.wait(lock, [&] { return finished == kRanks; });
    }
    calls = Counts{allocations.load() - allocated_before, deallocations.load() - released_before};
    std::unique_lock<std::mutex> lock(mutex);
    finished = -1;
    changed.notify_all();
  }
  for (std::thread& thread : threads) thread.join();
  for (gmtkComm_t comm : comms) gmtkCommDestroy(comm);
  gmtkHandleDestroy(handle);
  for (int r = 0; r < kRanks; ++r) {
    for (int c = 0; c < 4; ++c) CHECK(statuses[r][c] == GMTK_SUCCESS);
  }
  CHECK(calls.allocations == 0);
  CHECK(calls.deallocations == 0);
  // The reduction ran: every rank's replica gradient is the mean, 0.25 * (1 + 2 + 3) / 3.
  for (int r = 0; r < kRanks; ++r) CHECK(replica_grad[r][0] == 0.5f);
}

TEST_CASE("CPU reference backend: schedule changes between steps allocate nothing", "[cpu]") {
  Fixture fixture(GMTK_BACKEND_CPU_REFERENCE);
  float* other_lr = fixture.arena.take<float>(1);
  const float lr = 0.02f;
  fixture.arena.write(other_lr, &lr, sizeof(lr));
  gmtkGroupConfig_t changes[4];
  changes[0] = fixture.groups[0];
  changes[0].lr = 2e-3;
  changes[0].mask_ratio = 0.95;
  changes[1] = fixture.groups[2];
  changes[1].lr_device = other_lr;  // a new scalar
  changes[2] = fixture.groups[0];
  changes[2].lr_device = other_lr;  // shared with group 2
  changes[3] = fixture.groups[2];
  changes[3].lr_device = nullptr;  // dropped
  const int32_t targets[4] = {0, 2, 0, 2};
  const gmtkStepArgs_t args = fixture.full_args();
  for (gmtkPlan_t plan : {fixture.caller_workspace_plan, fixture.own_workspace_plan}) {
    for (int c = 0; c < 4; ++c) {
      gmtkStatus_t status = GMTK_ERROR_INTERNAL;
      const Counts counts = counted([&] { status = gmtkPlanSetGroupHyperparams(plan, targets[c], &changes[c]); });
      INFO("change " << c << " -> " << gmtkGetErrorString(status) << ": " << gmtkGetLastErrorMessage());
      CHECK(status == GMTK_SUCCESS);
      CHECK(counts.allocations == 0);
      CHECK(counts.deallocations == 0);
      void* workspace = plan == fixture.caller_workspace_plan ? fixture.workspace : nullptr;
      const size_t bytes = workspace != nullptr ? fixture.workspace_bytes : 0;
      expect_no_allocation("after schedule change " + std::to_string(c), Entry::step, plan, &args, workspace, bytes,
                           nullptr, {GMTK_SUCCESS});
    }
    gmtkGroupConfig_t refused = fixture.groups[1];
    refused.amsgrad = 0;
    gmtkStatus_t status = GMTK_SUCCESS;
    const Counts counts = counted([&] { status = gmtkPlanSetGroupHyperparams(plan, 1, &refused); });
    CHECK(status == GMTK_ERROR_INVALID_ARGUMENT);
    CHECK(counts.allocations == 0);
  }
}

TEST_CASE("CUDA backend: gmtkStep, gmtkSelectThresholds, gmtkMaskGradients allocate nothing", "[cuda]") {
  int devices = 0;
  const cudaError_t error = cudaGetDeviceCount(&devices);
  if (error != cudaSuccess || devices == 0) {
    cudaGetLastError();
    WARN("SKIPPED: no usable CUDA device ("
         << (error != cudaSuccess ? cudaGetErrorString(error) : "cudaGetDeviceCount found none")
         << "); the CUDA backend's calls were not counted");
    return;
  }
  Fixture fixture(GMTK_BACKEND_CUDA);
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  const auto gmtk_stream = reinterpret_cast<gmtkStream_t>(stream);
  // Warm-up, not counted: the first launches load the kernels' module in the
  // CUDA driver (lazy loading), which is the runtime's business, not gmtk's.
  const gmtkStepArgs_t full = fixture.full_args();
  for (Entry entry : {Entry::select, Entry::mask, Entry::step}) {
    invoke(entry, fixture.caller_workspace_plan, &full, fixture.workspace, fixture.workspace_bytes, gmtk_stream);
  }
  REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  const gmtkStatus_t step_status =
      gmtkStep(fixture.caller_workspace_plan, &full, fixture.workspace, fixture.workspace_bytes, gmtk_stream);
  if (step_status == GMTK_ERROR_NOT_SUPPORTED) {
    WARN("gmtkStep answers GMTK_ERROR_NOT_SUPPORTED on CUDA in this build; its validation path is what is counted");
  }
  exercise(fixture, gmtk_stream, true);
  const cudaError_t sync_error = cudaStreamSynchronize(stream);
  INFO(cudaGetErrorString(sync_error));
  CHECK(sync_error == cudaSuccess);
  cudaStreamDestroy(stream);
}

int main(int argc, char** argv) { return Catch::Session().run(argc, argv); }
