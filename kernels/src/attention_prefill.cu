// attention_prefill: causal attention of a step's new tokens over their sequences' paged K/V.
//
// Tensor-core path (head_dim 64, 128), FlashAttention-2 structure. The GQA group's query heads are stacked
// as rows (row R = new token R / group, head R % group of the KV head), so one CTA of 4 warps serves a tile
// of 128 rows (two bands of 64) of one (sequence, KV head) and every K/V tile serves the whole group.
// Per 64-key tile: S = Q·Kᵀ with mma.sync m16n8k16 (fp32 accumulators), online softmax in fp32 with exp2
// (scale·log2e folded into one fma), then O += P·V. K/V tiles are gathered from the pool block by block with
// 16-byte cp.async; V of tile j loads while S_j is computed, K of tile j+1 while P_j·V_j is. Only tiles
// that cross the diagonal are masked. Other head_dims take a simple warp-per-(token, head) path. On Hopper a
// 16-bit pool at head_dim 128 runs prefill_sm90 (attention_prefill_sm90.cu: wgmma, TMA) instead.
// An FP8 (e4m3) or INT8 pool is read as codes converted exactly to T on their way into shared memory (through
// registers rather than cp.async); k_scale is folded into the softmax scale and v_scale into the output.
#include <cmath>

#include "attention_common.cuh"
#include "attention_prefill_sm90.cuh"

namespace rtllm::kernels {
namespace {

using namespace attn;

constexpr int kBlockM = 64;  // query rows per band (16 per warp)
constexpr int kBlockN = 64;  // keys per tile
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;

// Shared-memory tiles are rows of HEAD_DIM elements stored as 16-byte chunks; chunk c of row r sits at
// r * (HEAD_DIM / 8) + (c ^ (r % 8)) so an ldmatrix of 8 rows at one column touches 8 distinct bank groups.
template <int HEAD_DIM>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * (HEAD_DIM / 8) + (chunk ^ (row & 7));
}

// Loads keys (or values, v = true) n0 .. n0 + 63 of one (sequence, KV head) into `tile`; tokens at or past
// seq_len are zero-filled (their scores are masked; zero V keeps 0·V finite). Each thread copies one 16-byte
// column chunk of every (kThreads / chunks)-th row.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void load_kv_tile(uint4* tile, const T* pool, const PagedKvIndex& index, bool v, int n0,
                                             int seq_len) {
  constexpr int kChunks = HEAD_DIM / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  const int chunk = threadIdx.x % kChunks, row0 = threadIdx.x / kChunks;
  const T* base = pool + (v ? index.v_offset : 0) + chunk * 8;
#pragma unroll
  for (int r = row0; r < kBlockN; r += kRowsPerPass) {
    const int t = n0 + r;
    const bool valid = t < seq_len;
    cp_async_16(&tile[swizzle<HEAD_DIM>(r, chunk)], base + (valid ? index.key_offset(t) : 0), valid);
  }
}

// An FP8 or INT8 pool's tile goes through registers instead: fetch_kv_tile_codes issues the loads of a
// thread's 8-byte chunks (8 codes) where load_kv_tile would start its cp.async, store_kv_tile_codes converts
// them to T (exact) into the same swizzled layout where the cp.async would be waited for, so the loads stay in
// flight over the same work.
template <int HEAD_DIM>
struct Fp8TileRegs {
  static constexpr int kChunks = HEAD_DIM / 8;
  static constexpr int kRowsPerPass = kThreads / kChunks;
  uint2 r[kBlockN / kRowsPerPass];
};

template <typename KV, int HEAD_DIM>
__device__ __forceinline__ void fetch_kv_tile_codes(Fp8TileRegs<HEAD_DIM>& regs, const KV* pool,
                                                    const PagedKvIndex& index, bool v, int n0, int seq_len) {
  static_assert(sizeof(KV) == 1, "a pool of 8-bit codes");
  using R = Fp8TileRegs<HEAD_DIM>;
  const int chunk = threadIdx.x % R::kChunks, row0 = threadIdx.x / R::kChunks;
  const KV* base = pool + (v ? index.v_offset : 0) + chunk * 8;
#pragma unroll
  for (int i = 0; i < kBlockN / R::kRowsPerPass; ++i) {
    const int t = n0 + row0 + i * R::kRowsPerPass;
    regs.r[i] = t < seq_len ? __ldg(reinterpret_cast<const uint2*>(base + index.key_offset(t))) : make_uint2(0, 0);
  }
}

