// gemv: y [m, n] = x [m, k] · W [n, k]ᵀ (+ bias) for m <= kGemvMaxM, bound by reading W once, on tensor
// cores (mma_gemv.cuh).
//
// A lane's 16-byte load of weight row g holds the 8 weights k0 + 8t .. k0 + 8t + 7 of a 32-weight step; the
// step's two MMAs take its words (x, y) and (z, w):
//   MMA 0: b0 = W[g][8t, 8t+1], b1 = W[g][8t+2, 8t+3]  (slots 2t, 2t+1 and 2t+8, 2t+9)
//   MMA 1: b0 = W[g][8t+4, 8t+5], b1 = W[g][8t+6, 8t+7]
// and the activations of tokens g, g + 8 at the same k, one 16-byte load each, as loaded.
//
// The RMSNorm before the product and the SiLU gate after the gate/up product stay separate kernels:
// the extra loads and arithmetic per weight vector, or fewer loads in flight, cost more than the launch
// they would save (docs/performance.md, "Design decisions and their measurements").
#include "mma_gemv.cuh"
#include "rtllm/kernels/gemv.cuh"

namespace rtllm::kernels {
namespace {

// The Codec of mma_gemv_kernel for weights in the activation dtype T (bf16 or fp16): no side data.
template <typename T>
struct DenseCodes : NoSideData {
  using Act = T;
  static constexpr int kCodes = 8;
  static __device__ __forceinline__ void mmas(float (&acc)[2][4], const uint4& wv, Side, const uint32_t* xg,
                                              const uint32_t* xh) {
    mma_16x8x16<T>(acc[0], xg[0], xh[0], xg[1], xh[1], wv.x, wv.y);
    mma_16x8x16<T>(acc[1], xg[2], xh[2], xg[3], xh[3], wv.z, wv.w);
  }
};

template <typename T, typename TY>
void launch(void* y, const void* x, const void* weight, const void* bias, int32_t m, int32_t n, int32_t k,
            cudaStream_t stream) {
  launch_mma_gemv<DenseCodes<T>>(mma_gemv_k_splits(n), BiasOutput<T, TY>{static_cast<TY*>(y),
                                 static_cast<const T*>(bias), n}, x, weight, {}, m, n, k, stream);
}

}  // namespace

bool gemv_supported(int32_t m, int32_t k) { return m >= 1 && m <= kGemvMaxM && k > 0 && k % 8 == 0; }

cudaError_t gemv(void* y, const void* x, const void* weight, const void* bias, int32_t m, int32_t n, int32_t k,
                 DType dtype, DType y_dtype, cudaStream_t stream) {
  RTLLM_KERNEL_CHECK(y && x && weight && n >= 0 && gemv_supported(m, k) && mma_gemv_rows_ok(n));
  RTLLM_KERNEL_CHECK(aligned16(x) && aligned16(weight));
  RTLLM_KERNEL_CHECK(y_dtype == dtype || y_dtype == DType::kFP32);
  if (n == 0) return cudaSuccess;
  RTLLM_DISPATCH_DTYPE(dtype, T, {
    if (y_dtype == DType::kFP32) launch<T, float>(y, x, weight, bias, m, n, k, stream);
    else launch<T, T>(y, x, weight, bias, m, n, k, stream);
  });
  return cudaGetLastError();
}

}  // namespace rtllm::kernels
