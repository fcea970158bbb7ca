// sample(): see sampling.cuh for the semantics (those of cpp/src/sampler.cc) and sampling_math.h for
// the shared probability and mass arithmetic.
//
// Each row is split over a cluster of CTAs (several for small batches, so batch 1 uses several SMs;
// one for large batches): CTA `rank` streams a contiguous slice of the row, and every row-wide result
// (argmax, sums, histograms) is combined through distributed shared memory, in rank order. All the
// decisions use integer masses, so they do not depend on the cluster size or the schedule.
//   - top-k (by count) and top-p (by mass) cuts: for rows of one-CTA clusters (window_select_for), the
//     window select (sampling_window.cuh), which finds the cut in one pass inside a window of x placed from
//     a sample of the row, and after which the draw reads only one warp's chunk of the row again (top-p)
//     or nothing (top-k); for the other rows, and where the window misses, a grid select (grid_select)
//     over buckets of the scaled exponent x, whose cut bucket is sorted in shared memory, with the radix
//     select below as its fallback;
//   - top-N logprobs (by count of the raw logits), and the grid's fallback: a radix select over the
//     32-bit order key in three passes of 11/11/10-bit digits, histograms of counts and masses with
//     integer shared-memory atomics (warp-aggregated), then, when the cut falls inside a run of equal
//     keys, the m-th of them in id order;
//   - the draw: the first element in id order whose cumulative kept mass passes the target, found
//     from per-warp chunk sums and one rescan of the chunk that holds it.
// No sort, every pass a straight streaming pass over the row (16-byte loads where aligned).
#include <cooperative_groups.h>

#include <atomic>
#include <cfloat>
#include <type_traits>

#include "dispatch.cuh"
#include "rtllm/kernels/sampling.cuh"
#include "rtllm/kernels/sampling_math.h"

namespace rtllm::kernels {
namespace {

namespace cg = cooperative_groups;
namespace sm = rtllm::sampling;

// Thread block clusters (distributed shared memory) exist from compute capability 9.0. Built for an older
// device, a row's cluster is its one CTA: the launch asks for no cluster there (sample_launch's max_cluster is 1), and
// this stand-in gives the CTA's own shared memory as the only rank's.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
using Cluster = cg::cluster_group;
__device__ __forceinline__ Cluster this_cluster() { return cg::this_cluster(); }
#else
struct Cluster {
  __device__ __forceinline__ unsigned block_rank() const { return 0; }
  __device__ __forceinline__ unsigned num_blocks() const { return 1; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  template <typename T>
  __device__ __forceinline__ T* map_shared_rank(T* p, unsigned) const { return p; }
};
__device__ __forceinline__ Cluster this_cluster() { return {}; }
#endif

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxClusterSize = 8;  // CTAs per row for small batches (the portable cluster size)
constexpr int kBuckets = 2048;      // the widest digit (11 bits)
constexpr int kStreamUnroll = 4;    // float4 loads in flight per thread in the streaming passes
// Per-token flags and count of one sequence (the workspace): masked, seen in prompt or output, has
// a logit bias; the low bits count the token in the output.
constexpr uint32_t kMasked = 1u << 31, kSeen = 1u << 30, kBiased = 1u << 29, kCountMask = kBiased - 1;

using u64 = unsigned long long;

// Grid select (the fast path of the top-k and top-p selects; see grid_select).
constexpr int kGridBuckets = 128;     // buckets of x per grid level
constexpr int kGridCopies = 16;       // copies of each bucket's counters, one per lane & 15 (no bank conflicts
                                      // between the lanes of a warp, few atomics on one address)
constexpr int kGridLevels = 4;        // refinements before falling back to the radix select
constexpr int kMaxCandidates = 2048;  // elements of the cut's bucket sorted in shared memory
constexpr int kMassLowBits = 17;      // masses (<= 2^33) go into the grid counters as 17 + 16 bit halves
// Slices up to 2^18 elements: one copy counts at most 2^14 + 192 elements, so its 32-bit sums of the
// mass halves cannot overflow.
constexpr int32_t kMaxGridSlice = 1 << 18;

// Window select (sampling_window.cuh), the fast path of the top-k and top-p selects.
constexpr int kWindowCapacity = 4096;  // elements of a row's window, gathered and sorted in shared memory
constexpr int kSampleCapacity = 16384;  // logits of a row sampled (every 2^shift-th) to place the window
constexpr int kMinWindowMargin = 16;     // fewest sampled elements the window holds past the estimated cut

// The dynamic shared memory of sample_kernel.
struct WindowShared {
  u64 local[kWindowCapacity];  // this CTA's window elements, key · 2^32 + ~id
  union {
    u64 gathered[kWindowCapacity];  // the cluster's, sorted
    float sample[kSampleCapacity];  // this CTA's sampled (adjusted) logits, until the window is placed
  };
};

struct Shared {
  uint32_t count[kBuckets];
  u64 mass[kBuckets];
  u64 warp_u64[kWarps];
  u64 warp_kept[kWarps];  // per warp chunk (id order): the weight find_in_chunks finds the target in
  double warp_f64[kWarps];
  float warp_f32[kWarps];
  int32_t warp_i32[kWarps];
  // This CTA's part of the latest cluster reduction, read by the other CTAs of the cluster.
  u64 cta_u64;
  double cta_f64;
  float cta_f32;
  int32_t cta_i32;
  // Selection results, computed alike by every CTA (sel_id: written by the CTA that finds it).
  int32_t sel_digit, sel_found, sel_id;
  uint32_t sel_count;
  u64 sel_before, sel_weight;
  int32_t sel_warp;
  u64 sel_warp_before;
  // Top-N logprob candidates of this CTA's slice.
  int32_t num_top;
  int32_t top_ids[kMaxTopLogprobs];
  float top_vals[kMaxTopLogprobs];
  // Grid select (see grid_select): this CTA's bucket totals and member key range, read by the cluster;
  // its candidates (in `mass`) and the cluster's, gathered for the sort.
  uint32_t grid_count[kGridBuckets];
  u64 grid_mass[kGridBuckets];
  uint32_t warp_key_min[kWarps], warp_key_max[kWarps];
  uint32_t cta_key_min, cta_key_max;
  int32_t num_candidates;
  uint32_t sel_key;
  // Window select: the cut's position in the sorted window, this CTA's weight above the window, the
  // window's buckets and the sampled elements above and down to them.
  int32_t sel_index;
  u64 cta_above;
  int32_t window_low, window_high;
  u64 window_high_before, window_low_through;
  u64 gathered[kMaxCandidates];
};

// This CTA's slice of one row.
struct Slice {
  const float* raw;  // the row
  int32_t begin, end;
};

// Calls f(i, raw[i], valid) for the slice's elements, warp-uniformly: every lane of a warp makes
// the same calls (valid false past the end), so f may use warp collectives. 16-byte loads after an
// unaligned head of at most 3 elements.
template <typename F>
__device__ __forceinline__ void stream_slice(const Slice& sl, F&& f) {
  const int32_t len = sl.end - sl.begin;
  const int32_t misaligned = (int32_t)((reinterpret_cast<uintptr_t>(sl.raw + sl.begin) >> 2) & 3);
  const int32_t head = min(len, (4 - misaligned) & 3);
  {
    const int32_t i = sl.begin + (int32_t)threadIdx.x;
    const bool valid = (int32_t)threadIdx.x < head;
    f(i, valid ? sl.raw[i] : 0.0f, valid);
  }
  const int32_t start = sl.begin + head;
  const int32_t num_vec = (len - head) / 4;
  const float4* vec = reinterpret_cast<const float4*>(sl.raw + start);
  // kStreamUnroll 16-byte loads in flight per thread before any of them is used.
  for (int32_t base = 0; base < num_vec; base += kThreads * kStreamUnroll) {
    float4 v[kStreamUnroll];
#pragma unroll
    for (int u = 0; u < kStreamUnroll; ++u) {
      const int32_t j = base + u * kThreads + (int32_t)threadIdx.x;
      v[u] = j < num_vec ? vec[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int u = 0; u < kStreamUnroll; ++u) {
      const int32_t j = base + u * kThreads + (int32_t)threadIdx.x;
      const bool valid = j < num_vec;
      f(start + 4 * j, v[u].x, valid);
      f(start + 4 * j + 1, v[u].y, valid);
      f(start + 4 * j + 2, v[u].z, valid);
      f(start + 4 * j + 3, v[u].w, valid);
    }
  }
  {
    const int32_t tail_begin = start + 4 * num_vec;
    const int32_t i = tail_begin + (int32_t)threadIdx.x;
    const bool valid = i < sl.end;  // at most 3
    f(i, valid ? sl.raw[i] : 0.0f, valid);
  }
}

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the cluster (u64 or double), combined in rank order; every thread gets it.
template <typename V>
__device__ V cluster_sum(Shared& sh, const Cluster& cluster, V v) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  V* warp_part;
  V* cta_part;
  if constexpr (std::is_same_v<V, u64>) {
    v = warp_sum_u64(v);
    warp_part = sh.warp_u64;
    cta_part = &sh.cta_u64;
  } else {
    v = warp_sum(v);
    warp_part = sh.warp_f64;
    cta_part = &sh.cta_f64;
  }
  __syncthreads();
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    V s = 0;
    for (int w = 0; w < kWarps; ++w) s += warp_part[w];
    *cta_part = s;
  }
  cluster.sync();
  V s = 0;
  for (unsigned r = 0; r < cluster.num_blocks(); ++r) s += *cluster.map_shared_rank(cta_part, r);
  cluster.sync();  // cta_part may be rewritten by the next reduction
  return s;
}

// Largest v over the cluster with the lowest id on ties (id INT32_MAX for none); every thread gets it.
__device__ float cluster_argmax(Shared& sh, const Cluster& cluster, float best, int32_t best_id,
                                int32_t* id_out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto better = [](float v, int32_t i, float bv, int32_t bi) { return v > bv || (v == bv && i < bi); };
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, best_id, o);
    if (better(ob, oi, best, best_id)) { best = ob; best_id = oi; }
  }
  __syncthreads();
  if (lane == 0) { sh.warp_f32[warp] = best; sh.warp_i32[warp] = best_id; }
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = -INFINITY;
    int32_t bi = INT32_MAX;
    for (int w = 0; w < kWarps; ++w)
      if (better(sh.warp_f32[w], sh.warp_i32[w], b, bi)) { b = sh.warp_f32[w]; bi = sh.warp_i32[w]; }
    sh.cta_f32 = b;
    sh.cta_i32 = bi;
  }
  cluster.sync();
  best = -INFINITY;
  best_id = INT32_MAX;
  for (unsigned r = 0; r < cluster.num_blocks(); ++r) {
    const Shared* other = cluster.map_shared_rank(&sh, r);
    if (better(other->cta_f32, other->cta_i32, best, best_id)) { best = other->cta_f32; best_id = other->cta_i32; }
  }
  cluster.sync();
  *id_out = best_id;
  return best;
}

