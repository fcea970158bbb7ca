// linear: y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]).
//
// Packed weights (cpu/gemm_pack.h, [N / NR][K][NR], what the CPU runner places for weights that only
// linear reads): an outer-product micro-kernel keeps an MR x NR tile of y in registers and, per k,
// broadcasts MR values of x against one NR-wide row of the panel. Every output element is ONE
// sequential FMA chain over k = 0..K-1 from 0, then + bias, whatever the tile, the row's position in
// it, the number of rows or threads: a token's result does not depend on the batch it is in.
//
// Unpacked weights [N, K] (e.g. an embedding table tied to the LM head): an inner-product register
// tile with one kGemmLanes-wide accumulator per output element, summed in one fixed order by every
// tile shape (kGemmLanes-wide FMA chunks over k, a fixed horizontal sum, then the k tail).
//
// BF16 and F16 weights stay 16-bit in memory, in either layout, and are widened to float32 (exactly:
// bf16 by a 16-bit shift, fp16 by F16C's vcvtph2ps) on the way to the FMAs: with few rows of x (decode,
// up to kGemvMaxRows) the kernels load 16-bit values and widen them in registers, so a step streams
// half the bytes of float32 weights; with more rows the FMAs dominate, and a task first widens its
// panel (or its rows of W) into its thread's workspace, then runs the float32 kernel on it. Both run the same kernel code on the same float32
// values in the same order, so the result is that of float32 weights holding the widened values,
// bit for bit, and still independent of the batch.
//
// Where the CPU has AMX-BF16 (cpu/amx_linear.h), packed BF16 weights (and F16 ones with RTLLM_CPU_AMX=1)
// are placed as AMX tiles instead and every row count runs the tile kernel (decode too, so the batch
// invariance holds): x split into two bf16 parts, about 16 significant bits of it instead of float32's 24
// (bounds in amx_linear.cc). RTLLM_CPU_AMX=0 at engine load keeps the kernels above.
#include <algorithm>
#include <type_traits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/amx_linear.h"
#include "cpu/gemm_pack.h"
#include "cpu/simd.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

using cpu::bf16_t;
using cpu::fp16_t;
using cpu::v8;

// Up to this many rows of x, 16-bit weights are widened in registers; past it, per task into the
// workspace. Measured (benchmarks/bench_cpu_gemm.py --dtype bfloat16, AVX-512, 2 threads): widening
// in registers is ahead up to 16 rows (0.16 vs 0.23 ms at 8 rows of a [3072, 576] W), even at 32, and
// behind at prefill sizes, most on row-major W (4.5 vs 6.6 ms at 128 rows).
constexpr int64_t kGemvMaxRows = 16;

using cpu::kGemmLanes;
using cpu::kPanelCols;
typedef float vec __attribute__((vector_size(kGemmLanes * sizeof(float))));

inline vec vload(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// kGemmLanes consecutive 16-bit values widened in registers (cpu::widen, lane by lane).
inline vec vload(const bf16_t* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vec)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  return cpu::load8(p);  // kGemmLanes == cpu::kLanes
#endif
}
inline vec vload(const fp16_t* p) {
#if defined(__AVX512F__)
  return (vec)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return cpu::load8(p);
#endif
}
inline void vstore(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }

