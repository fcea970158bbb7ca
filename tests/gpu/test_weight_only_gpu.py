"""weight_only_linear on CUDA (docs/engine_format.md) against a float64 numpy reference of the contract, and
W8A16 / W4A16 engines on CUDA against the same engines on the CPU.

Op level, through rtllm._core.kernels.weight_only_linear (the op kind's own code paths: the tensor-core GEMV
over the codes, or the weight dequantized into the workspace and cuBLASLt's GEMM). The op places
scale, offset and bias in the activation dtype T and uses each weight as W16 = fma(q, scale_T, offset_T)
rounded once to T; the tests give the hook scales as the placement would (the stored F16 / BF16 / F32 values
rounded to T by torch) and check two things per output, with mag = Σ_k |x|·|W| + |bias|:
  * against ref16 (float64 products of x and W16, computed here by numpy from the codes): only the
    float32 summation and the last rounding differ:
        |y − ref16| <= u_out·|ref16| + 2^-12·mag16
    (u_out: 2^-8 bf16, 2^-11 fp16, 2^-20 f32 outputs; 2^-12 covers up to K / 16 tensor-core partial sums
    of float32 rounding). A swapped pair of codes, a wrong nibble, a wrong group's scale or a lost row is
    outside it at these K.
  * against ref (float64 of the contract with the stored scales): W16 is within 3·u_T of |q|·|s| + |o|
    (rounding of the scale, the offset and W to T; u_T = 2^-8 bf16, 2^-11 fp16):
        |y − ref| <= u_out·|ref| + (2^-12 + 3·u_T)·mag
The int4 GEMV for groups of a multiple of 128 codes (per channel included) does not round W to T: it sums
x · (q + B) and x (B = 136 bf16, 1032 fp16: the codes' magic-number values) on tensor cores per 128-code
step and applies s_T and o_T to those float32 sums. Its outputs are checked against refT (float64 of x and
q·s_T + o_T), with the float32 sums' error measured against the sums it adds, Σ_k |x|·(|q| + B)·|s_T|:
        |y − refT| <= u_out·|refT| + 2^-12·magT + 2^-18·Σ_k |x|·(|q| + B)·|s_T|
and against ref with u_T·mag more (the rounding of scale and offset to T).
int4 codes of the GEMV's shapes go to the op in its MMA layout (weight_only_pack_int4, as the op's
placement does); test_pack_int4_layout checks that layout against its statement in numpy.
Outputs are poisoned (0xFF bytes: NaN in every float dtype) before each call; inputs are fresh per case.
"""
import json
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
from rtllm.builder import BuildConfig, Engine, build  # noqa: E402
from rtllm.builder.safetensors_io import float32_to_bf16, pack_int4  # noqa: E402
from rtllm.builder.tensor import Parameter  # noqa: E402
from rtllm.models import AutoModelForCausalLM  # noqa: E402
from rtllm.quantization import QuantAlgo, QuantConfig  # noqa: E402

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
U_OUT = {"BF16": 2.0 ** -8, "F16": 2.0 ** -11, "F32": 2.0 ** -20}
U_T = {"BF16": 2.0 ** -8, "F16": 2.0 ** -11}
SUM_TOL = 2.0 ** -12
MAGIC_BIAS = {"BF16": 136.0, "F16": 1032.0}  # the int4 codes' magic-number values are q + MAGIC_BIAS
MAGIC_SUM_TOL = 2.0 ** -18


def to_dtype_f64(a, name):
    """float64 values of `a` rounded to dtype `name` (round to nearest even, as the placement and torch)."""
    return torch.from_numpy(np.asarray(a, np.float32)).to(TORCH[name]).to(torch.float64).numpy()


def round_weights(codes, s_t, o_t, x_dtype):
    """W16 = fma(q, s_T, o_T) rounded once to T: q·s_T + o_T is exact in float64 (a few dozen significant bits
    at most here), then rounded to nearest even at T's precision (8 significant bits for bf16, 11 for fp16,
    fp16's subnormal step 2^-24) by numpy alone."""
    w = codes.astype(np.float64) * s_t + o_t
    bits = {"BF16": 8, "F16": 11}[x_dtype]
    _, e = np.frexp(w)  # |w| = m · 2^e, 0.5 <= m < 1: the last kept bit is 2^(e - bits)
    step = e - bits
    if x_dtype == "F16":
        step = np.maximum(step, -24)
    return np.ldexp(np.round(np.ldexp(w, -step)), step)  # np.round: half to even


