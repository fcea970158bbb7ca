// The window select: the fast path of sample()'s top-k and top-p selects and of the draw that follows
// them. Part of sampling.cu's translation unit (it uses that file's Shared, Slice, Weights and passes);
// included there, not a header of its own.
//
// The grid select (sampling.cu) histograms every element with shared-memory atomics, then gathers the
// cut's bucket, then the draw streams the row once more: three or four passes over the row, two of
// them with the probability polynomial. The window select needs one pass after the argmax:
//   1. The argmax pass also keeps every 2^shift-th logit of the slice (a strided sample of the row).
//      The sample's masses, histogrammed over kBuckets buckets of x, estimate where the cut falls; the
//      window is the run of buckets from kMinWindowMargin or more sampled elements above that estimate
//      to as many below it, sized so the row's elements in it fit in shared memory.
//   2. One pass in id order sums each element's weight in registers (the row's total; per warp chunk,
//      the weight above the window) and gathers the window's elements (key, id) to shared memory.
//   3. The cluster's window is sorted (key desc, id asc); the cut is where the weight above the window
//      plus the sorted window's reaches the target: exact, in integers, as the other selects.
// A top-k cut keeps at most kWindowCapacity elements, all inside a window that reaches up to the row's
// maximum, so the top-p and min-p cuts and the draw then run on the sorted window alone. After a top-p
// cut the draw knows each warp chunk's kept weight (above the window, plus the kept window elements
// whose ids fall in it) and rescans only the chunk that holds the target.
// The estimate only places the window. When the cut falls outside it, or the window overflows, the
// select reports a miss and the caller runs the grid select (the same cut): the result never depends
// on the sample.

struct Window {
  float lo, scale;  // the bucket grid over x: grid_bucket<kBuckets>(x, lo, scale)
  int low, high;    // buckets [low, high] are gathered; the weight above `high` is summed
  // The same bounds as values of x, for the pass over the row (two comparisons instead of a bucket per
  // element): x is in a bucket >= low iff x >= x_low, in a bucket > high iff x >= x_above.
  float x_low, x_above;
};

// The least x <= 0 whose bucket is at least b (-inf for b <= 0; +inf where no x <= 0 reaches b): the
// bucket is monotone in x, so a bisection over the order keys of the floats from -inf to 0 finds it.
__device__ __forceinline__ float least_x_in_bucket(int b, float lo, float scale) {
  if (b <= 0) return -INFINITY;
  auto reaches = [&](uint32_t key) { return grid_bucket<kBuckets>(key_value(key), lo, scale) >= b; };
  uint32_t low_key = sm::order_key(-INFINITY), high_key = sm::order_key(0.0f);
  if (!reaches(high_key)) return INFINITY;
  while (low_key < high_key) {
    const uint32_t mid = low_key + (high_key - low_key) / 2;
    if (reaches(mid)) high_key = mid; else low_key = mid + 1;
  }
  return key_value(low_key);
}

// Calls f(a) for the cluster's sampled logits (pass 1 wrote each CTA's, every 2^shift-th adjusted logit of
// its slice), each once over the block's threads, rank by rank.
template <typename F>
__device__ __forceinline__ void for_each_sampled(const WindowShared& ws, const Cluster& cluster, int32_t n,
                                                 int32_t slice, int shift, F&& f) {
  for (unsigned r = 0; r < cluster.num_blocks(); ++r) {
    const int32_t len = min(n, (int32_t)(r + 1) * slice) - min(n, (int32_t)r * slice);
    const int32_t count = (len + (1 << shift) - 1) >> shift;
    const float* sample = cluster.map_shared_rank(ws.sample, r);
    for (int32_t j = threadIdx.x; j < count; j += kThreads) f(sample[j]);
  }
}

