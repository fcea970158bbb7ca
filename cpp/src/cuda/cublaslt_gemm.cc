#include "cuda/cublaslt_gemm.h"

#include "cuda/cuda_context.h"

#define RTLLM_CUBLAS_CHECK(expr)                                                                   \
  do {                                                                                             \
    const cublasStatus_t rtllm_cublas_status_ = (expr);                                            \
    RTLLM_CHECK(rtllm_cublas_status_ == CUBLAS_STATUS_SUCCESS, #expr, " failed: ",                 \
                cublasLtGetStatusName(rtllm_cublas_status_), " (", cublasLtGetStatusString(rtllm_cublas_status_), ")"); \
  } while (0)

namespace rtllm {

namespace {

cudaDataType_t cuda_type(DataType dtype) {
  switch (dtype) {
    case DataType::kBFloat16: return CUDA_R_16BF;
    case DataType::kFloat16: return CUDA_R_16F;
    case DataType::kFloat32: return CUDA_R_32F;
    default: break;
  }
  detail::throw_error(__FILE__, __LINE__, __func__,
                      detail::concat("cuBLASLt linear: unsupported dtype ", dtype_safetensors_name(dtype)));
}

constexpr uint32_t kMinAlignment = 16;  // bytes; every operand pointer is checked against it

}  // namespace

// Row-major y[T, N] = x[T, K] · W[N, K]ᵀ is column-major yᵀ[N, T] = W'ᵀ · x' where W' = W seen as
// column-major [K, N] (ld K) and x' = x seen as column-major [K, T] (ld K): A = W transposed, B = x.
// The bias epilogue adds bias[N] along the rows (m = N) of the column-major D.
struct CublasLtGemm::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};

  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

CublasLtGemm::CublasLtGemm(size_t workspace_bytes) : workspace_bytes_(workspace_bytes) {
  RTLLM_CUBLAS_CHECK(cublasLtCreate(&handle_));
  if (workspace_bytes_) RTLLM_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

CublasLtGemm::~CublasLtGemm() {
  plans_.clear();
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

CublasLtGemm::Plan& CublasLtGemm::plan(const Key& key) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  const auto [T, N, K, ab_int, y_int, has_bias] = key;
  const cudaDataType_t ab = cuda_type(static_cast<DataType>(ab_int)), y = cuda_type(static_cast<DataType>(y_int));
  auto p = std::make_unique<Plan>();
  RTLLM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  RTLLM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  RTLLM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  if (has_bias) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    RTLLM_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    RTLLM_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &ab, sizeof(ab)));
  }
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, ab, K, N, K));
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, ab, K, T, K));
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->d, y, N, T, N));

  cublasLtMatmulPreference_t pref = nullptr;
  RTLLM_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  cublasLtMatmulHeuristicResult_t result{};
  int num_results = 0;
  cublasStatus_t status = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_, sizeof(workspace_bytes_));
  // The heuristic assumes 256-byte aligned operands unless told otherwise; activations in the
  // workspace arena are only kMinAlignment-aligned.
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    if (status != CUBLAS_STATUS_SUCCESS) break;
    status = cublasLtMatmulPreferenceSetAttribute(pref, attr, &kMinAlignment, sizeof(kMinAlignment));
  }
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasLtMatmulAlgoGetHeuristic(handle_, p->desc, p->a, p->b, p->d, p->d, pref, 1, &result, &num_results);
  cublasLtMatmulPreferenceDestroy(pref);
  RTLLM_CUBLAS_CHECK(status);
  RTLLM_CHECK(num_results > 0, "cuBLASLt has no algorithm for linear x [", T, ", ", K, "] · W [", N, ", ", K,
              "]ᵀ with output ", dtype_safetensors_name(static_cast<DataType>(y_int)));
  p->algo = result.algo;
  return *plans_.emplace(key, std::move(p)).first->second;
}

void CublasLtGemm::linear(void* y, const void* x, const void* w, const void* bias, int64_t T, int64_t N, int64_t K,
                          DataType ab_dtype, DataType y_dtype, cudaStream_t stream) {
  for (const void* ptr : {static_cast<const void*>(y), x, w, bias})
    RTLLM_CHECK(reinterpret_cast<uintptr_t>(ptr) % kMinAlignment == 0, "cuBLASLt linear: operand ", ptr,
                " is not ", kMinAlignment, "-byte aligned");
  Plan& p = plan(Key{T, N, K, static_cast<int>(ab_dtype), static_cast<int>(y_dtype), bias != nullptr});
  if (bias)
    RTLLM_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  const float alpha = 1.0f, beta = 0.0f;
  RTLLM_CUBLAS_CHECK(cublasLtMatmul(handle_, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.d, y, p.d, &p.algo,
                                    workspace_, workspace_bytes_, stream));
}

}  // namespace rtllm
