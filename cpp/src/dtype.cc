#include "rtllm/dtype.h"

#include <cstring>

namespace rtllm {

size_t dtype_size(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return 4;
    case DataType::kFloat16: return 2;
    case DataType::kBFloat16: return 2;
    case DataType::kInt32: return 4;
    case DataType::kInt64: return 8;
    case DataType::kInt8: return 1;
    case DataType::kUInt8: return 1;
    case DataType::kBool: return 1;
  }
  RTLLM_CHECK(false, "unknown dtype ", static_cast<int>(dtype));
}

const char* dtype_safetensors_name(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return "F32";
    case DataType::kFloat16: return "F16";
    case DataType::kBFloat16: return "BF16";
    case DataType::kInt32: return "I32";
    case DataType::kInt64: return "I64";
    case DataType::kInt8: return "I8";
    case DataType::kUInt8: return "U8";
    case DataType::kBool: return "BOOL";
  }
  RTLLM_CHECK(false, "unknown dtype ", static_cast<int>(dtype));
}

DataType parse_dtype(const std::string& name) {
  struct Entry {
    const char* safetensors;
    const char* config;
    DataType dtype;
  };
  static const Entry kEntries[] = {
      {"F32", "float32", DataType::kFloat32}, {"F16", "float16", DataType::kFloat16},
      {"BF16", "bfloat16", DataType::kBFloat16}, {"I32", "int32", DataType::kInt32},
      {"I64", "int64", DataType::kInt64},     {"I8", "int8", DataType::kInt8},
      {"U8", "uint8", DataType::kUInt8},      {"BOOL", "bool", DataType::kBool},
  };
  for (const Entry& e : kEntries)
    if (name == e.safetensors || name == e.config) return e.dtype;
  RTLLM_CHECK_ARG(false, "unknown dtype \"", name,
                  "\" (known: float32/F32, float16/F16, bfloat16/BF16, int32/I32, int64/I64, int8/I8, "
                  "uint8/U8, bool/BOOL)");
  return DataType::kFloat32;
}

namespace {
uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
float bits_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
}  // namespace

float bf16_to_float(uint16_t v) { return bits_float(static_cast<uint32_t>(v) << 16); }

uint16_t float_to_bf16(float v) {
  uint32_t u = float_bits(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  // Round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate.
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float fp16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float32.
    float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t float_to_fp16(float v) {
  uint32_t u = float_bits(v);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00u;  // NaN
  if (abs >= 0x47800000u) {                      // >= 65536 (rounds to inf) or inf
    // Values in [65520, 65536) round to inf too; those below round to 65504.
    return sign | 0x7C00u;
  }
  int32_t exp = static_cast<int32_t>(abs >> 23) - 127;
  uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;  // with the implicit bit
  if (exp < -25) return sign;                     // below half the smallest subnormal: zero
  // Number of mantissa bits to drop so that the result has 10 stored bits (more for subnormals).
  int32_t shift = exp >= -14 ? 13 : 13 + (-14 - exp);
  uint32_t kept = mant >> shift;
  uint32_t rem = mant & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (kept & 1u))) ++kept;
  if (exp >= -14) {
    // kept has the implicit bit at 2^10; a carry to 2^11 bumps the exponent, which the add handles.
    uint32_t bits = (static_cast<uint32_t>(exp + 15) << 10) + (kept - 0x400u);
    return sign | static_cast<uint16_t>(bits);  // may become 0x7C00 (inf) on overflow: correct
  }
  return sign | static_cast<uint16_t>(kept);  // subnormal; a carry into 0x400 is the smallest normal
}

}  // namespace rtllm
