// attention_prefill on Hopper (sm_90a) with wgmma, for 16-bit pools at head_dim 128 (attention_prefill.cu
// takes it where prefill_sm90_supported; the FlashAttention-2 kernel there serves the rest).
//
// Rows and tiles as prefill_mma_kernel: the GQA group's query heads are stacked as rows (row R = new token R /
// group, head R % group of the CTA's KV head), a CTA takes 128 rows of one (sequence, KV head), and K/V
// tiles of 128 keys serve the whole group. Two consumer warpgroups of 64 rows and a producer warpgroup (whose
// registers the consumers take, hopper::consumer_take_registers):
// - Q arrives once through a 3-d tensor map (dims, the group's heads, tokens; rows past the sequence's new
//   tokens belong to the next sequence or lie past the step and are never stored).
// - K and V arrive page by page (tokens_per_block rows per box, a 2-d map over the pool's rows) into a
//   kStages-deep ring; K and V of a stage have their own "full" barriers, so S = Q·Kᵀ starts before V lands.
// - S: 8 wgmma m64n128k16 (A = Q, B = K, both K-major 128-byte swizzle). Online softmax in registers (exp2,
//   scale·log2e folded in). P is the A operand of O += P·V straight from the S accumulators (the D fragment
//   of m64nN is the A fragment of its k16 slices); V is B in its [keys][dims] layout (MN-major, trans-b).
// - Keys past the sequence: scores -inf; their V rows are zeroed in shared memory before P·V, since the
//   pool past seq_len may hold anything and 0 · NaN is NaN. Pages past the sequence are never loaded.
#include "attention_prefill_sm90.cuh"
#include "hopper.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kDim = 128, kRows = 128, kKeys = 128, kStages = 2;
constexpr int kThreads = hopper::kSpecializedThreads;  // two consumer warpgroups, then the producer's
constexpr int kAtomBytes = 128 * 128;             // 128 rows x 64 16-bit values
constexpr int kTileBytes = 2 * kAtomBytes;        // 128 rows x 128 dims
constexpr size_t kSmemBytes = size_t(1 + 2 * kStages) * kTileBytes + 1024 + (3 * kStages + 1) * sizeof(uint64_t);

#ifdef RTLLM_HOPPER_WGMMA
using namespace hopper;  // NOLINT: mbarriers, TMA, descriptors

