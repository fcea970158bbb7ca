// The int4 weight-only GEMM on Hopper (sm_90a) for prefill and large decode batches: y [m, n] = x [m, k] ·
// Wᵀ (+ bias) with W = fma(q, scale, offset) rounded to T (bf16 / fp16), the weights of the dequantize +
// GEMM path, but never written out: the codes go from global memory to registers, become T there, and are
// the A operand of wgmma; the activations are its B operand, from shared memory.
//
// The codes are in the GEMV's MMA layout (woq_pack_int4): lane (g, t) of a warp reads 16 bytes of weight
// rows g and g + 8, the 32 codes k = 128·step + 32t .. of each, and its MMA (w, h) of a step (word w of the
// 16 bytes, h = 0, 1) takes pairs 2h and 2h + 1 of that word. The A fragment of wgmma m64nNk16 is mma.sync's
// m16n8k16 per warp (a0 = row g, slots 2t, 2t + 1; a1 = row g + 8, same slots; a2, a3 = slots 2t + 8, 2t + 9),
// so slice σ = 2w + h of a step puts the codes
//   k = 128·step + 32t + 8w + 4h + e      in slot 2t + e      (e = 0, 1)
//   k = 128·step + 32t + 8w + 4h + 2 + e  in slot 8 + 2t + e.
// wgmma reads B's slots in order from shared memory, so the activations are first re-ordered the same way
// (woq_permute_kernel: x' [m, k] in the workspace, x'[128·step + 16σ + slot] = x at that k); both operands
// then hold the same k in every slot, and the sum over a step is the same.
//
// One CTA computes 128 weight rows x 128 tokens (D = W · x'ᵀ: rows output channels, columns tokens), two
// consumer warpgroups of 64 weight rows and one producer warp (288 threads, up to 224 registers each):
// - the producer streams x' tiles (128 tokens x 128 codes: two TMA boxes of 64 values, 128-byte swizzle)
//   into a kStages-deep ring ("full" / "empty" mbarriers, as fp8_gemm.cu);
// - a consumer thread loads its weight bytes and (scale, offset) kAhead steps ahead into registers, and
//   per step dequantizes its 64 codes into 8 A fragments (fma(q, s, o) in T, as woq_dequantize), issues 8
//   wgmma m64n128k16 and waits for them before its registers change again; the other warpgroup's MMAs fill
//   the tensor cores meanwhile.
// - epilogue: float32 sums + bias, rounded once to y's dtype, stored per element.
// Persistent CTAs take every gridDim-th tile, token tiles first: the CTAs running at once share weight rows.
#include <algorithm>

#include "hopper.cuh"
#include "mma_gemv.cuh"  // load_stream16, word
#include "rtllm/kernels/weight_only.cuh"
#include "weight_only_codes.cuh"

