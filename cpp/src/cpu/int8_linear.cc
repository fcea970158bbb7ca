// int8_linear: y[T, N] = x[T, K] · W[N, K]ᵀ with int8 weights scaled per output channel and the
// activations quantized to int8 per token at run time (W8A8_SQ_PER_CHANNEL, SmoothQuant). The CPU
// reference of the semantics in docs/engine_format.md, float32 unless said otherwise:
//   xs[t, k] = x[t, k] · pre_quant_scale[k]                   (x itself without has_pre_quant_scale)
//   a_scale[t] = amax_k |xs[t, k]| / 127                      (1 for a row of zeros)
//   qa[t, k] = clamp(round_half_even(xs[t, k] / a_scale[t]), -127, 127)
//   acc[t, n] = sum_k qa[t, k] · w[n, k]                       (exact, int32)
//   y[t, n] = float(acc) · a_scale[t] · weight_scale[n] (+ bias[n])
// The integer sum is exact, so its order is free: the SIMD paths (AVX-512 VNNI vpdpbusd, AVX2
// vpmaddubsw + vpmaddwd, scalar) give the same y, and a token's result does not depend on its batch.
// The unsigned-by-signed byte products take |qa| and w · sign(qa); this needs w != -128 (the builder's
// codes are in [-127, 127]), which the first step checks.
//
// Workspace: the quantized activations int8 [T, K] and their scales float32 [T].
#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "int8_linear_spec.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

constexpr float kInt8Max = 127.0f;
constexpr int64_t kBlockTokens = 64;  // tokens per task: their codes stay in L2 while the rows stream
constexpr int64_t kBlockCols = 16;    // weight rows per task

// sum_k a[k] · b[k] of int8 codes, exact in int32; a in [-127, 127], b != -128.
inline int32_t dot_i8(const int8_t* a, const int8_t* b, int64_t K) {
  int64_t k = 0;
  int32_t sum = 0;
#if defined(__AVX2__)
  __m256i acc = _mm256_setzero_si256();
  for (; k + 32 <= K; k += 32) {
    const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k));
    const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k));
    const __m256i ua = _mm256_sign_epi8(va, va);  // |a| as unsigned bytes
    const __m256i sb = _mm256_sign_epi8(vb, va);  // b · sign(a): |a| · sb = a · b
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    acc = _mm256_dpbusd_epi32(acc, ua, sb);
#elif defined(__AVXVNNI__)
    acc = _mm256_dpbusd_avx_epi32(acc, ua, sb);
#else
    // pairs of products: |2 · 127 · 127| = 32258 fits int16 without saturating
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ua, sb), _mm256_set1_epi16(1)));
#endif
  }
  const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
#endif
  for (; k < K; ++k) sum += static_cast<int32_t>(a[k]) * static_cast<int32_t>(b[k]);
  return sum;
}

class Int8Linear final : public OpKind {
 public:
  explicit Int8Linear(const OpSpec& spec) : OpKind(spec), s_(Int8LinearShape::parse(spec, {DataType::kFloat32})) {}

  WeightPlacement weight_placement(size_t input) const override {
    if (s_.has_bias && input == s_.bias_input) return {DataType::kFloat32, WeightLayout::kRowMajor};
    return OpKind::weight_placement(input);  // codes and float32 scales as stored
  }

