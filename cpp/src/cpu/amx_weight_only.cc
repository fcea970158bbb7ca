// weight_only_linear on AMX-BF16 tiles: y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]) with
// W[n, k] = q[n, k] · scale[n, g] (+ offset[n, g]), g = k / G, q int8 or int4 codes (layouts:
// amx_weight_only.h).
//
// Numerics. The codes are small integers, exact in bf16, so the B tiles hold the codes themselves and the
// scales apply per group, outside the tiles:
//  - x is split into two bf16 parts as for the 16-bit linear (amx_linear.cc): hi = bf16(x),
//    lo = bf16(x - hi), |x - hi - lo| <= 2^-16 |x| (subnormal x counts as zero, infinities keep lo = 0).
//  - Per row t, column n and group g: C_g = the tiles' float32 sum over the group's k steps, in order, of
//    hi·q then lo·q (each product exact; the tiles' own order inside a step is theirs, amx_linear.cc).
//  - acc = 0; for each group in order: acc = fma(C_g, scale[n, g], acc), then with offsets
//    acc = fma(xsum[t, g], offset[n, g], acc), xsum[t, g] the float32 sum of the group's x[t, k]
//    (16 lanes over k in order, then _mm512_reduce_add_ps).
//  - y[t, n] = acc (+ bias[n]).
// So the error against exact arithmetic is 2^-16 Σ |x q s| from the split, plus float32 roundings of
// the sums (tests/python/test_weight_only.py has the bound).
//
// Batch invariance: as in amx_linear.cc, every row is its own chain of tile products over the same k steps
// and the same per-group steps after them whatever the number of rows, their chunk, tile or thread; C going
// to memory and back is exact. Decode (one row) runs this kernel too.
//
// Work: x is split once per chunk of up to kChunkRows rows (and summed per group, with offsets); a task is
// one block of 32 columns over every row of the chunk, two row tiles at a time (tiles as in amx_tiles.h).
// With several pairs of row tiles the block's codes become bf16 B tiles kChunkSteps steps at a time, for
// every pair; one pair (decode) converts each step one step ahead of its products as the codes stream in.
#include "cpu/amx_weight_only.h"

#include <algorithm>
#include <cstring>

#include "cpu/amx_tiles.h"
#include "rtllm/common.h"
#include "thread_pool.h"

namespace rtllm::cpu {

namespace {

constexpr int64_t kStepCodes = kAmxStepK * kAmxBlockCols;  // codes of a block per k step
constexpr int64_t kTileCodes = kStepCodes / 2;              // one B tile: 16 k pairs x 16 columns x 2
constexpr int64_t kChunkRows = 256;                         // rows of x split per chunk (as amx_linear.cc)
// K steps of a block converted at a time for every pair of row tiles: 64 KiB of bf16, in L2.
constexpr int64_t kChunkSteps = 32;
constexpr int64_t kPrefetchSteps = 8;  // steps ahead that decode fetches the codes

int64_t step_bytes(bool int4) { return int4 ? kStepCodes / 2 : kStepCodes; }
size_t round64(size_t n) { return (n + 63) / 64 * 64; }

// Per thread: ThreadBuffers (below), 64-byte multiples.
constexpr size_t kBlockValues = kChunkRows * kAmxBlockCols;  // floats of a block's rows of a chunk
size_t thread_bytes() {
  return sizeof(uint16_t) * kChunkSteps * kStepCodes + 2 * sizeof(float) * kBlockValues +
         sizeof(float) * kAmxPairRows * kAmxBlockCols + 64;
}
size_t group_sums_bytes(int64_t rows, int64_t num_groups) {
  return round64(sizeof(float) * static_cast<size_t>(rows * num_groups));
}

#if RTLLM_CPU_AMX

// bf16 bits of the int4 code whose nibble (two's complement) is the word's index mod 16: 0..7, then -8..-1,
// twice: vpermw reads 5 bits of each index, so the bit above a nibble needs no mask.
alignas(64) constexpr uint16_t kInt4Bf16[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040,
    0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0,
    0xC080, 0xC040, 0xC000, 0xBF80};

// One k step of placed codes -> its two bf16 B tiles (kStepCodes values in the same order), exact.
inline void convert_step(const uint8_t* q, bool int4, uint16_t* b) {
  if (!int4) {
    for (int64_t r = 0; r < kStepCodes; r += 32) {  // one B tile row
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
      _mm512_storeu_si512(b + r, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    return;
  }
  const __m512i table = _mm512_load_si512(kInt4Bf16);
  for (int64_t r = 0; r < kStepCodes; r += 128) {  // four B tile rows: 64 bytes, 16-bit word e holding code e
    const __m512i v = _mm512_loadu_si512(q + r / 2);  // of the four rows in its nibbles 0..3
    _mm512_storeu_si512(b + r, _mm512_permutexvar_epi16(v, table));
    _mm512_storeu_si512(b + r + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table));
    _mm512_storeu_si512(b + r + 64, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table));
    _mm512_storeu_si512(b + r + 96, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table));
  }
}

inline void prefetch_step(const uint8_t* q, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(q + i), _MM_HINT_T1);
}

