// attention_decode: one new token per sequence attends over its whole paged context (flash-decoding).
//
// Grid (num_seqs, num_kv_heads x head chunks, num_splits). A CTA serves up to kMaxGroup query heads of one
// KV head (the GQA group, so each K/V byte is read once per group) over one split of the keys.
// Thread layout: HEAD_DIM / 8 lanes share one key, each holding 8 dims (one 16-byte load of K and of V);
// a warp covers 32 / (HEAD_DIM / 8) consecutive keys per load, so a warp's loads are contiguous in a block.
// A head of 80 or 96 dims takes the lanes of a 128-dim one (the shuffle reductions need a power of two);
// the lanes past HEAD_DIM load nothing, hold zeros (adding nothing to scores and norms) and store nothing.
// Each thread keeps its own online-softmax state (max, sum, 8 accumulators per head) over the keys it
// visits; the states merge across lanes, then warps, at the end.
//
// With num_splits > 1, each split writes its normalized output and log2-sum-exp to the workspace and
// decode_merge_kernel combines them.
//
// attention_decode_qkv also does qkv_prepare's work for the new token, so that a decode step needs no
// separate kernel for it: each CTA applies qk-norm and RoPE to its q heads as it loads them (the RoPE
// angles computed once per CTA into shared memory), and the CTA whose split holds the new position
// prepares the new key, takes it from shared memory in its key loop (no read back of its own global
// write) and stores the key and value into the pool.
//
// An FP8 (e4m3) pool: each lane still loads 16 bytes of a key and of a value, i.e. 16 dims instead of 8,
// so half as many lanes share a key and a CTA serves at most 4 query heads (the same registers as 8 heads
// of a 16-bit pool). Codes convert with the hardware e4m3x2 -> f16x2 instruction; k_scale is folded into the
// softmax scale and v_scale into the output, so the inner loop is the 16-bit one on codes. An INT8 pool
// goes the same way (16 codes per 16-byte load, as many heads per CTA as FP8); its codes convert to float
// with a byte permute and a subtraction each (attention_common.cuh).
//
// A 16-bit pool at head_dim 64 or 128 without the fused preparation runs decode_mma_kernel instead, and an
// FP8 pool decode_mma_fp8_kernel: the same grid and split protocol, with the products on tensor cores (see
// their comments).
//
// The splits merge in a second kernel rather than through a thread-block cluster's distributed shared
// memory, and the RoPE angles come from shared memory rather than sincosf per head inside the unrolled
// loads: both alternatives decode slower (docs/performance.md, "Design decisions and their measurements").
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "attention_common.cuh"