namespace rtllm::kernels {
namespace {

using namespace woq;  // NOLINT: the pair helpers of weight_only_codes.cuh

constexpr int kRowsPerWarpgroup = 64, kConsumers = 2, kTileRows = kRowsPerWarpgroup * kConsumers;
constexpr int kTileTokens = 128, kStepK = 128, kStages = 6;
[[maybe_unused]] constexpr int kAhead = 2;  // steps of weights in registers ahead of the MMAs
constexpr int kThreads = 128 * kConsumers + 32;              // the consumers' warpgroups, then the producer's warp
constexpr int kBoxBytes = kTileTokens * 128;                 // 64 values of 16 bits per token row
constexpr int kStageBytes = 2 * kBoxBytes;                   // one step: 128 codes' activations
constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + 1024 + 2 * kStages * sizeof(uint64_t);

// x'[row][128·step + p] = x[row][128·step + k_local(p)] for p = 16σ + slot (see the header). One thread
// writes 8 slots (16 bytes): slot block b = p / 8 of the step holds the pairs of t = 0..3 at
// k_local = 32t + 8w + 4h + 2·(b % 2), w = b / 4, h = b / 2 % 2.
template <typename T>
__global__ void woq_permute_kernel(T* x_perm, const T* x, int64_t num_chunks, int32_t k) {
  pdl_begin();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < num_chunks; c += stride) {
    const int64_t row = c / (k / 8), p0 = c % (k / 8) * 8;  // p0: the chunk's first position in the row
    const int32_t step = (int32_t)(p0 / kStepK), b = (int32_t)(p0 % kStepK) / 8;
    const int32_t sigma = b / 2, half = b % 2, w = sigma / 2, h = sigma % 2;
    const T* src = x + row * k + (int64_t)step * kStepK + 8 * w + 4 * h + 2 * half;
    uint32_t out[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) out[t] = *reinterpret_cast<const uint32_t*>(src + 32 * t);  // the pair (e = 0, 1)
    *reinterpret_cast<uint4*>(x_perm + row * k + p0) = make_uint4(out[0], out[1], out[2], out[3]);
  }
}

#ifdef RTLLM_HOPPER_WGMMA
using namespace hopper;  // NOLINT: mbarriers, TMA, descriptors, wgmma
#endif

// group_mul = ceil(2^32 / vectors per group): the group of the lane's vector v is (v · group_mul) >> 32,
// exact for v and vectors per group below 2^16 (as the GEMV).
//
// kCluster 2: clusters of two CTAs take two adjacent tiles of 128 weight rows for the same tokens and share
// their x' tiles: CTA rank r loads box r of each step (64 of its 128 codes) into both CTAs' stages by TMA
// multicast, halving the activation bytes a CTA reads from L2. A stage is refilled only once the consumers
// of both CTAs have released it, and neither CTA exits while its peer may still write into it.
template <typename T, typename TY, int kCluster>
__global__ void __maxnreg__(224)
    woq_gemm_kernel(const __grid_constant__ CUtensorMap map_x, TY* y, const uint8_t* codes, const T* scale,
                    const T* offset, const T* bias, uint64_t group_mul, int32_t num_groups, int32_t m, int32_t n,
                    int32_t k) {
#ifdef RTLLM_HOPPER_WGMMA
  static_assert(kCluster == 1 || kCluster == 2, "clusters of 1 or 2 CTAs");
  using T2 = typename Pair<T>::T2;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int warpgroup = threadIdx.x / 128;
  const uint32_t rank = kCluster > 1 ? cluster_rank() : 0;
  const int32_t num_steps = k / kStepK;
  const int32_t tiles_tok = (m + kTileTokens - 1) / kTileTokens;
  const int32_t tiles_rows = (n + kTileRows - 1) / kTileRows;
  const int32_t cluster_tiles_rows = (tiles_rows + kCluster - 1) / kCluster;
  const int32_t num_tiles = tiles_tok * cluster_tiles_rows;
  const int32_t first_tile = blockIdx.x / kCluster, tile_step = gridDim.x / kCluster;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers * 4 * kCluster);  // lane 0 of each consumer warp of the cluster
    }
    mbar_init_fence();
  }
  if constexpr (kCluster > 1) cluster_sync();  // the peer's barriers exist before anything arrives on them
  else __syncthreads();
  pdl_begin();  // x' comes from the permute kernel before

  if (warpgroup == kConsumers) {
    if (threadIdx.x == kConsumers * 128) {
      prefetch_tensor_map(&map_x);
      uint32_t it = 0;
      for (int32_t tile = first_tile; tile < num_tiles; tile += tile_step) {
        const int32_t tok0 = tile % tiles_tok * kTileTokens;
        for (int32_t s = 0; s < num_steps; ++s, ++it) {
          const uint32_t st = it % kStages;
          if (it >= kStages) mbar_wait(&empty[st], ((it / kStages) - 1) & 1);
          uint8_t* stage = smem + st * kStageBytes;
          mbar_expect_tx(&full[st], kStageBytes);  // both boxes, one from each CTA of a cluster
          if constexpr (kCluster > 1) {
            tma_load_2d_multicast(stage + rank * kBoxBytes, &map_x, s * kStepK + 64 * (int32_t)rank, tok0, &full[st],
                                  0x3);
          } else {
            tma_load_2d(stage, &map_x, s * kStepK, tok0, &full[st]);
            tma_load_2d(stage + kBoxBytes, &map_x, s * kStepK + 64, tok0, &full[st]);
          }
        }
      }
    }
  } else {
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int64_t row_bytes = k / 2;
    float acc[64];
    uint32_t it = 0;
    for (int32_t tile = first_tile; tile < num_tiles; tile += tile_step) {
      const int32_t tok0 = tile % tiles_tok * kTileTokens;
      const int32_t n0 = (tile / tiles_tok * kCluster + (int32_t)rank) * kTileRows;  // past n: nothing stored
      const int32_t r0 = n0 + warpgroup * kRowsPerWarpgroup + warp * 16 + g;
      // Rows past n read row n - 1: their sums are never stored.
      const int64_t rows[2] = {min(r0, n - 1), min(r0 + 8, n - 1)};
      uint4 wv[kAhead][2];
      T2 so[kAhead][2];  // (scale, offset) of the lane's group in each row
      auto load_step = [&](int u, int32_t s) {
        if (s >= num_steps) return;
        const int32_t grp = (int32_t)(((uint64_t)(4 * s + t) * group_mul) >> 32);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          wv[u][r] = load_stream16(codes + rows[r] * row_bytes + 64 * (int64_t)s + 16 * t);
          const T o = offset ? offset[rows[r] * num_groups + grp] : from_float<T>(0.0f);
          so[u][r] = pair_of(scale[rows[r] * num_groups + grp], o);
        }
      };
#pragma unroll
      for (int u = 0; u < kAhead; ++u) load_step(u, u);
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

      for (int32_t s0 = 0; s0 < num_steps; s0 += kAhead) {
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
          const int32_t s = s0 + u;
          if (s >= num_steps) break;
          uint32_t a[8][4];  // slice σ = 2w + h: rows g, g + 8 at slots 2t.., then 2t + 8..
          const T2 s_lo = low_twice(so[u][0]), o_lo = high_twice(so[u][0]);
          const T2 s_hi = low_twice(so[u][1]), o_hi = high_twice(so[u][1]);
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const uint32_t lo = word(wv[u][0], w), hi = word(wv[u][1], w);
#pragma unroll
            for (int h = 0; h < 2; ++h) int4_a_fragment<T>(a[2 * w + h], lo, hi, h, s_lo, o_lo, s_hi, o_hi);
          }
          load_step(u, s + kAhead);  // this slot's registers are free now
          const uint32_t st = it % kStages;
          mbar_wait(&full[st], (it / kStages) & 1);
          const uint32_t stage = smem_u32(smem + st * kStageBytes);
          fence_regs(acc);
          asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
          for (int sigma = 0; sigma < 8; ++sigma)  // slices 0-3 in the first box, 4-7 in the second
            wgmma_m64n128k16_rs<T, false>(acc, a[sigma], sw128_desc(stage + (sigma / 4) * kBoxBytes + 32 * (sigma % 4)));
          asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
          asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
          fence_regs(acc);
          if (lane == 0) {
            if constexpr (kCluster > 1) {
#pragma unroll
              for (int c = 0; c < kCluster; ++c) mbar_arrive_cluster(&empty[st], c);
            } else {
              mbar_arrive(&empty[st]);
            }
          }
          ++it;
        }
      }

      // acc[4j + 2h + e] = D[row 16·warp + g + 8h][token 8j + 2t + e] of the warpgroup's 64 rows.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int32_t col = r0 + 8 * h;  // y's column: the weight row
        if (col >= n) continue;
        const float b = bias ? to_float(bias[col]) : 0.0f;