// d (64 x 128) (+)= A · B, A (64 x 16) and B (16 x 128) from shared memory, both K-major.
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t da, uint64_t db, bool accumulate) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %66, 0;\n\t"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " RTLLM_WGMMA_ACC64_REGS
                 ", %64, %65, p, 1, 1, 0, 0;\n\t}"
                 : RTLLM_WGMMA_ACC64(d)
                 : "l"(da), "l"(db), "r"(accumulate ? 1 : 0)
                 : "memory");
  } else {
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %66, 0;\n\t"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " RTLLM_WGMMA_ACC64_REGS
                 ", %64, %65, p, 1, 1, 0, 0;\n\t}"
                 : RTLLM_WGMMA_ACC64(d)
                 : "l"(da), "l"(db), "r"(accumulate ? 1 : 0)
                 : "memory");
  }
}
// MN-major, 128-byte-swizzled B (V: keys along K, dims along N in 64-value atoms 16 KB apart, 8-key groups
// 1024 bytes apart): the atom stride in the leading-dimension field, the 8-key group stride in the stride
// field as for the K-major operands (swapping the two gave wrong sums on an H100).
__device__ __forceinline__ uint64_t mn_major_desc(uint32_t smem) {
  const uint64_t atom_stride = kAtomBytes >> 4, group_stride = 1024 >> 4;
  return uint64_t((smem & 0x3FFFF) >> 4) | (atom_stride << 16) | (group_stride << 32) | (1ull << 62);
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}
#endif  // RTLLM_HOPPER_WGMMA

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_sm90_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_kv,
                        T* out, StepMetaDevice meta, const int32_t* block_table, int32_t max_blocks_per_seq,
                        int num_heads, int num_kv_heads, int group, int tpb, float scale_log2) {
#ifdef RTLLM_HOPPER_WGMMA
  const int s = blockIdx.z, kv_head = blockIdx.y;
  const int num_cached = meta.num_cached[s], seq_len = meta.seq_len[s], new_tokens = seq_len - num_cached;
  const int tokens_per_tile = kRows / group;
  const int t0 = (gridDim.x - 1 - blockIdx.x) * tokens_per_tile;  // tiles with the most keys start first
  if (t0 >= new_tokens) return;  // the whole CTA, before any barrier
  const int token0 = meta.seq_token_start[s];
  const int32_t* table = block_table + (int64_t)s * max_blocks_per_seq;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* q_tile = smem;
  auto k_tile = [&](int st) { return smem + (1 + 2 * st) * kTileBytes; };
  auto v_tile = [&](int st) { return smem + (2 + 2 * st) * kTileBytes; };
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + (1 + 2 * kStages) * kTileBytes);
  uint64_t *full_k = bars, *full_v = bars + kStages, *empty = bars + 2 * kStages, *full_q = bars + 3 * kStages;
  const int last_token = min(t0 + tokens_per_tile, new_tokens) - 1;
  const int num_key_tiles = (num_cached + last_token + 1 + kKeys - 1) / kKeys;  // causal: the last row's keys
  const int warpgroup = threadIdx.x / 128;

  // Zeros in the ring before any TMA write: pages past the sequence are never loaded into it.
  for (int i = threadIdx.x; i < 2 * kStages * kTileBytes / 16; i += kThreads)
    reinterpret_cast<uint4*>(smem + kTileBytes)[i] = make_uint4(0, 0, 0, 0);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to TMA and wgmma (the async proxy)
  if (threadIdx.x == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(&full_k[st], 1);
      mbar_init(&full_v[st], 1);
      mbar_init(&empty[st], 8);  // lane 0 of each consumer warp
    }
    mbar_init(full_q, 1);
    mbar_init_fence();
  }
  __syncthreads();
  pdl_begin();  // q and the new tokens' K/V come from the kernels before

  if (warpgroup == 2) {
    producer_release_registers();
    if (threadIdx.x == 256) {
      prefetch_tensor_map(&map_q);
      prefetch_tensor_map(&map_kv);
      mbar_expect_tx(full_q, kTileBytes);
      for (int a = 0; a < 2; ++a)  // 3-d box: 64 dims x the group's heads x tokens_per_tile tokens
        asm volatile(
            "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
            "[%5];" ::"r"(smem_u32(q_tile + a * kAtomBytes)),
            "l"(reinterpret_cast<uint64_t>(&map_q)), "r"(64 * a), "r"(kv_head * group), "r"(token0 + t0),
            "r"(smem_u32(full_q))
            : "memory");
      const int pages_per_tile = kKeys / tpb, seq_pages = (seq_len + tpb - 1) / tpb;
      for (int j = 0; j < num_key_tiles; ++j) {
        const int st = j % kStages;
        if (j >= kStages) mbar_wait(&empty[st], ((j / kStages) - 1) & 1);
        const int first_page = j * pages_per_tile, pages = min(pages_per_tile, seq_pages - first_page);
        for (int kv = 0; kv < 2; ++kv) {
          uint64_t* bar = kv ? &full_v[st] : &full_k[st];
          uint8_t* tile = kv ? v_tile(st) : k_tile(st);
          mbar_expect_tx(bar, (uint32_t)pages * tpb * 128 * 2);  // both atoms of each page's rows
          for (int p = 0; p < pages; ++p) {
            const int row = ((table[first_page + p] * 2 + kv) * num_kv_heads + kv_head) * tpb;
            for (int a = 0; a < 2; ++a) tma_load_2d(tile + a * kAtomBytes + p * tpb * 128, &map_kv, 64 * a, row, bar);
          }
        }
      }
    }
    return;
  }
  consumer_take_registers();

  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row_base = warpgroup * 64 + warp * 16 + g;  // stacked rows row_base and row_base + 8
  int pos[2];                                           // their query positions: keys <= pos attend
  for (int h = 0; h < 2; ++h) pos[h] = num_cached + t0 + (row_base + 8 * h) / group;
  float o[64], sacc[64], m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  mbar_wait(full_q, 0);
  const uint32_t q_base = smem_u32(q_tile) + warpgroup * 64 * 128;  // this warpgroup's 64 rows in each atom

  for (int j = 0; j < num_key_tiles; ++j) {
    const int st = j % kStages, key0 = j * kKeys;
    mbar_wait(&full_k[st], (j / kStages) & 1);
    const uint32_t kb = smem_u32(k_tile(st));
    fence_regs(sacc);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < kDim / 16; ++kk) {  // 16 dims = 32 bytes; dims 64.. in the second atom
      const uint32_t off = (kk / 4) * kAtomBytes + 32 * (kk % 4);
      wgmma_ss<T>(sacc, sw128_desc(q_base + off), sw128_desc(kb + off), kk > 0);
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_regs(sacc);
    // Online softmax; sacc[4c + 2h + e] = S[row_base + 8h][key0 + 8c + 2t + e].
    float corr[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < 16; ++c)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = key0 + 8 * c + 2 * t + e;
          float& v = sacc[4 * c + 2 * h + e];
          v = key <= pos[h] && key < seq_len ? v * scale_log2 : -INFINITY;
          mx = fmaxf(mx, v);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[h], mx), m_use = m_new == -INFINITY ? 0.0f : m_new;
      corr[h] = exp2f(m_run[h] - m_use);
      m_run[h] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < 16; ++c)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& v = sacc[4 * c + 2 * h + e];
          v = exp2f(v - m_use);
          sum += v;
        }
      l_run[h] = l_run[h] * corr[h] + sum;  // the lane's keys; the quad's sums meet at the end
    }
