// gmtkCommCreateFromNccl's refusals, on any machine: bad arguments, and a
// pointer that is not a communicator, which must be refused before NCCL (or
// gmtk) touches it wherever it cannot be a communicator (no usable GPU, no
// NCCL). The GPU tests wrap a real one (tests/gpu/nccl_tests.cpp).
#include <string>

#include "test_support.hpp"

namespace {

// A stand-in for an ncclComm_t: never a communicator, only a non-NULL address.
int not_a_communicator[64];

gmtkComm_t sentinel() { return reinterpret_cast<gmtkComm_t>(&not_a_communicator[1]); }

std::string last_message() { return gmtkGetLastErrorMessage(); }

bool a_cuda_device_is_usable() {
  gmtkHandleConfig_t config = GMTK_HANDLE_CONFIG_INIT;
  gmtkHandle_t handle = nullptr;
  if (gmtkHandleCreate(&handle, &config) != GMTK_SUCCESS) return false;
  gmtkHandleDestroy(handle);
  return true;
}

}  // namespace

TEST_CASE("gmtkCommCreateFromNccl refuses NULL arguments and names them", "[nccl]") {
  gmtkComm_t comm = sentinel();
  CHECK(gmtkCommCreateFromNccl(nullptr, 0, &comm) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(last_message().find("nccl_comm is NULL") != std::string::npos);
  CHECK(comm == sentinel());

  CHECK(gmtkCommCreateFromNccl(not_a_communicator, 0, nullptr) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(last_message().find("comm is NULL") != std::string::npos);

  CHECK(gmtkCommCreateFromNccl(not_a_communicator, -1, &comm) == GMTK_ERROR_INVALID_ARGUMENT);
  CHECK(last_message().find("device is -1") != std::string::npos);
  CHECK(comm == sentinel());
}

TEST_CASE("gmtkCommCreateFromNccl checks the device before it touches the communicator", "[nccl]") {
  // No machine has this device: refused (or NCCL unavailable, or no GPU at
  // all) before anything is asked of the pointer, on every machine.
  gmtkComm_t comm = sentinel();
  const gmtkStatus_t status = gmtkCommCreateFromNccl(not_a_communicator, 1 << 20, &comm);
  INFO(gmtkGetErrorString(status) << ": " << last_message());
  CHECK((status == GMTK_ERROR_INVALID_ARGUMENT || status == GMTK_ERROR_DEVICE_UNAVAILABLE ||
         status == GMTK_ERROR_NOT_SUPPORTED));
  if (status == GMTK_ERROR_INVALID_ARGUMENT) CHECK(last_message().find("device is 1048576") != std::string::npos);
  CHECK(comm == sentinel());
}

TEST_CASE("without a usable GPU, a non-NULL pointer is refused without being touched", "[nccl]") {
  if (a_cuda_device_is_usable()) {
    // Here NCCL would be asked about the pointer: only a real communicator may be given (the GPU tests do).
    WARN("SKIPPED: a CUDA device is usable; a fake ncclComm_t is only given where none is");
    return;
  }
  gmtkComm_t comm = sentinel();
  const gmtkStatus_t status = gmtkCommCreateFromNccl(not_a_communicator, 0, &comm);
  INFO(gmtkGetErrorString(status) << ": " << last_message());
  // NOT_SUPPORTED: this build has no nccl.h. DEVICE_UNAVAILABLE: it has, and no GPU is usable.
  CHECK((status == GMTK_ERROR_NOT_SUPPORTED || status == GMTK_ERROR_DEVICE_UNAVAILABLE));
  if (status == GMTK_ERROR_NOT_SUPPORTED) {
    CHECK(last_message().find("NCCL") != std::string::npos);
  } else {
    CHECK(last_message().find("CUDA device") != std::string::npos);
  }
  CHECK(comm == sentinel());
}
