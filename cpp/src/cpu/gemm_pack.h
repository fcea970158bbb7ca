// The kernel-ready layout of a CPU linear weight. The engine stores W as [N, K] (HF layout, rows
// contiguous); at load the CPU runner re-lays each weight that only linear reads into column panels
//   panels[N / kPanelCols][K][kPanelCols],  panels[p][k][j] = W[p * kPanelCols + j][k]
// (the last panel zero-padded past N), so the GEMM micro-kernel streams one panel with contiguous
// vector loads per k. The placed tensor keeps this 3-d shape [num_panels, K, kPanelCols]; the
// linear op recognizes packed weights by it. BF16 and F16 weights are packed as they are stored (16-bit
// elements, the same layout): the linear op widens them to float32 in registers or per panel.
#pragma once

#include <cstdint>

namespace rtllm::cpu {

// Floats per SIMD register of the GEMM kernel, and columns of W per panel (two registers).
#if defined(__AVX512F__)
constexpr int kGemmLanes = 16;
#else
constexpr int kGemmLanes = 8;
#endif
constexpr int kPanelCols = 2 * kGemmLanes;

inline int64_t num_panels(int64_t N) { return (N + kPanelCols - 1) / kPanelCols; }

// w [N, K] row-major -> panels [num_panels(N), K, kPanelCols], elements copied as they are (float32,
// or the bits of a 16-bit float).
void pack_linear_weight(const float* w, int64_t N, int64_t K, float* panels);
void pack_linear_weight(const uint16_t* w, int64_t N, int64_t K, uint16_t* panels);

}  // namespace rtllm::cpu
