// Weight-only integer linears (docs/engine_format.md, weight_only_linear): the tensor-core GEMV over the
// stored codes, and the dequantization of a whole weight for cuBLASLt's GEMM on larger batches.
#include "mma_gemv.cuh"
#include "rtllm/kernels/weight_only.cuh"
#include "weight_only_codes.cuh"

namespace rtllm::kernels {
namespace {

using namespace woq;  // NOLINT: the pair helpers of weight_only_codes.cuh

// ---- the int8 GEMV on tensor cores (mma_gemv.cuh) ----
//
// Each lane's 16-byte load of a weight row holds 16 consecutive codes of one quantization group (the group
// size is a multiple of 16), so it dequantizes them with one scale and offset: W = fma(q, s, o) in T, two
// weights per instruction, and feeds them as the MMAs' B operand: word i of the load = codes 4i .. 4i+3 in
// order; MMA i: b0 = (4i, 4i+1), b1 = (4i+2, 4i+3); a0 / a2 = x words (4i, 4i+1) / (4i+2, 4i+3), as loaded.
// The Codec of mma_gemv_kernel; `so` is the lane's group's (scale, offset), xg / xh the lane's activation
// words of token rows g and g + 8 (xh zeros when MA == 1). Even and odd MMAs alternate between two
// accumulators.
template <typename T>
struct Int8Codes {
  using Act = T;
  using Side = typename Pair<T>::T2;  // (scale, offset) of the lane's group: one group per 16-byte load
  static constexpr int kCodes = 16;
  struct Args {
    const T* scale;
    const T* offset;  // may be null
    int32_t vecs_per_group, num_groups;
  };
  struct Row {
    const T* scale;  // the row's groups
    const T* offset;
  };
  struct Step {
    int32_t group;  // of the lane's vectors (the same in every row)
    bool in_k;
  };
  static __device__ __forceinline__ Row row(const Args& a, int64_t r) {
    return {a.scale + r * a.num_groups, a.offset ? a.offset + r * a.num_groups : nullptr};
  }
  static __device__ __forceinline__ Step step(const Args& a, int32_t vec, bool in_k) {
    return {in_k ? vec / a.vecs_per_group : 0, in_k};  // one 32-bit division per step, for all tiles
  }
  // Past K: s = o = 0 keeps the product 0.
  static __device__ __forceinline__ Side side(const Row& r, const Step& st) {
    const T zero = from_float<T>(0.0f);
    return pair_of(st.in_k ? r.scale[st.group] : zero, st.in_k && r.offset ? r.offset[st.group] : zero);
  }
  static __device__ __forceinline__ void mmas(float (&acc)[2][4], const uint4& wv, Side so, const uint32_t* xg,
                                              const uint32_t* xh) {
    const auto s2 = low_twice(so), o2 = high_twice(so);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t u = word(wv, i) ^ 0x80808080u;
      const uint32_t b0 = as_u32(dequant2(int8_pair<T>(u, 0), s2, o2));
      const uint32_t b1 = as_u32(dequant2(int8_pair<T>(u, 2), s2, o2));
      mma_16x8x16<T>(acc[i & 1], xg[2 * i], xh[2 * i], xg[2 * i + 1], xh[2 * i + 1], b0, b1);
    }
  }
};

// ---- the int4 GEMV: weights as the MMAs' A operand ----
//
// The weights are the MMAs' A operand (16 weight rows: g and g + 8), the activations its B operand (8
// tokens), so up to 8 tokens fill an MMA: lane (g, t) takes 16 code bytes of rows g and g + 8 at the same
// 32 codes (vector 4·step + t of the rows: k = 128·step + 32t ..), and 32 activations of token g there (4
// 16-byte loads per block of 8 tokens). MMA (i, h) of word i: a0 / a2 = pairs 2h / 2h+1 of row g, a1 / a3
// those of row g + 8, b0 / b1 = the x words of the same codes; d0, d1 = row g, tokens 2t, 2t + 1; d2, d3 =
// row g + 8.
//
// kScaleSums (group_size a multiple of 128, per channel included): a quantization group spans whole
// steps, so a step's 8 MMAs all sum codes of one group; the codes enter the MMAs unscaled and the scale is
// applied to the step's sums: each pair of codes costs one AND/OR (int4_magic_pair) and no half-precision
// arithmetic. The magic-number value of a code is 128 + (q + 8) (bf16; 1024 + for fp16), so for one row and
// token a step sums
//   D = Σ x · (q + B) and S = Σ x (B = 136 bf16, 1032 fp16; exact products, float32 sums),
// and adds s · D + (o - B · s) · S = Σ x · (q · s + o) to its float32 accumulator: the weight q · s + o is
// never rounded to T. S comes from MMAs of the same activation fragments with all-ones weights.
// Otherwise (groups of 32 or 64 codes: each lane's 32 codes are one group, but a step's MMAs sum several)
// each pair is dequantized before its MMA, W = fma(q, s, o) rounded to T as the dequantize kernels do, and
// a last step that K fills only in part feeds zeros past K.
//
// Work split as mma_gemv_kernel (kMmaGemvWarps warps, KS of them splitting K, row groups of 16 weight
// rows, CTAs of up to 16 tokens, kMmaGemvLoadsInFlight 16-byte loads per lane in flight, partial sums
// added in warp order: deterministic, and a token's row does not depend on the other tokens). Weights,
// scales and offsets load U steps ahead into registers; the activations load at their step. (Streaming the
// weights through a cp.async ring in shared memory and loading the next step's activations one step early
// measured 1-8% slower on the H100 at Llama-3-8B's shapes, groups of 128.)
template <typename T>
struct Int4Sums;
template <>
struct Int4Sums<__nv_bfloat16> {
  static constexpr float kBias = 136.0f;          // 128 + 8
  static constexpr uint32_t kOnes = 0x3F803F80u;  // bf16x2 {1, 1}
};
template <>
struct Int4Sums<__half> {
  static constexpr float kBias = 1032.0f;         // 1024 + 8
  static constexpr uint32_t kOnes = 0x3C003C00u;  // f16x2 {1, 1}
};

// d = A · B with a zero accumulator in.
template <typename T>
__device__ __forceinline__ void mma_16x8x16_fresh(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  d[0] = d[1] = d[2] = d[3] = 0.0f;
  mma_16x8x16<T>(d, a0, a1, a2, a3, b0, b1);
}

// MB: blocks of 8 tokens (1 when m <= 8, else 2); KS: warps splitting K. The group of a lane's codes is
// (unit · group_mul) >> 32 with unit = the step (kScaleSums) or the lane's vector, group_mul = ceil(2^32 /
// units per group): exact for units and units per group below 2^16.
template <typename T, class Output, int MB, int KS, bool kScaleSums>
__global__ void __launch_bounds__(kMmaGemvWarps * 32, 2)
    int4_gemv_kernel(Output out, const T* x, const uint8_t* codes, const T* scale, const T* offset,
                     uint64_t group_mul, int32_t num_groups, int32_t m, int32_t n, int32_t k) {
  using T2 = typename Pair<T>::T2;
  static_assert(kMmaGemvWarps % KS == 0, "the row groups take whole warps");
  constexpr int U = kMmaGemvLoadsInFlight / 2, kGroups = kMmaGemvWarps / KS, kTokens = 8 * MB;
  __shared__ float partial[kMmaGemvWarps][16][kTokens];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int group = warp / KS, split = warp % KS;
  const int32_t n0 = (blockIdx.y * kGroups + group) * 16;
  const int32_t tok0 = blockIdx.x * kMmaGemvTokensPerBlock;
  const int32_t m_blk = min(m - tok0, kMmaGemvTokensPerBlock);
  const int32_t num_vecs = k / 32, num_steps = (num_vecs + 3) / 4;
  const int64_t row_bytes = k / 2;
  // Rows past n read row n - 1 and tokens past the block's read its last token: their sums are never stored.
  const int64_t rows[2] = {min(n0 + g, n - 1), min(n0 + g + 8, n - 1)};
  const uint8_t* w_lane[2];
  const T* s_row[2];
  const T* o_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    w_lane[r] = codes + rows[r] * row_bytes + 16 * t;
    s_row[r] = scale + rows[r] * num_groups;
    o_row[r] = offset ? offset + rows[r] * num_groups : nullptr;
  }
  const T* x_lane[MB];
#pragma unroll
  for (int i = 0; i < MB; ++i) x_lane[i] = x + (int64_t)(tok0 + min(8 * i + g, m_blk - 1)) * k + 32 * t;
  // Whether the lane's vector of step s is inside K (always with kScaleSums: K is whole steps then).
  auto in_k = [&](int32_t s) { return kScaleSums || 4 * s + t < num_vecs; };