namespace rtllm::kernels {
namespace {

using namespace attn;

constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;
constexpr int kMaxGroup = 8;  // query heads per CTA; larger groups are split into chunks of heads
// A split shorter than two steps of a CTA's key loop (4 warps x 2 keys x 2 unrolled = 16 keys at head_dim
// 128) leaves the ring of loads in flight mostly empty.
constexpr int32_t kMinKeysPerSplit = 32;

// The keys each split of a sequence of seq_len keys covers, and the splits that leaves: splits of
// kMinKeysPerSplit keys until the launch's num_splits (fixed per captured graph, sized for max_seq_len)
// would not cover seq_len, longer ones beyond. Read on the device so a graph replay follows the lengths;
// at batch 1 and a few hundred keys, an engine built for 4096 tokens otherwise ran 66 splits of ~6 keys.
// While seq_len <= kMinKeysPerSplit * num_splits, split i starts at key i * kMinKeysPerSplit whatever the
// length, which lets the kernel fetch its block-table entries before it knows the length.
__device__ __forceinline__ int keys_per_split(int num_splits, int seq_len) {
  return max(kMinKeysPerSplit, (seq_len + num_splits - 1) / num_splits);
}
__device__ __forceinline__ int splits_used(int num_splits, int seq_len) {
  return max(1, (seq_len + keys_per_split(num_splits, seq_len) - 1) / keys_per_split(num_splits, seq_len));
}
// The keys [begin, end) of split `split` of a sequence of seq_len keys; `used` is false past the splits the
// sequence needs, where the whole CTA returns (nothing merges its unwritten partials).
struct SplitKeys {
  bool used;
  int begin, end;
};
__device__ __forceinline__ SplitKeys split_keys(int num_splits, int seq_len, int split) {
  const int per_split = keys_per_split(num_splits, seq_len), begin = split * per_split;
  return {split < splits_used(num_splits, seq_len), begin, min(seq_len, begin + per_split)};
}

template <typename T>
struct DecodeArgs {
  T* out;                // [num_seqs, num_heads * head_dim]
  const T* q;            // sequence s's query heads at q + s * row_stride
  const T* k_new;        // with fused preparation: the new key / value heads at + s * row_stride; else null
  const T* v_new;
  int64_t row_stride;
  const float* inv_freq;  // fused preparation: RoPE [head_dim / 2] or null; qk-norm weights [head_dim] or null
  const T* q_norm;
  const T* k_norm;
  float norm_eps;
  StepMetaDevice meta;
  PagedKv kv;
  int num_heads, group, num_head_chunks, num_splits;
  float scale_log2;    // softmax scale · log2(e), times kv.k_scale with an FP8 or INT8 pool
  float* partial_o;    // num_splits > 1: [num_seqs, num_heads, num_splits, head_dim]
  float* partial_lse;  // [num_seqs, num_heads, num_splits]
};

// A CTA's place in decode's grid: sequence s, KV head, chunk of that head's query heads (max_group a chunk),
// split; the chunk's first query head h0 and its num_h heads.
struct DecodeCta {
  int s, kv_head, chunk, split, h0, num_h;
};
template <typename T>
__device__ __forceinline__ DecodeCta decode_cta(const DecodeArgs<T>& a, int max_group) {
  const int kv_head = blockIdx.y / a.num_head_chunks, chunk = blockIdx.y % a.num_head_chunks;
  return {(int)blockIdx.x, kv_head, chunk, (int)blockIdx.z, kv_head * a.group + chunk * max_group,
          min(max_group, a.group - chunk * max_group)};
}

// Dims per lane: one 16-byte load of a key (and of a value) from a pool of element type KV, 8 for a 16-bit
// pool and 16 for an FP8 or INT8 one. Such a lane thus holds twice the q and accumulator state of a 16-bit one.
template <typename KV>
constexpr int dims_per_lane() { return 16 / (int)sizeof(KV); }

// 16 bytes of the pool to kDims floats (FP8, INT8: the codes; the scales are folded in elsewhere).
template <typename T, typename KV>
__device__ __forceinline__ void unpack_kv(const uint4& raw, float* f) {
  if constexpr (is_fp8_kv<KV>()) unpack16_e4m3(raw, f);
  else if constexpr (is_int8_kv<KV>()) unpack16_i8(raw, f);
  else unpack8<T>(raw, f);
}

// One code's byte.
__device__ __forceinline__ uint32_t code_byte(__nv_fp8_e4m3 c) { return c.__x; }
__device__ __forceinline__ uint32_t code_byte(int8_t c) { return static_cast<uint8_t>(c); }

// 16 floats to 16 codes (e4m3 or int8) of f / scale (encode_kv), packed low byte first.
template <typename KV>
__device__ __forceinline__ uint4 encode16(const float* f, float scale) {
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i) w[i / 4] |= code_byte(encode_kv<KV>(f[i], scale)) << (8 * (i % 4));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// qkv_prepare's transform of one head held as DIMS dims per lane by head_dim_layout<HEAD_DIM>() / DIMS
// consecutive lanes (dims dim0 .. dim0 + DIMS - 1; the lanes with dim0 >= HEAD_DIM idle, their x zero):
// rms-normalization with `norm_weight` (if any), then rotate-half RoPE with the angles' cos / sin
// [HEAD_DIM / 2] (if rope), in float32, then (round_to_t) rounded to T like the stored values. Every lane of
// the warp must call it.
template <typename T, int HEAD_DIM, int DIMS>
__device__ __forceinline__ void prepare_head(float (&x)[DIMS], int dim0, const T* norm_weight, float eps, bool rope,
                                             const float* rope_cos, const float* rope_sin, bool round_to_t) {
  constexpr int kLayout = head_dim_layout<HEAD_DIM>();
  constexpr int kLanesPerKey = kLayout / DIMS, kHalf = HEAD_DIM / 2;
  const bool active = dim0 < HEAD_DIM;
  if (norm_weight) {
    float ss = 0.0f;  // the idle lanes add their zeros
#pragma unroll
    for (int i = 0; i < DIMS; ++i) ss += x[i] * x[i];
#pragma unroll
    for (int off = kLanesPerKey / 2; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const float inv_rms = 1.0f / sqrtf(ss / (float)HEAD_DIM + eps);
    float w[DIMS] = {};
    if (active) {
#pragma unroll
      for (int v = 0; v < DIMS / 8; ++v)
        unpack8<T>(*reinterpret_cast<const uint4*>(norm_weight + dim0 + 8 * v), w + 8 * v);
    }
#pragma unroll
    for (int i = 0; i < DIMS; ++i) x[i] = w[i] * (x[i] * inv_rms);
  }
  if (rope) {
    if constexpr (kLayout != HEAD_DIM) {
      // The partner of dim d is p = d ± HEAD_DIM / 2 (not ± kLayout / 2): dim p % DIMS of lane p / DIMS of the
      // key's lanes. HEAD_DIM / 2 is a multiple of 8, so p % DIMS is (i + HEAD_DIM / 2) % DIMS for every lane;
      // the lane differs per i where HEAD_DIM / 2 is not a multiple of DIMS (80 over 16-dim lanes). An idle
      // lane's p stays inside the key's lanes; it rotates nothing.
      float y[DIMS];
#pragma unroll
      for (int i = 0; i < DIMS; ++i) y[i] = x[i];
#pragma unroll
      for (int i = 0; i < DIMS; ++i) {
        const int d = dim0 + i, p = d < kHalf ? d + kHalf : d - kHalf;
        const float partner = __shfl_sync(0xffffffffu, y[(i + kHalf) % DIMS], p / DIMS, kLanesPerKey);
        if (active) {
          const float cs = rope_cos[d % kHalf], sn = rope_sin[d % kHalf];
          x[i] = d < kHalf ? y[i] * cs - partner * sn : y[i] * cs + partner * sn;
        }
      }
    } else if constexpr (kLanesPerKey >= 2) {
      // The partner of dim d is d ± HEAD_DIM / 2, held by the lane kLanesPerKey / 2 away.
      const bool first_half = dim0 < kHalf;
#pragma unroll
      for (int i = 0; i < DIMS; ++i) {
        const float partner = __shfl_xor_sync(0xffffffffu, x[i], kLanesPerKey / 2);
        const float cs = rope_cos[dim0 % kHalf + i], sn = rope_sin[dim0 % kHalf + i];
        x[i] = first_half ? x[i] * cs - partner * sn : x[i] * cs + partner * sn;
      }
    } else {  // one lane holds the whole head
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float a = x[i], b = x[i + kHalf];
        x[i] = a * rope_cos[i] - b * rope_sin[i];
        x[i + kHalf] = b * rope_cos[i] + a * rope_sin[i];
      }
    }
  }
  if (round_to_t) {
#pragma unroll
    for (int i = 0; i < DIMS; ++i) x[i] = to_float(from_float<T>(x[i]));
  }
}

// The end of a split's CTA, after its warps stored their states (running max and sum per head, unnormalized
// output per head and dim) in shared memory: merge the warps, one thread per (head, dim), and write the
// output (one split) or the split's normalized output and log2-sum-exp for decode_merge_kernel.
template <typename T, int HEAD_DIM, int MAX_GROUP, bool kCodes>
__device__ __forceinline__ void write_split(const DecodeArgs<T>& a, const float (*red_acc)[MAX_GROUP][HEAD_DIM],
                                            const float (*red_m)[MAX_GROUP], const float (*red_l)[MAX_GROUP], int s,
                                            int h0, int num_h, int split) {
  for (int idx = threadIdx.x; idx < num_h * HEAD_DIM; idx += kThreads) {
    const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) m_all = fmaxf(m_all, red_m[w][g]);
    const float m_use = safe_max(m_all);
    float l_all = 0.0f, a_all = 0.0f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) {
      const float c = exp2f(red_m[w][g] - m_use);
      l_all += red_l[w][g] * c;
      a_all += red_acc[w][g][d] * c;
    }
    float o = l_all > 0.0f ? a_all / l_all : 0.0f;
    if constexpr (kCodes) o *= a.kv.v_scale;  // the values were accumulated as codes
    const int64_t head = (int64_t)s * a.num_heads + h0 + g;
    if (a.num_splits == 1) {
      a.out[head * HEAD_DIM + d] = from_float<T>(o);
    } else {
      a.partial_o[(head * a.num_splits + split) * HEAD_DIM + d] = o;
      if (d == 0) a.partial_lse[head * a.num_splits + split] = l_all > 0.0f ? m_use + log2f(l_all) : -INFINITY;
    }
  }
}

// CTAs per SM the register budget keeps: groups of 4 fit 128 registers (attention_decode_plan plans on
// at most 4 CTAs per SM), groups of 1 and 2 fit 80. STATE counts a lane's per-head state in 8-dim units times
// the heads: an FP8 lane of a group of 2 holds as much as a 16-bit lane of a group of 4.
template <int STATE>
constexpr int min_ctas_per_sm() { return STATE <= 2 ? 6 : STATE == 4 ? 4 : 1; }