// Row x[0:K] -> out[g] = the float32 sum of x over group g (16 lanes in k order, then the lanes' sum).
void group_sums(const float* x, int64_t K, int64_t G, float* out) {
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + G; k += 16) {
      acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(first_lanes(k0 + G - k), x + k));
    }
    out[g] = _mm512_reduce_add_ps(acc);
  }
}

struct Problem {
  const uint16_t *xhi, *xlo;  // [rows, Kp] split rows of this chunk
  const float* xsum;          // [rows, num_groups], with offsets
  const uint8_t* codes;       // placed
  bool int4;
  const float *scale, *offset, *bias;  // placed [num_col_blocks, num_groups, 32]; bias [N] or null
  float* y;                            // this chunk's rows [rows, N]
  int64_t rows, Kp, N, num_groups, num_steps, group_steps;
};

// One thread's buffers: B tiles of a chunk of steps (or decode's two-step ring), the block's accumulators
// and C carried between chunks of K for every row of the chunk, one pair's C of a finished group, and
// the key of its tile configuration.
struct ThreadBuffers {
  uint16_t* b;    // [kChunkSteps][kStepCodes]
  float* acc;     // [kChunkRows][32]
  float* carry;   // [kChunkRows][32]
  float* cg;      // [kAmxPairRows][32]
  int* configured;
};

// acc rows [0, rows) (32 floats apart) = fma(C_g, scale, first ? 0 : acc), then with offsets
// fma(xsum[r], offset, ·); C_g in cg, xsum[r] at xsum + r * xsum_stride.
void apply_group(const float* cg, const float* s, const float* o, const float* xsum, int64_t xsum_stride, bool first,
                 float* acc, int64_t rows) {
  const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
  const __m512 o0 = o ? _mm512_loadu_ps(o) : _mm512_setzero_ps(), o1 = o ? _mm512_loadu_ps(o + 16) : o0;
  for (int64_t r = 0; r < rows; ++r) {
    float* a = acc + r * kAmxBlockCols;
    __m512 a0 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(a);
    __m512 a1 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(a + 16);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(cg + r * kAmxBlockCols), s0, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(cg + r * kAmxBlockCols + 16), s1, a1);
    if (o) {
      const __m512 xs = _mm512_set1_ps(xsum[r * xsum_stride]);
      a0 = _mm512_fmadd_ps(xs, o0, a0);
      a1 = _mm512_fmadd_ps(xs, o1, a1);
    }
    _mm512_storeu_ps(a, a0);
    _mm512_storeu_ps(a + 16, a1);
  }
}

