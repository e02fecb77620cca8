// gmtkCommCreateFromNccl with a real NCCL communicator: one rank on device 0,
// made here through libnccl (dlopen, as a framework's process would have it
// loaded already), wrapped, queried, destroyed in the documented order.
// Skipped with a visible reason where the build has no nccl.h or no libnccl
// can be loaded (libnccl.so.2 on the loader's path, or $GMTK_NCCL_LIBRARY).
#include "gpu_test_support.h"

#if GMTK_HAVE_NCCL

#include <dlfcn.h>
#include <nccl.h>

#include <cstdlib>

namespace {

using namespace gpu_test;

// The library this test makes its communicator with: loaded first, so gmtk
// must find this same copy (RTLD_NOLOAD) even when it came from
// $GMTK_NCCL_LIBRARY's path rather than the loader's.
struct TestNccl {
  void* library = nullptr;
  std::string error;
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRank) comm_init_rank = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclGetErrorString) get_error_string = nullptr;

  TestNccl() {
    library = dlopen("libnccl.so.2", RTLD_NOW);
    if (library == nullptr) {
      error = std::string("dlopen(\"libnccl.so.2\"): ") + dlerror();
      const char* path = std::getenv("GMTK_NCCL_LIBRARY");
      if (path != nullptr && path[0] != '\0') {
        library = dlopen(path, RTLD_NOW);
        if (library == nullptr) error += std::string("; dlopen($GMTK_NCCL_LIBRARY): ") + dlerror();
      } else {
        error += "; GMTK_NCCL_LIBRARY is not set";
      }
    }
    if (library == nullptr) return;
    get_unique_id = reinterpret_cast<decltype(get_unique_id)>(dlsym(library, "ncclGetUniqueId"));
    comm_init_rank = reinterpret_cast<decltype(comm_init_rank)>(dlsym(library, "ncclCommInitRank"));
    comm_destroy = reinterpret_cast<decltype(comm_destroy)>(dlsym(library, "ncclCommDestroy"));
    get_error_string = reinterpret_cast<decltype(get_error_string)>(dlsym(library, "ncclGetErrorString"));
  }
  ~TestNccl() {
    if (library != nullptr) dlclose(library);
  }
  bool usable() const {
    return library != nullptr && get_unique_id != nullptr && comm_init_rank != nullptr && comm_destroy != nullptr &&
           get_error_string != nullptr;
  }
};

#define NCCL_OK(nccl, call)                                                    \
  do {                                                                         \
    const ncclResult_t nccl_result_ = (call);                                  \
    INFO(#call << " -> " << (nccl).get_error_string(nccl_result_));            \
    REQUIRE(nccl_result_ == ncclSuccess);                                      \
  } while (0)

}  // namespace

