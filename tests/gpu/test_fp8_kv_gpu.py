"""An FP8 (E4M3) KV cache on CUDA (docs/engine_format.md, "KV cache layout").

Kernels: the pool holds e4m3 codes of k / k_scale and v / v_scale (scales != 1, not powers of two).
- Writes (qkv_prepare, attention_decode_qkv): the stored codes against an e4m3 rounding written here in numpy
  (round to nearest even, saturation to ±448, subnormals), independent of the kernels and of torch. V is
  copied from the input, so its codes must match exactly: e4m3(float32(v) / float32(v_scale)). K comes from
  qk-norm + RoPE in float32 on the device against float64 here, so its stored value must be within half an
  e4m3 step of the float64 k / k_scale plus the float32 slack of those transforms (2e-3 relative, as the
  bf16 tests' 1e-2 bound on k holds the bf16 rounding too).
- Reads (attention_decode, split-KV included, and attention_prefill with a cached prefix): random codes in
  the pool; the float64 reference attends over code · scale, the same values the kernels decode. What
  remains is the kernels' float32 math and the 16-bit q / output, hence test_attention.py's bounds.
Outputs and workspaces are poisoned with NaN; new-token slots of the pool too.
Runner: an F8_E4M3 pool is half a BF16 pool per block, so the same memory fraction holds twice the blocks;
an engine built with kv_cache_quant_algo FP8 runs on CUDA close to the CPU backend (bound below).
"""
import gc
import pathlib
import sys

import numpy as np
import pytest
import torch

from test_attention import DTYPES, PagedCase, check_close, decode_workspace, rerun_without_decode_mma
from test_kernels_basic import inv_freq_for, prepare_ref

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from checkpoints import make_hf_checkpoint  # noqa: E402
from engine_fixture import TinyModel, write_engine  # noqa: E402
from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE, random_prompts  # noqa: E402

import rtllm  # noqa: E402
from rtllm import BuildConfig, _core  # noqa: E402
from rtllm.models import AutoModelForCausalLM  # noqa: E402
from rtllm.quantization import QuantAlgo, QuantConfig  # noqa: E402

K_SCALE, V_SCALE = 0.0173, 0.0291
E4M3_MAX = 448.0


def _exponent(a):
    """floor(log2(a)) for a > 0, exactly (frexp: a = m · 2^e with m in [0.5, 1)); 0 for a = 0."""
    return np.where(a > 0, np.frexp(a)[1] - 1, 0).astype(np.float64)


def e4m3(x):
    """float32 (or float64) array -> float64 values of its E4M3 rounding: nearest, ties to even, saturated
    to ±448, subnormals below 2^-6 in steps of 2^-9."""
    x = np.asarray(x, np.float64)
    a = np.minimum(np.abs(x), E4M3_MAX)
    step = np.exp2(np.maximum(_exponent(a), -6.0) - 3.0)  # 3 mantissa bits; the subnormal step below 2^-6
    r = np.minimum(np.round(a / step) * step, E4M3_MAX)  # np.round: half to even; a / step is exact
    return np.copysign(r, x)


def e4m3_half_step(x):
    """Half the E4M3 spacing at |x| (the largest rounding error of a value in range)."""
    a = np.abs(np.asarray(x, np.float64))
    return 0.5 * np.exp2(np.maximum(_exponent(a), -6.0) - 3.0)


def to_codes(values):
    """float64 values already on the E4M3 grid -> uint8 codes (torch's conversion is exact on them)."""
    t = torch.from_numpy(np.ascontiguousarray(values)).to(torch.float8_e4m3fn)
    assert np.array_equal(t.double().numpy(), values), "values off the E4M3 grid"
    return t.view(torch.uint8)


def decode_codes(codes):
    return codes.view(torch.float8_e4m3fn).double().numpy()


