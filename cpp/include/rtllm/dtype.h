// Element types of weights, activations and the KV cache.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "rtllm/common.h"

namespace rtllm {

enum class DataType : int32_t { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kInt8, kUInt8, kBool };

RTLLM_API size_t dtype_size(DataType dtype);
// Names as in safetensors headers: "F32", "F16", "BF16", "I32", "I64", "I8", "U8", "BOOL".
RTLLM_API const char* dtype_safetensors_name(DataType dtype);
// Accepts safetensors names and the lower-case names of config files ("float32", "bfloat16", ...).
// Throws InvalidArgument naming the unknown string.
RTLLM_API DataType parse_dtype(const std::string& name);

// Scalar conversions used by CPU ops (round to nearest even on narrowing).
RTLLM_API float bf16_to_float(uint16_t v);
RTLLM_API uint16_t float_to_bf16(float v);
RTLLM_API float fp16_to_float(uint16_t v);
RTLLM_API uint16_t float_to_fp16(float v);

}  // namespace rtllm
