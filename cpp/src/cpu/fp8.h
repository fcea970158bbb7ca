// FP8 E4M3 on the CPU: decoding by a 256-entry table (one load per value, exact), shared by the ops
// that read E4M3 data (fp8_linear's weights, an F8_E4M3 KV cache).
#pragma once

#include <array>
#include <cstdint>

#include "rtllm/dtype.h"

namespace rtllm::cpu {

// E4M3 byte -> float, all 256 codes (the two NaN codes decode to NaN). Built on first use: an op kind
// calls it in its constructor so that the first step does not build it.
inline const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = fp8_e4m3_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

}  // namespace rtllm::cpu
