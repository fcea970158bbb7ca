// The attention op on CUDA (docs/engine_format.md, "attention"). qkv_prepare applies qk-norm and RoPE,
// writes q to the runner's q buffer and k, v into the layer's paged pool; then attention_decode for
// decode-only steps (one new token per sequence, split-KV) or attention_prefill for any other step (it
// handles the generation tokens of mixed steps too). Small decode batches instead run
// attention_decode_qkv, which does qkv_prepare's work inside the attention kernel.
#include <algorithm>
#include <cmath>

#include "attention_attrs.h"
#include "cuda/cuda_context.h"
#include "op_registry.h"
#include "rtllm/kernels/attention.cuh"
#include "rtllm/kernels/kv_cache.cuh"
#include "workspace.h"

namespace rtllm {
namespace {

void check_launch(const char* what, cudaError_t err) {
  RTLLM_CHECK(err == cudaSuccess, "attention: ", what, " failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

// Workspace: [q after qkv_prepare: max_num_tokens x nh·hd | q, k, v side by side when unfused:
// max_num_tokens x (nh + 2·nkv)·hd | split-KV decode partials], each part 256-byte aligned.
class Attention final : public OpKind {
 public:
  explicit Attention(const OpSpec& spec) : OpKind(spec), p(spec), dtype_(spec.backend->activation_dtype) {
    const BackendInfo& b = *spec.backend;
    RTLLM_CHECK(b.kv_cache_dtype == dtype_ || b.kv_cache_dtype == DataType::kFloat8E4M3 ||
                    b.kv_cache_dtype == DataType::kInt8,
                "op \"attention\" on the CUDA backend does not support KV cache dtype ",
                dtype_safetensors_name(b.kv_cache_dtype), " with ", dtype_safetensors_name(dtype_),
                " activations; supported: ", dtype_safetensors_name(dtype_), ", F8_E4M3, I8");
    // The decode and preparation kernels are built per head_dim (RTLLM_DISPATCH_HEAD_DIM in
    // kernels/src/dispatch.cuh); refuse any other at load rather than at the first step.
    RTLLM_CHECK(p.head_dim == 16 || p.head_dim == 32 || p.head_dim == 64 || p.head_dim == 80 || p.head_dim == 96 ||
                    p.head_dim == 128 || p.head_dim == 256,
                "op \"attention\" on the CUDA backend does not support head_dim ", p.head_dim,
                "; supported: 16, 32, 64, 80, 96, 128, 256");
    const size_t elem = dtype_size(dtype_);
    const int64_t max_tokens = b.max_num_tokens, nh = p.num_heads, nkv = p.num_kv_heads, hd = p.head_dim;
    int32_t max_splits = 1;
    for (int32_t r = 1; r <= b.max_batch_size; ++r)
      max_splits = std::max(max_splits, kernels::attention_decode_plan(r, p.num_kv_heads, p.head_dim, b.max_seq_len,
                                                                       b.num_sms, kernel_dtype(b.kv_cache_dtype))
                                            .num_splits);
    q_bytes_ = round_up(max_tokens * nh * hd * elem, kAlign);
    qkv_bytes_ = p.fused_qkv ? 0 : round_up(max_tokens * (nh + 2 * nkv) * hd * elem, kAlign);
    decode_bytes_ = kernels::attention_decode_workspace_bytes(b.max_batch_size, p.num_heads, p.head_dim, max_splits);
  }
  // q/k norm weights in the compute dtype; inv_freq stays float32 as stored.
  WeightPlacement weight_placement(size_t input) const override {
    return p.is_norm_weight(input) ? in_activation_dtype() : OpKind::weight_placement(input);
  }
  size_t workspace_bytes() const override { return q_bytes_ + qkv_bytes_ + decode_bytes_; }
  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override;

 private:
  static constexpr size_t kAlign = 256;
  const AttentionAttrs p;
  const DataType dtype_;
  size_t q_bytes_ = 0, qkv_bytes_ = 0, decode_bytes_ = 0;
};

void Attention::run(const OpContext& ctx, const TensorView* in, TensorView* out) {
  const int num_qkv = p.num_qkv();
  const CudaStep& st = *static_cast<const CudaStep*>(ctx.device_step);
  auto stream = static_cast<cudaStream_t>(ctx.stream);
  const int64_t nh = p.num_heads, nkv = p.num_kv_heads, hd = p.head_dim, T = st.meta.num_tokens;
  const DataType dtype = dtype_;
  auto* workspace = static_cast<uint8_t*>(ctx.workspace);
  void* attn_q = workspace;
  void* attn_qkv = workspace + q_bytes_;
  float* decode_workspace = reinterpret_cast<float*>(workspace + q_bytes_ + qkv_bytes_);
  for (int i = 0; i < num_qkv; ++i)
    RTLLM_CHECK(in[i].rows() == T, "attention: input ", i, " has ", in[i].rows(), " rows, the step ", T, " tokens");
  RTLLM_CHECK(out[0].rows() == T && out[0].cols() == nh * hd, "attention: output [", out[0].rows(), ", ",
              out[0].cols(), "], expected [", T, ", ", nh * hd, "]");
  const size_t elem = dtype_size(dtype);
  const int64_t qkv_cols = (nh + 2 * nkv) * hd;

  // One matrix with q, k, v columns side by side: the fused input, or the three unfused ones copied.
  const void* qkv = in[0].data;
  if (p.fused_qkv) {
    RTLLM_CHECK(in[0].cols() == qkv_cols, "attention: qkv has ", in[0].cols(), " columns, expected ", qkv_cols);
  } else {
    RTLLM_CHECK(in[0].cols() == nh * hd && in[1].cols() == nkv * hd && in[2].cols() == nkv * hd,
                "attention: q, k, v shapes do not match ", nh, "/", nkv, " heads of ", hd);
    int64_t col = 0;
    for (int i = 0; i < 3; ++i) {
      const int64_t cols = in[i].cols();
      RTLLM_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<uint8_t*>(attn_qkv) + col * elem, qkv_cols * elem,
                                         in[i].data, cols * elem, cols * elem, T, cudaMemcpyDeviceToDevice, stream));
      col += cols;
    }
    qkv = attn_qkv;
  }
  const float* inv_freq = nullptr;
  if (p.rope) {
    const TensorView& f = in[p.inv_freq_input()];
    RTLLM_CHECK(f.numel() == hd / 2, "attention: inv_freq has ", f.numel(), " values, expected ", hd / 2);
    inv_freq = f.f32();  // positions come from the runner's step metadata (the same values)
  }
  const void *q_norm = nullptr, *k_norm = nullptr;
  if (p.qk_norm) {
    const int base = p.q_norm_input();
    RTLLM_CHECK(in[base].numel() == hd && in[base + 1].numel() == hd, "attention: q/k norm weights must have ", hd,
                " values");
    q_norm = in[base].data;
    k_norm = in[base + 1].data;
  }

  kernels::PagedKv kv;
  kv.data = st.kv_layers[p.layer_idx];
  kv.num_blocks = st.num_kv_blocks;
  kv.num_kv_heads = static_cast<int32_t>(nkv);
  kv.tokens_per_block = st.tokens_per_block;
  kv.head_dim = static_cast<int32_t>(hd);
  kv.block_table = st.block_table;
  kv.max_blocks_per_seq = st.max_blocks_per_seq;
  kv.dtype = kernel_dtype(st.kv_cache_dtype);
  kv.k_scale = p.k_scale;  // read by the kernels only for an F8_E4M3 or I8 pool
  kv.v_scale = p.v_scale;
  const kernels::DType kd = kernel_dtype(dtype);
  // Small decode batches (split-KV: latency-bound) fold the preparation into the attention kernel and save a
  // kernel per layer, unless the plan's unfused kernel is faster (an FP8 pool on tensor cores); at large batches
  // the separate, fully parallel qkv_prepare is faster (docs/performance.md, "Design decisions and their
  // measurements").
  if (st.decode_only && st.decode_fuse_prepare) {
    check_launch("attention_decode_qkv",
                 kernels::attention_decode_qkv(out[0].data, qkv, qkv_cols, 0, nh * hd, (nh + nkv) * hd, inv_freq,
                                               q_norm, k_norm, p.qk_norm_eps, st.meta, kv, p.num_heads,
                                               p.num_kv_heads, p.head_dim, p.scale, st.decode_splits,
                                               decode_workspace, kd, stream));
    return;
  }
  check_launch("qkv_prepare",
               kernels::qkv_prepare(attn_q, qkv, qkv_cols, 0, nh * hd, (nh + nkv) * hd, inv_freq, q_norm, k_norm,
                                    p.qk_norm_eps, st.meta, kv, p.num_heads, p.num_kv_heads, p.head_dim, kd, stream));
  if (st.decode_only) {
    check_launch("attention_decode",
                 kernels::attention_decode(out[0].data, attn_q, st.meta, kv, p.num_heads, p.num_kv_heads,
                                           p.head_dim, p.scale, st.decode_splits, decode_workspace, kd, stream));
  } else {
    check_launch("attention_prefill",
                 kernels::attention_prefill(out[0].data, attn_q, st.meta, kv, st.max_new_tokens, p.num_heads,
                                            p.num_kv_heads, p.head_dim, p.scale, kd, stream));
  }
}

}  // namespace

void register_cuda_attention_op() { register_op("attention", DeviceKind::kCuda, make_op<Attention>); }

}  // namespace rtllm