// Places the window of a top-k (by count) or top-p (by mass) select from this cluster's sample (pass 1
// wrote each CTA's, every 2^shift-th element of its slice). Returns false when no window fits the
// estimate (the caller runs the grid select). A row of at most kWindowCapacity elements is one window.
// Every thread of the cluster calls it and gets the same window.
template <Select kind, typename W>
__device__ bool place_window(Shared& sh, WindowShared& ws, const Cluster& cluster, const W& wt, int32_t n,
                             int32_t slice, int shift, float x_lo, int32_t top_k, float top_p, Window* win) {
  constexpr bool kMass = kind == Select::kTopP;
  constexpr int kPer = kBuckets / kThreads;
  win->lo = x_lo;
  win->scale = x_lo < 0.0f ? (float)kBuckets / -x_lo : 0.0f;
  win->low = 0;
  win->high = kBuckets - 1;
  win->x_low = -INFINITY;
  win->x_above = INFINITY;
  if (n <= kWindowCapacity) return true;
  __syncthreads();  // the buckets may still be read by an earlier select
  for (int b = threadIdx.x; b < kBuckets; b += kThreads) {
    sh.count[b] = 0;
    if (kMass) sh.mass[b] = 0;
  }
  __syncthreads();
  // Every CTA histograms the whole cluster's sample, so all of them place the same window.
  for_each_sampled(ws, cluster, n, slice, shift, [&](float a) {
    const float x = sm::scaled_exponent(a, wt.max, wt.inv_t);
    const uint64_t m = sm::exponent_mass(x);
    if (m == 0) return;  // not a candidate
    const int b = grid_bucket<kBuckets>(x, win->lo, win->scale);
    atomicAdd(&sh.count[b], 1u);
    if (kMass) atomicAdd(&sh.mass[b], (u64)m);
  });
  __syncthreads();
  // Thread t holds buckets kBuckets - 1 - (t · kPer + j): keys descending.
  uint32_t c[kPer];
  u64 w[kPer], own_count = 0, own_weight = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int b = kBuckets - 1 - ((int)threadIdx.x * kPer + j);
    c[j] = sh.count[b];
    w[j] = kMass ? sh.mass[b] : c[j];
    own_count += c[j];
    own_weight += w[j];
  }
  u64 total_count, total_weight;
  const u64 count_before = block_exclusive_scan(sh, own_count, &total_count);
  const u64 weight_before = block_exclusive_scan(sh, own_weight, &total_weight);
  if (total_weight == 0) return false;
  // The sample's cut: its top-p share of the mass, or top_k scaled by the sampling stride.
  const u64 target = kMass ? sm::top_p_threshold(total_weight, top_p)
                           : min((u64)ceil_div(top_k, 1 << shift), total_weight);
  if (own_weight > 0 && weight_before < target && target <= weight_before + own_weight) {
    u64 acc_weight = weight_before, acc_count = count_before;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (w[j] > 0 && acc_weight + w[j] >= target) {
        sh.sel_before = acc_count;
        sh.sel_count = c[j];
        sh.sel_digit = kBuckets - 1 - ((int)threadIdx.x * kPer + j);
        break;
      }
      acc_weight += w[j];
      acc_count += c[j];
    }
  }
  __syncthreads();
  const u64 cut_before = sh.sel_before, cut_count = sh.sel_count;
  // How far, in sampled elements, the estimate may lie from the real cut. Top-k: the Poisson spread of the
  // count above it. Top-p: the spread of the sampled mass above the cut against top_p times the total
  // (each sampled element stands for 2^shift of the row's), sqrt(A (1 - p)² + B p²) with A and B the sums
  // of the squared masses above and at or below the cut's bucket, in elements of the cut's mean mass. A
  // few heavy elements make it large: their share of the sample is luck.
  float deviation;
  if (kMass) {
    const int cut_bucket = sh.sel_digit;
    u64 above_sq = 0, below_sq = 0;
    for_each_sampled(ws, cluster, n, slice, shift, [&](float a) {
      const float x = sm::scaled_exponent(a, wt.max, wt.inv_t);
      const u64 m = sm::exponent_mass(x) >> 17, sq = m * m;  // at most 2^32 each, 2^46 in all: exact
      const bool above = grid_bucket<kBuckets>(x, win->lo, win->scale) > cut_bucket;
      above_sq += above ? sq : 0;
      below_sq += above ? 0 : sq;
    });
    block_exclusive_scan(sh, above_sq, &above_sq);
    block_exclusive_scan(sh, below_sq, &below_sq);
    const u64 cut_mean = (sh.mass[cut_bucket] / max(sh.count[cut_bucket], 1u)) >> 17;
    const double q = top_p;
    deviation = (float)(sqrt((double)above_sq * (1.0 - q) * (1.0 - q) + (double)below_sq * q * q) /
                        (double)max(cut_mean, (u64)1));
  } else {
    deviation = sqrtf((float)(cut_before + cut_count));
  }
  // The window: up to a budget of kWindowCapacity · 3/4 of the row's elements, that is `budget` sampled
  // ones. It needs kMinWindowMargin + 2 deviations past the estimate on each side and takes up to
  // kMinWindowMargin + 4 (a smaller window sorts faster).
  // It reaches the row's maximum when that fits (top-k always: a top-k window holds everything it keeps),
  // else it is centred on the estimate (top-p). Where neither fits but the estimate puts the cut in the
  // first quarter of the budget (a few heavy elements, so a wide spread), it takes the top of the row.
  const int64_t budget = (int64_t)(kWindowCapacity * 3 / 4) >> shift;
  const int64_t need = kMinWindowMargin + (int64_t)(2.0f * deviation);
  const int64_t want = kMinWindowMargin + (int64_t)(4.0f * deviation);
  const int64_t through_cut = (int64_t)(cut_before + cut_count), centred_room = (budget - (int64_t)cut_count) / 2;
  int64_t high_rank, low_rank;  // 1-based ranks (keys descending) of sampled elements in the first and last buckets
  if (through_cut + need <= budget) {
    high_rank = 0;
    low_rank = through_cut + min(budget - through_cut, want);
  } else if (kMass && centred_room >= need) {
    const int64_t margin = min(centred_room, want);
    high_rank = (int64_t)cut_before > margin ? (int64_t)cut_before - margin + 1 : 0;
    low_rank = through_cut + margin;
  } else if (kMass && through_cut <= budget / 4) {
    high_rank = 0;
    low_rank = budget;
  } else {
    return false;
  }
  __syncthreads();  // sel_* read
  if (threadIdx.x == 0) {
    sh.window_high = kBuckets - 1;
    sh.window_high_before = 0;
    sh.window_low = 0;
    sh.window_low_through = total_count;
  }
  __syncthreads();
  u64 acc = count_before;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int b = kBuckets - 1 - ((int)threadIdx.x * kPer + j);
    if (high_rank > 0 && acc < (u64)high_rank && (u64)high_rank <= acc + c[j]) {
      sh.window_high = b;
      sh.window_high_before = acc;
    }
    if ((u64)low_rank <= total_count && acc < (u64)low_rank && (u64)low_rank <= acc + c[j]) {
      sh.window_low = b;
      sh.window_low_through = acc + c[j];
    }
    acc += c[j];
  }
  __syncthreads();
  win->low = sh.window_low;
  win->high = sh.window_high;
  win->x_low = least_x_in_bucket(win->low, win->lo, win->scale);
  win->x_above = least_x_in_bucket(win->high + 1, win->lo, win->scale);
  // The row's elements the window is expected to hold.
  const u64 expected = (sh.window_low_through - sh.window_high_before) << shift;
  return expected <= (u64)(kWindowCapacity * 3 / 4);
}