  uint4 wv[U][2];
  T2 so[U][2];  // (scale, offset) of the rows' group; zeros past K, so that the step adds nothing there
  auto load_step = [&](int u, int32_t s) {  // s is the same in the whole warp
    if (s >= num_steps) return;
    const bool inside = in_k(s);
    const int32_t unit = kScaleSums ? s : 4 * s + t;
    const int32_t grp = inside ? (int32_t)(((uint64_t)unit * group_mul) >> 32) : 0;
    const T zero = from_float<T>(0.0f);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      wv[u][r] = inside ? load_stream16(w_lane[r] + 64 * (int64_t)s) : make_uint4(0, 0, 0, 0);
      so[u][r] = pair_of(inside ? s_row[r][grp] : zero, inside && o_row[r] ? o_row[r][grp] : zero);
    }
  };
#pragma unroll
  for (int u = 0; u < U; ++u) load_step(u, split + u * KS);  // constant data: before waiting for x's writer
  pdl_begin();
  float acc[MB][2][4];  // two chains per token block (kScaleSums: the scaled sums in chain 0)
#pragma unroll
  for (int i = 0; i < MB; ++i)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][c][j] = 0.0f;
  for (int32_t s0 = split; s0 < num_steps; s0 += U * KS) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t s = s0 + u * KS;
      if (s < num_steps) {
        const bool inside = in_k(s);
        uint4 xc[MB][4];  // token g (+ 8i): x at the lane's 32 codes, 8 per word i of the codes; zeros past K
#pragma unroll
        for (int i = 0; i < MB; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            xc[i][j] = inside ? __ldg(reinterpret_cast<const uint4*>(x_lane[i] + 128 * (int64_t)s + 8 * j))
                              : make_uint4(0, 0, 0, 0);
        if constexpr (kScaleSums) {
          float d[MB][2][4], sx[MB][2][4];  // [token block][even / odd h]: the step's sums, two chains each
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const uint32_t lo = word(wv[u][0], w), hi = word(wv[u][1], w);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint32_t a0 = int4_magic_pair<T>(lo, 2 * h), a1 = int4_magic_pair<T>(hi, 2 * h);
              const uint32_t a2 = int4_magic_pair<T>(lo, 2 * h + 1), a3 = int4_magic_pair<T>(hi, 2 * h + 1);
              constexpr uint32_t ones = Int4Sums<T>::kOnes;
#pragma unroll
              for (int i = 0; i < MB; ++i) {
                const uint32_t b0 = word(xc[i][w], 2 * h), b1 = word(xc[i][w], 2 * h + 1);
                if (w == 0) {
                  mma_16x8x16_fresh<T>(d[i][h], a0, a1, a2, a3, b0, b1);
                  mma_16x8x16_fresh<T>(sx[i][h], ones, ones, ones, ones, b0, b1);
                } else {
                  mma_16x8x16<T>(d[i][h], a0, a1, a2, a3, b0, b1);
                  mma_16x8x16<T>(sx[i][h], ones, ones, ones, ones, b0, b1);
                }
              }
            }
          }
          float sc[2], oc[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            sc[r] = to_float(so[u][r].x);
            oc[r] = fmaf(-Int4Sums<T>::kBias, sc[r], to_float(so[u][r].y));
          }
#pragma unroll
          for (int i = 0; i < MB; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const int r = j >> 1;  // d0, d1: row g; d2, d3: row g + 8 (the same tokens 2t, 2t + 1)
              const float dj = d[i][0][j] + d[i][1][j], sj = sx[i][0][j & 1] + sx[i][1][j & 1];
              acc[i][0][j] = fmaf(oc[r], sj, fmaf(sc[r], dj, acc[i][0][j]));
            }
        } else {
          const T2 s_lo = low_twice(so[u][0]), o_lo = high_twice(so[u][0]);
          const T2 s_hi = low_twice(so[u][1]), o_hi = high_twice(so[u][1]);
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const uint32_t lo = word(wv[u][0], w), hi = word(wv[u][1], w);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              uint32_t a[4];
              int4_a_fragment<T>(a, lo, hi, h, s_lo, o_lo, s_hi, o_hi);
#pragma unroll
              for (int i = 0; i < MB; ++i)
                mma_16x8x16<T>(acc[i][h], a[0], a[1], a[2], a[3], word(xc[i][w], 2 * h), word(xc[i][w], 2 * h + 1));
            }
          }
        }
      }
      load_step(u, s + U * KS);  // the slot's next step, in flight while the other slots' MMAs run
    }
  }
