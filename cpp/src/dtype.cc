#include "rtllm/dtype.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace rtllm {

int dtype_bits(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return 32;
    case DataType::kFloat16: return 16;
    case DataType::kBFloat16: return 16;
    case DataType::kInt32: return 32;
    case DataType::kInt64: return 64;
    case DataType::kInt8: return 8;
    case DataType::kUInt8: return 8;
    case DataType::kBool: return 8;
    case DataType::kFloat8E4M3: return 8;
    case DataType::kFloat8E5M2: return 8;
    case DataType::kInt4: return 4;
  }
  RTLLM_CHECK(false, "unknown dtype ", static_cast<int>(dtype));
}

size_t dtype_size(DataType dtype) {
  const int bits = dtype_bits(dtype);
  RTLLM_CHECK(bits % 8 == 0, "dtype ", dtype_safetensors_name(dtype), " packs ", bits,
              "-bit values: it has no element size (use dtype_num_bytes)");
  return static_cast<size_t>(bits / 8);
}

size_t dtype_num_bytes(DataType dtype, int64_t num_elements) {
  return (static_cast<size_t>(num_elements) * dtype_bits(dtype) + 7) / 8;
}

bool dtype_is_float(DataType dtype) {
  return dtype == DataType::kFloat32 || dtype == DataType::kFloat16 || dtype == DataType::kBFloat16 ||
         dtype == DataType::kFloat8E4M3 || dtype == DataType::kFloat8E5M2;
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
    case DataType::kFloat8E4M3: return "F8_E4M3";
    case DataType::kFloat8E5M2: return "F8_E5M2";
    case DataType::kInt4: return "I4";
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
      {"F8_E4M3", "float8_e4m3", DataType::kFloat8E4M3}, {"F8_E5M2", "float8_e5m2", DataType::kFloat8E5M2},
      {"I4", "int4", DataType::kInt4},
  };
  for (const Entry& e : kEntries)
    if (name == e.safetensors || name == e.config) return e.dtype;
  RTLLM_CHECK_ARG(false, "unknown dtype \"", name,
                  "\" (known: float32/F32, float16/F16, bfloat16/BF16, int32/I32, int64/I64, int8/I8, "
                  "uint8/U8, bool/BOOL, float8_e4m3/F8_E4M3, float8_e5m2/F8_E5M2, int4/I4)");
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

namespace {

// An 8-bit float with kExpBits exponent bits (bias 2^(kExpBits-1) - 1) and kManBits mantissa bits.
// E4M3 spends the all-ones exponent on normal values (only S.1111.111 is NaN); E5M2 reserves it for
// infinities and NaNs, as IEEE formats do.
template <int kExpBits, int kManBits, bool kIeeeSpecials>
struct Fp8Format {
  static constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  static constexpr int kMaxExpField = (1 << kExpBits) - 1;
  // The largest finite code (without sign): E4M3 0x7E (448), E5M2 0x7B (57344).
  static constexpr uint8_t kMaxFinite =
      kIeeeSpecials ? static_cast<uint8_t>(((kMaxExpField - 1) << kManBits) | ((1 << kManBits) - 1)) : 0x7E;
  static constexpr uint8_t kNan = 0x7F;

  static float decode(uint8_t v) {
    const bool negative = v & 0x80;
    const int exp = (v >> kManBits) & kMaxExpField, man = v & ((1 << kManBits) - 1);
    float out;
    if (kIeeeSpecials && exp == kMaxExpField) {
      out = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    } else if (!kIeeeSpecials && exp == kMaxExpField && man == (1 << kManBits) - 1) {
      out = std::numeric_limits<float>::quiet_NaN();
    } else if (exp == 0) {
      out = std::ldexp(static_cast<float>(man), 1 - kBias - kManBits);  // subnormal
    } else {
      out = std::ldexp(1.0f + std::ldexp(static_cast<float>(man), -kManBits), exp - kBias);
    }
    return negative ? -out : out;
  }

