// weight_only_linear: y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]) with integer weights (W8A16, W4A16 and
// imported GGUF-style formats), W[n, k] = q[n, k] · scale[n, k / G] + offset[n, k / G], G = group_size.
// The codes stay in memory as stored (int8, or int4 two per byte): decode reads 4x / 8x fewer weight
// bytes than the float32 linear.
//
// Association (docs/engine_format.md), float32 throughout:
//   W[n, k] = fma(float(q[n, k]), scale[n, g], offset[n, g])   (offset 0 when absent; one rounding, none
//             at all when the scale is F16 or BF16: q · scale is then exact)
//   k runs group by group in chunks of 16 (a group's last chunk zero-padded when 16 does not divide G);
//   acc_l = FMA chain from 0 over the chunks in order of x[t, k] · W[n, k] for lane l of each chunk;
//   y[t, n] = hsum16(acc) + bias[n]   (hsum16: lanes l + (l + 8), then ((0+4)+(2+6)) + ((1+5)+(3+7))).
// Every token takes this one path whatever T, the tile it falls in or the thread count: a token's result
// does not depend on its batch.
//
// Where the CPU has AMX-BF16, codes whose groups are whole steps of 32 k (cpu/amx_weight_only.h: a group
// size that is a multiple of 32, or one group) run on AMX tiles instead, at every T (the same invariance,
// other numerics: x to about 16 significant bits, bounds in amx_weight_only.cc). RTLLM_CPU_AMX=0 at engine
// load keeps the kernels below.
//
// Work: a task takes a block of up to kTaskRows weight rows and kTaskTokens tokens, and runs register
// tiles of up to kTileTokens tokens x kPrefillTileCols weight rows. With one token (decode, bandwidth-bound on
// the packed bytes) a task takes kDecodeTaskRows rows, one contiguous run of codes that its tiles
// (decode_tile, accumulators kept in registers across groups) stream with a software prefetch
// kPrefetchBytes ahead, and dequantize in registers; with more, the task
// first dequantizes its rows to float32 in its thread's workspace (by the same function, so to the same
// values) and every token of the block reuses them.
#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/amx_weight_only.h"
#include "op_registry.h"
#include "thread_pool.h"
#include "weight_only_linear_spec.h"