#pragma unroll
  for (int i = 0; i < MB; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      partial[warp][g + 8 * (j >> 1)][8 * i + 2 * t + (j & 1)] = acc[i][0][j] + acc[i][1][j];
  __syncthreads();
  for (int e = threadIdx.x; e < kGroups * 16 * kTokens; e += blockDim.x) {
    const int grp = e / (16 * kTokens), row = e / kTokens % 16, tok = e % kTokens;
    const int32_t col = (blockIdx.y * kGroups + grp) * 16 + row;
    if (tok >= m_blk || col >= n) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < KS; ++w) sum += partial[grp * KS + w][row][tok];
    out(sum, tok0 + tok, col);
  }
}

// Vectors of 32 codes (and so vectors per group, and steps) below 2^16, for the kernels' group index.
constexpr int32_t kMaxInt4GemvVecs = 1 << 16;

template <typename T, class Output>
void launch_int4_gemv(int32_t k_splits, const Output& out, const T* x, const uint8_t* codes, const T* scale,
                      const T* offset, int32_t m, int32_t n, int32_t k, int32_t group_size, cudaStream_t stream) {
  const bool scale_sums = group_size % 128 == 0;
  const uint64_t units_per_group = (uint64_t)group_size / (scale_sums ? 128 : 32);
  const uint64_t group_mul = ((uint64_t{1} << 32) + units_per_group - 1) / units_per_group;
  auto with_shape = [&](auto sums) {
    dispatch_mma_gemv_shape(m, k_splits, [&](auto mb, auto ks) {
      constexpr int MB = decltype(mb)::value, KS = decltype(ks)::value;
      const dim3 grid((unsigned)ceil_div(m, kMmaGemvTokensPerBlock), (unsigned)ceil_div(n, kMmaGemvWarps / KS * 16));
      launch_pdl(int4_gemv_kernel<T, Output, MB, KS, decltype(sums)::value>, grid, kMmaGemvWarps * 32, 0, stream, out,
                 x, codes, scale, offset, group_mul, k / group_size, m, n, k);
    });
  };
  if (scale_sums) with_shape(std::true_type{});
  else with_shape(std::false_type{});
}