#pragma unroll
    for (int c = 0; c < 16; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) o[4 * c + 2 * h + e] *= corr[h];
    uint32_t pa[8][4];  // P as A fragments: k16 slice kap = key blocks 2kap, 2kap + 1
#pragma unroll
    for (int kap = 0; kap < 8; ++kap) {
      pa[kap][0] = pack_pair<T>(sacc[8 * kap + 0], sacc[8 * kap + 1]);
      pa[kap][1] = pack_pair<T>(sacc[8 * kap + 2], sacc[8 * kap + 3]);
      pa[kap][2] = pack_pair<T>(sacc[8 * kap + 4], sacc[8 * kap + 5]);
      pa[kap][3] = pack_pair<T>(sacc[8 * kap + 6], sacc[8 * kap + 7]);
    }
    mbar_wait(&full_v[st], (j / kStages) & 1);
    if (key0 + kKeys > seq_len) {  // V rows of keys past the sequence: zeros, whatever the pool held
      uint8_t* vt = v_tile(st);
      const int first_bad = seq_len - key0;
      for (int i = threadIdx.x % 128; i < (kKeys - first_bad) * 16; i += 128) {
        const int r = first_bad + i / 16, chunk = i % 16;  // 8 chunks of 16 bytes per atom row
        *reinterpret_cast<uint4*>(vt + (chunk / 8) * kAtomBytes + r * 128 + 16 * (chunk % 8)) = make_uint4(0, 0, 0, 0);
      }
      asm volatile("bar.sync %0, 128;" ::"r"(1 + warpgroup) : "memory");  // this warpgroup's threads
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    const uint32_t vb = smem_u32(v_tile(st));
    fence_regs(o);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kap = 0; kap < 8; ++kap) wgmma_m64n128k16_rs<T, true>(o, pa[kap], mn_major_desc(vb + kap * 16 * 128));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_regs(o);
    if (lane == 0) mbar_arrive(&empty[st]);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  // o[4c + 2h + e] = O[row_base + 8h][dim 8c + 2t + e]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row_base + 8 * h, token = t0 + r / group, head = kv_head * group + r % group;
    if (token >= new_tokens) continue;
    const float inv = l_run[h] > 0.0f ? 1.0f / l_run[h] : 0.0f;
    T* dst = out + ((int64_t)(token0 + token) * num_heads + head) * kDim;
#pragma unroll
    for (int c = 0; c < 16; ++c)
      *reinterpret_cast<uint32_t*>(dst + 8 * c + 2 * t) = pack_pair<T>(o[4 * c + 2 * h] * inv, o[4 * c + 2 * h + 1] * inv);
  }
#else
  __trap();  // built only for sm_90a; prefill_sm90_supported refuses other devices
#endif
}

}  // namespace

bool prefill_sm90_supported(const PagedKv& kv, DType dtype, int32_t head_dim, int32_t group) {
  if (head_dim != kDim || kv.dtype != dtype || (dtype != DType::kBF16 && dtype != DType::kFP16)) return false;
  if (group < 1 || kRows % group != 0 || kv.tokens_per_block < 8 || kKeys % kv.tokens_per_block != 0) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  return major == 9 && minor == 0 && hopper::tensor_map_encoder() != nullptr;
}

cudaError_t prefill_sm90(void* out, const void* q, const StepMetaDevice& meta, const PagedKv& kv,
                         int32_t max_new_tokens, int32_t num_heads, int32_t group, float scale_log2, DType dtype,
                         cudaStream_t stream) {
  const CUtensorMapDataType type = dtype == DType::kFP16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  CUtensorMap map_q, map_kv;
  const cuuint64_t dims[3] = {kDim, (cuuint64_t)num_heads, (cuuint64_t)meta.num_tokens};
  const cuuint64_t strides[2] = {kDim * 2, (cuuint64_t)num_heads * kDim * 2};
  const cuuint32_t box[3] = {64, (cuuint32_t)group, (cuuint32_t)(kRows / group)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const auto encode = hopper::tensor_map_encoder();
  if (!encode ||
      encode(&map_q, type, 3, const_cast<void*>(q), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS ||
      !hopper::encode_sw128_rows(&map_kv, kv.data, type, 2, (int64_t)kv.num_blocks * 2 * kv.num_kv_heads * kv.tokens_per_block,
                                 kDim, kv.tokens_per_block))
    return cudaErrorInvalidValue;
  const dim3 grid((unsigned)((max_new_tokens + kRows / group - 1) / (kRows / group)), kv.num_kv_heads, meta.num_seqs);
  cudaError_t err = cudaSuccess;
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    err = cudaFuncSetAttribute(prefill_sm90_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSmemBytes);
    if (err != cudaSuccess) return err;
    launch_pdl(prefill_sm90_kernel<T>, grid, kThreads, kSmemBytes, stream, map_q, map_kv, static_cast<T*>(out), meta,
               kv.block_table, kv.max_blocks_per_seq, num_heads, kv.num_kv_heads, group, kv.tokens_per_block,
               scale_log2);
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
