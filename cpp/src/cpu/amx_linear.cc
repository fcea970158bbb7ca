// linear on AMX-BF16 tiles: y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]) for BF16 and F16 weights.
//
// Numerics. TDPBF16PS multiplies bf16 pairs (exact in float32) and accumulates in float32, so:
//  - x (float32) is split into hi = bf16(x) and lo = bf16(x - hi), both rounded to nearest even:
//    |x - hi - lo| <= 2^-8 |x - hi| <= 2^-16 |x|, x to about 16 significant bits.
//  - BF16 W is exact in bf16. F16 W (11 significant bits) splits exactly into whi = w truncated to bf16
//    and wlo = w - whi: a multiple of w's F16 ulp below one bf16 ulp of w, so 3 bits, |wlo| < 2^-7 |w|;
//    bf16's exponent range (float32's) holds every F16 value and remainder, subnormals included.
//  - Per 32-k step each C tile accumulates, in this order: hi·whi, lo·whi, then for F16 hi·wlo. The
//    lo·wlo term is dropped: |lo·wlo| < 2^-15 (1 + 2^-8) |x w|. So a product carries at most 2^-16 |x w|
//    of error (BF16) or 3.02 * 2^-16 (F16), and the float32 sum of the 2 or 3 passes over K adds at
//    most a float32 chain's rounding over 2K or 3K terms (tests/python/test_cpu_linear_16bit.py has the
//    bound). The tiles' own order and rounding of those sums is not documented (it is none of the
//    obvious sequential or pairwise ones), so no other kernel can reproduce their bits.
//  - AMX treats bf16 subnormals as zero and flushes subnormal results (DAZ/FTZ, whatever MXCSR says),
//    and the bf16 conversions treat float32 subnormal inputs as zero: |x| below 2^-126 counts as 0, and
//    x below about 2^-110 loses its lo part. A BF16 weight below 2^-126 counts as 0 (F16 values are all
//    far above). A hi part that is infinite (x = ±inf, or |x| past bf16's largest finite value) gets a
//    zero lo part, so an infinite x gives infinite products, not inf - inf = NaN; NaN stays NaN. F16
//    weights holding ±inf are not placed as AMX tiles (see split_f16_step).
//
// Batch invariance: AMX computes every row of a tile on its own, so a row's result is the same chain of
// tile products over the same k steps whatever the number of rows of x, the row's tile and position in
// it (tiles are configured with as many rows as remain), the chunk of rows and the thread that ran it;
// C going to memory and back between chunks of K is exact. Decode (one row) runs this same kernel, so a
// token's result does not depend on the batch it is in.
//
// Work: x is split once per chunk of up to kChunkRows rows into bf16 [rows, Kp] hi and lo buffers
// (Kp = K rounded up to 32, zero-padded); a task is one block of 32 columns over all rows of the
// chunk, two row tiles (32 rows) at a time: C tiles 2 x 2 (tmm0..3), A tiles for 2 x 16 rows (tmm4, 5)
// and the block's two B tiles (tmm6, 7). See block_rows for how W reaches the B tiles.
#include "cpu/amx_linear.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/amx_tiles.h"
#include "rtllm/common.h"
#include "rtllm/model_runner.h"
#include "thread_pool.h"

#if RTLLM_CPU_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace rtllm::cpu {