  size_t workspace_bytes() const override {
    const size_t codes = (static_cast<size_t>(s_.max_rows) * s_.K + 63) / 64 * 64;
    return codes + sizeof(float) * static_cast<size_t>(s_.max_rows);
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &w_scale = in[2], &y = out[0];
    const int64_t T = x.rows(), K = x.cols(), N = y.cols();
    RTLLM_CHECK(K == s_.K && N == s_.N && y.rows() == T, "int8_linear: x [", T, ", ", K, "] -> y [", y.rows(), ", ",
                N, "] does not match the weight [", s_.N, ", ", s_.K, "]");
    RTLLM_CHECK(T <= s_.max_rows, "int8_linear: x has ", T, " rows, more than the ", s_.max_rows, " planned at load");
    const auto* codes = static_cast<const int8_t*>(w.data);
    if (!checked_codes_) {  // once: the weights are immutable after load
      const int64_t bad = std::find(codes, codes + N * K, static_cast<int8_t>(-128)) - codes;
      RTLLM_CHECK(bad == N * K, "int8_linear: weight \"", spec_.inputs[1].name, "\" holds the code -128 at [",
                  bad / std::max<int64_t>(K, 1), ", ", bad % std::max<int64_t>(K, 1),
                  "]; int8_linear codes must lie in [-127, 127]");
      checked_codes_ = true;
    }
    const float* pqs = s_.has_pre_quant_scale ? in[s_.pre_quant_scale_input].f32() : nullptr;
    const float* bias = s_.has_bias ? in[s_.bias_input].f32() : nullptr;
    auto* qa = static_cast<int8_t*>(ctx.workspace);  // [T, K]
    auto* a_scale = reinterpret_cast<float*>(static_cast<uint8_t*>(ctx.workspace) +
                                             (static_cast<size_t>(s_.max_rows) * K + 63) / 64 * 64);  // [T]
    quantize_tokens(*ctx.pool, x.f32(), pqs, T, K, qa, a_scale);
    gemm(*ctx.pool, qa, a_scale, codes, w_scale.f32(), bias, y.f32(), T, K, N);
  }

 private:
  // qa[t] = int8 codes of x[t] · pqs, a_scale[t] their scale (the formulas above).
  static void quantize_tokens(ThreadPool& pool, const float* x, const float* pqs, int64_t T, int64_t K, int8_t* qa,
                              float* a_scale) {
    pool.parallel_for(T, [&](int64_t t, int) {
      const float* row = x + t * K;
      int8_t* q = qa + t * K;
      float amax = 0.0f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(pqs ? row[k] * pqs[k] : row[k]));
      const float s = amax > 0.0f ? amax / kInt8Max : 1.0f;
      a_scale[t] = s;
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::nearbyint((pqs ? row[k] * pqs[k] : row[k]) / s);  // ties to even
        q[k] = static_cast<int8_t>(std::min(kInt8Max, std::max(-kInt8Max, v)));
      }
    }, 4 * K);
  }

  // Task = (block of tokens, block of weight rows): each row is dotted with every token of the block.
  static void gemm(ThreadPool& pool, const int8_t* qa, const float* a_scale, const int8_t* w, const float* w_scale,
                   const float* bias, float* y, int64_t T, int64_t K, int64_t N) {
    const int64_t num_row_tasks = (T + kBlockTokens - 1) / kBlockTokens;
    const int64_t num_col_tasks = (N + kBlockCols - 1) / kBlockCols;
    pool.parallel_for(num_row_tasks * num_col_tasks, [&](int64_t task, int) {
      const int64_t t0 = (task / num_col_tasks) * kBlockTokens, t1 = std::min(T, t0 + kBlockTokens);
      const int64_t n0 = (task % num_col_tasks) * kBlockCols, n1 = std::min(N, n0 + kBlockCols);
      for (int64_t n = n0; n < n1; ++n) {
        const int8_t* w_row = w + n * K;
        for (int64_t t = t0; t < t1; ++t) {
          float v = static_cast<float>(dot_i8(qa + t * K, w_row, K)) * a_scale[t] * w_scale[n];
          if (bias) v += bias[n];
          y[t * N + n] = v;
        }
      }
    }, std::min(T, kBlockTokens) * std::min(N, kBlockCols) * K / 4);
  }

  const Int8LinearShape s_;
  bool checked_codes_ = false;
};

}  // namespace

void register_cpu_int8_linear_ops() { register_op("int8_linear", DeviceKind::kCpu, make_op<Int8Linear>); }

}  // namespace rtllm
