"""attention_prefill / attention_decode against a float64 reference computed from the same bf16 values.

Every case draws fresh random q and pool contents (never zeros), scatters each sequence over shuffled
blocks of the pool, poisons the output (and the split-KV workspace) with NaN, and checks the relative
error of every (token, head) row as well as of the whole output. Bound: bf16 inputs, fp32 accumulation,
probabilities and output rounded to 16 bits -> 1e-2 on the whole output, 2e-2 on any single row.
The `kernels` fixture (rtllm._core.kernels) comes from conftest.py.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

REL_TOL = 1e-2
ROW_REL_TOL = 2e-2
DTYPES = {torch.bfloat16: 0, torch.float16: 1}
UNUSED_BLOCK = 1 << 30  # block-table filler: reading it faults instead of silently reading another block


class PagedCase:
    """A step: per sequence num_cached tokens already cached and num_new new ones (all in the pool)."""

    def __init__(self, num_cached, num_new, num_heads, num_kv_heads, head_dim, tokens_per_block,
                 dtype=torch.bfloat16, seed=0, q_scale=1.0):
        gen = torch.Generator().manual_seed(seed)
        self.num_cached, self.num_new = list(num_cached), list(num_new)
        self.seq_len = [c + n for c, n in zip(num_cached, num_new)]
        self.num_seqs, self.num_tokens = len(self.seq_len), sum(num_new)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.tpb, self.dtype = tokens_per_block, dtype
        blocks_per_seq = [math.ceil(n / tokens_per_block) for n in self.seq_len]
        self.max_blocks = max(blocks_per_seq)
        self.num_blocks = sum(blocks_per_seq) + 3  # a few blocks no sequence owns
        order = torch.randperm(self.num_blocks, generator=gen).tolist()
        table = torch.full((self.num_seqs, self.max_blocks), UNUSED_BLOCK, dtype=torch.int32)
        for s, n in enumerate(blocks_per_seq):
            table[s, :n] = torch.tensor(order[:n], dtype=torch.int32)
            order = order[n:]
        self.block_table = table
        # [num_blocks, 2, nkv, tpb, hd]; values drawn in float then rounded: the reference uses the rounded ones.
        self.pool = torch.randn(self.num_blocks, 2, num_kv_heads, tokens_per_block, head_dim,
                                generator=gen).to(dtype)
        self.q = (torch.randn(self.num_tokens, num_heads * head_dim, generator=gen) * q_scale).to(dtype)
        self.scale = head_dim ** -0.5
        starts = [0]
        for n in num_new:
            starts.append(starts[-1] + n)
        self.seq_token_start = starts
        self.token_seq = [s for s, n in enumerate(num_new) for _ in range(n)]
        self.positions = [c + i for c, n in zip(num_cached, num_new) for i in range(n)]

    def gather_kv(self, s):
        """K, V of sequence s: [seq_len, nkv, hd] float64, read through the block table."""
        t = torch.arange(self.seq_len[s])
        blocks = self.block_table[s, t // self.tpb].long()
        kv = self.pool[blocks, :, :, t % self.tpb, :].double()  # [L, 2, nkv, hd]
        return kv[:, 0], kv[:, 1]

    def reference(self):
        """[num_tokens, nh * hd] float64: each new token attends causally over its sequence."""
        group = self.num_heads // self.num_kv_heads
        out = torch.empty(self.num_tokens, self.num_heads, self.head_dim, dtype=torch.float64)
        q = self.q.double().view(self.num_tokens, self.num_heads, self.head_dim)
        for s in range(self.num_seqs):
            k, v = self.gather_kv(s)
            k = k.repeat_interleave(group, dim=1)  # [L, nh, hd]: q head h reads kv head h // group
            v = v.repeat_interleave(group, dim=1)
            t0, n = self.seq_token_start[s], self.num_new[s]
            qs = q[t0:t0 + n]  # [n, nh, hd]
            scores = torch.einsum("ihd,jhd->hij", qs, k) * self.scale  # [nh, n, L]
            pos = self.num_cached[s] + torch.arange(n)
            mask = torch.arange(self.seq_len[s])[None, :] > pos[:, None]
            scores = scores.masked_fill(mask[None], float("-inf"))
            out[t0:t0 + n] = torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v)
        return out.view(self.num_tokens, -1)

    def to_device(self):
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")
        return dict(q=self.q.cuda(), pool=self.pool.cuda(), block_table=self.block_table.cuda(),
                    token_seq=i32(self.token_seq), positions=i32(self.positions),
                    seq_token_start=i32(self.seq_token_start), num_cached=i32(self.num_cached),
                    seq_len=i32(self.seq_len))


def check_close(out, ref, num_heads, head_dim):
    out = out.double().cpu()
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} outputs not written or not finite"
    err = (out - ref).norm() / ref.norm()
    assert err <= REL_TOL, f"relative error {err:.3g} > {REL_TOL}"
    rows_out = out.view(-1, num_heads, head_dim)
    rows_ref = ref.view(-1, num_heads, head_dim)
    row_err = (rows_out - rows_ref).norm(dim=-1) / rows_ref.norm(dim=-1).clamp_min(1e-6)
    worst = row_err.argmax().item()
    assert row_err.max() <= ROW_REL_TOL, (f"row error {row_err.max():.3g} > {ROW_REL_TOL} at token "
                                          f"{worst // num_heads}, head {worst % num_heads}")


def run_prefill(kernels, case, max_new_tokens=None):
    d = case.to_device()
    out = torch.full((case.num_tokens, case.num_heads * case.head_dim), float("nan"), dtype=case.dtype,
                     device="cuda")
    kernels.attention_prefill(
        out=out.data_ptr(), q=d["q"].data_ptr(), token_seq=d["token_seq"].data_ptr(),
        positions=d["positions"].data_ptr(), seq_token_start=d["seq_token_start"].data_ptr(),
        num_cached=d["num_cached"].data_ptr(), seq_len=d["seq_len"].data_ptr(), num_tokens=case.num_tokens,
        num_seqs=case.num_seqs, kv_data=d["pool"].data_ptr(), num_blocks=case.num_blocks,
        tokens_per_block=case.tpb, block_table=d["block_table"].data_ptr(), max_blocks_per_seq=case.max_blocks,
        max_new_tokens=max_new_tokens or max(case.num_new), num_heads=case.num_heads,
        num_kv_heads=case.num_kv_heads, head_dim=case.head_dim, scale=case.scale, dtype=DTYPES[case.dtype],
        stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out


def decode_workspace(kernels, case, num_splits):
    num_bytes = kernels.attention_decode_workspace_bytes(case.num_seqs, case.num_heads, case.head_dim, num_splits)
    return torch.full((num_bytes // 4,), float("nan"), dtype=torch.float32, device="cuda")


def launch_decode(kernels, case, d, out, workspace, num_splits):
    kernels.attention_decode(
        out=out.data_ptr(), q=d["q"].data_ptr(), seq_len=d["seq_len"].data_ptr(), num_seqs=case.num_seqs,
        kv_data=d["pool"].data_ptr(), num_blocks=case.num_blocks, tokens_per_block=case.tpb,
        block_table=d["block_table"].data_ptr(), max_blocks_per_seq=case.max_blocks, num_heads=case.num_heads,
        num_kv_heads=case.num_kv_heads, head_dim=case.head_dim, scale=case.scale, num_splits=num_splits,
        workspace=workspace.data_ptr(), dtype=DTYPES[case.dtype], stream=torch.cuda.current_stream().cuda_stream)


def run_decode(kernels, case, num_splits):
    d = case.to_device()
    out = torch.full((case.num_seqs, case.num_heads * case.head_dim), float("nan"), dtype=case.dtype,
                     device="cuda")
    launch_decode(kernels, case, d, out, decode_workspace(kernels, case, num_splits), num_splits)
    torch.cuda.synchronize()
    return out


HEADS = [(8, 8), (8, 2), (16, 2)]  # (num_heads, num_kv_heads): GQA ratios 1, 4, 8


@pytest.mark.parametrize("head_dim", [64, 128, 16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("tpb", [16, 32, 64])
def test_prefill_no_cache(kernels, head_dim, heads, tpb):
    case = PagedCase([0, 0, 0, 0, 0], [1, 17, 64, 65, 200], *heads, head_dim, tpb, seed=head_dim + tpb)
    check_close(run_prefill(kernels, case), case.reference(), case.num_heads, head_dim)


@pytest.mark.parametrize("head_dim", [64, 128, 16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("tpb", [16, 64])
def test_prefill_cached_prefix(kernels, head_dim, heads, tpb):
    # Chunked prefill (cached multiples of the block size) and prefix reuse (any cached count).
    case = PagedCase([32, 100, 512, 7, 63], [64, 7, 130, 1, 129], *heads, head_dim, tpb, seed=7 * tpb + head_dim)
    check_close(run_prefill(kernels, case), case.reference(), case.num_heads, head_dim)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_mixed_step(kernels, head_dim):
    # Context requests then generation requests in one step; max_new_tokens larger than needed.
    num_cached = [0, 300, 0, 1023, 5, 2000, 64]
    num_new = [333, 90, 1, 1, 1, 1, 1]
    case = PagedCase(num_cached, num_new, 32, 8, head_dim, 16, seed=head_dim, q_scale=3.0)
    check_close(run_prefill(kernels, case, max_new_tokens=400), case.reference(), case.num_heads, head_dim)


# 80 and 96: the decode kernel runs them in the lanes of 128 (the rest idle), prefill on its simple path.
@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("tpb", [16, 64])
def test_prefill_head_dims_80_96(kernels, head_dim, heads, tpb):
    case = PagedCase([0, 32, 100, 7, 0], [1, 64, 7, 129, 200], *heads, head_dim, tpb, seed=3 * tpb + head_dim)
    check_close(run_prefill(kernels, case), case.reference(), case.num_heads, head_dim)


def test_prefill_fp16_long(kernels):
    case = PagedCase([1000, 0], [1100, 777], 8, 2, 128, 32, dtype=torch.float16, seed=11)
    check_close(run_prefill(kernels, case), case.reference(), case.num_heads, 128)


DECODE_CONTEXTS = [1, 2, 15, 16, 17, 100, 1000, 4097, 8192]


# (head_dim, tokens per block, splits): every combination for the native head dims; 80 and 96 (run in
# the lanes of 128) at fewer block sizes and splits.
DECODE_SHAPES = ([(d, tpb, n) for d in (64, 128, 16) for tpb in (16, 32, 64) for n in (1, 5, 16)] +
                 [(d, tpb, n) for d in (80, 96) for tpb in (16, 64) for n in (1, 16)])


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim, tpb, num_splits", DECODE_SHAPES)
def test_decode(kernels, head_dim, heads, tpb, num_splits):
    contexts = DECODE_CONTEXTS
    case = PagedCase([c - 1 for c in contexts], [1] * len(contexts), *heads, head_dim, tpb,
                     seed=head_dim + tpb + num_splits)
    check_close(run_decode(kernels, case, num_splits), case.reference(), case.num_heads, head_dim)


def rerun_without_decode_mma(test_file, selection):
    """Runs the tests of test_file that `selection` (pytest -k) picks in a child with RTLLM_DECODE_MMA=0, which
    the kernels read once per process, and requires them to pass: the CUDA-core decode kernel on the cases
    that the tensor-core ones take by default."""
    env = dict(os.environ, RTLLM_DECODE_MMA="0")
    child = subprocess.run([sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", "-k",
                            selection],
                           env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and " failed" not in child.stdout, child.stdout[-2000:]


def test_decode_cuda_core_kernel_where_tensor_cores_serve():
    """A 16-bit pool at head_dim 64 / 128 runs the tensor-core decode kernel unless RTLLM_DECODE_MMA=0 selects
    the CUDA-core one: the decode cases again, under that setting, in a child."""
    rerun_without_decode_mma(__file__, "test_decode and not cuda_core")


@pytest.mark.parametrize("head_dim", [80, 96])
def test_decode_head_dims_80_96_fp16(kernels, head_dim):
    contexts = [5, 700, 4096]
    case = PagedCase([c - 1 for c in contexts], [1] * len(contexts), 32, 8, head_dim, 16, dtype=torch.float16,
                     seed=head_dim)
    check_close(run_decode(kernels, case, 8), case.reference(), case.num_heads, head_dim)


def test_decode_cuts_splits_to_each_length(kernels):
    # 64 splits launched: the 1- and 33-key sequences use 1 and 2 of them, the 5000-key one all 64. The
    # workspace is poisoned with NaN, so merging a split that never ran would show.
    contexts = [1, 33, 100, 5000]
    case = PagedCase([c - 1 for c in contexts], [1] * len(contexts), 32, 8, 128, 16, seed=17)
    check_close(run_decode(kernels, case, 64), case.reference(), case.num_heads, 128)


@pytest.mark.parametrize("heads", [(12, 2), (40, 8), (32, 1), (4, 4)])  # groups 6, 5, 32 (head chunks), 1
def test_decode_odd_groups(kernels, heads):
    contexts = [3, 333, 2048]
    case = PagedCase([c - 1 for c in contexts], [1] * len(contexts), *heads, 128, 16, seed=sum(heads),
                     q_scale=3.0)
    check_close(run_decode(kernels, case, 4), case.reference(), case.num_heads, 128)


def test_decode_fp16(kernels):
    contexts = [5, 700, 4096]
    case = PagedCase([c - 1 for c in contexts], [1] * len(contexts), 32, 8, 128, 16, dtype=torch.float16, seed=3)
    check_close(run_decode(kernels, case, 8), case.reference(), case.num_heads, 128)


def test_decode_matches_prefill_path(kernels):
    # A step of single-token sequences can go through either kernel; both must agree with the reference.
    contexts = [1, 64, 999]
    case = PagedCase([c - 1 for c in contexts], [1] * len(contexts), 32, 8, 128, 16, seed=5)
    ref = case.reference()
    check_close(run_decode(kernels, case, 3), ref, case.num_heads, 128)
    check_close(run_prefill(kernels, case), ref, case.num_heads, 128)


def test_decode_cuda_graph_reads_lengths_on_device(kernels):
    # Capture once, then change the sequence lengths in device memory only: the replay must follow them.
    contexts = [700, 2000, 33]
    case = PagedCase([c - 1 for c in contexts], [1] * len(contexts), 32, 8, 128, 16, seed=9)
    d = case.to_device()
    out = torch.full((case.num_seqs, case.num_heads * case.head_dim), float("nan"), dtype=case.dtype,
                     device="cuda")
    workspace = decode_workspace(kernels, case, 4)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        launch_decode(kernels, case, d, out, workspace, 4)  # warm-up outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            launch_decode(kernels, case, d, out, workspace, 4)
    for lengths in ([700, 2000, 33], [1, 1500, 34], [699, 17, 1]):
        case.seq_len = lengths
        case.num_cached = [n - 1 for n in lengths]
        d["seq_len"].copy_(torch.tensor(lengths, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_close(out, case.reference(), case.num_heads, 128)


def test_decode_plan(kernels):
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan = kernels.attention_decode_plan
    BF16, FP16, FP8, INT8 = 0, 1, 3, 5
    assert plan(128, 8, 128, 4096, num_sms) == (1, False)  # 1024 CTAs already fill the GPU
    assert plan(1, 8, 128, 40, num_sms) == (1, False)  # too short to split
    assert plan(1, 8, 128, 384, num_sms) == (12, True)  # batch 1: one loop step per split
    # Up to 4 CTAs per SM, 2 for the CUDA-core kernel of an 8-bit pool, at most 32 splits (docs/performance.md).
    # Split steps fold the preparation into the attention kernel, except over an FP8 pool at head_dim 64 / 128,
    # which runs qkv_prepare and the tensor-core decode kernel unless RTLLM_DECODE_MMA=0 (the child of
    # test_decode_cuda_core_kernel_where_tensor_cores_serve) turns that kernel off.
    fp8_mma = (4, False) if os.environ.get("RTLLM_DECODE_MMA") != "0" else (2, True)
    for batch, keys in [(1, 4096), (1, 16384), (2, 4096), (4, 4096), (8, 4096), (8, 16384), (16, 8192), (64, 4096)]:
        for kv_dtype, head_dim, per_sm, fused in [(BF16, 128, 4, True), (FP16, 64, 4, True), (FP8, 128, *fp8_mma),
                                                  (FP8, 64, *fp8_mma), (FP8, 96, 2, True), (INT8, 128, 2, True)]:
            splits = max(1, min(per_sm * num_sms // (8 * batch), keys // 32, 32))
            assert plan(batch, 8, head_dim, keys, num_sms, kv_dtype) == (splits, fused and splits > 1), (
                batch, keys, kv_dtype, head_dim)
    assert plan(1, 8, 128, 16384, num_sms) == plan(1, 8, 128, 16384, num_sms, BF16)  # 16-bit by default
    with pytest.raises(ValueError, match="kv_dtype 2"):
        plan(1, 8, 128, 4096, num_sms, 2)


def test_rejects_unsupported_arguments(kernels):
    case = PagedCase([0], [4], 8, 2, 128, 16)
    d = case.to_device()
    out = torch.empty(4, 8 * 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError):
        launch_decode(kernels, case, d, out, decode_workspace(kernels, case, 1), 0)  # num_splits 0
    case.tpb = 24  # tokens_per_block must be a power of two
    with pytest.raises(ValueError):
        launch_decode(kernels, case, d, out, decode_workspace(kernels, case, 1), 1)
    with pytest.raises(ValueError):
        run_prefill(kernels, case)
    case.tpb = 16
    case.head_dim = 72  # a multiple of 8 the decode kernels are not built for
    with pytest.raises(ValueError):
        launch_decode(kernels, case, d, out, decode_workspace(kernels, case, 1), 1)
    case.head_dim = 100  # not a multiple of 8 (16-byte rows)
    with pytest.raises(ValueError):
        run_prefill(kernels, case)