// The position of the first of elements [0, count) (in their order) at which the cumulative weight
// reaches target_of(total) (total: the weight of all of them), -1 where it never does (a target above the
// total, or 0). weight_of(j): element j's weight. The whole block; count <= kWindowCapacity.
template <typename WeightOf, typename TargetFn>
__device__ int32_t find_cumulative(Shared& sh, int32_t count, WeightOf weight_of, TargetFn target_of) {
  constexpr int kPerThread = kWindowCapacity / kThreads;
  __syncthreads();  // sel_index may still be read from the previous call
  if (threadIdx.x == 0) sh.sel_index = -1;
  // Thread t weighs elements [t · per, (t + 1) · per).
  const int per = ceil_div(count, kThreads);
  u64 weight[kPerThread], own = 0;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int j = (int)threadIdx.x * per + k;
    weight[k] = k < per && j < count ? (u64)weight_of(j) : 0;
    own += weight[k];
  }
  u64 total;
  const u64 excl = block_exclusive_scan(sh, own, &total);
  const u64 target = (u64)target_of((uint64_t)total);
  if (own > 0 && excl < target && target <= excl + own) {
    u64 acc = excl;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      if (weight[k] > 0 && acc + weight[k] >= target) {
        sh.sel_index = (int)threadIdx.x * per + k;
        break;
      }
      acc += weight[k];
    }
  }
  __syncthreads();
  return sh.sel_index;
}

enum class WindowOutcome { kCut, kNoCut, kMiss };

