// linear: y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]).
//
// Packed weights (cpu/gemm_pack.h, [N / NR][K][NR], what the CPU runner places for weights that only
// linear reads): an outer-product micro-kernel keeps an MR x NR tile of y in registers and, per k,
// broadcasts MR values of x against one NR-wide row of the panel. Every output element is ONE
// sequential FMA chain over k = 0..K-1 from 0, then + bias, whatever the tile, the row's position in
// it, the number of rows or threads: a token's result does not depend on the batch it is in.
//
// Unpacked weights [N, K] (e.g. an embedding table tied to the LM head): an inner-product register
// tile with one 8-lane accumulator per output element, summed in one fixed order by every tile shape
// (8-lane FMA chunks over k, a fixed horizontal sum, then the k tail).
#include <algorithm>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/gemm_pack.h"
#include "cpu/simd.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

using cpu::v8;

template <int MR, int NR>
void linear_tile(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N) {
  v8 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = cpu::splat8(0.0f);
  int64_t k = 0;
  for (; k + cpu::kLanes <= K; k += cpu::kLanes) {
    v8 xv[MR], wv[NR];
    for (int i = 0; i < MR; ++i) xv[i] = cpu::load8(x + i * K + k);
    for (int j = 0; j < NR; ++j) wv[j] = cpu::load8(w + j * K + k);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = cpu::fmadd8(xv[i], wv[j], acc[i][j]);
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = cpu::hsum8(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s = std::fma(x[i * K + kk], w[j * K + kk], s);
      if (bias) s += bias[j];
      y[i * N + j] = s;
    }
  }
}

// Tile with nr (1..4) columns of W; MR fixed.
template <int MR>
void linear_tile_cols(int nr, const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N) {
  switch (nr) {
    case 4: return linear_tile<MR, 4>(x, w, bias, y, K, N);
    case 3: return linear_tile<MR, 3>(x, w, bias, y, K, N);
    case 2: return linear_tile<MR, 2>(x, w, bias, y, K, N);
    default: return linear_tile<MR, 1>(x, w, bias, y, K, N);
  }
}

void linear_tile_any(int mr, int nr, const float* x, const float* w, const float* bias, float* y, int64_t K,
                     int64_t N) {
  switch (mr) {
    case 4: return linear_tile_cols<4>(nr, x, w, bias, y, K, N);
    case 3: return linear_tile_cols<3>(nr, x, w, bias, y, K, N);
    case 2: return linear_tile_cols<2>(nr, x, w, bias, y, K, N);
    default: return linear_tile_cols<1>(nr, x, w, bias, y, K, N);
  }
}

constexpr int64_t kTileRows = 4;    // rows of x per register tile
constexpr int64_t kTileCols = 4;    // rows of W per register tile
constexpr int64_t kTaskRows = 32;   // rows of x per task: their x block stays in L2
constexpr int64_t kTaskCols = 16;   // rows of W per task

// ---------------------------------------------------------------- packed weights

using cpu::kGemmLanes;
using cpu::kPanelCols;
typedef float vec __attribute__((vector_size(kGemmLanes * sizeof(float))));