namespace {

constexpr int64_t kStepValues = kAmxStepK * kAmxBlockCols;  // 16-bit values of W per block and k step
constexpr int64_t kTileValues = kStepValues / 2;             // one B tile: 16 k pairs x 16 columns x 2
// Rows of x split per chunk: bounds the workspace (2 x 256 x Kp bf16) while a block's F16 split
// (once per chunk) is shared by 8 pairs of row tiles.
constexpr int64_t kChunkRows = 256;

// K steps of a block whose B tiles are split (F16) or copied (BF16) at a time for all pairs of row tiles
// (128 KiB of F16 hi and lo parts, in L2). Measured (F16, SmolLM2's four linears, 128 rows, 2 threads):
// 8 steps, which fit L1, took 1.78 ms a layer against 1.38 for 32 and 1.44 for 64: the C tiles' round
// trips through memory between chunks cost more than the L2 reads they save.
constexpr int64_t kChunkSteps = 32;

// Per thread: ThreadBuffers (below), 64-byte multiples.
size_t thread_bytes() {
  return 2 * sizeof(uint16_t) * kChunkSteps * kStepValues + sizeof(float) * kChunkRows * kAmxBlockCols + 64;
}

#if RTLLM_CPU_AMX

// v - widen(hi) per lane, but 0 where hi is ±inf (fpclass 0x08 | 0x10), so that an infinite value's
// parts are (inf, 0) rather than (inf, NaN).
inline __m512 remainder(__m512 v, __m512 hi) {
  return _mm512_maskz_sub_ps(static_cast<__mmask16>(~_mm512_fpclass_ps_mask(hi, 0x18)), v, hi);
}

// 32 float32 (a: values 0..15, b: 16..31) -> 32 bf16 hi and lo parts (see the numerics above).
inline void split32(__m512 a, __m512 b, uint16_t* hi, uint16_t* lo) {
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
  const __m512 ha = widen_bf16(_mm512_castsi512_si256(h)), hb = widen_bf16(_mm512_extracti64x4_epi64(h, 1));
  const __m512i l = (__m512i)_mm512_cvtne2ps_pbh(remainder(b, hb), remainder(a, ha));
  _mm512_storeu_si512(hi, h);
  _mm512_storeu_si512(lo, l);
}

// Row x[0:K] -> hi[0:Kp], lo[0:Kp], zero past K (the weight is zero there too: 0 · 0, never 0 · NaN).
void split_row(const float* x, int64_t K, uint16_t* hi, uint16_t* lo) {
  for (int64_t k = 0; k < amx_padded_k(K); k += 32) {
    const int64_t n = std::clamp<int64_t>(K - k, 0, 32);
    const __mmask16 ma = first_lanes(n), mb = first_lanes(n - 16);
    split32(_mm512_maskz_loadu_ps(ma, x + k), _mm512_maskz_loadu_ps(mb, x + k + 16), hi + k, lo + k);
  }
}

// One k step of F16 weights, placed with each pair row planar (16 columns at k = 2i, then the same 16 at
// 2i + 1), -> bf16 hi and lo B tiles in VNNI order. Per value: widened to float32 (exact), hi = the
// float32 truncated to bf16 (its upper half), lo = f - hi (exact: at most 3 significant bits, so also
// an upper half alone). Each 32-bit lane of a VNNI row is (k = 2i, k = 2i + 1) of one column: the even
// value's upper half shifted down, or'd with the odd one's upper half, so no cross-lane packing (the
// port-5 shuffles of a bf16 conversion made the split, not the tiles, the bound of decode). An infinite
// w would give lo = inf - inf = NaN: pack_amx_weight refuses F16 weights holding one (the runner keeps
// those as GEMM panels), which saves this loop, decode's bound, a quarter of its instructions.
void split_f16_step(const uint16_t* w, uint16_t* hi, uint16_t* lo) {
  const __m512i upper = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t r = 0; r < kStepValues; r += 32) {  // one pair row of a B tile: 16 columns x 2 k
    const __m512 fe = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r)));
    const __m512 fo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r + 16)));
    const __m512i be = _mm512_castps_si512(fe), bo = _mm512_castps_si512(fo);
    const __m512 le = _mm512_sub_ps(fe, _mm512_castsi512_ps(_mm512_and_si512(be, upper)));
    const __m512 lo_odd = _mm512_sub_ps(fo, _mm512_castsi512_ps(_mm512_and_si512(bo, upper)));
    // (a >> 16) | (b & upper): ternary logic A | (B & C) = 0xF8
    _mm512_storeu_si512(hi + r, _mm512_ternarylogic_epi32(_mm512_srli_epi32(be, 16), bo, upper, 0xF8));
    _mm512_storeu_si512(lo + r, _mm512_ternarylogic_epi32(_mm512_srli_epi32(_mm512_castps_si512(le), 16),
                                                          _mm512_castps_si512(lo_odd), upper, 0xF8));
  }
}

// Steps ahead that decode fetches W (2 KiB of F16 a step).
constexpr int64_t kPrefetchSteps = 8;

void prefetch_step(const uint16_t* w) {
  for (int64_t i = 0; i < kStepValues; i += 32) _mm_prefetch(reinterpret_cast<const char*>(w + i), _MM_HINT_T1);
}

// The block's two B tiles of one k step (b: kStepValues values) -> tmm6, tmm7.
inline void load_b(const uint16_t* b) {
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b + kTileValues, 64);
}