// Exclusive prefix sum of v over the block's threads in thread order; *total gets the block's sum.
__device__ u64 block_exclusive_scan(Shared& sh, u64 v, u64* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  u64 incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 up = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += up;
  }
  __syncthreads();
  if (lane == 31) sh.warp_u64[warp] = incl;
  __syncthreads();
  u64 before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? sh.warp_u64[w] : 0;
    all += sh.warp_u64[w];
  }
  *total = all;
  return before + incl - v;
}

// One sequence's logits with stages 1 and 2 (penalties, then bias and mask) applied on the fly
// (counts null: no penalty, bias or mask). The bias of a token flagged kBiased is found by binary
// search in the sequence's bias list (ids ascending): lists are short, flagged tokens few.
struct SeqLogits {
  const uint32_t* counts;
  float repetition, presence, frequency;
  const int32_t* bias_ids;  // [num_biases] ascending
  const float* bias_values;
  int32_t num_biases;

  __device__ float bias_of(int32_t i) const {
    int32_t lo = 0, hi = num_biases;  // the first entry with id >= i
    while (lo < hi) {
      const int32_t mid = (lo + hi) >> 1;
      if (bias_ids[mid] < i) lo = mid + 1; else hi = mid;
    }
    return lo < num_biases && bias_ids[lo] == i ? bias_values[lo] : 0.0f;
  }

  __device__ __forceinline__ float adjust(int32_t i, float a) const {
    if (!counts) return a;
    const uint32_t c = counts[i];
    if (c & kMasked) return -INFINITY;  // the mask wins over penalties and bias
    if ((c & kSeen) && repetition != 1.0f) a = a > 0.0f ? __fdiv_rn(a, repetition) : __fmul_rn(a, repetition);
    const uint32_t n = c & kCountMask;
    // Rounded like the CPU's `presence + frequency * count` (no fused multiply-add).
    if (n && (presence != 0.0f || frequency != 0.0f))
      a = __fsub_rn(a, __fadd_rn(presence, __fmul_rn(frequency, (float)n)));
    if (c & kBiased) a = __fadd_rn(a, bias_of(i));
    return a;
  }
  // adjust() where the row has lists (counts set), the raw logit where it has none: the passes are
  // compiled for each case, so a row without lists runs straight-line code (no branch per element that
  // keeps the elements' polynomials from interleaving).
  template <bool kLists>
  __device__ __forceinline__ float adjusted(int32_t i, float a) const {
    if constexpr (kLists) return adjust(i, a);
    else return a;
  }
};

// The float whose order key is `key` (+0 for the key of ±0).
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? key & 0x7fffffffu : ~key);
}

// The least power of two >= n (1 for n <= 1): the size a bitonic sort of n elements pads to.
__device__ __forceinline__ int32_t pow2_at_least(int32_t n) {
  int32_t size = 1;
  while (size < n) size <<= 1;
  return size;
}

// Everything kept up to and including (key, id) in (key desc, id asc) order; inactive: everything.
struct Cut {
  bool active;
  uint32_t key;
  int32_t id;
  __device__ __forceinline__ bool keeps(uint32_t k, int32_t i) const {
    return !active || k > key || (k == key && i <= id);
  }
};

// The element weights of the selects and of the draw, from the adjusted logit a of element i.
template <bool kLists>
struct Weights {
  SeqLogits lg;
  float max, inv_t;
  Cut k_cut, p_cut;
  uint64_t min_mass;
  bool raw;  // order by the raw logits (top-N logprobs): every element weighs 1

  __device__ __forceinline__ float value(int32_t i, float r) const { return raw ? r : lg.adjusted<kLists>(i, r); }
  __device__ __forceinline__ uint64_t mass(float a) const { return sm::logit_mass(a, max, inv_t); }
  // The mass of the adjusted logit whose order key is `key` (the sorted windows hold keys, not logits).
  __device__ __forceinline__ uint64_t key_mass(uint32_t key) const { return mass(key_value(key)); }
  // Top-k's weight: 1 for a candidate (mass > 0). x >= -22 always weighs >= 2 (exp(-22) · 2^33 > 2.3),
  // x < -24 nothing; straight-line code (the polynomial of x clamped at -22).
  __device__ __forceinline__ uint64_t top_k_weight(float a) const {
    const float x = sm::scaled_exponent(a, max, inv_t);
    const bool surely = x >= -22.0f;
    return surely || sm::exponent_mass(surely ? -22.0f : x) > 0 ? 1 : 0;
  }
  // Top-p's weight: the mass, within top-k's cut.
  __device__ __forceinline__ uint64_t top_p_weight(int32_t i, float a, uint32_t key) const {
    const uint64_t m = mass(a);
    return k_cut.keeps(key, i) ? m : 0;
  }
  // Whether the draw keeps every candidate (no top-k, top-p or min-p cut): its weight is then the mass.
  __device__ __forceinline__ bool keeps_every_candidate() const {
    return !k_cut.active && !p_cut.active && min_mass == 0;
  }
  // The draw's weight: the mass of a kept element.
  __device__ __forceinline__ uint64_t kept_weight(int32_t i, float a, uint32_t key) const {
    const uint64_t m = mass(a);  // computed either way: no branch around the polynomial
    return k_cut.keeps(key, i) && p_cut.keeps(key, i) && m >= min_mass ? m : 0;
  }
};

