"""Attention kernels against their ceilings and against torch SDPA, measured in the same run.

decode: GB/s of K+V read (every sequence's whole context) against the copy bandwidth of the same run and
against torch SDPA (GQA) on the same shapes with contiguous K/V; rows "attention_decode_fp8kv" read an FP8
(E4M3) pool instead (half the bytes; compare their us with the bf16 row of the same shape).
prefill: causal TFLOP/s (4 * heads * head_dim * query-key pairs) against torch SDPA causal (flash backend)
and against the bf16 matmul rate of the same run (of_matmul).
Llama-3-8B heads: 32 query heads, 8 KV heads, head_dim 128, bf16, 16 tokens per block, blocks shuffled.

Rows come from `bench_attention(ctx)` with the Context of bench_kernels.py (its timing helper: CUDA graph
replays rotating over input sets larger than the L2); bench_kernels.py registers it.
Standalone: python benchmarks/bench_attention.py [--output results.json] [--only decode|prefill|decode_qkv]
[--decode-splits 8,16,32]
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import report  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, TOKENS_PER_BLOCK = 32, 8, 128, 16
BF16 = 0
DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXTS = (1024, 4096, 8192, 16384)
# A batch-256 decode step of 128/128 serving: short contexts, one CTA per (sequence, KV head), no split.
SERVING_DECODE = ((256, 256),)  # (batch, context)
FP8_KV_DECODE = ((1, 4096), (1, 16384), (8, 4096), (32, 4096), (64, 4096), (256, 256))
FP8_E4M3 = 3
PREFILL_TOKENS = (1024, 2048, 4096, 8192, 16384)
# The decode batches engines run with the fused-preparation kernel (split keys), for its split-count sweep.
DECODE_QKV = ((1, 1024), (1, 4096), (1, 16384), (4, 4096), (8, 4096))


def _rand(*shape):
    return torch.randn(*shape, device="cuda").to(torch.bfloat16)


class DecodePool:
    """A paged pool holding `context` keys of `batch` sequences for each of the timing helper's input sets
    (bf16, or FP8 codes), every set's block table a shuffle of its own blocks, and the split count the
    runtime plans for it."""

    def __init__(self, ctx, batch, context, fp8_kv):
        self.kv_bytes = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * (1 if fp8_kv else 2)  # K and V
        self.num_sets = ctx.num_sets(self.kv_bytes)
        self.blocks_per_seq = math.ceil(context / TOKENS_PER_BLOCK)
        self.num_blocks = self.num_sets * batch * self.blocks_per_seq
        pool = _rand(self.num_blocks, 2, NUM_KV_HEADS, TOKENS_PER_BLOCK, HEAD_DIM)
        if fp8_kv:
            pool = (pool.float() * 40.0).to(torch.float8_e4m3fn).view(torch.uint8)
        self.pool = pool
        self.tables = torch.randperm(self.num_blocks, device="cuda").to(torch.int32).view(
            self.num_sets, batch, self.blocks_per_seq)
        self.planned, self.fuse_prepare = ctx.kernels.attention_decode_plan(
            batch, NUM_KV_HEADS, HEAD_DIM, context, ctx.props.multi_processor_count, FP8_E4M3 if fp8_kv else BF16)
        self.batch, self.kv_dtype = batch, FP8_E4M3 if fp8_kv else -1

    def workspace(self, ctx, batch, num_splits):
        num_bytes = ctx.kernels.attention_decode_workspace_bytes(batch, NUM_HEADS, HEAD_DIM, num_splits)
        return torch.empty(num_bytes // 4, device="cuda")

    def decode(self, ctx, i, out, q, seq_len, num_splits, workspace):
        """attention_decode of q over input set i."""
        ctx.kernels.attention_decode(
            out=out.data_ptr(), q=q.data_ptr(), seq_len=seq_len.data_ptr(), num_seqs=self.batch,
            kv_data=self.pool.data_ptr(), num_blocks=self.num_blocks, tokens_per_block=TOKENS_PER_BLOCK,
            block_table=self.tables[i].data_ptr(), max_blocks_per_seq=self.blocks_per_seq, num_heads=NUM_HEADS,
            num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, scale=HEAD_DIM ** -0.5, num_splits=num_splits,
            workspace=workspace.data_ptr(), dtype=BF16, kv_dtype=self.kv_dtype, k_scale=0.025, v_scale=0.025,
            stream=ctx.stream)


def bench_decode(ctx, batch, context, fp8_kv=False, num_splits=None):
    """One decode row; num_splits None: the count the runtime plans (attention_decode_plan)."""
    kv = DecodePool(ctx, batch, context, fp8_kv)
    kv_bytes, num_sets, planned = kv.kv_bytes, kv.num_sets, kv.planned
    q, out = _rand(batch, NUM_HEADS * HEAD_DIM), torch.empty(batch, NUM_HEADS * HEAD_DIM, device="cuda",
                                                            dtype=torch.bfloat16)
    seq_len = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    num_splits = num_splits or planned
    workspace = kv.workspace(ctx, batch, num_splits)
    ms = ctx.time_ms(lambda i: kv.decode(ctx, i, out, q, seq_len, num_splits, workspace), num_sets)
    del kv  # the pool: free before the next row allocates
    torch.cuda.empty_cache()
    if fp8_kv:  # SDPA has no FP8 K/V: its row is the bf16 one
        return ctx.row("attention_decode_fp8kv", f"b={batch} ctx={context} splits={num_splits}", ms, kv_bytes)
    if num_splits != planned:  # a split-count sweep row: SDPA's is the planned row's
        return ctx.row("attention_decode_splits", f"b={batch} ctx={context} splits={num_splits}", ms, kv_bytes)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q4 = q.view(batch, NUM_HEADS, 1, HEAD_DIM)
    kvs = [(_rand(batch, NUM_KV_HEADS, context, HEAD_DIM), _rand(batch, NUM_KV_HEADS, context, HEAD_DIM))
           for _ in range(num_sets)]
    torch_ms = ctx.time_ms(lambda i: sdpa(q4, kvs[i][0], kvs[i][1], enable_gqa=True), num_sets)
    del kvs
    torch.cuda.empty_cache()
    return ctx.row("attention_decode", f"b={batch} ctx={context} splits={num_splits}", ms, kv_bytes, torch_ms)


def bench_decode_qkv(ctx, batch, context, num_splits, fp8_kv=False):
    """Two rows: attention_decode_qkv, the kernel engines run for decode steps of small batches (split keys):
    RoPE of the new q and k, the new key and value written to the pool and the attention over `context` keys
    (the new one last), in one launch; then the same work as qkv_prepare followed by attention_decode (the
    tensor-core kernel where it serves), the unfused alternative. num_splits 0: the planned count."""
    kv = DecodePool(ctx, batch, context, fp8_kv)
    kv_bytes, num_sets, num_blocks, pool, tables = kv.kv_bytes, kv.num_sets, kv.num_blocks, kv.pool, kv.tables
    blocks_per_seq, planned, fuse_prepare = kv.blocks_per_seq, kv.planned, kv.fuse_prepare
    qkv_cols = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    qkv, out = _rand(batch, qkv_cols), torch.empty(batch, NUM_HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    inv_freq = 500000.0 ** (-torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
    seq_len = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    positions = seq_len - 1
    k = ctx.kernels
    num_splits = num_splits or planned
    workspace = kv.workspace(ctx, batch, num_splits)
    launch = lambda i: k.attention_decode_qkv(
        out=out.data_ptr(), qkv=qkv.data_ptr(), qkv_row_stride=qkv_cols, q_col=0, k_col=NUM_HEADS * HEAD_DIM,
        v_col=(NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM, inv_freq=inv_freq.data_ptr(), q_norm_weight=0,
        k_norm_weight=0, qk_norm_eps=1e-6, positions=positions.data_ptr(), seq_len=seq_len.data_ptr(),
        num_seqs=batch, kv_data=pool.data_ptr(), num_blocks=num_blocks, tokens_per_block=TOKENS_PER_BLOCK,
        block_table=tables[i].data_ptr(), max_blocks_per_seq=blocks_per_seq, num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, scale=HEAD_DIM ** -0.5, num_splits=num_splits,
        workspace=workspace.data_ptr(), dtype=BF16, kv_dtype=FP8_E4M3 if fp8_kv else -1, k_scale=0.025,
        v_scale=0.025, stream=ctx.stream)
    ms = ctx.time_ms(launch, num_sets)
    q = torch.empty(batch, NUM_HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    token_seq = torch.arange(batch, dtype=torch.int32, device="cuda")  # a decode step: token s of sequence s

    def prepare_and_decode(i):
        k.qkv_prepare(q.data_ptr(), qkv.data_ptr(), qkv_cols, 0, NUM_HEADS * HEAD_DIM,
                      (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM, inv_freq.data_ptr(), 0, 0, 1e-6,
                      token_seq=token_seq.data_ptr(), positions=positions.data_ptr(), num_tokens=batch,
                      num_seqs=batch, kv_data=pool.data_ptr(), num_blocks=num_blocks,
                      tokens_per_block=TOKENS_PER_BLOCK, block_table=tables[i].data_ptr(),
                      max_blocks_per_seq=blocks_per_seq, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS,
                      head_dim=HEAD_DIM, dtype=BF16, kv_dtype=FP8_E4M3 if fp8_kv else -1, k_scale=0.025,
                      v_scale=0.025, stream=ctx.stream)
        kv.decode(ctx, i, out, q, seq_len, num_splits, workspace)

    unfused_ms = ctx.time_ms(prepare_and_decode, num_sets)
    del pool, kv  # the pool: free before the next row allocates
    torch.cuda.empty_cache()
    suffix = "_fp8kv" if fp8_kv else ""
    shape = f"b={batch} ctx={context} splits={num_splits}"
    # "(plan)" marks the row an engine runs: the planned count, fused or not as the plan says
    plan = " (plan)" if num_splits == planned else ""
    fused_plan, unfused_plan = (plan, "") if fuse_prepare else ("", plan)
    return [ctx.row("attention_decode_qkv" + suffix, shape + fused_plan, ms, kv_bytes),
            ctx.row("qkv_prepare+attention_decode" + suffix, shape + unfused_plan, unfused_ms, kv_bytes)]


def bench_prefill(ctx, num_tokens):
    """One sequence of num_tokens new tokens (no cache), causal."""
    num_blocks = math.ceil(num_tokens / TOKENS_PER_BLOCK)
    q, pool = _rand(num_tokens, NUM_HEADS * HEAD_DIM), _rand(num_blocks, 2, NUM_KV_HEADS, TOKENS_PER_BLOCK, HEAD_DIM)
    out = torch.empty_like(q)
    table = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")
    token_seq = torch.zeros(num_tokens, dtype=torch.int32, device="cuda")
    positions = torch.arange(num_tokens, dtype=torch.int32, device="cuda")
    starts, cached, lens = i32([0, num_tokens]), i32([0]), i32([num_tokens])
    launch = lambda i: ctx.kernels.attention_prefill(
        out=out.data_ptr(), q=q.data_ptr(), token_seq=token_seq.data_ptr(), positions=positions.data_ptr(),
        seq_token_start=starts.data_ptr(), num_cached=cached.data_ptr(), seq_len=lens.data_ptr(),
        num_tokens=num_tokens, num_seqs=1, kv_data=pool.data_ptr(), num_blocks=num_blocks,
        tokens_per_block=TOKENS_PER_BLOCK, block_table=table.data_ptr(), max_blocks_per_seq=num_blocks,
        max_new_tokens=num_tokens, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
        scale=HEAD_DIM ** -0.5, dtype=BF16, stream=ctx.stream)
    ms = ctx.time_ms(launch)

    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q4 = _rand(1, NUM_HEADS, num_tokens, HEAD_DIM)
    # The flash backend takes no enable_gqa: give it K/V expanded to every query head.
    k4, v4 = (_rand(1, NUM_KV_HEADS, num_tokens, HEAD_DIM).repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=1)
              for _ in range(2))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch_ms = ctx.time_ms(lambda i: sdpa(q4, k4, v4, is_causal=True))
    flops = 4 * NUM_HEADS * HEAD_DIM * num_tokens * (num_tokens + 1) / 2
    bytes_moved = (2 * q.numel() + 2 * num_tokens * NUM_KV_HEADS * HEAD_DIM) * 2
    tflops = flops / ms / 1e9
    of_matmul = tflops / ctx.matmul_tflops if ctx.matmul_tflops else None  # the bf16 matmul ceiling, same run
    return ctx.row("attention_prefill", f"tokens={num_tokens} causal", ms, bytes_moved, torch_ms,
                   **{"TFLOP/s": tflops, "torch_TFLOP/s": flops / torch_ms / 1e9, "of_matmul": of_matmul})


def bench_attention(ctx, parts=("decode", "prefill"), decode_splits=()) -> list[dict]:
    """Decode rows (GB/s against copy bandwidth and SDPA) then prefill rows (TFLOP/s against SDPA).
    decode_splits: split counts also timed at batch 1 and 8 (attention_decode_splits rows), and by the
    decode_qkv part (DECODE_QKV shapes, bf16 and FP8 pools, the planned count and each of these)."""
    rows = []
    if "decode_qkv" in parts:
        for fp8_kv in (False, True):
            for b, c in DECODE_QKV:
                for n in (0,) + tuple(decode_splits):
                    rows += bench_decode_qkv(ctx, b, c, n, fp8_kv)
    if "decode" in parts:
        rows += [bench_decode(ctx, b, c) for b in DECODE_BATCHES for c in DECODE_CONTEXTS]
        rows += [bench_decode(ctx, b, c, num_splits=n) for b in (1, 8) for c in (4096, 16384) for n in decode_splits]
        rows += [bench_decode(ctx, b, c) for b, c in SERVING_DECODE]
        rows += [bench_decode(ctx, b, c, fp8_kv=True) for b, c in FP8_KV_DECODE]
    if "prefill" in parts:
        rows += [bench_prefill(ctx, n) for n in PREFILL_TOKENS]
    return rows


def main():
    from bench_kernels import Context, bench_ceilings, load_kernels
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="write the JSON results here")
    parser.add_argument("--only", choices=("decode", "prefill", "decode_qkv"),
                        help="only the decode, the prefill or the fused-preparation decode rows (decode_qkv, "
                        "which only runs when named)")
    parser.add_argument("--decode-splits", default="", help="comma-separated split counts to time at batch 1 and 8 "
                        "beside the planned one (e.g. 8,16,32,64,128); with --only decode_qkv, at its shapes")
    args = parser.parse_args()
    ctx = Context(load_kernels())
    splits = tuple(int(n) for n in args.decode_splits.split(",") if n)
    rows = bench_ceilings(ctx) + bench_attention(ctx, (args.only,) if args.only else ("decode", "prefill"), splits)
    results = {"device": ctx.props.name, "copy_GBps": ctx.copy_gbps, "matmul_bf16_TFLOPs": ctx.matmul_tflops,
               "rows": rows}
    report(results, rows, ["kernel", "shape", "us", "GB/s", "of_copy", "torch_us", "vs_torch", "TFLOP/s",
                           "torch_TFLOP/s", "of_matmul"], args.output)


if __name__ == "__main__":
    main()
