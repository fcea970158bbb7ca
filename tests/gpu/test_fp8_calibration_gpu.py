"""Calibration on CUDA: the runner's amax observers and its KV-pool amax against the same calibration on
the CPU (float32 activations and cache), which tests/python/test_fp8_static.py checks against HF. CUDA
computes in bf16, so the ranges agree to bf16 precision, not bit for bit."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from checkpoints import make_hf_checkpoint  # noqa: E402
from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE  # noqa: E402
from tokenizer_fixture import make_tokenizer  # noqa: E402

from rtllm import _core  # noqa: E402
from rtllm.builder import BuildConfig  # noqa: E402
from rtllm.models import AutoModelForCausalLM  # noqa: E402
from rtllm.quantization import QuantConfig  # noqa: E402
from rtllm.quantization.calibration import calibrate  # noqa: E402

pytestmark = pytest.mark.skipif(not _core.cuda_available(), reason="no CUDA device or no CUDA backend in this build")

# bf16 activations (8 mantissa bits) through a few layers: a few bf16 roundings of the largest value.
RTOL = 3e-2
TEXTS = ["A short sentence about rivers and the sea.", "Numbers: 3, 14, 159, 2653; words after them.",
         "The third sample is a little longer than the others, so that it spans more positions " * 3]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_calibration_matches_cpu(tmp_path, monkeypatch, arch):
    make_hf_checkpoint(tmp_path, arch=arch, dtype="float32", vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID,
                       eos_token_id=EOS_ID)
    make_tokenizer(tmp_path, vocab_size=VOCAB_SIZE)
    model = AutoModelForCausalLM.from_hugging_face(tmp_path)
    qc = QuantConfig(quant_algo="FP8", kv_cache_quant_algo="FP8", calib_max_seq_length=48)
    weights = [f"model.layers.{i}.{n}.weight" for i in range(model.config.num_layers)
               for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    on_cuda = calibrate(model, BuildConfig(dtype="bfloat16"), qc, TEXTS, weights)
    monkeypatch.setenv("RTLLM_CALIB_DEVICE", "cpu")
    on_cpu = calibrate(model, BuildConfig(dtype="bfloat16"), qc, TEXTS, weights)
    assert (on_cuda.num_samples, on_cuda.num_tokens) == (on_cpu.num_samples, on_cpu.num_tokens)
    for name in weights:
        assert on_cpu.linear_amax[name] > 0
        np.testing.assert_allclose(on_cuda.linear_amax[name], on_cpu.linear_amax[name], rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(np.array(on_cuda.kv_amax), np.array(on_cpu.kv_amax), rtol=RTOL)
