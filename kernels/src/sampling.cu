// sample(): one CTA per sequence. See sampling.cuh for the semantics (those of cpp/src/sampler.cc).
//
// No sort: every "k-th element in (value desc, id asc) order" or "first element whose cumulative mass
// in that order passes a target" is found by a radix select over the 32-bit order key of the float
// value (4 passes of 8-bit digits, each a 256-bucket histogram of counts or masses over the elements
// still in range), then a scan in id order among the elements tied at the selected key. Histograms
// are per warp and summed in a fixed order, so results do not depend on scheduling.
#include <cfloat>

#include "dispatch.cuh"
#include "rtllm/kernels/sampling.cuh"

namespace rtllm::kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBuckets = 256;
// Per-token flags and count of one sequence (the workspace): masked, seen in prompt or output, has
// a logit bias; the low bits count the token in the output.
constexpr uint32_t kMasked = 1u << 31, kSeen = 1u << 30, kBiased = 1u << 29, kCountMask = kBiased - 1;

struct Shared {
  double warp_hist[kWarps][kBuckets];
  double hist[kBuckets];
  double scratch[32];
  float fscratch[32];
  int32_t iscratch[32];
  double sel_before;
  int32_t sel_digit, sel_warp, sel_id;
  int32_t num_top;
  int32_t top_ids[kMaxTopLogprobs];
  float top_vals[kMaxTopLogprobs];
};

// Larger float -> larger key; -0 and +0 share a key (they are equal logits).
__device__ __forceinline__ uint32_t order_key(float a) {
  if (a == 0.0f) a = 0.0f;
  const uint32_t bits = __float_as_uint(a);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Same as rtllm::sampling_uniform.
__device__ __forceinline__ double uniform(uint64_t seed, int64_t step) {
  const uint64_t h = mix64(mix64(seed) + static_cast<uint64_t>(step + 1) * 0x9e3779b97f4a7c15ULL);
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

__device__ __forceinline__ bool passes(double cum, double target, bool strict) {
  return strict ? target < cum : target <= cum;
}

// One sequence's logits with stages 1 and 2 (penalties, then bias and mask) applied on the fly
// (counts null: no penalty, bias or mask). The bias of a token flagged kBiased is found by binary
// search in the sequence's bias list (ids ascending): lists are short, flagged tokens few.
struct SeqLogits {
  const float* raw;
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

  __device__ float adjusted(int32_t i) const {
    float a = raw[i];
    if (!counts) return a;
    const uint32_t c = counts[i];
    if (c & kMasked) return -INFINITY;  // the mask wins over penalties and bias
    if ((c & kSeen) && repetition != 1.0f) a = a > 0.0f ? a / repetition : a * repetition;
    const uint32_t n = c & kCountMask;
    // Rounded like the CPU's `presence + frequency * count` (no fused multiply-add).
    if (n && (presence != 0.0f || frequency != 0.0f)) a -= __fadd_rn(presence, __fmul_rn(frequency, (float)n));
    if (c & kBiased) a = __fadd_rn(a, bias_of(i));
    return a;
  }
};

// A position in (key desc, id asc) order: elements up to it (inclusive) or before it (exclusive).
struct Cut {
  uint32_t key;
  int32_t id;
  bool inclusive;
  __device__ bool keeps(uint32_t k, int32_t i) const {
    return k > key || (k == key && (inclusive ? i <= id : i < id));
  }
};
__device__ __forceinline__ Cut no_cut() { return Cut{0u, INT32_MAX, true}; }

// Sum of w over the lanes of `peers` (all lanes with the same digit), in lane order.
__device__ __forceinline__ double group_sum(unsigned peers, double w) {
  double s = 0.0;
  for (unsigned m = peers; m; m &= m - 1) s += __shfl_sync(peers, w, __ffs(m) - 1);
  return s;
}

// First element i in id order (among those with weight > 0) whose cumulative weight, added to
// `before`, passes `target`; the last weighted element if none does (rounding); -1 if none has
// weight. WeightFn: double(int32_t i). Every thread of the block calls it and gets the id.
template <typename WeightFn>
__device__ int32_t select_in_id_order(Shared& sh, int32_t n, WeightFn weight, double before, double target,
                                      bool strict) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t chunk = (int32_t)ceil_div(ceil_div(n, kWarps), 32) * 32;
  const int32_t begin = warp * chunk, end = min(n, begin + chunk);
  double s = 0.0;
  for (int32_t i = begin + lane; i < end; i += 32) s += weight(i);
  s = warp_sum(s);
  __syncthreads();
  if (lane == 0) sh.scratch[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double acc = before;
    int sel = -1, last = -1;
    double acc_last = before;
    for (int w = 0; w < kWarps; ++w) {
      if (sh.scratch[w] > 0.0) {
        if (passes(acc + sh.scratch[w], target, strict)) { sel = w; break; }
        last = w;
        acc_last = acc;
      }
      acc += sh.scratch[w];
    }
    if (sel < 0) { sel = last; acc = acc_last; }
    sh.sel_warp = sel;
    sh.sel_before = acc;
    sh.sel_id = -1;
  }
  __syncthreads();
  if (warp == sh.sel_warp) {
    double acc = sh.sel_before;
    int32_t last_nonzero = -1;
    const int32_t w_begin = warp * chunk;
    for (int32_t base = w_begin; base < end; base += 32) {
      const int32_t i = base + lane;
      const double w = i < end ? weight(i) : 0.0;
      double incl = w;  // inclusive scan over the lanes, in lane order
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double up = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += up;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, w > 0.0 && passes(acc + incl, target, strict));
      if (hit) {
        last_nonzero = base + __ffs(hit) - 1;
        break;
      }
      const unsigned nonzero = __ballot_sync(0xffffffffu, w > 0.0);
      if (nonzero) last_nonzero = base + 31 - __clz(nonzero);
      acc += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) sh.sel_id = last_nonzero;
  }
  __syncthreads();
  return sh.sel_id;
}