template <typename T, typename TY, bool kInt4>
void launch_gemv(int32_t k_splits, void* y, const void* x, const void* codes, const void* scale, const void* offset,
                 const void* bias, int32_t m, int32_t n, int32_t k, int32_t group_size, cudaStream_t stream) {
  const BiasOutput<T, TY> out{static_cast<TY*>(y), static_cast<const T*>(bias), n};
  if constexpr (kInt4) {
    launch_int4_gemv<T>(k_splits, out, static_cast<const T*>(x), static_cast<const uint8_t*>(codes),
                        static_cast<const T*>(scale), static_cast<const T*>(offset), m, n, k, group_size, stream);
  } else {
    const typename Int8Codes<T>::Args args{static_cast<const T*>(scale), static_cast<const T*>(offset),
                                           group_size / 16, k / group_size};
    launch_mma_gemv<Int8Codes<T>>(k_splits, out, x, codes, args, m, n, k, stream);
  }
}

template <typename T, typename TY>
void launch_gemv_codes(bool int4, int32_t k_splits, void* y, const void* x, const void* codes, const void* scale,
                       const void* offset, const void* bias, int32_t m, int32_t n, int32_t k, int32_t group_size,
                       cudaStream_t stream) {
  if (int4) launch_gemv<T, TY, true>(k_splits, y, x, codes, scale, offset, bias, m, n, k, group_size, stream);
  else launch_gemv<T, TY, false>(k_splits, y, x, codes, scale, offset, bias, m, n, k, group_size, stream);
}