template <typename T, typename KV, int HEAD_DIM>
__device__ __forceinline__ void store_kv_tile_codes(uint4* tile, const Fp8TileRegs<HEAD_DIM>& regs) {
  using R = Fp8TileRegs<HEAD_DIM>;
  const int chunk = threadIdx.x % R::kChunks, row0 = threadIdx.x / R::kChunks;
#pragma unroll
  for (int i = 0; i < kBlockN / R::kRowsPerPass; ++i) {
    uint4 converted;
    if constexpr (is_int8_kv<KV>()) converted = i8x8_to<T>(regs.r[i]);
    else converted = e4m3x8_to<T>(regs.r[i]);
    tile[swizzle<HEAD_DIM>(row0 + i * R::kRowsPerPass, chunk)] = converted;
  }
}

// ROW_GROUPS bands of 64 rows per CTA: warp w owns rows rg * 64 + w * 16 .. + 15 of each band rg, so every K/V
// fragment read from shared memory feeds ROW_GROUPS mma instructions. With one band Q stays in registers;
// with two it is re-read from shared memory per k-step (registers hold the two output accumulators).
// KV: the pool's element type, T, e4m3 or int8 (the last two read as codes: kv.k_scale is in scale_log2,
// kv.v_scale applied to the output).
template <typename T, typename KV, int HEAD_DIM, int ROW_GROUPS>
__global__ void __launch_bounds__(kThreads) prefill_mma_kernel(T* __restrict__ out, const T* __restrict__ q,
                                                               StepMetaDevice meta, PagedKv kv, int num_heads,
                                                               int group, float scale_log2) {
  constexpr bool kCodes = is_quantized_kv<KV>();  // FP8 or INT8
  constexpr int RG = ROW_GROUPS;
  constexpr int kRows = kBlockM * RG;
  constexpr int kChunks = HEAD_DIM / 8;
  constexpr int kKSteps = HEAD_DIM / 16;   // k-steps of Q·Kᵀ
  constexpr int kDimTiles = HEAD_DIM / 8;  // n-tiles of P·V
  constexpr int kKeyTiles = kBlockN / 8;   // n-tiles of Q·Kᵀ
  extern __shared__ uint4 smem[];
  uint4* q_s = smem;                    // [kRows, HEAD_DIM]
  uint4* k_s = q_s + kRows * kChunks;   // [kBlockN, HEAD_DIM]
  uint4* v_s = k_s + kBlockN * kChunks; // [kBlockN, HEAD_DIM]

  const int s = blockIdx.z, kv_head = blockIdx.y;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kRows;  // tiles with the most keys start first
  const int num_cached = meta.num_cached[s], seq_len = meta.seq_len[s];
  const int num_rows = (seq_len - num_cached) * group;  // (new token, group head) pairs
  if (m0 >= num_rows) return;
  const int token0 = meta.seq_token_start[s];
  const int head0 = kv_head * group;
  const int64_t row_stride = (int64_t)num_heads * HEAD_DIM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Element offset of row R's head in q / out.
  auto row_offset = [&](int R) { return (token0 + R / group) * row_stride + (int64_t)(head0 + R % group) * HEAD_DIM; };

  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, chunk = c % kChunks;
    const bool valid = m0 + r < num_rows;
    cp_async_16(&q_s[swizzle<HEAD_DIM>(r, chunk)], q + row_offset(valid ? m0 + r : 0) + chunk * 8, valid);
  }
  const KV* pool = static_cast<const KV*>(kv.data);
  const PagedKvIndex kv_index(kv, s, kv_head);
  [[maybe_unused]] Fp8TileRegs<HEAD_DIM> fp8_regs;  // K or V in flight (FP8 or INT8 pool)
  if constexpr (kCodes) {
    fetch_kv_tile_codes<KV, HEAD_DIM>(fp8_regs, pool, kv_index, false, 0, seq_len);
    store_kv_tile_codes<T, KV, HEAD_DIM>(k_s, fp8_regs);
  } else {
    load_kv_tile<T, HEAD_DIM>(k_s, pool, kv_index, false, 0, seq_len);
  }
  cp_async_commit();

  // Keys 0 .. key_end - 1 are seen by some row of the tile; row R sees keys up to num_cached + R / group.
  const int key_end = num_cached + (min(m0 + kRows, num_rows) - 1) / group + 1;
  const int num_key_tiles = (key_end + kBlockN - 1) / kBlockN;
  int limit[RG][2];  // per band: the last key of this thread's rows (lane / 4 and lane / 4 + 8)