// The element of (key desc, id asc) order at which the cumulative weight passes `target`
// (the last weighted element if it never does). Ops provides value(i) (the float whose order key
// sorts the elements) and weight(i, value, key) (>= 0; 0 leaves the element out). Returns an
// inclusive Cut at that element; id -1 if no element has weight. Every thread must call it.
template <typename Ops>
__device__ Cut select_in_sorted_order(Shared& sh, int32_t n, const Ops& ops, double target, bool strict) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t prefix = 0, prefix_mask = 0;
  double before = 0.0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kWarps * kBuckets; b += kThreads) (&sh.warp_hist[0][0])[b] = 0.0;
    __syncthreads();
    for (int32_t base = 0; base < n; base += kThreads) {
      const int32_t i = base + threadIdx.x;
      int digit = -1;
      double w = 0.0;
      if (i < n) {
        const float v = ops.value(i);
        const uint32_t key = order_key(v);
        if ((key & prefix_mask) == prefix) {
          w = ops.weight(i, v, key);
          if (w > 0.0) digit = (key >> shift) & 0xff;
        }
      }
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (digit >= 0) {
        const double s = group_sum(peers, w);
        if (lane == __ffs(peers) - 1) sh.warp_hist[warp][digit] += s;
      }
      __syncwarp();  // the next iteration's leader of this digit may be another lane
    }
    __syncthreads();
    for (int b = threadIdx.x; b < kBuckets; b += kThreads) {
      double s = 0.0;
      for (int w = 0; w < kWarps; ++w) s += sh.warp_hist[w][b];
      sh.hist[b] = s;
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns buckets 255 - 8l down to 248 - 8l (descending key order).
      double own = 0.0;
#pragma unroll
      for (int j = 0; j < 8; ++j) own += sh.hist[255 - 8 * lane - j];
      double incl = own;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double up = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += up;
      }
      double excl = __shfl_up_sync(0xffffffffu, incl, 1);
      excl = before + (lane == 0 ? 0.0 : excl);
      const unsigned hit = __ballot_sync(0xffffffffu, own > 0.0 && passes(excl + own, target, strict));
      const unsigned nonempty = __ballot_sync(0xffffffffu, own > 0.0);
      // The lane holding the crossing, else the lane holding the last weighted bucket.
      const int sel = hit ? __ffs(hit) - 1 : (nonempty ? 31 - __clz(nonempty) : 31);
      if (lane == sel) {
        double acc = excl;
        int digit = -1;
        double acc_digit = acc;
        for (int j = 0; j < 8; ++j) {
          const int b = 255 - 8 * lane - j;
          const double h = sh.hist[b];
          if (h > 0.0) {
            digit = b;
            acc_digit = acc;
            if (passes(acc + h, target, strict)) break;
          }
          acc += h;
        }
        sh.sel_digit = digit < 0 ? 0 : digit;
        sh.sel_before = acc_digit;
        sh.sel_id = digit;  // -1: no weighted element at all
      }
    }
    __syncthreads();
    if (sh.sel_id < 0) return Cut{0u, -1, true};
    prefix |= (uint32_t)sh.sel_digit << shift;
    prefix_mask |= 0xffu << shift;
    before = sh.sel_before;
    __syncthreads();  // sel_* are rewritten by the next pass
  }
  // Tied elements at key == prefix, in id order.
  const int32_t id = select_in_id_order(
      sh, n,
      [&](int32_t i) {
        const float v = ops.value(i);
        const uint32_t key = order_key(v);
        return key == prefix ? ops.weight(i, v, key) : 0.0;
      },
      before, target, strict);
  return Cut{prefix, id, true};
}