// c[kAmxPairRows][32] (rows ldc floats apart) = (accumulate ? c : 0) + the products over num_steps k steps,
// for the pair of row tiles whose split rows start at xhi / xlo (ldx bytes apart) and B steps at bhi
// (and F16's lo parts at blo), kStepValues apart. With stream_w, W as placed, read from memory by this
// product first: fetched kPrefetchSteps ahead, and for F16 split here, one step ahead (a tile load right
// after the stores it reads waits for them; one step later they have left the store buffer), into bhi
// and blo as two-step rings (ring: decode, nothing else reads them) or whole (the other pairs of row
// tiles read them next: the split overlaps the first pair's products instead of preceding them).
template <bool kTwo, bool kFp16>
void block_product(const uint16_t* xhi, const uint16_t* xlo, int64_t ldx, uint16_t* bhi, uint16_t* blo,
                   const uint16_t* stream_w, bool ring, int64_t num_steps, float* c, int64_t ldc,
                   bool accumulate) {
  if (stream_w)
    for (int64_t s = 1; s < std::min(kPrefetchSteps, num_steps); ++s) prefetch_step(stream_w + s * kStepValues);
  if (kFp16 && stream_w) split_f16_step(stream_w, bhi, blo);
  tile_memory_fence();  // the split rows of x and of W, and c, are written
  if (accumulate) {
    load_c<kTwo>(c, ldc);
  } else {
    zero_c<kTwo>();
  }
  const char* row_hi = reinterpret_cast<const char*>(xhi);
  const char* row_lo = reinterpret_cast<const char*>(xlo);
  for (int64_t s = 0; s < num_steps; ++s) {
    const int64_t at = (kFp16 && stream_w && ring ? s % 2 : s) * kStepValues;
    // Decode streams W from memory: the split's loads stalled on it (perf: the hottest instruction was
    // the one after the first load of a step; 24 -> 18 ms a token of F16 SmolLM2) until each step
    // fetched the one kPrefetchSteps ahead.
    if (stream_w && s + kPrefetchSteps < num_steps)
      prefetch_step(stream_w + (s + kPrefetchSteps) * kStepValues);
    if (kFp16 && stream_w && s + 1 < num_steps) {
      const int64_t next = (ring ? (s + 1) % 2 : s + 1) * kStepValues;
      split_f16_step(stream_w + (s + 1) * kStepValues, bhi + next, blo + next);
      tile_memory_fence();
    }
    const int64_t a = s * kAmxStepK * static_cast<int64_t>(sizeof(uint16_t));  // byte offset in a row
    load_b(bhi + at);
    add_products<kTwo>(row_hi + a, ldx);
    add_products<kTwo>(row_lo + a, ldx);
    if constexpr (kFp16) {
      load_b(blo + at);
      add_products<kTwo>(row_hi + a, ldx);
    }
  }
  store_c<kTwo>(c, ldc);
  tile_memory_fence();  // before anything reads c
}

// One thread's buffers: a chunk of a block's B steps (bf16, or F16 split into hi and lo), C of a block
// past N's last multiple of 32 for the rows of a chunk of x, and the key of its tile configuration.
struct ThreadBuffers {
  uint16_t* hi;  // [kChunkSteps][kStepValues]
  uint16_t* lo;  // [kChunkSteps][kStepValues]
  float* c;      // [kChunkRows][kAmxBlockCols]
  int* configured;
};