enum class Select { kTopN, kTopK, kTopP };

template <Select kind, typename W>
__device__ __forceinline__ uint64_t select_weight(const W& wt, int32_t i, float a, uint32_t key) {
  if constexpr (kind == Select::kTopP) return wt.top_p_weight(i, a, key);
  else if constexpr (kind == Select::kTopK) return wt.top_k_weight(a);
  else return 1;  // top-N by the raw logits: every element
}

// Adds (count 1, weight w) to bucket `digit` (-1: nothing), aggregated over the lanes of the warp
// with the same digit (one atomic per digit and warp: flat rows put most elements in few buckets).
// Warp-uniform.
__device__ __forceinline__ void hist_add(Shared& sh, int digit, uint64_t w, bool with_mass) {
  if (!__any_sync(0xffffffffu, digit >= 0)) return;
  const unsigned peers = __match_any_sync(0xffffffffu, digit);
  if (digit < 0) return;
  const int lane = threadIdx.x & 31;
  const bool leader = lane == __ffs(peers) - 1;
  if (with_mass) {
    // w <= 2^33: 16-bit halves keep the 32-bit warp reductions exact.
    const uint32_t lo = __reduce_add_sync(peers, (uint32_t)(w & 0xffffu));
    const uint32_t hi = __reduce_add_sync(peers, (uint32_t)(w >> 16));
    if (leader) atomicAdd(&sh.mass[digit], ((u64)hi << 16) + lo);
  }
  if (leader) atomicAdd(&sh.count[digit], (uint32_t)__popc(peers));
}

struct Selected {
  bool found;
  Cut cut;
};

// The first element (key desc, id asc) at which the cumulative weight reaches target(total) (total:
// the weight of all elements); target 0 (or total 0) means no cut. Every thread of the cluster calls
// it and gets the same cut.
template <Select kind, typename W, typename TargetFn>
__device__ __forceinline__ Selected radix_select(Shared& sh, const Cluster& cluster, const Slice& sl, const W& wt,
                                 TargetFn target_of);

// The id-order passes split a CTA's slice into one contiguous chunk per warp, of a multiple of 128
// elements: slices start at a multiple of 4, so the chunks of an aligned row are aligned too and a lane
// reads 4 consecutive elements at once.
__device__ __forceinline__ int32_t warp_chunk_size(const Slice& sl) {
  return ceil_div(ceil_div(max(sl.end - sl.begin, 1), kWarps), 128) * 128;
}

// Calls f(i, raw[i], valid) for the elements of this warp's chunk in id order per lane, warp-uniformly
// (every lane makes the same calls, valid false past the end, where i is the chunk's last element), so f
// may use warp collectives. kStreamUnroll 16-byte loads in flight per lane.
template <typename F>
__device__ __forceinline__ void stream_warp_chunk(const Slice& sl, F&& f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t chunk = warp_chunk_size(sl);
  const int32_t begin = sl.begin + warp * chunk, end = min(sl.end, begin + chunk);
  const bool aligned = (reinterpret_cast<uintptr_t>(sl.raw) & 15) == 0;
  for (int32_t base = begin; base < end; base += 128 * kStreamUnroll) {
    if (aligned && base + 128 * kStreamUnroll <= end) {
      // A whole step inside the chunk (all but the last of a chunk): no bounds per element, and f
      // compiled with valid = true, so its selects on it fold away.
      float4 q[kStreamUnroll];
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u)
        q[u] = *reinterpret_cast<const float4*>(sl.raw + base + 128 * u + 4 * lane);
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u) {
        const int32_t i = base + 128 * u + 4 * lane;
        f(i, q[u].x, true);
        f(i + 1, q[u].y, true);
        f(i + 2, q[u].z, true);
        f(i + 3, q[u].w, true);
      }
      continue;
    }
    float v[kStreamUnroll][4];
#pragma unroll
    for (int u = 0; u < kStreamUnroll; ++u) {
      const int32_t b = base + 128 * u + 4 * lane;
      if (aligned && b + 3 < end) {
        const float4 q = *reinterpret_cast<const float4*>(sl.raw + b);
        v[u][0] = q.x, v[u][1] = q.y, v[u][2] = q.z, v[u][3] = q.w;
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) v[u][k] = b + k < end ? sl.raw[b + k] : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kStreamUnroll; ++u)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int32_t i = base + 128 * u + 4 * lane + k;
        f(min(i, end - 1), v[u][k], i < end);
      }
  }
}

// Given each warp's chunk weight in sh.warp_kept (this CTA's chunks), the first element in id order
// whose cumulative weight reaches target_of(total) (>= 1; 0: none), -1 if none: the chunk that holds it
// is rescanned. WeightFn: uint64_t(int32_t i, float raw), the weight the sums were taken of. Every thread
// of the cluster gets the id.
template <typename WeightFn, typename TargetFn>
__device__ __forceinline__ int32_t find_in_chunks(Shared& sh, const Cluster& cluster, const Slice& sl, WeightFn weight,
                                                  TargetFn target_of) {
  const int32_t chunk = warp_chunk_size(sl);
  __syncthreads();  // warp_kept complete; sel_id may still be read from the previous call
  if (threadIdx.x == 0) {
    sh.sel_id = -1;
    u64 t = 0;
    for (int w = 0; w < kWarps; ++w) t += sh.warp_kept[w];
    sh.cta_u64 = t;
  }
  cluster.sync();
  u64 total = 0, before = 0;
  const unsigned my_rank = cluster.block_rank();
  for (unsigned r = 0; r < cluster.num_blocks(); ++r) {
    const u64 part = *cluster.map_shared_rank(&sh.cta_u64, r);
    before += r < my_rank ? part : 0;
    total += part;
  }
  const u64 target = total ? (u64)target_of((uint64_t)total) : 0;
  const bool here = target > before && target <= before + sh.cta_u64;  // this CTA holds it
  if (here) {
    if (threadIdx.x == 0) {
      u64 acc = before;
      int w = 0;
      for (; w < kWarps - 1 && acc + sh.warp_kept[w] < target; ++w) acc += sh.warp_kept[w];
      sh.sel_warp = w;
      sh.sel_warp_before = acc;
    }
    __syncthreads();
    // The whole CTA rescans the selected warp's chunk: thread t weighs `per` consecutive elements (its
    // loads all in flight at once), a block scan orders the threads' sums (id order), and the one thread
    // whose range reaches the target finds the element in it. (A single warp stepping through the chunk
    // 32 elements at a time waited for a load and a scan per step: ~250 steps for a 128k-row CTA.)
    const int32_t chunk_begin = sl.begin + sh.sel_warp * chunk, chunk_end = min(sl.end, chunk_begin + chunk);
    const int32_t per = ceil_div(max(chunk_end - chunk_begin, 0), kThreads);
    const int32_t own_begin = min(chunk_end, chunk_begin + (int32_t)threadIdx.x * per);
    const int32_t own_end = min(chunk_end, own_begin + per);
    u64 own = 0;
    for (int32_t i0 = own_begin; i0 < own_end; i0 += 8) {
      float v[8];  // the group's loads issued before any weight needs them
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = i0 + k < own_end ? sl.raw[i0 + k] : 0.0f;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const u64 w = weight(min(i0 + k, own_end - 1), v[k]);  // weighed either way: no branch
        own += i0 + k < own_end ? w : 0;
      }
    }
    u64 chunk_total;
    const u64 acc0 = sh.sel_warp_before + block_exclusive_scan(sh, own, &chunk_total);
    if (own > 0 && acc0 < target && target <= acc0 + own) {
      u64 acc = acc0;
      int32_t found = -1;
      for (int32_t i = own_begin; i < own_end; ++i) {  // the loads above left these elements in L1
        const u64 w = weight(i, sl.raw[i]);
        acc += w;
        if (w > 0 && acc >= target) {
          found = i;
          break;
        }
      }
      for (unsigned r = 0; r < cluster.num_blocks(); ++r) cluster.map_shared_rank(&sh, r)->sel_id = found;
    }
  }
  cluster.sync();  // sel_id written everywhere; cta_u64 read by everyone
  return sh.sel_id;
}