struct WindowCut {
  WindowOutcome outcome;  // kNoCut: the target is 0 (top-k keeps every candidate); kMiss: run the grid
  Cut cut;
  int32_t index;     // the cut's position in ws.gathered (sorted), when kCut
  bool sample_kept;  // ws.sample still holds the sample (the window was not gathered over it)
};

// The first element (key desc, id asc) at which the cumulative weight reaches target_of(total), found
// inside `win` (place_window). On a cut, ws.gathered holds the window sorted and, for top-p,
// sh.warp_kept each warp chunk's weight above the window. Every thread of the cluster calls it and gets
// the same answer.
template <Select kind, typename W, typename TargetFn>
__device__ WindowCut window_select(Shared& sh, WindowShared& ws, const Cluster& cluster, const Slice& sl, const W& wt,
                                   const Window& win, TargetFn target_of) {
  static_assert(kind != Select::kTopN, "the window selects by the adjusted logits");
  constexpr bool kMass = kind == Select::kTopP;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned num_ranks = cluster.num_blocks();
  __syncthreads();  // num_candidates and warp_kept may still be read by an earlier select
  if (threadIdx.x == 0) sh.num_candidates = 0;
  __syncthreads();
  u64 total = 0, above = 0;
  stream_warp_chunk(sl, [&](int32_t i, float r, bool valid) {
    // Straight-line up to the ballot, so the elements' polynomials interleave.
    const float a = wt.value(i, r);
    const float x = sm::scaled_exponent(a, wt.max, wt.inv_t);
    const uint64_t m = sm::exponent_mass(x);
    const uint64_t w = !valid ? 0 : kMass ? m : (m > 0 ? 1 : 0);  // the select's weight (no top-k cut yet)
    const bool is_above = x >= win.x_above;  // false for NaN, whose weight is 0
    total += w;
    above += is_above ? w : 0;
    const bool in = w > 0 && x >= win.x_low && !is_above;
    const unsigned ballot = __ballot_sync(0xffffffffu, in);
    if (!ballot) return;
    int base = 0;
    if (lane == 0) base = atomicAdd(&sh.num_candidates, __popc(ballot));
    base = __shfl_sync(0xffffffffu, base, 0);
    const int slot = base + __popc(ballot & ((1u << lane) - 1));
    // (key desc, id asc) is the descending order of key · 2^32 + ~id.
    if (in && slot < kWindowCapacity) ws.local[slot] = ((u64)sm::order_key(a) << 32) | (uint32_t)~(uint32_t)i;
  });
  total = warp_sum_u64(total);
  above = warp_sum_u64(above);
  if (lane == 0) {
    sh.warp_u64[warp] = total;
    sh.warp_kept[warp] = above;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    u64 t = 0, a = 0;
    for (int w = 0; w < kWarps; ++w) {
      t += sh.warp_u64[w];
      a += sh.warp_kept[w];
    }
    sh.cta_u64 = t;
    sh.cta_above = a;
  }
  cluster.sync();  // every CTA's sums and window elements complete
  u64 all_total = 0, all_above = 0;
  int64_t num = 0;
  bool overflow = false;
  for (unsigned r = 0; r < num_ranks; ++r) {
    const Shared* other = cluster.map_shared_rank(&sh, r);
    all_total += other->cta_u64;
    all_above += other->cta_above;
    overflow |= other->num_candidates > kWindowCapacity;
    num += other->num_candidates;
  }
  overflow |= num > kWindowCapacity;
  const u64 target = all_total ? (u64)target_of((uint64_t)all_total) : 0;
  if (target == 0 || overflow || target <= all_above) {
    cluster.sync();  // the others have read this CTA's sums
    return WindowCut{target == 0 ? WindowOutcome::kNoCut : WindowOutcome::kMiss, Cut{false, 0u, 0}, -1, true};
  }
  // Every CTA gathers the cluster's window over its sample (read by all in place_window, before the
  // barrier above) and sorts it.
  int32_t size = 0;
  for (unsigned r = 0; r < num_ranks; ++r) {
    const u64* src = cluster.map_shared_rank(ws.local, r);
    const int32_t cnt = cluster.map_shared_rank(&sh, r)->num_candidates;
    for (int32_t j = threadIdx.x; j < cnt; j += kThreads) ws.gathered[size + j] = src[j];
    size += cnt;
  }
  const int32_t count = size;
  size = pow2_at_least(count);
  for (int32_t j = count + threadIdx.x; j < size; j += kThreads) ws.gathered[j] = 0;
  cluster.sync();  // the others have read this CTA's window and sums
  bitonic_sort_descending(ws.gathered, size);
  // The cut: where the weight above the window plus the sorted window's reaches the target.
  const u64 need = target - all_above;
  const int32_t index = find_cumulative(
      sh, count,
      [&](int32_t j) -> uint64_t { return kMass ? wt.key_mass((uint32_t)(ws.gathered[j] >> 32)) : 1; },
      [&](uint64_t) { return (uint64_t)need; });
  if (index < 0) return WindowCut{WindowOutcome::kMiss, Cut{false, 0u, 0}, -1, false};  // below the window
  const u64 v = ws.gathered[index];
  return WindowCut{WindowOutcome::kCut, Cut{true, (uint32_t)(v >> 32), (int32_t)~(uint32_t)v}, index, false};
}