TEST_CASE("a caller's one-rank NCCL communicator is wrapped: rank 0 of 1", "[nccl]") {
  TestNccl nccl;
  if (!nccl.usable()) {
    WARN("SKIPPED: no usable libnccl (" << (nccl.error.empty() ? "a function is missing" : nccl.error) << ")");
    return;
  }
  GPU_CUDA_OK(cudaSetDevice(0));
  ncclUniqueId id;
  NCCL_OK(nccl, nccl.get_unique_id(&id));
  ncclComm_t nccl_comm = nullptr;
  NCCL_OK(nccl, nccl.comm_init_rank(&nccl_comm, 1, id, 0));

  gmtkComm_t comm = nullptr;
  GPU_GMTK_OK(gmtkCommCreateFromNccl(nccl_comm, 0, &comm));
  REQUIRE(comm != nullptr);
  int rank = -1;
  int size = -1;
  GPU_GMTK_OK(gmtkCommGetRank(comm, &rank));
  GPU_GMTK_OK(gmtkCommGetSize(comm, &size));
  CHECK(rank == 0);
  CHECK(size == 1);

  // Another device than the communicator's (device 1: another GPU, or none) is refused, the out pointer left alone.
  gmtkComm_t other = nullptr;
  const gmtkStatus_t status = gmtkCommCreateFromNccl(nccl_comm, 1, &other);
  INFO(gmtkGetErrorString(status) << ": " << gmtkGetLastErrorMessage());
  CHECK(status == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(other == nullptr);

  // gmtk's communicator first, then the caller's.
  GPU_GMTK_OK(gmtkCommDestroy(comm));
  NCCL_OK(nccl, nccl.comm_destroy(nccl_comm));
  check_no_cuda_error_left();
}

namespace {

// Device copies of one plan's buffers: fp32 params and state, gradients of the given dtype.
struct DeviceSet {
  std::vector<void*> allocations;
  void* alloc(size_t bytes) {
    void* p = nullptr;
    REQUIRE(cudaMalloc(&p, bytes) == cudaSuccess);
    allocations.push_back(p);
    return p;
  }
  ~DeviceSet() {
    for (void* p : allocations) cudaFree(p);
  }
};

struct HostTensor {
  int32_t group;
  gmtkDtype_t dtype;
  bool shard;  // described as a shard (logical_numel = numel, offset 0) in the communicator's plan
  std::vector<unsigned char> grad;
  size_t numel() const { return grad.size() / element_size(dtype); }
};

}  // namespace

TEST_CASE("one rank through real NCCL: a sharded plan equals the plan without a communicator", "[nccl]") {
  TestNccl nccl;
  if (!nccl.usable()) {
    WARN("SKIPPED: no usable libnccl (" << (nccl.error.empty() ? "a function is missing" : nccl.error) << ")");
    return;
  }
  GPU_CUDA_OK(cudaSetDevice(0));
  ncclUniqueId id;
  NCCL_OK(nccl, nccl.get_unique_id(&id));
  ncclComm_t nccl_comm = nullptr;
  NCCL_OK(nccl, nccl.comm_init_rank(&nccl_comm, 1, id, 0));
  gmtkComm_t comm = nullptr;
  GPU_GMTK_OK(gmtkCommCreateFromNccl(nccl_comm, 0, &comm));

  // Large and small shards (a shard is always selected on the multi-block
  // path), a large replica (counted on rank 0), a global group of shards.
  std::mt19937 random(7);
  std::vector<HostTensor> tensors = {{0, GMTK_FLOAT32, true, {}},  {0, GMTK_FLOAT32, true, {}},
                                     {0, GMTK_BFLOAT16, true, {}}, {0, GMTK_FLOAT32, false, {}},
                                     {1, GMTK_FLOAT32, true, {}},  {1, GMTK_FLOAT32, true, {}}};
  const size_t sizes[] = {300000, 5000, 70000, 300000, 120000, 777};
  for (size_t t = 0; t < tensors.size(); ++t) {
    tensors[t].grad.resize(sizes[t] * element_size(tensors[t].dtype));
    for (size_t i = 0; i < sizes[t]; ++i) {
      const float value = static_cast<float>(static_cast<int>(random() % 4001) - 2000) / 512.0f;
      if (tensors[t].dtype == GMTK_FLOAT32) {
        std::memcpy(&tensors[t].grad[4 * i], &value, 4);
      } else {
        const uint16_t bits = narrow_to_16(value, kBfloat);
        std::memcpy(&tensors[t].grad[2 * i], &bits, 2);
      }
    }
  }
  gmtkGroupConfig_t groups[2];
  GPU_GMTK_OK(gmtkGroupConfigInit(&groups[0], GMTK_OPTIMIZER_ADAMW));
  GPU_GMTK_OK(gmtkGroupConfigInit(&groups[1], GMTK_OPTIMIZER_ADAMW));
  groups[0].mask_ratio = 0.9;
  groups[1].mask_ratio = 0.99;
  groups[1].scope = GMTK_SCOPE_GLOBAL;

  gmtkHandleConfig_t hc = GMTK_HANDLE_CONFIG_INIT;
  gmtkHandle_t handle = nullptr;
  GPU_GMTK_OK(gmtkHandleCreate(&handle, &hc));
  const size_t n = tensors.size();
  struct Side {
    DeviceSet memory;
    std::vector<gmtkTensor_t> records;
    gmtkPlan_t plan = nullptr;
    float* thresholds = nullptr;
    int64_t* kept = nullptr;
    int64_t* step_count = nullptr;
    float* found_inf = nullptr;
  } sides[2];
  for (int side = 0; side < 2; ++side) {  // 0: no communicator; 1: bound to the NCCL one
    Side& s = sides[side];
    for (size_t t = 0; t < n; ++t) {
      const size_t count = tensors[t].numel();
      gmtkTensor_t r{};
      r.group = tensors[t].group;
      r.numel = static_cast<int64_t>(count);
      r.grad_dtype = tensors[t].dtype;
      r.grad = s.memory.alloc(tensors[t].grad.size());
      GPU_CUDA_OK(cudaMemcpy(r.grad, tensors[t].grad.data(), tensors[t].grad.size(), cudaMemcpyHostToDevice));
      r.param_dtype = GMTK_FLOAT32;
      r.param = s.memory.alloc(count * 4);
      r.exp_avg = static_cast<float*>(s.memory.alloc(count * 4));
      r.exp_avg_sq = static_cast<float*>(s.memory.alloc(count * 4));
      GPU_CUDA_OK(cudaMemset(r.param, 0x3c, count * 4));
      GPU_CUDA_OK(cudaMemset(r.exp_avg, 0, count * 4));
      GPU_CUDA_OK(cudaMemset(r.exp_avg_sq, 0, count * 4));
      if (side == 1 && tensors[t].shard) r.logical_numel = r.numel;  // the whole tensor, as this rank's shard
      s.records.push_back(r);
    }
    s.thresholds = static_cast<float*>(s.memory.alloc(n * 4));
    s.kept = static_cast<int64_t*>(s.memory.alloc(n * 8));
    s.step_count = static_cast<int64_t*>(s.memory.alloc(8));
    s.found_inf = static_cast<float*>(s.memory.alloc(4));
    GPU_CUDA_OK(cudaMemset(s.step_count, 0, 8));
    gmtkPlanConfig_t pc = GMTK_PLAN_CONFIG_INIT;
    pc.groups = groups;
    pc.num_groups = 2;
    pc.tensors = s.records.data();
    pc.num_tensors = static_cast<int64_t>(n);
    pc.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;
    pc.comm = side == 1 ? comm : nullptr;
    GPU_GMTK_OK(gmtkPlanCreate(handle, &pc, &s.plan));
  }
  for (int step = 0; step < 2; ++step) {
    for (Side& s : sides) {
      gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
      args.step_count = s.step_count;
      args.thresholds = s.thresholds;
      args.kept_counts = s.kept;
      args.found_inf = s.found_inf;
      GPU_GMTK_OK(gmtkStep(s.plan, &args, nullptr, 0, nullptr));
    }
    GPU_CUDA_OK(cudaDeviceSynchronize());
    const auto host = [](const void* device, size_t bytes) {
      std::vector<unsigned char> out(bytes);
      REQUIRE(cudaMemcpy(out.data(), device, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
      return out;
    };
    INFO("step " << step + 1);
    CHECK(host(sides[0].thresholds, n * 4) == host(sides[1].thresholds, n * 4));
    CHECK(host(sides[0].kept, n * 8) == host(sides[1].kept, n * 8));
    CHECK(host(sides[0].found_inf, 4) == host(sides[1].found_inf, 4));
    CHECK(host(sides[0].step_count, 8) == host(sides[1].step_count, 8));
    for (size_t t = 0; t < n; ++t) {
      INFO("tensor " << t);
      const size_t bytes = tensors[t].numel() * 4;
      CHECK(host(sides[0].records[t].param, bytes) == host(sides[1].records[t].param, bytes));
      CHECK(host(sides[0].records[t].exp_avg, bytes) == host(sides[1].records[t].exp_avg, bytes));
      CHECK(host(sides[0].records[t].exp_avg_sq, bytes) == host(sides[1].records[t].exp_avg_sq, bytes));
    }
  }
  for (Side& s : sides) GPU_GMTK_OK(gmtkPlanDestroy(s.plan));
  GPU_GMTK_OK(gmtkHandleDestroy(handle));
  GPU_GMTK_OK(gmtkCommDestroy(comm));
  NCCL_OK(nccl, nccl.comm_destroy(nccl_comm));
  check_no_cuda_error_left();
}

#else  // !GMTK_HAVE_NCCL

TEST_CASE("a caller's one-rank NCCL communicator is wrapped: rank 0 of 1", "[nccl]") {
  WARN("SKIPPED: this gmtk was built without nccl.h; gmtkCommCreateFromNccl must say so");
  gmtkComm_t comm = nullptr;
  int not_a_communicator = 0;
  CHECK(gmtkCommCreateFromNccl(&not_a_communicator, 0, &comm) == GMTK_ERROR_NOT_SUPPORTED);
  CHECK(comm == nullptr);
}

#endif  // GMTK_HAVE_NCCL