// PREPARE: attention_decode_qkv's kernel (a.k_new, a.v_new set). KV: the pool's element type (T, e4m3 or int8).
template <typename T, typename KV, int HEAD_DIM, int MAX_GROUP, bool PREPARE>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm<MAX_GROUP * dims_per_lane<KV>() / 8>())
    decode_split_kernel(DecodeArgs<T> a) {
  constexpr bool kCodes = is_quantized_kv<KV>();  // FP8 or INT8
  constexpr int kDims = dims_per_lane<KV>();
  constexpr int kQVecs = kDims / 8;  // 16-byte loads of a head's kDims T values (q, new k / v)
  // A head of 80 or 96 dims takes the lanes of 128; those past HEAD_DIM load zeros and store nothing.
  constexpr int kLanesPerKey = head_dim_layout<HEAD_DIM>() / kDims;
  static_assert(HEAD_DIM % kDims == 0, "a lane holds only real dims or only idle ones");
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  // Keys per thread per step, and steps whose loads are in flight (kStages - 1 while one computes): each
  // thread copies its own 16-byte K and V chunks into a private ring of shared memory with cp.async, so the
  // loads run ahead of the arithmetic without holding registers.
  constexpr int kUnroll = 2, kStages = 4;
  constexpr int kKeysPerStep = kNumWarps * kKeysPerWarp * kUnroll;
  constexpr int kRingBytes = kStages * kUnroll * 2 * kThreads * 16;
  constexpr int kReduceBytes = kNumWarps * MAX_GROUP * HEAD_DIM * 4;
  // The ring and the warps' reduction never live at once: they share the bytes.
  __shared__ __align__(16) unsigned char smem_raw[kRingBytes > kReduceBytes ? kRingBytes : kReduceBytes];
  auto ring = reinterpret_cast<uint4(*)[kUnroll][2][kThreads]>(smem_raw);
  auto red_acc = reinterpret_cast<float(*)[MAX_GROUP][HEAD_DIM]>(smem_raw);
  __shared__ float red_m[kNumWarps][MAX_GROUP], red_l[kNumWarps][MAX_GROUP];
  __shared__ float rope_cos[PREPARE ? HEAD_DIM / 2 : 1], rope_sin[PREPARE ? HEAD_DIM / 2 : 1];
  __shared__ uint4 new_kv[2][PREPARE ? kLanesPerKey : 1];  // the prepared new key and value, as stored
  pdl_begin();

  const auto [s, kv_head, chunk, split, h0, num_h] = decode_cta(a, MAX_GROUP);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int dim0 = (lane % kLanesPerKey) * kDims, key_slot = lane / kLanesPerKey;
  const bool active = dim0 < HEAD_DIM;

  // Everything the CTA starts from that does not depend on the sequence's length is fetched together with
  // the length, so that the preparation and the first keys cost no extra round trips to memory: q, the
  // new key / value (PREPARE), and (into L1) the block-table entries of the first keys, as split i starts
  // at key i * kMinKeysPerSplit for lengths up to kMinKeysPerSplit * num_splits (keys_per_split).
  const int seq_len = a.meta.seq_len[s];
  const int pos = PREPARE ? a.meta.positions[s] : -1;
  uint4 q_raw[MAX_GROUP][kQVecs];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g)
#pragma unroll
    for (int v = 0; v < kQVecs; ++v)
      q_raw[g][v] = g < num_h && active ? *reinterpret_cast<const uint4*>(a.q + s * a.row_stride +
                                                                          (int64_t)(h0 + g) * HEAD_DIM + dim0 + 8 * v)
                                        : make_uint4(0, 0, 0, 0);
  const int64_t new_col = s * a.row_stride + (int64_t)kv_head * HEAD_DIM + dim0;
  const bool load_new = PREPARE && active;
  uint4 k_new_raw[kQVecs], v_new_raw[kQVecs];
#pragma unroll
  for (int v = 0; v < kQVecs; ++v) {
    k_new_raw[v] = load_new ? *reinterpret_cast<const uint4*>(a.k_new + new_col + 8 * v) : make_uint4(0, 0, 0, 0);
    v_new_raw[v] = load_new ? *reinterpret_cast<const uint4*>(a.v_new + new_col + 8 * v) : make_uint4(0, 0, 0, 0);
  }
  const PagedKvIndex kv_index(a.kv, s, kv_head);
  {
    const int block_index = (split * kMinKeysPerSplit + warp * kKeysPerWarp) >> kv_index.shift;
    if (block_index < a.kv.max_blocks_per_seq) prefetch_l1(kv_index.table + block_index);
  }

  const SplitKeys keys = split_keys(a.num_splits, seq_len, split);
  if (!keys.used) return;
  const int k_begin = keys.begin, k_end = keys.end;
  // With PREPARE, the CTA whose split holds the new position prepares its key and value.
  const int new_key = PREPARE && pos == seq_len - 1 && pos >= k_begin && pos < k_end ? pos : -1;
  const KV* pool = static_cast<const KV*>(a.kv.data);

  // Step i's keys: base + (u * kNumWarps + warp) * kKeysPerWarp + key_slot, base = k_begin + i * kKeysPerStep.
  // Its loads go to ring slot i % kStages, one cp.async group per step (empty past the last step); a key
  // outside the split, an idle lane and the new key (taken from new_kv) zero-fill instead of reading. The
  // first kStages - 1 steps are issued here, ahead of the query's preparation.
  const int num_steps = (k_end - k_begin + kKeysPerStep - 1) / kKeysPerStep;
  auto issue_step = [&](int i) {
    if (i < num_steps) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int key = k_begin + i * kKeysPerStep + (u * kNumWarps + warp) * kKeysPerWarp + key_slot;
        const bool load = active && key < k_end && key != new_key;
        const KV* k = load ? pool + kv_index.key_offset(key) + dim0 : pool;
        cp_async_16(&ring[i % kStages][u][0][threadIdx.x], k, load);
        cp_async_16(&ring[i % kStages][u][1][threadIdx.x], load ? k + kv_index.v_offset : pool, load);
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue_step(i);

  const bool rope = PREPARE && a.inv_freq != nullptr;
  if (rope) {  // the angles of the new position, once per CTA
    for (int j = threadIdx.x; j < HEAD_DIM / 2; j += kThreads)
      sincosf((float)pos * a.inv_freq[j], &rope_sin[j], &rope_cos[j]);
    __syncthreads();
  }
  float qf[MAX_GROUP][kDims];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
#pragma unroll
    for (int v = 0; v < kQVecs; ++v) unpack8<T>(q_raw[g][v], qf[g] + 8 * v);
    if (PREPARE && g < num_h)
      prepare_head<T, HEAD_DIM, kDims>(qf[g], dim0, a.q_norm, a.norm_eps, rope, rope_cos, rope_sin, true);
#pragma unroll
    for (int i = 0; i < kDims; ++i) qf[g][i] *= a.scale_log2;
  }
  if (new_key >= 0) {
    float kf[kDims];
#pragma unroll
    for (int v = 0; v < kQVecs; ++v) unpack8<T>(k_new_raw[v], kf + 8 * v);
    // An FP8 or INT8 pool encodes the float32 key, as qkv_prepare does (no rounding to T on the way).
    prepare_head<T, HEAD_DIM, kDims>(kf, dim0, a.k_norm, a.norm_eps, rope, rope_cos, rope_sin, !kCodes);
    if (warp == 0 && key_slot == 0) {
      uint4 k_stored, v_stored;
      if constexpr (kCodes) {
        float vf[kDims];
#pragma unroll
        for (int v = 0; v < kQVecs; ++v) unpack8<T>(v_new_raw[v], vf + 8 * v);
        k_stored = encode16<KV>(kf, a.kv.k_scale);
        v_stored = encode16<KV>(vf, a.kv.v_scale);
      } else {
        k_stored = make_uint4(pack2<T>(kf[0], kf[1]), pack2<T>(kf[2], kf[3]), pack2<T>(kf[4], kf[5]),
                              pack2<T>(kf[6], kf[7]));
        v_stored = v_new_raw[0];
      }
      new_kv[0][lane] = k_stored;
      new_kv[1][lane] = v_stored;
      // Stored by the first head chunk. A block id outside the table/pool is a runtime bug: skip the write
      // rather than corrupt another sequence's blocks (as qkv_prepare does).
      const int32_t block_index = pos / a.kv.tokens_per_block;
      if (chunk == 0 && active && block_index < a.kv.max_blocks_per_seq) {
        const int32_t block = kv_index.table[block_index];
        if (block >= 0 && block < a.kv.num_blocks) {
          KV* k_dst = static_cast<KV*>(a.kv.data) + kv_index.key_offset(pos) + dim0;
          *reinterpret_cast<uint4*>(k_dst) = k_stored;
          *reinterpret_cast<uint4*>(k_dst + kv_index.v_offset) = v_stored;
        }
      }
    }
    __syncthreads();
  }

  float m_run[MAX_GROUP], l_run[MAX_GROUP], acc[MAX_GROUP][kDims];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    m_run[g] = -INFINITY;
    l_run[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < kDims; ++i) acc[g][i] = 0.0f;
  }

  for (int i = 0; i < num_steps; ++i) {
    cp_async_wait<kStages - 2>();  // step i's group has landed (each thread reads only its own copies)
    const int base = k_begin + i * kKeysPerStep;
    uint4 k_raw[kUnroll], v_raw[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int key = base + (u * kNumWarps + warp) * kKeysPerWarp + key_slot;
      valid[u] = key < k_end;
      const bool from_new = PREPARE && key == new_key;
      k_raw[u] = from_new ? new_kv[0][dim0 / kDims] : ring[i % kStages][u][0][threadIdx.x];
      v_raw[u] = from_new ? new_kv[1][dim0 / kDims] : ring[i % kStages][u][1][threadIdx.x];
    }
    // Into the slot step i - 1 used: its values were consumed by that step's arithmetic.
    issue_step(i + kStages - 1);
    float score[kUnroll][MAX_GROUP];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[kDims];
      unpack_kv<T, KV>(k_raw[u], kf);
#pragma unroll
      for (int g = 0; g < MAX_GROUP; ++g) {
        float x = 0.0f;
#pragma unroll
        for (int i = 0; i < kDims; ++i) x += qf[g][i] * kf[i];
#pragma unroll
        for (int off = kLanesPerKey / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
        score[u][g] = valid[u] ? x : -INFINITY;
      }
    }
    float vf[kUnroll][kDims];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack_kv<T, KV>(v_raw[u], vf[u]);
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      float step_max = score[0][g];
#pragma unroll
      for (int u = 1; u < kUnroll; ++u) step_max = fmaxf(step_max, score[u][g]);
      const float m_new = fmaxf(m_run[g], step_max);
      const float m_use = safe_max(m_new);
      const float corr = exp2f(m_run[g] - m_use);
      m_run[g] = m_new;
      float p[kUnroll], p_sum = 0.0f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        p[u] = exp2f(score[u][g] - m_use);
        p_sum += p[u];
      }
      l_run[g] = l_run[g] * corr + p_sum;
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        float x = acc[g][i] * corr;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) x += p[u] * vf[u][i];
        acc[g][i] = x;
      }
    }
  }

  __syncthreads();  // the reduction below reuses the ring's bytes
  // Merge the states of lanes holding the same dims (different keys) within the warp.
