// What gmtk_bench runs on: the parameter lists of PERFORMANCE.md and the byte
// model that turns a time into an effective bandwidth.
#pragma once

#include <gmtk/gmtk.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gmtk_bench {

// Tensor sizes (entries) of a parameter list.
struct ShapeList {
  std::string name;
  std::vector<int64_t> numels;

  int64_t total() const {
    int64_t sum = 0;
    for (int64_t n : numels) sum += n;
    return sum;
  }
};

// Llama-2-7B's parameter list with `layers` decoder layers: embedding
// 32000x4096, per layer q/k/v/o 4096x4096, gate/up 11008x4096, down
// 4096x11008, two norms of 4096; a final norm and the lm_head.
inline ShapeList llama2_7b_layers(int layers) {
  ShapeList list{"llama2_7b_" + std::to_string(layers) + "layers", {}};
  list.numels.push_back(int64_t{32000} * 4096);
  for (int l = 0; l < layers; ++l) {
    for (int i = 0; i < 4; ++i) list.numels.push_back(int64_t{4096} * 4096);
    for (int i = 0; i < 3; ++i) list.numels.push_back(int64_t{11008} * 4096);
    list.numels.push_back(4096);
    list.numels.push_back(4096);
  }
  list.numels.push_back(4096);
  list.numels.push_back(int64_t{32000} * 4096);
  return list;
}

// The same layer structure at width/16 (embedding 2000x256, ...): a CPU-sized model.
inline ShapeList llama_shaped_mini(int layers) {
  ShapeList list{"llama_mini_" + std::to_string(layers) + "layers", {}};
  list.numels.push_back(int64_t{2000} * 256);
  for (int l = 0; l < layers; ++l) {
    for (int i = 0; i < 4; ++i) list.numels.push_back(int64_t{256} * 256);
    for (int i = 0; i < 3; ++i) list.numels.push_back(int64_t{688} * 256);
    list.numels.push_back(256);
    list.numels.push_back(256);
  }
  list.numels.push_back(256);
  list.numels.push_back(int64_t{2000} * 256);
  return list;
}

inline ShapeList flat(int64_t numel) { return {"flat_" + std::to_string(numel), {numel}}; }

inline ShapeList many_small(int count, int64_t numel) {
  return {std::to_string(count) + "x" + std::to_string(numel), std::vector<int64_t>(static_cast<size_t>(count), numel)};
}

inline size_t dtype_bytes(gmtkDtype_t dtype) { return dtype == GMTK_FLOAT32 ? 4 : 2; }

// The floor of a plain (unmasked) fused optimizer step: every input read once,
// every output written once (PERFORMANCE.md's byte model).
inline double step_floor_bytes_per_entry(gmtkOptimizer_t optimizer, gmtkDtype_t grad_dtype, gmtkDtype_t param_dtype,
                                         bool master) {
  const double state_bytes = optimizer == GMTK_OPTIMIZER_SGD ? 4.0 : 8.0;  // SGD: momentum buffer
  const double weights_read = master ? 4.0 : static_cast<double>(dtype_bytes(param_dtype));
  const double weights_written = master ? 4.0 + static_cast<double>(dtype_bytes(param_dtype))
                                        : static_cast<double>(dtype_bytes(param_dtype));
  const double read = static_cast<double>(dtype_bytes(grad_dtype)) + weights_read + state_bytes;
  const double written = weights_written + state_bytes;
  return read + written;
}

}  // namespace gmtk_bench
