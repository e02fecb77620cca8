// What a plan holds: validated copies of the caller's groups and tensors, and
// derived indexes. Never the caller's data.
#pragma once

#include "backend.hpp"

#include <cstdint>
#include <vector>

namespace gmtk {

// A caller buffer as an address interval, for overlap checks and messages.
struct BufferRange {
  enum class Owner : uint8_t { tensor, group, call };
  uintptr_t begin;
  uintptr_t end;
  Owner owner;
  int64_t index;      // of the tensor or group; unused for call buffers
  const char* field;  // "grad", "lr_device", "args->thresholds", ...
};

struct Plan {
  gmtkHandle* handle = nullptr;
  std::vector<gmtkGroupConfig_t> groups;
  std::vector<gmtkTensor_t> tensors;
  std::vector<std::vector<int64_t>> tensors_of_group;
  std::vector<uint64_t> numel_of_group;
  // Every non-empty tensor buffer, sorted by address (they are disjoint), so a
  // call's own buffers can be checked against them by binary search.
  std::vector<BufferRange> sorted_buffers;
  void* owned_workspace = nullptr;  // with GMTK_PLAN_ALLOCATE_WORKSPACE
  size_t owned_workspace_bytes = 0;

  ~Plan();
};

// Entries to keep for a set of n entries at mask ratio r: k = n - floor(r * n),
// the product taken in double precision (docs/semantics.md).
uint64_t kept_target(double mask_ratio, uint64_t n);

size_t dtype_size(gmtkDtype_t dtype);

}  // namespace gmtk

struct gmtkPlan : gmtk::Plan {};