def test_numpy_e4m3_matches_torch_in_range():
    """The reference rounding agrees with torch's (which does not saturate) inside ±448, ties included."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=20000) * np.exp2(rng.uniform(-12, 9, 20000)),
                        [0.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 1.0625, 1.1875, 440.0, 447.9, -448.0]])
    x = x[np.abs(x) <= E4M3_MAX].astype(np.float32)
    assert np.array_equal(e4m3(x), torch.from_numpy(x).to(torch.float8_e4m3fn).double().numpy())
    assert e4m3(np.float32(1e6)) == E4M3_MAX and e4m3(np.float32(-460.0)) == -E4M3_MAX


class Fp8Case(PagedCase):
    """A PagedCase whose pool holds random E4M3 codes; `pool` (what the reference reads) is code · scale in
    float64, `codes` what the kernels get."""

    def __init__(self, *args, k_scale=K_SCALE, v_scale=V_SCALE, **kwargs):
        super().__init__(*args, **kwargs)
        rng = np.random.default_rng(kwargs.get("seed", 0) + 1000)
        shape = tuple(self.pool.shape)
        # Codes ~ N(0, 40) on the E4M3 grid (subnormals near 0 up to the saturated ±448): code · k_scale is
        # of order 1, like the keys of test_attention.py.
        grid = e4m3(np.clip(rng.normal(size=shape) * 40.0, -E4M3_MAX, E4M3_MAX))
        self.codes = to_codes(grid)
        self.k_scale, self.v_scale = k_scale, v_scale
        scales = np.array([np.float32(k_scale), np.float32(v_scale)], np.float64).reshape(1, 2, 1, 1, 1)
        self.pool = torch.from_numpy(grid * scales)

    def to_device(self):
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")
        return dict(q=self.q.cuda(), pool=self.codes.cuda(), block_table=self.block_table.cuda(),
                    token_seq=i32(self.token_seq), positions=i32(self.positions),
                    seq_token_start=i32(self.seq_token_start), num_cached=i32(self.num_cached),
                    seq_len=i32(self.seq_len))


def kv_args(kernels, case):
    return dict(kv_dtype=kernels.FP8_E4M3, k_scale=case.k_scale, v_scale=case.v_scale)


def run_prefill_fp8(kernels, case):
    d = case.to_device()
    out = torch.full((case.num_tokens, case.num_heads * case.head_dim), float("nan"), dtype=case.dtype,
                     device="cuda")
    kernels.attention_prefill(
        out=out.data_ptr(), q=d["q"].data_ptr(), token_seq=d["token_seq"].data_ptr(),
        positions=d["positions"].data_ptr(), seq_token_start=d["seq_token_start"].data_ptr(),
        num_cached=d["num_cached"].data_ptr(), seq_len=d["seq_len"].data_ptr(), num_tokens=case.num_tokens,
        num_seqs=case.num_seqs, kv_data=d["pool"].data_ptr(), num_blocks=case.num_blocks,
        tokens_per_block=case.tpb, block_table=d["block_table"].data_ptr(), max_blocks_per_seq=case.max_blocks,
        max_new_tokens=max(case.num_new), num_heads=case.num_heads, num_kv_heads=case.num_kv_heads,
        head_dim=case.head_dim, scale=case.scale, dtype=DTYPES[case.dtype], **kv_args(kernels, case),
        stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out


def run_decode_fp8(kernels, case, num_splits):
    d = case.to_device()
    out = torch.full((case.num_seqs, case.num_heads * case.head_dim), float("nan"), dtype=case.dtype,
                     device="cuda")
    workspace = decode_workspace(kernels, case, num_splits)
    kernels.attention_decode(
        out=out.data_ptr(), q=d["q"].data_ptr(), seq_len=d["seq_len"].data_ptr(), num_seqs=case.num_seqs,
        kv_data=d["pool"].data_ptr(), num_blocks=case.num_blocks, tokens_per_block=case.tpb,
        block_table=d["block_table"].data_ptr(), max_blocks_per_seq=case.max_blocks, num_heads=case.num_heads,
        num_kv_heads=case.num_kv_heads, head_dim=case.head_dim, scale=case.scale, num_splits=num_splits,
        workspace=workspace.data_ptr(), dtype=DTYPES[case.dtype], **kv_args(kernels, case),
        stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out


def decode_lengths(batch, seed):
    """Context lengths: one key, a partial first block, exact blocks, and past the split threshold (32 keys
    per split, 4097 keys over several blocks and splits). Batch 64 adds random lengths up to 600."""
    fixed = [1, 5, 16, 17, 100, 1000, 4097]
    if batch == 1:
        return [4097]
    if batch <= len(fixed):
        return fixed[:batch]
    rng = np.random.default_rng(seed)
    return fixed + rng.integers(1, 601, batch - len(fixed)).tolist()


# ------------------------------------------------------------------------------------------------ reads


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("head_dim,heads", [(128, (32, 8)), (128, (8, 8)), (64, (8, 2)), (128, (16, 2)),
                                            (64, (12, 2)), (256, (4, 1)), (16, (4, 2)),
                                            (80, (8, 2)), (96, (12, 4))])  # GQA 4, 1, 4, 8, 6, 4, 2, 4, 3
@pytest.mark.parametrize("num_splits", [1, 37])  # one CTA per (sequence, KV head), or the workspace merge
def test_decode_reads_fp8_pool(kernels, dtype, batch, head_dim, heads, num_splits):
    num_heads, num_kv_heads = heads
    if batch == 64 and (head_dim, heads) not in [(128, (32, 8)), (64, (8, 2))]:
        pytest.skip("batch 64 on two shapes keeps the float64 reference short")
    seed = batch + head_dim + num_heads
    lengths = decode_lengths(batch, seed)
    case = Fp8Case([n - 1 for n in lengths], [1] * batch, num_heads, num_kv_heads, head_dim, 16, dtype=dtype,
                   seed=seed)
    check_close(run_decode_fp8(kernels, case, num_splits), case.reference(), num_heads, head_dim)


def test_decode_cuda_core_kernel_reads_fp8_pool():
    """At head_dim 64 / 128 an FP8 pool decodes on tensor cores unless RTLLM_DECODE_MMA=0 (read once per
    process) selects the CUDA-core kernel: the FP8 decode read cases again, under that setting, in a child."""
    rerun_without_decode_mma(__file__, "test_decode_reads_fp8_pool")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim,heads", [(128, (32, 8)), (64, (8, 2)), (128, (8, 8)), (32, (8, 2)),
                                            (80, (8, 2)), (96, (8, 8))])
@pytest.mark.parametrize("tpb", [16, 64])
def test_prefill_reads_fp8_pool_with_cached_prefix(kernels, dtype, head_dim, heads, tpb):
    """Sequences with and without a cached prefix, new-token counts across key tiles (64) and blocks; head_dim
    32 takes the simple path, 64 and 128 the tensor-core one."""
    num_heads, num_kv_heads = heads
    case = Fp8Case([0, 5, 100, 1000, 63], [17, 64, 3, 130, 1], num_heads, num_kv_heads, head_dim, tpb,
                   dtype=dtype, seed=head_dim + tpb)
    check_close(run_prefill_fp8(kernels, case), case.reference(), num_heads, head_dim)


def test_prefill_and_decode_agree_on_fp8_pool(kernels):
    """The last token of each sequence through both kernels: same values within the 16-bit output rounding."""
    lengths = [1, 33, 700]
    case = Fp8Case([n - 1 for n in lengths], [1] * 3, 16, 4, 128, 16, seed=3)
    prefill = run_prefill_fp8(kernels, case).double()
    decode = run_decode_fp8(kernels, case, 8).double()
    assert ((prefill - decode).norm() / decode.norm()).item() <= 1e-2


def test_fp8_pool_arguments_are_checked(kernels):
    case = Fp8Case([3], [1], 8, 2, 128, 16)
    for k_scale, v_scale in [(0.0, 1.0), (1.0, -1.0), (float("inf"), 1.0), (1.0, float("nan"))]:
        case.k_scale, case.v_scale = k_scale, v_scale
        with pytest.raises(ValueError):
            run_decode_fp8(kernels, case, 1)
        with pytest.raises(ValueError):
            run_prefill_fp8(kernels, case)
    case.k_scale, case.v_scale = K_SCALE, V_SCALE
    with pytest.raises(ValueError):  # an E5M2 pool is not read
        d = case.to_device()
        kernels.attention_decode(
            out=d["q"].data_ptr(), q=d["q"].data_ptr(), seq_len=d["seq_len"].data_ptr(), num_seqs=1,
            kv_data=d["pool"].data_ptr(), num_blocks=case.num_blocks, tokens_per_block=16,
            block_table=d["block_table"].data_ptr(), max_blocks_per_seq=case.max_blocks, num_heads=8,
            num_kv_heads=2, head_dim=128, scale=case.scale, num_splits=1, workspace=0, dtype=0,
            kv_dtype=kernels.FP8_E5M2)


# ------------------------------------------------------------------------------------------------ writes


def check_stored_k(got_codes, k_exact, k_scale):
    """Stored K codes against the float64 k / k_scale: within half an E4M3 step (saturated at ±448) plus the
    float32 slack of qk-norm / RoPE on the device."""
    got = decode_codes(got_codes)
    want = np.asarray(k_exact, np.float64) / np.float32(k_scale)
    clipped = np.clip(want, -E4M3_MAX, E4M3_MAX)
    bound = e4m3_half_step(clipped) + 2e-3 * np.abs(want) + 1e-6
    assert np.all(np.abs(got - clipped) <= bound), f"worst excess {np.max(np.abs(got - clipped) - bound):.3g}"
    # Not vacuous: most codes are the exact rounding of the float64 value.
    assert np.mean(got == e4m3(want)) >= 0.95


def check_stored_v(got_codes, v_in, v_scale):
    """V codes are exactly e4m3(float32(v) / float32(v_scale))."""
    v32 = v_in.float().numpy() / np.float32(v_scale)  # float32 division, as the kernels do
    assert np.array_equal(decode_codes(got_codes), e4m3(v32))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(128, 32, 8), (64, 8, 2), (16, 4, 4), (80, 8, 2),
                                                             (96, 4, 4)])
@pytest.mark.parametrize("rope,qk_norm", [(True, False), (True, True), (False, False)])
def test_qkv_prepare_writes_fp8_codes(kernels, dtype, head_dim, num_heads, num_kv_heads, rope, qk_norm):
    gen = torch.Generator().manual_seed(head_dim + 2 * rope + qk_norm)
    tpb, num_tokens, num_blocks = 16, 37, 8
    q_w, kv_w = num_heads * head_dim, num_kv_heads * head_dim
    # v spans saturation (|v / v_scale| > 448 from |v| > 13) and subnormals (|v| < 4.5e-4).
    qkv = (torch.randn(num_tokens, q_w + 2 * kv_w, generator=gen) *
           torch.exp2(torch.rand(num_tokens, q_w + 2 * kv_w, generator=gen) * 16 - 11)).to(dtype)
    positions = torch.randperm(num_blocks * tpb, generator=gen)[:num_tokens].to(torch.int32)
    token_seq = torch.zeros(num_tokens, dtype=torch.int32)
    block_table = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(1, -1)
    inv_freq = inv_freq_for(head_dim) if rope else None
    q_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None
    k_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None
    pool = torch.full((num_blocks, 2, num_kv_heads, tpb, head_dim), 0x7F, dtype=torch.uint8)  # NaN codes
    untouched_value = 0x7F
    pool_d, qkv_d = pool.cuda(), qkv.cuda()
    # device copies held for the launch: a temporary's memory may be reused before the kernel runs
    token_seq_d, positions_d, block_table_d = token_seq.cuda(), positions.cuda(), block_table.cuda()
    q_out = torch.full((num_tokens, q_w), float("nan"), dtype=dtype, device="cuda")
    kernels.qkv_prepare(q_out.data_ptr(), qkv_d.data_ptr(), q_w + 2 * kv_w, 0, q_w, q_w + kv_w,
                        inv_freq.data_ptr() if rope else 0, q_norm.data_ptr() if qk_norm else 0,
                        k_norm.data_ptr() if qk_norm else 0, 1e-6, token_seq=token_seq_d.data_ptr(),
                        positions=positions_d.data_ptr(), num_tokens=num_tokens, num_seqs=1,
                        kv_data=pool_d.data_ptr(), num_blocks=num_blocks, tokens_per_block=tpb,
                        block_table=block_table_d.data_ptr(), max_blocks_per_seq=num_blocks,
                        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        dtype=DTYPES[dtype], kv_dtype=kernels.FP8_E4M3, k_scale=K_SCALE, v_scale=V_SCALE,
                        stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    got = pool_d.cpu()
    pos = positions.long()
    blocks, slots = block_table[0, pos // tpb].long(), pos % tpb
    k_ref = prepare_ref(qkv[:, q_w:q_w + kv_w], num_kv_heads, head_dim, k_norm, positions.cuda(), inv_freq)
    check_stored_k(got[blocks, 0, :, slots].reshape(num_tokens, -1), k_ref.numpy(), K_SCALE)
    check_stored_v(got[blocks, 1, :, slots].reshape(num_tokens, -1), qkv[:, q_w + kv_w:], V_SCALE)
    written = torch.zeros(num_blocks, tpb, dtype=torch.bool)
    written[blocks, slots] = True
    assert (got.permute(0, 3, 1, 2, 4)[~written] == untouched_value).all(), "a slot not written was changed"
    q_ref = prepare_ref(qkv[:, :q_w], num_heads, head_dim, q_norm, positions.cuda(), inv_freq)
    q_err = ((q_out.double().cpu() - q_ref).norm() / q_ref.norm()).item()
    assert q_err <= 1e-2  # q stays in the activation dtype


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim,heads", [(128, (32, 8)), (64, (8, 2)), (128, (16, 2)), (16, (4, 4)),
                                            (80, (8, 2)), (96, (12, 4))])
@pytest.mark.parametrize("num_splits", [1, 16])
@pytest.mark.parametrize("rope,qk_norm", [(True, True), (False, False)])
def test_decode_qkv_writes_and_reads_fp8(kernels, dtype, head_dim, heads, num_splits, rope, qk_norm):
    """attention_decode_qkv on an FP8 pool: the new key / value stored as codes (checked as above) and the
    attention over the cached codes plus the new ones (which the kernel keeps in shared memory: the new slots
    are poisoned with NaN codes before the call)."""
    num_heads, num_kv_heads = heads
    seed = head_dim + num_heads + num_splits + 2 * rope + qk_norm
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 17, 100, 1000, 4097]
    case = Fp8Case([n - 1 for n in lengths], [1] * len(lengths), num_heads, num_kv_heads, head_dim, 16,
                   dtype=dtype, seed=seed)
    q_w, kv_w = num_heads * head_dim, num_kv_heads * head_dim
    v_col, q_col, k_col = 0, kv_w, kv_w + q_w
    qkv = (torch.randn(case.num_seqs, q_w + 2 * kv_w + 8, generator=gen) * 2.0).to(dtype)
    positions = torch.tensor(case.positions, dtype=torch.int32)
    inv_freq = inv_freq_for(head_dim, theta=500000.0) if rope else None
    q_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None
    k_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None
    q_ref = prepare_ref(qkv[:, q_col:q_col + q_w], num_heads, head_dim, q_norm, positions.cuda(), inv_freq)
    k_ref = prepare_ref(qkv[:, k_col:k_col + kv_w], num_kv_heads, head_dim, k_norm, positions.cuda(), inv_freq)

    slots = [(int(case.block_table[s, p // case.tpb]), p % case.tpb) for s, p in enumerate(case.positions)]
    before = case.codes.clone()
    for b, i in slots:
        case.codes[b, :, :, i] = 0x7F  # NaN codes
    d = case.to_device()
    out = torch.full((case.num_seqs, q_w), float("nan"), dtype=dtype, device="cuda")
    qkv_d = qkv.cuda()
    kernels.attention_decode_qkv(
        out=out.data_ptr(), qkv=qkv_d.data_ptr(), qkv_row_stride=qkv.shape[1], q_col=q_col, k_col=k_col,
        v_col=v_col, inv_freq=inv_freq.data_ptr() if rope else 0,
        q_norm_weight=q_norm.data_ptr() if qk_norm else 0, k_norm_weight=k_norm.data_ptr() if qk_norm else 0,
        qk_norm_eps=1e-6, positions=d["positions"].data_ptr(), seq_len=d["seq_len"].data_ptr(),
        num_seqs=case.num_seqs, kv_data=d["pool"].data_ptr(), num_blocks=case.num_blocks, tokens_per_block=case.tpb,
        block_table=d["block_table"].data_ptr(), max_blocks_per_seq=case.max_blocks, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, scale=case.scale, num_splits=num_splits,
        workspace=decode_workspace(kernels, case, num_splits).data_ptr(), dtype=DTYPES[dtype],
        **kv_args(kernels, case), stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    pool = d["pool"].cpu()

    k_codes = torch.stack([pool[b, 0, :, i] for b, i in slots]).reshape(case.num_seqs, -1)
    v_codes = torch.stack([pool[b, 1, :, i] for b, i in slots]).reshape(case.num_seqs, -1)
    check_stored_k(k_codes, k_ref.numpy(), K_SCALE)
    check_stored_v(v_codes, qkv[:, v_col:v_col + kv_w], V_SCALE)
    written = torch.zeros(case.num_blocks, case.tpb, dtype=torch.bool)
    for b, i in slots:
        written[b, i] = True
    untouched = ~written[:, None, None, :].expand(-1, 2, num_kv_heads, -1)
    assert torch.equal(pool[untouched], before[untouched])

    # The reference attends with the prepared q and the codes the kernel stored.
    case.q = q_ref.to(dtype)
    k_vals = torch.from_numpy(decode_codes(k_codes) * np.float32(K_SCALE)).view(case.num_seqs, num_kv_heads, -1)
    v_vals = torch.from_numpy(decode_codes(v_codes) * np.float32(V_SCALE)).view(case.num_seqs, num_kv_heads, -1)
    for s, (b, i) in enumerate(slots):
        case.pool[b, 0, :, i] = k_vals[s]
        case.pool[b, 1, :, i] = v_vals[s]
    check_close(out, case.reference(), num_heads, head_dim)


# ------------------------------------------------------------------------------------------------ runner


def test_fp8_pool_holds_twice_the_blocks(tmp_path):
    """Same engine, same kv_free_memory_fraction: an F8_E4M3 pool has half the bytes per block of the BF16
    one, so twice the blocks (up to the free memory moving between the two loads, and the one scratch
    block)."""
    m = TinyModel(dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=64, num_heads=4)
    path = write_engine(tmp_path / "e", m)
    engine = _core.Engine.load(str(path))
    sizes = {}
    for dtype in ["BF16", "F8_E4M3"]:
        cfg = _core.RuntimeConfig(device=_core.DeviceKind.CUDA, tokens_per_block=16, kv_free_memory_fraction=0.05,
                                  kv_cache_dtype=dtype)
        runner = _core.ModelRunner(engine, cfg)
        assert runner.config.kv_cache_dtype == dtype
        blocks = runner.config.num_kv_blocks
        per_block = m.num_layers * 2 * m.num_kv_heads * 16 * m.head_dim * (2 if dtype == "BF16" else 1)
        assert runner.kv_pool_bytes == (blocks + 1) * per_block
        sizes[dtype] = blocks + 1
        del runner
        gc.collect()
    ratio = sizes["F8_E4M3"] / sizes["BF16"]
    assert abs(ratio - 2.0) <= 0.02, f"F8_E4M3 pool {sizes['F8_E4M3']} blocks, BF16 {sizes['BF16']}: ratio {ratio:.4f}"


def test_head_dim_72_is_refused_at_load(tmp_path):
    m = TinyModel(dtype="bfloat16", head_dim=72)
    path = write_engine(tmp_path / "e", m)
    with pytest.raises(_core.RtllmError, match="head_dim 72.*supported: 16, 32, 64, 80, 96, 128, 256"):
        _core.ModelRunner(_core.Engine.load(str(path)),
                          _core.RuntimeConfig(device=_core.DeviceKind.CUDA, tokens_per_block=16, num_kv_blocks=64))


# End to end: an engine built with kv_cache_quant_algo FP8 from a bf16 checkpoint (the same weights on both
# backends), run on the CPU (float32 math) and on CUDA (bf16 activations). Both hold E4M3 K/V, but of slightly
# different k and v: bf16 activations move a value by ~2^-9 relative, an E4M3 step is 2^-3 to 2^-4, so ~3% of
# the codes differ by one step (~6% of that element) between the backends. That adds ~1e-2 relative to the
# bf16 error (bounded by 2e-2 in test_generation_gpu), hence LOGITS_RTOL 4e-2 on the last-token logits
# (2e-2 + twice the estimate). A misread code or a misapplied scale moves the logits by far more. Greedy tokens:
# the CPU's and CUDA's are compared teacher-forced as in test_generation_gpu: each CUDA token is the CPU's
# argmax or within MARGIN_REL · rms(logits) of it, and at least 90% are exactly the CPU's argmax.
LOGITS_RTOL = 4e-2
MARGIN_REL = 0.1
E2E_BUILD = dict(max_batch_size=8, max_input_len=64, max_seq_len=128, max_num_tokens=256)


def _runner(engine_dir, device, num_blocks):
    engine = _core.Engine.load(str(engine_dir))
    return _core.ModelRunner(engine, _core.RuntimeConfig(device=device, tokens_per_block=16,
                                                         num_kv_blocks=num_blocks))


def _last_logits(runner, seqs):
    max_blocks = max(-(-len(p) // 16) for p in seqs)
    blocks = np.arange(max_blocks * len(seqs), dtype=np.int32)[::-1].reshape(len(seqs), max_blocks)
    return np.asarray(runner.forward(np.concatenate([np.asarray(p, np.int32) for p in seqs]),
                                     [len(p) for p in seqs], [0] * len(seqs), np.ascontiguousarray(blocks)))


@pytest.mark.parametrize("head_dim", [64, 128, 80])  # 80: a RoPE pair straddles 16-dim FP8 decode lanes
def test_fp8_kv_engine_cuda_matches_cpu(tmp_path, head_dim):
    hf = make_hf_checkpoint(tmp_path / "hf", arch="llama", dtype="bfloat16", head_dim=head_dim,
                            vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = AutoModelForCausalLM.from_hugging_face(str(hf))
    rtllm.build(model, BuildConfig(**E2E_BUILD), QuantConfig(kv_cache_quant_algo=QuantAlgo.FP8)).save(
        str(tmp_path / "engine"))
    prompts = random_prompts(np.random.default_rng(head_dim), [1, 7, 20, 33, 64])
    cpu = _runner(tmp_path / "engine", _core.DeviceKind.CPU, 64)
    cuda = _runner(tmp_path / "engine", _core.DeviceKind.CUDA, 64)
    assert cpu.config.kv_cache_dtype == cuda.config.kv_cache_dtype == "F8_E4M3"
    for prompt, c, g in zip(prompts, _last_logits(cpu, prompts), _last_logits(cuda, prompts)):
        assert np.all(np.isfinite(g))
        err = np.linalg.norm(g - c) / np.linalg.norm(c)
        assert err <= LOGITS_RTOL, f"prompt of {len(prompt)}: relative error {err:.3g}"

    # Greedy decoding on CUDA through LLM (decode steps: the FP8 decode kernels), checked against the CPU.
    params = rtllm.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with rtllm.LLM(str(tmp_path / "engine"), device="cuda", skip_tokenizer_init=True,
                   kv_cache_config=rtllm.KvCacheConfig(free_gpu_memory_fraction=0.02)) as llm:
        outputs = [o.outputs[0].token_ids for o in llm.generate([list(p) for p in prompts], params,
                                                                  use_tqdm=False)]
    num_exact = num_total = 0
    for prompt, tokens in zip(prompts, outputs):
        assert len(tokens) == 8
        for i, token in enumerate(tokens):
            logits = _last_logits(cpu, [list(prompt) + list(tokens[:i])])[0].astype(np.float64)
            best = int(np.argmax(logits))
            margin = MARGIN_REL * np.sqrt(np.mean(logits ** 2))
            assert logits[best] - logits[token] <= margin, (
                f"step {i}: token {token} is {logits[best] - logits[token]:.3g} below the CPU's argmax {best}")
            num_exact += token == best
            num_total += 1
    assert num_exact >= 0.9 * num_total, f"only {num_exact} of {num_total} CUDA tokens are the CPU's argmax"