#pragma unroll
  for (int off = kLanesPerKey; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m_run[g], off);
      const float l_other = __shfl_xor_sync(0xffffffffu, l_run[g], off);
      const float m_new = fmaxf(m_run[g], m_other), m_use = safe_max(m_new);
      const float c_self = exp2f(m_run[g] - m_use), c_other = exp2f(m_other - m_use);
      m_run[g] = m_new;
      l_run[g] = l_run[g] * c_self + l_other * c_other;
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const float a_other = __shfl_xor_sync(0xffffffffu, acc[g][i], off);
        acc[g][i] = acc[g][i] * c_self + a_other * c_other;
      }
    }
  }
  if (key_slot == 0) {
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
#pragma unroll
      for (int i = 0; i < kDims; ++i)
        if (active) red_acc[warp][g][dim0 + i] = acc[g][i];
      if (lane == 0) {
        red_m[warp][g] = m_run[g];
        red_l[warp][g] = l_run[g];
      }
    }
  }
  __syncthreads();

  write_split<T, HEAD_DIM, MAX_GROUP, kCodes>(a, red_acc, red_m, red_l, s, h0, num_h, split);
}

// One 16-key subtile's online-softmax step of the tensor-core decode kernels. sc: Sᵀ's accumulators (keys g,
// g + 8 of the subtile starting at key0, by index / 2, x heads 2t, 2t + 1, by index % 2), raw products that
// scale_log2 turns into log2-domain scores; keys at or past k_end are masked. Updates the lane's running max
// and sum of heads 2t, 2t + 1, rescales the Oᵀ accumulators (acc[i]: O[2t][·], O[2t + 1][·] twice) and
// returns Pᵀ as the B fragments of the P·V products in M (b0 = P[head g][keys 2t, 2t + 1], b1 = keys 2t + 8,
// 2t + 9), by an in-register transpose of the probabilities.
template <typename M, int N>
__device__ __forceinline__ void subtile_softmax(const float (&sc)[4], float scale_log2, int key0, int k_end, int g,
                                                float (&m_run)[2], float (&l_run)[2], float (&acc)[N][4],
                                                uint32_t (&pb)[2]) {
  float p[4], corr[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float s0 = key0 + g < k_end ? sc[j] * scale_log2 : -INFINITY;
    const float s1 = key0 + g + 8 < k_end ? sc[j + 2] * scale_log2 : -INFINITY;
    float mx = fmaxf(s0, s1);
#pragma unroll
    for (int off = 4; off < 32; off *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float m_new = fmaxf(m_run[j], mx), m_use = safe_max(m_new);
    corr[j] = exp2f(m_run[j] - m_use);
    m_run[j] = m_new;
    p[j] = exp2f(s0 - m_use);
    p[j + 2] = exp2f(s1 - m_use);
    l_run[j] = l_run[j] * corr[j] + p[j] + p[j + 2];
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    acc[i][0] *= corr[0];
    acc[i][1] *= corr[1];
    acc[i][2] *= corr[0];
    acc[i][3] *= corr[1];
  }
  pb[0] = movmatrix_trans(pack2<M>(p[0], p[1]));
  pb[1] = movmatrix_trans(pack2<M>(p[2], p[3]));
}

// The tensor-core decode kernels' end: each lane's sums reduced over the warp's keys, the warps' states into
// shared memory (`smem`: the K/V buffers, free once every copy has landed and been read), then write_split.
// dim(i, hi) is the head dim that row g (hi = 0) or g + 8 (hi = 1) of the lane's m-tile i of Oᵀ holds.
template <typename T, int HEAD_DIM, bool kCodes, int N, typename DimOf>
__device__ __forceinline__ void finish_mma_decode(const DecodeArgs<T>& a, void* smem, float (&red_m)[kNumWarps][8],
                                                  float (&red_l)[kNumWarps][8], const float (&acc)[N][4],
                                                  const float (&m_run)[2], float (&l_run)[2], DimOf dim, int s,
                                                  int h0, int num_h, int split) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int off = 4; off < 32; off *= 2) l_run[j] += __shfl_xor_sync(0xffffffffu, l_run[j], off);
  cp_async_wait<0>();
  __syncthreads();  // the buffers become the warps' outputs
  auto red_acc = reinterpret_cast<float(*)[8][HEAD_DIM]>(smem);
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      red_acc[warp][2 * t][dim(i, hi)] = acc[i][2 * hi];
      red_acc[warp][2 * t + 1][dim(i, hi)] = acc[i][2 * hi + 1];
    }
  }
  if (g == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      red_m[warp][2 * t + j] = m_run[j];
      red_l[warp][2 * t + j] = l_run[j];
    }
  }
  __syncthreads();
  write_split<T, HEAD_DIM, 8, kCodes>(a, red_acc, red_m, red_l, s, h0, num_h, split);
}

