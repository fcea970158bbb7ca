#include "cuda/cublaslt_gemm.h"

#include <cstdlib>
#include <mutex>
#include <string>

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
constexpr size_t kProbeWorkspaceBytes = 32 << 20;

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

namespace {

// The heuristic's first algorithm for the plan's descriptors into plan.algo; false when it has none.
bool find_algo(cublasLtHandle_t handle, CublasLtGemm::Plan& p, size_t workspace_bytes) {
  cublasLtMatmulPreference_t pref = nullptr;
  RTLLM_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  cublasLtMatmulHeuristicResult_t result{};
  int num_results = 0;
  cublasStatus_t status = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes, sizeof(workspace_bytes));
  // The heuristic assumes 256-byte aligned operands unless told otherwise; activations in the
  // workspace arena are only kMinAlignment-aligned.
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    if (status != CUBLAS_STATUS_SUCCESS) break;
    status = cublasLtMatmulPreferenceSetAttribute(pref, attr, &kMinAlignment, sizeof(kMinAlignment));
  }
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &result, &num_results);
  cublasLtMatmulPreferenceDestroy(pref);
  // NOT_SUPPORTED: no algorithm for this combination of types, scale modes and epilogue
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) return false;
  RTLLM_CUBLAS_CHECK(status);
  if (num_results == 0) return false;
  p.algo = result.algo;
  return true;
}

template <typename V>
void set_attr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value) {
  RTLLM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

// Descriptors of an FP8 plan: A = w (transposed), B = q, D of y_dtype; scale modes, bias epilogue. The
// scale pointers are set again on every call; they are set here too because cuBLASLt's heuristic refuses
// the outer-vector mode (CUBLAS_STATUS_INVALID_VALUE) while the descriptor has no scale pointers, and
// offers its vector-scaled algorithms once they are set (cuBLASLt 13.1, probed on an H100).
void describe_fp8(CublasLtGemm::Plan& p, int64_t T, int64_t N, int64_t K, DataType y_dtype, int bias_dtype,
                  CublasLtGemm::Fp8Scaling scaling, const float* x_scale, const float* w_scale) {
  RTLLM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // FP8 GEMMs take only the "TN" form: both operands with K contiguous, which row-major w [N, K] and
  // q [T, K] are (see the layout note above).
  set_attr(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set_attr(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  if (scaling == CublasLtGemm::Fp8Scaling::kOuterVector) {
    // A's scales run along its rows (m = N: per output channel), B's along its columns (n = T: per token).
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, mode);
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, mode);
  }
  if (scaling != CublasLtGemm::Fp8Scaling::kNone) {
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w_scale);
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, x_scale);
  }
  if (bias_dtype >= 0) {
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, cuda_type(static_cast<DataType>(bias_dtype)));
  }
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, K, N, K));
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, K, T, K));
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.d, cuda_type(y_dtype), N, T, N));
}

// Descriptors of a bf16 / fp16 plan: A = w (transposed), B = x, D of y_dtype, the bias epilogue.
void describe_linear(CublasLtGemm::Plan& p, int64_t T, int64_t N, int64_t K, DataType ab_dtype, DataType y_dtype,
                     bool has_bias) {
  const cudaDataType_t ab = cuda_type(ab_dtype), y = cuda_type(y_dtype);
  RTLLM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_attr(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set_attr(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  if (has_bias) {
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, ab);
  }
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, ab, K, N, K));
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, ab, K, T, K));
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.d, y, N, T, N));
}

// Descriptors of an int8 plan: int32 compute and output, the "TN" form like FP8 (both operands with K
// contiguous, see the layout note above).
void describe_int8(CublasLtGemm::Plan& p, int64_t T, int64_t N, int64_t K) {
  // Integer compute and scale types: the int32 sums are exact (K is bounded by the op), alpha 1, beta 0.
  RTLLM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32I, CUDA_R_32I));
  set_attr(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set_attr(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8I, K, N, K));
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8I, K, T, K));
  RTLLM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.d, CUDA_R_32I, N, T, N));
}

// The rows whose heuristic answer a plan of T rows reuses: T itself up to kExactRows, above it T rounded
// up to one of 8 steps per power of two (1,025..2,048 rows: multiples of 128). Steps with prompt tokens
// have a different T almost every time (decode rows plus new prompt tokens); asking cuBLASLt's heuristic
// for each cost about 1-1.6 ms per shape (H100), 8-11 ms on a Llama step with a new prompt length.
constexpr int64_t kExactRows = 128;
int64_t heuristic_rows(int64_t T) {
  if (T <= kExactRows) return T;
  int64_t octave = kExactRows;
  while (octave * 2 < T) octave *= 2;  // octave < T <= 2 octave
  const int64_t step = octave / 8;
  return (T + step - 1) / step * step;
}

// Bucketed plans are asked for (RTLLM_CUBLASLT_BUCKETS=1) until measured end to end on the GPUs rtllm
// runs on; without it the heuristic is asked for every row count, as before.
bool bucket_plans_requested() {
  const char* env = std::getenv("RTLLM_CUBLASLT_BUCKETS");
  return env && std::string(env) == "1";
}

}  // namespace

