// The FP8 (E4M3) GEMM of fp8_linear on Hopper (sm_90a): y [m, n] = q [m, k] · W [n, k]ᵀ with the scales
// (per tensor, or per token x per channel) and the bias applied to the float32 accumulators in the kernel's
// epilogue, the contract of fp8_scale_epilogue (rtllm/kernels/fp8.cuh). cuBLASLt has no Hopper FP8 GEMM
// with a per-token x per-channel epilogue, so without this kernel that format takes a second pass over
// float32 accumulators.
//
// One CTA computes a 128 x 256 tile of y (rows: tokens, columns: output channels) over K in 128-byte
// blocks, with two consumer warpgroups and one producer warpgroup (384 threads; the producer hands its
// registers to the consumers, 232 a thread, hopper::consumer_take_registers):
// - the producer (warpgroup 2, one thread) streams the K blocks of the tile's 128 activation rows and 256
//   weight rows into a kStages-deep ring of shared memory with TMA (cp.async.bulk.tensor, 128-byte
//   swizzle; out-of-range rows and columns arrive as zeros), each stage signalled by a "full" mbarrier
//   that counts the bytes landed, and refills a stage once both consumers have released it ("empty").
// - warpgroups 0 and 1, the consumers, take 64 rows each. Per K block and half of the tile's columns, four
//   wgmma m64n128k32 (E4M3 x E4M3 -> float32) read both operands from shared memory through matrix
//   descriptors into a block accumulator, which is then added to the thread's float32 sums on the CUDA
//   cores. Hopper's FP8 MMAs keep only about 14 bits of a running sum, so summing all of K inside them
//   would lose accuracy with K; promoting every 128 codes bounds that loss as cuBLASLt's default (not "fast
//   accumulation") FP8 GEMM does. While one warpgroup adds, the other's MMAs keep the tensor cores busy.
// - epilogue: each consumer thread scales its sums and stores them (2 columns per store).
//
// Why 128 x 256: per K block a CTA reads (128 + 256) x 128 bytes for 128 x 256 x 128 MACs; 128 x 128 tiles
// read a third more per MAC, more than the L2 delivers at the tensor cores' rate (measured: 720-900 TFLOP/s
// on an H100 with 128 x 128 tiles). Clusters of two CTAs sharing the weight tile (fp8_gemm_kernel's
// kCluster) would read (128 + 128) x 128 bytes per CTA and K block, but ran slower (fp8_gemm_cluster).
//
// wgmma D fragment (m64nN, float32; warp w of the warpgroup holds rows 16w .. 16w + 15, g = lane / 4,
// t = lane % 4): d[4j], d[4j+1] = D[16w + g][8j + 2t, +1], d[4j+2], d[4j+3] = D[16w + g + 8][8j + 2t, +1].
// Shared memory operands and descriptors: hopper.cuh.
#include "hopper.cuh"
#include "rtllm/kernels/fp8.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kTileM = kFp8GemmTileM, kTileN = kFp8GemmTileN, kBlockK = 128;  // kBlockK: bytes (codes) per stage
constexpr int kStages = 4;
[[maybe_unused]] constexpr int kConsumers = 2;        // warpgroups of 64 rows
[[maybe_unused]] constexpr int kHalfN = 128;          // columns per MMA (m64n128k32) and per promotion
constexpr int kThreads = hopper::kSpecializedThreads;  // the consumers' warpgroups, then the producer's
constexpr int kStageABytes = kTileM * kBlockK;        // 16 KB
constexpr int kStageBBytes = kTileN * kBlockK;        // 32 KB
constexpr int kStageBytes = kStageABytes + kStageBBytes;
constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + 1024 /* alignment */ + 2 * kStages * sizeof(uint64_t);

#ifdef RTLLM_HOPPER_WGMMA
using namespace hopper;  // NOLINT: mbarriers, TMA, descriptors