// Tensor-core decode for a 16-bit pool at head_dim 64 or 128 (attention_decode, no preparation). The
// products run transposed, keys as the MMA's rows and the CTA's (up to 8) query heads as its columns, so that
// a GQA group of 8 fills an m16n8k16 tile: Sᵀ (16 keys x 8 heads) = K (16 x head_dim) · Qᵀ, then
// Oᵀ (head_dim x 8 heads) += Vᵀ (head_dim x 16 keys) · Pᵀ. K and Vᵀ come from shared memory by ldmatrix
// (.trans for V), Qᵀ stays in registers as B fragments, and Pᵀ becomes a B fragment by an in-register 8x8
// transpose (movmatrix) of the score accumulators: a key costs a few instructions per head instead of the
// CUDA-core kernel's multiply-adds and shuffle reductions per dim. Each warp runs its own 16-key subtiles
// (w, w + 4, ... of the split) with its own K and V buffers, refilled by cp.async as soon as read: K of
// subtile j + 4 loads while j's softmax and P·V run, V of j + 4 while j + 4's scores do. The warps' states
// merge as in decode_split_kernel (write_split).
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads, 4) decode_mma_kernel(DecodeArgs<T> a) {
  constexpr int kGroup = 8;                  // query heads per CTA: the MMA's n
  constexpr int kSub = 16;                   // keys per subtile: the MMA's m (Sᵀ) and k (Oᵀ)
  constexpr int kChunks = HEAD_DIM / 8;      // 16-byte chunks of a key
  constexpr int kKSteps = HEAD_DIM / 16;     // k-steps of K·Qᵀ, m-tiles of Vᵀ·Pᵀ
  constexpr int kRowStep = 32 / kChunks;     // a lane copies chunk lane % kChunks of keys lane / kChunks + i·kRowStep
  constexpr int kBufChunks = kSub * kChunks;
  static_assert(kNumWarps * 2 * kBufChunks * 16 >= kNumWarps * kGroup * HEAD_DIM * 4, "the reduction fits");
  __shared__ __align__(16) uint4 bufs[kNumWarps][2][kBufChunks];  // per warp: K, V; then the warps' outputs
  __shared__ float red_m[kNumWarps][kGroup], red_l[kNumWarps][kGroup];
  // Chunk c of key r of a buffer, XOR-swizzled so that an ldmatrix of 8 keys at one chunk hits 8 bank groups.
  auto at = [](int r, int c) { return r * kChunks + (c ^ (r & 7)); };
  pdl_begin();

  const auto [s, kv_head, chunk, split, h0, num_h] = decode_cta(a, kGroup);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int seq_len = a.meta.seq_len[s];
  const SplitKeys keys = split_keys(a.num_splits, seq_len, split);
  if (!keys.used) return;
  const int k_begin = keys.begin, k_end = keys.end;
  const int num_sub = (k_end - k_begin + kSub - 1) / kSub;
  const PagedKvIndex kv_index(a.kv, s, kv_head);
  const T* pool = static_cast<const T*>(a.kv.data);
  uint4* k_buf = bufs[warp][0];
  uint4* v_buf = bufs[warp][1];
  // One cp.async group: the K (or V) chunks of subtile `sub` (none past the split: an empty group).
  auto issue = [&](uint4* buf, int sub, bool v) {
    if (sub < num_sub) {
      const int c = lane % kChunks;
#pragma unroll
      for (int r = lane / kChunks; r < kSub; r += kRowStep) {
        const int key = k_begin + sub * kSub + r;
        const bool valid = key < k_end;
        const T* src = valid ? pool + kv_index.key_offset(key) + (v ? kv_index.v_offset : 0) + 8 * c : pool;
        cp_async_16(&buf[at(r, c)], src, valid);
      }
    }
    cp_async_commit();
  };
  issue(k_buf, warp, false);
  issue(v_buf, warp, true);

  // Qᵀ as B fragments: b0 = Q[head g][16kk + 2t, +1], b1 = Q[head g][16kk + 2t + 8, +9]; heads past the CTA's
  // are zero (their scores are 0, their outputs never stored).
  uint32_t qb[kKSteps][2];
  const T* q_head = a.q + s * a.row_stride + (int64_t)(h0 + g) * HEAD_DIM + 2 * t;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    qb[kk][0] = g < num_h ? *reinterpret_cast<const uint32_t*>(q_head + 16 * kk) : 0u;
    qb[kk][1] = g < num_h ? *reinterpret_cast<const uint32_t*>(q_head + 16 * kk + 8) : 0u;
  }
  // Lane (g, t) holds heads 2t and 2t + 1: their running max (the same in every lane of that t), their sum
  // over the lane's keys g and g + 8, and Oᵀ's accumulators: acc[i] = O[2t][16i + g], O[2t + 1][16i + g],
  // O[2t][16i + g + 8], O[2t + 1][16i + g + 8].
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  float acc[kKSteps][4];
#pragma unroll
  for (int i = 0; i < kKSteps; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  // ldmatrix row addresses: K as A (keys 0-7 / 8-15 by lane bit 3, chunk 2kk / 2kk + 1 by bit 4), V as Aᵀ
  // (keys by lane bit 4, chunk by bit 3).
  const int k_row = (lane & 7) + ((lane >> 3) & 1) * 8, k_chunk = lane >> 4;
  const int v_row = (lane & 7) + (lane >> 4) * 8, v_chunk = (lane >> 3) & 1;

  for (int sub = warp; sub < num_sub; sub += kNumWarps) {
    cp_async_wait<1>();  // K of `sub` has landed (its V may not have)
    __syncwarp();
    float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // Sᵀ: keys g / g + 8 (by index / 2) x heads 2t / 2t + 1
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t ka[4];
      ldmatrix_x4(ka, &k_buf[at(k_row, 2 * kk + k_chunk)]);
      mma_16816<T>(sc, ka, qb[kk]);
    }
    __syncwarp();  // every lane has read K
    issue(k_buf, sub + kNumWarps, false);
    uint32_t pb[2];
    subtile_softmax<T>(sc, a.scale_log2, k_begin + sub * kSub, k_end, g, m_run, l_run, acc, pb);
    cp_async_wait<1>();  // V of `sub` has landed (the next K may not have)
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kKSteps; ++i) {
      uint32_t va[4];
      ldmatrix_x4_trans(va, &v_buf[at(v_row, 2 * i + v_chunk)]);
      mma_16816<T>(acc[i], va, pb);
    }
    __syncwarp();  // every lane has read V
    issue(v_buf, sub + kNumWarps, true);
  }
  // Oᵀ's row g (+ 8) of m-tile i is dim 16i + g (+ 8).
  finish_mma_decode<T, HEAD_DIM, false>(a, &bufs[0][0][0], red_m, red_l, acc, m_run, l_run,
                                        [g](int i, int hi) { return 16 * i + g + 8 * hi; }, s, h0, num_h, split);
}

// Two e4m3 codes, the low and high bytes of `codes`, to an f16x2 register (exact: every e4m3 value is a half).
// The instruction exists from compute capability 8.9; built for an older device, attention_common.cuh's
// e4m3x2_to_half2 gives the same bits.
__device__ __forceinline__ uint32_t e4m3x2_bits(uint32_t codes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t r;
  asm("{\n .reg .b16 c;\n cvt.u16.u32 c, %1;\n cvt.rn.f16x2.e4m3x2 %0, c;\n}" : "=r"(r) : "r"(codes));
  return r;
#else
  const __half2_raw h = e4m3x2_to_half2(static_cast<uint16_t>(codes));
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
#endif
}

