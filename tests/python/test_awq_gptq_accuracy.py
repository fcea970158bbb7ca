"""Accuracy of W4A16_AWQ and W4A16_GPTQ on a real trained model (SmolLM2-135M-Instruct, float32 from its Q4_1
GGUF; tests/python/smollm2.py): teacher-forced perplexity over held-out English text, as
test_quant_accuracy.py measures it (benchmarks/quant_accuracy.py), against the unquantized engine and round to
nearest (RTN) of the same format.

Group 128 does not divide SmolLM2's hidden size (576), so group 64 stands for it. Calibration: CALIB_SIZE
samples of the corpus shipped with rtllm (not the held-out text), run once: AWQ and GPTQ read the same input
statistics of the unquantized model, whatever their group size or order (the engines equal those of
builds that calibrate on their own). Measured values and the bounds are in
MEASURED below and in docs/quantization.md; the bounds pin the measurements with a margin for other CPUs'
float32 rounding, and each algorithm must also beat RTN of its format by a clear margin.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from quant_accuracy import build_engine, calibrate, heldout_windows, rtllm_scores  # noqa: E402
from smollm2 import checkpoint_dir  # noqa: E402

from rtllm.quantization import QuantConfig  # noqa: E402

NUM_TOKENS, WINDOW = 1024, 512
CALIB_SIZE = 64
RTN = {  # the same format by round to nearest (measured in test_quant_accuracy.py / docs/quantization.md)
    "sym": QuantConfig(quant_algo="W4A16", group_size=64),
    "zp32": QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True),
}
# name -> (QuantConfig, RTN key, largest perplexity increase over the unquantized engine). Measured (1,022
# scored tokens, 64 calibration samples): RTN group 64 +53.5%, group 32 with zero point +20.3%; GPTQ group
# 64 +23.4%, with desc_act +8.7%, group 32 with zero point and desc_act +4.2% (the 8% target, checked here);
# AWQ group 64 +18.3%.
# AWQ's target (at most 8% above, group 128) is not met on this checkpoint: see docs/quantization.md.
CONFIGS = {
    "W4A16_GPTQ:64": (QuantConfig(quant_algo="W4A16_GPTQ", group_size=64, calib_size=CALIB_SIZE), "sym", 0.27),
    "W4A16_GPTQ:64:desc_act": (QuantConfig(quant_algo="W4A16_GPTQ", group_size=64, desc_act=True,
                                           calib_size=CALIB_SIZE), "sym", 0.11),
    "W4A16_GPTQ:32:zp:desc_act": (QuantConfig(quant_algo="W4A16_GPTQ", group_size=32, has_zero_point=True,
                                              desc_act=True, calib_size=CALIB_SIZE), "zp32", 0.08),
    "W4A16_AWQ:64": (QuantConfig(quant_algo="W4A16_AWQ", group_size=64, calib_size=CALIB_SIZE), "sym", 0.22),
}


@pytest.fixture(scope="module")
def smollm2():
    return checkpoint_dir()


@pytest.fixture(scope="module")
def windows(smollm2):
    return heldout_windows(smollm2, NUM_TOKENS, WINDOW)


@pytest.fixture(scope="module")
def calibration(smollm2):
    """The one calibration every config of CONFIGS builds with (they share CALIB_SIZE and the corpus)."""
    return calibrate(smollm2, next(iter(CONFIGS.values()))[0], max_seq_len=WINDOW)


@pytest.fixture(scope="module")
def scores(smollm2, windows, calibration, tmp_path_factory):
    cache = {}

    def get(name, quant_config):
        if name not in cache:
            engine_dir = tmp_path_factory.mktemp(name.replace(":", "_"))
            build_engine(smollm2, quant_config, str(engine_dir), max_seq_len=WINDOW,
                         calibration=calibration if name in CONFIGS else None)
            cache[name] = rtllm_scores(str(engine_dir), windows)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_calibrated_int4_perplexity(scores, name):
    quant_config, rtn_key, max_increase = CONFIGS[name]
    base = scores("none", None)
    rtn = scores(f"rtn_{rtn_key}", RTN[rtn_key])
    ours = scores(name, quant_config)
    increase = ours.perplexity / base.perplexity - 1
    rtn_increase = rtn.perplexity / base.perplexity - 1
    assert increase <= max_increase, f"{name}: perplexity {ours.perplexity:.3f} is {100 * increase:.2f}% above the " \
                                     f"unquantized {base.perplexity:.3f}"
    # a real gain over round to nearest of the same format, and a quantized engine
    assert increase < 0.75 * rtn_increase, (name, increase, rtn_increase)
    assert 0.5 < ours.agreement(base) < 0.99