// 64-byte vectors pass between this file's inline helpers only (anonymous namespace): without AVX-512 GCC
// warns that their ABI differs, which no caller outside the file can observe.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rtllm {
namespace {

constexpr int kChunk = 16;            // lanes of the accumulators (one AVX-512 vector, two AVX2 ones)
constexpr int64_t kTaskRows = 8;      // weight rows dequantized per task (several tokens)
constexpr int64_t kDecodeTaskRows = 128;  // weight rows per task for one token: long contiguous streams
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead one token's stream of codes is prefetched
constexpr int64_t kTaskTokens = 64;   // tokens per task: the x block stays in L2
// Register tiles: tokens x weight rows. AVX-512: 4 x 4 (16 accumulators + 4 x + 1 w of 32 zmm); AVX2,
// where a 16-lane vector is two of its 16 ymm: 2 x 2 (8 + 4 + 2). Decode: kDecodeTileCols below.
#if defined(__AVX512F__)
constexpr int kTileTokens = 4, kPrefillTileCols = 4;
#else
constexpr int kTileTokens = 2, kPrefillTileCols = 2;
#endif
// Decode: 1 token x this many weight rows. With AVX2 and offsets, 4 rows hold 8 accumulators, 4 scales
// and 4 offsets: with x and the codes more than the 16 ymm registers, and GCC kept an accumulator on the
// stack (a store and a reload in its FMA chain every chunk). 3 rows fit.
#if defined(__AVX2__) && !defined(__AVX512F__)
template <bool kOffset>
constexpr int kDecodeTileCols = kOffset ? 3 : 4;
#else
template <bool kOffset>
constexpr int kDecodeTileCols = 4;
#endif

// A 16-lane float vector. With AVX-512 (or no AVX2) GCC's 64-byte vector type, one zmm register; with
// AVX2, two explicit ymm halves (lanes 0..7, 8..15). GCC lowers a 64-byte vector type without AVX-512
// through the stack, several stores and reloads per operation.
#if defined(__AVX2__) && !defined(__AVX512F__)
struct v16 {
  __m256 lo, hi;  // v16{} is zero
};
inline v16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline float lane0(v16 v) { return _mm256_cvtss_f32(v.lo); }
inline void store16(float* p, v16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline v16 splat16(float x) {
  const __m256 b = _mm256_set1_ps(x);
  return {b, b};
}
inline v16 broadcast16(const float* p) {
  const __m256 b = _mm256_broadcast_ss(p);
  return {b, b};
}
// a * b + c with one rounding per lane.
inline v16 fmadd16(v16 a, v16 b, v16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline v16 mul16(v16 a, v16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
// ((0+4)+(2+6)) + ((1+5)+(3+7)) of h = lanes l + (l + 8), as halving vector adds.
inline float hsum16(v16 v) {
  const __m256 h = _mm256_add_ps(v.lo, v.hi);
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  float l[4];
  _mm_storeu_ps(l, q);
  return (l[0] + l[2]) + (l[1] + l[3]);
}
#else
typedef float v16 __attribute__((vector_size(kChunk * sizeof(float))));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline float lane0(v16 v) { return v[0]; }
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
inline v16 splat16(float x) { return v16{} + x; }
// *p in every lane, read by the broadcast itself (one load, no shuffle).
inline v16 broadcast16(const float* p) {
#if defined(__AVX512F__)
  return (v16)_mm512_set1_ps(*p);
#else
  return splat16(*p);
#endif
}

// a * b + c with one rounding per lane, whatever the ISA.
inline v16 fmadd16(v16 a, v16 b, v16 c) {
#if defined(__AVX512F__)
  return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  v16 r;
  for (int i = 0; i < kChunk; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

inline v16 mul16(v16 a, v16 b) { return a * b; }

// ((0+4)+(2+6)) + ((1+5)+(3+7)) of h = lanes l + (l + 8), as halving vector adds.
inline float hsum16(v16 v) {
  typedef float v8f __attribute__((vector_size(8 * sizeof(float))));
  typedef float v4f __attribute__((vector_size(4 * sizeof(float))));
  const v8f h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}
#endif

inline int int4_at(const uint8_t* packed, int64_t k) {
  const int nibble = (packed[k >> 1] >> ((k & 1) * 4)) & 0xF;
  return nibble >= 8 ? nibble - 16 : nibble;
}

// The n valid floats at p, zero-padded to a chunk (the last chunk of a group whose size is not a multiple
// of 16). Through memory, so that callers' accumulator arrays stay in registers.
inline v16 load16_padded(const float* p, int64_t n) {
  float buf[kChunk] = {};
  std::memcpy(buf, p, n * sizeof(float));
  return load16(buf);
}

// The codes as stored, dequantized in registers: chunk(row, k, s, o) = fma(q[row, k..k+15], s, o).
template <bool kInt4>
struct CodeRows {
  static constexpr bool kDequantized = false;
  const uint8_t* codes;  // row 0 = the task's first weight row
  int64_t row_bytes;
  int64_t num_rows;      // of the task

  v16 chunk(int64_t row, int64_t k, v16 s, v16 o) const {
    return fmadd16(values_at(codes + row * row_bytes, k), s, o);
  }
  // q[row, k..k+15] as floats (exact: small integers), r = the row's codes; k >= 0.
  static v16 values_at(const uint8_t* r, int64_t k) {
#if defined(__AVX512F__)
    if constexpr (!kInt4) {
      return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + k))));
    } else {
      // 8 bytes -> each byte in two 32-bit lanes, shifted so that lane 2i holds byte i's low nibble and
      // lane 2i + 1 its high one in bits 0..3; vpermps reads only those bits: a 16-entry table lookup
      // of the signed value as a float.
      const __m512 table = _mm512_set_ps(-1, -2, -3, -4, -5, -6, -7, -8, 7, 6, 5, 4, 3, 2, 1, 0);
#if defined(__AVX512VBMI__)
      // The 8 bytes in every 64-bit lane; vpmultishiftqb copies to byte 0 of 32-bit lane j the 8 bits
      // from bit 4j of them (nibble j = byte j / 2's low or high half): two instructions per chunk.
      int64_t bytes;
      std::memcpy(&bytes, r + (k >> 1), sizeof(bytes));
      const __m512i shifts = _mm512_set_epi64(0x3C00000038LL, 0x3400000030LL, 0x2C00000028LL, 0x2400000020LL,
                                              0x1C00000018LL, 0x1400000010LL, 0x0C00000008LL, 0x0400000000LL);
      const __m512i nibbles = _mm512_multishift_epi64_epi8(shifts, _mm512_set1_epi64(bytes));
#else
      const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
      const __m128i b = _mm_loadl_epi64((const __m128i*)(r + (k >> 1)));
      const __m512i nibbles = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts);
#endif
      return (v16)_mm512_permutexvar_ps(nibbles, table);
    }
#elif defined(__AVX2__)
    if constexpr (!kInt4) {
      return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(r + k)))),
              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(r + k + 8))))};
    } else {
      return {nibbles8(r + (k >> 1)), nibbles8(r + (k >> 1) + 4)};
    }
