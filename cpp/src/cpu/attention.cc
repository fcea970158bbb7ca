// attention over the paged KV cache (docs/engine_format.md, "attention").
//
// Phase 1, per token: q heads get qk_norm then RoPE and are written to the output rows (used as the
// q buffer); k heads get the same and are stored with v at the token's slot in the layer's pool.
// Phase 2, per (sequence, q head): each new token attends causally over the sequence's cached and new
// keys, read from the pool. A token's result depends only on its own q and its sequence's K/V, never on
// the other sequences of the step or on the thread that computes it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/row_ops.h"
#include "op_registry.h"
#include "thread_pool.h"

namespace rtllm {
namespace {

struct AttentionAttrs {
  int64_t layer_idx, num_heads, num_kv_heads, head_dim;
  float scale;
  bool fused_qkv, rope, qk_norm;
  float qk_norm_eps;
};

AttentionAttrs parse_attrs(const Json& a) {
  AttentionAttrs p;
  p.layer_idx = a.at("layer_idx").as_int();
  p.num_heads = a.at("num_heads").as_int();
  p.num_kv_heads = a.at("num_kv_heads").as_int();
  p.head_dim = a.at("head_dim").as_int();
  p.scale = static_cast<float>(a.get_double("scale", 1.0 / std::sqrt(static_cast<double>(p.head_dim))));
  p.fused_qkv = a.get_bool("fused_qkv", false);
  p.rope = a.get_bool("rope", false);
  p.qk_norm = a.get_bool("qk_norm", false);
  p.qk_norm_eps = static_cast<float>(a.get_double("qk_norm_eps", 1e-6));
  return p;
}

// Where a tensor's head columns live: row t, head h starts at base + t * row_stride + h * head_dim.
struct HeadSource {
  const float* base;
  int64_t row_stride;
  const float* head(int64_t t, int64_t h, int64_t head_dim) const { return base + t * row_stride + h * head_dim; }
};

int32_t seq_of_token(const StepMeta& step, int64_t t) {
  // seq_token_start is ascending: the last sequence starting at or before t.
  const int32_t* end = step.seq_token_start + step.num_seqs;
  return static_cast<int32_t>(std::upper_bound(step.seq_token_start, end, static_cast<int32_t>(t)) -
                              step.seq_token_start) - 1;
}

void attention_op(const OpContext& ctx, const TensorView* in, int num_in, TensorView* out, int num_out) {
  const AttentionAttrs p = parse_attrs(*ctx.attrs);
  const int num_qkv = p.fused_qkv ? 1 : 3;
  const int expected = num_qkv + (p.rope ? 2 : 0) + (p.qk_norm ? 2 : 0);
  check_num_io("attention", num_in, expected, expected, num_out, 1);
  const StepMeta& step = *ctx.step;
  const KvPool& kv = *ctx.kv;
  const int64_t nh = p.num_heads, nkv = p.num_kv_heads, hd = p.head_dim, T = step.num_tokens;
  RTLLM_CHECK(nh > 0 && nkv > 0 && nh % nkv == 0, "attention: num_heads ", nh, " is not a multiple of num_kv_heads ",
              nkv);
  RTLLM_CHECK(hd > 0 && hd % 2 == 0 && hd <= cpu::kMaxHeadDim, "attention: head_dim ", hd, " must be even and <= ",
              cpu::kMaxHeadDim);
  RTLLM_CHECK(p.layer_idx >= 0 && p.layer_idx < kv.num_layers, "attention: layer_idx ", p.layer_idx, " outside [0, ",
              kv.num_layers, ")");
  RTLLM_CHECK(kv.num_kv_heads == nkv && kv.head_dim == hd, "attention: the KV pool has ", kv.num_kv_heads,
              " heads of ", kv.head_dim, ", the node ", nkv, " of ", hd);
  for (int i = 0; i < num_in; ++i)
    if (in[i].dtype != DataType::kInt32) check_f32("attention", in[i], "input");

  HeadSource q, k, v;
  if (p.fused_qkv) {
    const int64_t stride = (nh + 2 * nkv) * hd;
    RTLLM_CHECK(in[0].rows() == T && in[0].cols() == stride, "attention: qkv [", in[0].rows(), ", ", in[0].cols(),
                "], expected [", T, ", ", stride, "]");
    q = {in[0].f32(), stride};
    k = {in[0].f32() + nh * hd, stride};
    v = {in[0].f32() + (nh + nkv) * hd, stride};
  } else {
    RTLLM_CHECK(in[0].rows() == T && in[0].cols() == nh * hd && in[1].rows() == T && in[1].cols() == nkv * hd &&
                    in[2].rows() == T && in[2].cols() == nkv * hd,
                "attention: q, k, v shapes do not match ", T, " tokens of ", nh, "/", nkv, " heads of ", hd);
    q = {in[0].f32(), nh * hd};
    k = {in[1].f32(), nkv * hd};
    v = {in[2].f32(), nkv * hd};
  }
  const int32_t* positions = nullptr;
  const float* inv_freq = nullptr;
  if (p.rope) {
    positions = in[num_qkv].i32();
    inv_freq = in[num_qkv + 1].f32();
    RTLLM_CHECK(in[num_qkv + 1].numel() == hd / 2, "attention: inv_freq has ", in[num_qkv + 1].numel(),
                " values, expected ", hd / 2);
  }
  const float *q_norm = nullptr, *k_norm = nullptr;
  if (p.qk_norm) {
    const int base = num_qkv + (p.rope ? 2 : 0);
    q_norm = in[base].f32();
    k_norm = in[base + 1].f32();
    RTLLM_CHECK(in[base].numel() == hd && in[base + 1].numel() == hd, "attention: q/k norm weights must have ", hd,
                " values");
  }
  float* o = out[0].f32();
  RTLLM_CHECK(out[0].rows() == T && out[0].cols() == nh * hd, "attention: output [", out[0].rows(), ", ",
              out[0].cols(), "], expected [", T, ", ", nh * hd, "]");
  float* layer = kv.layers[p.layer_idx];
  const int64_t tpb = kv.tokens_per_block;
  const int64_t half = hd / 2;

  // [num_blocks, 2, nkv, tpb, hd]: element offset of (block, K or V, kv head, slot).
  auto kv_offset = [&](int64_t block, int64_t which, int64_t kh, int64_t slot) {
    return (((block * 2 + which) * nkv + kh) * tpb + slot) * hd;
  };
  auto token_block = [&](int64_t s, int64_t pos) {
    return static_cast<int64_t>(step.block_table[s * step.max_blocks_per_seq + pos / tpb]);
  };

  // Phase 1: qk_norm, RoPE, q to the output rows, k/v to the cache.
  ctx.pool->parallel_for(T, [&](int64_t t, int) {
    const int32_t s = seq_of_token(step, t);
    const int64_t pos = step.num_cached_tokens[s] + (t - step.seq_token_start[s]);
    float cos_v[cpu::kMaxHeadDim / 2], sin_v[cpu::kMaxHeadDim / 2];
    if (p.rope) cpu::rope_cos_sin(positions[t], inv_freq, half, cos_v, sin_v);
    auto transform = [&](float* head, const float* norm_weight) {
      if (p.qk_norm) cpu::rms_norm_row(head, head, norm_weight, hd, p.qk_norm_eps);
      if (p.rope) cpu::rope_head(head, cos_v, sin_v, half);
    };
    for (int64_t h = 0; h < nh; ++h) {
      float* dst = o + t * nh * hd + h * hd;
      std::memcpy(dst, q.head(t, h, hd), hd * sizeof(float));
      transform(dst, q_norm);
    }
    const int64_t block = token_block(s, pos), slot = pos % tpb;
    for (int64_t kh = 0; kh < nkv; ++kh) {
      float* k_dst = layer + kv_offset(block, 0, kh, slot);
      std::memcpy(k_dst, k.head(t, kh, hd), hd * sizeof(float));
      transform(k_dst, k_norm);
      std::memcpy(layer + kv_offset(block, 1, kh, slot), v.head(t, kh, hd), hd * sizeof(float));
    }
  }, (nh + 2 * nkv) * hd * 4);

  // Phase 2: causal softmax(q·kᵀ·scale)·v per (sequence, q head).
  const int64_t group = nh / nkv;
  int64_t num_scores = 0;  // q·k products of the step per head
  for (int32_t s = 0; s < step.num_seqs; ++s)
    num_scores += int64_t{step.num_new_tokens[s]} * (step.num_cached_tokens[s] + step.num_new_tokens[s]);
  const int64_t work_per_head = 2 * hd * num_scores / step.num_seqs;
  ctx.pool->parallel_for(static_cast<int64_t>(step.num_seqs) * nh, [&](int64_t task, int thread) {
    const int64_t s = task / nh, h = task % nh, kh = h / group;
    const int64_t num_cached = step.num_cached_tokens[s], num_new = step.num_new_tokens[s];
    RTLLM_CHECK(num_cached + num_new <= ctx.scratch_floats_per_thread, "attention: context of ",
                num_cached + num_new, " tokens exceeds the planned ", ctx.scratch_floats_per_thread);
    float* scores = ctx.thread_scratch(thread);  // [context length]
    float q_buf[cpu::kMaxHeadDim], acc[cpu::kMaxHeadDim];
    for (int64_t i = 0; i < num_new; ++i) {
      const int64_t t = step.seq_token_start[s] + i;
      const int64_t num_ctx = num_cached + i + 1;
      float* dst = o + t * nh * hd + h * hd;
      std::memcpy(q_buf, dst, hd * sizeof(float));
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < num_ctx; ++j) {
        const float* key = layer + kv_offset(token_block(s, j), 0, kh, j % tpb);
        scores[j] = cpu::dot(q_buf, key, hd) * p.scale;
        max_score = std::max(max_score, scores[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < num_ctx; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        sum += scores[j];
      }
      std::fill(acc, acc + hd, 0.0f);
      for (int64_t j = 0; j < num_ctx; ++j) {
        const float* val = layer + kv_offset(token_block(s, j), 1, kh, j % tpb);
        const float w = scores[j];
        for (int64_t d = 0; d < hd; ++d) acc[d] += w * val[d];
      }
      const float inv_sum = 1.0f / sum;
      for (int64_t d = 0; d < hd; ++d) dst[d] = acc[d] * inv_sum;
    }
  }, work_per_head);
}

}  // namespace

void register_cpu_attention_ops() { register_op("attention", DeviceKind::kCpu, attention_op); }

}  // namespace rtllm