// Rows [0, rows) of y's columns [n0, n0 + num_cols) for one block. The C tiles go straight to y, or for
// a block past N's last multiple of 32 to the thread's c and from there its num_cols columns (reading C
// right after the tile stores stalls: measured 3,600 cycles a pair, more than its products at K = 128,
// so the bias is added in a later pass). With several pairs of row tiles, K goes in chunks of
// kChunkSteps whose B steps are split or copied once for every pair, C going to memory and back
// between chunks (exact: float32 both ways); one pair (decode) reads or splits W as it goes.
void block_rows(const uint16_t* xhi, const uint16_t* xlo, int64_t Kp, const uint16_t* w, bool fp16, float* y,
                int64_t rows, int64_t N, int64_t n0, int64_t num_cols, int64_t num_steps, const ThreadBuffers& buf) {
  const int64_t num_pairs = (rows + kAmxPairRows - 1) / kAmxPairRows;
  const int64_t ldx = Kp * static_cast<int64_t>(sizeof(uint16_t));
  const bool whole = num_cols == kAmxBlockCols;
  const int64_t ldc = whole ? N : kAmxBlockCols;
  float* out = whole ? y + n0 : buf.c;
  const bool jit = num_pairs == 1;
  const int64_t chunk_steps = jit ? num_steps : kChunkSteps;
  for (int64_t k0 = 0; k0 < num_steps; k0 += chunk_steps) {
    const int64_t ns = std::min(chunk_steps, num_steps - k0);
    const uint16_t* wk = w + k0 * kStepValues;
    uint16_t* bhi = buf.hi;
    if (!fp16 && jit) {
      bhi = const_cast<uint16_t*>(wk);  // read only
    } else if (!fp16) {
      std::memcpy(buf.hi, wk, ns * kStepValues * sizeof(uint16_t));  // streamed, then read by every pair
    }
    for (int64_t p = 0; p < num_pairs; ++p) {
      const int64_t r0 = p * kAmxPairRows;
      const int m0 = static_cast<int>(std::min(kAmxTileRows, rows - r0));
      const int m1 = static_cast<int>(std::clamp<int64_t>(rows - r0 - kAmxTileRows, 0, kAmxTileRows));
      configure_pair(m0, m1, buf.configured);
      const uint16_t *h = xhi + r0 * Kp + k0 * kAmxStepK, *l = xlo + r0 * Kp + k0 * kAmxStepK;
      float* c = out + r0 * ldc;
      // The first pair streams W (and splits F16 into the buffers the others read).
      const uint16_t* stream_w = p == 0 && (fp16 || jit) ? wk : nullptr;
      const bool acc = k0 > 0;
      if (m1 && fp16) block_product<true, true>(h, l, ldx, bhi, buf.lo, stream_w, jit, ns, c, ldc, acc);
      else if (m1) block_product<true, false>(h, l, ldx, bhi, buf.lo, stream_w, jit, ns, c, ldc, acc);
      else if (fp16) block_product<false, true>(h, l, ldx, bhi, buf.lo, stream_w, jit, ns, c, ldc, acc);
      else block_product<false, false>(h, l, ldx, bhi, buf.lo, stream_w, jit, ns, c, ldc, acc);
    }
  }
  if (!whole)
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * N + n0, buf.c + r * ldc, num_cols * sizeof(float));
}

#endif  // RTLLM_CPU_AMX

}  // namespace

#if RTLLM_CPU_AMX

// Linux: the tile data state is off until the process asks for it (ARCH_REQ_XCOMP_PERM, once, for all
// its threads); without it the first tile instruction faults.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool amx_supported() {
  static const bool supported = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
    if (!tile || !bf16 || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512-BF16
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return supported;
}

void split_rows(ThreadPool& pool, const float* x, int64_t rows, int64_t K, uint16_t* hi, uint16_t* lo) {
  const int64_t Kp = amx_padded_k(K), num_row_tasks = (rows + kAmxTileRows - 1) / kAmxTileRows;
  pool.parallel_for(num_row_tasks, [&](int64_t task, int) {
    for (int64_t r = task * kAmxTileRows; r < std::min(rows, (task + 1) * kAmxTileRows); ++r)
      split_row(x + r * K, K, hi + r * Kp, lo + r * Kp);
  }, kAmxTileRows * Kp);
}

#endif  // RTLLM_CPU_AMX

bool amx_linear_enabled(bool opt_in) {
  const char* env = std::getenv("RTLLM_CPU_AMX");
  const auto env_is = [env](const char* value) { return env && std::strcmp(env, value) == 0; };
  // F16 weights only when asked for: their split into two bf16 parts runs again at every call, which one
  // token cannot share across rows, so decode would slow (SmolLM2, 2 threads: 12 -> 16.7 ms/token, with a
  // 1.7x faster prefill; docs/quantization.md).
  if (env_is("0") || (opt_in && !env_is("1"))) return false;
#if RTLLM_CPU_AMX
  return amx_supported();
#else
  return false;
#endif
}