#else
    v16 q;
    for (int l = 0; l < kChunk; ++l) q[l] = code(r, k + l);
    return q;
#endif
  }
#if defined(__AVX2__) && !defined(__AVX512F__)
  // The 8 nibbles of 4 bytes in order (low, high of each byte) as signed floats: lane j shifts the
  // broadcast word left by 28 - 4j, so that nibble j fills its top 4 bits, and arithmetically right by
  // 28, which sign-extends it.
  static __m256 nibbles8(const uint8_t* p) {
    const __m256i word = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
    const __m256i top = _mm256_sllv_epi32(word, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(top, 28));
  }
#endif
  // The n valid lanes dequantized (std::fma: the same single rounding), the others 0.
  v16 chunk_padded(int64_t row, int64_t k, int64_t n, v16 s, v16 o) const {
    const uint8_t* r = codes + row * row_bytes;
    float w[kChunk] = {};
    for (int64_t l = 0; l < n; ++l) w[l] = std::fma(code(r, k + l), lane0(s), lane0(o));
    return load16(w);
  }
  static float code(const uint8_t* r, int64_t k) {
    return kInt4 ? static_cast<float>(int4_at(r, k)) : static_cast<float>(static_cast<int8_t>(r[k]));
  }
  // One token streams the codes once, tile after tile (a tile's nr rows are contiguous, [N, K] row-major),
  // and a task's tiles are contiguous too: while a tile of nr rows from `row` reads chunk k, it prefetches
  // the line kPrefetchBytes past the bytes it reads. Rows this short are too few lines for the hardware
  // prefetcher to ramp up on; without this, decode waits on memory latency rather than bandwidth. The
  // address may lie past the task or the weight: a prefetch never faults.
  const void* prefetch_address(int64_t row, int64_t k, int64_t nr) const {
    return prefetch_at(codes + row * row_bytes, k, nr);
  }
  // The same for a tile whose first row's codes start at `first`.
  static const char* prefetch_at(const uint8_t* first, int64_t k, int64_t nr) {
    return reinterpret_cast<const char*>(first) + (kInt4 ? (k * nr) >> 1 : k * nr) + kPrefetchBytes;
  }
};