  static uint8_t encode(float v) {
    const uint8_t sign = std::signbit(v) ? 0x80 : 0;
    if (std::isnan(v)) return sign | kNan;
    if (std::isinf(v)) return sign | kMaxFinite;  // satfinite: infinities saturate too
    const double a = std::fabs(static_cast<double>(v));
    if (a == 0.0) return sign;
    int exp2 = 0;
    std::frexp(a, &exp2);  // a = f · 2^exp2, f in [0.5, 1): the leading bit has weight 2^(exp2 - 1)
    // Units of the last place at a's binade, never finer than the subnormal spacing.
    const int ulp_exp = std::max(exp2 - 1, 1 - kBias) - kManBits;
    const double q = std::nearbyint(std::ldexp(a, -ulp_exp));  // round to nearest even (default mode)
    // q counts ulps; in the normal range q is in [2^kManBits, 2^(kManBits+1)], the top one carrying
    // into the next binade, which the code arithmetic below handles.
    uint32_t code;
    if (ulp_exp == 1 - kBias - kManBits && q < (1 << kManBits)) {
      code = static_cast<uint32_t>(q);  // subnormal (or zero)
    } else {
      const int e = ulp_exp + kManBits + kBias;  // exponent field of the binade
      code = (static_cast<uint32_t>(e) << kManBits) + (static_cast<uint32_t>(q) - (1u << kManBits));
    }
    return sign | static_cast<uint8_t>(std::min<uint32_t>(code, kMaxFinite));
  }
};

using E4M3 = Fp8Format<4, 3, false>;
using E5M2 = Fp8Format<5, 2, true>;

float load_float(const uint8_t* p, DataType dtype) {
  uint16_t h;
  switch (dtype) {
    case DataType::kFloat32: {
      float v;
      std::memcpy(&v, p, 4);
      return v;
    }
    case DataType::kFloat16: std::memcpy(&h, p, 2); return fp16_to_float(h);
    case DataType::kBFloat16: std::memcpy(&h, p, 2); return bf16_to_float(h);
    case DataType::kFloat8E4M3: return E4M3::decode(*p);
    case DataType::kFloat8E5M2: return E5M2::decode(*p);
    default: RTLLM_CHECK(false, "not a float dtype: ", dtype_safetensors_name(dtype));
  }
}

void store_float(uint8_t* p, DataType dtype, float v) {
  uint16_t h;
  switch (dtype) {
    case DataType::kFloat32: std::memcpy(p, &v, 4); return;
    case DataType::kFloat16: h = float_to_fp16(v); std::memcpy(p, &h, 2); return;
    case DataType::kBFloat16: h = float_to_bf16(v); std::memcpy(p, &h, 2); return;
    case DataType::kFloat8E4M3: *p = E4M3::encode(v); return;
    case DataType::kFloat8E5M2: *p = E5M2::encode(v); return;
    default: RTLLM_CHECK(false, "not a float dtype: ", dtype_safetensors_name(dtype));
  }
}

}  // namespace

float fp8_e4m3_to_float(uint8_t v) { return E4M3::decode(v); }
uint8_t float_to_fp8_e4m3(float v) { return E4M3::encode(v); }
float fp8_e5m2_to_float(uint8_t v) { return E5M2::decode(v); }
uint8_t float_to_fp8_e5m2(float v) { return E5M2::encode(v); }

int int4_get(const uint8_t* packed, int64_t i) {
  const int nibble = (packed[i / 2] >> ((i % 2) * 4)) & 0xF;
  return nibble >= 8 ? nibble - 16 : nibble;
}

void int4_set(uint8_t* packed, int64_t i, int value) {
  RTLLM_CHECK_ARG(value >= -8 && value <= 7, "int4 value ", value, " outside [-8, 7]");
  const int shift = (i % 2) * 4;
  uint8_t& byte = packed[i / 2];
  byte = static_cast<uint8_t>((byte & ~(0xF << shift)) | ((value & 0xF) << shift));
}

void convert_floats(const void* src, DataType src_dtype, void* dst, DataType dst_dtype, int64_t n) {
  RTLLM_CHECK_ARG(dtype_is_float(src_dtype) && dtype_is_float(dst_dtype), "cannot convert ",
                  dtype_safetensors_name(src_dtype), " to ", dtype_safetensors_name(dst_dtype),
                  ": only F32, F16, BF16, F8_E4M3 and F8_E5M2 convert");
  const auto* s = static_cast<const uint8_t*>(src);
  auto* d = static_cast<uint8_t*>(dst);
  const size_t s_size = dtype_size(src_dtype), d_size = dtype_size(dst_dtype);
  if (src_dtype == dst_dtype) {
    std::memcpy(d, s, n * s_size);
    return;
  }
  for (int64_t i = 0; i < n; ++i) store_float(d + i * d_size, dst_dtype, load_float(s + i * s_size, src_dtype));
}

}  // namespace rtllm
