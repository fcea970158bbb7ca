// The small-M linear on tensor cores, shared by the bf16/fp16 GEMV (gemv.cu), the weight-only integer
// GEMV (weight_only.cu) and the FP8 GEMV (fp8.cu): y [m, n] = x [m, k] · W [n, k]ᵀ, bound by streaming
// W once. The three differ only in how a lane's 16 weight bytes become MMA operands (a Codec) and in
// what is done with each float32 sum (an Output); the loads, the split of K and the reduction are here.
//
// mma.sync m16n8k16 (bf16 / f16), with g = lane / 4 and t = lane % 4 (PTX ISA,
// "Matrix Fragments for mma.m16n8k16"; the low half or byte of a register is the lower index):
//   A (16 x 16):              a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//                              a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8):               b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   D (16 x 8 float32):       d0, d1 = D[g][2t, 2t+1]; d2, d3 = D[g+8][2t, 2t+1]
// A's rows are tokens, B's columns weight rows. The k slots of an MMA only need to hold the same k in A and
// B, so lane (g, t) feeds its B slots from one 16-byte load of weight row g: bytes [16t, 16t + 16) of a
// 64-byte step of the row (the engine's row-major layout, as stored), Codec::kCodes consecutive weights from
// k0 = (4·step + t)·kCodes, and its A slots from the activations of tokens g and g + 8 at the same k (one
// or more 16-byte loads, permuted as the Codec needs).
//
// Work split: a CTA's kMmaGemvWarps warps form kMmaGemvWarps / KS row groups of KS warps. A row group owns
// NT · 8 weight rows and the CTA's up to 16 tokens (blockIdx.y: weight rows, blockIdx.x: 16-token blocks,
// so that the CTAs rereading a tile for more tokens run next to each other and find it in L2); its KS warps
// split K, warp w taking the steps w, w + KS, ... Each warp keeps kMmaGemvLoadsInFlight 16-byte weight
// loads per lane in flight (U = kMmaGemvLoadsInFlight / NT steps of its NT tiles, with their side data): the
// slot of a step is refilled with the step U · KS further on as soon as that step's MMAs have read it, so
// the loads of a long run of steps overlap the MMAs of the earlier ones. Partial sums of the KS warps meet
// in shared memory and are added in warp order: the result does not depend on timing (deterministic), only
// on KS (a function of N, see mma_gemv_k_splits) and not on the call's m (which picks MA and may pick NT;
// the sum per output is the same for every NT: the tiles never split K differently).
#pragma once

#include "dispatch.cuh"

