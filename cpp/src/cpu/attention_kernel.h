// The inner kernels of the CPU attention op: a vector expf and a query tile attending over the keys
// of one (sequence, kv head) with an online softmax.
//
// Determinism: a query row's result is a function of its own q, its own context length and the
// sequence's K/V only. Keys are visited in blocks of kKeyBlock aligned to absolute position 0, and
// every per-row reduction (the q·k dot, the block max and sum, the p·v accumulation) runs in an order
// fixed by those blocks, so which other rows share a tile, and which thread runs it, changes nothing.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/simd.h"

namespace rtllm::cpu {

typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int64_t kKeyBlock = 32;  // keys per online-softmax step (a multiple of kLanes)
constexpr int64_t kMaxTileRows = 16;  // query rows (tokens x heads of one kv head) per tile

inline v8 max8(v8 a, v8 b) { return a > b ? a : b; }
inline float hmax8(v8 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// e^x for x <= 0, within ~2 ulp down to -87 (below that the result is ~1e-38, as good as 0 here):
// x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n through the exponent bits.
inline v8 exp8(v8 x) {
  x = max8(x, splat8(-87.0f));
  const v8 magic = splat8(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const v8 t = fmadd8(x, splat8(1.44269504088896341f), magic);
  const v8 n = t - magic;
  v8 r = fmadd8(n, splat8(-0.693359375f), x);
  r = fmadd8(n, splat8(2.12194440e-4f), r);
  v8 p = splat8(1.9875691500e-4f);
  p = fmadd8(p, r, splat8(1.3981999507e-3f));
  p = fmadd8(p, r, splat8(8.3334519073e-3f));
  p = fmadd8(p, r, splat8(4.1665795894e-2f));
  p = fmadd8(p, r, splat8(1.6666665459e-1f));
  p = fmadd8(p, r, splat8(5.0000001201e-1f));
  p = fmadd8(p, r * r, r + splat8(1.0f));
  const v8i two_n = (((v8i)t - (v8i)magic) + 127) << 23;
  return p * (v8)two_n;
}

// Lanes I of the 16-lane concatenation [x, y].
template <int... I>
inline v8 shuffle8(v8 x, v8 y) {
#if defined(__clang__)
  return __builtin_shufflevector(x, y, I...);
#else
  return __builtin_shuffle(x, y, v8i{I...});
#endif
}

// score[k] = the lane sum of a[k] for 8 accumulators, each as (x0 + x1) + (x2 + x3), x_i = a[i] + a[i + 4].
inline v8 reduce8x8(const v8* a) {
  auto halves = [](v8 x, v8 y) {  // [x0+x4 .. x3+x7 of x | the same of y]
    return shuffle8<0, 1, 2, 3, 8, 9, 10, 11>(x, y) + shuffle8<4, 5, 6, 7, 12, 13, 14, 15>(x, y);
  };
  auto pairs = [](v8 x, v8 y) {  // adjacent sums, per 128-bit half: [x01 x23 y01 y23 | x45 x67 y45 y67]
    return shuffle8<0, 2, 8, 10, 4, 6, 12, 14>(x, y) + shuffle8<1, 3, 9, 11, 5, 7, 13, 15>(x, y);
  };
  const v8 h1 = pairs(halves(a[0], a[4]), halves(a[1], a[5]));
  const v8 h2 = pairs(halves(a[2], a[6]), halves(a[3], a[7]));
  return pairs(h1, h2);  // [a0 a1 a2 a3 | a4 a5 a6 a7]
}

// scores[r][0:8] = scale · q[r]·keys[k] for R query rows and 8 keys of head_dim hd: 8-lane partial
// sums over the full chunks, reduced, then the tail in order. Each row's values do not depend on R:
// two rows share the key loads. Their 16 accumulators, 2 q vectors and the key vector fit AVX-512VL's
// registers; with AVX2 the keys go in two passes of 4 (every accumulator is its own chain over d, so
// the passes change no bit).
template <int R>
inline void score8(const float* const* q, const float* const* keys, int64_t hd, float scale, float* const* scores) {
  constexpr int kKeysPerPass = R * kLanes + R + 1 <= kVectorRegisters ? kLanes : kLanes / 2;
  const int64_t full = hd / kLanes * kLanes;
  v8 acc[R][kLanes];
  for (int k0 = 0; k0 < kLanes; k0 += kKeysPerPass) {
    v8 part[R][kKeysPerPass];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int k = 0; k < kKeysPerPass; ++k) part[r][k] = splat8(0.0f);
    for (int64_t d = 0; d < full; d += kLanes) {
      v8 qd[R];
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) qd[r] = load8(q[r] + d);
#pragma GCC unroll 8
      for (int k = 0; k < kKeysPerPass; ++k) {
        const v8 kd = load8(keys[k0 + k] + d);
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) part[r][k] = fmadd8(qd[r], kd, part[r][k]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int k = 0; k < kKeysPerPass; ++k) acc[r][k0 + k] = part[r][k];
  }
  for (int r = 0; r < R; ++r) {
    v8 dots = reduce8x8(acc[r]);
    for (int64_t d = full; d < hd; ++d)
      for (int k = 0; k < kLanes; ++k) dots[k] = std::fma(q[r][d], keys[k][d], dots[k]);
    store8(scores[r], dots * splat8(scale));
  }
}

// acc[0:8 NC] = alpha · acc + sum_j p[j] · values[j], j in order. NC accumulators, the broadcast p[j]
// and a value vector must fit the registers: head_dim 128 on AVX2 goes in two passes of 64 columns
// (each column is its own chain over j, so the passes change no bit).
template <int NC>
inline void accumulate_pv_fixed(float* acc, float alpha, const float* p, const float* const* values, int64_t count) {
  constexpr int kChunksPerPass = NC + 2 <= kVectorRegisters ? NC : NC / 2;
  for (int c0 = 0; c0 < NC; c0 += kChunksPerPass) {
    v8 a[kChunksPerPass];
#pragma GCC unroll 16
    for (int c = 0; c < kChunksPerPass; ++c) a[c] = load8(acc + (c0 + c) * kLanes) * splat8(alpha);
    for (int64_t j = 0; j < count; ++j) {
      const v8 pj = splat8(p[j]);
#pragma GCC unroll 16
      for (int c = 0; c < kChunksPerPass; ++c) a[c] = fmadd8(pj, load8(values[j] + (c0 + c) * kLanes), a[c]);
    }
#pragma GCC unroll 16
    for (int c = 0; c < kChunksPerPass; ++c) store8(acc + (c0 + c) * kLanes, a[c]);
  }
}

inline void accumulate_pv(float* acc, float alpha, const float* p, const float* const* values, int64_t count,
                          int64_t hd) {
  switch (hd) {
    case 32: return accumulate_pv_fixed<4>(acc, alpha, p, values, count);
    case 64: return accumulate_pv_fixed<8>(acc, alpha, p, values, count);
    case 128: return accumulate_pv_fixed<16>(acc, alpha, p, values, count);
    default: break;
  }
  for (int64_t d = 0; d < hd; ++d) acc[d] *= alpha;
  for (int64_t j = 0; j < count; ++j)
    for (int64_t d = 0; d < hd; ++d) acc[d] = std::fma(p[j], values[j][d], acc[d]);
}

// Online-softmax step of one row over a key block: p[0:count] holds the block's scores on entry and
// the weights e^(score - new max) on exit; rescales the row's running max, sum and acc, adds p·v.
inline void softmax_block(float* p, int64_t count, const float* const* value_rows, int64_t hd, float& max_score,
                          float& sum, float* acc) {
  const int64_t num_chunks = (count + kLanes - 1) / kLanes;
  const v8i lane = v8i{0, 1, 2, 3, 4, 5, 6, 7};
  const v8 neg_inf = splat8(-std::numeric_limits<float>::infinity());
  v8 m = neg_inf;
  for (int64_t c = 0; c < num_chunks; ++c)
    m = max8(m, lane + int32_t(c * kLanes) < int32_t(count) ? load8(p + c * kLanes) : neg_inf);
  const float new_max = std::max(max_score, hmax8(m));
  const bool first = max_score == -std::numeric_limits<float>::infinity();  // acc and sum are still 0
  const float alpha = first ? 0.0f : exp8(splat8(max_score - new_max))[0];
  max_score = new_max;
  v8 block_sum = splat8(0.0f);
  for (int64_t c = 0; c < num_chunks; ++c) {  // masked lanes get exactly 0, whatever their score
    const v8 e = exp8(load8(p + c * kLanes) - splat8(new_max));
    const v8 pc = lane + int32_t(c * kLanes) < int32_t(count) ? e : splat8(0.0f);
    store8(p + c * kLanes, pc);
    block_sum += pc;
  }
  sum = sum * alpha + hsum8(block_sum);
  accumulate_pv(acc, alpha, p, value_rows, count, hd);
}

// One query tile against one (sequence, kv head). Row r has query q[r] (head_dim hd) and attends to
// keys [0, num_keys[r]), num_keys[r] >= 1; adjacent rows with the same num_keys (the q heads of one
// token) share the score pass. kv_rows(start, end, key_rows, value_rows) points key_rows[j] and
// value_rows[j] at the cached K and V rows of position start + j for j < kKeyBlock, and at those of
// end - 1 past end - 1 (computed, then masked out). Writes softmax(scale · q kᵀ) v to out[r], which
// may alias q[r]: it is written last. acc: [num_rows, hd] scratch.
template <typename KvRowsFn>
void attend_tile(const float* const* q, float* const* out, const int64_t* num_keys, int64_t num_rows, int64_t hd,
                 float scale, KvRowsFn kv_rows, float* acc) {
  int64_t max_keys = 0;
  for (int64_t r = 0; r < num_rows; ++r) max_keys = std::max(max_keys, num_keys[r]);
  float max_score[kMaxTileRows], sum[kMaxTileRows];
  std::fill(max_score, max_score + num_rows, -std::numeric_limits<float>::infinity());
  std::fill(sum, sum + num_rows, 0.0f);
  std::fill(acc, acc + num_rows * hd, 0.0f);
  const float* key_rows[kKeyBlock];
  const float* value_rows[kKeyBlock];
  alignas(32) float p[2][kKeyBlock];
  for (int64_t start = 0; start < max_keys; start += kKeyBlock) {
    kv_rows(start, max_keys, key_rows, value_rows);
    for (int64_t r = 0; r < num_rows;) {
      const int64_t count = std::min(kKeyBlock, num_keys[r] - start);
      const int num_paired = r + 1 < num_rows && num_keys[r + 1] == num_keys[r] ? 2 : 1;
      if (count > 0) {
        const int64_t num_chunks = (count + kLanes - 1) / kLanes;
        for (int64_t c = 0; c < num_chunks; ++c) {
          float* const scores[2] = {p[0] + c * kLanes, p[1] + c * kLanes};
          if (num_paired == 2)
            score8<2>(q + r, key_rows + c * kLanes, hd, scale, scores);
          else
            score8<1>(q + r, key_rows + c * kLanes, hd, scale, scores);
        }
        for (int i = 0; i < num_paired; ++i)
          softmax_block(p[i], count, value_rows, hd, max_score[r + i], sum[r + i], acc + (r + i) * hd);
      }
      r += num_paired;
    }
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    const float inv = 1.0f / sum[r];
    const float* a = acc + r * hd;
    int64_t d = 0;
    for (; d + kLanes <= hd; d += kLanes) store8(out[r] + d, load8(a + d) * splat8(inv));
    for (; d < hd; ++d) out[r][d] = a[d] * inv;
  }
}

}  // namespace rtllm::cpu
