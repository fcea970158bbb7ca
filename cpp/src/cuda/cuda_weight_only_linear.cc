// weight_only_linear on CUDA (docs/engine_format.md): y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]) with int8 or
// packed int4 codes, W = q · scale[n, k / G] + offset[n, k / G].
//
// The codes are uploaded as stored (row-major [N, K], int4 two per byte), int4 codes of the GEMV's shapes
// then re-laid for its MMAs (WeightLayout::kCudaInt4Mma); scale, offset and bias are placed in the compute
// dtype (bf16, or fp16 for fp16 engines). The weight is used as W = fma(q, scale, offset) rounded once to
// that dtype, except by the int4 GEMV for groups of whole 128-code steps, which scales float32 sums of the
// codes (kernels/include/rtllm/kernels/weight_only.cuh).
//   T <= kMaxGemvRows (decode batches): the tensor-core GEMV over the codes (kernels/src/weight_only.cu), bound by
//     reading the packed bytes once;
//   up to kMaxHopperGemmRows with int4 codes on compute capability 9.0 (K a multiple of 128, groups of whole
//     32-code vectors): rtllm's Hopper GEMM (kernels/src/weight_only_gemm.cu), the codes dequantized in registers
//     as the A operand of wgmma, with the same weights as below; its workspace holds the activations
//     re-ordered for the MMAs (T · K values) instead of the dequantized weight;
//   otherwise for larger T (prefill), or a shape the GEMV does not take (K or the group size not a multiple of a lane's
//     16-byte load: 16 int8 or 32 int4 codes): the weight dequantized into the workspace (sized at load:
//     N · K values of the compute dtype, and float32 rows for a bias), then cuBLASLt's GEMM. Both paths
//     round y once from float32 (the bias added in float32). Where cuBLASLt cannot take the rows of y (not
//     16-byte aligned: an odd vocabulary's LM head), the GEMV instead, when it takes the shape.
// Everything a step does is kernel launches on the runner's stream over fixed buffers: capturable in a
// CUDA graph.
#include <algorithm>
#include <string>

#include "cuda/cublaslt_gemm.h"
#include "cuda/cuda_context.h"
#include "op_registry.h"
#include "weight_only_linear_spec.h"
#include "rtllm/kernels/weight_only.cuh"