// The first element in id order whose cumulative weight reaches target_of(total) (>= 1; 0: none),
// -1 if none: one pass sums each warp's chunk, then find_in_chunks. Every thread of the cluster gets the id.
template <typename WeightFn, typename TargetFn>
__device__ __forceinline__ int32_t find_in_id_order(Shared& sh, const Cluster& cluster, const Slice& sl, WeightFn weight,
                                    TargetFn target_of) {
  u64 s = 0;
  stream_warp_chunk(sl, [&](int32_t i, float r, bool valid) {
    const uint64_t w = weight(i, r);  // weighed either way: no branch
    s += valid ? w : 0;
  });
  s = warp_sum_u64(s);
  __syncthreads();  // warp_kept may still be read from the previous call
  if ((threadIdx.x & 31) == 0) sh.warp_kept[threadIdx.x >> 5] = s;
  return find_in_chunks(sh, cluster, sl, weight, target_of);
}

// The cut inside a run of `count` elements of one key (the same adjusted logit, so each weighs
// weight / count) where `need` more weight reaches the target: it keeps the first m of them in id order.
// Every thread of the cluster calls it and gets the same cut.
template <Select kind, typename W>
__device__ __forceinline__ Selected cut_in_run(Shared& sh, const Cluster& cluster, const Slice& sl,
                                               const W& wt, uint32_t key, u64 count, u64 weight, u64 need) {
  const u64 each = weight / count, m = (need + each - 1) / each;
  if (m >= count) return Selected{true, Cut{true, key, INT32_MAX}};
  const int32_t id = find_in_id_order(
      sh, cluster, sl,
      [&](int32_t i, float r) -> uint64_t {
        const float a = wt.value(i, r);
        const uint32_t k = sm::order_key(a);
        return k == key && select_weight<kind>(wt, i, a, k) > 0 ? 1 : 0;
      },
      [&](uint64_t) { return (uint64_t)m; });
  return Selected{true, Cut{true, key, id}};
}

template <Select kind, typename W, typename TargetFn>
__device__ __forceinline__ Selected radix_select(Shared& sh, const Cluster& cluster, const Slice& sl, const W& wt,
                                 TargetFn target_of) {
  constexpr bool kMass = kind == Select::kTopP;
  const unsigned num_ranks = cluster.num_blocks();
  uint32_t prefix = 0, prefix_mask = 0;
  u64 before = 0, target = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
    const int num_buckets = pass == 2 ? 1024 : 2048;
    const int per_thread = num_buckets / kThreads;
    for (int b = threadIdx.x; b < num_buckets; b += kThreads) {
      sh.count[b] = 0;
      if (kMass) sh.mass[b] = 0;
    }
    __syncthreads();
    stream_slice(sl, [&](int32_t i, float r, bool valid) {
      int digit = -1;
      uint64_t w = 0;
      if (valid) {
        const float a = wt.value(i, r);
        const uint32_t key = sm::order_key(a);
        if ((key & prefix_mask) == prefix) {
          w = select_weight<kind>(wt, i, a, key);
          if (w > 0) digit = (int)((key >> shift) & (uint32_t)(num_buckets - 1));
        }
      }
      hist_add(sh, digit, w, kMass);
    });
    cluster.sync();  // every CTA's histogram complete
    // Thread t sums buckets num_buckets - 1 - (t · per_thread + j) over the cluster (descending keys).
    u64 w_own[4];
    uint32_t c_own[4];
    u64 own = 0;
    // Unrolled over the largest cluster, so the remote loads are all in flight at once.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      c_own[j] = 0;
      w_own[j] = 0;
      if (j >= per_thread) continue;
      const int b = num_buckets - 1 - ((int)threadIdx.x * per_thread + j);
      u64 c = 0, m = 0;
#pragma unroll
      for (unsigned r = 0; r < (unsigned)kMaxClusterSize; ++r) {
        if (r >= num_ranks) break;
        const Shared* other = cluster.map_shared_rank(&sh, r);
        c += other->count[b];
        if (kMass) m += other->mass[b];
      }
      c_own[j] = (uint32_t)c;
      w_own[j] = kMass ? m : c;
      own += w_own[j];
    }
    u64 total;
    const u64 excl = block_exclusive_scan(sh, own, &total);
    if (pass == 0) {
      target = total ? (u64)target_of((uint64_t)total) : 0;
      if (target == 0) {
        cluster.sync();
        return Selected{false, Cut{false, 0u, 0}};
      }
    }
    const u64 need = target - before;  // in (0, weight in range]
    if (own > 0 && excl < need && need <= excl + own) {
      u64 acc = excl;
      for (int j = 0; j < per_thread; ++j) {
        if (w_own[j] > 0 && acc + w_own[j] >= need) {
          sh.sel_digit = num_buckets - 1 - ((int)threadIdx.x * per_thread + j);
          sh.sel_before = before + acc;
          sh.sel_count = c_own[j];
          sh.sel_weight = w_own[j];
          break;
        }
        acc += w_own[j];
      }
    }
    cluster.sync();  // the others have read this histogram; sel_* written
    prefix |= (uint32_t)sh.sel_digit << shift;
    prefix_mask |= (uint32_t)(num_buckets - 1) << shift;
    before = sh.sel_before;
  }
  const u64 count = sh.sel_count, weight = sh.sel_weight;
  __syncthreads();  // sel_* read before find_in_id_order's writes
  return cut_in_run<kind>(sh, cluster, sl, wt, prefix, count, weight, target - before);
}

// The bucket of x in a grid of kNumBuckets over [lo, lo + kNumBuckets / scale]; monotone in x (one
// rounded subtraction and multiplication), clamped at both ends.
template <int kNumBuckets = kGridBuckets>
__device__ __forceinline__ int grid_bucket(float x, float lo, float scale) {
  const int b = (int)__fmul_rn(__fsub_rn(x, lo), scale);  // NaN converts to 0
  return min(max(b, 0), kNumBuckets - 1);
}

// Which elements a grid pass counts, and into which bucket. The members of a path of fixed buckets are
// a run of consecutive keys (each level's bucket is a monotone function of x, x of the key), so a path of
// any depth is its members' key range (exact: measured by the pass that counted them) and the last
// fixed bucket.
struct GridPath {
  uint32_t key_min = 0, key_max = 0xffffffffu;
  bool has_fixed = false;  // fixed_*: the last fixed bucket and its level's grid
  float fixed_lo = 0.0f, fixed_scale = 0.0f;
  int fixed_bucket = 0;
  float lo, scale;  // the grid of the next level

  __device__ __forceinline__ bool member(float x, uint32_t key) const {
    return key >= key_min && key <= key_max && (!has_fixed || grid_bucket(x, fixed_lo, fixed_scale) == fixed_bucket);
  }
  // The member's bucket at the next level, else -1.
  __device__ __forceinline__ int next_bucket(float x, uint32_t key) const {
    return member(x, key) ? grid_bucket(x, lo, scale) : -1;
  }
};