inline vec vload(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
inline vec vsplat(float x) { return vec{} + x; }
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

constexpr int kMaxTileRows = 8;  // MR: 2 * MR accumulators + 2 panel registers + 1 broadcast
constexpr int kMaxPairRows = 4;  // up to this many rows, a tile spans two panels (see linear_packed)

// y[MR, num_cols] (row stride ldy) = x[MR, K] (row stride K) · NP panels [NP][K, NR] (+ bias), where
// num_cols <= NP * NR; the last panel's columns past num_cols are its zero padding.
template <int MR, int NP>
void panel_tile(const float* x, const float* panel, const float* bias, float* y, int64_t K, int64_t ldy,
                int64_t num_cols) {
  constexpr int NV = 2 * NP;  // vectors per row of the tile
  vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vec{};
  for (int64_t k = 0; k < K; ++k) {
    vec w[NV];
    for (int q = 0; q < NP; ++q) {
      w[2 * q] = vload(panel + q * K * kPanelCols + k * kPanelCols);
      w[2 * q + 1] = vload(panel + q * K * kPanelCols + k * kPanelCols + kGemmLanes);
    }
    for (int i = 0; i < MR; ++i) {
      const vec xb = vsplat(x[i * K + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = vfmadd(xb, w[v], acc[i][v]);
    }
  }
  if (bias) {
    vec b[NV] = {};
    std::memcpy(b, bias, num_cols * sizeof(float));
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] += b[v];
  }
  for (int i = 0; i < MR; ++i) {
    if (num_cols == NP * kPanelCols) {
      for (int v = 0; v < NV; ++v) vstore(y + i * ldy + v * kGemmLanes, acc[i][v]);
    } else {
      std::memcpy(y + i * ldy, acc[i], num_cols * sizeof(float));  // a row's columns lie in acc[i] in order
    }
  }
}

using PanelTileFn = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t);
constexpr PanelTileFn kPanelTiles[kMaxTileRows + 1] = {
    nullptr,          panel_tile<1, 1>, panel_tile<2, 1>, panel_tile<3, 1>, panel_tile<4, 1>,
    panel_tile<5, 1>, panel_tile<6, 1>, panel_tile<7, 1>, panel_tile<8, 1>};
constexpr PanelTileFn kPairTiles[kMaxPairRows + 1] = {nullptr, panel_tile<1, 2>, panel_tile<2, 2>,
                                                      panel_tile<3, 2>, panel_tile<4, 2>};

constexpr int64_t kBlockRows = 64;  // rows of x per task: the x block [64, K] stays in L2 across panels

// Task = (row block, panel); consecutive tasks share the row block, so x stays cached. Up to
// kMaxPairRows rows (decode) the kernel streams W from memory with few FMA chains per panel, so a task
// takes two panels to keep more loads and FMAs in flight.
void linear_packed(ThreadPool& pool, const float* x, const float* panels, const float* bias, float* y, int64_t T,
                   int64_t K, int64_t N) {
  const int64_t num_p = cpu::num_panels(N), panels_per_task = T <= kMaxPairRows ? 2 : 1;
  const int64_t num_row_blocks = (T + kBlockRows - 1) / kBlockRows;
  const int64_t num_col_tasks = (num_p + panels_per_task - 1) / panels_per_task;
  pool.parallel_for(num_row_blocks * num_col_tasks, [&](int64_t task, int) {
    const int64_t t0 = (task / num_col_tasks) * kBlockRows, t1 = std::min(T, t0 + kBlockRows);
    const int64_t p = (task % num_col_tasks) * panels_per_task, n0 = p * kPanelCols;
    const int64_t num_cols = std::min(panels_per_task * kPanelCols, N - n0);
    const float* panel = panels + p * K * kPanelCols;
    const float* b = bias ? bias + n0 : nullptr;
    if (num_cols > kPanelCols) return kPairTiles[T](x, panel, b, y + n0, K, N, num_cols);
    for (int64_t t = t0; t < t1; t += kMaxTileRows) {
      const int64_t mr = std::min<int64_t>(kMaxTileRows, t1 - t);
      kPanelTiles[mr](x + t * K, panel, b, y + t * N + n0, K, N, num_cols);
    }
  }, std::min(T, kBlockRows) * K * kPanelCols * panels_per_task);
}

// x [T, K] float32; weight [N, K] and optional bias [N] in float32 (converted at load). The weight is
// placed as packed panels unless another op reads it too (an embedding table tied to the LM head).
class Linear final : public OpKind {
 public:
  explicit Linear(const OpSpec& spec) : OpKind(spec) {
    spec.require_num_io(2, 3, 1);
    spec.require_input_dtype(0, {DataType::kFloat32});
    for (size_t i = 1; i < spec.inputs.size(); ++i) spec.require_input_dtype(i, kWideFloatDtypes);
  }
  WeightPlacement weight_placement(size_t input) const override {
    const bool matrix = input == 1 && spec_.inputs[1].shape.size() == 2;
    return {DataType::kFloat32, matrix ? WeightLayout::kCpuGemmPanels : WeightLayout::kRowMajor};
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &y = out[0];
    const int64_t T = x.rows(), K = x.cols(), N = y.cols();
    RTLLM_CHECK(y.rows() == T, "linear: output has ", y.rows(), " rows, x has ", T);
    const bool packed = w.ndim == 3;  // [num_panels, K, kPanelCols], see cpu/gemm_pack.h
    if (packed) {
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
    if (packed) return linear_packed(*ctx.pool, x.f32(), w.f32(), bias, y.f32(), T, K, N);
    linear_rows(*ctx.pool, x.f32(), w.f32(), bias, y.f32(), T, K, N);
  }

 private:
  static void linear_rows(ThreadPool& pool, const float* xp, const float* wp, const float* bias, float* yp, int64_t T,
                          int64_t K, int64_t N) {
    const int64_t num_row_tasks = (T + kTaskRows - 1) / kTaskRows;
    const int64_t num_col_tasks = (N + kTaskCols - 1) / kTaskCols;
    pool.parallel_for(num_row_tasks * num_col_tasks, [&](int64_t task, int) {
      const int64_t t0 = (task / num_col_tasks) * kTaskRows, t1 = std::min(T, t0 + kTaskRows);
      const int64_t n0 = (task % num_col_tasks) * kTaskCols, n1 = std::min(N, n0 + kTaskCols);
      for (int64_t n = n0; n < n1; n += kTileCols) {
        const int nr = static_cast<int>(std::min(kTileCols, n1 - n));
        for (int64_t t = t0; t < t1; t += kTileRows) {
          const int mr = static_cast<int>(std::min(kTileRows, t1 - t));
          linear_tile_any(mr, nr, xp + t * K, wp + n * K, bias ? bias + n : nullptr, yp + t * N + n, K, N);
        }
      }
    }, std::min(T, kTaskRows) * std::min(N, kTaskCols) * K);
  }
};

}  // namespace

void register_cpu_linear_ops() { register_op("linear", DeviceKind::kCpu, make_op<Linear>); }

}  // namespace rtllm
