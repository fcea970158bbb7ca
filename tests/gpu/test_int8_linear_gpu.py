"""int8_linear on CUDA (docs/engine_format.md, W8A8_SQ_PER_CHANNEL) against a float64 numpy reference of the
contract, and a SmoothQuant engine on CUDA against the same engine on the CPU.

Op level, through rtllm._core.kernels.int8_linear (the op kind's own code path: the per-token quantization
kernel, cuBLASLt's int8 GEMM, the scale epilogue), on fresh random inputs with poisoned (NaN) outputs. The
reference quantizes the bf16/fp16 x exactly as the contract says, in numpy float32 (IEEE, like the GPU's
__fmul_rn / __fdiv_rn / rintf), so the activation codes must be the same; the int32 sums are exact on both
sides. What remains is the epilogue's float32 rounding (the int -> float conversion, two products, the bias
add: at most 4 · 2^-24 of the magnitude) and, for a bf16/fp16 y, one rounding to it (2^-9 / 2^-11 relative).
One activation code off by one moves an output by a_scale · w_scale · |w|, far outside the float32 bound.
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

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
OUT_RTOL = {"BF16": 2.0 ** -8, "F16": 2.0 ** -10, "F32": 0.0}  # one rounding to y (half an ulp, with margin)


def reference(x, codes, w_scale, pqs, bias):
    """float64 y of the contract and the magnitude bounding the epilogue's float32 rounding; x is the float32
    value of the bf16/fp16 input."""
    xs = x if pqs is None else x * pqs  # float32 products
    amax = np.max(np.abs(xs), axis=1, keepdims=True)
    a_scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    qa = np.clip(np.rint((xs / a_scale).astype(np.float32)), -127, 127).astype(np.int64)
    acc = qa @ codes.astype(np.int64).T  # exact
    scale = a_scale.astype(np.float64) * w_scale.astype(np.float64)[None, :]
    b = np.zeros(codes.shape[0]) if bias is None else bias.astype(np.float64)
    return acc * scale + b, np.abs(acc) * scale + np.abs(b)


def random_case(rng, M, N, K, with_pqs, with_bias, x_dtype):
    x = (rng.standard_normal((M, K)) * rng.choice([0.01, 1.0, 30.0], size=(M, 1))).astype(np.float32)
    x[rng.random((M, K)) < 0.01] *= 20  # outliers set the per-token scale
    if M > 2:
        x[1] = 0.0  # a row of zeros: a_scale 1, y = bias
    x_t = torch.from_numpy(x).to(TORCH[x_dtype]).cuda()
    x_host = x_t.float().cpu().numpy()  # the values the GPU reads
    codes = rng.integers(-127, 128, size=(N, K)).astype(np.int8)
    w_scale = np.exp2(rng.uniform(-12, -4, size=N)).astype(np.float32)
    pqs = np.exp(rng.normal(size=K) * 0.7).astype(np.float32) if with_pqs else None
    bias_t = bias = None
    if with_bias:
        bias_t = torch.from_numpy(rng.standard_normal(N).astype(np.float32)).to(TORCH[x_dtype]).cuda()
        bias = bias_t.float().cpu().numpy()
    dev = dict(x=x_t, w=torch.from_numpy(codes).cuda(), w_scale=torch.from_numpy(w_scale).cuda(),
               pqs=None if pqs is None else torch.from_numpy(pqs).cuda(), bias=bias_t)
    return dev, (x_host, codes, w_scale, pqs, bias)


def run_op(kernels, dev, M, N, K, x_dtype, y_dtype):
    ws = torch.empty(kernels.int8_linear_workspace_bytes(M, N, K), dtype=torch.uint8, device="cuda")
    ws.fill_(0xFF)
    y = torch.empty((M, N), dtype=TORCH[y_dtype], device="cuda")
    y.view(torch.uint8).fill_(0xFF)  # NaN in every float dtype
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    kernels.int8_linear(y.data_ptr(), dev["x"].data_ptr(), dev["w"].data_ptr(), dev["w_scale"].data_ptr(),
                        ptr(dev["pqs"]), ptr(dev["bias"]), M, N, K, x_dtype, y_dtype, ws.data_ptr(),
                        torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return y.float().cpu().numpy().astype(np.float64)


def check(y, ref, mag, y_dtype):
    assert np.isfinite(y).all(), "non-finite outputs (poison left unwritten?)"
    err = np.abs(y - ref)
    bound = OUT_RTOL[y_dtype] * np.abs(ref) + 4 * 2.0 ** -24 * mag + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"at {worst}: got {y[worst]}, expected {ref[worst]} (bound {bound[worst]})"


@pytest.mark.parametrize("M", [1, 2, 7, 16, 64, 300, 1024])
# (301, 64): an odd N, whose int32 and bf16 rows of y are not 16-byte aligned (an odd vocabulary's LM head)
@pytest.mark.parametrize("N,K", [(64, 128), (304, 48), (1000, 1024), (200, 576), (301, 64)])
@pytest.mark.parametrize("with_pqs", [False, True], ids=["nopqs", "pqs"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_int8_linear_matches_reference(kernels, M, N, K, with_pqs, with_bias):
    rng = np.random.default_rng([M, N, K, with_pqs, with_bias])
    dev, host = random_case(rng, M, N, K, with_pqs, with_bias, "BF16")
    ref, mag = reference(*host)
    check(run_op(kernels, dev, M, N, K, "BF16", "F32"), ref, mag, "F32")
    check(run_op(kernels, dev, M, N, K, "BF16", "BF16"), ref, mag, "BF16")


@pytest.mark.parametrize("M", [1, 33])
@pytest.mark.parametrize("x_dtype,y_dtype", [("F16", "F16"), ("F16", "F32")])
def test_int8_linear_fp16(kernels, M, x_dtype, y_dtype):
    N, K = 272, 512
    rng = np.random.default_rng([M, len(y_dtype)])
    dev, host = random_case(rng, M, N, K, True, True, x_dtype)
    ref, mag = reference(*host)
    check(run_op(kernels, dev, M, N, K, x_dtype, y_dtype), ref, mag, y_dtype)


def test_long_k_is_exact(kernels):
    """K = 14336 (Llama-3-8B's down projection) with the largest weight codes: int32 sums up to
    127 · 127 · 14336 (2.3e8, beyond float32's exact integers) stay exact until the epilogue's conversion."""
    M, N, K = 4, 48, 14336
    rng = np.random.default_rng(9)
    dev, host = random_case(rng, M, N, K, False, False, "BF16")
    dev["w"].fill_(127)
    host = (host[0], np.full((N, K), 127, np.int8), *host[2:])
    ref, mag = reference(*host)
    check(run_op(kernels, dev, M, N, K, "BF16", "F32"), ref, mag, "F32")


def test_k_not_multiple_of_16_is_refused(kernels):
    with pytest.raises(_core.InvalidArgumentError, match="K = 40 columns; the CUDA backend needs a multiple of 16"):
        kernels.int8_linear(0, 0, 0, 0, 0, 0, 1, 16, 40, "BF16", "BF16", 0)


# ---- end to end: a W8A8_SQ_PER_CHANNEL engine, CUDA against the CPU ----
# Both backends run the same codes and scales, but the CPU's activations are float32 and CUDA's bf16: the
# int8 activation codes move by one step where a bf16-rounded value crosses a rounding boundary (about
# 2^-9 / 2^-7 of the elements), a fraction of the noise int8 quantization itself adds. Bound per sequence
# and step: ‖gpu − cpu‖ <= max(2e-2 · ‖cpu‖, 1.5 · ‖cpu − cpu_unquantized‖) (2e-2: the unquantized bf16
# engine's bound in test_generation_gpu.py); greedy tokens teacher-forced, >= 80% equal to the CPU's.
LOGITS_RTOL = 2e-2
QUANT_FRACTION = 1.5


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = tmp_path_factory.mktemp("sq")
    make_hf_checkpoint(path / "hf", arch="llama", vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = AutoModelForCausalLM.from_hugging_face(path / "hf")
    # calibration runs on the CPU (per-channel ranges), on seeded random ids (the checkpoint has no tokenizer)
    with pytest.warns(UserWarning, match="random token ids"):
        engine = build(model, BuildConfig(max_seq_len=128),
                       QuantConfig(quant_algo="W8A8_SQ_PER_CHANNEL", calib_size=8, calib_max_seq_length=64))
    engine.save(path / "sq")
    model = AutoModelForCausalLM.from_hugging_face(path / "hf")
    build(model, BuildConfig(max_seq_len=128)).save(path / "plain")
    return path / "sq", path / "plain"


def test_smoothquant_engine_cuda_matches_cpu(engines):
    sq, plain = engines
    cpu = RunnerSession(sq, device=_core.DeviceKind.CPU)
    gpu = RunnerSession(sq, device=_core.DeviceKind.CUDA)
    ref = RunnerSession(plain, device=_core.DeviceKind.CPU)
    rng = np.random.default_rng(3)
    prompts = {s: [int(t) for t in rng.integers(3, VOCAB_SIZE, n)] for s, n in enumerate([13, 5, 40, 1])}
    lc, lg, lr = cpu.step(prompts), gpu.step(prompts), ref.step(prompts)
    exact = total = 0
    worst = 0.0
    for _ in range(8):  # prefill, then greedy decode of all four together
        nxt = {}
        for s in prompts:
            c, g, r = (np.asarray(v, np.float64) for v in (lc[s], lg[s], lr[s]))
            assert np.isfinite(g).all()
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


def test_calibration_falls_back_to_the_cpu_for_per_channel_ranges(engines):
    """The CUDA runner refuses per-channel observation clearly; calibration (above) measured on the CPU."""
    sq, plain = engines
    runner = RunnerSession(plain, device=_core.DeviceKind.CUDA).runner
    with pytest.raises(_core.InvalidArgumentError, match="observe_channel_amax is not implemented on the CUDA "
                                                         "backend \\(available on the CPU\\)"):
        runner.observe_channel_amax(["t1"])