// Sorts v[0, size) descending (size a power of two, at most kMaxCandidates); the whole block.
__device__ void bitonic_sort_descending(u64* v, int size) {
  for (int k = 2; k <= size; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int t = threadIdx.x; t < size / 2; t += kThreads) {
        const int i = 2 * t - (t & (j - 1)), partner = i + j;  // i: bit j clear
        const u64 a = v[i], b = v[partner];
        if ((i & k) == 0 ? a < b : a > b) {
          v[i] = b;
          v[partner] = a;
        }
      }
      __syncthreads();
    }
}

// The fast path of radix_select (the same cut, bit for bit), for the top-k and top-p selects: buckets
// of x = scaled_exponent(a) instead of key digits.
//   1. One pass histograms the weighted elements over kGridBuckets buckets of x in [x_lo, 0] (counts
//      and masses in lane-private copies: no warp-level aggregation per element, which is what costs
//      in the radix passes), and picks the bucket where the cumulative weight (key descending) reaches
//      the target.
//   2. If that bucket holds more than kMaxCandidates elements, the next pass splits it again (up to
//      kGridLevels levels); a bucket of one key (a run of tied logits) is cut in id order.
//   3. One pass copies the bucket's elements (key, id) to shared memory; every CTA of the cluster
//      gathers all of them, sorts them (key desc, id asc) and finds the cut with a prefix sum.
// Returns false, having decided nothing, where the grid cannot separate the elements (the caller then
// runs radix_select): keys whose x round to the same float in runs longer than kMaxCandidates.
template <Select kind, typename W, typename TargetFn>
__device__ __forceinline__ bool grid_select(Shared& sh, const Cluster& cluster, const Slice& sl, const W& wt,
                            float x_lo, TargetFn target_of, Selected* out) {
  constexpr bool kMass = kind == Select::kTopP;
  const unsigned num_ranks = cluster.num_blocks();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t* counts = sh.count;  // [kGridBuckets][kGridCopies]
  uint32_t* mass_lo = reinterpret_cast<uint32_t*>(sh.mass);
  uint32_t* mass_hi = mass_lo + kGridBuckets * kGridCopies;
  GridPath path;
  path.lo = x_lo;
  path.scale = x_lo < 0.0f ? (float)kGridBuckets / -x_lo : 0.0f;
  u64 before = 0, target = 0;         // weight before the parent bucket (key descending); the target
  u64 parent_weight = 0, parent_count = 0;
  for (int level = 0;; ++level) {
    __syncthreads();  // the counters may still be read (previous level or caller)
    for (int j = threadIdx.x; j < kGridBuckets * kGridCopies; j += kThreads) {
      counts[j] = 0;
      if (kMass) mass_lo[j] = mass_hi[j] = 0;
    }
    __syncthreads();
    const int copy = threadIdx.x & (kGridCopies - 1);
    uint32_t key_min = 0xffffffffu, key_max = 0;
    stream_slice(sl, [&](int32_t i, float r, bool valid) {
      // Everything up to the atomics without a branch, so the elements' polynomials interleave.
      const float a = valid ? wt.value(i, r) : -INFINITY;  // (i may lie past the row when !valid)
      const float x = sm::scaled_exponent(a, wt.max, wt.inv_t);
      const uint32_t key = sm::order_key(a);
      const int b = path.next_bucket(x, key);
      const uint64_t w = select_weight<kind>(wt, i, a, key);
      if (!valid || b < 0 || w == 0) return;  // (w == 0 below x = kMinExponent)
      key_min = min(key_min, key);
      key_max = max(key_max, key);
      const int slot = b * kGridCopies + copy;
      atomicAdd(&counts[slot], 1u);
      if (kMass) {
        atomicAdd(&mass_lo[slot], (uint32_t)(w & ((1u << kMassLowBits) - 1)));
        atomicAdd(&mass_hi[slot], (uint32_t)(w >> kMassLowBits));
      }
    });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      key_min = min(key_min, __shfl_xor_sync(0xffffffffu, key_min, o));
      key_max = max(key_max, __shfl_xor_sync(0xffffffffu, key_max, o));
    }
    if (lane == 0) {
      sh.warp_key_min[warp] = key_min;
      sh.warp_key_max[warp] = key_max;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < kGridBuckets; b += kThreads) {
      uint32_t c = 0;
      u64 m = 0;
#pragma unroll
      for (int k = 0; k < kGridCopies; ++k) {
        c += counts[b * kGridCopies + k];
        if (kMass) m += mass_lo[b * kGridCopies + k] + ((u64)mass_hi[b * kGridCopies + k] << kMassLowBits);
      }
      sh.grid_count[b] = c;
      sh.grid_mass[b] = kMass ? m : c;
    }
    if (threadIdx.x == 0) {
      uint32_t lo = 0xffffffffu, hi = 0;
      for (int w = 0; w < kWarps; ++w) {
        lo = min(lo, sh.warp_key_min[w]);
        hi = max(hi, sh.warp_key_max[w]);
      }
      sh.cta_key_min = lo;
      sh.cta_key_max = hi;
    }
    cluster.sync();  // every CTA's totals complete
    // Thread t < kGridBuckets sums bucket kGridBuckets - 1 - t over the cluster (keys descending).
    u64 own = 0, own_count = 0;
    uint32_t all_key_min = 0xffffffffu, all_key_max = 0;
    for (unsigned r = 0; r < num_ranks; ++r) {
      const Shared* other = cluster.map_shared_rank(&sh, r);
      if ((int)threadIdx.x < kGridBuckets) {
        own += other->grid_mass[kGridBuckets - 1 - threadIdx.x];
        own_count += other->grid_count[kGridBuckets - 1 - threadIdx.x];
      }
      all_key_min = min(all_key_min, other->cta_key_min);
      all_key_max = max(all_key_max, other->cta_key_max);
    }
    u64 total, total_count;
    const u64 excl = block_exclusive_scan(sh, own, &total);
    block_exclusive_scan(sh, own_count, &total_count);
    if (level == 0) {
      target = total ? (u64)target_of((uint64_t)total) : 0;
      parent_weight = total;
      parent_count = total_count;
    }
    if (target == 0) {
      cluster.sync();
      *out = Selected{false, Cut{false, 0u, 0}};
      return true;
    }
    const u64 need = target - before;  // in (0, parent_weight]
    if (all_key_min == all_key_max) {
      // The parent bucket is one key: its elements weigh the same, and the cut keeps the first m in
      // id order (as radix_select does for a run of equal keys).
      cluster.sync();  // the others have read this CTA's totals
      *out = cut_in_run<kind>(sh, cluster, sl, wt, all_key_min, parent_count, parent_weight, need);
      return true;
    }
    if (own > 0 && excl < need && need <= excl + own) {
      sh.sel_digit = kGridBuckets - 1 - (int)threadIdx.x;
      sh.sel_before = before + excl;
      sh.sel_count = (uint32_t)own_count;
      sh.sel_weight = own;
    }
    cluster.sync();  // the others have read this CTA's totals; sel_* written
    const int b = sh.sel_digit;
    before = sh.sel_before;
    parent_count = sh.sel_count;
    parent_weight = sh.sel_weight;
    path.key_min = all_key_min;
    path.key_max = all_key_max;
    path.has_fixed = true;
    path.fixed_lo = path.lo;
    path.fixed_scale = path.scale;
    path.fixed_bucket = b;
    if (parent_count <= (u64)kMaxCandidates) break;
    // Split the bucket again over its nominal x range; give up where the grid stops resolving.
    const float next_lo = path.lo + (float)b / path.scale, next_scale = path.scale * (float)kGridBuckets;
    if (level + 1 == kGridLevels || !(path.scale > 0.0f) || !isfinite(next_lo) || !isfinite(next_scale)) return false;
    path.lo = next_lo;
    path.scale = next_scale;
  }

  // The bucket's elements, this CTA's into `mass` (its counters are no longer needed), then everyone's
  // into `gathered`.
  __syncthreads();
  if (threadIdx.x == 0) sh.num_candidates = 0;
  __syncthreads();
  u64* local = reinterpret_cast<u64*>(sh.mass);
  stream_slice(sl, [&](int32_t i, float r, bool valid) {
    bool in = false;
    uint32_t key = 0;
    if (valid) {
      const float a = wt.value(i, r);
      const float x = sm::scaled_exponent(a, wt.max, wt.inv_t);
      key = sm::order_key(a);
      in = x >= sm::kMinExponent && path.member(x, key) && select_weight<kind>(wt, i, a, key) > 0;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, in);
    if (!ballot) return;
    int base = 0;
    if (lane == 0) base = atomicAdd(&sh.num_candidates, __popc(ballot));
    base = __shfl_sync(0xffffffffu, base, 0);
    // (key desc, id asc) is the descending order of key · 2^32 + ~id.
    if (in) local[base + __popc(ballot & ((1u << lane) - 1))] = ((u64)key << 32) | (uint32_t)~(uint32_t)i;
  });
  cluster.sync();  // every CTA's list complete
  int32_t n = 0;
  for (unsigned r = 0; r < num_ranks; ++r) {
    const Shared* other = cluster.map_shared_rank(&sh, r);
    const int32_t cnt = min(other->num_candidates, kMaxCandidates - n);  // the histogram bounds the sum
    const u64* src = reinterpret_cast<const u64*>(other->mass);
    for (int32_t j = threadIdx.x; j < cnt; j += kThreads) sh.gathered[n + j] = src[j];
    n += cnt;
  }
  const int32_t size = pow2_at_least(n);
  for (int32_t j = n + threadIdx.x; j < size; j += kThreads) sh.gathered[j] = 0;
  cluster.sync();  // the others have read this CTA's list
  bitonic_sort_descending(sh.gathered, size);
  // Thread t weighs sorted elements [t · per, (t + 1) · per); the cut is where the weight reaches need.
  constexpr int kPerThread = kMaxCandidates / kThreads;
  const int per = ceil_div(n, kThreads);
  u64 w[kPerThread];
  u64 own = 0;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int j = (int)threadIdx.x * per + k;
    w[k] = 0;
    if (k < per && j < n) {
      const u64 v = sh.gathered[j];
      const uint32_t key = (uint32_t)(v >> 32);
      w[k] = select_weight<kind>(wt, (int32_t)~(uint32_t)v, key_value(key), key);
    }
    own += w[k];
  }
  u64 total;
  const u64 excl = block_exclusive_scan(sh, own, &total);
  const u64 need = target - before;
  if (own > 0 && excl < need && need <= excl + own) {
    u64 acc = excl;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      if (w[k] > 0 && acc + w[k] >= need) {
        const u64 v = sh.gathered[(int)threadIdx.x * per + k];
        sh.sel_key = (uint32_t)(v >> 32);
        sh.sel_id = (int32_t)~(uint32_t)v;
        break;
      }
      acc += w[k];
    }
  }
  __syncthreads();
  *out = Selected{true, Cut{true, sh.sel_key, sh.sel_id}};
  return true;
}

