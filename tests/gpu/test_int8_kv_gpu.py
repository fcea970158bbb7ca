"""An INT8 KV cache on CUDA (docs/engine_format.md, "KV cache layout"), as test_fp8_kv_gpu.py tests the FP8 one.

Kernels: the pool holds int8 codes clamp(round_half_even(x / scale), -127, 127) of k / k_scale and v / v_scale.
- Writes (qkv_prepare, attention_decode_qkv): V is copied from the input, so its codes must match exactly
  the numpy rounding of float32(v) / float32(v_scale) (np.rint: half to even), ties included (v_scale 2^-5
  and a quarter of the values exactly halfway between two codes) and values beyond ±127 clamped. K comes from
  qk-norm + RoPE in float32 on the device against float64 here, so its code must be within half a step of the
  float64 k / k_scale plus the float32 slack of those transforms (2e-3 relative), and at least 95% of the codes
  must be exactly the float64 rounding.
- Reads (attention_decode, split-KV included, and attention_prefill with a cached prefix): random codes over
  the whole range in the pool; the float64 reference attends over code · scale, the same values the kernels
  decode. What remains is the kernels' float32 math and the 16-bit q / output: test_attention.py's bounds.
Outputs and workspaces are poisoned with NaN. int8 has no NaN: untouched pool slots and the new-token slots of
attention_decode_qkv hold -128, a code no writer produces, and must come back unchanged or overwritten.
Runner: an I8 pool is half a BF16 pool per block, so the same memory fraction holds twice the blocks; an engine
built with kv_cache_quant_algo INT8 runs on CUDA close to the CPU backend.
"""
import gc
import json
import pathlib
import sys

import numpy as np
import pytest
import torch

from test_attention import DTYPES, PagedCase, check_close, decode_workspace
from test_fp8_kv_gpu import E2E_BUILD, MARGIN_REL, _last_logits, _runner, decode_lengths
from test_kernels_basic import inv_freq_for, prepare_ref

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from checkpoints import make_hf_checkpoint  # noqa: E402
from engine_fixture import TinyModel, write_engine  # noqa: E402
from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE, random_prompts  # noqa: E402

import rtllm  # noqa: E402
from rtllm import BuildConfig, _core  # noqa: E402
from rtllm.models import AutoModelForCausalLM  # noqa: E402
from rtllm.quantization import QuantAlgo, QuantConfig  # noqa: E402

K_SCALE, V_SCALE = 0.0173, 0.0291   # reads: not powers of two
V_SCALE_TIES = 2.0 ** -5           # writes: v / v_scale exact, so planted ties are exact ties
POISON = -128                      # a code the writers never produce (they clamp to ±127)


def set_int8_kv(path, scales):
    """Marks the engine at `path` as kv_cache_quant_algo INT8 with per-layer (k_scale, v_scale)."""
    config = json.loads((path / "config.json").read_text())
    config["quantization"]["kv_cache_quant_algo"] = "INT8"
    for node in config["graph"]["nodes"]:
        if node["op"] == "attention":
            node["attrs"]["k_scale"], node["attrs"]["v_scale"] = scales[node["attrs"]["layer_idx"]]
    (path / "config.json").write_text(json.dumps(config))


def int8_round(x):
    """float64 values of clamp(round_half_even(x), -127, 127) of an array already divided by the scale."""
    return np.clip(np.rint(np.asarray(x, np.float64)), -127, 127)


class Int8Case(PagedCase):
    """A PagedCase whose pool holds random int8 codes; `pool` (what the reference reads) is code · scale in
    float64, `codes` what the kernels get."""

    def __init__(self, *args, k_scale=K_SCALE, v_scale=V_SCALE, **kwargs):
        super().__init__(*args, **kwargs)
        rng = np.random.default_rng(kwargs.get("seed", 0) + 2000)
        shape = tuple(self.pool.shape)
        # Codes ~ N(0, 40), clamped to ±127 (both ends present): code · scale is of order 1, like the keys of
        # test_attention.py. -128 appears too: a reader must decode any byte as its signed value.
        codes = np.clip(np.rint(rng.normal(size=shape) * 40.0), -128, 127)
        self.codes = torch.from_numpy(codes.astype(np.int8))
        self.k_scale, self.v_scale = k_scale, v_scale
        scales = np.array([np.float32(k_scale), np.float32(v_scale)], np.float64).reshape(1, 2, 1, 1, 1)
        self.pool = torch.from_numpy(codes * scales)

    def to_device(self):
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")
        return dict(q=self.q.cuda(), pool=self.codes.cuda(), block_table=self.block_table.cuda(),
                    token_seq=i32(self.token_seq), positions=i32(self.positions),
                    seq_token_start=i32(self.seq_token_start), num_cached=i32(self.num_cached),
                    seq_len=i32(self.seq_len))


