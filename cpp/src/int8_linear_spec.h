// int8_linear's load-time contract (docs/engine_format.md), shared by the CPU and CUDA kinds: the inputs
// x [T, K], weight [N, K] I8, weight_scale [N, 1] F32, pre_quant_scale [K] F32 when the attr
// has_pre_quant_scale is true, then the optional bias [N]. Every refusal names the value and the limit.
#pragma once

#include <cstdint>
#include <string>

#include "op_registry.h"

namespace rtllm {

// The largest K whose int32 sum of K products of codes in [-127, 127] cannot overflow: 127 · 127 · K
// <= 2^31 - 1.
constexpr int64_t kInt8LinearMaxK = 133144;

struct Int8LinearShape {
  int64_t N = 0, K = 0;
  bool has_pre_quant_scale = false, has_bias = false;
  size_t pre_quant_scale_input = 0, bias_input = 0;  // valid when the flag is set
  int64_t max_rows = 0;  // of x at the largest step

  static bool has_shape(const TensorSpec& t, int64_t d0, int64_t d1 = -1) {
    const size_t ndim = d1 < 0 ? 1 : 2;
    if (t.shape.size() != ndim) return false;
    for (size_t i = 0; i < ndim; ++i)
      if (t.shape[i].kind != Dim::Kind::kFixed || t.shape[i].value != (i ? d1 : d0)) return false;
    return true;
  }

  // Checks the node against the contract; x_dtypes are the activation dtypes the backend runs.
  static Int8LinearShape parse(const OpSpec& spec, const std::vector<DataType>& x_dtypes) {
    Int8LinearShape s;
    s.has_pre_quant_scale = spec.node->attrs.get_bool("has_pre_quant_scale", false);
    const size_t num_fixed = s.has_pre_quant_scale ? 4 : 3;
    spec.require_num_io(num_fixed, num_fixed + 1, 1);
    spec.require_input_dtype(0, x_dtypes);
    spec.require_input_dtype(1, {DataType::kInt8});
    spec.require_input_dtype(2, {DataType::kFloat32});
    if (s.has_pre_quant_scale) {
      s.pre_quant_scale_input = 3;
      spec.require_input_dtype(3, {DataType::kFloat32});
    }
    s.has_bias = spec.inputs.size() == num_fixed + 1;
    if (s.has_bias) {
      s.bias_input = num_fixed;
      spec.require_input_dtype(num_fixed, kWideFloatDtypes);
    }
    const TensorSpec& w = spec.inputs[1];
    RTLLM_CHECK(w.shape.size() == 2 && w.shape[0].kind == Dim::Kind::kFixed && w.shape[1].kind == Dim::Kind::kFixed,
                "int8_linear: weight \"", w.name, "\" has shape ", shape_string(w), ", expected a fixed [N, K]");
    s.N = w.shape[0].value;
    s.K = w.shape[1].value;
    RTLLM_CHECK(s.N > 0 && s.K > 0, "int8_linear: weight \"", w.name, "\" has shape ", shape_string(w),
                ", expected N > 0 and K > 0");
    RTLLM_CHECK(s.K <= kInt8LinearMaxK, "int8_linear: weight \"", w.name, "\" has K = ", s.K,
                " input features, more than ", kInt8LinearMaxK, " (the int32 sum of K products of int8 codes "
                "could overflow)");
    const TensorSpec& x = spec.inputs[0];
    RTLLM_CHECK(x.shape.size() == 2 && x.shape[1].kind == Dim::Kind::kFixed && x.shape[1].value == s.K,
                "int8_linear: x \"", x.name, "\" has shape ", shape_string(x), ", expected [rows, ", s.K, "]");
    const TensorSpec& ws = spec.inputs[2];
    RTLLM_CHECK(has_shape(ws, s.N, 1), "int8_linear: weight_scale \"", ws.name, "\" has shape ", shape_string(ws),
                ", expected [", s.N, ", 1] (one scale per output channel)");
    if (s.has_pre_quant_scale) {
      const TensorSpec& p = spec.inputs[3];
      RTLLM_CHECK(has_shape(p, s.K), "int8_linear: pre_quant_scale \"", p.name, "\" has shape ", shape_string(p),
                  ", expected [", s.K, "] (one scale per input channel)");
    }
    if (s.has_bias) {
      const TensorSpec& b = spec.inputs[s.bias_input];
      RTLLM_CHECK(has_shape(b, s.N), "int8_linear: bias \"", b.name, "\" has shape ", shape_string(b), ", expected [",
                  s.N, "]");
    }
    s.max_rows = spec.backend->max_size(x.shape[0]);  // [num_tokens, K], or [num_logits, K] for an LM head
    return s;
  }
};

}  // namespace rtllm
