// linear: y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]), W rows contiguous (HF layout).
//
// A register tile computes MR rows of x against NR rows of W with one 8-lane accumulator per output
// element. Every output element is summed in the same order by every tile shape (8-lane FMA chunks
// over k, a fixed horizontal sum, then the k tail), so a token's result does not depend on how many
// tokens share the step or where its row falls in the tiling.
#include <algorithm>

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

void linear_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  check_num_io("linear", num_in, 2, 3, num_out, 1);
  const TensorView &x = in[0], &w = in[1], &y = out[0];
  check_f32("linear", x, "x");
  check_f32("linear", w, "weight");
  const int64_t T = x.rows(), K = x.cols(), N = w.shape[0];
  RTLLM_CHECK(w.ndim == 2 && w.shape[1] == K, "linear: weight [", w.shape[0], ", ", w.shape[1],
              "] does not match x with ", K, " columns");
  RTLLM_CHECK(y.rows() == T && y.cols() == N, "linear: output [", y.rows(), ", ", y.cols(), "], expected [", T,
              ", ", N, "]");
  const float* bias = nullptr;
  if (num_in == 3) {
    check_f32("linear", in[2], "bias");
    RTLLM_CHECK(in[2].numel() == N, "linear: bias has ", in[2].numel(), " values, expected ", N);
    bias = in[2].f32();
  }
  const float* xp = x.f32();
  const float* wp = w.f32();
  float* yp = y.f32();
  const int64_t num_row_tasks = (T + kTaskRows - 1) / kTaskRows;
  const int64_t num_col_tasks = (N + kTaskCols - 1) / kTaskCols;
  ctx.pool->parallel_for(num_row_tasks * num_col_tasks, [&](int64_t task, int) {
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

}  // namespace

void register_cpu_linear_ops() { register_op("linear", DeviceKind::kCpu, linear_op); }

}  // namespace rtllm