def kv_args(kernels, case):
    return dict(kv_dtype=kernels.INT8, k_scale=case.k_scale, v_scale=case.v_scale)


def run_prefill_int8(kernels, case):
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


def run_decode_int8(kernels, case, num_splits):
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


# ------------------------------------------------------------------------------------------------ reads


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("head_dim,heads", [(128, (32, 8)), (128, (8, 8)), (64, (8, 2)), (128, (16, 2)),
                                            (64, (12, 2)), (256, (4, 1)), (16, (4, 2)),
                                            (80, (8, 2)), (96, (12, 4))])  # GQA 4, 1, 4, 8, 6, 4, 2, 4, 3
@pytest.mark.parametrize("num_splits", [1, 37])  # one CTA per (sequence, KV head), or the workspace merge
def test_decode_reads_int8_pool(kernels, dtype, batch, head_dim, heads, num_splits):
    num_heads, num_kv_heads = heads
    if batch == 64 and (head_dim, heads) not in [(128, (32, 8)), (64, (8, 2))]:
        pytest.skip("batch 64 on two shapes keeps the float64 reference short")
    seed = batch + head_dim + num_heads + 7
    lengths = decode_lengths(batch, seed)
    case = Int8Case([n - 1 for n in lengths], [1] * batch, num_heads, num_kv_heads, head_dim, 16, dtype=dtype,
                    seed=seed)
    check_close(run_decode_int8(kernels, case, num_splits), case.reference(), num_heads, head_dim)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim,heads", [(128, (32, 8)), (64, (8, 2)), (128, (8, 8)), (32, (8, 2)),
                                            (80, (8, 2)), (96, (8, 8))])
@pytest.mark.parametrize("tpb", [16, 64])
def test_prefill_reads_int8_pool_with_cached_prefix(kernels, dtype, head_dim, heads, tpb):
    """Sequences with and without a cached prefix, new-token counts across key tiles (64) and blocks; head_dim
    32 takes the simple path, 64 and 128 the tensor-core one."""
    num_heads, num_kv_heads = heads
    case = Int8Case([0, 5, 100, 1000, 63], [17, 64, 3, 130, 1], num_heads, num_kv_heads, head_dim, tpb,
                    dtype=dtype, seed=head_dim + tpb + 11)
    check_close(run_prefill_int8(kernels, case), case.reference(), num_heads, head_dim)


def test_int8_reads_are_not_the_misscaled_or_unsigned_codes(kernels):
    """The bounds above can fail: the same output against references that apply k_scale to V too, or read
    the codes as unsigned bytes, is far outside them."""
    case = Int8Case([200, 31], [1, 1], 8, 2, 128, 16, seed=5)
    out = run_decode_int8(kernels, case, 4)
    check_close(out, case.reference(), 8, 128)
    scales = np.array([np.float32(K_SCALE), np.float32(V_SCALE)], np.float64).reshape(1, 2, 1, 1, 1)
    misread = [case.codes.numpy().astype(np.float64) * np.float64(np.float32(K_SCALE)),
               case.codes.numpy().view(np.uint8).astype(np.float64) * scales]
    errors = []
    for pool in misread:
        case.pool = torch.from_numpy(pool)
        ref = case.reference()
        errors.append(((out.double().cpu() - ref).norm() / ref.norm()).item())
    assert min(errors) > 0.1, errors


def test_prefill_and_decode_agree_on_int8_pool(kernels):
    """The last token of each sequence through both kernels: same values within the 16-bit output rounding."""
    lengths = [1, 33, 700]
    case = Int8Case([n - 1 for n in lengths], [1] * 3, 16, 4, 128, 16, seed=3)
    prefill = run_prefill_int8(kernels, case).double()
    decode = run_decode_int8(kernels, case, 8).double()
    assert ((prefill - decode).norm() / decode.norm()).item() <= 1e-2