#pragma unroll
  for (int rg = 0; rg < RG; ++rg) {
    const int row = m0 + rg * kBlockM + warp * 16 + lane / 4;
    limit[rg][0] = num_cached + row / group;
    limit[rg][1] = num_cached + (row + 8) / group;
  }
  auto q_row = [&](int rg) { return rg * kBlockM + warp * 16 + lane % 16; };

  uint32_t q_frag[RG == 1 ? kKSteps : 1][4];
  float o[RG][kDimTiles][4];
  float m_run[RG][2], l_run[RG][2];
#pragma unroll
  for (int rg = 0; rg < RG; ++rg) {
#pragma unroll
    for (int i = 0; i < kDimTiles; ++i) o[rg][i][0] = o[rg][i][1] = o[rg][i][2] = o[rg][i][3] = 0.0f;
    m_run[rg][0] = m_run[rg][1] = -INFINITY;
    l_run[rg][0] = l_run[rg][1] = 0.0f;
  }

  for (int j = 0; j < num_key_tiles; ++j) {
    const int n0 = j * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
    if constexpr (RG == 1) {
      if (j == 0) {
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) ldmatrix_x4(q_frag[kk], &q_s[swizzle<HEAD_DIM>(q_row(0), kk * 2 + lane / 16)]);
      }
    }
    if constexpr (kCodes) fetch_kv_tile_codes<KV, HEAD_DIM>(fp8_regs, pool, kv_index, true, n0, seq_len);
    else load_kv_tile<T, HEAD_DIM>(v_s, pool, kv_index, true, n0, seq_len);
    cp_async_commit();

    float sacc[RG][kKeyTiles][4];
#pragma unroll
    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
      for (int i = 0; i < kKeyTiles; ++i) sacc[rg][i][0] = sacc[rg][i][1] = sacc[rg][i][2] = sacc[rg][i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t qa[RG][4];
#pragma unroll
      for (int rg = 0; rg < RG; ++rg) {
        if constexpr (RG == 1) {
#pragma unroll
          for (int i = 0; i < 4; ++i) qa[rg][i] = q_frag[kk][i];
        } else {
          ldmatrix_x4(qa[rg], &q_s[swizzle<HEAD_DIM>(q_row(rg), kk * 2 + lane / 16)]);
        }
      }
#pragma unroll
      for (int nn = 0; nn < kBlockN / 16; ++nn) {
        uint32_t b[4];
        ldmatrix_x4(b, &k_s[swizzle<HEAD_DIM>(nn * 16 + (lane / 16) * 8 + lane % 8, kk * 2 + (lane / 8) % 2)]);
#pragma unroll
        for (int rg = 0; rg < RG; ++rg) {
          mma_16816<T>(sacc[rg][2 * nn], qa[rg], b);
          mma_16816<T>(sacc[rg][2 * nn + 1], qa[rg], b + 2);
        }
      }
    }

    // Mask keys past a row's position (only on tiles crossing the diagonal). Scores and maxima stay unscaled;
    // p = 2^(s·scale·log2e − m·scale·log2e) is one fma and one exp2 per score (scale > 0).
    const bool needs_mask = n0 + kBlockN - 1 > num_cached + m0 / group;
    uint32_t p_frag[RG][kBlockN / 16][4];
