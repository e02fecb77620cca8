// The GPU test binary exits 77 (CTest's SKIP_RETURN_CODE) with a visible
// reason when no CUDA device is usable, instead of passing without testing.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>

#include <cstdio>

int main(int argc, char** argv) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n",
                error != cudaSuccess ? cudaGetErrorString(error) : "cudaGetDeviceCount found none");
    return 77;
  }
  cudaDeviceProp properties{};
  cudaGetDeviceProperties(&properties, 0);
  std::printf("GPU tests on device 0: %s (sm_%d%d)\n", properties.name, properties.major, properties.minor);
  return Catch::Session().run(argc, argv);
}