// ---- the whole weight, dequantized ----
//
// Any layout: one thread per code byte, two int4 codes (k, k + 1: even k, an even group size keeps them in
// one group) or one int8 code. Through dequant2(), as the GEMV.
template <typename T, bool kInt4>
__global__ void woq_dequantize_kernel(T* w, const uint8_t* codes, const T* scale, const T* offset, int64_t n,
                                      int64_t k, int64_t group_size) {
  using T2 = typename Pair<T>::T2;
  pdl_begin();
  const int64_t row_bytes = kInt4 ? k / 2 : k, total = n * row_bytes, num_groups = k / group_size;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / row_bytes, kk = kInt4 ? 2 * (i % row_bytes) : i % row_bytes;
    const int64_t sg = row * num_groups + kk / group_size;
    const T sv = scale[sg], ov = offset ? offset[sg] : T(0.0f);
    const T2 s2 = pair_of(sv, sv), o2 = pair_of(ov, ov);
    const uint32_t byte = codes[i];
    if constexpr (kInt4) {
      // byte ^ 0x88 in nibbles 0 (k) and 4 (k + 1) of a word: int4_pair's (j = 0) pair
      const uint32_t u = ((byte & 0xFu) | ((byte & 0xF0u) << 12)) ^ 0x00080008u;
      const T2 wk = dequant2(int4_pair<T>(u, 0), s2, o2);
      *reinterpret_cast<T2*>(w + row * k + kk) = wk;  // k even: 4-byte aligned
    } else {
      const T2 wk = dequant2(int8_pair<T>((byte ^ 0x80u) * 0x01010101u, 0), s2, o2);
      w[row * k + kk] = wk.x;
    }
  }
}

// The GEMV's layouts (rows of whole 16-byte vectors, one group per vector; int4 in the MMA layout): one
// thread per 16 code bytes, converted as the GEMV converts them and stored in k order as 16-byte vectors.
template <typename T, bool kInt4>
__global__ void woq_dequantize_vec_kernel(T* w, const uint8_t* codes, const T* scale, const T* offset, int64_t n,
                                          int64_t k, int64_t group_size) {
  constexpr int kCodes = kInt4 ? 32 : 16;
  pdl_begin();
  const int64_t vecs_per_row = k / kCodes, total = n * vecs_per_row, num_groups = k / group_size;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / vecs_per_row, k0 = (i % vecs_per_row) * kCodes;
    const int64_t sg = row * num_groups + k0 / group_size;
    const T sv = scale[sg], ov = offset ? offset[sg] : from_float<T>(0.0f);
    const auto s2 = pair_of(sv, sv), o2 = pair_of(ov, ov);
    const uint4 wv = load_stream16(codes + i * 16);
    T* out = w + row * k + k0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (kInt4) {
        // pairs 0 .. 3 of word j: its codes 8j .. 8j+7 in k order
        const uint32_t u = word(wv, j);
        const uint4 v = make_uint4(as_u32(dequant2(int4_pair<T>(u, 0), s2, o2)),
                                   as_u32(dequant2(int4_pair<T>(u, 1), s2, o2)),
                                   as_u32(dequant2(int4_pair<T>(u, 2), s2, o2)),
                                   as_u32(dequant2(int4_pair<T>(u, 3), s2, o2)));
        *reinterpret_cast<uint4*>(out + 8 * j) = v;
      } else {
        const uint32_t u = word(wv, j) ^ 0x80808080u;
        const uint2 v = make_uint2(as_u32(dequant2(int8_pair<T>(u, 0), s2, o2)),
                                   as_u32(dequant2(int8_pair<T>(u, 2), s2, o2)));
        *reinterpret_cast<uint2*>(out + 4 * j) = v;
      }
    }
  }
}