namespace rtllm {
namespace {

// Up to kMaxGemvRows rows go to the GEMV, more to the dequantized GEMM. The GEMV reads a weight tile once
// per 16 rows (the rereads mostly from L2); the GEMM path moves about 9x a GEMV pass's bytes for int4
// (codes read, bf16 weight written and read again) before its own time, so the GEMV should stay ahead up
// to a few passes. To be confirmed against benchmarks/bench_weight_only.py's crossover rows.
constexpr int64_t kMaxGemvRows = 64;
// Above the GEMV, up to this many rows go to rtllm's Hopper int4 GEMM, more to dequantize + cuBLASLt: on an
// H100 (benchmarks/bench_weight_only.py --only gemm, Llama-3-8B shapes, g128) the Hopper GEMM ran 1.07-3.9x
// the dequantize + cuBLASLt path at 128-512 rows, 0.84-1.02x at 1,024 and 0.56-0.72x at 4,096, where
// cuBLASLt's bf16 GEMM amortizes the dequantization.
constexpr int64_t kMaxHopperGemmRows = 512;
constexpr size_t kAlign = 256;
constexpr int64_t kMaxRows = 16 * 65535;  // N: the GEMV's grid rows of 16 weight rows

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

enum class WoqPath { kAuto = 0, kGemv = 1, kGemm = 2, kHopperGemm = 3 };

// With a bias, the GEMM path has cuBLASLt write float32 accumulators and adds the bias itself, rounding once
// as the GEMV does: cuBLASLt's bias epilogue takes only a bias of the output type (so not the placed 16-bit
// bias with float32 logits), and with a 16-bit output some of its kernels round the product to that type
// before adding the bias (an error of the product's size when bias and product cancel). 16-bit outputs go
// through a float32 scratch of up to kBiasChunkRows rows, one GEMM per chunk (each reads the dequantized
// weight again: 8 passes for 8192 tokens).
constexpr int64_t kBiasChunkRows = 1024;

size_t dequantized_bytes(int64_t N, int64_t K) { return align_up(sizeof(uint16_t) * static_cast<size_t>(N) * K); }

// The dequantized weight [N, K] in the compute dtype (16-bit), then float32 accumulators for scratch_rows
// rows (0 without a bias; at most kBiasChunkRows).
size_t woq_workspace_bytes(int64_t N, int64_t K, int64_t scratch_rows) {
  return dequantized_bytes(N, K) + align_up(sizeof(float) * static_cast<size_t>(N) * scratch_rows);
}

void check_launch(cudaError_t err) {
  RTLLM_CHECK(err == cudaSuccess, "op weight_only_linear: kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

// One weight_only_linear call on device pointers; shared by the op kind and the test hook below. scale,
// offset (may be null) and bias (may be null) in x_dtype.
struct WoqCall {
  void* y = nullptr;
  const void* x = nullptr;
  const void* codes = nullptr;
  const void* scale = nullptr;
  const void* offset = nullptr;
  const void* bias = nullptr;
  int64_t T = 0, N = 0, K = 0, group_size = 0;
  bool int4 = false;
  DataType x_dtype = DataType::kBFloat16;
  DataType y_dtype = DataType::kBFloat16;
  int32_t gemv_k_splits = 0;  // 0: the GEMV's own choice (tests and benchmarks try the others)
  bool hopper_gemm = false;   // the device and shape take rtllm's Hopper int4 GEMM (kernels::woq_gemm_int4_supported)
};

// Whether the current device is of compute capability 9.0 and the int4 GEMM takes [*, K] with this group size.
bool hopper_gemm_supported(int64_t K, int64_t group_size) {
  const ComputeCapability cc = current_compute_capability();
  return kernels::woq_gemm_int4_supported(cc.major, cc.minor, K, group_size);
}

void run_woq_linear(const WoqCall& c, CublasLtGemm& gemm, void* workspace, WoqPath path, cudaStream_t stream) {
  if (c.T == 0) return;
  const kernels::DType x_kind = kernel_dtype(c.x_dtype), y_kind = kernel_dtype(c.y_dtype);
  const bool gemv_ok = kernels::woq_gemv_supported(c.K, c.group_size, c.int4);
  // Above the Hopper GEMM's rows, rows of y that cuBLASLt cannot take (not 16-byte aligned: an odd
  // vocabulary's LM head) go to the GEMV too, which takes any N and any T.
  const bool hopper = path == WoqPath::kHopperGemm ||
                      (path == WoqPath::kAuto && c.int4 && c.hopper_gemm && c.T <= kMaxHopperGemmRows);
  const bool gemm_rows_ok = CublasLtGemm::linear_rows_aligned(c.N, c.K, c.x_dtype, c.y_dtype);
  const bool gemv = path == WoqPath::kGemv ||
                    (path == WoqPath::kAuto && gemv_ok && (c.T <= kMaxGemvRows || (!hopper && !gemm_rows_ok)));
  const auto n = static_cast<int32_t>(c.N), k = static_cast<int32_t>(c.K), g = static_cast<int32_t>(c.group_size);
  RTLLM_CHECK(c.y_dtype == c.x_dtype || c.y_dtype == DataType::kFloat32, "weight_only_linear: output dtype ",
              dtype_safetensors_name(c.y_dtype), " with activations in ", dtype_safetensors_name(c.x_dtype),
              "; the output must be in the activations' dtype or F32");
  if (gemv) {
    RTLLM_CHECK(gemv_ok, "weight_only_linear: the GEMV does not take K = ", c.K, " with group_size ", c.group_size,
                " (", c.int4 ? "I4" : "I8", "; both must be multiples of ", c.int4 ? 32 : 16, ")");
    check_launch(kernels::woq_gemv(c.y, c.x, c.codes, c.scale, c.offset, c.bias, static_cast<int32_t>(c.T), n, k, g,
                                   c.int4, x_kind, y_kind, stream, c.gemv_k_splits));
    return;
  }
  if (hopper) {
    // (path 3 comes only from the test hook, which refuses it where c.hopper_gemm is false)
    check_launch(kernels::woq_gemm_int4(c.y, c.x, workspace, c.codes, c.scale, c.offset, c.bias,
                                        static_cast<int32_t>(c.T), n, k, g, x_kind, y_kind, stream));
    return;
  }
  check_launch(kernels::woq_dequantize(workspace, c.codes, c.scale, c.offset, n, k, g, c.int4, x_kind, stream));
  if (!c.bias) {
    gemm.linear(c.y, c.x, workspace, nullptr, c.T, c.N, c.K, c.x_dtype, c.y_dtype, stream);
    return;
  }
  // The bias after the GEMM, on its float32 result (see kBiasChunkRows).
  if (c.y_dtype == DataType::kFloat32) {
    gemm.linear(c.y, c.x, workspace, nullptr, c.T, c.N, c.K, c.x_dtype, DataType::kFloat32, stream);
    check_launch(kernels::woq_add_bias(c.y, static_cast<const float*>(c.y), c.bias, static_cast<int32_t>(c.T), n,
                                       x_kind, y_kind, stream));
    return;
  }
  float* acc = reinterpret_cast<float*>(static_cast<char*>(workspace) + dequantized_bytes(c.N, c.K));
  const size_t elt = dtype_size(c.x_dtype);  // x and y: 16-bit
  for (int64_t r0 = 0; r0 < c.T; r0 += kBiasChunkRows) {
    const int64_t rows = std::min(kBiasChunkRows, c.T - r0);
    gemm.linear(acc, static_cast<const char*>(c.x) + r0 * c.K * elt, workspace, nullptr, rows, c.N, c.K, c.x_dtype,
                DataType::kFloat32, stream);
    check_launch(kernels::woq_add_bias(static_cast<char*>(c.y) + r0 * c.N * elt, acc, c.bias,
                                       static_cast<int32_t>(rows), n, x_kind, y_kind, stream));
  }
}

// Inputs: x [T, K] (compute dtype), weight [N, K] I8 or I4 (as stored), scale [N, K / G] and, with
// has_offset, offset [N, K / G], then the optional bias [N]: these three placed in the compute dtype.
class CudaWeightOnlyLinear final : public OpKind {
 public:
  explicit CudaWeightOnlyLinear(const OpSpec& spec) : OpKind(spec), s_(WeightOnlyShape::parse(spec)) {
    RTLLM_CHECK(s_.N <= kMaxRows && s_.K <= INT32_MAX, "weight_only_linear: weight \"", spec.inputs[1].name,
                "\" has shape [", s_.N, ", ", s_.K, "]; the CUDA backend takes 1 .. ", kMaxRows,
                " rows and 1 .. 2^31 - 1 columns");
    // The dequantized weight is needed when some step takes the dequantize + GEMM path; the Hopper int4
    // GEMM needs only the re-ordered activations.
    gemv_ok_ = kernels::woq_gemv_supported(s_.K, s_.group_size, s_.int4);
    hopper_gemm_ = s_.int4 && hopper_gemm_supported(s_.K, s_.group_size);
    const int64_t max_gemv_rows = gemv_ok_ ? kMaxGemvRows : 0;
    needs_dequantized_ = s_.max_rows > (hopper_gemm_ ? kMaxHopperGemmRows : max_gemv_rows);
  }

  WeightPlacement weight_placement(size_t input) const override {
    if (input >= 2) return in_activation_dtype();  // scale, offset, bias
    if (input == 1 && s_.int4 && gemv_ok_) return {DataType::kInt4, WeightLayout::kCudaInt4Mma};
    return OpKind::weight_placement(input);  // the codes as stored
  }

  size_t workspace_bytes() const override {
    const size_t hopper = hopper_gemm_ && s_.max_rows > kMaxGemvRows
                              ? kernels::woq_gemm_int4_workspace_bytes(std::min(s_.max_rows, kMaxHopperGemmRows), s_.K)
                              : 0;
    if (!needs_dequantized_) return hopper;
    return std::max(hopper, woq_workspace_bytes(s_.N, s_.K, s_.has_bias ? std::min(s_.max_rows, kBiasChunkRows) : 0));
  }

  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override {
    const TensorView &x = in[0], &w = in[1], &y = out[0];
    WoqCall c;
    c.T = x.rows();
    c.K = x.cols();
    c.N = y.cols();
    RTLLM_CHECK(y.rows() == c.T, "weight_only_linear: output has ", y.rows(), " rows, x has ", c.T);
    RTLLM_CHECK(c.K == s_.K && c.N == s_.N && w.ndim == 2 && w.shape[0] == c.N && w.shape[1] == c.K,
                "weight_only_linear: weight [", w.shape[0], ", ", w.shape[1], "] does not match x with ", c.K,
                " columns and ", c.N, " outputs");
    RTLLM_CHECK(c.T <= s_.max_rows, "weight_only_linear: x has ", c.T, " rows, more than the ", s_.max_rows,
                " planned at load");
    const size_t num_fixed = s_.has_offset ? 4 : 3;
    c.y = y.data;
    c.x = x.data;
    c.codes = w.data;
    c.scale = in[2].data;
    c.offset = s_.has_offset ? in[3].data : nullptr;
    c.bias = s_.has_bias ? in[num_fixed].data : nullptr;
    c.group_size = s_.group_size;
    c.int4 = s_.int4;
    c.x_dtype = x.dtype;
    c.y_dtype = y.dtype;
    c.hopper_gemm = hopper_gemm_;
    const CudaStep& step = *static_cast<const CudaStep*>(ctx.device_step);
    run_woq_linear(c, *step.gemm, ctx.workspace, WoqPath::kAuto, static_cast<cudaStream_t>(ctx.stream));
  }

 private:
  const WeightOnlyShape s_;
  bool needs_dequantized_ = false, hopper_gemm_ = false;
  bool gemv_ok_ = false;  // the GEMV takes the weight's shape (and int4 codes are then in the MMA layout)
};

}  // namespace

void register_cuda_weight_only_linear_op() {
  register_op("weight_only_linear", DeviceKind::kCuda, make_op<CudaWeightOnlyLinear>);
}

// Test and benchmark hooks (rtllm._core.kernels.weight_only_linear): one weight_only_linear on device
// pointers through the op's code paths, with its own cuBLASLt instance. codes, scale, offset and bias as
// the op places them: int4 codes of the GEMV's shapes in the MMA layout (weight_only_pack_int4), the
// others in x_dtype. path: 0 as the op chooses, 1 the GEMV, 2 dequantize + GEMM, 3 the Hopper int4 GEMM;
// workspace of weight_only_linear_workspace_bytes() for T rows (needed by paths 2 and 3, and by path 0 when it
// takes either).
RTLLM_API size_t weight_only_linear_workspace_bytes(int64_t N, int64_t K, int64_t T) {
  return std::max(woq_workspace_bytes(N, K, kBiasChunkRows), kernels::woq_gemm_int4_workspace_bytes(T, K));
}

RTLLM_API bool weight_only_gemv_supported(int64_t K, int64_t group_size, bool int4) {
  return kernels::woq_gemv_supported(K, group_size, int4);
}

// The engine's int4 codes -> the MMA layout in place, as the op's placement does (num_bytes a multiple of 4).
RTLLM_API void weight_only_pack_int4(void* codes, int64_t num_bytes, void* stream) {
  RTLLM_CHECK_ARG(num_bytes >= 0 && num_bytes % 4 == 0, "weight_only_pack_int4: num_bytes ", num_bytes,
                  " is not a multiple of 4");
  check_launch(kernels::woq_pack_int4(codes, num_bytes, static_cast<cudaStream_t>(stream)));
}

RTLLM_API int32_t weight_only_gemv_k_splits(int64_t N, int64_t K) {
  return kernels::woq_gemv_k_splits(static_cast<int32_t>(N), static_cast<int32_t>(K));
}

RTLLM_API void weight_only_linear_for_tests(void* y, const void* x, const void* codes, const void* scale,
                                            const void* offset, const void* bias, int64_t T, int64_t N, int64_t K,
                                            int64_t group_size, bool int4, DataType x_dtype, DataType y_dtype,
                                            int path, int gemv_k_splits, void* workspace, void* stream) {
  RTLLM_CHECK_ARG(path >= 0 && path <= 3, "weight_only_linear: path ", path, " is not 0, 1, 2 or 3");
  RTLLM_CHECK_ARG(gemv_k_splits == 0 || gemv_k_splits == 1 || gemv_k_splits == 2 || gemv_k_splits == 4 ||
                      gemv_k_splits == 8,
                  "weight_only_linear: gemv_k_splits ", gemv_k_splits, " is not 0 (auto), 1, 2, 4 or 8");
  RTLLM_CHECK_ARG(T >= 0 && T <= INT32_MAX && N > 0 && N <= kMaxRows && K > 0 && K <= INT32_MAX,
                  "weight_only_linear: T = ", T, ", N = ", N, ", K = ", K, " out of range (N in 1 .. ", kMaxRows,
                  ", K in 1 .. 2^31 - 1)");
  RTLLM_CHECK_ARG(group_size > 0 && K % group_size == 0, "weight_only_linear: group_size ", group_size,
                  " is not a positive divisor of K = ", K);
  RTLLM_CHECK_ARG(!int4 || group_size % 2 == 0, "weight_only_linear: I4 needs an even group_size, got ", group_size);
  RTLLM_CHECK_ARG(path != static_cast<int>(WoqPath::kGemv) || kernels::woq_gemv_supported(K, group_size, int4),
                  "weight_only_linear: the GEMV does not take K = ", K, " with group_size ", group_size);
  // Kept for the process (never destroyed: the CUDA context may be gone at exit).
  static CublasLtGemm* gemm = new CublasLtGemm(32u << 20);
  WoqCall c;
  c.y = y;
  c.x = x;
  c.codes = codes;
  c.scale = scale;
  c.offset = offset;
  c.bias = bias;
  c.T = T;
  c.N = N;
  c.K = K;
  c.group_size = group_size;
  c.int4 = int4;
  c.x_dtype = x_dtype;
  c.y_dtype = y_dtype;
  c.gemv_k_splits = gemv_k_splits;
  c.hopper_gemm = int4 && hopper_gemm_supported(K, group_size);
  RTLLM_CHECK_ARG(c.hopper_gemm || path != static_cast<int>(WoqPath::kHopperGemm),
                  "weight_only_linear: the Hopper int4 GEMM does not take K = ", K, " with group_size ", group_size,
                  (int4 ? "" : " (I8 codes)"), " on this device (it needs I4 codes, K a multiple of 128, groups of a "
                  "multiple of 32 codes and compute capability 9.0)");
  run_woq_linear(c, *gemm, workspace, static_cast<WoqPath>(path), static_cast<cudaStream_t>(stream));
}

}  // namespace rtllm
