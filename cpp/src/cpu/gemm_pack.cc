#include "cpu/gemm_pack.h"

#include <algorithm>

namespace rtllm::cpu {

namespace {

template <typename T>
void pack_panels(const T* w, int64_t N, int64_t K, T* panels) {
  for (int64_t p = 0; p < num_panels(N); ++p) {
    T* dst = panels + p * K * kPanelCols;
    const int64_t n0 = p * kPanelCols, num_cols = std::min<int64_t>(kPanelCols, N - n0);
    // Blocks of 64 k keep the kPanelCols source rows' lines in cache while they are read across.
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      const int64_t k1 = std::min(K, k0 + 64);
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t j = 0; j < num_cols; ++j) dst[k * kPanelCols + j] = w[(n0 + j) * K + k];
        for (int64_t j = num_cols; j < kPanelCols; ++j) dst[k * kPanelCols + j] = T{0};  // +0 in every format
      }
    }
  }
}

}  // namespace

void pack_linear_weight(const float* w, int64_t N, int64_t K, float* panels) { pack_panels(w, N, K, panels); }
void pack_linear_weight(const uint16_t* w, int64_t N, int64_t K, uint16_t* panels) { pack_panels(w, N, K, panels); }

}  // namespace rtllm::cpu
