#include "status.hpp"

#include <cstdarg>
#include <cstdio>

namespace gmtk {
namespace {
// Fixed-size so that recording an error can never fail or allocate.
thread_local char last_message[1024] = "";
}  // namespace

gmtkStatus_t fail(gmtkStatus_t status, const char* format, ...) {
  va_list args;
  va_start(args, format);
  std::vsnprintf(last_message, sizeof(last_message), format, args);
  va_end(args);
  return status;
}

const char* last_error_message() { return last_message; }

}  // namespace gmtk