// Tensor-core decode for an FP8 (e4m3) pool at head_dim 64 or 128: decode_mma_kernel's products and online
// softmax, in f16, with the codes converted in registers instead of loaded by ldmatrix (which moves 16-bit
// elements). The codes land in each warp's K and V buffers by cp.async, two subtiles deep (the bytes of one
// 16-bit subtile), and a lane reads them with 16-byte loads in an order that makes each 32-bit word of codes
// an MMA fragment after a conversion, by permuting the dims (the sums over them do not care):
// - K (A of Sᵀ = K·Qᵀ): lane (g, t) reads bytes 16t + 64h .. + 15 of keys g and g + 8; word w of them is
//   k-step kk = 4h + w, its low two codes the fragment's dims 2t, 2t + 1 and its high two dims 2t + 8, 2t + 9.
//   Qᵀ's B fragments take the same dims.
// - V (Aᵀ of Oᵀ += Vᵀ·Pᵀ): lane (g, t) reads bytes D·g .. D·g + D - 1 (D = head_dim / 8) of keys 2t, 2t + 1,
//   2t + 8, 2t + 9, and a byte permute pairs each dim's codes of two keys, which one conversion makes a
//   fragment register: Oᵀ's row g of m-tile i is dim D·g + 2i, row g + 8 dim D·g + 2i + 1.
// Q goes to f16 as q · 2^-8 (a power of two: exact but below 2^-6, no overflow below 2^24), 2^8 rejoining
// the softmax scale; P is f16; k_scale is in a.scale_log2 and v_scale scales the output (write_split).
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads, 4) decode_mma_fp8_kernel(DecodeArgs<T> a) {
  constexpr int kGroup = 8;                  // query heads per CTA: the MMA's n
  constexpr int kSub = 16;                   // keys per subtile: the MMA's m (Sᵀ) and k (Oᵀ)
  constexpr int kStages = 2;                 // subtiles of each warp in its buffers
  constexpr int kChunks = HEAD_DIM / 16;     // 16-byte chunks of a key's codes
  constexpr int kKSteps = HEAD_DIM / 16;     // k-steps of K·Qᵀ, m-tiles of Vᵀ·Pᵀ
  constexpr int kRowStep = 32 / kChunks;     // a lane copies chunk lane % kChunks of keys lane / kChunks + i·kRowStep
  constexpr int kBufChunks = kSub * kChunks;
  constexpr int kVBytes = HEAD_DIM / 8;      // a lane's bytes of a value: 16 or 8
  constexpr float kQScale = 1.0f / 256.0f;
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head_dim 64 or 128");
  static_assert(kNumWarps * kStages * 2 * kBufChunks * 16 >= kNumWarps * kGroup * HEAD_DIM * 4, "the reduction fits");
  __shared__ __align__(16) uint4 bufs[kNumWarps][kStages][2][kBufChunks];  // per warp and stage: K, V
  __shared__ float red_m[kNumWarps][kGroup], red_l[kNumWarps][kGroup];
  // Chunk c of key r. K: the eight lanes of one 16-byte load phase read two keys at four chunks (at head_dim
  // 128, odd keys swap the halves of the row); V: four keys 2 apart at two chunks (XOR by the key).
  auto k_at = [](int r, int c) { return r * kChunks + (kChunks == 8 ? c ^ ((r & 1) << 2) : c); };
  auto v_at = [](int r, int c) { return r * kChunks + (c ^ ((kChunks == 8 ? r : r >> 1) & (kChunks - 1))); };
  pdl_begin();

  const auto [s, kv_head, chunk, split, h0, num_h] = decode_cta(a, kGroup);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int seq_len = a.meta.seq_len[s];
  const SplitKeys keys = split_keys(a.num_splits, seq_len, split);
  if (!keys.used) return;
  const int k_begin = keys.begin, k_end = keys.end;
  const int num_sub = (k_end - k_begin + kSub - 1) / kSub;
  const PagedKvIndex kv_index(a.kv, s, kv_head);
  const uint8_t* pool = static_cast<const uint8_t*>(a.kv.data);
  // One cp.async group: the K (or V) codes of the warp's subtile `sub` (none past the split: an empty group)
  // into the buffers of its stage.
  auto issue = [&](int sub, bool v) {
    if (sub < num_sub) {
      uint4* buf = bufs[warp][(sub / kNumWarps) % kStages][v];
      const int c = lane % kChunks;
#pragma unroll
      for (int r = lane / kChunks; r < kSub; r += kRowStep) {
        const int key = k_begin + sub * kSub + r;
        const bool valid = key < k_end;
        const uint8_t* src = valid ? pool + kv_index.key_offset(key) + (v ? kv_index.v_offset : 0) + 16 * c : pool;
        cp_async_16(&buf[v ? v_at(r, c) : k_at(r, c)], src, valid);
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int j = 0; j < kStages; ++j) {
    issue(warp + j * kNumWarps, false);
    issue(warp + j * kNumWarps, true);
  }

  // Qᵀ as B fragments in the permuted dims: k-step 4h + w takes dims 64h + 16t + 4w + 0, 1 (b0) and + 2, 3
  // (b1) of head g; heads past the CTA's are zero (their scores are 0, their outputs never stored).
  uint32_t qb[kKSteps][2];
  {
    const T* q_head = a.q + s * a.row_stride + (int64_t)(h0 + g) * HEAD_DIM + 16 * t;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      const T* q4 = q_head + 64 * (kk / 4) + 4 * (kk % 4);
      if (g < num_h) {
        qb[kk][0] = pack2<__half>(to_float(q4[0]) * kQScale, to_float(q4[1]) * kQScale);
        qb[kk][1] = pack2<__half>(to_float(q4[2]) * kQScale, to_float(q4[3]) * kQScale);
      } else {
        qb[kk][0] = qb[kk][1] = 0u;
      }
    }
  }
  const float scale_log2 = a.scale_log2 / kQScale;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  float acc[kKSteps][4];
#pragma unroll
  for (int i = 0; i < kKSteps; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int sub = warp; sub < num_sub; sub += kNumWarps) {
    const int stage = (sub / kNumWarps) % kStages;
    const uint4* k_buf = bufs[warp][stage][0];
    const uint4* v_buf = bufs[warp][stage][1];
    cp_async_wait<2 * kStages - 1>();  // K of `sub` has landed (its V and the next stage's may not have)
    __syncwarp();
    float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int h = 0; h < HEAD_DIM / 64; ++h) {
      const uint4 lo = k_buf[k_at(g, t + 4 * h)], hi = k_buf[k_at(g + 8, t + 4 * h)];
      const uint32_t wl[4] = {lo.x, lo.y, lo.z, lo.w}, wh[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t ka[4] = {e4m3x2_bits(wl[w]), e4m3x2_bits(wh[w]), e4m3x2_bits(wl[w] >> 16),
                                e4m3x2_bits(wh[w] >> 16)};
        mma_16816<__half>(sc, ka, qb[4 * h + w]);
      }
    }
    __syncwarp();  // every lane has read K
    issue(sub + kStages * kNumWarps, false);
    uint32_t pb[2];
    subtile_softmax<__half>(sc, scale_log2, k_begin + sub * kSub, k_end, g, m_run, l_run, acc, pb);
    cp_async_wait<2 * kStages - 1>();  // V of `sub` has landed
    __syncwarp();
    // Keys 2t, 2t + 1 (x) and 2t + 8, 2t + 9 (y), the lane's kVBytes codes of each.
    uint32_t x0[kVBytes / 4], x1[kVBytes / 4], y0[kVBytes / 4], y1[kVBytes / 4];
    const int v_chunk = g * kVBytes / 16, v_word = (g * kVBytes % 16) / 4;
    auto words = [&](uint32_t (&dst)[kVBytes / 4], int r) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(&v_buf[v_at(r, v_chunk)]) + v_word;
#pragma unroll
      for (int i = 0; i < kVBytes / 4; ++i) dst[i] = src[i];
    };
    words(x0, 2 * t);
    words(x1, 2 * t + 1);
    words(y0, 2 * t + 8);
    words(y1, 2 * t + 9);
#pragma unroll
    for (int i = 0; i < kKSteps; ++i) {
      // Dims D·g + 2i, + 1: bytes 0, 1 (i even) or 2, 3 (i odd) of word i / 2, paired across the two keys.
      const uint32_t sel = i % 2 ? 0x7362u : 0x5140u;
      const uint32_t px = __byte_perm(x0[i / 2], x1[i / 2], sel), py = __byte_perm(y0[i / 2], y1[i / 2], sel);
      const uint32_t va[4] = {e4m3x2_bits(px), e4m3x2_bits(px >> 16), e4m3x2_bits(py), e4m3x2_bits(py >> 16)};
      mma_16816<__half>(acc[i], va, pb);
    }
    __syncwarp();  // every lane has read V
    issue(sub + kStages * kNumWarps, true);
  }
  finish_mma_decode<T, HEAD_DIM, true>(a, &bufs[0][0][0][0], red_m, red_l, acc, m_run, l_run,
                                       [g](int i, int hi) { return kVBytes * g + 2 * i + hi; }, s, h0, num_h,
                                       split);
}