// Rows already dequantized to float32 (by CodeRows, in the task's workspace): chunk() ignores s and o.
struct DequantizedRows {
  static constexpr bool kDequantized = true;
  const float* rows;  // [kTaskRows, K], row 0 = the task's first weight row
  int64_t K;
  v16 chunk(int64_t row, int64_t k, v16, v16) const { return load16(rows + row * K + k); }
  v16 chunk_padded(int64_t row, int64_t k, int64_t n, v16, v16) const { return load16_padded(rows + row * K + k, n); }
  const void* prefetch_address(int64_t, int64_t, int64_t) const { return nullptr; }
};

struct Problem {
  const float* x;       // [T, K]
  const float* scale;   // [N, num_groups]
  const float* offset;  // [N, num_groups] or null
  const float* bias;    // [N] or null
  float* y;             // [T, N]
  int64_t K, N, group_size, num_groups;
};

// Weight row n of the task's CodeRows (global row n0 + n) dequantized into out [K].
template <bool kInt4>
void dequantize_row(const Problem& p, const CodeRows<kInt4>& w, int64_t n0, int64_t n, float* out) {
  const int64_t G = p.group_size, full = G / kChunk * kChunk;
  for (int64_t g = 0, k0 = 0; g < p.num_groups; ++g, k0 += G) {
    const int64_t sg = (n0 + n) * p.num_groups + g;
    const v16 s = splat16(p.scale[sg]), o = splat16(p.offset ? p.offset[sg] : 0.0f);
    for (int64_t k = k0; k < k0 + full; k += kChunk) {
      store16(out + k, w.chunk(n, k, s, o));
    }
    if (full < G) {
      const v16 v = w.chunk_padded(n, k0 + full, G - full, s, o);
      std::memcpy(out + k0 + full, &v, (G - full) * sizeof(float));
    }
  }
}

// y[t0 .. t0 + MR, n0 .. n0 + NR] in the association of the file comment; weight row n0 + j is row
// w_row0 + j of `w`.
template <int MR, int NR, typename Rows>
void tile(const Problem& p, const Rows& w, int64_t t0, int64_t n0, int64_t w_row0) {
  // Dequantized rows need no scales: when 16 divides the group size (no padded chunks) the chunks of
  // every group run as one loop over K, in the same order.
  const bool one_run = Rows::kDequantized && p.group_size % kChunk == 0;
  const int64_t G = one_run ? p.K : p.group_size, num_groups = one_run ? 1 : p.num_groups;
  const int64_t full = G / kChunk * kChunk;
  const float* x[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) x[i] = p.x + (t0 + i) * p.K;
  // Every loop over acc's indices is unrolled before GCC's scalar replacement runs: otherwise acc stays
  // in memory, one store per FMA in every chunk.
  v16 acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = v16{};
  for (int64_t g = 0, k0 = 0; g < num_groups; ++g, k0 += G) {
    v16 s[NR], o[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      if constexpr (Rows::kDequantized) {
        s[j] = o[j] = v16{};  // unused
      } else {
        const int64_t sg = (n0 + j) * p.num_groups + g;
        s[j] = splat16(p.scale[sg]);
        o[j] = splat16(p.offset ? p.offset[sg] : 0.0f);
      }
    }
    for (int64_t k = k0; k < k0 + full; k += kChunk) {
      v16 xv[MR];
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) xv[i] = load16(x[i] + k);
#if defined(__AVX2__) || defined(__AVX512F__)
      // (the prefetch itself stays here: GCC drops a call whose only effect is a prefetch)
      if (const void* a = w.prefetch_address(w_row0, k, NR)) _mm_prefetch(static_cast<const char*>(a), _MM_HINT_T0);
#endif
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const v16 wv = w.chunk(w_row0 + j, k, s[j], o[j]);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) acc[i][j] = fmadd16(xv[i], wv, acc[i][j]);
      }
    }
    if (full < G) {
      const int64_t k = k0 + full, n = G - full;
      v16 xv[MR];
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) xv[i] = load16_padded(x[i] + k, n);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const v16 wv = w.chunk_padded(w_row0 + j, k, n, s[j], o[j]);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) acc[i][j] = fmadd16(xv[i], wv, acc[i][j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      float v = hsum16(acc[i][j]);
      if (p.bias) v += p.bias[n0 + j];
      p.y[(t0 + i) * p.N + n0 + j] = v;
    }
}

