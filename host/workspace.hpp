// CUB-style workspace carving: sub-buffers at 256-byte alignment inside one
// caller buffer. The size asked for includes the slack to align the base, so
// any pointer the caller passes works.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gmtk {

class WorkspaceLayout {
 public:
  static constexpr size_t kAlignment = 256;

  // Reserves `bytes` and returns their offset from the aligned base.
  size_t reserve(size_t bytes) {
    const size_t offset = (used_ + kAlignment - 1) / kAlignment * kAlignment;
    used_ = offset + bytes;
    return offset;
  }

  size_t required_bytes() const { return used_ == 0 ? 0 : used_ + kAlignment - 1; }

  static unsigned char* aligned_base(void* workspace) {
    const auto address = reinterpret_cast<uintptr_t>(workspace);
    return reinterpret_cast<unsigned char*>((address + kAlignment - 1) / kAlignment * kAlignment);
  }

 private:
  size_t used_ = 0;
};

}  // namespace gmtk