// One CTA of max(head_dim, 32) threads per (sequence, query head):
// out = Σ_i w_i · o_i / Σ_i w_i, w_i = 2^(lse_i - max).
// The weights are computed once into shared memory (the splits' lse loads in parallel across the threads), so
// that each thread's loop over the splits holds only independent loads of its partial outputs.
template <typename T>
__global__ void decode_merge_kernel(T* __restrict__ out, const float* __restrict__ partial_o,
                                    const float* __restrict__ partial_lse, const int32_t* __restrict__ seq_lens,
                                    int num_heads, int head_dim, int num_splits) {
  __shared__ float weight[kMaxDecodeSplits];
  __shared__ float weight_sum;
  pdl_begin();
  const int64_t head = (int64_t)blockIdx.x * num_heads + blockIdx.y;
  const int d = threadIdx.x;
  const int used_splits = splits_used(num_splits, seq_lens[blockIdx.x]);
  const float* lse = partial_lse + head * num_splits;
  for (int i = d; i < used_splits; i += blockDim.x) weight[i] = lse[i];
  __syncthreads();
  if (d < 32) {  // the first warp (whole: the CTA has at least 32 threads): the max, the weights, their sum
    float m = -INFINITY;
    for (int i = d; i < used_splits; i += 32) m = fmaxf(m, weight[i]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    const float m_use = safe_max(m);
    float sum = 0.0f;
    for (int i = d; i < used_splits; i += 32) {
      const float w = exp2f(weight[i] - m_use);
      weight[i] = w;
      sum += w;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (d == 0) weight_sum = sum;
  }
  __syncthreads();
  if (d >= head_dim) return;
  const float* po = partial_o + head * num_splits * head_dim + d;
  float o = 0.0f;
#pragma unroll 8
  for (int i = 0; i < used_splits; ++i) o += weight[i] * po[(int64_t)i * head_dim];
  out[head * head_dim + d] = from_float<T>(weight_sum > 0.0f ? o / weight_sum : 0.0f);
}

// Query heads per CTA over an FP8 (or INT8) pool: 4 holds the registers of a 16-bit CTA of 8 heads (about
// 200, two CTAs per SM), 2 those of 4 heads (128, four CTAs per SM) but reads each K/V byte once per pair of
// heads.
#ifndef RTLLM_DECODE_FP8_MAX_GROUP
#define RTLLM_DECODE_FP8_MAX_GROUP 4
#endif
static_assert(RTLLM_DECODE_FP8_MAX_GROUP == 2 || RTLLM_DECODE_FP8_MAX_GROUP == 4, "FP8 decode groups: 2 or 4");

// After the split kernel's launch: checks it, and merges the splits if there are several.
template <typename T, int HEAD_DIM>
cudaError_t launch_merge(const DecodeArgs<T>& a, cudaStream_t stream) {
  if (a.num_splits > 1) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int merge_threads = std::max(HEAD_DIM, 32);
    launch_pdl(decode_merge_kernel<T>, dim3(a.meta.num_seqs, a.num_heads), merge_threads, 0, stream, a.out,
               a.partial_o, a.partial_lse, a.meta.seq_len, a.num_heads, HEAD_DIM, a.num_splits);
  }
  return cudaGetLastError();
}

// The head dims of the tensor-core decode kernels (decode_mma_kernel, decode_mma_fp8_kernel): launch_decode
// picks them and attention_decode_plan plans for them by this one rule.
constexpr bool decode_mma_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

// The tensor-core decode kernels (16-bit and FP8 pools at decode_mma_head_dim) unless RTLLM_DECODE_MMA=0 selects
// the CUDA-core one for every shape (a same-build comparison).
inline bool decode_mma_enabled() {
  static const bool enabled = !env_is("RTLLM_DECODE_MMA", "0");
  return enabled;
}

template <typename T, typename KV, int HEAD_DIM, bool PREPARE>
cudaError_t launch_decode(DecodeArgs<T> a, int num_kv_heads, float* workspace, cudaStream_t stream) {
  // An FP8 or INT8 lane holds twice a 16-bit lane's dims, so its CTAs serve fewer heads.
  constexpr int kMaxGroupKv = is_quantized_kv<KV>() ? RTLLM_DECODE_FP8_MAX_GROUP : kMaxGroup;
  a.group = a.num_heads / num_kv_heads;
  a.partial_o = workspace;
  a.partial_lse = workspace + (int64_t)a.meta.num_seqs * a.num_heads * a.num_splits * HEAD_DIM;
  // A kernel whose CTAs serve chunks of max_group query heads (decode_cta), then the merge.
  auto launch = [&](auto* kernel, int max_group) {
    a.num_head_chunks = (a.group + max_group - 1) / max_group;
    const dim3 grid(a.meta.num_seqs, num_kv_heads * a.num_head_chunks, a.num_splits);
    launch_pdl(kernel, grid, kThreads, 0, stream, a);
    return launch_merge<T, HEAD_DIM>(a, stream);
  };
  if constexpr (!PREPARE && decode_mma_head_dim(HEAD_DIM)) {
    if constexpr (std::is_same_v<KV, T>) {
      if (decode_mma_enabled()) return launch(decode_mma_kernel<T, HEAD_DIM>, 8);
    } else if constexpr (is_fp8_kv<KV>()) {
      if (decode_mma_enabled()) return launch(decode_mma_fp8_kernel<T, HEAD_DIM>, 8);
    }
  }
  if (a.group == 1) return launch(decode_split_kernel<T, KV, HEAD_DIM, 1, PREPARE>, 1);
  if (a.group == 2 || kMaxGroupKv == 2) return launch(decode_split_kernel<T, KV, HEAD_DIM, 2, PREPARE>, 2);
  if (a.group <= 4) return launch(decode_split_kernel<T, KV, HEAD_DIM, 4, PREPARE>, 4);
  return launch(decode_split_kernel<T, KV, HEAD_DIM, kMaxGroupKv, PREPARE>, kMaxGroupKv);
}

// The launch shared by attention_decode and attention_decode_qkv: `a` holds the q (and, for the latter,
// the preparation) operands; the rest is checked and filled here.
template <typename T>
cudaError_t decode(DecodeArgs<T> a, void* out, const StepMetaDevice& meta, const PagedKv& kv, int num_heads,
                   int num_kv_heads, int head_dim, float scale, int num_splits, float* workspace,
                   cudaStream_t stream) {
  if (num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || kv.head_dim != head_dim ||
      kv.num_kv_heads != num_kv_heads || !attn::paged_kv_supported(kv) || num_splits < 1 ||
      num_splits > kMaxDecodeSplits || (num_splits > 1 && workspace == nullptr) || num_heads > 65535)
    return cudaErrorInvalidValue;
  if (meta.num_seqs == 0) return cudaSuccess;
  a.out = static_cast<T*>(out);
  a.meta = meta;
  a.kv = kv;
  a.num_heads = num_heads;
  a.num_splits = num_splits;
  const bool codes = kv.dtype == DType::kFP8E4M3 || kv.dtype == DType::kINT8;
  if (!kv_scales_valid(kv.dtype, kv.k_scale, kv.v_scale)) return cudaErrorInvalidValue;
  // An FP8 or INT8 pool's keys are read as codes: k_scale joins the softmax scale (v_scale scales the output).
  a.scale_log2 = scale * attn::kLog2e * (codes ? kv.k_scale : 1.0f);
  RTLLM_DISPATCH_KV(kv.dtype, T, KV, {
    if (a.k_new) {
      RTLLM_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM,
                              return launch_decode<T, KV, HEAD_DIM, true>(a, num_kv_heads, workspace, stream));
    } else {
      RTLLM_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM,
                              return launch_decode<T, KV, HEAD_DIM, false>(a, num_kv_heads, workspace, stream));
    }
  });
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t attention_decode(void* out, const void* q, StepMetaDevice meta, PagedKv kv, int32_t num_heads,
                             int32_t num_kv_heads, int32_t head_dim, float scale, int32_t num_splits,
                             float* workspace, DType dtype, cudaStream_t stream) {
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    DecodeArgs<T> a = {};
    a.q = static_cast<const T*>(q);
    a.row_stride = (int64_t)num_heads * head_dim;
    return decode<T>(a, out, meta, kv, num_heads, num_kv_heads, head_dim, scale, num_splits, workspace, stream);
  });
  return cudaErrorInvalidValue;
}