// Token t against NR weight rows when 16 divides the group size: tile<1, NR>'s loop, in the same order
// and association, without its padded-chunk path; everything stays in registers across the groups
// (decode runs many short groups: G = 32 is two chunks). Without offsets a weight is q · s rounded once,
// which is fma(q, s, +0) except for the sign of a zero product, and a zero's sign cannot reach y: the
// accumulators start at +0, and fma(x, ±0, acc) is acc for acc != 0 and +0 for acc = +0.
template <int NR, bool kInt4, bool kOffset>
void decode_tile(const Problem& p, const CodeRows<kInt4>& w, int64_t t, int64_t n0, int64_t w_row0) {
  const float* x = p.x + t * p.K;
  const int64_t G = p.group_size, num_groups = p.num_groups;
  const float* scale = p.scale + n0 * num_groups;
  const float* offset = kOffset ? p.offset + n0 * num_groups : nullptr;
  const uint8_t* rows[NR];  // held in registers: w's fields would be reloaded after every store
  for (int j = 0; j < NR; ++j) rows[j] = w.codes + (w_row0 + j) * w.row_bytes;
  v16 acc[NR];
  for (int j = 0; j < NR; ++j) acc[j] = v16{};
  for (int64_t g = 0, k0 = 0; g < num_groups; ++g, k0 += G) {
    v16 s[NR], o[NR];
    for (int j = 0; j < NR; ++j) {
      s[j] = broadcast16(scale + j * num_groups + g);
      if constexpr (kOffset) o[j] = broadcast16(offset + j * num_groups + g);
    }
    for (int64_t k = k0; k < k0 + G; k += kChunk) {
      const v16 xv = load16(x + k);
#if defined(__AVX2__) || defined(__AVX512F__)
      _mm_prefetch(CodeRows<kInt4>::prefetch_at(rows[0], k, NR), _MM_HINT_T0);
#endif
      for (int j = 0; j < NR; ++j) {
        const v16 q = CodeRows<kInt4>::values_at(rows[j], k);
        acc[j] = fmadd16(xv, kOffset ? fmadd16(q, s[j], o[j]) : mul16(q, s[j]), acc[j]);
      }
    }
  }
  for (int j = 0; j < NR; ++j) {
    float v = hsum16(acc[j]);
    if (p.bias) v += p.bias[n0 + j];
    p.y[t * p.N + n0 + j] = v;
  }
}

template <int MR, typename Rows>
void tile_cols(int64_t nr, const Problem& p, const Rows& w, int64_t t, int64_t n, int64_t w_row0) {
  switch (nr) {
    case 4: return tile<MR, 4>(p, w, t, n, w_row0);
    case 3: return tile<MR, 3>(p, w, t, n, w_row0);
    case 2: return tile<MR, 2>(p, w, t, n, w_row0);
    default: return tile<MR, 1>(p, w, t, n, w_row0);
  }
}

// Tokens t0..t1 against weight rows n0..n1 (row n0 is row 0 of `w`), in register tiles. Tokens outer:
// a tile's rows of x stay in L1 while it meets every weight row of the task (a task's 8 dequantized rows
// fit in L1 too; its 64 tokens of x do not).
template <typename Rows>
void tiles(const Problem& p, const Rows& w, int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
  for (int64_t t = t0; t < t1;) {
    const bool full = t + kTileTokens <= t1;
    for (int64_t n = n0; n < n1; n += kPrefillTileCols) {
      const int64_t nr = std::min<int64_t>(kPrefillTileCols, n1 - n);
      if (full) tile_cols<kTileTokens>(nr, p, w, t, n, n - n0);
      else tile_cols<1>(nr, p, w, t, n, n - n0);
    }
    t += full ? kTileTokens : 1;
  }
}
static_assert(kPrefillTileCols <= 4, "tile_cols() dispatches up to 4 rows");

