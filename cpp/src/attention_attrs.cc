#include "attention_attrs.h"

#include <cmath>

namespace rtllm {

AttentionAttrs::AttentionAttrs(const OpSpec& spec) {
  const Json& a = spec.node->attrs;
  layer_idx = static_cast<int32_t>(a.at("layer_idx").as_int());
  num_heads = static_cast<int32_t>(a.at("num_heads").as_int());
  num_kv_heads = static_cast<int32_t>(a.at("num_kv_heads").as_int());
  head_dim = static_cast<int32_t>(a.at("head_dim").as_int());
  scale = static_cast<float>(a.get_double("scale", 1.0 / std::sqrt(static_cast<double>(head_dim))));
  fused_qkv = a.get_bool("fused_qkv", false);
  rope = a.get_bool("rope", false);
  qk_norm = a.get_bool("qk_norm", false);
  qk_norm_eps = static_cast<float>(a.get_double("qk_norm_eps", 1e-6));
  k_scale = static_cast<float>(a.get_double("k_scale", 1.0));
  v_scale = static_cast<float>(a.get_double("v_scale", 1.0));

  RTLLM_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, "attention: num_heads ",
              num_heads, " is not a positive multiple of num_kv_heads ", num_kv_heads);
  RTLLM_CHECK(head_dim > 0, "attention: head_dim ", head_dim, " must be > 0");
  RTLLM_CHECK(layer_idx >= 0 && layer_idx < spec.backend->num_layers, "attention: layer_idx ", layer_idx,
              " outside [0, ", spec.backend->num_layers, ")");
  RTLLM_CHECK(std::isfinite(k_scale) && k_scale > 0.0f, "attention: k_scale ", k_scale, " must be finite and > 0");
  RTLLM_CHECK(std::isfinite(v_scale) && v_scale > 0.0f, "attention: v_scale ", v_scale, " must be finite and > 0");
  spec.require_num_io(num_inputs(), num_inputs(), 1);
  for (int i = 0; i < num_qkv(); ++i) spec.require_input_dtype(i, {DataType::kFloat32});
  if (rope) {
    spec.require_input_dtype(positions_input(), {DataType::kInt32});
    spec.require_input_dtype(inv_freq_input(), {DataType::kFloat32});
  }
  if (qk_norm)
    for (int i = q_norm_input(); i < num_inputs(); ++i) spec.require_input_dtype(i, kWideFloatDtypes);
}

}  // namespace rtllm