// y [m, n] (TY) = acc [m, n] (float32) + bias[n] (T), rounded once: the bias of the dequantize + GEMM path,
// added to cuBLASLt's float32 result as the GEMV adds it (acc may be y itself when TY is float32).
template <typename T, typename TY>
__global__ void woq_add_bias_kernel(TY* y, const float* acc, const T* bias, int64_t m, int64_t n) {
  pdl_begin();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < m * n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = from_float<TY>(acc[i] + to_float(bias[i % n]));
}

// The MMA layout, in place: each 32-bit word's codes c0 .. c7 (nibble i = c_i) become the nibbles
// c0+8, c2+8, c4+8, c6+8, c1+8, c3+8, c5+8, c7+8 (int4_magic_pair's pair j = codes 2j, 2j + 1).
__global__ void woq_pack_int4_kernel(uint32_t* words, int64_t num_words) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < num_words; i += (int64_t)gridDim.x * blockDim.x) {
    const uint32_t u = words[i] ^ 0x88888888u;
    uint32_t packed = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      packed |= ((u >> (8 * j)) & 0xFu) << (4 * j) | ((u >> (8 * j + 4)) & 0xFu) << (4 * j + 16);
    words[i] = packed;
  }
}

unsigned grid_for(int64_t items, int threads) {
  return (unsigned)std::min<int64_t>(std::max<int64_t>(ceil_div(items, threads), 1), 65535 * 4);
}

}  // namespace

bool woq_gemv_supported(int64_t k, int64_t group_size, bool int4) {
  const int64_t codes_per_vec = int4 ? 32 : 16;
  return k > 0 && group_size > 0 && k % group_size == 0 && k % codes_per_vec == 0 && group_size % codes_per_vec == 0 &&
         (!int4 || k / 32 < kMaxInt4GemvVecs);
}

int32_t woq_gemv_k_splits(int32_t n, int32_t k) {
  (void)k;
  return mma_gemv_k_splits(n);
}

cudaError_t woq_pack_int4(void* codes, int64_t num_bytes, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(codes && num_bytes >= 0 && num_bytes % 4 == 0 && (reinterpret_cast<uintptr_t>(codes) & 3) == 0);
  if (num_bytes == 0) return cudaSuccess;
  const int64_t num_words = num_bytes / 4;
  woq_pack_int4_kernel<<<grid_for(num_words, 256), 256, 0, stream>>>(static_cast<uint32_t*>(codes), num_words);
  return cudaGetLastError();
}

cudaError_t woq_gemv(void* y, const void* x, const void* codes, const void* scale, const void* offset,
                     const void* bias, int32_t m, int32_t n, int32_t k, int32_t group_size, bool int4, DType dtype,
                     DType y_dtype, cudaStream_t stream, int32_t k_splits) {
  RTLLM_KERNEL_CHECK(y && x && codes && scale && m >= 0 && n >= 0 && woq_gemv_supported(k, group_size, int4));
  RTLLM_KERNEL_CHECK(aligned16(x) && aligned16(codes));  // rows of x and codes are whole 16-byte vectors
  RTLLM_KERNEL_CHECK(y_dtype == dtype || y_dtype == DType::kFP32);
  RTLLM_KERNEL_CHECK(mma_gemv_rows_ok(n));
  RTLLM_KERNEL_CHECK(k_splits == 0 || k_splits == 1 || k_splits == 2 || k_splits == 4 || k_splits == 8);
  if (m == 0 || n == 0) return cudaSuccess;
  if (k_splits == 0) k_splits = woq_gemv_k_splits(n, k);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    if (y_dtype == DType::kFP32)
      launch_gemv_codes<T, float>(int4, k_splits, y, x, codes, scale, offset, bias, m, n, k, group_size, stream);
    else
      launch_gemv_codes<T, T>(int4, k_splits, y, x, codes, scale, offset, bias, m, n, k, group_size, stream);
  });
  return cudaGetLastError();
}