// Inputs as WeightOnlyShape; the codes and the float32 offset kept as stored, scale and the optional bias
// converted to float32 at load (or, on AMX tiles, re-laid: cpu/amx_weight_only.h).
class WeightOnlyLinear final : public OpKind {
 public:
  explicit WeightOnlyLinear(const OpSpec& spec)
      : OpKind(spec), s_(WeightOnlyShape::parse(spec)), amx_(cpu::amx_weight_only_usable(s_.K, s_.group_size)) {}

  WeightPlacement weight_placement(size_t input) const override {
    const bool bias = s_.has_bias && input == spec_.inputs.size() - 1;
    if (amx_ && input == 1) return {spec_.inputs[1].dtype, WeightLayout::kCpuAmxCodeTiles};
    if (amx_ && !bias && input >= 2) return {DataType::kFloat32, WeightLayout::kCpuAmxGroupCols};
    if (input == 2 || bias) return {DataType::kFloat32, WeightLayout::kRowMajor};
    return OpKind::weight_placement(input);  // codes and the float32 offset as stored
  }

  // The FMA kernels' dequantized rows; with AMX tiles, the larger of that (the codes stay row-major
  // when another op reads them too) and the tile kernel's.
  size_t workspace_bytes() const override {
    const int num_threads = spec_.backend->num_threads;
    const size_t rows = sizeof(float) * static_cast<size_t>(num_threads) * kTaskRows * s_.K;
    if (!amx_) return rows;
    return std::max(rows, cpu::amx_weight_only_workspace_bytes(s_.K, s_.num_groups, s_.max_rows, num_threads));
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &y = out[0];
    const int64_t T = x.rows(), K = x.cols(), N = y.cols();
    RTLLM_CHECK(y.rows() == T, "weight_only_linear: output has ", y.rows(), " rows, x has ", T);
    // [num_col_blocks, num_k_steps, 32, 32]: codes placed as AMX tiles (cpu/amx_weight_only.h)
    const bool as_tiles = w.ndim == 4 && w.shape[0] == cpu::amx_num_col_blocks(N) &&
                          w.shape[1] == cpu::amx_num_k_steps(K) && w.shape[2] == cpu::kAmxStepK &&
                          w.shape[3] == cpu::kAmxBlockCols;
    RTLLM_CHECK(K == s_.K && N == s_.N && (as_tiles || (w.ndim == 2 && w.shape[0] == N && w.shape[1] == K)),
                "weight_only_linear: weight [", w.shape[0], ", ", w.shape[1], "] does not match x with ", K,
                " columns and ", N, " outputs");
    RTLLM_CHECK(T <= s_.max_rows, "weight_only_linear: x has ", T, " rows, more than the ", s_.max_rows,
                " planned at load");
    const float* bias = s_.has_bias ? in[s_.bias_input].f32() : nullptr;
    for (size_t i = 2; i < (s_.has_offset ? 4u : 3u); ++i)
      RTLLM_CHECK((in[i].ndim == 3) == as_tiles, "weight_only_linear: the codes and the ",
                  i == 2 ? "scale" : "offset", " are placed in different layouts (", w.ndim, "-d and ", in[i].ndim,
                  "-d)");
    if (as_tiles)
      return cpu::amx_weight_only_linear(*ctx.pool, x.f32(), static_cast<const uint8_t*>(w.data), s_.int4,
                                         in[2].f32(), s_.has_offset ? in[3].f32() : nullptr, bias, y.f32(), T, K, N,
                                         s_.group_size, ctx.workspace);
    Problem p{x.f32(), in[2].f32(), s_.has_offset ? in[3].f32() : nullptr, bias, y.f32(), K, N, s_.group_size,
              s_.num_groups};
    const uint8_t* codes = static_cast<const uint8_t*>(w.data);
    const int64_t row_bytes = s_.int4 ? K / 2 : K;
    workspace_ = static_cast<float*>(ctx.workspace);
    const int64_t num_token_tasks = (T + kTaskTokens - 1) / kTaskTokens;
    // One token: no decoded rows to keep, so larger tasks (longer runs of contiguous bytes to stream), of
    // up to kDecodeTaskRows rows and as many per thread (576 rows on 2 threads: 6 tasks of 96, not 5 of
    // 128 of which one thread would run 3).
    int64_t task_rows = kTaskRows;
    if (T == 1) {
      const int64_t threads = std::max(1, ctx.pool->num_threads());
      const int64_t tasks = threads * ((N + threads * kDecodeTaskRows - 1) / (threads * kDecodeTaskRows));
      const int64_t cols = s_.has_offset ? kDecodeTileCols<true> : kDecodeTileCols<false>;
      task_rows = ((N + tasks - 1) / tasks + cols - 1) / cols * cols;
    }
    const int64_t num_row_tasks = (N + task_rows - 1) / task_rows;
    ctx.pool->parallel_for(num_token_tasks * num_row_tasks, [&](int64_t task, int thread) {
      const int64_t t0 = (task / num_row_tasks) * kTaskTokens, t1 = std::min(T, t0 + kTaskTokens);
      const int64_t n0 = (task % num_row_tasks) * task_rows, n1 = std::min(N, n0 + task_rows);
      if (s_.int4) return run_task(p, CodeRows<true>{codes + n0 * row_bytes, row_bytes, n1 - n0}, t0, t1, n0, n1, thread);
      run_task(p, CodeRows<false>{codes + n0 * row_bytes, row_bytes, n1 - n0}, t0, t1, n0, n1, thread);
    }, std::min(T, kTaskTokens) * task_rows * K);
  }