bool pack_amx_weight(const uint16_t* w, int64_t N, int64_t K, bool fp16, uint16_t* tiles) {
  if (fp16)
    for (int64_t i = 0; i < N * K; ++i)
      if ((w[i] & 0x7FFF) == 0x7C00) return false;  // ±inf: see split_f16_step
  const int64_t num_steps = amx_num_k_steps(K);
  for (int64_t b = 0; b < amx_num_col_blocks(N); ++b) {
    for (int64_t s = 0; s < num_steps; ++s) {
      uint16_t* step = tiles + (b * num_steps + s) * kStepValues;
      for (int64_t h = 0; h < 2; ++h) {
        for (int64_t j = 0; j < kAmxTileRows; ++j) {
          const int64_t n = b * kAmxBlockCols + h * kAmxTileRows + j;
          for (int64_t kk = 0; kk < kAmxStepK; ++kk) {  // k = 32 s + 2 i + p
            const int64_t k = s * kAmxStepK + kk;
            const int64_t at = fp16 ? kAmxTileRows * (kk % 2) + j : 2 * j + kk % 2;  // planar or VNNI pairs
            step[(h * kAmxTileRows + kk / 2) * kAmxBlockCols + at] = n < N && k < K ? w[n * K + k] : 0;
          }
        }
      }
    }
  }
  return true;
}

size_t amx_linear_workspace_bytes(int64_t K, int64_t max_rows, int num_threads) {
  const size_t rows = static_cast<size_t>(std::clamp<int64_t>(max_rows, 1, kChunkRows));
  return 2 * sizeof(uint16_t) * rows * static_cast<size_t>(amx_padded_k(K)) +
         static_cast<size_t>(num_threads) * thread_bytes();
}

void amx_linear(ThreadPool& pool, const float* x, const uint16_t* tiles, bool fp16, const float* bias, float* y,
                int64_t T, int64_t K, int64_t N, void* workspace) {
#if RTLLM_CPU_AMX
  RTLLM_CHECK(amx_supported(), "linear: the weight is laid out for AMX tiles, which this CPU or OS does not offer");
  if (T == 0) return;
  const int64_t Kp = amx_padded_k(K), num_steps = amx_num_k_steps(K), num_blocks = amx_num_col_blocks(N);
  const int64_t chunk = std::min(T, kChunkRows);
  auto* xhi = static_cast<uint16_t*>(workspace);
  uint16_t* xlo = xhi + chunk * Kp;
  char* per_thread = reinterpret_cast<char*>(xlo + chunk * Kp);  // 64-byte multiples from a 64-byte base
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t rows = std::min(chunk, T - t0);
    split_rows(pool, x + t0 * K, rows, K, xhi, xlo);
    const int64_t passes = fp16 ? 3 : 2;
    // A thread loads its tile configuration at its first task of the pass (LDTILECFG measured about 500
    // cycles: once per task cost a fifth of BF16 decode), not across passes: another library may use
    // AMX on the calling thread between two calls.
    auto buffers = [&](int thread) {
      char* area = per_thread + static_cast<size_t>(thread) * thread_bytes();
      ThreadBuffers b;
      b.hi = reinterpret_cast<uint16_t*>(area);
      b.lo = b.hi + kChunkSteps * kStepValues;
      b.c = reinterpret_cast<float*>(b.lo + kChunkSteps * kStepValues);
      b.configured = reinterpret_cast<int*>(b.c + kChunkRows * kAmxBlockCols);
      return b;
    };
    for (int i = 0; i < pool.num_threads(); ++i) *buffers(i).configured = -1;
    pool.parallel_for(num_blocks, [&](int64_t b, int thread) {
      const int64_t n0 = b * kAmxBlockCols;
      block_rows(xhi, xlo, Kp, tiles + b * num_steps * kStepValues, fp16, y + t0 * N, rows, N, n0,
                 std::min(kAmxBlockCols, N - n0), num_steps, buffers(thread));
      // The tile state stays loaded after the task: TILERELEASE per task made 2-thread decode 3x slower.
    }, passes * rows * Kp * kAmxBlockCols);
  }
  if (!bias) return;
  pool.parallel_for(T, [&](int64_t t, int) {
    float* row = y + t * N;
    for (int64_t n = 0; n < N; ++n) row[n] += bias[n];
  }, N);
#else
  (void)pool, (void)x, (void)tiles, (void)fp16, (void)bias, (void)y, (void)T, (void)K, (void)N, (void)workspace;
  RTLLM_CHECK(false, "linear: the weight is laid out for AMX tiles, and rtllm was built without AMX-BF16");
#endif
}

}  // namespace rtllm::cpu

namespace rtllm {

bool cpu_amx_available() { return cpu::amx_linear_enabled(/*fp16=*/false); }

}  // namespace rtllm