// d (64 x 128, float32) = A (64 x 32, E4M3, descriptor) · B (32 x 128, E4M3, descriptor) (+ d if accumulate).
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                      bool accumulate) {
  asm volatile(
      "{\n\t.reg .pred scale_d;\n\tsetp.ne.b32 scale_d, %66, 0;\n\t"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " RTLLM_WGMMA_ACC64_REGS ", %64, %65, scale_d, 1, 1;\n\t"
      "}"
      : RTLLM_WGMMA_ACC64(d)
      : "l"(desc_a), "l"(desc_b), "r"(accumulate ? 1 : 0)
      : "memory");
}
#endif  // RTLLM_HOPPER_WGMMA

template <typename TY>
__device__ __forceinline__ void store_pair(TY* y, int64_t i, float v0, float v1, bool both, bool vector_ok) {
  if (both && vector_ok) {
    if constexpr (std::is_same_v<TY, float>) {
      *reinterpret_cast<float2*>(y + i) = make_float2(v0, v1);
    } else {
      TY pair[2] = {from_float<TY>(v0), from_float<TY>(v1)};
      *reinterpret_cast<uint32_t*>(y + i) = *reinterpret_cast<const uint32_t*>(pair);
    }
    return;
  }
  y[i] = from_float<TY>(v0);
  if (both) y[i + 1] = from_float<TY>(v1);
}