#include "sampling_window.cuh"

// Builds the per-token flags/counts of one sequence in `counts` (global memory), the cluster's CTAs
// sharing the work: kMasked for the ids its bitmask row (null: none) does not allow, then the lists'
// flags and counts. Ends with a cluster barrier (the counts are visible to the whole cluster).
__device__ void build_counts(const Cluster& cluster, uint32_t* counts, int32_t n, const Slice& sl, int s,
                             const int32_t* prompt_ids, const int32_t* prompt_offsets, const int32_t* output_ids,
                             const int32_t* output_offsets, const int32_t* masked_ids, const int32_t* masked_offsets,
                             const int32_t* bias_ids, const int32_t* bias_offsets, const uint32_t* allowed_row) {
  for (int32_t i = sl.begin + threadIdx.x; i < sl.end; i += kThreads)
    counts[i] = !allowed_row || ((allowed_row[i >> 5] >> (i & 31)) & 1u) ? 0u : kMasked;
  cluster.sync();
  const int32_t first = (int32_t)(cluster.block_rank() * kThreads + threadIdx.x);
  const int32_t stride = (int32_t)(cluster.num_blocks() * kThreads);
  // Sets `flag` on each id of sequence s's part of a CSR list.
  auto flag_list = [&](const int32_t* ids, const int32_t* offsets, uint32_t flag) {
    if (!offsets) return;
    for (int32_t j = offsets[s] + first; j < offsets[s + 1]; j += stride) {
      const int32_t id = ids[j];
      if (id >= 0 && id < n) atomicOr(&counts[id], flag);
    }
  };
  flag_list(prompt_ids, prompt_offsets, kSeen);
  if (output_offsets)
    for (int32_t j = output_offsets[s] + first; j < output_offsets[s + 1]; j += stride) {
      const int32_t id = output_ids[j];
      if (id >= 0 && id < n) {
        atomicAdd(&counts[id], 1u);  // the count stays below kBiased for any realistic output length
        atomicOr(&counts[id], kSeen);
      }
    }
  flag_list(masked_ids, masked_offsets, kMasked);
  flag_list(bias_ids, bias_offsets, kBiased);
  __threadfence();
  cluster.sync();
}

// Raw log-softmax normalizer and the top-N raw logprobs (rank 0 writes them).
__device__ double raw_logprobs(Shared& sh, const Cluster& cluster, const Slice& sl, int s, int32_t n,
                               int32_t num_logprobs, int32_t max_top, float* out_logprobs, int32_t* out_top_ids) {
  float m = -INFINITY;
  stream_slice(sl, [&](int32_t, float r, bool valid) { if (valid) m = fmaxf(m, r); });
  int32_t unused;
  m = cluster_argmax(sh, cluster, m, INT32_MAX, &unused);
  double sum = 0.0;
  stream_slice(sl, [&](int32_t, float r, bool valid) { if (valid) sum += exp((double)r - (double)m); });
  const double log_sum = (double)m + log(cluster_sum<double>(sh, cluster, sum));
  const int32_t num_top = min(min(num_logprobs, max_top), n);
  __syncthreads();
  if (threadIdx.x == 0) sh.num_top = 0;
  __syncthreads();
  if (num_top > 0) {
    Weights<false> wt{};
    wt.raw = true;
    const Selected sel = radix_select<Select::kTopN>(sh, cluster, sl, wt, [&](uint64_t) { return (uint64_t)num_top; });
    for (int32_t i = sl.begin + threadIdx.x; i < sl.end; i += kThreads)
      if (sel.cut.keeps(sm::order_key(sl.raw[i]), i)) {
        const int slot = atomicAdd(&sh.num_top, 1);
        if (slot < kMaxTopLogprobs) { sh.top_ids[slot] = i; sh.top_vals[slot] = sl.raw[i]; }
      }
  }
  cluster.sync();  // every CTA's candidates are in place
  if (cluster.block_rank() == 0 && (int)threadIdx.x < max_top) {
    // Thread r places the r-th candidate of the cluster (rank order) at its rank among all of them.
    const int r = threadIdx.x;
    int32_t id = -1;
    float v = -INFINITY;
    int found = 0;
    for (unsigned q = 0; q < cluster.num_blocks(); ++q) {
      const Shared* other = cluster.map_shared_rank(&sh, q);
      const int k = min(other->num_top, kMaxTopLogprobs);
      if (r >= found && r < found + k) { id = other->top_ids[r - found]; v = other->top_vals[r - found]; }
      found += k;
    }
    if (r < min(num_top, found)) {
      int rank = 0;
      for (unsigned q = 0; q < cluster.num_blocks(); ++q) {
        const Shared* other = cluster.map_shared_rank(&sh, q);
        for (int j = 0; j < min(other->num_top, kMaxTopLogprobs); ++j) {
          const float ov = other->top_vals[j];
          const int32_t oid = other->top_ids[j];
          rank += ov > v || (ov == v && oid < id);
        }
      }
      out_top_ids[(int64_t)s * max_top + rank] = id;
      out_logprobs[(int64_t)s * (1 + max_top) + 1 + rank] = (float)((double)v - log_sum);
    } else if (r >= num_top) {
      out_top_ids[(int64_t)s * max_top + r] = -1;
      out_logprobs[(int64_t)s * (1 + max_top) + 1 + r] = -INFINITY;
    }
  }
  cluster.sync();  // rank 0 has read the others' candidates
  return log_sum;
}

