"""fp8_linear on CUDA (docs/engine_format.md) against a float64 numpy reference of the contract, and an
FP8_PER_CHANNEL_PER_TOKEN engine on CUDA against the same engine on the CPU.

Op level, through rtllm._core.kernels.fp8_linear (the op kind's own code path: quantize kernel, then the
FP8 GEMV or the cuBLASLt FP8 GEMM). The reference rounds to E4M3 with its own table of the 256 codes
(nearest, ties to the even code, saturating at ±448), so the GPU's codes are checked independently. The
quantized activations must match exactly (same float32 division, same rounding); what may differ is the
summation of the exact products and the last rounding. Bound per output, with mag = Σ_k |q·w| · scales:
    |y − ref| <= 2^-8·|ref|  (one rounding to bf16: half an ulp is 2^-9; the scale products add a few
                             float32 ulps)
               + 2^-9 · mag  (both paths sum on tensor cores: Hopper's FP8 MMAs keep about 13 bits of
                             an MMA's partial sum, aligned to its largest term, before it reaches float32;
                             cuBLASLt's errors measured up to 2^-11.5 of mag on random data)
A wrong code for one large activation (one E4M3 step, 2^-3 of that term), a wrong scale or a lost row
is well outside it.
"""
import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from checkpoints import make_hf_checkpoint  # noqa: E402
from engine_fixture import RunnerSession  # noqa: E402
from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE  # noqa: E402

from rtllm import _core  # noqa: E402
from rtllm.builder import BuildConfig, build  # noqa: E402
from rtllm.models import AutoModelForCausalLM  # noqa: E402
from rtllm.quantization import QuantConfig  # noqa: E402

