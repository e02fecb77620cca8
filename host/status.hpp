// Internal error plumbing: functions return gmtkStatus_t; the detail goes into a
// thread-local message that gmtkGetLastErrorMessage() returns. Nothing here
// prints, exits or throws.
#pragma once

#include <gmtk/gmtk.h>

#include <cstring>

namespace gmtk {

// A caller's enum field as the int a C caller may have stored in it, any
// value at all: reading an out-of-range value as the C++ enum type would be
// undefined behaviour (UBSan's -fsanitize=enum), so every check of a
// caller's enum reads it through this first.
template <typename Enum>
int raw_enum(const Enum& field) {
  static_assert(sizeof(Enum) == sizeof(int), "gmtk's C enums are ints");
  int raw;
  std::memcpy(&raw, &field, sizeof(raw));
  return raw;
}

// Records the message for this thread and returns `status`, so call sites read
// `return fail(GMTK_ERROR_INVALID_ARGUMENT, "tensors[%lld].grad is NULL", i);`.
gmtkStatus_t fail(gmtkStatus_t status, const char* format, ...) __attribute__((format(printf, 2, 3)));

const char* last_error_message();

}  // namespace gmtk

// Propagates a non-success status to the caller.
#define GMTK_CHECK(call)                                   \
  do {                                                     \
    const gmtkStatus_t gmtk_check_status_ = (call);        \
    if (gmtk_check_status_ != GMTK_SUCCESS) return gmtk_check_status_; \
  } while (0)

// Returns GMTK_ERROR_INVALID_ARGUMENT with a printf-style message unless `cond`.
#define GMTK_REQUIRE(cond, ...)                                             \
  do {                                                                      \
    if (!(cond)) return ::gmtk::fail(GMTK_ERROR_INVALID_ARGUMENT, __VA_ARGS__); \
  } while (0)
