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

// A Llama-shaped parameter list: embedding vocab x hidden; per decoder layer
// q/k/v/o hidden x hidden, gate/up intermediate x hidden, down hidden x
// intermediate, two norms of hidden; a final norm and the lm_head.
inline ShapeList llama_shaped(const std::string& name, int layers, int64_t vocab, int64_t hidden,
                              int64_t intermediate) {
  ShapeList list{name + "_" + std::to_string(layers) + "layers", {}};
  list.numels.push_back(vocab * hidden);
  for (int l = 0; l < layers; ++l) {
    for (int i = 0; i < 4; ++i) list.numels.push_back(hidden * hidden);
    for (int i = 0; i < 3; ++i) list.numels.push_back(intermediate * hidden);
    list.numels.push_back(hidden);
    list.numels.push_back(hidden);
  }
  list.numels.push_back(hidden);
  list.numels.push_back(vocab * hidden);
  return list;
}

// Llama-2-7B with `layers` decoder layers.
inline ShapeList llama2_7b_layers(int layers) { return llama_shaped("llama2_7b", layers, 32000, 4096, 11008); }

// The same structure at width/16: a CPU-sized model.
inline ShapeList llama_shaped_mini(int layers) { return llama_shaped("llama_mini", layers, 2000, 256, 688); }

inline ShapeList flat(int64_t numel) { return {"flat_" + std::to_string(numel), {numel}}; }

inline ShapeList many_small(int count, int64_t numel) {
  return {std::to_string(count) + "x" + std::to_string(numel), std::vector<int64_t>(static_cast<size_t>(count), numel)};
}

inline size_t dtype_bytes(gmtkDtype_t dtype) { return dtype == GMTK_FLOAT32 ? 4 : 2; }

// Entries masked in a set of n at ratio r, as gmtk counts them (the floor of
// the double product, docs/semantics.md): T is the key at this position of
// the set's keys sorted in ascending order.
inline int64_t masked_entries(double ratio, int64_t n) {
  const double product = ratio * static_cast<double>(n);
  return product >= static_cast<double>(n) ? n : static_cast<int64_t>(product);
}

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
