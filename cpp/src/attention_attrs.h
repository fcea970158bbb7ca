// The attributes of an `attention` node (docs/engine_format.md), parsed and checked once at load for
// every backend's attention kind.
#pragma once

#include <cstdint>

#include "op_registry.h"

namespace rtllm {

struct AttentionAttrs {
  // Parses spec.node->attrs and checks the node's input count and dtypes: q/k/v (or qkv) float32
  // activations, int32 positions and float32 inv_freq with rope, float q/k norm weights with qk_norm.
  explicit AttentionAttrs(const OpSpec& spec);

  int32_t layer_idx, num_heads, num_kv_heads, head_dim;
  float scale;
  bool fused_qkv, rope, qk_norm;
  float qk_norm_eps;
  // An F8_E4M3 KV cache stores e4m3(k / k_scale) and e4m3(v / v_scale), an I8 one
  // clamp(round_half_even(k / k_scale), -127, 127) and likewise v; both read code * scale (calibrated per
  // layer; 1 when absent). Finite and > 0.
  float k_scale, v_scale;

  // Input positions: [qkv] or [q, k, v], then [positions, inv_freq] with rope, then
  // [q_norm, k_norm] with qk_norm.
  int num_qkv() const { return fused_qkv ? 1 : 3; }
  int positions_input() const { return num_qkv(); }
  int inv_freq_input() const { return num_qkv() + 1; }
  int q_norm_input() const { return num_qkv() + (rope ? 2 : 0); }
  int num_inputs() const { return q_norm_input() + (qk_norm ? 2 : 0); }
  bool is_norm_weight(size_t input) const { return qk_norm && static_cast<int>(input) >= q_norm_input(); }
};

}  // namespace rtllm