def test_int8_pool_arguments_are_checked(kernels):
    case = Int8Case([3], [1], 8, 2, 128, 16)
    for k_scale, v_scale in [(0.0, 1.0), (1.0, -1.0), (float("inf"), 1.0), (1.0, float("nan"))]:
        case.k_scale, case.v_scale = k_scale, v_scale
        with pytest.raises(ValueError):
            run_decode_int8(kernels, case, 1)
        with pytest.raises(ValueError):
            run_prefill_int8(kernels, case)


# ------------------------------------------------------------------------------------------------ writes


def check_stored_k(got_codes, k_exact, k_scale, expect_clamped=False):
    """Stored K codes against the float64 k / k_scale: within half a step (clamped at ±127) plus the float32
    slack of qk-norm / RoPE on the device; most are exactly the float64 rounding."""
    got = got_codes.numpy().astype(np.float64)
    want = np.asarray(k_exact, np.float64) / np.float32(k_scale)
    clipped = np.clip(want, -127, 127)
    bound = 0.5 + 2e-3 * np.abs(want) + 1e-6
    assert np.all(np.abs(got - clipped) <= bound), f"worst excess {np.max(np.abs(got - clipped) - bound):.3g}"
    assert np.mean(got == int8_round(want)) >= 0.95
    if expect_clamped:
        assert np.mean(np.abs(want) > 127.5) > 0.005, "the inputs should reach past the clamp"


def check_stored_v(got_codes, v_in, v_scale):
    """V codes are exactly clamp(rint(float32(v) / float32(v_scale)), ±127)."""
    v32 = v_in.float().numpy() / np.float32(v_scale)  # float32 division, as the kernels do
    assert np.array_equal(got_codes.numpy().astype(np.float64), int8_round(v32))


def with_ties(x, scale, gen):
    """x [tokens, cols] (float32) with a quarter of its values replaced by exact ties (n + 1/2) · scale,
    |n| <= 126, of both parities (representable in bf16 and fp16 with scale 2^-5)."""
    n = torch.randint(-126, 127, x.shape, generator=gen).float()
    mask = torch.rand(x.shape, generator=gen) < 0.25
    return torch.where(mask, (n + 0.5) * scale, x)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(128, 32, 8), (64, 8, 2), (16, 4, 4), (80, 8, 2),
                                                             (96, 4, 4)])
@pytest.mark.parametrize("rope,qk_norm", [(True, False), (True, True), (False, False)])
def test_qkv_prepare_writes_int8_codes(kernels, dtype, head_dim, num_heads, num_kv_heads, rope, qk_norm):
    gen = torch.Generator().manual_seed(head_dim + 2 * rope + qk_norm + 100)
    tpb, num_tokens, num_blocks = 16, 37, 8
    q_w, kv_w = num_heads * head_dim, num_kv_heads * head_dim
    # v / v_scale ~ 64 codes RMS and k / k_scale ~ 50 (more with qk_norm's weights): a few percent of the
    # values reach past ±127 and are clamped.
    qkv = torch.randn(num_tokens, q_w + 2 * kv_w, generator=gen) * 2.0
    qkv[:, q_w + kv_w:] = with_ties(qkv[:, q_w + kv_w:], V_SCALE_TIES, gen)
    qkv[:, q_w:q_w + kv_w] *= 0.43
    qkv = qkv.to(dtype)
    positions = torch.randperm(num_blocks * tpb, generator=gen)[:num_tokens].to(torch.int32)
    token_seq = torch.zeros(num_tokens, dtype=torch.int32)
    block_table = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(1, -1)
    inv_freq = inv_freq_for(head_dim) if rope else None
    q_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None
    k_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None
    pool = torch.full((num_blocks, 2, num_kv_heads, tpb, head_dim), POISON, dtype=torch.int8)
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
                        dtype=DTYPES[dtype], kv_dtype=kernels.INT8, k_scale=K_SCALE, v_scale=V_SCALE_TIES,
                        stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    got = pool_d.cpu()
    pos = positions.long()
    blocks, slots = block_table[0, pos // tpb].long(), pos % tpb
    k_ref = prepare_ref(qkv[:, q_w:q_w + kv_w], num_kv_heads, head_dim, k_norm, positions.cuda(), inv_freq)
    check_stored_k(got[blocks, 0, :, slots].reshape(num_tokens, -1), k_ref.numpy(), K_SCALE, expect_clamped=True)
    check_stored_v(got[blocks, 1, :, slots].reshape(num_tokens, -1), qkv[:, q_w + kv_w:], V_SCALE_TIES)
    written = torch.zeros(num_blocks, tpb, dtype=torch.bool)
    written[blocks, slots] = True
    assert (got.permute(0, 3, 1, 2, 4)[~written] == POISON).all(), "a slot not written was changed"
    q_ref = prepare_ref(qkv[:, :q_w], num_heads, head_dim, q_norm, positions.cuda(), inv_freq)
    q_err = ((q_out.double().cpu() - q_ref).norm() / q_ref.norm()).item()
    assert q_err <= 1e-2  # q stays in the activation dtype


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim,heads", [(128, (32, 8)), (64, (8, 2)), (128, (16, 2)), (16, (4, 4)),
                                            (80, (8, 2)), (96, (12, 4))])