cudaError_t woq_dequantize(void* w, const void* codes, const void* scale, const void* offset, int32_t n, int32_t k,
                           int32_t group_size, bool int4, DType dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(w && codes && scale && n >= 0 && k > 0 && group_size > 0 && k % group_size == 0);
  RTLLM_KERNEL_CHECK(!int4 || (k % 2 == 0 && group_size % 2 == 0));
  RTLLM_KERNEL_CHECK(!int4 || (reinterpret_cast<uintptr_t>(w) & 3) == 0);
  if (n == 0) return cudaSuccess;
  // int4 codes of the GEMV's shapes are in the MMA layout, which only the vector kernel reads.
  RTLLM_KERNEL_CHECK(!(int4 && woq_gemv_supported(k, group_size, int4)) || (aligned16(w) && aligned16(codes)));
  if (woq_gemv_supported(k, group_size, int4) && aligned16(w) && aligned16(codes)) {
    const unsigned grid = grid_for((int64_t)n * (k / (int4 ? 32 : 16)), 256);
    RTLLM_DISPATCH_DTYPE(dtype, T, {
      if (int4)
        launch_pdl(woq_dequantize_vec_kernel<T, true>, grid, 256, 0, stream, static_cast<T*>(w),
                   static_cast<const uint8_t*>(codes), static_cast<const T*>(scale), static_cast<const T*>(offset),
                   (int64_t)n, (int64_t)k, (int64_t)group_size);
      else
        launch_pdl(woq_dequantize_vec_kernel<T, false>, grid, 256, 0, stream, static_cast<T*>(w),
                   static_cast<const uint8_t*>(codes), static_cast<const T*>(scale), static_cast<const T*>(offset),
                   (int64_t)n, (int64_t)k, (int64_t)group_size);
    });
    return cudaGetLastError();
  }
  const int64_t total = (int64_t)n * (int4 ? k / 2 : k);
  const unsigned grid = grid_for(total, 256);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    if (int4)
      launch_pdl(woq_dequantize_kernel<T, true>, grid, 256, 0, stream, static_cast<T*>(w),
                 static_cast<const uint8_t*>(codes), static_cast<const T*>(scale), static_cast<const T*>(offset),
                 (int64_t)n, (int64_t)k, (int64_t)group_size);
    else
      launch_pdl(woq_dequantize_kernel<T, false>, grid, 256, 0, stream, static_cast<T*>(w),
                 static_cast<const uint8_t*>(codes), static_cast<const T*>(scale), static_cast<const T*>(offset),
                 (int64_t)n, (int64_t)k, (int64_t)group_size);
  });
  return cudaGetLastError();
}

cudaError_t woq_add_bias(void* y, const float* acc, const void* bias, int32_t m, int32_t n, DType dtype,
                         DType y_dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(y && acc && bias && m >= 0 && n >= 0 && (y_dtype == dtype || y_dtype == DType::kFP32));
  if (m == 0 || n == 0) return cudaSuccess;
  const unsigned grid = grid_for((int64_t)m * n, 256);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    if (y_dtype == DType::kFP32)
      launch_pdl(woq_add_bias_kernel<T, float>, grid, 256, 0, stream, static_cast<float*>(y), acc,
                 static_cast<const T*>(bias), (int64_t)m, (int64_t)n);
    else
      launch_pdl(woq_add_bias_kernel<T, T>, grid, 256, 0, stream, static_cast<T*>(y), acc, static_cast<const T*>(bias),
                 (int64_t)m, (int64_t)n);
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
