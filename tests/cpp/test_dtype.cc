// bf16/fp16 conversions against independent references: the compiler's _Float16 conversions and a
// nearest-value search in double precision for bfloat16.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>

#include "rtllm/dtype.h"

namespace {

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t reference_fp16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

// Nearest bfloat16 to f (ties to even), chosen by comparing distances in double.
uint16_t reference_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t lo = static_cast<uint16_t>(u >> 16), hi = static_cast<uint16_t>(lo + 1);
  double dlo = std::fabs(static_cast<double>(bits_to_float(uint32_t{lo} << 16)) - f);
  // Rounding past the largest finite value gives inf, which IEEE rounding treats as 2^128 here.
  double hi_value = (hi & 0x7FFF) == 0x7F80 ? std::ldexp(f < 0 ? -1.0 : 1.0, 128)
                                            : static_cast<double>(bits_to_float(uint32_t{hi} << 16));
  double dhi = std::fabs(hi_value - f);
  if ((lo & 0x7F80) == 0x7F80) return lo;  // inf (NaN is excluded by the callers)
  if (dhi < dlo || (dhi == dlo && (lo & 1))) return hi;
  return lo;
}

std::vector<float> sample_floats() {
  std::mt19937 rng(1234);
  std::vector<float> values = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, 70000.0f, 1e-8f, 3e-8f,
                               5.96e-8f, 6.1e-5f, 1e30f, -1e-30f, INFINITY, -INFINITY};
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 200000; ++i) {
    float f = bits_to_float(any_bits(rng));
    if (!std::isnan(f)) values.push_back(f);
  }
  std::uniform_real_distribution<float> small(-70000.0f, 70000.0f);
  for (int i = 0; i < 200000; ++i) values.push_back(small(rng) * std::pow(2.0f, -static_cast<float>(i % 40)));
  return values;
}

}  // namespace

TEST(DType, Sizes) {
  EXPECT_EQ(rtllm::dtype_size(rtllm::DataType::kBFloat16), 2u);
  EXPECT_EQ(rtllm::dtype_size(rtllm::DataType::kInt64), 8u);
  EXPECT_EQ(rtllm::parse_dtype("BF16"), rtllm::DataType::kBFloat16);
  EXPECT_EQ(rtllm::parse_dtype("float16"), rtllm::DataType::kFloat16);
  EXPECT_STREQ(rtllm::dtype_safetensors_name(rtllm::parse_dtype("int32")), "I32");
  EXPECT_THROW(rtllm::parse_dtype("float8"), rtllm::InvalidArgument);
}

TEST(DType, Fp16DecodeEveryPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 ref;
    uint16_t bits = static_cast<uint16_t>(h);
    std::memcpy(&ref, &bits, 2);
    float got = rtllm::fp16_to_float(bits);
    if (std::isnan(static_cast<float>(ref))) {
      EXPECT_TRUE(std::isnan(got)) << h;
      continue;
    }
    EXPECT_EQ(got, static_cast<float>(ref)) << h;
    EXPECT_EQ(rtllm::float_to_fp16(got), bits) << h;  // exact values round-trip
  }
}

TEST(DType, Fp16EncodeRoundsToNearestEven) {
  for (float f : sample_floats()) ASSERT_EQ(rtllm::float_to_fp16(f), reference_fp16(f)) << f;
  EXPECT_TRUE(std::isnan(rtllm::fp16_to_float(rtllm::float_to_fp16(NAN))));
}

TEST(DType, Bf16) {
  for (float f : sample_floats()) ASSERT_EQ(rtllm::float_to_bf16(f), reference_bf16(f)) << f;
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = rtllm::bf16_to_float(static_cast<uint16_t>(h));
    uint32_t f_bits;
    std::memcpy(&f_bits, &f, 4);
    EXPECT_EQ(f_bits, h << 16) << h;
    if (!std::isnan(f)) EXPECT_EQ(rtllm::float_to_bf16(f), h) << h;
  }
  EXPECT_TRUE(std::isnan(rtllm::bf16_to_float(rtllm::float_to_bf16(NAN))));
  EXPECT_EQ(rtllm::float_to_bf16(1.0f + 1.0f / 256.0f), 0x3F80);  // tie to even (down)
  EXPECT_EQ(rtllm::float_to_bf16(1.0f + 3.0f / 256.0f), 0x3F82);  // tie to even (up)
}