// The token of one row (-1: everything masked): argmax, then for a temperature the top-k and top-p
// cuts and the draw. kLists: the row has penalties, a bias or a mask (lg.counts set). window: the window
// select may serve the cuts (else the grid and radix selects do).
template <bool kLists>
__device__ __forceinline__ int32_t sample_row(Shared& sh, WindowShared& ws, const Cluster& cluster, const Slice& sl,
                                              const SeqLogits& lg, const SamplingParamsDevice& p, int32_t n,
                                              int32_t slice, bool window) {
  const bool top_k_cuts = p.top_k > 0 && p.top_k < n, top_p_cuts = p.top_p < 1.0f;
  window = window && p.temperature != 0.0f && (top_k_cuts || top_p_cuts);
  // The window select places its window from a sample of the row, every 2^shift-th element of each slice.
  const bool sampling = window && n > kWindowCapacity;
  int shift = 0;
  while (sampling && ceil_div(slice, 1 << shift) > kSampleCapacity / (int)cluster.num_blocks()) ++shift;
  const int32_t sample_mask = (1 << shift) - 1;
  // Argmax of the adjusted logits (lowest id on ties), and the least finite one (the grid's range).
  float best = -INFINITY, least = INFINITY;
  int32_t best_id = INT32_MAX;
  stream_slice(sl, [&](int32_t i, float r, bool valid) {
    if (!valid) return;
    const float a = lg.adjusted<kLists>(i, r);
    if (a > best || (a == best && i < best_id)) { best = a; best_id = i; }
    if (a > -INFINITY) least = fminf(least, a);
    if (sampling && ((i - sl.begin) & sample_mask) == 0) ws.sample[(i - sl.begin) >> shift] = a;
  });
  const float max_logit = cluster_argmax(sh, cluster, best, best_id, &best_id);
  int32_t token = max_logit == -INFINITY ? -1 : best_id;

  if (token >= 0 && p.temperature != 0.0f) {
    Weights<kLists> wt{lg, max_logit, sm::inverse_temperature(p.temperature), Cut{false, 0u, 0}, Cut{false, 0u, 0},
                       sm::min_p_threshold(p.min_p), false};
    const uint64_t bits = sm::uniform_bits(p.seed, p.step);
    float x_lo = sm::kMinExponent;  // the grid's lower end: the least x of the row, at least kMinExponent
    const bool use_grid = slice <= kMaxGridSlice && (top_k_cuts || top_p_cuts);
    if (use_grid || sampling) {
      int32_t unused;
      const float min_logit = -cluster_argmax(sh, cluster, -least, INT32_MAX, &unused);
      const float x = sm::scaled_exponent(min_logit, max_logit, wt.inv_t);
      if (x > x_lo) x_lo = fminf(x, 0.0f);
    }
    const int32_t top_k = p.top_k;
    const float top_p = p.top_p;
    auto top_k_target = [&](uint64_t total) { return total > (uint64_t)top_k ? (uint64_t)top_k : 0; };
    auto top_p_target = [&](uint64_t total) { return sm::top_p_threshold(total, top_p); };
    bool k_pending = top_k_cuts, p_pending = top_p_cuts;
    if (window) {
      bool sample_kept = true;
      Window win;
      if (k_pending && place_window<Select::kTopK>(sh, ws, cluster, wt, n, slice, shift, x_lo, top_k, 1.0f, &win)) {
        const WindowCut k = window_select<Select::kTopK>(sh, ws, cluster, sl, wt, win, top_k_target);
        if (k.outcome == WindowOutcome::kCut) return draw_in_window(sh, ws, wt, k.index, top_p, bits);
        k_pending = k.outcome == WindowOutcome::kMiss;  // kNoCut: top-k keeps every candidate
        sample_kept = k.sample_kept;
      }
      if (!k_pending && p_pending && sample_kept &&
          place_window<Select::kTopP>(sh, ws, cluster, wt, n, slice, shift, x_lo, 0, top_p, &win)) {
        const WindowCut c = window_select<Select::kTopP>(sh, ws, cluster, sl, wt, win, top_p_target);
        if (c.outcome == WindowOutcome::kCut) {
          wt.p_cut = c.cut;
          p_pending = false;
          if (wt.min_mass == 0) return draw_after_window_top_p(sh, ws, cluster, sl, wt, c.index, bits);
        }
      }
    }
    if (k_pending) {
      // The top_k-th candidate, when there are more than top_k.
      Selected k;
      if (!use_grid || !grid_select<Select::kTopK>(sh, cluster, sl, wt, x_lo, top_k_target, &k))
        k = radix_select<Select::kTopK>(sh, cluster, sl, wt, top_k_target);
      if (k.found) wt.k_cut = k.cut;
    }
    if (p_pending) {
      Selected c;
      if (!use_grid || !grid_select<Select::kTopP>(sh, cluster, sl, wt, x_lo, top_p_target, &c))
        c = radix_select<Select::kTopP>(sh, cluster, sl, wt, top_p_target);
      if (c.found) wt.p_cut = c.cut;
    }
    auto draw_target = [&](uint64_t total) { return sm::draw_target(total, bits) + 1; };
    if (!wt.keeps_every_candidate()) {
      token = find_in_id_order(
          sh, cluster, sl,
          [&](int32_t i, float r) -> uint64_t {
            const float a = lg.adjusted<kLists>(i, r);
            return wt.kept_weight(i, a, sm::order_key(a));
          },
          draw_target);
    } else {  // a temperature alone: the mass, without the order key and the cut tests per element
      token = find_in_id_order(
          sh, cluster, sl, [&](int32_t i, float r) -> uint64_t { return wt.mass(lg.adjusted<kLists>(i, r)); },
          draw_target);
    }
  }
  return token;
}