// The position (in the sorted window) of the first of its leading `count` elements at which the
// cumulative mass reaches top_p_threshold(their mass, top_p): never -1, the first element weighs 2^33.
template <typename W>
__device__ int32_t top_p_in_window(Shared& sh, const WindowShared& ws, const W& wt, int32_t count, float top_p) {
  return find_cumulative(
      sh, count, [&](int32_t j) -> uint64_t { return wt.key_mass((uint32_t)(ws.gathered[j] >> 32)); },
      [&](uint64_t total) { return sm::top_p_threshold(total, top_p); });
}

// The draw after a window top-k cut at sorted position k_index: the top-p cut inside the top k (top_p <
// 1), then min-p, then the draw in id order, all on the sorted window (ws.gathered). Every thread of the
// cluster gets the token.
template <typename W>
__device__ int32_t draw_in_window(Shared& sh, WindowShared& ws, const W& wt, int32_t k_index, float top_p,
                                  uint64_t bits) {
  const int32_t last = top_p < 1.0f ? min(k_index, top_p_in_window(sh, ws, wt, k_index + 1, top_p)) : k_index;
  const int32_t kept = last + 1;
  const int32_t size = pow2_at_least(kept);
  // The kept elements as ~id · 2^32 + key, so that the descending sort orders them by id; min-p's
  // drops as 0, sorted last. (ws.local is free: every CTA gathered it before window_select's last barrier.)
  for (int32_t j = threadIdx.x; j < size; j += kThreads) {
    u64 e = 0;
    if (j < kept) {
      const u64 v = ws.gathered[j];
      const uint32_t key = (uint32_t)(v >> 32);
      if (wt.key_mass(key) >= wt.min_mass) e = (v << 32) | key;
    }
    ws.local[j] = e;
  }
  __syncthreads();
  bitonic_sort_descending(ws.local, size);
  // The draw in id order (total >= 2^33: the row's maximum is kept).
  const int32_t index = find_cumulative(
      sh, kept,
      [&](int32_t j) -> uint64_t { return ws.local[j] ? wt.key_mass((uint32_t)ws.local[j]) : 0; },
      [&](uint64_t total) { return sm::draw_target(total, bits) + 1; });
  return (int32_t)~(uint32_t)(ws.local[index] >> 32);
}

// The draw after a window top-p cut (wt.p_cut set, no top-k cut, no min-p): each warp chunk's kept
// weight is its weight above the window (sh.warp_kept, from window_select) plus its kept window
// elements, so only the chunk that holds the target is read again. Every thread of the cluster gets the
// token.
template <typename W>
__device__ int32_t draw_after_window_top_p(Shared& sh, const WindowShared& ws, const Cluster& cluster,
                                           const Slice& sl, const W& wt, int32_t p_index, uint64_t bits) {
  const int32_t chunk = warp_chunk_size(sl);
  __syncthreads();  // warp_kept complete
  for (int32_t j = threadIdx.x; j <= p_index; j += kThreads) {
    const u64 v = ws.gathered[j];
    const int32_t id = (int32_t)~(uint32_t)v;
    if (id >= sl.begin && id < sl.end)
      atomicAdd(&sh.warp_kept[(id - sl.begin) / chunk], (u64)wt.key_mass((uint32_t)(v >> 32)));
  }
  return find_in_chunks(
      sh, cluster, sl,
      [&](int32_t i, float r) -> uint64_t {
        const float a = wt.value(i, r);
        return wt.kept_weight(i, a, sm::order_key(a));
      },
      [&](uint64_t total) { return sm::draw_target(total, bits) + 1; });
}