@pytest.mark.parametrize("num_splits", [1, 16])
@pytest.mark.parametrize("rope,qk_norm", [(True, True), (False, False)])
def test_decode_qkv_writes_and_reads_int8(kernels, dtype, head_dim, heads, num_splits, rope, qk_norm):
    """attention_decode_qkv on an INT8 pool: the new key / value stored as codes (checked as above) and the
    attention over the cached codes plus the new ones (which the kernel keeps in shared memory: the new slots
    hold the POISON code before the call)."""
    num_heads, num_kv_heads = heads
    seed = head_dim + num_heads + num_splits + 2 * rope + qk_norm + 200
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 17, 100, 1000, 4097]
    case = Int8Case([n - 1 for n in lengths], [1] * len(lengths), num_heads, num_kv_heads, head_dim, 16,
                    dtype=dtype, seed=seed, v_scale=V_SCALE_TIES)
    q_w, kv_w = num_heads * head_dim, num_kv_heads * head_dim
    v_col, q_col, k_col = 0, kv_w, kv_w + q_w
    qkv = torch.randn(case.num_seqs, q_w + 2 * kv_w + 8, generator=gen) * 2.0
    qkv[:, v_col:v_col + kv_w] = with_ties(qkv[:, v_col:v_col + kv_w], V_SCALE_TIES, gen)
    qkv[:, k_col:k_col + kv_w] *= 0.43  # k / k_scale ~ 50 codes RMS, as above
    qkv = qkv.to(dtype)
    positions = torch.tensor(case.positions, dtype=torch.int32)
    inv_freq = inv_freq_for(head_dim, theta=500000.0) if rope else None
    q_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None
    k_norm = (torch.randn(head_dim, generator=gen) + 1.0).to(dtype).cuda() if qk_norm else None
    q_ref = prepare_ref(qkv[:, q_col:q_col + q_w], num_heads, head_dim, q_norm, positions.cuda(), inv_freq)
    k_ref = prepare_ref(qkv[:, k_col:k_col + kv_w], num_kv_heads, head_dim, k_norm, positions.cuda(), inv_freq)

    slots = [(int(case.block_table[s, p // case.tpb]), p % case.tpb) for s, p in enumerate(case.positions)]
    before = case.codes.clone()
    for b, i in slots:
        case.codes[b, :, :, i] = POISON
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
    check_stored_v(v_codes, qkv[:, v_col:v_col + kv_w], V_SCALE_TIES)
    written = torch.zeros(case.num_blocks, case.tpb, dtype=torch.bool)
    for b, i in slots:
        written[b, i] = True
    untouched = ~written[:, None, None, :].expand(-1, 2, num_kv_heads, -1)
    assert torch.equal(pool[untouched], before[untouched])

    # The reference attends with the prepared q and the codes the kernel stored.
    case.q = q_ref.to(dtype)
    k_vals = torch.from_numpy(k_codes.numpy() * np.float64(np.float32(K_SCALE))).view(case.num_seqs, num_kv_heads, -1)
    v_vals = torch.from_numpy(v_codes.numpy() * np.float64(np.float32(V_SCALE_TIES))).view(
        case.num_seqs, num_kv_heads, -1)
    for s, (b, i) in enumerate(slots):
        case.pool[b, 0, :, i] = k_vals[s]
        case.pool[b, 1, :, i] = v_vals[s]
    check_close(out, case.reference(), num_heads, head_dim)


# ------------------------------------------------------------------------------------------------ runner


def test_int8_pool_holds_twice_the_blocks(tmp_path):
    """Same model, same kv_free_memory_fraction: the INT8 engine's I8 pool has half the bytes per block of the
    unquantized engine's BF16 one, so twice the blocks (up to the free memory moving between the two loads,
    and the one scratch block)."""
    m = TinyModel(dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=64, num_heads=4)
    plain = write_engine(tmp_path / "plain", m)
    int8 = write_engine(tmp_path / "int8", m)
    set_int8_kv(int8, [(0.05, 0.05)] * m.num_layers)
    sizes = {}
    for dtype, path in [("BF16", plain), ("I8", int8)]:
        cfg = _core.RuntimeConfig(device=_core.DeviceKind.CUDA, tokens_per_block=16, kv_free_memory_fraction=0.05)
        runner = _core.ModelRunner(_core.Engine.load(str(path)), cfg)
        assert runner.config.kv_cache_dtype == dtype
        blocks = runner.config.num_kv_blocks
        per_block = m.num_layers * 2 * m.num_kv_heads * 16 * m.head_dim * (2 if dtype == "BF16" else 1)
        assert runner.kv_pool_bytes == (blocks + 1) * per_block
        sizes[dtype] = blocks + 1
        del runner
        gc.collect()
    ratio = sizes["I8"] / sizes["BF16"]
    assert abs(ratio - 2.0) <= 0.02, f"I8 pool {sizes['I8']} blocks, BF16 {sizes['BF16']}: ratio {ratio:.4f}"


# End to end: an engine built with kv_cache_quant_algo INT8 from a bf16 checkpoint, run on the CPU (float32
# math) and on CUDA (bf16 activations). Both hold int8 K/V, of slightly different k and v: bf16 activations move
# a value by ~2^-9 relative, a code step is amax / 127, so a few percent of the codes differ by one step (< 1% of
# that layer's amax) between the backends, less than the FP8 cache's ~3% of codes off by ~6% of the element
# (test_fp8_kv_gpu.py). The same LOGITS_RTOL as there (2e-2 bf16 error + the rounding flips) therefore holds;
# a misread code or a misapplied scale moves the logits by far more. Greedy tokens: teacher-forced against the
# CPU as in test_fp8_kv_gpu.py.
LOGITS_RTOL = 4e-2


@pytest.mark.parametrize("head_dim", [64, 128, 96])
def test_int8_kv_engine_cuda_matches_cpu(tmp_path, head_dim):
    hf = make_hf_checkpoint(tmp_path / "hf", arch="llama", dtype="bfloat16", head_dim=head_dim,
                            vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = AutoModelForCausalLM.from_hugging_face(str(hf))
    rtllm.build(model, BuildConfig(**E2E_BUILD), QuantConfig(kv_cache_quant_algo=QuantAlgo.INT8)).save(
        str(tmp_path / "engine"))
    prompts = random_prompts(np.random.default_rng(head_dim + 1), [1, 7, 20, 33, 64])
    cpu = _runner(tmp_path / "engine", _core.DeviceKind.CPU, 64)
    cuda = _runner(tmp_path / "engine", _core.DeviceKind.CUDA, 64)
    assert cpu.config.kv_cache_dtype == cuda.config.kv_cache_dtype == "I8"
    for prompt, c, g in zip(prompts, _last_logits(cpu, prompts), _last_logits(cuda, prompts)):
        assert np.all(np.isfinite(g))
        err = np.linalg.norm(g - c) / np.linalg.norm(c)
        assert err <= LOGITS_RTOL, f"prompt of {len(prompt)}: relative error {err:.3g}"

    # Greedy decoding on CUDA through LLM (decode steps: the INT8 decode kernels, split-KV and the fused
    # preparation at batch <= a few), checked against the CPU.
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