// y = (acc · a_scale) · w_scale (+ bias), as fp8_scale_epilogue. The 128 + 64 float32 accumulators of a
// consumer thread need more than the 168 registers every thread may start with: the consumers take the
// producer warpgroup's (hopper::consumer_take_registers).
//
// kCluster 2: clusters of two CTAs take the two row tiles of a 256 x 256 block of y and share its weight
// tile: each CTA's producer loads its own 128 activation rows and one half (128 rows) of the weight tile,
// multicast into both CTAs' stages, so a CTA reads a third fewer bytes per MAC from L2. A stage is then
// refilled only once the consumers of both CTAs have released it (their "empty" arrivals go to both CTAs),
// and neither CTA exits while its peer may still write into it.
template <typename TB, typename TY, int kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_w, TY* y,
                    const float* a_scale, bool a_per_row, const float* w_scale, bool w_per_channel, const TB* bias,
                    int32_t m, int32_t n, int32_t k) {
#ifdef RTLLM_HOPPER_WGMMA
  static_assert(kCluster == 1 || kCluster == 2, "clusters of 1 or 2 CTAs");
  extern __shared__ uint8_t smem_raw[];
  // Swizzled tiles need 1024-byte alignment; the barriers follow the stages.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int warpgroup = threadIdx.x / 128;
  const uint32_t rank = kCluster > 1 ? cluster_rank() : 0;
  const int32_t num_blocks = (k + kBlockK - 1) / kBlockK;
  // Tiles of the cluster: kCluster row tiles (one per CTA, by rank) x one column tile.
  const int32_t tiles_m = (m + kTileM - 1) / kTileM, cluster_tiles_m = (tiles_m + kCluster - 1) / kCluster;
  const int32_t num_tiles = cluster_tiles_m * ((n + kTileN - 1) / kTileN);
  const int32_t first_tile = blockIdx.x / kCluster, tile_step = gridDim.x / kCluster;
  auto tile_origin = [&](int32_t tile, int32_t& m0, int32_t& n0) {
    m0 = ((tile % cluster_tiles_m) * kCluster + (int32_t)rank) * kTileM;  // past m: TMA zeros, nothing stored
    n0 = tile / cluster_tiles_m * kTileN;
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);  // the producer's expect_tx; the TMA bytes (its own and the peer's) complete it
      mbar_init(&empty[s], kConsumers * 4 * kCluster);  // lane 0 of each consumer warp of the cluster
    }
    mbar_init_fence();
  }
  if constexpr (kCluster > 1) cluster_sync();  // the peer's barriers exist before anything arrives on them
  else __syncthreads();
  pdl_begin();  // q and the token scales come from the kernel before

  if (warpgroup == kConsumers) {
    producer_release_registers();
    if (threadIdx.x == kConsumers * 128) {
      prefetch_tensor_map(&map_q);
      prefetch_tensor_map(&map_w);
      uint32_t it = 0;  // K blocks loaded so far, over all of this CTA's tiles: stage it % kStages
      for (int32_t tile = first_tile; tile < num_tiles; tile += tile_step) {
        int32_t m0, n0;
        tile_origin(tile, m0, n0);
        for (int32_t b = 0; b < num_blocks; ++b, ++it) {
          const uint32_t s = it % kStages;
          if (it >= kStages) mbar_wait(&empty[s], ((it / kStages) - 1) & 1);  // its last use has been read
          uint8_t* stage = smem + s * kStageBytes;
          mbar_expect_tx(&full[s], kStageBytes);  // whole boxes, out-of-range parts zero-filled
          tma_load_2d(stage, &map_q, b * kBlockK, m0, &full[s]);
          if constexpr (kCluster > 1) {  // this CTA's half of the weight rows, into both CTAs
            constexpr int kHalfBytes = kStageBBytes / kCluster;
            tma_load_2d_multicast(stage + kStageABytes + rank * kHalfBytes, &map_w, b * kBlockK,
                                  n0 + (int32_t)rank * (kTileN / kCluster), &full[s], (1u << kCluster) - 1);
          } else {
            tma_load_2d(stage + kStageABytes, &map_w, b * kBlockK, n0, &full[s]);
          }
        }
      }
    }
  } else {
    consumer_take_registers();
    const int consumer = warpgroup, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    // 2-value stores need an even flat index: every column pair of a row starts at an even index when n is even.
    const bool vector_ok = (n % 2) == 0;
    float sum[kTileN / 2], d[kHalfN / 2];  // the tile's float32 sums; one K block's MMA result for half the columns
#pragma unroll
    for (int i = 0; i < kHalfN / 2; ++i) d[i] = 0.0f;
    uint32_t it = 0;  // as the producer's
    for (int32_t tile = first_tile; tile < num_tiles; tile += tile_step) {
      int32_t m0, n0;
      tile_origin(tile, m0, n0);
#pragma unroll
      for (int i = 0; i < kTileN / 2; ++i) sum[i] = 0.0f;
      for (int32_t b = 0; b < num_blocks; ++b, ++it) {
        const uint32_t s = it % kStages;
        mbar_wait(&full[s], (it / kStages) & 1);
        const uint32_t a = smem_u32(smem + s * kStageBytes + consumer * 64 * kBlockK);
#pragma unroll
        for (int half = 0; half < kTileN / kHalfN; ++half) {
          const uint32_t w = smem_u32(smem + s * kStageBytes + kStageABytes + half * kHalfN * kBlockK);
          fence_regs(d);
          asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
          for (int i = 0; i < kBlockK / 32; ++i)
            wgmma_m64n128k32_e4m3(d, sw128_desc(a + 32 * i), sw128_desc(w + 32 * i), /*accumulate=*/i > 0);
          asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
          asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
          fence_regs(d);
          if (half == kTileN / kHalfN - 1 && lane == 0) {  // this warp has read the stage
            if constexpr (kCluster > 1) {
#pragma unroll
              for (int c = 0; c < kCluster; ++c) mbar_arrive_cluster(&empty[s], c);
            } else {
              mbar_arrive(&empty[s]);
            }
          }
#pragma unroll
          for (int i = 0; i < kHalfN / 2; ++i) sum[half * kHalfN / 2 + i] += d[i];
        }
      }

      // The epilogue; meanwhile the producer already loads the next tile's first blocks.
      const int32_t row0 = m0 + consumer * 64 + warp * 16 + g;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int32_t row = row0 + 8 * h;
        if (row >= m) continue;
        const float sa = a_scale[a_per_row ? row : 0];
#pragma unroll
        for (int j = 0; j < kTileN / 8; ++j) {
          const int32_t col = n0 + 8 * j + 2 * t;
          if (col >= n) continue;
          const bool both = col + 1 < n;
          float v[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int32_t c = both || e == 0 ? col + e : col;
            float x = sum[4 * j + 2 * h + e] * sa;  // half j / 16 of the columns, its d index 4 (j % 16) + 2h + e
            x = x * w_scale[w_per_channel ? c : 0];
            if (bias) x += to_float(bias[c]);
            v[e] = x;
          }
          store_pair(y, (int64_t)row * n + col, v[0], v[1], both, vector_ok);
        }
      }
    }
  }  // consumers
  cluster_exit<kCluster>();