FLT_MIN = np.float32(np.finfo(np.float32).tiny)
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def e4m3_values():
    """float64 value of each of the 256 E4M3 (fn) codes; NaN for 0x7F and 0xFF."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    mag = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    vals = sign * mag
    vals[[0x7F, 0xFF]] = np.nan
    return vals


E4M3 = e4m3_values()
_POS = E4M3[:0x7F]  # codes 0..126: 0 .. 448, increasing


def e4m3_round(v):
    """Codes' values of float32 v rounded to nearest E4M3 (ties to the even code), saturating to ±448."""
    v = np.asarray(v, np.float64)
    a = np.minimum(np.abs(v), 448.0)
    hi = np.clip(np.searchsorted(_POS, a, side="left"), 0, 126)
    lo = np.clip(hi - 1, 0, 126)
    d_lo, d_hi = a - _POS[lo], _POS[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return np.sign(v) * _POS[np.where(pick_hi, hi, lo)]


def reference(x, w_codes, w_scale, input_scale, bias, per_token):
    """float64 y of the contract, and the bound's sum of magnitudes, from the float32 values of x."""
    x = x.astype(np.float32)
    if per_token:
        amax = np.max(np.abs(x), axis=1)
        s = np.maximum(amax / np.float32(448), FLT_MIN).astype(np.float32)
    else:
        s = np.full(x.shape[0], input_scale[0], np.float32)
    q = e4m3_round(x / s[:, None])  # float32 division, then rounding
    w = E4M3[w_codes]
    ws = w_scale.astype(np.float64) if per_token else np.float64(w_scale[0])
    scale = s.astype(np.float64)[:, None] * ws
    y = (q @ w.T) * scale
    mag = (np.abs(q) @ np.abs(w).T) * scale
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y, mag


def random_case(rng, M, N, K, per_token, with_bias, x_dtype):
    x = (rng.standard_normal((M, K)) * rng.choice([0.01, 1.0, 30.0], size=(M, 1))).astype(np.float32)
    x[rng.random((M, K)) < 0.01] *= 20  # outliers set the per-token scale
    if M > 2:
        x[1] = 0.0  # a row of zeros: s = FLT_MIN, y = bias
    x_t = torch.from_numpy(x).to(TORCH[x_dtype]).cuda()
    x_vals = x_t.float().cpu().numpy()
    codes = rng.integers(0, 256, (N, K)).astype(np.uint8)
    codes[codes == 0x7F] = 0x7E
    codes[codes == 0xFF] = 0xFE
    if per_token:
        w_scale = (rng.random(N) * 1e-2 + 1e-4).astype(np.float32)
        input_scale = None
    else:
        w_scale = np.array([rng.random() * 1e-2 + 1e-4], np.float32)
        # calibrated below the data's amax: the largest activations saturate at ±448 · input_scale
        input_scale = np.array([np.abs(x_vals).max() / 448 * 0.7 + 1e-8], np.float32)
    bias = None
    if with_bias:
        bias_t = torch.from_numpy(rng.standard_normal(N).astype(np.float32)).to(TORCH[x_dtype]).cuda()
        bias = bias_t.float().cpu().numpy()
    else:
        bias_t = None
    dev = dict(x=x_t, w=torch.from_numpy(codes).cuda(), w_scale=torch.from_numpy(w_scale).cuda(),
               input_scale=None if input_scale is None else torch.from_numpy(input_scale).cuda(), bias=bias_t)
    return dev, (x_vals, codes, w_scale, input_scale, bias)


def run_op(kernels, dev, M, N, K, per_token, x_dtype, y_dtype, path=0, scaled_gemm=None):
    if scaled_gemm is None:  # as the op decides at load: cuBLASLt applies the scales where it can
        bias_dtype = y_dtype if x_dtype == "F8_E4M3" else x_dtype  # the activation dtype
        scaled_gemm = kernels.fp8_scaled_gemm_supported(per_token, y_dtype,
                                                        "" if dev["bias"] is None else bias_dtype)
    ws = torch.empty(kernels.fp8_linear_workspace_bytes(M, N, K, scaled_gemm), dtype=torch.uint8, device="cuda")
    ws.fill_(0xFF)
    y = torch.empty((M, N), dtype=TORCH[y_dtype], device="cuda")
    y.view(torch.uint8).fill_(0xFF)  # NaN in every float dtype
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    kernels.fp8_linear(y.data_ptr(), dev["x"].data_ptr(), dev["w"].data_ptr(), dev["w_scale"].data_ptr(),
                       ptr(dev["input_scale"]), ptr(dev["bias"]), M, N, K, x_dtype, y_dtype, per_token, ws.data_ptr(),
                       torch.cuda.current_stream().cuda_stream, path=path, scaled_gemm=scaled_gemm)
    torch.cuda.synchronize()
    return y.float().cpu().numpy().astype(np.float64)


def gemv_taken(M, path):
    return path == 1 or (path == 0 and M <= 16)  # kMaxGemvRows in cuda_fp8_linear.cc


def check(y, ref, mag):
    assert np.isfinite(y).all(), "non-finite outputs (poison left unwritten?)"
    err = np.abs(y - ref)
    # Both paths sum the exact E4M3 products on tensor cores: the FP8 GEMV with f16 mma.sync (m16n8k16) on
    # the codes converted exactly, the GEMM through cuBLASLt. Hopper's FP8 tensor cores add each MMA's products with about 13 bits kept,
    # aligned to the largest term, before the float32 accumulator: 2^-9 of the magnitude sum (cuBLASLt's
    # measured errors reach 2^-11.5 of it on random data).
    bound = 2.0 ** -8 * np.abs(ref) + 2.0 ** -9 * mag + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"at {worst}: got {y[worst]}, expected {ref[worst]} (bound {bound[worst]})"


MS = [1, 2, 3, 4, 7, 8, 16, 64, 300, 1024]
SHAPES = [(64, 128), (304, 48), (1000, 1024)]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "static"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_fp8_linear_matches_reference(kernels, M, N, K, per_token, with_bias):
    rng = np.random.default_rng([M, N, K, per_token, with_bias])
    dev, host = random_case(rng, M, N, K, per_token, with_bias, "BF16")
    ref, mag = reference(*host, per_token)
    y = run_op(kernels, dev, M, N, K, per_token, "BF16", "BF16")
    check(y, ref, mag)
    if gemv_taken(M, 0):  # the op's choice is the GEMV, whose summation order is fixed: the same bits
        np.testing.assert_array_equal(y, run_op(kernels, dev, M, N, K, per_token, "BF16", "BF16", path=1))


@pytest.mark.parametrize("M", [1, 5, 16, 33])
@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "static"])
@pytest.mark.parametrize("x_dtype,y_dtype", [("F16", "F16"), ("BF16", "F32"), ("F16", "F32")])
def test_fp8_linear_dtypes_and_both_paths(kernels, M, per_token, x_dtype, y_dtype):
    N, K = 272, 512
    rng = np.random.default_rng([M, per_token, len(x_dtype), len(y_dtype)])
    dev, host = random_case(rng, M, N, K, per_token, True, x_dtype)
    ref, mag = reference(*host, per_token)
    paths = [1, 2] if M <= 16 else [2]  # the GEMV takes up to 16 rows; the GEMM any
    for path in paths:
        check(run_op(kernels, dev, M, N, K, per_token, x_dtype, y_dtype, path=path), ref, mag)


