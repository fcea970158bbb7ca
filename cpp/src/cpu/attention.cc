// attention over the paged KV cache (docs/engine_format.md, "attention").
//
// Phase 1, per token: q heads get qk_norm then RoPE and are written to the output rows (used as the
// q buffer); k heads get the same and are stored with v at the token's slot in the layer's pool.
// Phase 2, per (sequence, kv head, tile of new tokens): the tile's tokens and the q heads that share
// the kv head attend causally over the sequence's cached and new keys, read from the pool once per
// tile (cpu/attention_kernel.h). A token's result depends only on its own q and its sequence's K/V,
// never on the other sequences of the step, the tiling or the thread that computes it.
//
// KV cache dtype F32, F8_E4M3 or I8. An F8_E4M3 pool stores e4m3(k / k_scale) and e4m3(v / v_scale) (k
// after qk_norm and RoPE; float32 division, round to nearest even, saturated to +-448; the scales are the
// node's calibrated attrs, 1 when absent); an I8 pool stores clamp(round_half_even(k / k_scale), -127, 127)
// and likewise v. Phase 2 decodes each key block's K and V rows exactly, times the scale in float32, into a
// per-thread float32 scratch (the op's workspace) and runs the same kernel on them, so a quantized cache
// computes what an F32 cache holding code · k_scale would, bit for bit.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "attention_attrs.h"
#include "cpu/attention_kernel.h"
#include "cpu/fp8.h"
#include "cpu/row_ops.h"
#include "op_registry.h"
#include "thread_pool.h"
#include "workspace.h"

namespace rtllm {
namespace {

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

class Attention final : public OpKind {
 public:
  explicit Attention(const OpSpec& spec) : OpKind(spec), p(spec) {
    const DataType kv_dtype = spec.backend->kv_cache_dtype;
    RTLLM_CHECK(kv_dtype == DataType::kFloat32 || kv_dtype == DataType::kFloat8E4M3 || kv_dtype == DataType::kInt8,
                "op \"attention\" on the CPU backend does not support KV cache dtype ",
                dtype_safetensors_name(kv_dtype), "; supported: F32, F8_E4M3, I8");
    RTLLM_CHECK(p.head_dim % 2 == 0 && p.head_dim <= cpu::kMaxHeadDim, "attention: head_dim ", p.head_dim,
                " must be even and <= ", cpu::kMaxHeadDim);
    kv_dtype_ = kv_dtype;
    if (kv_dtype_ == DataType::kFloat8E4M3) cpu::e4m3_table();
  }
  // q/k norm weights are computed with in float32; inv_freq stays float32 as stored.
  WeightPlacement weight_placement(size_t input) const override {
    return p.is_norm_weight(input) ? in_activation_dtype() : OpKind::weight_placement(input);
  }
  // The tiles before each sequence of the step ([max_batch_size + 1] int64), then, with a quantized (F8_E4M3
  // or I8) cache, one decoded key block (K rows, then V rows, [2, kKeyBlock, head_dim] float32) per thread.
  size_t workspace_bytes() const override {
    return first_tile_bytes() +
           (quantized() ? static_cast<size_t>(spec_.backend->num_threads) * decoded_block_floats() * sizeof(float)
                        : 0);
  }
  void run(const OpContext& ctx, const TensorView* in, TensorView* out) override;

 private:
  int64_t decoded_block_floats() const { return 2 * cpu::kKeyBlock * p.head_dim; }
  size_t first_tile_bytes() const {
    return round_up((static_cast<size_t>(spec_.backend->max_batch_size) + 1) * sizeof(int64_t), 64);
  }
  bool quantized() const { return kv_dtype_ != DataType::kFloat32; }