#pragma unroll
    for (int rg = 0; rg < RG; ++rg) {
      float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (needs_mask && n0 + nt * 8 + 2 * (lane % 4) + (e % 2) > limit[rg][e / 2]) sacc[rg][nt][e] = -INFINITY;
          row_max[e / 2] = fmaxf(row_max[e / 2], sacc[rg][nt][e]);
        }
      }
      float corr[2], m_use[2];  // m_use: the running max in the log2 domain (0 while nothing is unmasked)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 1));
        row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 2));
        const float m_new = fmaxf(m_run[rg][r], row_max[r]);
        m_use[r] = safe_max(m_new) * scale_log2;
        corr[r] = exp2f(fmaf(m_run[rg][r], scale_log2, -m_use[r]));
        m_run[rg][r] = m_new;
        l_run[rg][r] *= corr[r];
      }
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
        const float p0 = exp2f(fmaf(sacc[rg][nt][0], scale_log2, -m_use[0]));
        const float p1 = exp2f(fmaf(sacc[rg][nt][1], scale_log2, -m_use[0]));
        const float p2 = exp2f(fmaf(sacc[rg][nt][2], scale_log2, -m_use[1]));
        const float p3 = exp2f(fmaf(sacc[rg][nt][3], scale_log2, -m_use[1]));
        l_run[rg][0] += p0 + p1;
        l_run[rg][1] += p2 + p3;
        // A fragment of P for keys 16 * (nt / 2) ..: tile nt even gives registers 0, 1; odd gives 2, 3.
        p_frag[rg][nt / 2][(nt % 2) * 2 + 0] = pack2<T>(p0, p1);
        p_frag[rg][nt / 2][(nt % 2) * 2 + 1] = pack2<T>(p2, p3);
      }
#pragma unroll
      for (int i = 0; i < kDimTiles; ++i) {
        o[rg][i][0] *= corr[0];
        o[rg][i][1] *= corr[0];
        o[rg][i][2] *= corr[1];
        o[rg][i][3] *= corr[1];
      }
    }

    // Every warp finished V_{j-1} before the barrier at the top of this iteration: v_s is free.
    if constexpr (kCodes) store_kv_tile_codes<T, KV, HEAD_DIM>(v_s, fp8_regs);
    cp_async_wait<0>();
    __syncthreads();  // V_j landed; every warp is done with K_j
    if (j + 1 < num_key_tiles) {
      if constexpr (kCodes) fetch_kv_tile_codes<KV, HEAD_DIM>(fp8_regs, pool, kv_index, false, n0 + kBlockN, seq_len);
      else load_kv_tile<T, HEAD_DIM>(k_s, pool, kv_index, false, n0 + kBlockN, seq_len);
    }
    cp_async_commit();

#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
      for (int dt = 0; dt < HEAD_DIM / 16; ++dt) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, &v_s[swizzle<HEAD_DIM>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, dt * 2 + lane / 16)]);
#pragma unroll
        for (int rg = 0; rg < RG; ++rg) {
          mma_16816<T>(o[rg][2 * dt], p_frag[rg][kk], b);
          mma_16816<T>(o[rg][2 * dt + 1], p_frag[rg][kk], b + 2);
        }
      }
    }
    // Every warp finished K_j at the barrier above: k_s is free for K_{j+1}.
    if constexpr (kCodes) {
      if (j + 1 < num_key_tiles) store_kv_tile_codes<T, KV, HEAD_DIM>(k_s, fp8_regs);
    }
  }

#pragma unroll
  for (int rg = 0; rg < RG; ++rg) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[rg][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = m0 + rg * kBlockM + warp * 16 + lane / 4 + 8 * r;
      if (row >= num_rows) continue;
      float inv_l = 1.0f / l;
      if constexpr (kCodes) inv_l *= kv.v_scale;  // the values were accumulated as codes
      T* dst = out + row_offset(row) + 2 * (lane % 4);
#pragma unroll
      for (int i = 0; i < kDimTiles; ++i)
        *reinterpret_cast<uint32_t*>(dst + i * 8) = pack2<T>(o[rg][i][2 * r] * inv_l, o[rg][i][2 * r + 1] * inv_l);
    }
  }
}