// dst[0:n] = src[0:n] widened to float32; n a multiple of kGemmLanes (a whole panel), or any n.
template <typename W>
void widen_into(const W* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kGemmLanes <= n; i += kGemmLanes) vstore(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = cpu::widen(src[i]);
}
// *p in every lane, read by the broadcast itself: `vec{} + x` would add +0 to x first, one more
// instruction per broadcast in the micro-kernel's inner loop (only a zero's sign differs, and the
// accumulators, which start at +0, cannot pass a -0 to y).
inline vec vbroadcast(const float* p) {
#if defined(__AVX512F__)
  return (vec)_mm512_set1_ps(*p);
#elif defined(__AVX__)
  return (vec)_mm256_broadcast_ss(p);
#else
  return vec{} + *p;
#endif
}
inline vec vfmadd(vec a, vec b, vec c) {  // a * b + c, one rounding
#if defined(__AVX512F__)
  return (vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  vec r;
  for (int i = 0; i < kGemmLanes; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

// Sum of the lanes in one fixed order: the upper half folded onto the lower one down to 8 lanes, then
// cpu::hsum8's pairwise order.
inline float vhsum(vec v) {
  v8 h;
  std::memcpy(&h, &v, sizeof(h));  // lanes 0..7
  for (int i = 8; i < kGemmLanes; ++i) h[i - 8] += v[i];
  return cpu::hsum8(h);
}

// ---------------------------------------------------------------- row-major weights

template <typename W, int MR, int NR>
void linear_tile(const float* x, const W* w, const float* bias, float* y, int64_t K, int64_t N) {
  vec acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vec{};
  int64_t k = 0;
  for (; k + kGemmLanes <= K; k += kGemmLanes) {
    vec xv[MR], wv[NR];
    for (int i = 0; i < MR; ++i) xv[i] = vload(x + i * K + k);
    for (int j = 0; j < NR; ++j) wv[j] = vload(w + j * K + k);
    // Few rows of x (decode) stream W from memory: fetch the next tile's rows of W while this one runs.
    if constexpr (MR == 1)
      for (int j = 0; j < NR; ++j) __builtin_prefetch(w + (NR + j) * K + k);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = vfmadd(xv[i], wv[j], acc[i][j]);
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = vhsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s = std::fma(x[i * K + kk], cpu::widen(w[j * K + kk]), s);
      if (bias) s += bias[j];
      y[i * N + j] = s;
    }
  }
}

// Tile with nr (1..4) columns of W; MR fixed.
template <typename W, int MR>
void linear_tile_cols(int nr, const float* x, const W* w, const float* bias, float* y, int64_t K, int64_t N) {
  switch (nr) {
    case 4: return linear_tile<W, MR, 4>(x, w, bias, y, K, N);
    case 3: return linear_tile<W, MR, 3>(x, w, bias, y, K, N);
    case 2: return linear_tile<W, MR, 2>(x, w, bias, y, K, N);
    default: return linear_tile<W, MR, 1>(x, w, bias, y, K, N);
  }
}

template <typename W>
void linear_tile_any(int mr, int nr, const float* x, const W* w, const float* bias, float* y, int64_t K,
                     int64_t N) {
  switch (mr) {
    case 4: return linear_tile_cols<W, 4>(nr, x, w, bias, y, K, N);
    case 3: return linear_tile_cols<W, 3>(nr, x, w, bias, y, K, N);
    case 2: return linear_tile_cols<W, 2>(nr, x, w, bias, y, K, N);
    default: return linear_tile_cols<W, 1>(nr, x, w, bias, y, K, N);
  }
}

constexpr int64_t kTileRows = 4;    // rows of x per register tile
constexpr int64_t kTileCols = 4;    // rows of W per register tile
constexpr int64_t kTaskRows = 32;   // rows of x per task: their x block stays in L2
constexpr int64_t kTaskCols = 16;   // rows of W per task

// ---------------------------------------------------------------- packed weights

// MR: 2 * MR accumulators + 2 panel registers + 1 broadcast must fit the vector registers (32 with
// AVX-512, 16 with AVX2: MR 8 there spilled four accumulators to the stack, a store and a reload in
// their FMA chains every k); the same bound for the two-panel tiles, 4 * MR + 4 + 1.
#if defined(__AVX512F__)
constexpr int kMaxTileRows = 8;
constexpr int kMaxPairRows = 4;  // up to this many rows, a tile spans two panels (see linear_packed)
#else
constexpr int kMaxTileRows = 6;
constexpr int kMaxPairRows = 2;
#endif

// y[MR, num_cols] (row stride ldy) = x[MR, K] (row stride K) · NP panels [NP][K, NR] (+ bias), where
// num_cols <= NP * NR; the last panel's columns past num_cols are its zero padding.
template <typename W, int MR, int NP>
void panel_tile(const float* x, const W* panel, const float* bias, float* y, int64_t K, int64_t ldy,
                int64_t num_cols) {
  constexpr int NV = 2 * NP;  // vectors per row of the tile
  // GCC keeps acc in registers only when every loop over its indices is unrolled before its scalar
  // replacement runs (hence the pragmas), no call happens while acc is live (the memcpys of num_cols
  // floats run before the k loop and after the last use) and acc's address is never taken; otherwise it
  // stores every accumulator to the stack in each k iteration, one store per FMA.
  float bias_row[NV * kGemmLanes] = {};
  if (bias) std::memcpy(bias_row, bias, num_cols * sizeof(float));
  vec acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = vec{};
  for (int64_t k = 0; k < K; ++k) {
    vec w[NV];
#pragma GCC unroll 16
    for (int q = 0; q < NP; ++q) {
      w[2 * q] = vload(panel + q * K * kPanelCols + k * kPanelCols);
      w[2 * q + 1] = vload(panel + q * K * kPanelCols + k * kPanelCols + kGemmLanes);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const vec xb = vbroadcast(x + i * K + k);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[i][v] = vfmadd(xb, w[v], acc[i][v]);
    }
  }
  float rows[MR][NV * kGemmLanes];  // each row's columns in order (+ bias)
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const vec r = bias ? acc[i][v] + vload(bias_row + v * kGemmLanes) : acc[i][v];
      if (num_cols == NP * kPanelCols) vstore(y + i * ldy + v * kGemmLanes, r);
      else vstore(rows[i] + v * kGemmLanes, r);
    }
  if (num_cols == NP * kPanelCols) return;
  for (int i = 0; i < MR; ++i) std::memcpy(y + i * ldy, rows[i], num_cols * sizeof(float));
}

template <typename W>
struct PanelTiles {
  using Fn = void (*)(const float*, const W*, const float*, float*, int64_t, int64_t, int64_t);
  // Indexed by MR (entries past kMaxTileRows / kMaxPairRows unused).
  static constexpr Fn one[9] = {
      nullptr,             panel_tile<W, 1, 1>, panel_tile<W, 2, 1>, panel_tile<W, 3, 1>, panel_tile<W, 4, 1>,
      panel_tile<W, 5, 1>, panel_tile<W, 6, 1>, panel_tile<W, 7, 1>, panel_tile<W, 8, 1>};
  static constexpr Fn pair[5] = {nullptr, panel_tile<W, 1, 2>, panel_tile<W, 2, 2>, panel_tile<W, 3, 2>,
                                 panel_tile<W, 4, 2>};
};
static_assert(kGemvMaxRows >= kMaxPairRows, "two-panel tiles read 16-bit weights in place");

constexpr int64_t kBlockRows = 64;  // rows of x per task: the x block [64, K] stays in L2 across panels

// Task = (row block, panel); consecutive tasks share the row block, so x stays cached. Up to
// kMaxPairRows rows the kernel streams W from memory with few FMA chains per panel, so a task takes two
// panels to keep more loads and FMAs in flight, and four at one row (decode: 8 FMA chains, where two
// panels' 4 chains left the FMA units waiting on their latency; F16 SmolLM2 decode 5% faster on AVX2).
// 16-bit panels past kGemvMaxRows rows are widened into the thread's `wide` buffer
// [num_threads][K * kPanelCols] first.
template <typename W>
void linear_packed(ThreadPool& pool, const float* x, const W* panels, const float* bias, float* y, int64_t T,
                   int64_t K, int64_t N, float* wide) {
  const int64_t num_p = cpu::num_panels(N), panels_per_task = T == 1 ? 4 : T <= kMaxPairRows ? 2 : 1;
  const int64_t num_row_blocks = (T + kBlockRows - 1) / kBlockRows;
  const int64_t num_col_tasks = (num_p + panels_per_task - 1) / panels_per_task;
  const bool widen_first = !std::is_same_v<W, float> && T > kGemvMaxRows;
  pool.parallel_for(num_row_blocks * num_col_tasks, [&](int64_t task, int thread) {
    const int64_t t0 = (task / num_col_tasks) * kBlockRows, t1 = std::min(T, t0 + kBlockRows);
    const int64_t p = (task % num_col_tasks) * panels_per_task, n0 = p * kPanelCols;
    const int64_t num_cols = std::min(panels_per_task * kPanelCols, N - n0);
    const W* panel = panels + p * K * kPanelCols;
    const float* b = bias ? bias + n0 : nullptr;
    if (T == 1 && num_cols > 3 * kPanelCols) return panel_tile<W, 1, 4>(x, panel, b, y + n0, K, N, num_cols);
    if (T == 1 && num_cols > 2 * kPanelCols) return panel_tile<W, 1, 3>(x, panel, b, y + n0, K, N, num_cols);
    if (num_cols > kPanelCols) return PanelTiles<W>::pair[T](x, panel, b, y + n0, K, N, num_cols);
    if (widen_first) {
      float* w32 = wide + thread * K * kPanelCols;
      widen_into(panel, K * kPanelCols, w32);
      for (int64_t t = t0; t < t1; t += kMaxTileRows) {
        const int64_t mr = std::min<int64_t>(kMaxTileRows, t1 - t);
        PanelTiles<float>::one[mr](x + t * K, w32, b, y + t * N + n0, K, N, num_cols);
      }
      return;
    }
    for (int64_t t = t0; t < t1; t += kMaxTileRows) {
      const int64_t mr = std::min<int64_t>(kMaxTileRows, t1 - t);
      PanelTiles<W>::one[mr](x + t * K, panel, b, y + t * N + n0, K, N, num_cols);
    }
  }, std::min(T, kBlockRows) * K * kPanelCols * panels_per_task);
}

// Row-major W: task = (row block of x, kTaskCols rows of W). 16-bit rows of W past kGemvMaxRows rows
// of x are widened into the thread's `wide` buffer [num_threads][kTaskCols * K] first.
template <typename W>
void linear_rows(ThreadPool& pool, const float* xp, const W* wp, const float* bias, float* yp, int64_t T,
                 int64_t K, int64_t N, float* wide) {
  const int64_t num_row_tasks = (T + kTaskRows - 1) / kTaskRows;
  const int64_t num_col_tasks = (N + kTaskCols - 1) / kTaskCols;
  const bool widen_first = !std::is_same_v<W, float> && T > kGemvMaxRows;
  pool.parallel_for(num_row_tasks * num_col_tasks, [&](int64_t task, int thread) {
    const int64_t t0 = (task / num_col_tasks) * kTaskRows, t1 = std::min(T, t0 + kTaskRows);
    const int64_t n0 = (task % num_col_tasks) * kTaskCols, n1 = std::min(N, n0 + kTaskCols);
    auto tiles = [&](const auto* w) {  // w: rows n0..n1 of W
      for (int64_t n = n0; n < n1; n += kTileCols) {
        const int nr = static_cast<int>(std::min(kTileCols, n1 - n));
        for (int64_t t = t0; t < t1; t += kTileRows) {
          const int mr = static_cast<int>(std::min(kTileRows, t1 - t));
          linear_tile_any(mr, nr, xp + t * K, w + (n - n0) * K, bias ? bias + n : nullptr, yp + t * N + n, K, N);
        }
      }
    };
    if (!widen_first) return tiles(wp + n0 * K);
    float* w32 = wide + thread * kTaskCols * K;
    widen_into(wp + n0 * K, (n1 - n0) * K, w32);
    tiles(static_cast<const float*>(w32));
  }, std::min(T, kTaskRows) * std::min(N, kTaskCols) * K);
}

// x [T, K] float32; weight [N, K] in float32, BF16 or F16 (a 16-bit weight stays 16-bit, others are
// converted to float32 at load); optional bias [N] in float32. The weight is placed as packed panels
// unless another op reads it too (an embedding table tied to the LM head).
class Linear final : public OpKind {
 public:
  explicit Linear(const OpSpec& spec) : OpKind(spec) {
    spec.require_num_io(2, 3, 1);
    spec.require_input_dtype(0, {DataType::kFloat32});
    for (size_t i = 1; i < spec.inputs.size(); ++i) spec.require_input_dtype(i, kWideFloatDtypes);
    amx_ = weight_dtype() != DataType::kFloat32 && spec.inputs[1].shape.size() == 2 &&
           cpu::amx_linear_enabled(weight_dtype() == DataType::kFloat16);
  }
  WeightPlacement weight_placement(size_t input) const override {
    const bool matrix = input == 1 && spec_.inputs[1].shape.size() == 2;
    if (!matrix) return {DataType::kFloat32, WeightLayout::kRowMajor};
    return {weight_dtype(), amx_ ? WeightLayout::kCpuAmxTiles : WeightLayout::kCpuGemmPanels};
  }
  // Per thread, a panel [K, kPanelCols] or kTaskCols rows [kTaskCols, K] of a 16-bit W in float32; with
  // AMX tiles, the larger of that (W may stay row-major, when another op reads it) and the tile kernel's.
  size_t workspace_bytes() const override {
    if (weight_dtype() == DataType::kFloat32 || spec_.inputs[1].shape.size() != 2) return 0;
    const int64_t K = spec_.inputs[1].shape[1].value;
    const int num_threads = spec_.backend->num_threads;
    const size_t wide = sizeof(float) * static_cast<size_t>(num_threads) * static_cast<size_t>(K) *
                        static_cast<size_t>(std::max<int64_t>(kPanelCols, kTaskCols));
    if (!amx_) return wide;
    return std::max(wide, cpu::amx_linear_workspace_bytes(K, spec_.backend->max_num_tokens, num_threads));
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &y = out[0];
    const int64_t T = x.rows(), K = x.cols(), N = y.cols();
    RTLLM_CHECK(y.rows() == T, "linear: output has ", y.rows(), " rows, x has ", T);
    const bool packed = w.ndim == 3;  // [num_panels, K, kPanelCols], see cpu/gemm_pack.h
    if (w.ndim == 4) {                // [num_col_blocks, num_k_steps, 32, 32], see cpu/amx_linear.h
      RTLLM_CHECK(w.shape[0] == cpu::amx_num_col_blocks(N) && w.shape[1] == cpu::amx_num_k_steps(K) &&
                      w.shape[2] == cpu::kAmxStepK && w.shape[3] == cpu::kAmxBlockCols,
                  "linear: AMX weight [", w.shape[0], ", ", w.shape[1], ", ", w.shape[2], ", ", w.shape[3],
                  "] does not match x with ", K, " columns and ", N, " outputs");
      RTLLM_CHECK(w.dtype == DataType::kBFloat16 || w.dtype == DataType::kFloat16,
                  "linear: AMX weight placed as ", dtype_safetensors_name(w.dtype), ", expected BF16 or F16");
    } else if (packed) {
      RTLLM_CHECK(w.shape[0] == cpu::num_panels(N) && w.shape[1] == K && w.shape[2] == cpu::kPanelCols,
                  "linear: packed weight [", w.shape[0], ", ", w.shape[1], ", ", w.shape[2],
                  "] does not match x with ", K, " columns and ", N, " outputs");
    } else {
      RTLLM_CHECK(w.ndim == 2 && w.shape[0] == N && w.shape[1] == K, "linear: weight [", w.shape[0], ", ",
                  w.shape[1], "] does not match x with ", K, " columns and ", N, " outputs");
    }
    const float* bias = nullptr;
    if (spec_.inputs.size() == 3) {
      RTLLM_CHECK(in[2].numel() == N, "linear: bias has ", in[2].numel(), " values, expected ", N);
      bias = in[2].f32();
    }
    if (w.ndim == 4)
      return cpu::amx_linear(*ctx.pool, x.f32(), static_cast<const uint16_t*>(w.data),
                             w.dtype == DataType::kFloat16, bias, y.f32(), T, K, N, ctx.workspace);
    float* wide = static_cast<float*>(ctx.workspace);
    switch (w.dtype) {
      case DataType::kBFloat16: return run_as(*ctx.pool, packed, x.f32(), static_cast<const bf16_t*>(w.data), bias,
                                              y.f32(), T, K, N, wide);
      case DataType::kFloat16: return run_as(*ctx.pool, packed, x.f32(), static_cast<const fp16_t*>(w.data), bias,
                                             y.f32(), T, K, N, wide);
      default:
        RTLLM_CHECK(w.dtype == DataType::kFloat32, "linear: weight placed as ", dtype_safetensors_name(w.dtype));
        return run_as(*ctx.pool, packed, x.f32(), w.f32(), bias, y.f32(), T, K, N, wide);
    }
  }

 private:
  // BF16 and F16 matrices stay as stored; float32 ones (and anything else linear accepts) in float32.
  DataType weight_dtype() const {
    const DataType d = spec_.inputs[1].dtype;
    return d == DataType::kBFloat16 || d == DataType::kFloat16 ? d : DataType::kFloat32;
  }
  bool amx_ = false;  // a 16-bit matrix, AMX usable at load: placed as AMX tiles unless another op reads it
  template <typename W>
  static void run_as(ThreadPool& pool, bool packed, const float* x, const W* w, const float* bias, float* y,
                     int64_t T, int64_t K, int64_t N, float* wide) {
    if (packed) return linear_packed(pool, x, w, bias, y, T, K, N, wide);
    linear_rows(pool, x, w, bias, y, T, K, N, wide);
  }
};

}  // namespace

void register_cpu_linear_ops() { register_op("linear", DeviceKind::kCpu, make_op<Linear>); }

}  // namespace rtllm