#else
  __trap();  // built only for sm_90a; fp8_gemm refuses other devices before launching
#endif
}

// Single CTAs unless RTLLM_FP8_GEMM_CLUSTER=2 asks for clusters of two sharing weight tiles (kCluster 2; an
// A/B switch for benchmarks, and never when y has a single row tile). On an H100 the clusters ran at about
// half the single CTAs' rate (409-512 against 720-1159 TFLOP/s, M = 1,024..8,192, per token); why is not
// settled, and the weight-only GEMM's clusters show the same.
inline int fp8_gemm_cluster(int32_t m) {
  static const bool pairs = env_is("RTLLM_FP8_GEMM_CLUSTER", "2");
  return pairs && m > kTileM ? 2 : 1;
}

template <typename TB, typename TY>
cudaError_t launch_gemm(void* y, const void* q, const float* a_scale, bool a_per_row, const void* weight,
                        const float* w_scale, bool w_per_channel, const void* bias, int32_t m, int32_t n, int32_t k,
                        cudaStream_t stream) {
  const int cluster = fp8_gemm_cluster(m);
  CUtensorMap map_q, map_w;  // a CTA of a cluster of two loads half of the weight tile's rows
  if (!hopper::encode_sw128_rows(&map_q, q, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, m, k, kTileM) ||
      !hopper::encode_sw128_rows(&map_w, weight, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, n, k, kTileN / cluster))
    return cudaErrorInvalidValue;
  // Tiles numbered down the rows first: the CTAs running at once share weight tiles in L2.
  const int64_t tiles = ceil_div(ceil_div(m, kTileM), cluster) * ceil_div(n, kTileN);
  auto kernel = cluster == 2 ? fp8_gemm_kernel<TB, TY, 2> : fp8_gemm_kernel<TB, TY, 1>;
  return hopper::launch_persistent(kernel, tiles, cluster, kThreads, kSmemBytes, stream, map_q, map_w,
                                   static_cast<TY*>(y), a_scale, a_per_row, w_scale, w_per_channel,
                                   static_cast<const TB*>(bias), m, n, k);
}

}  // namespace

bool fp8_gemm_supported(int cc_major, int cc_minor, int64_t m, int64_t n, int64_t k) {
  return cc_major == 9 && cc_minor == 0 && m >= 1 && n >= 1 && k > 0 && k % 16 == 0 && m <= INT32_MAX &&
         n <= INT32_MAX && k <= INT32_MAX && hopper::tensor_map_encoder() != nullptr &&
         hopper::hopper_gemm_enabled();
}

cudaError_t fp8_gemm(void* y, const void* q, const float* a_scale, bool a_per_row, const void* weight,
                     const float* w_scale, bool w_per_channel, const void* bias, int64_t m, int64_t n, int64_t k,
                     DType bias_dtype, DType y_dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(y && q && a_scale && weight && w_scale && m >= 0 && n >= 0 && k > 0 && k % 16 == 0);
  RTLLM_KERNEL_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX);
  RTLLM_KERNEL_CHECK(ceil_div(m, kTileM) * ceil_div(n, kTileN) <= INT32_MAX);  // the kernel's tile index
  RTLLM_KERNEL_CHECK(aligned16(q) && aligned16(weight));
  RTLLM_KERNEL_CHECK(y_dtype == bias_dtype || y_dtype == DType::kFP32);
  if (m == 0 || n == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  RTLLM_DISPATCH_DTYPE(bias_dtype, TB, {
    err = y_dtype == DType::kFP32
              ? launch_gemm<TB, float>(y, q, a_scale, a_per_row, weight, w_scale, w_per_channel, bias, (int32_t)m,
                                       (int32_t)n, (int32_t)k, stream)
              : launch_gemm<TB, TB>(y, q, a_scale, a_per_row, weight, w_scale, w_per_channel, bias, (int32_t)m,
                                    (int32_t)n, (int32_t)k, stream);
  });
  return err;
}

}  // namespace rtllm::kernels