// Simple path for any head_dim <= 256: one warp per (packed token, query head). Lanes score 32 keys at a
// time; each lane then accumulates dims lane, lane + 32, .. over those keys.
constexpr int kSimpleMaxHeadDim = 256;

template <typename T, typename KV>
__global__ void __launch_bounds__(kThreads) prefill_simple_kernel(T* __restrict__ out, const T* __restrict__ q,
                                                                  StepMetaDevice meta, PagedKv kv, int num_heads,
                                                                  int group, int head_dim, float scale_log2) {
  __shared__ float q_s[kNumWarps][kSimpleMaxHeadDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t task = (int64_t)blockIdx.x * kNumWarps + warp;
  if (task >= (int64_t)meta.num_tokens * num_heads) return;
  const int token = (int)(task / num_heads), h = (int)(task % num_heads), kv_head = h / group;
  const int s = meta.token_seq[token];
  const int limit = meta.num_cached[s] + (token - meta.seq_token_start[s]);  // keys 0 .. limit
  const int64_t q_offset = (int64_t)token * num_heads * head_dim + (int64_t)h * head_dim;
  for (int d = lane; d < head_dim; d += 32) q_s[warp][d] = to_float(q[q_offset + d]) * scale_log2;
  __syncwarp();

  const KV* pool = static_cast<const KV*>(kv.data);
  const PagedKvIndex kv_index(kv, s, kv_head);
  constexpr int kDimsPerLane = kSimpleMaxHeadDim / 32;
  float acc[kDimsPerLane] = {};
  float m_run = -INFINITY, l_lane = 0.0f;
  for (int k0 = 0; k0 <= limit; k0 += 32) {
    const int key = k0 + lane;
    float score = -INFINITY;
    if (key <= limit) {
      const KV* k = pool + kv_index.key_offset(key);
      score = 0.0f;
      for (int d = 0; d < head_dim; ++d) score += q_s[warp][d] * to_float(k[d]);
    }
    float chunk_max = score;
    for (int off = 16; off > 0; off /= 2) chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, off));
    const float m_new = fmaxf(m_run, chunk_max);  // finite: key k0 <= limit
    const float corr = exp2f(m_run - m_new);
    const float p = key <= limit ? exp2f(score - m_new) : 0.0f;
    m_run = m_new;
    l_lane = l_lane * corr + p;
#pragma unroll
    for (int r = 0; r < kDimsPerLane; ++r) acc[r] *= corr;
    const int num_keys = min(32, limit - k0 + 1);
    for (int j = 0; j < num_keys; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      const KV* v = pool + kv_index.key_offset(k0 + j) + kv_index.v_offset;
#pragma unroll
      for (int r = 0; r < kDimsPerLane; ++r)
        if (lane + 32 * r < head_dim) acc[r] += pj * to_float(v[lane + 32 * r]);
    }
  }
  for (int off = 16; off > 0; off /= 2) l_lane += __shfl_xor_sync(0xffffffffu, l_lane, off);
  float inv_l = 1.0f / l_lane;
  if constexpr (is_quantized_kv<KV>()) inv_l *= kv.v_scale;  // the values were accumulated as codes
#pragma unroll
  for (int r = 0; r < kDimsPerLane; ++r)
    if (lane + 32 * r < head_dim) out[q_offset + lane + 32 * r] = from_float<T>(acc[r] * inv_l);
}

// Row bands per CTA of the tensor-core path (1: 64 rows, Q in registers; 2: 128 rows).
#ifndef RTLLM_PREFILL_ROW_GROUPS
#define RTLLM_PREFILL_ROW_GROUPS 2
#endif
constexpr int kPrefillRowGroups = RTLLM_PREFILL_ROW_GROUPS;

template <typename T, typename KV, int HEAD_DIM, int RG>
cudaError_t launch_mma(T* out, const T* q, const StepMetaDevice& meta, const PagedKv& kv, int64_t max_rows,
                       int32_t num_heads, int32_t group, float scale_log2, cudaStream_t stream) {
  constexpr int kRows = kBlockM * RG;
  constexpr size_t kSmemBytes = (size_t)(kRows + 2 * kBlockN) * HEAD_DIM * 2;
  auto kernel = prefill_mma_kernel<T, KV, HEAD_DIM, RG>;
  if (kSmemBytes > 48 * 1024) {
    // Above 48 KB a kernel needs an explicit opt-in; a host-side attribute, safe during graph capture.
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSmemBytes);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((unsigned)((max_rows + kRows - 1) / kRows), num_heads / group, meta.num_seqs);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(out, q, meta, kv, num_heads, group, scale_log2);
  return cudaGetLastError();
}