#pragma unroll
        for (int j = 0; j < kTileTokens / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int32_t tok = tok0 + 8 * j + 2 * t + e;
            if (tok < m) y[(int64_t)tok * n + col] = from_float<TY>(acc[4 * j + 2 * h + e] + b);
          }
      }
    }
  }  // consumers
  cluster_exit<kCluster>();
#else
  __trap();  // built only for sm_90a; woq_gemm_int4 refuses other devices before launching
#endif
}

// Single CTAs unless RTLLM_WOQ_GEMM_CLUSTER=2 asks for clusters of two sharing activation tiles (kCluster 2;
// an A/B switch for benchmarks, and never when the weight has a single row tile). On an H100 the clusters
// ran at about half the single CTAs' rate (244-266 against 421-491 TFLOP/s, M = 512..4096, random
// Llama-3-8B shapes); why is not settled, and the FP8 GEMM's clusters show the same.
inline int woq_gemm_cluster(int32_t n) {
  static const bool pairs = env_is("RTLLM_WOQ_GEMM_CLUSTER", "2");
  return pairs && n > kTileRows ? 2 : 1;
}

template <typename T, typename TY>
cudaError_t launch_woq_gemm(void* y, const void* x, void* x_perm, const void* codes, const void* scale,
                            const void* offset, const void* bias, int32_t m, int32_t n, int32_t k, int32_t group_size,
                            cudaStream_t stream) {
  const int64_t num_chunks = (int64_t)m * k / 8;
  const unsigned permute_grid = (unsigned)std::min<int64_t>(ceil_div(num_chunks, 256), 65535);
  launch_pdl(woq_permute_kernel<T>, permute_grid, 256, 0, stream, static_cast<T*>(x_perm), static_cast<const T*>(x),
             num_chunks, k);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  CUtensorMap map_x;
  const CUtensorMapDataType type =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  if (!hopper::encode_sw128_rows(&map_x, x_perm, type, sizeof(T), m, k, kTileTokens)) return cudaErrorInvalidValue;
  const int32_t vecs_per_group = group_size / 32, num_groups = k / group_size;
  const uint64_t group_mul = ((uint64_t(1) << 32) + vecs_per_group - 1) / vecs_per_group;
  const int cluster = woq_gemm_cluster(n);
  const int64_t tiles = ceil_div(m, kTileTokens) * ceil_div(ceil_div(n, kTileRows), cluster);
  auto kernel = cluster == 2 ? woq_gemm_kernel<T, TY, 2> : woq_gemm_kernel<T, TY, 1>;
  return hopper::launch_persistent(kernel, tiles, cluster, kThreads, kSmemBytes, stream, map_x,
                                   static_cast<TY*>(y), static_cast<const uint8_t*>(codes),
                                   static_cast<const T*>(scale), static_cast<const T*>(offset),
                                   static_cast<const T*>(bias), group_mul, num_groups, m, n, k);
}

}  // namespace