// Steps [k0, k0 + ns) of block b for the pair of row tiles at r0 (m rows). B steps come from bsteps (the
// chunk, step k0 first) or, with stream (the codes of step k0), are converted here one step ahead into
// the two-step ring buf.b. A group that ends inside the range goes to the accumulators; one that goes on
// past it leaves its C in buf.carry for the next range.
template <bool kTwo>
void pair_steps(const Problem& p, int64_t r0, int64_t m, const uint16_t* bsteps, const uint8_t* stream, int64_t k0,
                int64_t ns, const float* scale, const float* offset, const ThreadBuffers& buf) {
  const int64_t ldx = p.Kp * static_cast<int64_t>(sizeof(uint16_t)), sb = step_bytes(p.int4);
  const char* row_hi = reinterpret_cast<const char*>(p.xhi + r0 * p.Kp);
  const char* row_lo = reinterpret_cast<const char*>(p.xlo + r0 * p.Kp);
  float* acc = buf.acc + r0 * kAmxBlockCols;
  float* carry = buf.carry + r0 * kAmxBlockCols;
  const int64_t end_all = k0 + ns;
  if (stream) {
    for (int64_t s = 1; s < std::min(kPrefetchSteps, ns); ++s) prefetch_step(stream + s * sb, sb);
    convert_step(stream, p.int4, buf.b + (k0 % 2) * kStepCodes);
  }
  for (int64_t s = k0; s < end_all;) {
    const int64_t g = s / p.group_steps, group_end = std::min((g + 1) * p.group_steps, p.num_steps);
    const int64_t end = std::min(group_end, end_all);
    tile_memory_fence();  // the split rows, the converted steps and carry are written
    if (s == g * p.group_steps) zero_c<kTwo>();
    else load_c<kTwo>(carry, kAmxBlockCols);
    for (; s < end; ++s) {
      const uint16_t* b = bsteps + (s - k0) * kStepCodes;
      if (stream) {
        if (s + kPrefetchSteps < end_all) prefetch_step(stream + (s + kPrefetchSteps - k0) * sb, sb);
        if (s + 1 < end_all) {
          convert_step(stream + (s + 1 - k0) * sb, p.int4, buf.b + ((s + 1) % 2) * kStepCodes);
          tile_memory_fence();
        }
        b = buf.b + (s % 2) * kStepCodes;
      }
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + kTileCodes, 64);
      const int64_t a = s * kAmxStepK * static_cast<int64_t>(sizeof(uint16_t));  // byte offset in a row
      add_products<kTwo>(row_hi + a, ldx);
      add_products<kTwo>(row_lo + a, ldx);
    }
    const bool done = end == group_end;
    store_c<kTwo>(done ? buf.cg : carry, kAmxBlockCols);
    tile_memory_fence();  // before anything reads them
    if (done)
      apply_group(buf.cg, scale + g * kAmxBlockCols, offset ? offset + g * kAmxBlockCols : nullptr,
                  p.xsum ? p.xsum + r0 * p.num_groups + g : nullptr, p.num_groups, g == 0, acc, m);
  }
}

