"""FP8_PER_CHANNEL_PER_TOKEN on CUDA: no fp8_linear kind exists there yet, so such an engine must fail at
load with the op registry's message rather than run anything."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from checkpoints import make_hf_checkpoint  # noqa: E402
from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE  # noqa: E402

from rtllm import _core  # noqa: E402
from rtllm.builder import BuildConfig, build  # noqa: E402
from rtllm.models import AutoModelForCausalLM  # noqa: E402
from rtllm.quantization import QuantConfig  # noqa: E402


def test_fp8_engine_fails_at_load_on_cuda(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", arch="llama", vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = AutoModelForCausalLM.from_hugging_face(tmp_path / "hf")
    quant = QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN")
    build(model, BuildConfig(max_seq_len=128), quant).save(tmp_path / "engine")
    engine = _core.Engine.load(str(tmp_path / "engine"))
    config = _core.RuntimeConfig(device=_core.DeviceKind.CUDA, num_kv_blocks=64, tokens_per_block=16)
    with pytest.raises(_core.RtllmError, match='op "fp8_linear" has no CUDA implementation'):
        _core.ModelRunner(engine, config)