 private:
  // One token: dequantize in registers as the codes stream in. More: dequantize the task's rows once into
  // the thread's workspace and run every token of the block on them.
  template <bool kInt4>
  void run_task(const Problem& p, const CodeRows<kInt4>& w, int64_t t0, int64_t t1, int64_t n0, int64_t n1,
                int thread) const {
    if (t1 - t0 == 1) {  // decode, or the last token of a prefill of 64 m + 1
      if (p.group_size % kChunk != 0) return tiles(p, w, t0, t1, n0, n1);
      if (p.offset) return decode_rows<kInt4, true>(p, w, t0, n0, n1);
      return decode_rows<kInt4, false>(p, w, t0, n0, n1);
    }
    float* rows = workspace_ + thread * kTaskRows * p.K;
    for (int64_t n = 0; n < n1 - n0; ++n) dequantize_row(p, w, n0, n, rows + n * p.K);
    tiles(p, DequantizedRows{rows, p.K}, t0, t1, n0, n1);
  }

  template <bool kInt4, bool kOffset>
  static void decode_rows(const Problem& p, const CodeRows<kInt4>& w, int64_t t, int64_t n0, int64_t n1) {
    constexpr int kCols = kDecodeTileCols<kOffset>;
    int64_t n = n0;
    for (; n + kCols <= n1; n += kCols) decode_tile<kCols, kInt4, kOffset>(p, w, t, n, n - n0);
    for (; n < n1; ++n) decode_tile<1, kInt4, kOffset>(p, w, t, n, n - n0);
  }

  const WeightOnlyShape s_;
  const bool amx_;              // AMX usable at load for this shape: codes, scale and offset placed as AMX layouts
  float* workspace_ = nullptr;  // this step's (run() sets it)
};

}  // namespace

void register_cpu_weight_only_linear_ops() {
  register_op("weight_only_linear", DeviceKind::kCpu, make_op<WeightOnlyLinear>);
}

}  // namespace rtllm
