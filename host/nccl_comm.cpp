// The NCCL communicator: wraps a caller-owned ncclComm_t (gmtk creates none,
// destroys none, keeps no global state).
//
// libgmtk.so has no link-time dependency on libnccl. NCCL's functions are
// resolved at run time, from the library the communicator was made with when
// it is already loaded (torch's, an MPI program's): a communicator must be
// driven by the library instance that created it. nccl.h is used for types and
// enum values only, never for linking: `decltype(&ncclAllReduce)` names a
// function's type without referring to the symbol.
#include "comm.hpp"

#include "status.hpp"

#if GMTK_HAVE_NCCL

#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>

#include <sched.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <utility>

#include "cuda/cuda_util.hpp"

namespace gmtk {
namespace {

// A dlopen handle, closed with its owner (dlopen counts references, so each
// communicator holding its own handle needs no global state).
class LibraryHandle {
 public:
  LibraryHandle() = default;
  explicit LibraryHandle(void* handle) : handle_(handle) {}
  ~LibraryHandle() {
    if (handle_ != nullptr) dlclose(handle_);
  }
  LibraryHandle(const LibraryHandle&) = delete;
  LibraryHandle& operator=(const LibraryHandle&) = delete;
  LibraryHandle(LibraryHandle&& other) noexcept : handle_(other.handle_) { other.handle_ = nullptr; }
  LibraryHandle& operator=(LibraryHandle&& other) noexcept {
    if (this != &other) {
      if (handle_ != nullptr) dlclose(handle_);
      handle_ = other.handle_;
      other.handle_ = nullptr;
    }
    return *this;
  }
  void* get() const { return handle_; }

