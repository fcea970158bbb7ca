// Element types of weights, activations and the KV cache.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "rtllm/common.h"

namespace rtllm {

// kFloat8E4M3 is OCP FP8 E4M3 ("fn": no infinities, max 448, one NaN pattern per sign); kFloat8E5M2
// is IEEE-like (max 57344, infinities). kInt4 holds signed 4-bit values packed two per byte along
// the innermost dim, the even index in the low nibble; its shape counts values, not bytes.
enum class DataType : int32_t {
  kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kInt8, kUInt8, kBool, kFloat8E4M3, kFloat8E5M2, kInt4
};

RTLLM_API int dtype_bits(DataType dtype);
// Bytes of one element; throws Error for kInt4 (sub-byte: use dtype_num_bytes).
RTLLM_API size_t dtype_size(DataType dtype);
// Bytes of num_elements packed elements (kInt4: two per byte, rounded up).
RTLLM_API size_t dtype_num_bytes(DataType dtype, int64_t num_elements);
RTLLM_API bool dtype_is_float(DataType dtype);  // F32, F16, BF16 and both FP8 formats
// Names as in safetensors headers: "F32", "F16", "BF16", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3",
// "F8_E5M2"; "I4" for kInt4, which safetensors files store as U8 bytes (docs/engine_format.md).
RTLLM_API const char* dtype_safetensors_name(DataType dtype);
// Accepts safetensors names and the lower-case names of config files ("float32", "bfloat16",
// "float8_e4m3", "int4", ...). Throws InvalidArgument naming the unknown string.
RTLLM_API DataType parse_dtype(const std::string& name);

// Scalar conversions used by CPU ops (round to nearest even on narrowing).
RTLLM_API float bf16_to_float(uint16_t v);
RTLLM_API uint16_t float_to_bf16(float v);
RTLLM_API float fp16_to_float(uint16_t v);
RTLLM_API uint16_t float_to_fp16(float v);
// FP8: exact widening; narrowing rounds to nearest even and saturates finite values to the largest
// finite magnitude (448 for E4M3, 57344 for E5M2), infinities included, as CUDA's cvt.rn.satfinite
// does; NaN stays NaN.
RTLLM_API float fp8_e4m3_to_float(uint8_t v);
RTLLM_API uint8_t float_to_fp8_e4m3(float v);
RTLLM_API float fp8_e5m2_to_float(uint8_t v);
RTLLM_API uint8_t float_to_fp8_e5m2(float v);
// Packed int4: value i of a row lives in byte i / 2, low nibble for even i; two's complement [-8, 7].
RTLLM_API int int4_get(const uint8_t* packed, int64_t i);
RTLLM_API void int4_set(uint8_t* packed, int64_t i, int value);  // value must be in [-8, 7]

// Converts n values between float dtypes (F32, F16, BF16, F8_E4M3, F8_E5M2), widening exactly and
// narrowing once (rules above). Throws InvalidArgument naming the dtypes for any other pair.
RTLLM_API void convert_floats(const void* src, DataType src_dtype, void* dst, DataType dst_dtype, int64_t n);

}  // namespace rtllm