// Unit weight for every element: selects by rank.
struct RankOps {
  const float* values;
  __device__ float value(int32_t i) const { return values[i]; }
  __device__ double weight(int32_t, float, uint32_t) const { return 1.0; }
};
struct AdjustedRankOps {
  SeqLogits lg;
  __device__ float value(int32_t i) const { return lg.adjusted(i); }
  __device__ double weight(int32_t, float, uint32_t) const { return 1.0; }
};

// Probability mass of the elements kept by `cut` (and by min_p when set).
struct MassOps {
  SeqLogits lg;
  double max_logit, inv_temperature, min_p;
  Cut cut;
  __device__ double prob(float a) const { return exp(((double)a - max_logit) * inv_temperature); }
  __device__ float value(int32_t i) const { return lg.adjusted(i); }
  __device__ double weight(int32_t i, float a, uint32_t key) const {
    if (!cut.keeps(key, i)) return 0.0;
    const double p = prob(a);
    return p >= min_p ? p : 0.0;  // p = 0 (not a candidate) weighs nothing either way
  }
};

template <typename Ops>
__device__ double total_weight(Shared& sh, int32_t n, const Ops& ops) {
  double s = 0.0;
  for (int32_t i = threadIdx.x; i < n; i += kThreads) {
    const float v = ops.value(i);
    s += ops.weight(i, v, order_key(v));
  }
  return block_sum(s, sh.scratch);
}

// Argmax with the lowest id on ties, over the block.
__device__ int32_t block_argmax(Shared& sh, int32_t n, const SeqLogits& lg, float* max_out) {
  float best = -INFINITY;
  int32_t best_id = INT32_MAX;
  for (int32_t i = threadIdx.x; i < n; i += kThreads) {
    const float a = lg.adjusted(i);
    if (a > best) { best = a; best_id = i; }  // ids grow along the loop: strict keeps the lowest
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, best_id, o);
    if (ob > best || (ob == best && oi < best_id)) { best = ob; best_id = oi; }
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) { sh.fscratch[threadIdx.x >> 5] = best; sh.iscratch[threadIdx.x >> 5] = best_id; }
  __syncthreads();
  best = -INFINITY;
  best_id = INT32_MAX;
  for (int w = 0; w < kWarps; ++w)
    if (sh.fscratch[w] > best || (sh.fscratch[w] == best && sh.iscratch[w] < best_id)) {
      best = sh.fscratch[w];
      best_id = sh.iscratch[w];
    }
  *max_out = best;
  return best == -INFINITY ? -1 : best_id;
}