// FP8 against values worked out from the formats' definitions (the Python tests compare every code and
// random values with torch's casts).
TEST(DType, Fp8KnownValues) {
  EXPECT_EQ(rtllm::float_to_fp8_e4m3(448.0f), 0x7E);                  // largest finite
  EXPECT_EQ(rtllm::float_to_fp8_e4m3(-1e9f), 0xFE);                   // saturates
  EXPECT_EQ(rtllm::float_to_fp8_e4m3(INFINITY), 0x7E);
  EXPECT_EQ(rtllm::float_to_fp8_e4m3(std::ldexp(1.0f, -9)), 0x01);    // smallest subnormal
  EXPECT_EQ(rtllm::float_to_fp8_e4m3(std::ldexp(1.0f, -10)), 0x00);   // half of it: tie to even (zero)
  EXPECT_EQ(rtllm::float_to_fp8_e4m3(1.0f + 1.0f / 16.0f), 0x38);     // 1 + half an ulp: tie to even
  EXPECT_EQ(rtllm::float_to_fp8_e4m3(1.0f + 3.0f / 16.0f), 0x3A);     // 1 + 1.5 ulp: tie to even (up)
  EXPECT_TRUE(std::isnan(rtllm::fp8_e4m3_to_float(0x7F)));
  EXPECT_EQ(rtllm::fp8_e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(rtllm::fp8_e5m2_to_float(0x7B), 57344.0f);
  EXPECT_TRUE(std::isinf(rtllm::fp8_e5m2_to_float(0x7C)));
  EXPECT_EQ(rtllm::float_to_fp8_e5m2(INFINITY), 0x7B);
  EXPECT_EQ(rtllm::float_to_fp8_e5m2(std::ldexp(1.0f, -16)), 0x01);   // smallest subnormal
  for (int code = 0; code < 256; ++code) {  // every finite code round-trips
    const float e4 = rtllm::fp8_e4m3_to_float(static_cast<uint8_t>(code));
    const float e5 = rtllm::fp8_e5m2_to_float(static_cast<uint8_t>(code));
    if (!std::isnan(e4)) EXPECT_EQ(rtllm::float_to_fp8_e4m3(e4), code) << code;
    if (std::isfinite(e5)) EXPECT_EQ(rtllm::float_to_fp8_e5m2(e5), code) << code;
  }
}

TEST(DType, Int4PacksTwoPerByte) {
  uint8_t packed[3] = {0xAA, 0xAA, 0xAA};
  const int values[5] = {-8, 7, 0, -1, 3};
  for (int i = 0; i < 5; ++i) rtllm::int4_set(packed, i, values[i]);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(rtllm::int4_get(packed, i), values[i]) << i;
  EXPECT_EQ(packed[0], 0x78);        // -8 in the low nibble, 7 in the high one
  EXPECT_EQ(packed[2] >> 4, 0xA);    // the unused high nibble of the last byte is untouched
  EXPECT_THROW(rtllm::int4_set(packed, 0, 8), rtllm::InvalidArgument);
  EXPECT_EQ(rtllm::dtype_num_bytes(rtllm::DataType::kInt4, 5), 3u);
  EXPECT_EQ(rtllm::dtype_bits(rtllm::DataType::kInt4), 4);
  EXPECT_THROW(rtllm::dtype_size(rtllm::DataType::kInt4), rtllm::Error);
  EXPECT_EQ(rtllm::parse_dtype("F8_E4M3"), rtllm::DataType::kFloat8E4M3);
  EXPECT_EQ(rtllm::parse_dtype("int4"), rtllm::DataType::kInt4);
}
