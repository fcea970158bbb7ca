"""CUDA op kinds at load: dtypes the kinds cannot run fail there naming op, dtype and backend; the KV
pool's bytes follow its dtype; the convert kernel against torch's casts, bit for bit."""
import json
import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from engine_fixture import TinyModel, write_engine, write_safetensors  # noqa: E402

from rtllm import _core  # noqa: E402

CUDA = _core.DeviceKind.CUDA
# torch dtype -> (rtllm dtype name, kernels dtype attribute)
DTYPES = {torch.bfloat16: ("BF16", "BF16"), torch.float16: ("F16", "FP16"), torch.float32: ("F32", "FP32"),
          torch.float8_e4m3fn: ("F8_E4M3", "FP8_E4M3"), torch.float8_e5m2: ("F8_E5M2", "FP8_E5M2")}


def _runner(path, **runtime):
    config = _core.RuntimeConfig(device=CUDA, num_kv_blocks=64, tokens_per_block=16, **runtime)
    return _core.ModelRunner(_core.Engine.load(str(path)), config)


def test_fp8_weight_in_a_bf16_linear_fails_at_load(tmp_path):
    from safetensors.numpy import load_file

    m = TinyModel()
    path = write_engine(tmp_path / "e", m)
    tensors = {k: ("F32", v.shape, v.tobytes()) for k, v in load_file(str(path / "rank0.engine")).items()}
    w = np.ascontiguousarray(m.weights["lm_head.weight"], np.float32)
    tensors["lm_head.weight"] = ("F8_E4M3", w.shape, _core.convert_floats(w.view(np.uint8).ravel(), "F32",
                                                                          "F8_E4M3").tobytes())
    write_safetensors(path / "rank0.engine", tensors)
    with pytest.raises(_core.RtllmError) as err:
        _runner(path)
    message = str(err.value)
    assert 'op "linear"' in message and "F8_E4M3" in message and "CUDA" in message, message


@pytest.mark.parametrize("dtype,element_bytes", [("float32", 2), ("bfloat16", 2), ("float16", 2)])
def test_kv_pool_bytes_follow_the_kv_dtype(tmp_path, dtype, element_bytes):
    m = TinyModel(dtype=dtype)
    path = write_engine(tmp_path / "e", m)
    runner = _runner(path)
    expected_dtype = "F16" if dtype == "float16" else "BF16"  # the compute dtype by default
    assert runner.config.kv_cache_dtype == expected_dtype
    per_block = m.num_layers * 2 * m.num_kv_heads * 16 * m.head_dim * element_bytes
    assert runner.kv_pool_bytes == (64 + 1) * per_block  # + the CUDA-graph padding block


def test_kv_cache_dtype_attention_cannot_read_fails_at_load(tmp_path):
    # F8_E4M3 is read (test_fp8_kv_gpu.py); F8_E5M2 is not.
    path = write_engine(tmp_path / "e", TinyModel())
    with pytest.raises(_core.RtllmError) as err:
        _runner(path, kv_cache_dtype="F8_E5M2")
    message = str(err.value)
    assert 'op "attention"' in message and "CUDA" in message and "F8_E5M2" in message, message


PAIRS = [(torch.float32, torch.float8_e4m3fn), (torch.float32, torch.float8_e5m2), (torch.bfloat16, torch.float8_e4m3fn),
         (torch.float16, torch.float8_e5m2), (torch.float8_e4m3fn, torch.float32), (torch.float8_e5m2, torch.bfloat16),
         (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)]


def raw_bytes(t):
    return t.contiguous().view(torch.uint8).cpu().numpy().ravel()


@pytest.mark.parametrize("src,dst", PAIRS)
def test_convert_kernel_matches_torch(kernels, stream, src, dst):
    gen = torch.Generator(device="cuda").manual_seed(7)
    limit = 400.0 if torch.float8_e4m3fn in (src, dst) else 50000.0
    n = 100003
    mags = torch.exp2(torch.rand(n, generator=gen, device="cuda") * (np.log2(limit) + 20) - 20)
    signs = torch.where(torch.rand(n, generator=gen, device="cuda") < 0.5, -1.0, 1.0)
    x = (mags * signs).to(src)
    out = torch.full((n * dst.itemsize,), 0x7F, dtype=torch.uint8, device="cuda").view(dst)  # poisoned
    kernels.convert(out.data_ptr(), getattr(kernels, DTYPES[dst][1]), x.data_ptr(), getattr(kernels, DTYPES[src][1]),
                    n, stream)
    torch.cuda.synchronize()
    assert np.array_equal(raw_bytes(out), raw_bytes(x.to(dst)))
    # The host conversion (engine load, CPU ops) gives the same bits.
    assert np.array_equal(_core.convert_floats(raw_bytes(x), DTYPES[src][0], DTYPES[dst][0]), raw_bytes(out))