def random_case(rng, T, N, K, G, int4, has_offset, has_bias, x_dtype, scale_dtype):
    """Device tensors for the hook, and the host values both references use."""
    x = rng.standard_normal((T, K)) * rng.choice([0.03, 1.0, 20.0], size=(T, 1))
    if T > 2:
        x[1] = 0.0  # a row of zeros: y = bias
    x_t = torch.from_numpy(x.astype(np.float32)).to(TORCH[x_dtype]).cuda()
    lo, hi = (-8, 8) if int4 else (-128, 128)
    codes = rng.integers(lo, hi, (N, K)).astype(np.int8)
    ng = K // G
    # scales over 2^-10 .. 2^-2 (a wide range: a wrong group's scale shows), stored in scale_dtype
    scale32 = np.exp2(rng.uniform(-10, -2, (N, ng))).astype(np.float32)
    scale_stored = to_dtype_f64(scale32, scale_dtype)  # the engine's stored values
    offset = (rng.standard_normal((N, ng)) * 0.05).astype(np.float32) if has_offset else None
    bias = rng.standard_normal(N).astype(np.float32) if has_bias else None
    # as the op places them: in x's dtype
    s_t = to_dtype_f64(scale_stored, x_dtype)
    o_t = to_dtype_f64(offset, x_dtype) if has_offset else np.zeros((N, ng))
    b_t = to_dtype_f64(bias, x_dtype) if has_bias else np.zeros(N)
    codes_dev = torch.from_numpy(pack_int4(codes) if int4 else codes.view(np.uint8)).cuda()
    if int4 and _core.kernels.weight_only_gemv_supported(K, G, True):  # as the op places them
        _core.kernels.weight_only_pack_int4(codes_dev.data_ptr(), codes_dev.numel(),
                                            torch.cuda.current_stream().cuda_stream)
    dev = {
        "x": x_t,
        "codes": codes_dev,
        "scale": torch.from_numpy(s_t).to(TORCH[x_dtype]).cuda(),
        "offset": torch.from_numpy(o_t).to(TORCH[x_dtype]).cuda() if has_offset else None,
        "bias": torch.from_numpy(b_t).to(TORCH[x_dtype]).cuda() if has_bias else None,
    }
    xv = x_t.double().cpu().numpy()
    rep = lambda a: np.repeat(a, G, axis=1)  # noqa: E731
    w_exact = codes * rep(scale_stored) + (rep(offset.astype(np.float64)) if has_offset else 0.0)
    b_exact = bias.astype(np.float64) if has_bias else np.zeros(N)
    w16 = round_weights(codes, rep(s_t), rep(o_t), x_dtype)
    w_t = codes * rep(s_t) + rep(o_t)  # exact in float64
    host = {
        "refT": xv @ w_t.T + b_t,
        "magT": np.abs(xv) @ np.abs(w_t).T + np.abs(b_t),
        "mag_sums": np.abs(xv) @ ((np.abs(codes) + MAGIC_BIAS[x_dtype]) * rep(np.abs(s_t))).T,
        "ref": xv @ w_exact.T + b_exact,
        "mag": np.abs(xv) @ np.abs(w_exact).T + np.abs(b_exact),
        "ref16": xv @ w16.T + b_t,
        "mag16": np.abs(xv) @ np.abs(w16).T + np.abs(b_t),
        "bias16": b_t,
    }
    return dev, host


def run_op(kernels, dev, T, N, K, G, int4, x_dtype, y_dtype, path=0, k_splits=0):
    ws = torch.empty(kernels.weight_only_linear_workspace_bytes(N, K, T), dtype=torch.uint8, device="cuda")
    ws.fill_(0xFF)
    y = torch.empty((T, N), dtype=TORCH[y_dtype], device="cuda")
    y.view(torch.uint8).fill_(0xFF)  # NaN in every float dtype
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    kernels.weight_only_linear(y.data_ptr(), dev["x"].data_ptr(), dev["codes"].data_ptr(), dev["scale"].data_ptr(),
                               ptr(dev["offset"]), ptr(dev["bias"]), T, N, K, G, int4, x_dtype, y_dtype,
                               ws.data_ptr(), torch.cuda.current_stream().cuda_stream, path=path,
                               gemv_k_splits=k_splits)
    torch.cuda.synchronize()
    return y.double().cpu().numpy()


def scales_sums(T, K, G, int4, path=0):
    """Whether the op's call applies the scales to sums of the codes (the int4 GEMV for groups of whole
    128-code steps) rather than multiplying weights rounded to T."""
    gemv = path == 1 or (path == 0 and T <= 64 and _core.kernels.weight_only_gemv_supported(K, G, int4))
    return gemv and int4 and G % 128 == 0