cudaError_t attention_decode_qkv(void* out, const void* qkv, int64_t qkv_row_stride, int64_t q_col, int64_t k_col,
                                 int64_t v_col, const float* inv_freq, const void* q_norm_weight,
                                 const void* k_norm_weight, float qk_norm_eps, StepMetaDevice meta, PagedKv kv,
                                 int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, float scale,
                                 int32_t num_splits, float* workspace, DType dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(qkv && meta.positions && meta.seq_len);
  RTLLM_KERNEL_CHECK((q_norm_weight == nullptr) == (k_norm_weight == nullptr));
  RTLLM_KERNEL_CHECK(q_col >= 0 && k_col >= 0 && v_col >= 0 && qkv_row_stride % 8 == 0 && q_col % 8 == 0 &&
                     k_col % 8 == 0 && v_col % 8 == 0 && aligned16(qkv));
  RTLLM_KERNEL_CHECK(q_norm_weight == nullptr || (aligned16(q_norm_weight) && aligned16(k_norm_weight)));
  const int64_t width = (int64_t)num_heads * head_dim, kv_width = (int64_t)num_kv_heads * head_dim;
  RTLLM_KERNEL_CHECK(q_col + width <= qkv_row_stride && k_col + kv_width <= qkv_row_stride &&
                     v_col + kv_width <= qkv_row_stride);
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    const T* row = static_cast<const T*>(qkv);
    DecodeArgs<T> a = {};
    a.q = row + q_col;
    a.k_new = row + k_col;
    a.v_new = row + v_col;
    a.row_stride = qkv_row_stride;
    a.inv_freq = inv_freq;
    a.q_norm = static_cast<const T*>(q_norm_weight);
    a.k_norm = static_cast<const T*>(k_norm_weight);
    a.norm_eps = qk_norm_eps;
    return decode<T>(a, out, meta, kv, num_heads, num_kv_heads, head_dim, scale, num_splits, workspace, stream);
  });
  return cudaErrorInvalidValue;
}

size_t attention_decode_workspace_bytes(int32_t max_num_seqs, int32_t num_heads, int32_t head_dim,
                                        int32_t max_splits) {
  return (size_t)max_num_seqs * num_heads * max_splits * (head_dim + 1) * sizeof(float);
}

DecodePlan attention_decode_plan(int32_t num_seqs, int32_t num_kv_heads, int32_t head_dim, int32_t max_seq_len,
                                 int32_t num_sms, DType kv_dtype) {
  // An FP8 pool at head_dim 64 / 128 decodes on tensor cores (decode_mma_fp8_kernel), which the fused
  // preparation does not: at batch 4 and 8 with 4k keys, qkv_prepare + that kernel beat the fused CUDA-core
  // kernel by 17-20% at their best split counts, and tie at batch 1 (docs/performance.md, "Design decisions
  // and their measurements").
  const bool codes = kv_dtype == DType::kFP8E4M3 || kv_dtype == DType::kINT8;
  const bool fp8_mma = kv_dtype == DType::kFP8E4M3 && decode_mma_head_dim(head_dim) && decode_mma_enabled();
  // CTAs per SM: 4 keep enough 16-byte loads in flight to read a pool at full speed (128 threads, <= 128
  // registers for groups <= 4); the CUDA-core kernel over an 8-bit pool reads half the bytes per key and 2
  // reach its best time, where 4 lose 15-30% to the extra splits. A split count that overshoots one such
  // wave leaves a mostly idle second wave. At most kMaxPlannedSplits: beyond it the merge and each split's
  // fixed costs outweigh the parallelism (batch 1, 4k and 16k keys: 66 splits slower than 32 in every decode
  // kernel). Splits of kMinKeysPerSplit keys, no fewer: longer splits mean more dependent steps per CTA, and
  // at batch 1 and a few hundred keys each step's load latency, not bandwidth, sets the time. The kernel
  // cuts the count further per sequence from its current length (splits_used). The sweeps are in
  // docs/performance.md.
  constexpr int64_t kMaxPlannedSplits = 32;
  const int64_t ctas_per_sm = codes && !fp8_mma ? 2 : 4;
  const int64_t num_ctas = (int64_t)num_seqs * num_kv_heads;
  DecodePlan plan;
  if (num_ctas <= 0) return plan;
  const int64_t for_waves = std::max<int64_t>(1, ctas_per_sm * num_sms / num_ctas);
  const int64_t by_length = std::max<int64_t>(1, max_seq_len / kMinKeysPerSplit);
  plan.num_splits = (int32_t)std::min<int64_t>({for_waves, by_length, kMaxPlannedSplits});
  plan.fuse_prepare = plan.num_splits > 1 && !fp8_mma;
  return plan;
}

}  // namespace rtllm::kernels