// Every row of the chunk for block b, then its columns of y (+ bias).
void block_rows(const Problem& p, int64_t b, const ThreadBuffers& buf) {
  const int64_t sb = step_bytes(p.int4);
  const uint8_t* codes = p.codes + b * p.num_steps * sb;
  const float* scale = p.scale + b * p.num_groups * kAmxBlockCols;
  const float* offset = p.offset ? p.offset + b * p.num_groups * kAmxBlockCols : nullptr;
  const int64_t num_pairs = (p.rows + kAmxPairRows - 1) / kAmxPairRows;
  const bool jit = num_pairs == 1;
  // A chunk holds whole groups where they fit, so that their C never leaves the tiles.
  const int64_t chunk_steps = jit ? p.num_steps
                              : p.group_steps <= kChunkSteps ? kChunkSteps / p.group_steps * p.group_steps
                                                             : kChunkSteps;
  for (int64_t k0 = 0; k0 < p.num_steps; k0 += chunk_steps) {
    const int64_t ns = std::min(chunk_steps, p.num_steps - k0);
    if (!jit)
      for (int64_t s = 0; s < ns; ++s) convert_step(codes + (k0 + s) * sb, p.int4, buf.b + s * kStepCodes);
    for (int64_t pair = 0; pair < num_pairs; ++pair) {
      const int64_t r0 = pair * kAmxPairRows;
      const int m0 = static_cast<int>(std::min(kAmxTileRows, p.rows - r0));
      const int m1 = static_cast<int>(std::clamp<int64_t>(p.rows - r0 - kAmxTileRows, 0, kAmxTileRows));
      configure_pair(m0, m1, buf.configured);
      const uint8_t* stream = jit ? codes + k0 * sb : nullptr;
      if (m1) pair_steps<true>(p, r0, m0 + m1, buf.b, stream, k0, ns, scale, offset, buf);
      else pair_steps<false>(p, r0, m0, buf.b, stream, k0, ns, scale, offset, buf);
    }
  }
  const int64_t n0 = b * kAmxBlockCols, num_cols = std::min(kAmxBlockCols, p.N - n0);
  const __mmask16 m0 = first_lanes(num_cols), m1 = first_lanes(num_cols - 16);
  const __m512 b0 = p.bias ? _mm512_maskz_loadu_ps(m0, p.bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = p.bias ? _mm512_maskz_loadu_ps(m1, p.bias + n0 + 16) : _mm512_setzero_ps();
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* a = buf.acc + r * kAmxBlockCols;
    float* y = p.y + r * p.N + n0;
    __m512 v0 = _mm512_loadu_ps(a), v1 = _mm512_loadu_ps(a + 16);
    if (p.bias) {
      v0 = _mm512_add_ps(v0, b0);
      v1 = _mm512_add_ps(v1, b1);
    }
    _mm512_mask_storeu_ps(y, m0, v0);
    _mm512_mask_storeu_ps(y + 16, m1, v1);
  }
}

#endif  // RTLLM_CPU_AMX

}  // namespace

bool amx_weight_only_usable(int64_t K, int64_t group_size) {
  // As for F16 weights, only when asked for: decode converts every code to bf16 at every call (SmolLM2,
  // 2 threads: Q8_0 9.0 -> 12.4 ms/token, Q4_1 7.0 -> 9.0, for a 2x faster prefill; docs/quantization.md).
  return amx_linear_enabled(/*opt_in=*/true) && group_size > 0 && (group_size % kAmxStepK == 0 || group_size == K);
}

void pack_amx_codes(const uint8_t* codes, bool int4, int64_t N, int64_t K, uint8_t* tiles) {
  const int64_t num_steps = amx_num_k_steps(K), row_bytes = int4 ? K / 2 : K, sb = step_bytes(int4);
  const auto code = [&](int64_t n, int64_t k) -> int {
    if (n >= N || k >= K) return 0;
    if (!int4) return static_cast<int8_t>(codes[n * row_bytes + k]);
    return (codes[n * row_bytes + k / 2] >> ((k % 2) * 4)) & 0xF;  // the nibble as stored
  };
  std::memset(tiles, 0, static_cast<size_t>(amx_num_col_blocks(N) * num_steps * sb));
  for (int64_t b = 0; b < amx_num_col_blocks(N); ++b) {
    for (int64_t s = 0; s < num_steps; ++s) {
      uint8_t* step = tiles + (b * num_steps + s) * sb;
      for (int64_t h = 0; h < 2; ++h) {
        for (int64_t i = 0; i < kAmxTileRows; ++i) {
          const int64_t row = h * kAmxTileRows + i;  // of the step's 32 rows of 32 codes
          for (int64_t e = 0; e < 32; ++e) {          // e = 2 j + p
            const int v = code(b * kAmxBlockCols + h * kAmxTileRows + e / 2, s * kAmxStepK + 2 * i + e % 2);
            if (!int4) {
              step[row * 32 + e] = static_cast<uint8_t>(v);
            } else {  // rows in fours: the 16-bit word e of a four holds code e of row 4 f + j in nibble j
              const int64_t j = row % 4;
              step[(row / 4) * 64 + 2 * e + j / 2] |= static_cast<uint8_t>(v << (4 * (j % 2)));
            }
          }
        }
      }
    }
  }
}