// The algorithm of p (descriptors for T rows). With bucketed plans: the heuristic's for T's bucket
// (heuristic_rows, asked once per bucket and shape with descriptors that describe() builds for the bucket's
// rows), if cuBLASLt accepts it for p within the workspace. Else the heuristic's for p itself. False when
// neither has one.
bool CublasLtGemm::choose_algo(Plan& p, int64_t T, const AlgoKeyRest& rest,
                               const std::function<void(Plan&, int64_t)>& describe) {
  const int64_t rows = heuristic_rows(T);
  if (!bucket_plans_) return find_algo(handle_, p, workspace_bytes_);
  describers_.emplace(rest, describe);
  if (rows == T) return find_algo(handle_, p, workspace_bytes_);
  const auto it = bucket_algo(rows, rest, describe);
  if (it->second) {
    cublasLtMatmulHeuristicResult_t check{};
    const cublasStatus_t status = cublasLtMatmulAlgoCheck(handle_, p.desc, p.a, p.b, p.d, p.d, &*it->second, &check);
    if (status == CUBLAS_STATUS_SUCCESS && check.workspaceSize <= workspace_bytes_) {
      p.algo = *it->second;
      return true;
    }
  }
  return find_algo(handle_, p, workspace_bytes_);
}

// The heuristic's answer for `rows` rows of the shape `rest`, asked now if it was not yet.
CublasLtGemm::BucketAlgos::iterator CublasLtGemm::bucket_algo(int64_t rows, const AlgoKeyRest& rest,
                                                               const std::function<void(Plan&, int64_t)>& describe) {
  const AlgoKey key{rows, rest};
  auto it = bucket_algos_.find(key);
  if (it != bucket_algos_.end()) return it;
  Plan bucket;
  describe(bucket, rows);
  std::optional<cublasLtMatmulAlgo_t> algo;
  if (find_algo(handle_, bucket, workspace_bytes_)) algo = bucket.algo;
  return bucket_algos_.emplace(key, algo).first;
}

void CublasLtGemm::warm_buckets(int64_t max_rows) {
  if (!bucket_plans_) return;
  for (const auto& [rest, describe] : describers_)
    for (int64_t first = kExactRows + 1; first <= max_rows; first = heuristic_rows(first) + 1)  // of each bucket
      bucket_algo(heuristic_rows(first), rest, describe);
}