bool woq_gemm_int4_supported(int cc_major, int cc_minor, int64_t k, int64_t group_size) {
  return cc_major == 9 && cc_minor == 0 && k > 0 && k % kStepK == 0 && group_size > 0 && group_size % 32 == 0 &&
         k % group_size == 0 && woq_gemv_supported(k, group_size, true) && hopper::tensor_map_encoder() != nullptr &&
         hopper::hopper_gemm_enabled();
}

size_t woq_gemm_int4_workspace_bytes(int64_t m, int64_t k) { return static_cast<size_t>(m) * k * sizeof(uint16_t); }

cudaError_t woq_gemm_int4(void* y, const void* x, void* x_perm, const void* codes, const void* scale,
                          const void* offset, const void* bias, int32_t m, int32_t n, int32_t k, int32_t group_size,
                          DType dtype, DType y_dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(y && x && x_perm && codes && scale && m >= 0 && n > 0 && k > 0 && k % kStepK == 0);
  RTLLM_KERNEL_CHECK(group_size > 0 && group_size % 32 == 0 && k % group_size == 0 && k / 32 < (1 << 16));
  RTLLM_KERNEL_CHECK(aligned16(x) && aligned16(x_perm) && aligned16(codes));
  RTLLM_KERNEL_CHECK(ceil_div(m, kTileTokens) * ceil_div(n, kTileRows) <= INT32_MAX);
  RTLLM_KERNEL_CHECK(y_dtype == dtype || y_dtype == DType::kFP32);
  if (m == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    err = y_dtype == DType::kFP32
              ? launch_woq_gemm<T, float>(y, x, x_perm, codes, scale, offset, bias, m, n, k, group_size, stream)
              : launch_woq_gemm<T, T>(y, x, x_perm, codes, scale, offset, bias, m, n, k, group_size, stream);
  });
  return err;
}

}  // namespace rtllm::kernels
