// What a plan holds: validated copies of the caller's groups and tensors, and
// derived indexes. Never the caller's data.
#pragma once

#include "backend.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace gmtk {

class Communicator;

struct Plan {
  std::shared_ptr<Backend> backend;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<gmtkTensor_t> tensors;
  std::vector<std::vector<int64_t>> tensors_of_group;
  // Every non-empty tensor buffer, sorted by address (they are disjoint), so a
  // call's own buffers can be checked against them by binary search.
  std::vector<BufferRange> sorted_buffers;
  // The groups' lr_device scalars, sorted by address (group_scalar_ranges),
  // kept up to date by gmtkPlanSetGroupHyperparams, so that a call checks its
  // outputs against them without building the list.
  std::vector<BufferRange> sorted_scalars;
  bool step_buffers_complete = false;  // validate.hpp's step_buffers_complete(), kept current
  // The mask bitmaps' layout (gmtkPlanGetMaskLayout): each tensor's first
  // 32-bit word, and the words in all.
  std::vector<uint64_t> mask_word_offsets;
  uint64_t mask_words = 0;
  void* owned_workspace = nullptr;  // with GMTK_PLAN_ALLOCATE_WORKSPACE
  size_t owned_workspace_bytes = 0;
  std::unique_ptr<BackendPlanState> backend_state;  // Backend::prepare_plan's
  // The ranks of a sharded plan (gmtkPlanConfig_t.comm), or null.
  std::shared_ptr<Communicator> comm;
  // Two words per rank for the ranks' verdicts on each call (shards.hpp), so
  // that a call allocates nothing. Calls on one plan do not run concurrently.
  mutable std::vector<uint64_t> call_verdicts;
  uint64_t signature = 0;  // what the ranks agreed on at creation (shards.cpp)
  // The replica records' gradients (data parallel), for a call's
  // gradient_reduction: listed once so that a call allocates nothing.
  std::vector<void*> replica_grads;
  std::vector<uint64_t> replica_numels;
  std::vector<gmtkDtype_t> replica_dtypes;
  // Set once a call met a sticky CUDA error (gmtkPlanGetState): the reason
  // is written before the flag is raised, and read only after it is seen.
  std::atomic<bool> unusable{false};
  char unusable_reason[512] = {};  // fixed: recording it must not allocate

  ~Plan();
};

// Entries to keep for a set of n entries at mask ratio r: k = n - floor(r * n),
// the product taken in double precision (docs/semantics.md).
uint64_t kept_target(double mask_ratio, uint64_t n);

// A record that holds a slice of a logical tensor (gmtkTensor_t.logical_numel).
inline bool is_shard(const gmtkTensor_t& tensor) { return tensor.logical_numel != 0 || tensor.shard_offset != 0; }

// The dtype of the keys a tensor is selected on: its score's, else its gradient's.
inline gmtkDtype_t selection_dtype(const gmtkTensor_t& tensor) {
  return tensor.score != nullptr ? tensor.score_dtype : tensor.grad_dtype;
}

// Entries of the tensor the record is part of: the logical tensor of a shard,
// else the record itself.
inline uint64_t logical_numel(const gmtkTensor_t& tensor) {
  return static_cast<uint64_t>(is_shard(tensor) ? tensor.logical_numel : tensor.numel);
}

size_t dtype_size(gmtkDtype_t dtype);

}  // namespace gmtk

struct gmtkPlan : gmtk::Plan {};
