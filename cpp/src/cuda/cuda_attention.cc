// The attention op on CUDA (docs/engine_format.md, "attention"). qkv_prepare applies qk-norm and RoPE,
// writes q to the runner's q buffer and k, v into the layer's paged pool; then attention_decode for
// decode-only steps (one new token per sequence, split-KV) or attention_prefill for any other step (it
// handles the generation tokens of mixed steps too). Small decode batches instead run
// attention_decode_qkv, which does qkv_prepare's work inside the attention kernel.
#include <cmath>

#include "cuda/cuda_context.h"
#include "op_registry.h"
#include "rtllm/kernels/attention.cuh"
#include "rtllm/kernels/kv_cache.cuh"

namespace rtllm {
namespace {

struct AttentionAttrs {
  int32_t layer_idx, num_heads, num_kv_heads, head_dim;
  float scale;
  bool fused_qkv, rope, qk_norm;
  float qk_norm_eps;
};

AttentionAttrs parse_attrs(const Json& a) {
  AttentionAttrs p;
  p.layer_idx = static_cast<int32_t>(a.at("layer_idx").as_int());
  p.num_heads = static_cast<int32_t>(a.at("num_heads").as_int());
  p.num_kv_heads = static_cast<int32_t>(a.at("num_kv_heads").as_int());
  p.head_dim = static_cast<int32_t>(a.at("head_dim").as_int());
  p.scale = static_cast<float>(a.get_double("scale", 1.0 / std::sqrt(static_cast<double>(p.head_dim))));
  p.fused_qkv = a.get_bool("fused_qkv", false);
  p.rope = a.get_bool("rope", false);
  p.qk_norm = a.get_bool("qk_norm", false);
  p.qk_norm_eps = static_cast<float>(a.get_double("qk_norm_eps", 1e-6));
  return p;
}

void check_launch(const char* what, cudaError_t err) {
  RTLLM_CHECK(err == cudaSuccess, "attention: ", what, " failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

void attention_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  const AttentionAttrs p = parse_attrs(*ctx.attrs);
  const int num_qkv = p.fused_qkv ? 1 : 3;
  const int expected = num_qkv + (p.rope ? 2 : 0) + (p.qk_norm ? 2 : 0);
  check_num_io("attention", num_in, expected, expected, num_out, 1);
  const CudaStep& st = *static_cast<const CudaStep*>(ctx.device_step);
  auto stream = static_cast<cudaStream_t>(ctx.stream);
  const int64_t nh = p.num_heads, nkv = p.num_kv_heads, hd = p.head_dim, T = st.meta.num_tokens;
  RTLLM_CHECK(nh > 0 && nkv > 0 && nh % nkv == 0, "attention: num_heads ", nh, " is not a multiple of num_kv_heads ",
              nkv);
  RTLLM_CHECK(p.layer_idx >= 0 && p.layer_idx < st.num_layers, "attention: layer_idx ", p.layer_idx,
              " outside [0, ", st.num_layers, ")");
  const DataType dtype = st.compute_dtype;
  for (int i = 0; i < num_qkv; ++i)
    RTLLM_CHECK(in[i].dtype == dtype && in[i].rows() == T, "attention: input ", i, " must be ",
                dtype_safetensors_name(dtype), " with ", T, " rows");
  RTLLM_CHECK(out[0].dtype == dtype && out[0].rows() == T && out[0].cols() == nh * hd, "attention: output [",
              out[0].rows(), ", ", out[0].cols(), "], expected [", T, ", ", nh * hd, "]");
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
      RTLLM_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<uint8_t*>(st.attn_qkv) + col * elem, qkv_cols * elem,
                                         in[i].data, cols * elem, cols * elem, T, cudaMemcpyDeviceToDevice, stream));
      col += cols;
    }
    qkv = st.attn_qkv;
  }
  const float* inv_freq = nullptr;
  if (p.rope) {
    const TensorView& f = in[num_qkv + 1];
    RTLLM_CHECK(in[num_qkv].dtype == DataType::kInt32 && f.dtype == DataType::kFloat32 && f.numel() == hd / 2,
                "attention: rope inputs must be int32 positions and F32 inv_freq [", hd / 2, "]");
    inv_freq = f.f32();  // positions come from the runner's step metadata (the same values)
  }
  const void *q_norm = nullptr, *k_norm = nullptr;
  if (p.qk_norm) {
    const int base = num_qkv + (p.rope ? 2 : 0);
    RTLLM_CHECK(in[base].dtype == dtype && in[base + 1].dtype == dtype && in[base].numel() == hd &&
                    in[base + 1].numel() == hd,
                "attention: q/k norm weights must be ", dtype_safetensors_name(dtype), " [", hd, "]");
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
  const kernels::DType kd = kernel_dtype(dtype);
  // Small decode batches (split-KV: latency-bound) fold the preparation into the attention kernel and save a
  // kernel per layer; at large batches the separate, fully parallel qkv_prepare is faster (H100, Llama-3-8B,
  // batch 512: decode step 1% longer fused).
  if (st.decode_only && st.decode_splits > 1) {
    check_launch("attention_decode_qkv",
                 kernels::attention_decode_qkv(out[0].data, qkv, qkv_cols, 0, nh * hd, (nh + nkv) * hd, inv_freq,
                                               q_norm, k_norm, p.qk_norm_eps, st.meta, kv, p.num_heads,
                                               p.num_kv_heads, p.head_dim, p.scale, st.decode_splits,
                                               st.decode_workspace, kd, stream));
    return;
  }
  check_launch("qkv_prepare",
               kernels::qkv_prepare(st.attn_q, qkv, qkv_cols, 0, nh * hd, (nh + nkv) * hd, inv_freq, q_norm, k_norm,
                                    p.qk_norm_eps, st.meta, kv, p.num_heads, p.num_kv_heads, p.head_dim, kd, stream));
  if (st.decode_only) {
    check_launch("attention_decode",
                 kernels::attention_decode(out[0].data, st.attn_q, st.meta, kv, p.num_heads, p.num_kv_heads,
                                           p.head_dim, p.scale, st.decode_splits, st.decode_workspace, kd, stream));
  } else {
    check_launch("attention_prefill",
                 kernels::attention_prefill(out[0].data, st.attn_q, st.meta, kv, st.max_new_tokens, p.num_heads,
                                            p.num_kv_heads, p.head_dim, p.scale, kd, stream));
  }
}

}  // namespace

void register_cuda_attention_op() { register_op("attention", DeviceKind::kCuda, attention_op); }

}  // namespace rtllm
