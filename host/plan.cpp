#include "plan.hpp"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>

namespace gmtk {

Plan::~Plan() {
  if (owned_workspace != nullptr) backend->free_workspace(owned_workspace);
  backend_state.reset();  // before `backend`, which its destructor may still use
}

BufferName name_of(const BufferRange& range) {
  BufferName name;
  switch (range.owner) {
    case BufferRange::Owner::tensor:
      std::snprintf(name.text, sizeof(name.text), "tensors[%" PRId64 "].%s", range.index, range.field);
      break;
    case BufferRange::Owner::group:
      std::snprintf(name.text, sizeof(name.text), "groups[%" PRId64 "].%s", range.index, range.field);
      break;
    case BufferRange::Owner::call:
      std::snprintf(name.text, sizeof(name.text), "%s", range.field);
      break;
  }
  return name;
}

uint64_t kept_target(double mask_ratio, uint64_t n) {
  // floor of the double-precision product, as Python's int(r * n) gives it
  // (0.3 * 10 masks 3, not the 2 that the exact binary value of 0.3 would).
  const double product = mask_ratio * static_cast<double>(n);
  const uint64_t masked = product >= static_cast<double>(n) ? n : static_cast<uint64_t>(std::floor(product));
  return n - std::min(masked, n);
}

size_t dtype_size(gmtkDtype_t dtype) { return dtype == GMTK_FLOAT32 ? 4 : 2; }

}  // namespace gmtk