// The Hopper kernel where it applies, unless RTLLM_PREFILL_SM90=0 selects the FlashAttention-2 one (a
// same-build comparison).
inline bool prefill_sm90_enabled() {
  static const bool enabled = !env_is("RTLLM_PREFILL_SM90", "0");
  return enabled;
}

template <typename T, typename KV>
cudaError_t launch_prefill(void* out, const void* q, const StepMetaDevice& meta, const PagedKv& kv,
                           int32_t max_new_tokens, int32_t num_heads, int32_t group, int32_t head_dim,
                           float scale_log2, cudaStream_t stream) {
  T* o = static_cast<T*>(out);
  const T* qt = static_cast<const T*>(q);
  if (head_dim == 64 || head_dim == 128) {
    const int64_t max_rows = (int64_t)max_new_tokens * group;
    if (head_dim == 64)
      return launch_mma<T, KV, 64, kPrefillRowGroups>(o, qt, meta, kv, max_rows, num_heads, group, scale_log2, stream);
    if constexpr (std::is_same_v<KV, T>) {  // Hopper: wgmma (attention_prefill_sm90.cu) unless RTLLM_PREFILL_SM90=0
      if (prefill_sm90_enabled() && prefill_sm90_supported(kv, dtype_of<T>(), 128, group))
        return prefill_sm90(out, q, meta, kv, max_new_tokens, num_heads, group, scale_log2, dtype_of<T>(), stream);
    }
    // FP8 / INT8 at head_dim 128: two bands' accumulators plus the tile in flight in registers spill; one band
    // does not.
    constexpr int kRowGroups128 = is_quantized_kv<KV>() ? 1 : kPrefillRowGroups;
    return launch_mma<T, KV, 128, kRowGroups128>(o, qt, meta, kv, max_rows, num_heads, group, scale_log2, stream);
  } else {
    const int64_t num_tasks = (int64_t)meta.num_tokens * num_heads;
    const int64_t num_blocks = (num_tasks + kNumWarps - 1) / kNumWarps;
    prefill_simple_kernel<T, KV><<<(unsigned)num_blocks, kThreads, 0, stream>>>(o, qt, meta, kv, num_heads, group,
                                                                              head_dim, scale_log2);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_prefill(void* out, const void* q, StepMetaDevice meta, PagedKv kv, int32_t max_new_tokens,
                              int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, float scale, DType dtype,
                              cudaStream_t stream) {
  const bool codes = kv.dtype == DType::kFP8E4M3 || kv.dtype == DType::kINT8;
  if (!kv_scales_valid(kv.dtype, kv.k_scale, kv.v_scale)) return cudaErrorInvalidValue;
  if (num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0 ||
      head_dim % 8 != 0 || head_dim > kSimpleMaxHeadDim || kv.head_dim != head_dim ||
      kv.num_kv_heads != num_kv_heads || !attn::paged_kv_supported(kv) || meta.num_seqs > 65535 || num_heads > 65535 || max_new_tokens < 0)
    return cudaErrorInvalidValue;
  if (meta.num_seqs == 0 || meta.num_tokens == 0 || max_new_tokens == 0) return cudaSuccess;
  const int32_t group = num_heads / num_kv_heads;
  // An FP8 or INT8 pool's keys are read as codes: k_scale joins the softmax scale (v_scale scales the output).
  const float scale_log2 = scale * attn::kLog2e * (codes ? kv.k_scale : 1.0f);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    RTLLM_DISPATCH_KV(kv.dtype, T, KV, {
      return launch_prefill<T, KV>(out, q, meta, kv, max_new_tokens, num_heads, group, head_dim, scale_log2, stream);
    });
  });
  return cudaErrorInvalidValue;
}

}  // namespace rtllm::kernels