CublasLtGemm::CublasLtGemm(size_t workspace_bytes)
    : workspace_bytes_(workspace_bytes), bucket_plans_(bucket_plans_requested()) {
  RTLLM_CUBLAS_CHECK(cublasLtCreate(&handle_));
  if (workspace_bytes_) RTLLM_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

CublasLtGemm::~CublasLtGemm() {
  plans_.clear();
  fp8_plans_.clear();
  int8_plans_.clear();
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

CublasLtGemm::Plan& CublasLtGemm::plan(const Key& key) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  const auto [T, N, K, ab_int, y_int, has_bias] = key;
  auto describe = [N = N, K = K, ab_int = ab_int, y_int = y_int, has_bias = has_bias](Plan& p, int64_t rows) {
    describe_linear(p, rows, N, K, static_cast<DataType>(ab_int), static_cast<DataType>(y_int), has_bias);
  };
  auto p = std::make_unique<Plan>();
  describe(*p, T);
  RTLLM_CHECK(choose_algo(*p, T, {0, N, K, ab_int, y_int, has_bias}, describe),
              "cuBLASLt has no algorithm for linear x [", T, ", ", K, "] · W [", N, ", ", K, "]ᵀ with output ",
              dtype_safetensors_name(static_cast<DataType>(y_int)));
  return *plans_.emplace(key, std::move(p)).first->second;
}

bool CublasLtGemm::linear_rows_aligned(int64_t N, int64_t K, DataType ab_dtype, DataType y_dtype) {
  return K * dtype_size(ab_dtype) % kMinAlignment == 0 && N * dtype_size(y_dtype) % kMinAlignment == 0;
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

CublasLtGemm::Plan& CublasLtGemm::fp8_plan(const Fp8Key& key, const float* x_scale, const float* w_scale) {
  auto it = fp8_plans_.find(key);
  if (it != fp8_plans_.end()) return *it->second;
  const auto [T, N, K, y_int, bias_int, scaling_int] = key;
  // By value: the shape's describer is kept for warm_buckets (the scale pointers only need to be set).
  auto describe = [N = N, K = K, y_int = y_int, bias_int = bias_int, scaling_int = scaling_int, x_scale,
                   w_scale](Plan& p, int64_t rows) {
    describe_fp8(p, rows, N, K, static_cast<DataType>(y_int), bias_int, static_cast<Fp8Scaling>(scaling_int), x_scale,
                 w_scale);
  };
  auto p = std::make_unique<Plan>();
  describe(*p, T);
  RTLLM_CHECK(choose_algo(*p, T, {1, N, K, y_int, bias_int, scaling_int}, describe),
              "cuBLASLt has no FP8 algorithm for fp8_linear x [", T, ", ", K, "] · W [", N, ", ", K,
              "]ᵀ with output ", dtype_safetensors_name(static_cast<DataType>(y_int)),
              bias_int >= 0 ? " and a bias" : "", " (scaling ", scaling_int, ")");
  return *fp8_plans_.emplace(key, std::move(p)).first->second;
}

void CublasLtGemm::fp8_linear(void* y, const void* q, const void* w, const float* x_scale, const float* w_scale,
                              Fp8Scaling scaling, const void* bias, int64_t T, int64_t N, int64_t K,
                              DataType bias_dtype, DataType y_dtype, cudaStream_t stream) {
  for (const void* ptr : {static_cast<const void*>(y), q, w, bias})
    RTLLM_CHECK(reinterpret_cast<uintptr_t>(ptr) % kMinAlignment == 0, "cuBLASLt fp8_linear: operand ", ptr,
                " is not ", kMinAlignment, "-byte aligned");
  RTLLM_CHECK(K % 16 == 0, "cuBLASLt fp8_linear: K = ", K, " is not a multiple of 16");
  RTLLM_CHECK(scaling != Fp8Scaling::kNone || y_dtype == DataType::kFloat32,
              "cuBLASLt fp8_linear: unscaled output must be float32");
  Plan& p = fp8_plan(Fp8Key{T, N, K, static_cast<int>(y_dtype), bias ? static_cast<int>(bias_dtype) : -1,
                            static_cast<int>(scaling)},
                     x_scale, w_scale);
  if (bias) set_attr(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  if (scaling != Fp8Scaling::kNone) {
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w_scale);
    set_attr(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, x_scale);
  }
  const float alpha = 1.0f, beta = 0.0f;
  RTLLM_CUBLAS_CHECK(cublasLtMatmul(handle_, p.desc, &alpha, w, p.a, q, p.b, &beta, y, p.d, y, p.d, &p.algo,
                                    workspace_, workspace_bytes_, stream));
}

void CublasLtGemm::int8_gemm(int32_t* acc, const int8_t* q, const int8_t* w, int64_t T, int64_t N, int64_t K,
                             cudaStream_t stream) {
  for (const void* ptr : {static_cast<const void*>(acc), static_cast<const void*>(q), static_cast<const void*>(w)})
    RTLLM_CHECK(reinterpret_cast<uintptr_t>(ptr) % kMinAlignment == 0, "cuBLASLt int8_gemm: operand ", ptr,
                " is not ", kMinAlignment, "-byte aligned");
  RTLLM_CHECK(K % 16 == 0, "cuBLASLt int8_gemm: K = ", K, " is not a multiple of 16");
  const Int8Key key{T, N, K};
  auto it = int8_plans_.find(key);
  if (it == int8_plans_.end()) {
    auto describe = [N, K](Plan& p, int64_t rows) { describe_int8(p, rows, N, K); };
    auto p = std::make_unique<Plan>();
    describe(*p, T);
    RTLLM_CHECK(choose_algo(*p, T, {2, N, K, 0, 0, 0}, describe), "cuBLASLt has no int8 algorithm for int8_linear x [",
                T, ", ", K, "] · W [", N, ", ", K, "]ᵀ with int32 output");
    it = int8_plans_.emplace(key, std::move(p)).first;
  }
  Plan& p = *it->second;
  const int32_t alpha = 1, beta = 0;
  RTLLM_CUBLAS_CHECK(cublasLtMatmul(handle_, p.desc, &alpha, w, p.a, q, p.b, &beta, acc, p.d, acc, p.d, &p.algo,
                                    workspace_, workspace_bytes_, stream));
}

bool CublasLtGemm::fp8_scaled_gemm_supported(Fp8Scaling scaling, DataType y_dtype, bool has_bias,
                                             DataType bias_dtype) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, bool> known;
  const std::tuple<int, int, int> key{static_cast<int>(scaling), static_cast<int>(y_dtype),
                                      has_bias ? static_cast<int>(bias_dtype) : -1};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  constexpr int64_t kProbeSize = 256;  // T = N = K of the probe shape
  cublasLtHandle_t handle = nullptr;
  RTLLM_CUBLAS_CHECK(cublasLtCreate(&handle));
  float* scales = nullptr;  // x_scale then w_scale, as long as the probe's outer-vector mode reads them
  bool supported = false;
  try {
    RTLLM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&scales), 2 * kProbeSize * sizeof(float)));
    Plan p;
    describe_fp8(p, kProbeSize, kProbeSize, kProbeSize, y_dtype, std::get<2>(key), scaling, scales,
                 scales + kProbeSize);
    supported = find_algo(handle, p, kProbeWorkspaceBytes);
  } catch (const Error&) {
    supported = false;  // e.g. a scale mode this cuBLASLt does not know
  }
  if (scales) cudaFree(scales);
  cublasLtDestroy(handle);
  return known[key] = supported;
}

}  // namespace rtllm
