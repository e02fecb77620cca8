// The ranks a sharded plan spans, behind one small interface: the in-process
// implementation (threads of one process, host memory) serves the CPU
// reference backend and its tests; an NCCL one (device memory, the caller's
// stream) is the CUDA backend's. Collectives are called by every rank in the
// same order; a rank that never comes makes the others wait, as with NCCL.
#pragma once

#include <gmtk/gmtk.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace gmtk {

class Communicator {
 public:
  virtual ~Communicator() = default;
  // Payload bytes this rank has handed to collectives so far (an all-reduce:
  // its buffer; an all-gather: its own part), for gmtkCommGetBytes.
  uint64_t payload_bytes() const { return payload_bytes_.load(std::memory_order_relaxed); }
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // values[i] becomes the sum over ranks of values[i], on every rank.
  virtual gmtkStatus_t all_reduce_sum(uint64_t* values, size_t count, gmtkStream_t stream) = 0;
  // receive[r * bytes ...] becomes rank r's `send`, on every rank.
  virtual gmtkStatus_t all_gather(const void* send, size_t bytes, void* receive, gmtkStream_t stream) = 0;
  // Data parallel: each of `count` gradient buffers (the same tensors, in the
  // same order, on every rank) becomes the ranks' sum or mean, in place, in
  // its dtype. One batched call (NCCL: a group of all-reduces).
  virtual gmtkStatus_t all_reduce_gradients(void* const* buffers, const uint64_t* numels, const gmtkDtype_t* dtypes,
                                            size_t count, bool average, gmtkStream_t stream) = 0;
  // false: host memory, done when the call returns (in-process). true: device
  // memory, queued on the stream (NCCL).
  virtual bool on_device() const = 0;
  // The CUDA device of a device communicator; -1 for a host one.
  virtual int device() const { return -1; }
  // Host-memory exchanges at plan creation (verdicts, extents), whatever
  // on_device() says: a device communicator stages them through device memory
  // and waits for them (plan creation may synchronize; calls never do).
  virtual gmtkStatus_t all_gather_host(const void* send, size_t bytes, void* receive) {
    return all_gather(send, bytes, receive, nullptr);
  }

 protected:
  void add_payload(uint64_t bytes) { payload_bytes_.fetch_add(bytes, std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> payload_bytes_{0};
};

// num_ranks linked communicators for threads of this process.
gmtkStatus_t make_in_process_communicators(int num_ranks, std::shared_ptr<Communicator>* communicators);

// Wraps a caller-owned ncclComm_t (host/nccl_comm.cpp); GMTK_ERROR_NOT_SUPPORTED
// in a build without NCCL's header or where libnccl cannot be loaded.
gmtkStatus_t make_nccl_communicator(void* nccl_comm, int device, std::shared_ptr<Communicator>* communicator);

}  // namespace gmtk

// What gmtkComm_t points to. Plans share the communicator, so a plan outliving
// its gmtkComm_t handle stays safe.
struct gmtkComm {
  std::shared_ptr<gmtk::Communicator> communicator;
};