@pytest.mark.parametrize("M", [9, 64, 300])
@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "static"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("y_dtype", ["BF16", "F32"])
def test_unscaled_gemm_fallback(kernels, M, per_token, with_bias, y_dtype):
    """The GEMM where cuBLASLt cannot apply the scales: float32 accumulators, then the scale kernel."""
    N, K = 384, 256
    rng = np.random.default_rng([M, per_token, with_bias, len(y_dtype)])
    dev, host = random_case(rng, M, N, K, per_token, with_bias, "BF16")
    ref, mag = reference(*host, per_token)
    check(run_op(kernels, dev, M, N, K, per_token, "BF16", y_dtype, path=2, scaled_gemm=False), ref, mag)


@pytest.mark.parametrize("M", [1, 3, 8])
def test_gemv_any_n(kernels, M):
    """N need not be a multiple of anything on the GEMV path (a 300-token vocabulary's LM head)."""
    N, K = 300, 64
    rng = np.random.default_rng([M, 300])
    dev, host = random_case(rng, M, N, K, True, False, "BF16")
    ref, mag = reference(*host, True)
    check(run_op(kernels, dev, M, N, K, True, "BF16", "F32", path=1), ref, mag)


@pytest.mark.parametrize("M", [17, 40])
@pytest.mark.parametrize("N,y_dtype", [(301, "F32"), (300, "BF16")])  # rows of 1,204 and 600 bytes
@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "static"])
def test_rows_the_gemm_cannot_take_run_the_gemv_in_blocks(kernels, M, N, y_dtype, per_token):
    """Beyond 16 tokens the op would take cuBLASLt, which refuses rows of y that are not 16-byte aligned (an
    odd vocabulary's LM head): it runs the GEMV on blocks of 16 tokens instead, each with its tokens' scales."""
    K = 64
    rng = np.random.default_rng([M, N, per_token])
    dev, host = random_case(rng, M, N, K, per_token, True, "BF16")
    ref, mag = reference(*host, per_token)
    check(run_op(kernels, dev, M, N, K, per_token, "BF16", y_dtype), ref, mag)


@pytest.mark.parametrize("M", [1, 8, 9, 16])
@pytest.mark.parametrize("N,K", [(264, 14336), (40, 4112), (24, 48), (7000, 272), (26000, 64)])
def test_gemv_long_k_and_tails(kernels, M, N, K):
    """The GEMV's split of K: many batches per warp (K = 14336, Llama-3-8B's down projection), a last
    64-byte step only a quarter full (K = 4112 = 64·64 + 16), fewer steps than warps (K = 48); N past the
    last 16-channel tile; N large enough for 4 and 1 warps per K split (7,000, 26,000); M on both sides of
    the kernel's 8-row activation blocks."""
    rng = np.random.default_rng([M, N, K])
    dev, host = random_case(rng, M, N, K, True, True, "BF16")
    ref, mag = reference(*host, True)
    check(run_op(kernels, dev, M, N, K, True, "BF16", "F32", path=1), ref, mag)