void pack_amx_group_cols(const float* v, int64_t N, int64_t num_groups, float* out) {
  for (int64_t b = 0; b < amx_num_col_blocks(N); ++b)
    for (int64_t g = 0; g < num_groups; ++g)
      for (int64_t c = 0; c < kAmxBlockCols; ++c) {
        const int64_t n = b * kAmxBlockCols + c;
        out[(b * num_groups + g) * kAmxBlockCols + c] = n < N ? v[n * num_groups + g] : 0.0f;
      }
}

size_t amx_weight_only_workspace_bytes(int64_t K, int64_t num_groups, int64_t max_rows, int num_threads) {
  const int64_t rows = std::clamp<int64_t>(max_rows, 1, kChunkRows);
  return round64(2 * sizeof(uint16_t) * static_cast<size_t>(rows * amx_padded_k(K))) +
         group_sums_bytes(rows, num_groups) + static_cast<size_t>(num_threads) * thread_bytes();
}

void amx_weight_only_linear(ThreadPool& pool, const float* x, const uint8_t* codes, bool int4, const float* scale,
                            const float* offset, const float* bias, float* y, int64_t T, int64_t K, int64_t N,
                            int64_t group_size, void* workspace) {
#if RTLLM_CPU_AMX
  RTLLM_CHECK(amx_supported(), "weight_only_linear: the codes are laid out for AMX tiles, which this CPU or OS "
              "does not offer");
  RTLLM_CHECK(group_size % kAmxStepK == 0 || group_size == K, "weight_only_linear: AMX tiles need a group size "
              "that is a multiple of ", kAmxStepK, " or K = ", K, ", not ", group_size);
  if (T == 0) return;
  const int64_t Kp = amx_padded_k(K), chunk = std::min(T, kChunkRows), num_groups = K / group_size;
  char* area = static_cast<char*>(workspace);
  auto* xhi = reinterpret_cast<uint16_t*>(area);
  uint16_t* xlo = xhi + chunk * Kp;
  area += round64(2 * sizeof(uint16_t) * static_cast<size_t>(chunk * Kp));
  auto* xsum = reinterpret_cast<float*>(area);
  char* per_thread = area + group_sums_bytes(chunk, num_groups);
  auto buffers = [&](int thread) {
    char* mine = per_thread + static_cast<size_t>(thread) * thread_bytes();
    ThreadBuffers b;
    b.b = reinterpret_cast<uint16_t*>(mine);
    b.acc = reinterpret_cast<float*>(b.b + kChunkSteps * kStepCodes);
    b.carry = b.acc + kBlockValues;
    b.cg = b.carry + kBlockValues;
    b.configured = reinterpret_cast<int*>(b.cg + kAmxPairRows * kAmxBlockCols);
    return b;
  };
  const int64_t num_steps = amx_num_k_steps(K), num_blocks = amx_num_col_blocks(N);
  Problem p{xhi, xlo, offset ? xsum : nullptr, codes, int4, scale, offset, bias, nullptr, 0, Kp, N, num_groups,
            num_steps, group_size == K ? num_steps : group_size / kAmxStepK};
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    p.rows = std::min(chunk, T - t0);
    p.y = y + t0 * N;
    split_rows(pool, x + t0 * K, p.rows, K, xhi, xlo);
    if (offset)
      pool.parallel_for(p.rows, [&](int64_t r, int) {
        group_sums(x + (t0 + r) * K, K, group_size, xsum + r * num_groups);
      }, K);
    for (int i = 0; i < pool.num_threads(); ++i) *buffers(i).configured = -1;
    // The tile configuration stays loaded after a task (see amx_linear.cc).
    pool.parallel_for(num_blocks, [&](int64_t b, int thread) { block_rows(p, b, buffers(thread)); },
                      2 * p.rows * Kp * kAmxBlockCols);
  }
#else
  (void)pool, (void)x, (void)codes, (void)int4, (void)scale, (void)offset, (void)bias, (void)y, (void)T, (void)K,
      (void)N, (void)group_size, (void)workspace;
  RTLLM_CHECK(false, "weight_only_linear: the codes are laid out for AMX tiles, and rtllm was built without AMX-BF16");
#endif
}

}  // namespace rtllm::cpu
