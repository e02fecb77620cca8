// The ranks a sharded plan spans, behind one small interface: the in-process
// implementation (threads of one process, host memory) serves the CPU
// reference backend and its tests; an NCCL one (device memory, the caller's
// stream) is the CUDA backend's. Collectives are called by every rank in the
// same order; a rank that never comes makes the others wait, as with NCCL.
#pragma once

#include <gmtk/gmtk.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace gmtk {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // values[i] becomes the sum over ranks of values[i], on every rank.
  virtual gmtkStatus_t all_reduce_sum(uint64_t* values, size_t count, gmtkStream_t stream) = 0;
  // receive[r * bytes ...] becomes rank r's `send`, on every rank.
  virtual gmtkStatus_t all_gather(const void* send, size_t bytes, void* receive, gmtkStream_t stream) = 0;
};

// num_ranks linked communicators for threads of this process.
gmtkStatus_t make_in_process_communicators(int num_ranks, std::shared_ptr<Communicator>* communicators);

}  // namespace gmtk

// What gmtkComm_t points to. Plans share the communicator, so a plan outliving
// its gmtkComm_t handle stays safe.
struct gmtkComm {
  std::shared_ptr<gmtk::Communicator> communicator;
};
