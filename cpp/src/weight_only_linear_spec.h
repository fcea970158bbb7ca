// weight_only_linear's load-time contract (docs/engine_format.md), shared by the CPU and CUDA kinds: attrs
// group_size and has_offset (has_g_idx only as false), inputs x [T, K] float32, weight [N, K] I8 or I4,
// scale [N, K / G] (F32, BF16 or F16), offset [N, K / G] F32 when has_offset, then the optional bias [N],
// every input but x a weight. Every refusal names the value and the limit.
#pragma once

#include <cstdint>
#include <string>

#include "op_registry.h"

namespace rtllm {

struct WeightOnlyShape {
  int64_t N = 0, K = 0, group_size = 0, num_groups = 0;
  bool int4 = false, has_offset = false, has_bias = false;
  size_t bias_input = 0;  // valid when has_bias
  int64_t max_rows = 0;   // of x at the largest step

  static WeightOnlyShape parse(const OpSpec& spec) {
    WeightOnlyShape s;
    const GraphNode& node = *spec.node;
    const std::string w_name = spec.inputs.size() > 1 ? spec.inputs[1].name : std::string("?");
    // Attrs this op knows; any other changes the semantics in a way no kind implements, so it is refused
    // rather than ignored. has_g_idx (act-order: a permutation of K's groups) is taken only as false.
    if (node.attrs.is_object()) {
      for (const auto& [key, value] : node.attrs.as_object()) {
        if (key == "has_g_idx") {
          RTLLM_CHECK(value.is_bool() && !value.as_bool(), "weight_only_linear: node of weight \"", w_name,
                      "\" has has_g_idx ", value.dump(), "; rtllm takes only has_g_idx false (no g_idx permutation "
                      "of the groups)");
          continue;
        }
        RTLLM_CHECK(key == "group_size" || key == "has_offset", "weight_only_linear: node of weight \"", w_name,
                    "\" has attr \"", key, "\" (", value.dump(), "), which the ", device_name(spec.backend->device),
                    " backend does not support (it knows group_size, has_offset and has_g_idx false)");
      }
    }
    RTLLM_CHECK(!node.attrs.contains("has_offset") || node.attrs.at("has_offset").is_bool(),
                "weight_only_linear: attr has_offset of weight \"", w_name, "\" is ",
                node.attrs.at("has_offset").dump(), ", expected true or false");
    s.has_offset = node.attrs.get_bool("has_offset", false);
    const size_t num_fixed = s.has_offset ? 4 : 3;
    spec.require_num_io(num_fixed, num_fixed + 1, 1);
    spec.require_input_dtype(0, {DataType::kFloat32});
    spec.require_input_dtype(1, {DataType::kInt8, DataType::kInt4});
    spec.require_input_dtype(2, kWideFloatDtypes);
    if (s.has_offset) spec.require_input_dtype(3, {DataType::kFloat32});
    s.has_bias = spec.inputs.size() == num_fixed + 1;
    if (s.has_bias) {
      s.bias_input = num_fixed;
      spec.require_input_dtype(num_fixed, kWideFloatDtypes);
    }
    for (size_t i = 1; i < spec.inputs.size(); ++i)
      RTLLM_CHECK(spec.input_is_weight[i], "weight_only_linear: input ", i, " (\"", spec.inputs[i].name,
                  "\") must be a weight, it is an activation");

    const TensorSpec& w = spec.inputs[1];
    RTLLM_CHECK(w.shape.size() == 2 && w.shape[0].kind == Dim::Kind::kFixed && w.shape[1].kind == Dim::Kind::kFixed,
                "weight_only_linear: weight \"", w.name, "\" must be a fixed 2-d [N, K] tensor, it has shape ",
                shape_string(w));
    s.N = w.shape[0].value;
    s.K = w.shape[1].value;
    RTLLM_CHECK(s.N > 0 && s.K > 0, "weight_only_linear: weight \"", w.name, "\" has shape ", shape_string(w),
                ", expected N > 0 and K > 0");
    s.int4 = w.dtype == DataType::kInt4;
    RTLLM_CHECK(!s.int4 || s.K % 2 == 0, "weight_only_linear: I4 weight \"", w.name, "\" has K = ", s.K,
                " columns; packed int4 needs an even K");
    RTLLM_CHECK(node.attrs.contains("group_size"), "weight_only_linear: node of weight \"", w.name,
                "\" has no group_size attr");
    s.group_size = node.attrs.get_int("group_size", 0);
    RTLLM_CHECK(s.group_size > 0 && s.K % s.group_size == 0, "weight_only_linear: group_size ", s.group_size,
                " of weight \"", w.name, "\" must be a positive divisor of K = ", s.K);
    RTLLM_CHECK(!s.int4 || s.group_size % 2 == 0, "weight_only_linear: group_size ", s.group_size, " of I4 weight \"",
                w.name, "\" must be even (two codes per byte)");
    s.num_groups = s.K / s.group_size;
    for (size_t i = 2; i < num_fixed; ++i) {
      const TensorSpec& t = spec.inputs[i];
      const bool ok = t.shape.size() == 2 && t.shape[0].kind == Dim::Kind::kFixed && t.shape[0].value == s.N &&
                      t.shape[1].kind == Dim::Kind::kFixed && t.shape[1].value == s.num_groups;
      RTLLM_CHECK(ok, "weight_only_linear: ", i == 2 ? "scale" : "offset", " \"", t.name, "\" has shape ",
                  shape_string(t), ", expected [", s.N, ", ", s.num_groups, "] (N, K / group_size = ", s.K, " / ",
                  s.group_size, ")");
    }
    if (s.has_bias) {
      const TensorSpec& b = spec.inputs[s.bias_input];
      int64_t n = 1;
      for (const Dim& d : b.shape) n *= d.kind == Dim::Kind::kFixed ? d.value : -1;
      RTLLM_CHECK(n == s.N, "weight_only_linear: bias \"", b.name, "\" has shape ", shape_string(b), ", expected [",
                  s.N, "]");
    }
    // [num_tokens, K], or [num_logits, K] for an LM head
    s.max_rows = spec.backend->max_size(spec.inputs[0].shape.at(0));
    return s;
  }
};

}  // namespace rtllm