  const AttentionAttrs p;
  DataType kv_dtype_ = DataType::kFloat32;  // the pool's: F32, F8_E4M3 or I8
};

// Stores hd floats divided by scale as E4M3 codes (float32 division, round to nearest even, saturate).
void quantize_row(const float* src, float scale, uint8_t* dst, int64_t hd) {
  for (int64_t d = 0; d < hd; ++d) dst[d] = float_to_fp8_e4m3(src[d] / scale);
}

// Stores hd floats divided by scale as int8 codes: float32 division, round half to even (nearbyint in the
// default rounding mode), clamped to [-127, 127]; NaN stores 0, as CUDA's float-to-int conversion does.
void quantize_row(const float* src, float scale, int8_t* dst, int64_t hd) {
  for (int64_t d = 0; d < hd; ++d) {
    const float r = std::nearbyint(src[d] / scale);
    dst[d] = static_cast<int8_t>(std::isnan(r) ? 0.0f : std::min(127.0f, std::max(-127.0f, r)));
  }
}

void Attention::run(const OpContext& ctx, const TensorView* in, TensorView* out) {
  const int num_qkv = p.num_qkv();
  const StepMeta& step = *ctx.step;
  const KvPool& kv = *ctx.kv;
  const int64_t nh = p.num_heads, nkv = p.num_kv_heads, hd = p.head_dim, T = step.num_tokens;
  RTLLM_CHECK(kv.num_kv_heads == nkv && kv.head_dim == hd, "attention: the KV pool has ", kv.num_kv_heads,
              " heads of ", kv.head_dim, ", the node ", nkv, " of ", hd);
  RTLLM_CHECK(kv.dtype == kv_dtype_, "attention: the KV pool has dtype ", dtype_safetensors_name(kv.dtype),
              ", the op was created for ", dtype_safetensors_name(kv_dtype_));
  const bool fp8 = kv_dtype_ == DataType::kFloat8E4M3;

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
  // One of the three is used: the layer's pool as float32, E4M3 or int8 codes.
  float* layer = static_cast<float*>(kv.layers[p.layer_idx]);
  uint8_t* layer8 = static_cast<uint8_t*>(kv.layers[p.layer_idx]);
  int8_t* layer_i8 = static_cast<int8_t*>(kv.layers[p.layer_idx]);
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
      if (quantized()) {  // transformed in float32, then quantized
        float k_row[cpu::kMaxHeadDim];
        std::memcpy(k_row, k.head(t, kh, hd), hd * sizeof(float));
        transform(k_row, k_norm);
        const int64_t k_at = kv_offset(block, 0, kh, slot), v_at = kv_offset(block, 1, kh, slot);
        if (fp8) {
          quantize_row(k_row, p.k_scale, layer8 + k_at, hd);
          quantize_row(v.head(t, kh, hd), p.v_scale, layer8 + v_at, hd);
        } else {
          quantize_row(k_row, p.k_scale, layer_i8 + k_at, hd);
          quantize_row(v.head(t, kh, hd), p.v_scale, layer_i8 + v_at, hd);
        }
        continue;
      }
      float* k_dst = layer + kv_offset(block, 0, kh, slot);
      std::memcpy(k_dst, k.head(t, kh, hd), hd * sizeof(float));
      transform(k_dst, k_norm);
      std::memcpy(layer + kv_offset(block, 1, kh, slot), v.head(t, kh, hd), hd * sizeof(float));
    }
  }, (nh + 2 * nkv) * hd * 4);

  // Phase 2: causal softmax(q·kᵀ·scale)·v. A task is (tile of up to tile_tokens new tokens of one
  // sequence, kv head, chunk of up to heads_per_task of that kv head's `group` q heads); its rows are
  // tokens x heads, so each K/V row loaded serves all of them.
  const int64_t group = nh / nkv;
  const int64_t heads_per_task = std::min(group, cpu::kMaxTileRows);
  const int64_t num_head_chunks = (group + heads_per_task - 1) / heads_per_task;
  const int64_t tile_tokens = cpu::kMaxTileRows / heads_per_task;
  const int64_t tasks_per_tile = nkv * num_head_chunks;
  const int64_t v_minus_k = kv_offset(0, 1, 0, 0);  // from a K row to the V row of the same slot
  RTLLM_CHECK(step.num_seqs <= spec_.backend->max_batch_size, "attention: a step of ", step.num_seqs,
              " sequences, more than the ", spec_.backend->max_batch_size, " planned at load");
  int64_t* first_tile = static_cast<int64_t*>(ctx.workspace);  // tiles of sequences [0, s)
  first_tile[0] = 0;
  int64_t num_scores = 0;  // q·k products of the step per q head
  for (int32_t s = 0; s < step.num_seqs; ++s) {
    first_tile[s + 1] = first_tile[s] + (step.num_new_tokens[s] + tile_tokens - 1) / tile_tokens;
    num_scores += int64_t{step.num_new_tokens[s]} * (step.num_cached_tokens[s] + step.num_new_tokens[s]);
  }
  const int64_t num_tiles = first_tile[step.num_seqs];
  if (num_tiles == 0) return;
  const int64_t work_per_task = 2 * hd * nh * num_scores / (num_tiles * tasks_per_tile) + 1;
  const auto& e4m3 = cpu::e4m3_table();
  const float k_scale = p.k_scale, v_scale = p.v_scale;
  ctx.pool->parallel_for(num_tiles * tasks_per_tile, [&](int64_t task, int thread) {
    const int64_t tile = task / tasks_per_tile, kh = task % tasks_per_tile / num_head_chunks;
    const int64_t first_head = kh * group + task % num_head_chunks * heads_per_task;
    const int64_t last_head = std::min(first_head + heads_per_task, (kh + 1) * group);
    const int64_t s = std::upper_bound(first_tile, first_tile + step.num_seqs + 1, tile) - first_tile - 1;
    const int64_t num_cached = step.num_cached_tokens[s];
    const int64_t first = (tile - first_tile[s]) * tile_tokens;
    const int64_t last = std::min<int64_t>(first + tile_tokens, step.num_new_tokens[s]);
    const float* q_rows[cpu::kMaxTileRows];
    float* out_rows[cpu::kMaxTileRows];
    int64_t num_keys[cpu::kMaxTileRows];
    int64_t num_rows = 0;
    for (int64_t i = first; i < last; ++i) {
      const int64_t t = step.seq_token_start[s] + i;
      for (int64_t h = first_head; h < last_head; ++h) {
        out_rows[num_rows] = o + t * nh * hd + h * hd;
        q_rows[num_rows] = out_rows[num_rows];
        num_keys[num_rows++] = num_cached + i + 1;
      }
    }
    // Points key_rows[j] / value_rows[j] at the pool's K / V rows of position start + j (of end - 1
    // past it), base being the layer as float or as E4M3 codes. Walks the block table a page at a time
    // (no division per key).
    auto pool_rows = [&](auto* base, int64_t start, int64_t end, auto** key_rows, auto** value_rows) {
      int64_t page = start / tpb, slot = start % tpb;
      auto* k_row = base + kv_offset(token_block(s, start), 0, kh, slot);
      for (int64_t j = 0; j < cpu::kKeyBlock; ++j) {
        key_rows[j] = k_row;
        value_rows[j] = k_row + v_minus_k;
        if (start + j + 1 >= end) continue;  // stay on the last valid row
        if (++slot < tpb) {
          k_row += hd;
        } else {
          slot = 0;
          k_row = base + kv_offset(step.block_table[s * step.max_blocks_per_seq + ++page], 0, kh, 0);
        }
      }
    };
    alignas(32) float acc[cpu::kMaxTileRows * cpu::kMaxHeadDim];  // [num_rows, hd]
    if (!quantized()) {
      auto kv_rows = [&](int64_t start, int64_t end, const float** key_rows, const float** value_rows) {
        pool_rows(layer, start, end, key_rows, value_rows);
      };
      cpu::attend_tile(q_rows, out_rows, num_keys, num_rows, hd, p.scale, kv_rows, acc);
      return;
    }
    // E4M3 or int8: decode the block's valid rows (exact) times the scales into this thread's scratch; the
    // rows past end - 1 point at the last decoded ones, as the kernel expects. `decode_row` turns hd codes
    // of type Code into floats times a scale.
    float* decoded = reinterpret_cast<float*>(static_cast<char*>(ctx.workspace) + first_tile_bytes()) +
                     thread * decoded_block_floats();
    auto attend_codes = [&](const auto* codes, auto decode_row) {
      using Code = std::remove_cv_t<std::remove_pointer_t<decltype(codes)>>;
      auto kv_rows = [&](int64_t start, int64_t end, const float** key_rows, const float** value_rows) {
        const Code* codes_k[cpu::kKeyBlock];
        const Code* codes_v[cpu::kKeyBlock];
        pool_rows(codes, start, end, codes_k, codes_v);
        const int64_t count = std::min(cpu::kKeyBlock, end - start);
        for (int64_t j = 0; j < cpu::kKeyBlock; ++j) {
          if (j >= count) {
            key_rows[j] = key_rows[count - 1];
            value_rows[j] = value_rows[count - 1];
            continue;
          }
          float* k_row = decoded + j * hd;
          float* v_row = decoded + (cpu::kKeyBlock + j) * hd;
          decode_row(codes_k[j], k_scale, k_row);
          decode_row(codes_v[j], v_scale, v_row);
          key_rows[j] = k_row;
          value_rows[j] = v_row;
        }
      };
      cpu::attend_tile(q_rows, out_rows, num_keys, num_rows, hd, p.scale, kv_rows, acc);
    };
    if (fp8) {
      attend_codes(static_cast<const uint8_t*>(layer8), [&](const uint8_t* c, float scale, float* f) {
        for (int64_t d = 0; d < hd; ++d) f[d] = e4m3[c[d]] * scale;
      });
    } else {
      attend_codes(static_cast<const int8_t*>(layer_i8), [&](const int8_t* c, float scale, float* f) {
        for (int64_t d = 0; d < hd; ++d) f[d] = static_cast<float>(c[d]) * scale;
      });
    }
  }, work_per_task);
}

}  // namespace

void register_cpu_attention_ops() { register_op("attention", DeviceKind::kCpu, make_op<Attention>); }

}  // namespace rtllm