// Builds the per-token flags/counts of one sequence in `counts`: kMasked for the ids its bitmask row
// (null: none) does not allow, then the lists' flags and counts.
__device__ void build_counts(uint32_t* counts, int32_t n, int s, const int32_t* prompt_ids,
                             const int32_t* prompt_offsets, const int32_t* output_ids, const int32_t* output_offsets,
                             const int32_t* masked_ids, const int32_t* masked_offsets, const int32_t* bias_ids,
                             const int32_t* bias_offsets, const uint32_t* allowed_row) {
  for (int32_t i = threadIdx.x; i < n; i += kThreads)
    counts[i] = !allowed_row || ((allowed_row[i >> 5] >> (i & 31)) & 1u) ? 0u : kMasked;
  __syncthreads();
  // Sets `flag` on each id of sequence s's part of a CSR list.
  auto flag_list = [&](const int32_t* ids, const int32_t* offsets, uint32_t flag) {
    if (!offsets) return;
    for (int32_t j = offsets[s] + threadIdx.x; j < offsets[s + 1]; j += kThreads) {
      const int32_t id = ids[j];
      if (id >= 0 && id < n) atomicOr(&counts[id], flag);
    }
  };
  flag_list(prompt_ids, prompt_offsets, kSeen);
  if (output_offsets)
    for (int32_t j = output_offsets[s] + threadIdx.x; j < output_offsets[s + 1]; j += kThreads) {
      const int32_t id = output_ids[j];
      if (id >= 0 && id < n) {
        atomicAdd(&counts[id], 1u);  // the count stays below kBiased for any realistic output length
        atomicOr(&counts[id], kSeen);
      }
    }
  flag_list(masked_ids, masked_offsets, kMasked);
  flag_list(bias_ids, bias_offsets, kBiased);
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads, 1) sample_kernel(
    int32_t* out_ids, float* out_logprobs, int32_t* out_top_ids, const float* logits,
    const SamplingParamsDevice* params, const int32_t* prompt_ids, const int32_t* prompt_offsets,
    const int32_t* output_ids, const int32_t* output_offsets, const int32_t* masked_ids,
    const int32_t* masked_offsets, const int32_t* bias_ids, const float* bias_values, const int32_t* bias_offsets,
    const uint32_t* allowed_bitmask, int32_t n, int32_t max_top, uint32_t* workspace) {
  __shared__ Shared sh;
  pdl_begin();
  const int s = blockIdx.x;
  const SamplingParamsDevice p = params[s];
  const float* raw = logits + (int64_t)s * n;

  // Raw log-softmax and the top-N raw logprobs.
  double log_sum = 0.0;
  if (p.num_logprobs >= 0) {
    float m = -INFINITY;
    for (int32_t i = threadIdx.x; i < n; i += kThreads) m = fmaxf(m, raw[i]);
    m = block_max(m, sh.fscratch);
    double sum = 0.0;
    for (int32_t i = threadIdx.x; i < n; i += kThreads) sum += exp((double)raw[i] - (double)m);
    log_sum = (double)m + log(block_sum(sum, sh.scratch));
    const int32_t num_top = min(min(p.num_logprobs, max_top), n);
    if (threadIdx.x == 0) sh.num_top = 0;
    __syncthreads();
    if (num_top > 0) {
      const Cut cut = select_in_sorted_order(sh, n, RankOps{raw}, (double)num_top, false);
      for (int32_t i = threadIdx.x; i < n; i += kThreads)
        if (cut.keeps(order_key(raw[i]), i)) {
          const int slot = atomicAdd(&sh.num_top, 1);
          if (slot < kMaxTopLogprobs) { sh.top_ids[slot] = i; sh.top_vals[slot] = raw[i]; }
        }
      __syncthreads();
    }
    if (threadIdx.x < max_top) {
      const int r = threadIdx.x;
      int32_t id = -1;
      float lp = -INFINITY;
      if (r < min(num_top, sh.num_top)) {  // place element r at its rank
        const float v = sh.top_vals[r];
        const int32_t vid = sh.top_ids[r];
        int rank = 0;
        for (int j = 0; j < min(num_top, sh.num_top); ++j)
          rank += sh.top_vals[j] > v || (sh.top_vals[j] == v && sh.top_ids[j] < vid);
        out_top_ids[(int64_t)s * max_top + rank] = vid;
        out_logprobs[(int64_t)s * (1 + max_top) + 1 + rank] = (float)((double)v - log_sum);
      } else if (r >= num_top) {
        out_top_ids[(int64_t)s * max_top + r] = id;
        out_logprobs[(int64_t)s * (1 + max_top) + 1 + r] = lp;
      }
    }
  }

  SeqLogits lg{raw, nullptr, p.repetition_penalty, p.presence_penalty, p.frequency_penalty, nullptr, nullptr, 0};
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
    build_counts(counts, n, s, prompt_ids, prompt_offsets, output_ids, output_offsets, masked_ids, masked_offsets,
                 bias_ids, bias_offsets, allowed_row);
    lg.counts = counts;
  }

  float max_logit;
  int32_t token = block_argmax(sh, n, lg, &max_logit);
  if (token >= 0 && p.temperature != 0.0f) {
    MassOps mass{lg, (double)max_logit, 1.0 / (double)p.temperature, 0.0, no_cut()};
    // Top-k is active when the (top_k + 1)-th most likely element is still a candidate (p > 0).
    bool sorted = false;
    if (p.top_k > 0 && p.top_k < n) {
      Cut next = select_in_sorted_order(sh, n, AdjustedRankOps{lg}, (double)p.top_k + 1.0, false);
      if (next.id >= 0 && mass.prob(lg.adjusted(next.id)) > 0.0) {
        mass.cut = Cut{next.key, next.id, false};  // keep the elements before it
        sorted = true;
      }
    }
    if (p.top_p < 1.0f) {
      const double total = total_weight(sh, n, mass);
      const Cut last = select_in_sorted_order(sh, n, mass, (double)p.top_p * total, false);
      if (last.id >= 0) mass.cut = last;  // a prefix of the top-k prefix
      sorted = true;
    }
    mass.min_p = (double)p.min_p;
    const double target = uniform(p.seed, p.step) * total_weight(sh, n, mass);
    if (sorted) {
      token = select_in_sorted_order(sh, n, mass, target, true).id;
    } else {
      token = select_in_id_order(
          sh, n, [&](int32_t i) { const float a = lg.adjusted(i); return mass.weight(i, a, order_key(a)); }, 0.0,
          target, true);
    }
  }
  if (threadIdx.x == 0) {
    out_ids[s] = token;
    if (p.num_logprobs >= 0)
      out_logprobs[(int64_t)s * (1 + max_top)] = token >= 0 ? (float)((double)raw[token] - log_sum) : -INFINITY;
  }
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
  launch_pdl(sample_kernel, num_seqs, kThreads, 0, stream, out_ids, out_logprobs, out_top_ids, logits, params,
             prompt_ids, prompt_offsets, output_ids, output_offsets, masked_ids, masked_offsets, bias_ids, bias_values,
             bias_offsets, allowed_bitmask, vocab_size, max_top, static_cast<uint32_t*>(workspace));
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