def check(y, host, x_dtype, y_dtype, what="", exact=False):
    """y within the bounds of the module docstring: the rounded weights' (exact False) or the scaled sums'."""
    assert np.isfinite(y).all(), f"{what}non-finite outputs (poison left unwritten?)"
    if exact:
        sums = MAGIC_SUM_TOL * host["mag_sums"]
        bounds = ((host["refT"], SUM_TOL * host["magT"] + sums),
                  (host["ref"], (SUM_TOL + U_T[x_dtype]) * host["mag"] + sums))
    else:
        bounds = ((host["ref16"], SUM_TOL * host["mag16"]), (host["ref"], (SUM_TOL + 3 * U_T[x_dtype]) * host["mag"]))
    for ref, tol in bounds:
        err = np.abs(y - ref)
        bound = U_OUT[y_dtype] * np.abs(ref) + tol + 1e-30
        worst = np.unravel_index(np.argmax(err / bound), err.shape)
        assert (err <= bound).all(), f"{what}at {worst}: got {y[worst]}, expected {ref[worst]} (bound {bound[worst]})"


TS = [1, 2, 7, 16, 17, 64, 300]
# (N, K, G, int4, has_offset, has_bias, x_dtype, y_dtype, scale_dtype)
CASES = [
    (272, 512, 128, True, False, False, "BF16", "BF16", "F16"),     # W4A16 g128
    (272, 512, 128, True, True, True, "BF16", "BF16", "F16"),       # W4A16 g128 with zero point, bias
    (257, 1024, 32, True, True, False, "BF16", "F32", "F16"),       # odd N, g32, float32 output (LM head)
    (96, 160, 32, True, False, True, "F16", "F16", "F32"),          # K = 5·32: not a multiple of 128
    (130, 384, 64, True, True, True, "F16", "F32", "BF16"),
    (200, 4096, 4096, False, False, False, "BF16", "BF16", "F32"),  # W8A16 per channel (G = K)
    (129, 96, 96, False, False, True, "BF16", "BF16", "BF16"),      # per channel, K = 96
    (64, 4112, 16, False, True, True, "F16", "F16", "F16"),         # int8 g16; last 64-byte step a quarter full
    (40, 160, 32, False, True, False, "BF16", "F32", "F32"),
    (300, 2048, 128, False, True, True, "BF16", "BF16", "F16"),
]
# Shapes the GEMV does not take (K or G not a multiple of a lane's 16 int8 / 32 int4 codes): the op
# dequantizes and calls cuBLASLt whatever T.
FALLBACK_CASES = [
    (70, 36, 18, True, False, True, "BF16", "BF16", "F32"),
    (70, 96, 48, False, True, False, "BF16", "F32", "F16"),
    (33, 200, 40, False, False, False, "F16", "F16", "BF16"),
    (48, 4112, 4112, True, True, True, "BF16", "BF16", "F16"),  # int4 K % 32 == 16
]


def case_id(c):
    N, K, G, int4, off, bias, xd, yd, sd = c
    return f"{'I4' if int4 else 'I8'}-N{N}-K{K}-G{G}{'-off' if off else ''}{'-bias' if bias else ''}-{xd}-{yd}-s{sd}"


