// The E4M3 first output of a norm or silu_mul (docs/engine_format.md, "FP8 outputs"): where the builder
// declared it float8_e4m3 for the static fp8_linear that reads it, the op writes e4m3(y / output_scale),
// the linear's own quantization of y, instead of y.
#pragma once

#include <cstddef>
#include <cstdint>

#include "op_registry.h"

namespace rtllm::cpu {

class Fp8Output {
 public:
  explicit Fp8Output(const OpSpec& spec) : scale_(fp8_output_scale(spec)) {}
  bool on() const { return scale_ > 0.0f; }
  // The op's workspace when on: one float32 row of row_size per thread, the row computed before store().
  size_t row_workspace_bytes(const OpSpec& spec, int64_t row_size) const {
    return on() ? sizeof(float) * static_cast<size_t>(spec.backend->num_threads) * row_size : 0;
  }
  // codes[i] = e4m3(y[i] / output_scale), float32 division, round to nearest even, saturated.
  void store(const float* y, int64_t n, uint8_t* codes) const {
    for (int64_t i = 0; i < n; ++i) codes[i] = float_to_fp8_e4m3(y[i] / scale_);
  }

 private:
  const float scale_;  // 0: the output is float
};

}  // namespace rtllm::cpu