@pytest.mark.parametrize("M", [1, 5, 8, 16, 64, 1024])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("y_dtype", ["BF16", "F16"])
def test_fp8_linear_reads_codes(kernels, M, with_bias, y_dtype):
    """x as E4M3 codes with static scales, as a producer's FP8 output reaches the op (no quantize kernel):
    within the bound of the reference, and bit for bit the op's result on the 16-bit x the codes quantize,
    on the GEMV and on the GEMM."""
    N, K = 1000, 1024
    rng = np.random.default_rng([M, with_bias, len(y_dtype), 8])
    dev, host = random_case(rng, M, N, K, False, with_bias, y_dtype)
    x_vals, input_scale = host[0], host[3]
    q = e4m3_round(x_vals / input_scale[0])  # float32 division, as the reference and the quantize kernel
    codes = torch.from_numpy(q.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).cuda()
    ref, mag = reference(*host, False)
    for path in [1, 2] if M <= 16 else [2]:  # the GEMV takes up to 16 rows
        y = run_op(kernels, dict(dev, x=codes), M, N, K, False, "F8_E4M3", y_dtype, path=path)
        check(y, ref, mag)
        np.testing.assert_array_equal(y, run_op(kernels, dev, M, N, K, False, y_dtype, y_dtype, path=path))


def test_codes_input_needs_static_scales_and_16bit_y(kernels):
    with pytest.raises(_core.InvalidArgumentError, match="static scales"):
        kernels.fp8_linear(0, 0, 0, 0, 0, 0, 1, 16, 64, "F8_E4M3", "BF16", True, 0)
    with pytest.raises(_core.InvalidArgumentError, match="not F32"):
        kernels.fp8_linear(0, 0, 0, 0, 0, 0, 1, 16, 64, "F8_E4M3", "F32", False, 0)


def test_k_not_multiple_of_16_is_refused(kernels):
    with pytest.raises(_core.InvalidArgumentError, match="K = 40"):
        kernels.fp8_linear(0, 0, 0, 0, 0, 0, 1, 16, 40, "BF16", "BF16", True, 0)


# ---- rtllm's Hopper FP8 GEMM (path 3; kernels/src/fp8_gemm.cu): TMA + wgmma, scales in its epilogue ----
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="rtllm's Hopper FP8 GEMM runs on compute capability 9.0 only")


def hopper_taken(kernels, M, N, per_token, has_bias):
    """Whether the op's own choice (path 0) is the Hopper GEMM: per token, where cuBLASLt cannot apply the
    per-token scales itself, from kHopperGemmMinTiles to kHopperGemmMaxTiles (cuda_fp8_linear.cc) output
    tiles of kFp8GemmTileM x kFp8GemmTileN (128 x 256)."""
    if not (HOPPER and per_token and M > 16):
        return False
    if kernels.fp8_scaled_gemm_supported(True, "BF16", "BF16" if has_bias else ""):
        return False
    return 256 <= -(-M // 128) * -(-N // 256) <= 1023


@needs_hopper
@pytest.mark.parametrize("M", [1, 17, 128, 300, 1100])
@pytest.mark.parametrize("N,K", [(128, 128), (300, 48), (2100, 4112), (136, 14336), (8192, 48)])
@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "static"])
def test_hopper_gemm_matches_reference(kernels, M, N, K, per_token):
    """Tiles cut by M and N (1, 17, 300, 1,100 rows; 128, 136, 300, 2,100 and 8,192 columns: TMA's zero fill
    past the edges, a tile's second half of columns empty or partial; 1,100 x 8,192 is 288 tiles, where the
    op itself takes this GEMM unless cuBLASLt scales per token), K not a multiple of the 128-code block (48, 4112) and long K (Llama-3-8B's down
    projection: the promotion of each block's MMA sums keeps the error within the bound)."""
    rng = np.random.default_rng([M, N, K, per_token, 3])
    dev, host = random_case(rng, M, N, K, per_token, M % 2 == 1, "BF16")
    ref, mag = reference(*host, per_token)
    y = run_op(kernels, dev, M, N, K, per_token, "BF16", "BF16", path=3)
    check(y, ref, mag)
    if hopper_taken(kernels, M, N, per_token, M % 2 == 1):  # the op's choice: the same kernel, the same bits
        np.testing.assert_array_equal(y, run_op(kernels, dev, M, N, K, per_token, "BF16", "BF16"))


@needs_hopper
@pytest.mark.parametrize("x_dtype,y_dtype", [("F16", "F16"), ("BF16", "F32"), ("F16", "F32")])
def test_hopper_gemm_dtypes(kernels, x_dtype, y_dtype):
    M, N, K = 200, 301, 512  # odd N: the pairs of a row start at odd flat indices, stored one by one
    rng = np.random.default_rng([M, len(x_dtype), len(y_dtype)])
    dev, host = random_case(rng, M, N, K, True, True, x_dtype)
    ref, mag = reference(*host, True)
    check(run_op(kernels, dev, M, N, K, True, x_dtype, y_dtype, path=3), ref, mag)