 private:
  void* handle_ = nullptr;
};

constexpr const char* kLibraryName = "libnccl.so.2";
constexpr const char* kLibraryVariable = "GMTK_NCCL_LIBRARY";

// The NCCL library: the process's own copy first (RTLD_NOLOAD: only if it is
// already loaded), then the loader's search path, then $GMTK_NCCL_LIBRARY.
gmtkStatus_t open_library(LibraryHandle* library) {
  if (void* handle = dlopen(kLibraryName, RTLD_NOW | RTLD_NOLOAD)) {
    *library = LibraryHandle(handle);
    return GMTK_SUCCESS;
  }
  dlerror();  // RTLD_NOLOAD's miss is expected: not the error to report
  if (void* handle = dlopen(kLibraryName, RTLD_NOW)) {
    *library = LibraryHandle(handle);
    return GMTK_SUCCESS;
  }
  const char* error = dlerror();
  const std::string search_error = error != nullptr ? error : "unknown dlopen error";
  const char* path = std::getenv(kLibraryVariable);
  if (path == nullptr || path[0] == '\0') {
    return fail(GMTK_ERROR_NOT_SUPPORTED,
                "NCCL is not available: %s is not loaded in this process and dlopen(\"%s\") failed (%s); %s is not "
                "set (point it at a libnccl.so.2, e.g. site-packages/nvidia/nccl/lib/libnccl.so.2)",
                kLibraryName, kLibraryName, search_error.c_str(), kLibraryVariable);
  }
  if (void* handle = dlopen(path, RTLD_NOW)) {
    *library = LibraryHandle(handle);
    return GMTK_SUCCESS;
  }
  error = dlerror();
  return fail(GMTK_ERROR_NOT_SUPPORTED,
              "NCCL is not available: %s is not loaded in this process, dlopen(\"%s\") failed (%s), and dlopen(\"%s\") "
              "(%s) failed (%s)",
              kLibraryName, kLibraryName, search_error.c_str(), path, kLibraryVariable,
              error != nullptr ? error : "unknown dlopen error");
}

// The NCCL functions gmtk calls, resolved in one library.
struct NcclFunctions {
  decltype(&ncclAllReduce) all_reduce = nullptr;
  decltype(&ncclAllGather) all_gather = nullptr;
  decltype(&ncclCommCount) comm_count = nullptr;
  decltype(&ncclCommUserRank) comm_user_rank = nullptr;
  decltype(&ncclCommCuDevice) comm_cu_device = nullptr;
  decltype(&ncclGetErrorString) get_error_string = nullptr;
  decltype(&ncclGetVersion) get_version = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;
  // Optional: used where the library has them.
  decltype(&ncclGetLastError) get_last_error = nullptr;             // NCCL >= 2.13
  decltype(&ncclCommGetAsyncError) comm_get_async_error = nullptr;  // NCCL >= 2.4
  int version = 0;  // ncclGetVersion's code (22809 is 2.28.9), for messages
};

// NCCL_VERSION_CODE's layout since 2.9: major * 10000 + minor * 100 + patch.
int major_of(int code) { return code / 10000; }
int minor_of(int code) { return code / 100 % 100; }
int patch_of(int code) { return code % 100; }

template <typename Function>
bool resolve(void* library, const char* name, Function* function) {
  *function = reinterpret_cast<Function>(dlsym(library, name));
  return *function != nullptr;
}

gmtkStatus_t resolve_functions(void* library, NcclFunctions* nccl) {
  struct Required {
    const char* name;
    bool found;
  };
  const Required required[] = {
      {"ncclAllReduce", resolve(library, "ncclAllReduce", &nccl->all_reduce)},
      {"ncclAllGather", resolve(library, "ncclAllGather", &nccl->all_gather)},
      {"ncclCommCount", resolve(library, "ncclCommCount", &nccl->comm_count)},
      {"ncclCommUserRank", resolve(library, "ncclCommUserRank", &nccl->comm_user_rank)},
      {"ncclCommCuDevice", resolve(library, "ncclCommCuDevice", &nccl->comm_cu_device)},
      {"ncclGetErrorString", resolve(library, "ncclGetErrorString", &nccl->get_error_string)},
      {"ncclGetVersion", resolve(library, "ncclGetVersion", &nccl->get_version)},
      {"ncclGroupStart", resolve(library, "ncclGroupStart", &nccl->group_start)},
      {"ncclGroupEnd", resolve(library, "ncclGroupEnd", &nccl->group_end)},
  };
  for (const Required& function : required) {
    if (!function.found) {
      return fail(GMTK_ERROR_NOT_SUPPORTED, "the loaded %s has no %s: not a usable NCCL library", kLibraryName,
                  function.name);
    }
  }
  if (nccl->get_version(&nccl->version) != ncclSuccess) nccl->version = 0;
  resolve(library, "ncclGetLastError", &nccl->get_last_error);
  resolve(library, "ncclCommGetAsyncError", &nccl->comm_get_async_error);
  dlerror();  // an optional function's miss is not an error to leave behind
  return GMTK_SUCCESS;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(LibraryHandle library, const NcclFunctions& nccl, ncclComm_t comm, int device, int rank, int size)
      : library_(std::move(library)), nccl_(nccl), comm_(comm), device_(device), rank_(rank), size_(size) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  gmtkStatus_t all_reduce_sum(uint64_t* values, size_t count, gmtkStream_t stream) override {
    add_payload(count * sizeof(uint64_t));
    CurrentDeviceGuard guard(device_);
    return check(wait_if_in_progress(nccl_.all_reduce(values, values, count, ncclUint64, ncclSum, comm_,
                                                       reinterpret_cast<cudaStream_t>(stream))),
                 "ncclAllReduce");
  }

  gmtkStatus_t all_gather(const void* send, size_t bytes, void* receive, gmtkStream_t stream) override {
    add_payload(bytes);
    CurrentDeviceGuard guard(device_);
    return check(wait_if_in_progress(
                     nccl_.all_gather(send, receive, bytes, ncclUint8, comm_, reinterpret_cast<cudaStream_t>(stream))),
                 "ncclAllGather");
  }

  // One group of all-reduces, which NCCL fuses: DDP's buckets without a copy
  // into a bucket (the tensors stay where the caller keeps them). ncclAvg
  // needs NCCL >= 2.10.
  gmtkStatus_t all_reduce_gradients(void* const* buffers, const uint64_t* numels, const gmtkDtype_t* dtypes,
                                    size_t count, bool average, gmtkStream_t stream) override {
    if (count == 0) return GMTK_SUCCESS;
    for (size_t i = 0; i < count; ++i) add_payload(numels[i] * (dtypes[i] == GMTK_FLOAT32 ? 4u : 2u));
    CurrentDeviceGuard guard(device_);
    const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
    gmtkStatus_t status = check(nccl_.group_start(), "ncclGroupStart");
    if (status != GMTK_SUCCESS) return status;
    for (size_t i = 0; i < count && status == GMTK_SUCCESS; ++i) {
      if (numels[i] == 0) continue;
      const ncclDataType_t type = dtypes[i] == GMTK_FLOAT32   ? ncclFloat32
                                  : dtypes[i] == GMTK_FLOAT16 ? ncclFloat16
                                                              : ncclBfloat16;
      status = check(nccl_.all_reduce(buffers[i], buffers[i], numels[i], type, average ? ncclAvg : ncclSum, comm_,
                                      cuda_stream),
                     "ncclAllReduce of a gradient");
    }
    const gmtkStatus_t ended = check(wait_if_in_progress(nccl_.group_end()), "ncclGroupEnd");
    return status != GMTK_SUCCESS ? status : ended;
  }

  bool on_device() const override { return true; }
  int device() const override { return device_; }

  // Stages through device memory on a stream of its own: copy in, gather, copy
  // out, all ordered on that stream, then waits for it.
  gmtkStatus_t all_gather_host(const void* send, size_t bytes, void* receive) override {
    add_payload(bytes);
    if (bytes == 0) return GMTK_SUCCESS;
    CurrentDeviceGuard guard(device_);
    const size_t gathered = bytes * static_cast<size_t>(size_);
    unsigned char* staging = nullptr;
    cudaError_t error = cudaMalloc(reinterpret_cast<void**>(&staging), bytes + gathered);
    if (error != cudaSuccess) return cuda_failure("cudaMalloc (staging an all-gather of host memory)", error);
    cudaStream_t stream = nullptr;
    error = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (error != cudaSuccess) {
      cudaFree(staging);
      return cuda_failure("cudaStreamCreateWithFlags", error);
    }
    gmtkStatus_t status = GMTK_SUCCESS;
    error = cudaMemcpyAsync(staging, send, bytes, cudaMemcpyHostToDevice, stream);
    if (error != cudaSuccess) status = cuda_failure("cudaMemcpyAsync (host to device)", error);
    if (status == GMTK_SUCCESS) {
      status = check(wait_if_in_progress(nccl_.all_gather(staging, staging + bytes, bytes, ncclUint8, comm_, stream)),
                     "ncclAllGather");
    }
    if (status == GMTK_SUCCESS) {
      error = cudaMemcpyAsync(receive, staging + bytes, gathered, cudaMemcpyDeviceToHost, stream);
      if (error != cudaSuccess) status = cuda_failure("cudaMemcpyAsync (device to host)", error);
    }
    // Waits even after a failure, so that nothing queued still uses the buffer when it is freed.
    error = cudaStreamSynchronize(stream);
    if (error != cudaSuccess && status == GMTK_SUCCESS) status = cuda_failure("cudaStreamSynchronize", error);
    cudaStreamDestroy(stream);
    cudaFree(staging);
    return status;
  }

 private:
  // A non-blocking communicator (ncclConfig_t.blocking = 0) may answer
  // ncclInProgress while it enqueues; its outcome comes from
  // ncclCommGetAsyncError. This waits for the enqueue, not for the collective.
  ncclResult_t wait_if_in_progress(ncclResult_t result) const {
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= 21400
    while (result == ncclInProgress && nccl_.comm_get_async_error != nullptr) {
      ncclResult_t async_result = ncclSuccess;
      const ncclResult_t query = nccl_.comm_get_async_error(comm_, &async_result);
      if (query != ncclSuccess) return query;
      result = async_result;
      if (result == ncclInProgress) sched_yield();
    }
#endif
    return result;
  }

  gmtkStatus_t check(ncclResult_t result, const char* what) const {
    if (result == ncclSuccess) return GMTK_SUCCESS;
    cudaGetLastError();  // NCCL may have left a CUDA error behind; not the caller's to find
    const char* detail = nccl_.get_last_error != nullptr ? nccl_.get_last_error(comm_) : nullptr;
    return fail(GMTK_ERROR_CUDA, "%s failed on rank %d of %d (NCCL %d.%d.%d): %s%s%s", what, rank_, size_,
                major_of(nccl_.version), minor_of(nccl_.version), patch_of(nccl_.version),
                nccl_.get_error_string(result), detail != nullptr && detail[0] != '\0' ? ": " : "",
                detail != nullptr ? detail : "");
  }

  LibraryHandle library_;
  NcclFunctions nccl_;
  ncclComm_t comm_;
  int device_;
  int rank_;
  int size_;
};

gmtkStatus_t query_failure(const NcclFunctions& nccl, const char* what, ncclResult_t result) {
  cudaGetLastError();
  return fail(GMTK_ERROR_CUDA, "%s failed on the given ncclComm_t (NCCL %d.%d.%d): %s", what,
              major_of(nccl.version), minor_of(nccl.version), patch_of(nccl.version), nccl.get_error_string(result));
}

}  // namespace

// The order of the checks matters: nothing is asked of NCCL, and nothing is
// done with the pointer, before it is known that a CUDA device exists and
// that the library loads. So a bad pointer on a machine without a GPU (or a
// build without NCCL) is refused without being touched.
//   1. arguments: nccl_comm not NULL, device >= 0     (INVALID_ARGUMENT)
//   2. the build has nccl.h                            (NOT_SUPPORTED; the #else below)
//   3. a CUDA device is usable                         (DEVICE_UNAVAILABLE)
//      and `device` is one of them                     (INVALID_ARGUMENT)
//   4. libnccl loads and has the functions gmtk needs  (NOT_SUPPORTED)
//   5. the communicator: its CUDA device is `device`, then its rank and size
//      (CUDA with NCCL's message, or INVALID_ARGUMENT for another device)
gmtkStatus_t make_nccl_communicator(void* nccl_comm, int device, std::shared_ptr<Communicator>* communicator) {
  GMTK_REQUIRE(nccl_comm != nullptr, "nccl_comm is NULL");
  GMTK_REQUIRE(device >= 0, "device is %d; it must be >= 0", device);

  GMTK_CHECK(check_device_exists(device, "device"));

  LibraryHandle library;
  GMTK_CHECK(open_library(&library));
  NcclFunctions nccl;
  GMTK_CHECK(resolve_functions(library.get(), &nccl));

  const auto comm = static_cast<ncclComm_t>(nccl_comm);
  CurrentDeviceGuard guard(device);
  int comm_device = -1;
  ncclResult_t result = nccl.comm_cu_device(comm, &comm_device);
  if (result != ncclSuccess) return query_failure(nccl, "ncclCommCuDevice", result);
  if (comm_device != device) {
    return fail(GMTK_ERROR_INVALID_ARGUMENT,
                "the ncclComm_t is on CUDA device %d and device is %d: pass the device of the handle the plans are "
                "made with, which must be the communicator's",
                comm_device, device);
  }
  int rank = -1;
  result = nccl.comm_user_rank(comm, &rank);
  if (result != ncclSuccess) return query_failure(nccl, "ncclCommUserRank", result);
  int size = 0;
  result = nccl.comm_count(comm, &size);
  if (result != ncclSuccess) return query_failure(nccl, "ncclCommCount", result);
  if (size < 1 || rank < 0 || rank >= size) {
    return fail(GMTK_ERROR_INVALID_ARGUMENT, "the ncclComm_t reports rank %d of %d: not a usable communicator", rank,
                size);
  }
  *communicator = std::make_shared<NcclCommunicator>(std::move(library), nccl, comm, device, rank, size);
  return GMTK_SUCCESS;
}

}  // namespace gmtk

#else  // !GMTK_HAVE_NCCL

namespace gmtk {

gmtkStatus_t make_nccl_communicator(void* nccl_comm, int device, std::shared_ptr<Communicator>*) {
  // The same first step as the NCCL build: a bad argument is reported as such everywhere.
  GMTK_REQUIRE(nccl_comm != nullptr, "nccl_comm is NULL");
  GMTK_REQUIRE(device >= 0, "device is %d; it must be >= 0", device);
  return fail(GMTK_ERROR_NOT_SUPPORTED,
              "this gmtk was built without NCCL (nccl.h not found at configure time): gmtkCommCreateFromNccl is not "
              "available; rebuild with NCCL's header (GMTK_NCCL_ROOT or GMTK_NCCL_INCLUDE_DIR)");
}

}  // namespace gmtk

#endif  // GMTK_HAVE_NCCL