namespace rtllm::kernels {

constexpr int kMmaGemvWarps = 8;
constexpr int kMmaGemvLoadsInFlight = 8;  // 16-byte weight loads per lane per batch (steps x tiles)
constexpr int32_t kMmaGemvTokensPerBlock = 16;
// Fewer K splits give each warp a longer run of steps, whose loads then overlap its MMAs, but make a CTA
// cover more weight rows; mma_gemv_k_splits takes the fewest that still give kMmaGemvMinCtas CTAs (two
// per SM on the H200's 132 SMs, less a margin for the tail).
constexpr int32_t kMmaGemvMinCtas = 200;

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                           uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                    uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 weight bytes, read once: not kept in L1; the L2 fetches the 256 bytes around them (the rest of the
// row's run is read by the next steps). Volatile: issued where written, ahead of the MMAs that wait for it.
__device__ __forceinline__ uint4 load_stream16(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The common Output: y [m, n] (TY) = sum + bias [n] (TB, may be null), rounded once.
template <typename TB, typename TY>
struct BiasOutput {
  TY* y;
  const TB* bias;
  int32_t n;
  __device__ __forceinline__ void operator()(float sum, int32_t row, int32_t col) const {
    if (bias) sum += to_float(bias[col]);
    y[(int64_t)row * n + col] = from_float<TY>(sum);
  }
};

// The Codec parts of weights that need no per-row or per-vector data (bf16 / fp16, FP8).
struct NoSideData {
  struct Args {};
  struct Row {};
  struct Step {};
  struct Side {};
  static __device__ __forceinline__ Row row(const Args&, int64_t) { return {}; }
  static __device__ __forceinline__ Step step(const Args&, int32_t, bool) { return {}; }
  static __device__ __forceinline__ Side side(const Row&, const Step&) { return {}; }
};

// A Codec gives: Act (the activations' element type), kCodes (weights in a lane's 16-byte load), Args (its
// kernel arguments), Row / row(args, weight_row) (per weight row state), Step / step(args, vec, in_k) (what
// the lane's vectors of one step share, e.g. their group index: computed once for all tiles), Side /
// side(row, step) (data loaded with a vector of codes, e.g. its group's scale) and mmas(acc, codes, side,
// xg, xh): the MMAs
// of one step for one 8-row tile, xg / xh the lane's activation words of tokens g and g + 8 (zeros past m).
// MA: blocks of 8 tokens, 1 when m <= 8, else 2. NT: 8-row weight tiles per row group; KS: warps splitting K.
template <class Codec, class Output, int MA, int NT, int KS>
__global__ void __launch_bounds__(kMmaGemvWarps * 32, 2)
    mma_gemv_kernel(Output out, const typename Codec::Act* x, const uint8_t* weight, typename Codec::Args args,
                    int32_t m, int32_t n, int32_t k) {
  using Act = typename Codec::Act;
  static_assert(kMmaGemvWarps % KS == 0, "the row groups take whole warps");
  constexpr int U = kMmaGemvLoadsInFlight / NT, kCols = 8 * NT, kGroups = kMmaGemvWarps / KS;
  constexpr int kCodes = Codec::kCodes;
  constexpr int kXWords = kCodes * (int)sizeof(Act) / 4;  // a lane's activation words per token and step
  constexpr int kActPerVec = 16 / (int)sizeof(Act);
  __shared__ float partial[kMmaGemvWarps][8 * MA][kCols];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int group = warp / KS, split = warp % KS;
  const int32_t n0 = (blockIdx.y * kGroups + group) * kCols;
  const int32_t row0 = blockIdx.x * kMmaGemvTokensPerBlock;
  const int32_t m_blk = min(m - row0, kMmaGemvTokensPerBlock);
  x += (int64_t)row0 * k;
  const int64_t row_bytes = (int64_t)k / kCodes * 16;
  const int32_t num_vecs = (int32_t)(row_bytes / 16), num_steps = (num_vecs + 3) / 4;
  // Weight rows past n read row n - 1 (their sums are never stored); k past the end reads zeros.
  const uint8_t* w_lane[NT];
  typename Codec::Row rows[NT];
#pragma unroll
  for (int r = 0; r < NT; ++r) {
    const int64_t row = min(n0 + 8 * r + g, n - 1);
    w_lane[r] = weight + row * row_bytes + 16 * t;
    rows[r] = Codec::row(args, row);
  }
  const Act* x_lane[MA];
  bool x_row[MA];
#pragma unroll
  for (int i = 0; i < MA; ++i) {
    x_row[i] = 8 * i + g < m_blk;
    x_lane[i] = x + (int64_t)(8 * i + g) * k + t * kCodes;  // read only for rows < m_blk
  }
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 wv[U][NT];
  typename Codec::Side side[U][NT];
  // Slot u takes step s of the NT tiles; steps past K take no load (zero codes, a side that keeps them 0).
  auto load_step = [&](int u, int32_t s) {
    const int32_t v = 4 * s + t;  // v: the lane's 16-byte vector of its rows
    const bool in_k = v < num_vecs;
    const typename Codec::Step step = Codec::step(args, v, in_k);
#pragma unroll
    for (int r = 0; r < NT; ++r) {
      wv[u][r] = in_k ? load_stream16(w_lane[r] + 64 * (int64_t)s) : zero;
      side[u][r] = Codec::side(rows[r], step);
    }
  };
#pragma unroll
  for (int u = 0; u < U; ++u) load_step(u, split + u * KS);  // constant data: before waiting for x's writer
  pdl_begin();
  float acc[NT][2][4];
#pragma unroll
  for (int r = 0; r < NT; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[r][h][j] = 0.0f;

  // The loop bounds are the same for the whole warp, as mma.sync requires; lanes past K feed zeros.
  for (int32_t s0 = split; s0 < num_steps; s0 += U * KS) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t s = s0 + u * KS;
      const bool in_k = 4 * s + t < num_vecs;
      uint32_t xw[2][kXWords];  // activation words of tokens g and g + 8 (zeros when MA == 1)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < kXWords / 4; ++j) {
          const uint4 a = i < MA && in_k && x_row[i] ? __ldg(reinterpret_cast<const uint4*>(
                                                           x_lane[i] + 4 * (int64_t)s * kCodes + kActPerVec * j))
                                                     : zero;
          xw[i][4 * j] = a.x;
          xw[i][4 * j + 1] = a.y;
          xw[i][4 * j + 2] = a.z;
          xw[i][4 * j + 3] = a.w;
        }
#pragma unroll
      for (int r = 0; r < NT; ++r) Codec::mmas(acc[r], wv[u][r], side[u][r], xw[0], xw[1]);
      load_step(u, s + U * KS);  // the slot's next step, in flight while the other slots' MMAs run
    }
  }
#pragma unroll
  for (int r = 0; r < NT; ++r)
#pragma unroll
    for (int i = 0; i < MA; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        partial[warp][8 * i + g][8 * r + 2 * t + j] = acc[r][0][2 * i + j] + acc[r][1][2 * i + j];
  __syncthreads();
  for (int e = threadIdx.x; e < kGroups * 8 * MA * kCols; e += blockDim.x) {
    const int grp = e / (8 * MA * kCols), row = e / kCols % (8 * MA), col = e % kCols;
    const int32_t out_col = (blockIdx.y * kGroups + grp) * kCols + col;
    if (row >= m_blk || out_col >= n) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < KS; ++w) sum += partial[grp * KS + w][row][col];
    out(sum, row0 + row, out_col);
  }
}

// The K split for an [n, k] weight: a function of the shape alone, so a token's result does not depend on
// the other tokens of the call.
inline int32_t mma_gemv_k_splits(int32_t n) {
  for (int32_t ks : {1, 2, 4})
    if (ceil_div(n, kMmaGemvWarps / ks * 16) >= kMmaGemvMinCtas) return ks;
  return kMmaGemvWarps;
}

// Whether the launch grid takes n weight rows (grid rows of at least 16 of them).
inline bool mma_gemv_rows_ok(int32_t n) { return ceil_div(n, 16) <= 65535; }

// NT (tiles per row group): every row group reads the activations of its 16-token block, m · k bytes per
// activation byte, against NT · 8 weight rows; with more than 2 tokens four tiles halve those (L1) reads
// where N still leaves kMmaGemvMinCtas CTAs.
template <class Codec, class Output, int MA, int KS>
void launch_mma_gemv_splits(const Output& out, const void* x, const void* weight, const typename Codec::Args& args,
                            int32_t m, int32_t n, int32_t k, cudaStream_t stream) {
  const int nt = m > 2 && ceil_div(n, kMmaGemvWarps / KS * 32) >= kMmaGemvMinCtas ? 4 : 2;
  const dim3 grid((unsigned)ceil_div(m, kMmaGemvTokensPerBlock), (unsigned)ceil_div(n, kMmaGemvWarps / KS * 8 * nt));
  auto* kernel = nt == 2 ? mma_gemv_kernel<Codec, Output, MA, 2, KS> : mma_gemv_kernel<Codec, Output, MA, 4, KS>;
  launch_pdl(kernel, grid, kMmaGemvWarps * 32, 0, stream, out, static_cast<const typename Codec::Act*>(x),
             static_cast<const uint8_t*>(weight), args, m, n, k);
}

// Calls launch(ma, ks) with the GEMV's compile-time shape as std::integral_constant values: MA (blocks of
// 8 tokens: 1 when m <= 8, else 2) and KS (k_splits: 1, 2, 4 or 8). Shared by the GEMV kernels over
// kMmaGemvTokensPerBlock-token CTAs.
template <class Launch>
void dispatch_mma_gemv_shape(int32_t m, int32_t k_splits, Launch&& launch) {
  auto with_splits = [&](auto ma) {
    switch (k_splits) {
      case 1: return launch(ma, std::integral_constant<int, 1>{});
      case 2: return launch(ma, std::integral_constant<int, 2>{});
      case 4: return launch(ma, std::integral_constant<int, 4>{});
      default: return launch(ma, std::integral_constant<int, 8>{});
    }
  };
  if (m <= 8) with_splits(std::integral_constant<int, 1>{});
  else with_splits(std::integral_constant<int, 2>{});
}

// Launches the GEMV over m >= 1 tokens and n <= 65535 · 16 weight rows (mma_gemv_rows_ok); k_splits is 1, 2,
// 4 or 8 (mma_gemv_k_splits(n) unless a caller picks its own).
template <class Codec, class Output>
void launch_mma_gemv(int32_t k_splits, const Output& out, const void* x, const void* weight,
                     const typename Codec::Args& args, int32_t m, int32_t n, int32_t k, cudaStream_t stream) {
  dispatch_mma_gemv_shape(m, k_splits, [&](auto ma, auto ks) {
    launch_mma_gemv_splits<Codec, Output, decltype(ma)::value, decltype(ks)::value>(out, x, weight, args, m, n, k,
                                                                                   stream);
  });
}

}  // namespace rtllm::kernels