def test_pack_int4_layout(kernels):
    """weight_only_pack_int4 against the MMA layout stated in numpy: in each 32-bit word of codes 8i .. 8i+7,
    nibble j (j < 4) holds q + 8 of code 8i + 2j and nibble j + 4 that of code 8i + 2j + 1."""
    rng = np.random.default_rng(3)
    N, K = 5, 96
    codes = rng.integers(-8, 8, (N, K))
    dev = torch.from_numpy(pack_int4(codes.astype(np.int8))).cuda()
    kernels.weight_only_pack_int4(dev.data_ptr(), dev.numel(), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    words = dev.cpu().numpy().view("<u4").reshape(N, K // 8).astype(np.int64)
    u = (codes + 8).reshape(N, K // 8, 8)
    want = np.zeros((N, K // 8), np.int64)
    for j in range(4):
        want |= u[:, :, 2 * j] << (4 * j) | u[:, :, 2 * j + 1] << (4 * j + 16)
    np.testing.assert_array_equal(words, want)
    with pytest.raises(_core.InvalidArgumentError, match="num_bytes 6"):
        kernels.weight_only_pack_int4(dev.data_ptr(), 6)


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("case", CASES + FALLBACK_CASES, ids=case_id)
def test_weight_only_linear_matches_reference(kernels, T, case):
    N, K, G, int4, has_offset, has_bias, x_dtype, y_dtype, scale_dtype = case
    rng = np.random.default_rng([T, N, K, G, int4, has_offset, has_bias])
    dev, host = random_case(rng, T, N, K, G, int4, has_offset, has_bias, x_dtype, scale_dtype)
    y = run_op(kernels, dev, T, N, K, G, int4, x_dtype, y_dtype)
    check(y, host, x_dtype, y_dtype, exact=scales_sums(T, K, G, int4))
    if T > 2:  # x row 1 is zeros: y = the bias as placed (zeros without one), exactly
        np.testing.assert_array_equal(y[1], host["bias16"])


@pytest.mark.parametrize("T", [1, 5, 16, 33, 100])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_both_paths(kernels, T, case):
    """The GEMV (any T: CTAs of 16 tokens) and dequantize + GEMM both within the bounds."""
    N, K, G, int4, has_offset, has_bias, x_dtype, y_dtype, scale_dtype = case
    rng = np.random.default_rng([T, N, K, 7])
    dev, host = random_case(rng, T, N, K, G, int4, has_offset, has_bias, x_dtype, scale_dtype)
    for path in (1, 2):
        check(run_op(kernels, dev, T, N, K, G, int4, x_dtype, y_dtype, path=path), host, x_dtype, y_dtype,
              f"path {path}: ", exact=scales_sums(T, K, G, int4, path))


@pytest.mark.parametrize("T", [300, 600])
@pytest.mark.parametrize("case", [CASES[2], CASES[9], (301, 256, 64, True, False, True, "BF16", "BF16", "F16")],
                         ids=case_id)
def test_rows_cublaslt_cannot_take(kernels, T, case):
    """Rows of y that are not 16-byte aligned (an odd vocabulary's LM head) beyond the GEMV's token counts
    (and at 600, the Hopper GEMM's): the op runs the GEMV on them rather than cuBLASLt, within the same
    bounds."""
    N, K, G, int4, has_offset, has_bias, x_dtype, y_dtype, scale_dtype = case
    rng = np.random.default_rng([T, N, K, 11])
    dev, host = random_case(rng, T, N, K, G, int4, has_offset, has_bias, x_dtype, scale_dtype)
    y = run_op(kernels, dev, T, N, K, G, int4, x_dtype, y_dtype)
    check(y, host, x_dtype, y_dtype)  # no group of whole 128-code steps here: rounded weights on every path


@pytest.mark.parametrize("x_dtype, y_dtype", [("BF16", "BF16"), ("F16", "F16"), ("BF16", "F32")])
def test_gemm_bias_over_row_chunks(kernels, x_dtype, y_dtype):
    """Dequantize + GEMM with a bias over more rows than one float32 chunk of the op's scratch (1024 rows):
    every chunk's rows get their product and bias, rounded once."""
    T, N, K, G = 2100, 72, 256, 64
    rng = np.random.default_rng([T, N, K, len(y_dtype)])
    dev, host = random_case(rng, T, N, K, G, False, True, True, x_dtype, "F32")
    y = run_op(kernels, dev, T, N, K, G, False, x_dtype, y_dtype, path=2)
    check(y, host, x_dtype, y_dtype)
    np.testing.assert_array_equal(y[1], host["bias16"])


@pytest.mark.parametrize("int4", [True, False], ids=["I4", "I8"])
def test_gemv_deterministic_and_batch_invariant(kernels, int4):
    """The GEMV's summation order is fixed and per token: the same bits on every run, and a token's row does
    not depend on the other tokens of the call (1, 3 or 16 of them: 2 or 4 weight tiles per row group at
    this N, 8 or 16 activation rows per MMA)."""
    N, K, G = 51300, 256, 64
    rng = np.random.default_rng([int4, 99])
    dev, host = random_case(rng, 16, N, K, G, int4, True, True, "BF16", "F16")
    full = run_op(kernels, dev, 16, N, K, G, int4, "BF16", "F32", path=1)
    check(full, host, "BF16", "F32")
    np.testing.assert_array_equal(full, run_op(kernels, dev, 16, N, K, G, int4, "BF16", "F32", path=1))
    for T in (1, 3):
        sub = dict(dev, x=dev["x"][:T].contiguous())
        np.testing.assert_array_equal(run_op(kernels, sub, T, N, K, G, int4, "BF16", "F32", path=1), full[:T])


@pytest.mark.parametrize("k_splits", [1, 2, 4, 8])
@pytest.mark.parametrize("case", CASES[:3] + CASES[5:8], ids=case_id)
def test_gemv_every_k_split(kernels, case, k_splits):
    """Every split of K between a row group's warps (1 to 8 warps; 8 to 1 row groups a CTA, so N ends inside
    a CTA's rows) within the bounds at 1 to 33 tokens, each run twice with the same bits, and a token's row
    the same whatever the other tokens of the call."""
    N, K, G, int4, has_offset, has_bias, x_dtype, y_dtype, scale_dtype = case
    rng = np.random.default_rng([N, K, G, k_splits])
    dev, host = random_case(rng, 33, N, K, G, int4, has_offset, has_bias, x_dtype, scale_dtype)
    full = run_op(kernels, dev, 33, N, K, G, int4, x_dtype, y_dtype, path=1, k_splits=k_splits)
    check(full, host, x_dtype, y_dtype, f"k_splits {k_splits}: ", exact=scales_sums(33, K, G, int4, 1))
    again = run_op(kernels, dev, 33, N, K, G, int4, x_dtype, y_dtype, path=1, k_splits=k_splits)
    np.testing.assert_array_equal(full, again)
    for T in (1, 3, 9, 16):
        sub = dict(dev, x=dev["x"][:T].contiguous())
        np.testing.assert_array_equal(
            run_op(kernels, sub, T, N, K, G, int4, x_dtype, y_dtype, path=1, k_splits=k_splits), full[:T],
            err_msg=f"k_splits {k_splits}, {T} tokens")


@pytest.mark.parametrize("N, K", [(96, 512), (4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336),
                                  (51300, 1024)])
def test_gemv_own_k_split(kernels, N, K):
    """The op's GEMV uses weight_only_gemv_k_splits(N, K): the same bits as that split asked for explicitly."""
    ks = kernels.weight_only_gemv_k_splits(N, K)
    assert ks in (1, 2, 4, 8)
    rng = np.random.default_rng([N, K])
    dev, host = random_case(rng, 4, N, K, 128, True, True, False, "BF16", "BF16")
    auto = run_op(kernels, dev, 4, N, K, 128, True, "BF16", "BF16")
    check(auto, host, "BF16", "BF16", exact=True)
    np.testing.assert_array_equal(auto, run_op(kernels, dev, 4, N, K, 128, True, "BF16", "BF16", path=1, k_splits=ks))


def test_gemv_refuses_bad_k_split(kernels):
    with pytest.raises(_core.InvalidArgumentError, match="gemv_k_splits 3"):
        kernels.weight_only_linear(0, 0, 0, 0, 0, 0, 1, 16, 64, 32, True, "BF16", "BF16", 0, path=1, gemv_k_splits=3)


@pytest.mark.parametrize("T", [1, 8, 16])
def test_llama_shapes_g128(kernels, T):
    """Llama-3-8B's decode shapes (fused QKV 6144 x 4096, down 4096 x 14336), W4A16 g128 with zero point."""
    for N, K in [(6144, 4096), (4096, 14336)]:
        rng = np.random.default_rng([T, N, K])
        dev, host = random_case(rng, T, N, K, 128, True, True, False, "BF16", "F16")
        check(run_op(kernels, dev, T, N, K, 128, True, "BF16", "BF16"), host, "BF16", "BF16", exact=True)


# ---- the int4 GEMM on Hopper (path 3; kernels/src/weight_only_gemm.cu): weights rounded to T, as path 2 ----
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="rtllm's Hopper int4 GEMM runs on compute capability 9.0 only")
HOPPER_CASES = [c for c in CASES if c[3] and c[1] % 128 == 0]  # I4, K a multiple of 128


@needs_hopper
@pytest.mark.parametrize("T", [1, 17, 128, 129, 300])
@pytest.mark.parametrize("case", HOPPER_CASES, ids=case_id)
def test_hopper_gemm(kernels, T, case):
    """Tiles cut by T (1, 17, 129, 300 tokens: TMA's zero fill) and N (257, 130, 272 rows: a tile of 128
    weight rows partly past N), groups of 32, 64 and 128 codes, offsets, bias, float32 and 16-bit outputs.
    From 65 tokens on the op's own choice is this kernel: the same bits."""
    N, K, G, int4, has_offset, has_bias, x_dtype, y_dtype, scale_dtype = case
    rng = np.random.default_rng([T, N, K, G, 3])
    dev, host = random_case(rng, T, N, K, G, int4, has_offset, has_bias, x_dtype, scale_dtype)
    y = run_op(kernels, dev, T, N, K, G, int4, x_dtype, y_dtype, path=3)
    check(y, host, x_dtype, y_dtype, "path 3: ")
    if T > 2:
        np.testing.assert_array_equal(y[1], host["bias16"])
    if T > 64:
        np.testing.assert_array_equal(y, run_op(kernels, dev, T, N, K, G, int4, x_dtype, y_dtype))


@needs_hopper
@pytest.mark.parametrize("N, K, G", [(4100, 4096, 128), (136, 14336, 128), (1000, 4096, 4096)])
def test_hopper_gemm_long_k(kernels, N, K, G):
    """Llama-3-8B's K (4,096 and the down projection's 14,336) with N past a whole number of tiles; per channel."""
    rng = np.random.default_rng([N, K, G])
    dev, host = random_case(rng, 300, N, K, G, True, True, True, "BF16", "F16")
    check(run_op(kernels, dev, 300, N, K, G, True, "BF16", "BF16", path=3), host, "BF16", "BF16", "path 3: ")


def test_hopper_gemm_refuses_what_it_cannot_take(kernels):
    with pytest.raises(_core.InvalidArgumentError, match="Hopper int4 GEMM"):  # int8 codes
        kernels.weight_only_linear(0, 0, 0, 0, 0, 0, 100, 16, 256, 128, False, "BF16", "BF16", 0, path=3)
    with pytest.raises(_core.InvalidArgumentError, match="K = 160"):  # K not a multiple of 128
        kernels.weight_only_linear(0, 0, 0, 0, 0, 0, 100, 16, 160, 32, True, "BF16", "BF16", 0, path=3)


def test_gemv_refuses_shapes_it_cannot_take(kernels):
    with pytest.raises(_core.InvalidArgumentError, match="K = 36"):
        kernels.weight_only_linear(0, 0, 0, 0, 0, 0, 1, 16, 36, 18, True, "BF16", "BF16", 0, path=1)
    with pytest.raises(_core.InvalidArgumentError, match="group_size 48"):
        kernels.weight_only_linear(0, 0, 0, 0, 0, 0, 1, 16, 96, 48, True, "BF16", "BF16", 0, path=1)
    with pytest.raises(_core.InvalidArgumentError, match="group_size 7"):
        kernels.weight_only_linear(0, 0, 0, 0, 0, 0, 1, 16, 96, 7, False, "BF16", "BF16", 0)
    assert kernels.weight_only_gemv_supported(4096, 128, True) and kernels.weight_only_gemv_supported(96, 96, False)
    assert not kernels.weight_only_gemv_supported(4112, 4112, True) and not kernels.weight_only_gemv_supported(96, 8, False)


# ---- the op in an engine: the placement of F16 / BF16 / F32 scales, F32 offsets and biases, at load ----

def _engine(path, hf_dir, x_rows, codes, int4, scale, scale_dtype, offset, bias, group_size, attrs=None):
    """embedding -> gather_rows -> weight_only_linear writing the float32 logits (an LM head's place): token
    i's activation is x_rows[i] (the table, rounded to the compute dtype on CUDA)."""
    N, K = codes.shape
    const = lambda a: (lambda: a)  # noqa: E731
    stored_scale = {"float32": scale.astype(np.float32), "float16": scale.astype(np.float16),
                    "bfloat16": float32_to_bf16(scale.astype(np.float32))}[scale_dtype]
    weights = {"table": Parameter(x_rows.shape, "float32", const(x_rows), "table"),
               "w.weight": Parameter((N, K), "int4" if int4 else "int8",
                                     const(pack_int4(codes) if int4 else codes.astype(np.int8)), "w.weight"),
               "w.weight_scale": Parameter(scale.shape, scale_dtype, const(stored_scale), "w.weight_scale")}
    inputs = ["w.weight", "w.weight_scale"]
    if offset is not None:
        weights["w.weight_offset"] = Parameter(offset.shape, "float32", const(offset), "w.weight_offset")
        inputs.append("w.weight_offset")
    if bias is not None:
        weights["w.bias"] = Parameter((N,), "float32", const(bias), "w.bias")
        inputs.append("w.bias")
    model = AutoModelForCausalLM.from_hugging_face(hf_dir)
    config = build(model, BuildConfig(max_seq_len=128, max_batch_size=64)).config
    config["model_config"].update(vocab_size=N, hidden_size=K)
    spec = lambda name, *shape: {"name": name, "dtype": "float32", "shape": list(shape)}  # noqa: E731
    graph = config["graph"]
    graph["tensors"] = [spec("t0", "num_tokens", K), spec("t1", "num_logits", K)]
    graph["outputs"] = [spec("logits", "num_logits", N)]
    graph["nodes"] = [
        {"op": "embedding", "inputs": ["input_ids", "table"], "outputs": ["t0"], "attrs": {}},
        {"op": "gather_rows", "inputs": ["t0", "logits_indices"], "outputs": ["t1"], "attrs": {}},
        {"op": "weight_only_linear", "inputs": ["t1", *inputs], "outputs": ["logits"],
         "attrs": attrs if attrs is not None else {"group_size": group_size, "has_offset": offset is not None}},
    ]
    Engine(config, weights).save(path)
    return stored_scale


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    dirs = {}
    for dtype in ("float32", "float16"):  # CUDA computes in bf16, and in fp16 for fp16 models
        dirs[dtype] = tmp_path_factory.mktemp(f"hf-{dtype}")
        make_hf_checkpoint(dirs[dtype], arch="llama", dtype=dtype, vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID,
                           eos_token_id=EOS_ID)
    return dirs


@pytest.mark.parametrize("model_dtype", ["float32", "float16"])
@pytest.mark.parametrize("int4, K, group_size, has_offset, has_bias, scale_dtype", [
    (False, 128, 128, False, False, "float32"),  # W8A16 per channel
    (False, 128, 32, True, True, "float16"),
    (False, 96, 48, True, False, "float32"),     # the dequantize + GEMM path whatever T
    (True, 128, 32, False, False, "float16"),    # W4A16
    (True, 128, 64, True, True, "float16"),      # W4A16 with zero point
    (True, 256, 128, False, True, "bfloat16"),
    (True, 36, 18, True, False, "float32"),
])
def test_engine_op_places_scales_offsets_and_bias(hf_dirs, tmp_path, model_dtype, int4, K, group_size, has_offset,
                                                  has_bias, scale_dtype):
    rng = np.random.default_rng([K, group_size, int4, has_offset, len(scale_dtype), len(model_dtype)])
    N, G = 70, K // group_size
    x = (rng.standard_normal((64, K)) * np.exp2(rng.uniform(-3, 3, (64, 1)))).astype(np.float32)
    lo, hi = (-8, 8) if int4 else (-128, 128)
    codes = rng.integers(lo, hi, (N, K)).astype(np.int8)
    scale = np.exp2(rng.uniform(-8, -1, (N, G))).astype(np.float32)
    offset = (rng.standard_normal((N, G)) * 0.1).astype(np.float32) if has_offset else None
    bias = rng.standard_normal(N).astype(np.float32) if has_bias else None
    stored = _engine(tmp_path, hf_dirs[model_dtype], x, codes, int4, scale, scale_dtype, offset, bias, group_size)
    s64 = (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64) if scale_dtype == "bfloat16" \
        else stored.astype(np.float64)
    xd = "F16" if model_dtype == "float16" else "BF16"
    rep = lambda a: np.repeat(a, group_size, axis=1)  # noqa: E731
    w_exact = codes * rep(s64) + (rep(offset.astype(np.float64)) if has_offset else 0.0)
    b_exact = bias.astype(np.float64) if has_bias else np.zeros(N)
    x_t = to_dtype_f64(x, xd)  # the table as CUDA places it
    ref = x_t @ w_exact.T + b_exact
    mag = np.abs(x_t) @ np.abs(w_exact).T + np.abs(b_exact)
    # the bias is placed in the compute dtype too: one more rounding of it
    tol = (SUM_TOL + 3 * U_T[xd]) * mag + U_T[xd] * np.abs(b_exact) + U_OUT["F32"] * np.abs(ref)
    session = RunnerSession(tmp_path, tokens_per_block=4, num_kv_blocks=256, device=_core.DeviceKind.CUDA)
    seq = 0
    for M in (1, 3, 17, 64):  # the GEMV where the shape allows (up to 64 rows), else dequantize + GEMM
        tokens = [int(t) for t in rng.permutation(64)[:M]]
        out = session.step({seq + i: [t] for i, t in enumerate(tokens)})
        got = np.stack([np.asarray(out[seq + i], np.float64) for i in range(M)])
        seq += M
        err = np.abs(got - ref[tokens])
        assert np.all(err <= tol[tokens]), np.max(err / tol[tokens])


@pytest.mark.parametrize("attrs, message", [
    ({"group_size": 32, "has_offset": False, "has_g_idx": True}, "has_g_idx"),
    ({"group_size": 32, "has_offset": False, "has_g_idx": "yes"}, "has_g_idx"),
    ({"group_size": 32, "has_offset": False, "bits": 4}, "bits"),
    ({"group_size": 32, "has_offset": 1}, "has_offset"),
    ({"group_size": 48}, "group_size 48"),  # does not divide K = 128
    ({"has_offset": False}, "no group_size"),
])
def test_engine_op_refuses_unknown_attrs_at_load(hf_dirs, tmp_path, attrs, message):
    rng = np.random.default_rng(5)
    codes = rng.integers(-8, 8, (16, 128)).astype(np.int8)
    scale = np.ones((16, 4), np.float32)
    _engine(tmp_path, hf_dirs["float32"], np.ones((8, 128), np.float32), codes, True, scale, "float16", None, None,
            32, attrs=attrs)
    with pytest.raises(_core.RtllmError, match=message):
        RunnerSession(tmp_path, device=_core.DeviceKind.CUDA)


def test_engine_op_takes_has_g_idx_false(hf_dirs, tmp_path):
    rng = np.random.default_rng(6)
    codes = rng.integers(-8, 8, (16, 128)).astype(np.int8)
    x = rng.standard_normal((8, 128)).astype(np.float32)
    _engine(tmp_path, hf_dirs["float32"], x, codes, True, np.full((16, 4), 0.125, np.float32), "float16", None, None,
            32, attrs={"group_size": 32, "has_offset": False, "has_g_idx": False})
    out = np.asarray(RunnerSession(tmp_path, device=_core.DeviceKind.CUDA).step({0: [3]})[0], np.float64)
    xb = to_dtype_f64(x[3], "BF16")  # the table as CUDA places it
    w = codes * 0.125  # exact in bf16
    ref, mag = xb @ w.T, np.abs(xb) @ np.abs(w).T
    assert np.all(np.abs(out - ref) <= SUM_TOL * mag + U_OUT["F32"] * np.abs(ref)), np.abs(out - ref).max()


# ---- end to end: W8A16 / W4A16 engines, CUDA against the CPU ----
# Both backends use the same codes; CUDA computes in bf16 activations with the weights rounded to bf16
# (2^-8 relative per weight), the CPU in float32. Bound per sequence and step: ‖gpu − cpu‖ <= 2e-2·‖cpu‖ (the
# bound of the unquantized bf16 engine in test_generation_gpu.py; the weight rounding adds about 2^-8 of
# noise on top of the bf16 activations'). Greedy tokens, teacher-forced: the CPU's logit of the GPU's token
# must be within max(0.1·rms(logits), 4·rms(gpu − cpu)) of the CPU's top logit, and >= 80% its exact argmax.
LOGITS_RTOL = 2e-2
VARIANTS = {
    "w8": QuantConfig(quant_algo=QuantAlgo.W8A16),
    "w4g32": QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=32),
    "w4g64zp": QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=64, has_zero_point=True),
}  # (the tiny model's hidden size 64 takes no group of 128; the op tests above cover g128)


@pytest.fixture(scope="module")
def quantized_engines(hf_dirs, tmp_path_factory):
    dirs = {}
    for name, quant in VARIANTS.items():
        model = AutoModelForCausalLM.from_hugging_face(hf_dirs["float32"])
        dirs[name] = tmp_path_factory.mktemp(name)
        build(model, BuildConfig(max_seq_len=128), quant).save(dirs[name])
    return dirs


def compare_cuda_with_cpu(path):
    cpu = RunnerSession(path, device=_core.DeviceKind.CPU)
    gpu = RunnerSession(path, device=_core.DeviceKind.CUDA)
    rng = np.random.default_rng(11)
    prompts = {s: [int(t) for t in rng.integers(3, VOCAB_SIZE, n)] for s, n in enumerate([13, 5, 60, 1])}
    # prefill (79 rows: more than the op's 64 GEMV rows) through the dequantized GEMM (the LM head's 4 rows
    # through the GEMV), then greedy decode of all four (4 rows) through the GEMV
    lc, lg = cpu.step(prompts), gpu.step(prompts)
    exact = total = 0
    for _ in range(8):
        nxt = {}
        for s in prompts:
            c, g = np.asarray(lc[s], np.float64), np.asarray(lg[s], np.float64)
            assert np.isfinite(g).all()
            diff = np.linalg.norm(g - c)
            assert diff <= LOGITS_RTOL * np.linalg.norm(c), (s, diff, np.linalg.norm(c))
            tok = int(np.argmax(g))
            margin = max(0.1 * np.sqrt(np.mean(c ** 2)), 4 * np.sqrt(np.mean((g - c) ** 2)))
            assert c[tok] >= c.max() - margin, (s, tok, int(np.argmax(c)))
            exact += tok == int(np.argmax(c))
            total += 1
            nxt[s] = [tok]
        lc, lg = cpu.step(nxt), gpu.step(nxt)
    assert exact >= 0.8 * total, f"{exact}/{total} greedy tokens equal the CPU's argmax"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantized_engine_cuda_matches_cpu(quantized_engines, variant):
    path = quantized_engines[variant]
    config = json.loads((path / "config.json").read_text())
    assert any(n["op"] == "weight_only_linear" for n in config["graph"]["nodes"])
    compare_cuda_with_cpu(path)


# GGUF Q8_0 / Q4_0 / Q4_1 files keep their blocks as weight_only_linear codes (group 32; Q4_1 with offsets),
# the LM head included (float32 logits out of the op): written here from a tiny checkpoint as
# tests/python/test_gguf.py writes them.
@pytest.fixture(scope="module")
def gguf_engines(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_gguf
    from tokenizer_fixture import make_tokenizer

    hf = tmp_path_factory.mktemp("hf-gguf")
    make_hf_checkpoint(hf, arch="llama", vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    make_tokenizer(hf, vocab_size=VOCAB_SIZE)
    dirs = {}
    for qtype in ("Q8_0", "Q4_0", "Q4_1"):
        d = tmp_path_factory.mktemp(f"gguf-{qtype}")
        path = write_gguf(hf, d / "model.gguf", getattr(gguf.GGMLQuantizationType, qtype))
        model = AutoModelForCausalLM.from_hugging_face(str(path))
        build(model, BuildConfig(max_seq_len=128, max_batch_size=4, max_num_tokens=256)).save(d / "engine")
        dirs[qtype] = d / "engine"
    return dirs


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_engine_cuda_matches_cpu(gguf_engines, qtype):
    path = gguf_engines[qtype]
    nodes = json.loads((path / "config.json").read_text())["graph"]["nodes"]
    assert any(n["op"] == "weight_only_linear" and n["inputs"][1].startswith("lm_head") for n in nodes)
    compare_cuda_with_cpu(path)