__global__ void __launch_bounds__(kThreads, 1) sample_kernel(
    int32_t* out_ids, float* out_logprobs, int32_t* out_top_ids, const float* logits,
    const SamplingParamsDevice* params, const int32_t* prompt_ids, const int32_t* prompt_offsets,
    const int32_t* output_ids, const int32_t* output_offsets, const int32_t* masked_ids,
    const int32_t* masked_offsets, const int32_t* bias_ids, const float* bias_values, const int32_t* bias_offsets,
    const uint32_t* allowed_bitmask, int32_t n, int32_t max_top, uint32_t* workspace, bool window) {
  __shared__ Shared sh;
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  WindowShared& ws = *reinterpret_cast<WindowShared*>(dynamic_shared);
  pdl_begin();
  const Cluster cluster = this_cluster();
  const int rank = (int)cluster.block_rank(), num_ranks = (int)cluster.num_blocks();
  const int s = blockIdx.x / num_ranks;
  const SamplingParamsDevice p = params[s];
  // Slices of a multiple of 4 elements, so every slice of an aligned row starts aligned.
  const int32_t slice = ceil_div(ceil_div(n, num_ranks), 4) * 4;
  const Slice sl{logits + (int64_t)s * n, min(n, rank * slice), min(n, (rank + 1) * slice)};

  double log_sum = 0.0;
  if (p.num_logprobs >= 0)
    log_sum = raw_logprobs(sh, cluster, sl, s, n, p.num_logprobs, max_top, out_logprobs, out_top_ids);

  SeqLogits lg{nullptr, p.repetition_penalty, p.presence_penalty, p.frequency_penalty, nullptr, nullptr, 0};
  const uint32_t* allowed_row = allowed_bitmask ? allowed_bitmask + (int64_t)s * ((n + 31) >> 5) : nullptr;
  auto has_list = [&](const int32_t* offsets) { return offsets && offsets[s + 1] > offsets[s]; };
  if (bias_offsets) {
    lg.bias_ids = bias_ids + bias_offsets[s];
    lg.bias_values = bias_values + bias_offsets[s];
    lg.num_biases = bias_offsets[s + 1] - bias_offsets[s];
  }
  const bool has_lists = has_list(prompt_offsets) || has_list(output_offsets) || has_list(masked_offsets) ||
                         lg.num_biases > 0 || allowed_row;
  if (has_lists && workspace) {
    uint32_t* counts = workspace + (int64_t)s * n;
    build_counts(cluster, counts, n, sl, s, prompt_ids, prompt_offsets, output_ids, output_offsets, masked_ids,
                 masked_offsets, bias_ids, bias_offsets, allowed_row);
    lg.counts = counts;
  }

  const int32_t token = lg.counts ? sample_row<true>(sh, ws, cluster, sl, lg, p, n, slice, window)
                                  : sample_row<false>(sh, ws, cluster, sl, lg, p, n, slice, window);
  if (rank == 0 && threadIdx.x == 0) {
    out_ids[s] = token;
    if (p.num_logprobs >= 0)
      out_logprobs[(int64_t)s * (1 + max_top)] = token >= 0 ? (float)((double)sl.raw[token] - log_sum) : -INFINITY;
  }
}

// How sample_kernel launches on a device, asked once per device: the largest cluster size up to
// kMaxClusterSize it can run (a partitioned GPU may run fewer; -1 where a query failed) and the dynamic
// shared memory of the window select (WindowShared), 0 where the device's opt-in limit cannot hold it beside
// the static Shared (compute capability 8.6 and 8.9: 99 KiB), which then runs the grid select alone.
struct SampleLaunch {
  int max_cluster;
  size_t window_bytes;
};

SampleLaunch sample_launch(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached_cluster[kMaxDevices];
  static std::atomic<bool> cached_window[kMaxDevices];
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && cached_cluster[device].load(std::memory_order_acquire) > 0)
    return {cached_cluster[device].load(std::memory_order_relaxed),
            cached_window[device].load(std::memory_order_relaxed) ? sizeof(WindowShared) : 0};
  int optin = 0;
  cudaFuncAttributes attributes = {};
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaFuncGetAttributes(&attributes, sample_kernel) != cudaSuccess)
    return {-1, 0};
  const size_t window_bytes =
      attributes.sharedSizeBytes + sizeof(WindowShared) <= (size_t)optin ? sizeof(WindowShared) : 0;
  // Above the 48 KiB a launch gets by default.
  if (window_bytes > 0 && cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                (int)window_bytes) != cudaSuccess)
    return {-1, 0};
  int size = kMaxClusterSize;
  for (; size > 1; size >>= 1) {
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = size;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(size);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = window_bytes;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int num_clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&num_clusters, sample_kernel, &config) == cudaSuccess && num_clusters > 0)
      break;
    (void)cudaGetLastError();  // a size the device cannot run is not an error of the caller
  }
  if (cacheable) {
    cached_window[device].store(window_bytes > 0, std::memory_order_relaxed);
    cached_cluster[device].store(size, std::memory_order_release);
  }
  return {size, window_bytes};
}

// Where the window select serves the top-k and top-p cuts first (the grid and radix selects serve the rest;
// the tokens are the same, and the tests compare the settings). By default, rows of a one-CTA cluster (large
// batches): in a cluster of several CTAs every CTA reads the whole cluster's sample and window through
// distributed shared memory, which costs more than the grid's passes over a short slice (docs/performance.md).
// RTLLM_SAMPLING_WINDOW=1: every row; RTLLM_SAMPLING_WINDOW=0: none.
bool window_select_for(int cluster) {
  static const int mode = env_is("RTLLM_SAMPLING_WINDOW", "1") ? 2 : env_is("RTLLM_SAMPLING_WINDOW", "0") ? 0 : 1;
  return mode == 2 || (mode == 1 && cluster == 1);
}

}  // namespace

size_t sample_workspace_bytes(int32_t max_num_seqs, int32_t vocab_size) {
  return (size_t)std::max(max_num_seqs, 0) * (size_t)std::max(vocab_size, 0) * sizeof(uint32_t);
}

cudaError_t sample(int32_t* out_ids, float* out_logprobs, int32_t* out_top_ids, const float* logits,
                   const SamplingParamsDevice* params, const int32_t* prompt_ids, const int32_t* prompt_offsets,
                   const int32_t* output_ids, const int32_t* output_offsets, const int32_t* masked_ids,
                   const int32_t* masked_offsets, const int32_t* bias_ids, const float* bias_values,
                   const int32_t* bias_offsets, const uint32_t* allowed_bitmask, int32_t num_seqs,
                   int32_t vocab_size, int32_t max_top, void* workspace, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(out_ids && logits && params && num_seqs >= 0);
  RTLLM_KERNEL_CHECK(vocab_size >= 1 && vocab_size <= (1 << 30));
  RTLLM_KERNEL_CHECK(max_top >= 0 && max_top <= kMaxTopLogprobs);
  RTLLM_KERNEL_CHECK(out_logprobs || max_top == 0);
  RTLLM_KERNEL_CHECK(out_top_ids || max_top == 0);
  RTLLM_KERNEL_CHECK((prompt_offsets == nullptr) || prompt_ids);
  RTLLM_KERNEL_CHECK((output_offsets == nullptr) || output_ids);
  RTLLM_KERNEL_CHECK((masked_offsets == nullptr) || masked_ids);
  RTLLM_KERNEL_CHECK((bias_offsets == nullptr) || (bias_ids && bias_values));
  const bool has_lists = prompt_offsets || output_offsets || masked_offsets || bias_offsets || allowed_bitmask;
  RTLLM_KERNEL_CHECK(!has_lists || (workspace && (reinterpret_cast<uintptr_t>(workspace) & 3) == 0));
  if (num_seqs == 0) return cudaSuccess;
  // Small batches split each row over a cluster of CTAs so more SMs share the passes over the row;
  // two CTAs fit on an SM.
  cudaError_t err;
  int device = 0, num_sms = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  const SampleLaunch launch = sample_launch(device);
  if (launch.max_cluster < 1) {  // a query or the shared memory attribute failed
    const cudaError_t failed = cudaGetLastError();
    return failed != cudaSuccess ? failed : cudaErrorInvalidConfiguration;
  }
  int cluster = launch.max_cluster;
  while (cluster > 1 && (int64_t)num_seqs * cluster > num_sms) cluster >>= 1;

  cudaLaunchAttribute attributes[2];
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = programmatic_launch_enabled() ? 1 : 0;
  attributes[1].id = cudaLaunchAttributeClusterDimension;
  attributes[1].val.clusterDim.x = cluster;
  attributes[1].val.clusterDim.y = 1;
  attributes[1].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((unsigned)(num_seqs * cluster));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = launch.window_bytes;
  config.stream = stream;
  config.attrs = attributes;
  // A one-CTA cluster is what a launch without the attribute gives, and the only launch a device older than
  // compute capability 9.0 takes.
  config.numAttrs = cluster > 1 ? 2 : 1;
  err = cudaLaunchKernelEx(&config, sample_kernel, out_ids, out_logprobs, out_top_ids, logits, params, prompt_ids,
                           prompt_offsets, output_ids, output_offsets, masked_ids, masked_offsets, bias_ids,
                           bias_values, bias_offsets, allowed_bitmask, vocab_size, max_top,
                           static_cast<uint32_t*>(workspace), launch.window_bytes > 0 && window_select_for(cluster));
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
