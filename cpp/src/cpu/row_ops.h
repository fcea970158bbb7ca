// Per-row kernels shared by the CPU ops (rms_norm, add_rms_norm and its all-reduce form, rope, and attention's
// fused qk_norm + RoPE).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

namespace rtllm::cpu {

// y[0:d] = x / sqrt(mean(x²) + eps) · weight, computed in float32 like HF's LlamaRMSNorm. y may be x.
inline void rms_norm_row(float* y, const float* x, const float* weight, int64_t d, float eps) {
  const float mean_sq = dot(x, x, d) / static_cast<float>(d);
  const float inv_rms = 1.0f / std::sqrt(mean_sq + eps);
  for (int64_t i = 0; i < d; ++i) y[i] = weight[i] * (x[i] * inv_rms);
}

// sum[0:d] = x + residual, normed = rms_norm_row(sum): add_rms_norm's row (sum may be x, after an all-reduce
// into it).
inline void add_rms_norm_row(float* normed, float* sum, const float* x, const float* residual, const float* weight,
                             int64_t d, float eps) {
  for (int64_t i = 0; i < d; ++i) sum[i] = x[i] + residual[i];
  rms_norm_row(normed, sum, weight, d, eps);
}

// cos/sin of float32(pos) · inv_freq[i] for i < half = head_dim / 2 (the product rounded to float32).
inline void rope_cos_sin(int32_t pos, const float* inv_freq, int64_t half, float* cos_out, float* sin_out) {
  const float p = static_cast<float>(pos);
  for (int64_t i = 0; i < half; ++i) {
    const float f = p * inv_freq[i];
    cos_out[i] = std::cos(f);
    sin_out[i] = std::sin(f);
  }
}

// Rotate-half RoPE of one head in place: y[i] = x1·c − x2·s, y[i + half] = x2·c + x1·s.
inline void rope_head(float* x, const float* cos_v, const float* sin_v, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos_v[i] - x2 * sin_v[i];
    x[i + half] = x2 * cos_v[i] + x1 * sin_v[i];
  }
}

// Largest head_dim the CPU ops support (their per-token buffers live on the stack).
constexpr int64_t kMaxHeadDim = 512;

}  // namespace rtllm::cpu