def test_hopper_gemm_refused_elsewhere(kernels):
    if HOPPER:
        pytest.skip("this device runs the Hopper GEMM")
    with pytest.raises(_core.InvalidArgumentError, match="compute capability 9.0"):
        run_op(kernels, random_case(np.random.default_rng(0), 32, 64, 64, True, False, "BF16")[0], 32, 64, 64, True,
               "BF16", "BF16", path=3)


def test_capability_requirement():
    assert kernels_reason(8, 9) == "" and kernels_reason(9, 0) == "" and kernels_reason(10, 0) == ""
    for major, minor in [(8, 0), (8, 6), (7, 5)]:
        reason = kernels_reason(major, minor)
        assert f"{major}.{minor}" in reason and "8.9" in reason, reason


def kernels_reason(major, minor):
    return _core.kernels.fp8_linear_unsupported_reason(major, minor)


# ---- end to end: an FP8_PER_CHANNEL_PER_TOKEN engine, CUDA against the CPU ----
# Both backends quantize the same way, but the CPU's activations are float32 and CUDA's bf16: where a
# bf16-rounded activation crosses an E4M3 rounding boundary its code moves one step (2^-3 relative). That
# happens to ~2^-9/2^-3 of the elements, so CUDA's distance from the CPU is a fraction of the distance
# FP8 quantization itself puts between the CPU's FP8 and unquantized logits (codes of every element move
# by up to half a step). Bound: ‖gpu − cpu‖ <= max(2e-2 · ‖cpu‖, 0.5 · ‖cpu − cpu_unquantized‖) per
# sequence and step (2e-2: the bound of the unquantized bf16 engine in test_generation_gpu.py). A kernel
# that mis-scales, mis-rounds or drops a row is far outside it.
# Greedy tokens, teacher-forced: the CPU's logit of the GPU's token must be within
# max(0.1 · rms(logits), 4 · rms(gpu − cpu)) of the CPU's top logit, and >= 80% of them its exact argmax.
LOGITS_RTOL = 2e-2
QUANT_FRACTION = 1.5  # CPU (float32) and CUDA (bf16) activations round to FP8 independently: up to ~sqrt(2) x one's noise


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    make_hf_checkpoint(path / "hf", arch="llama", vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = AutoModelForCausalLM.from_hugging_face(path / "hf")
    build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN")).save(path / "fp8")
    model = AutoModelForCausalLM.from_hugging_face(path / "hf")
    build(model, BuildConfig(max_seq_len=128)).save(path / "plain")
    return path / "fp8", path / "plain"


def test_fp8_engine_cuda_matches_cpu(engines):
    fp8, plain = engines
    cpu = RunnerSession(fp8, device=_core.DeviceKind.CPU)
    gpu = RunnerSession(fp8, device=_core.DeviceKind.CUDA)
    ref = RunnerSession(plain, device=_core.DeviceKind.CPU)
    rng = np.random.default_rng(3)
    prompts = {s: [int(t) for t in rng.integers(3, VOCAB_SIZE, n)] for s, n in enumerate([13, 5, 40, 1])}
    # prefill (59 rows) through cuBLASLt, then greedy decode of all four together (4 rows) through the GEMV
    lc, lg, lr = cpu.step(prompts), gpu.step(prompts), ref.step(prompts)
    exact = total = 0
    worst = 0.0
    for _ in range(8):
        nxt = {}
        for s in prompts:
            c, g, r = (np.asarray(v, np.float64) for v in (lc[s], lg[s], lr[s]))
            diff = np.linalg.norm(g - c)
            bound = max(LOGITS_RTOL * np.linalg.norm(c), QUANT_FRACTION * np.linalg.norm(c - r))
            assert diff <= bound, (s, diff, bound, np.linalg.norm(c))
            worst = max(worst, diff / np.linalg.norm(c))
            tok = int(np.argmax(g))
            margin = max(0.1 * np.sqrt(np.mean(c ** 2)), 4 * np.sqrt(np.mean((g - c) ** 2)))
            assert c[tok] >= c.max() - margin, (s, tok, int(np.argmax(c)))
            exact += tok == int(np.argmax(c))
            total += 1
            nxt[s] = [tok]
        lc, lg, lr = cpu.step(nxt), gpu.step(nxt), ref.step(nxt)
    print(f"worst relative logits distance CUDA vs CPU: {worst:.4f}; {exact}/{total} tokens equal")
    assert exact >= 0.8 * total, f"{exact}/{total} greedy tokens equal the CPU's argmax"


# ---- FP8 outputs of the ops that produce a static fp8_linear's input (docs/engine_format.md)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "silu_mul"])
def test_fp8_outputs_of_norms_and_silu_mul(kernels, stream, dtype, op):
    """With fp8_out_scale the op writes the E4M3 codes of its 16-bit output divided by the scale. The same
    launch without it gives that 16-bit output (against float64 in test_kernels_basic.py); the codes must
    be the numpy E4M3 rounding of float32(output) / float32(scale), every one, saturation included (the
    scale puts some values past 448). Codes are poisoned with NaN codes (0x7F) first."""
    rows, hidden, inter = 5, 4096, 1024
    gen = torch.Generator().manual_seed(hidden + len(op))
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype).cuda()  # noqa: E731
    code_kind = kernels.BF16 if dtype == torch.bfloat16 else kernels.FP16
    scale = np.float32(0.0043)  # 448 * scale = 1.93: the tails saturate
    x, res, w = rand(rows, hidden) * 3, rand(rows, hidden), rand(hidden) + 1
    gate_up = rand(rows, 2 * inter) * 3
    width = inter if op == "silu_mul" else hidden
    outputs = {}
    for fp8 in (False, True):
        out = (torch.full((rows, width), 0x7F, dtype=torch.uint8, device="cuda") if fp8
               else torch.full((rows, width), float("nan"), dtype=dtype, device="cuda"))
        total = torch.full((rows, hidden), float("nan"), dtype=dtype, device="cuda")
        kw = dict(fp8_out_scale=float(scale)) if fp8 else {}
        if op == "rms_norm":
            kernels.rms_norm(out.data_ptr(), x.data_ptr(), w.data_ptr(), rows, hidden, hidden, 1e-5, code_kind,
                             stream, **kw)
        elif op == "add_rms_norm":
            kernels.add_rms_norm(out.data_ptr(), total.data_ptr(), x.data_ptr(), res.data_ptr(), w.data_ptr(), rows,
                                 hidden, 1e-5, code_kind, stream, **kw)
        else:
            kernels.silu_mul(out.data_ptr(), gate_up.data_ptr(), rows, inter, code_kind, stream, **kw)
        torch.cuda.synchronize()
        outputs[fp8] = (out.cpu(), total.cpu())
    y = outputs[False][0].float().numpy()
    assert np.isfinite(y).all()
    codes = outputs[True][0].numpy()
    assert not np.isin(codes, [0x7F, 0xFF]).any(), "a code was not written (NaN poison left)"
    expected = e4m3_round((y / scale).astype(np.float32))
    assert np.abs(expected).max() == 448.0 and (np.abs(expected) < 448.0).mean() > 0.2
    np.testing.assert_array_equal(E4M3[codes], expected)
    if op == "add_rms_norm":
        assert torch.equal(outputs[True][1], outputs[False][1])  # the sum is unchanged


def test_fp8_out_scale_is_checked(kernels, stream):
    x = torch.randn(2, 64, device="cuda").to(torch.bfloat16)
    w = torch.ones(64, device="cuda").to(torch.bfloat16)
    out = torch.empty(2, 64, dtype=torch.uint8, device="cuda")
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(Exception):
            kernels.rms_norm(out.data_ptr(), x.data_ptr(), w.data_ptr(), 2, 64, 64, 1e-5, kernels.BF16, stream,
                             fp8_out_scale=bad)
    with pytest.raises(Exception):  # codes in place over the 16-bit input
        kernels.rms_norm(x.data_ptr(), x.data_ptr(), w.data_ptr(), 2, 64, 64, 1e-5, kernels.BF16, stream,
                         fp8_out_scale=0.01)
