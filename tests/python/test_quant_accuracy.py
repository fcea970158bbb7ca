"""Accuracy of the quantized engines on a real trained model (SmolLM2-135M-Instruct, float32 from its Q4_1
GGUF; tests/python/smollm2.py): teacher-forced perplexity over held-out English text
(benchmarks/data/heldout_en.txt) and top-1 agreement with the unquantized engine, through
benchmarks/quant_accuracy.py. Two references keep the harness honest: HF transformers on the same windows
(the unquantized engine must match it), and HF transformers with FP8_PER_CHANNEL_PER_TOKEN simulated in
torch (rtllm's FP8 must be as accurate as FP8 itself allows).

Bounds. Measured on this text (1022 scored tokens, windows of 512): perplexity 32.85 unquantized (HF: the
same to 4 digits); FP8_PER_CHANNEL_PER_TOKEN +2.9% (torch simulation of the same numerics: +2.3%) with 89.9%
top-1 agreement (simulation: 90.0%); with the FP8 KV cache +3.7%, 88.7%; static FP8 (per-tensor weights and
calibrated activation scales) with the FP8 KV cache +4.9%, 88.6% (+5.1% over 2555 tokens). A 135M model is more sensitive to
FP8 than large ones, and at perplexity ~33 many positions have near-tied top tokens, so agreement is low
even for exact FP8 numerics: two equally valid realizations of them (the torch simulation, and the same
with every activation scale times 1 + 2^-20) agree on only 90.9% of the tokens, with a mean |difference| of
0.130 in log-probability, while rtllm and the simulation differ by 0.119. So 2% / 95% are out of reach for
any FP8 implementation on this model. The bounds
below leave a margin over the measurement for other CPUs' float32 rounding, while a wrong scale or a lost
rounding mode moves perplexity by far more.

Weight-only (round to nearest), same text: W8A16 (int8 per channel) -0.11% with 95.6% top-1 agreement;
W4A16 group 64 (the largest allowed group dividing SmolLM2's hidden size 576; 128 does not and is refused)
+53.5%, 58.5%; W4A16 group 32 with zero point +20.3%, 68.7% (group 32 symmetric: +34.9%, group 64 with zero
point: +29.5%). This checkpoint's weights are already a Q4_1 grid (group 32, float minimum), which another
4-bit grid can only re-round: int4 round to nearest is far from lossless on it, and the bounds below only
pin these measurements, so that a regression fails.

INT8 KV cache alone (unquantized weights, k_scale / v_scale = calibrated amax / 127 per layer), same text:
+0.12% (32.89 against 32.85) with 96.7% top-1 agreement. The bound (1%, against the 2% target) leaves margin
for other CPUs' rounding; a wrong scale (amax / 448, as for E4M3) or codes read unsigned move it far more.
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from quant_accuracy import build_engine, heldout_windows, hf_scores, quant_config_of, rtllm_scores  # noqa: E402
from smollm2 import checkpoint_dir, gguf_path  # noqa: E402

NUM_TOKENS, WINDOW = 1024, 512  # two windows: about a minute on two cores for every check below
# name -> (largest perplexity increase over the unquantized engine, smallest top-1 agreement)
BOUNDS = {
    "FP8_PER_CHANNEL_PER_TOKEN": (0.04, 0.87),
    "FP8_PER_CHANNEL_PER_TOKEN+FP8KV": (0.05, 0.86),
    "FP8+FP8KV": (0.065, 0.86),  # static FP8 (calibrated activation and KV scales)
}
# weight-only: name (benchmarks/quant_accuracy.py: algo[:group_size][:zp]) -> (largest perplexity increase,
# smallest top-1 agreement)
WEIGHT_ONLY_BOUNDS = {
    "W8A16": (0.01, 0.93),
    "W4A16:64": (0.60, 0.55),
    "W4A16:32:zp": (0.25, 0.65),
}


# KV cache only (unquantized weights): name -> (largest perplexity increase, smallest top-1 agreement)
KV_ONLY_BOUNDS = {
    "none+INT8KV": (0.01, 0.94),
}


@pytest.fixture(scope="module")
def smollm2():
    return checkpoint_dir()


@pytest.fixture(scope="module")
def windows(smollm2):
    return heldout_windows(smollm2, NUM_TOKENS, WINDOW)


@pytest.fixture(scope="module")
def scores(smollm2, windows, tmp_path_factory):
    """name -> Scores of the engine built with that QuantConfig (built on first use)."""
    cache = {}

    def get(name):
        if name not in cache:
            engine_dir = tmp_path_factory.mktemp(name.replace("+", "_").replace(":", "_"))
            build_engine(smollm2, quant_config_of(name), str(engine_dir), max_seq_len=WINDOW)
            cache[name] = rtllm_scores(str(engine_dir), windows)
        return cache[name]

    return get


def test_unquantized_perplexity_matches_hf(smollm2, windows, scores):
    ours, hf = scores("none"), hf_scores(smollm2, windows)
    assert len(ours.logprobs) == len(hf.logprobs) == NUM_TOKENS - len(windows)
    assert abs(ours.perplexity / hf.perplexity - 1) < 0.01, (ours.perplexity, hf.perplexity)
    assert ours.agreement(hf) > 0.99
    assert 5 < ours.perplexity < 100  # a trained model on English prose (random weights: ~vocab size 49152)


def test_gguf_file_scores_as_its_hf_checkpoint(smollm2, windows, scores, tmp_path):
    """The harness given the GGUF file itself (a machine without room for the derived float32 checkpoint):
    its tokenizer cuts the same windows, and its engine, built from the file's weights dequantized to
    float32, scores them as the HF checkpoint's engine does."""
    gguf = gguf_path()
    gguf_windows = heldout_windows(gguf, NUM_TOKENS, WINDOW)
    assert gguf_windows == windows
    build_engine(gguf, quant_config_of("none"), str(tmp_path / "engine"), max_seq_len=WINDOW)
    ours = rtllm_scores(str(tmp_path / "engine"), windows)
    np.testing.assert_allclose(ours.logprobs, scores("none").logprobs, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ours.argmax, scores("none").argmax)


def test_fp8_per_channel_per_token_is_as_accurate_as_fp8_allows(smollm2, windows, scores):
    """rtllm's FP8 against FP8_PER_CHANNEL_PER_TOKEN simulated in torch: the same perplexity up to the noise
    of rounding flips (measured 0.6% apart), and closer per token than FP8 is to itself (see above)."""
    ours, simulated = scores("FP8_PER_CHANNEL_PER_TOKEN"), hf_scores(smollm2, windows, fake_fp8=True)
    assert abs(ours.perplexity / simulated.perplexity - 1) < 0.02, (ours.perplexity, simulated.perplexity)
    assert float(np.mean(np.abs(ours.logprobs - simulated.logprobs))) < 0.2


def perplexity_within(scores, name, max_increase):
    """(unquantized scores, `name`'s scores, relative perplexity increase), the increase at most max_increase."""
    base, ours = scores("none"), scores(name)
    increase = ours.perplexity / base.perplexity - 1
    assert increase <= max_increase, f"{name}: perplexity {ours.perplexity:.3f} is {100 * increase:.2f}% above " \
                                     f"the unquantized {base.perplexity:.3f}"
    return base, ours, increase


@pytest.mark.parametrize("name", list(BOUNDS))
def test_quantized_perplexity_and_agreement(scores, name):
    max_increase, min_agreement = BOUNDS[name]
    base, ours, increase = perplexity_within(scores, name, max_increase)
    assert increase > 0.001, "no measurable change: the engine is not quantized"
    assert ours.agreement(base) >= min_agreement, f"{name}: top-1 agreement {ours.agreement(base):.4f}"


@pytest.mark.parametrize("name", list(WEIGHT_ONLY_BOUNDS))
def test_weight_only_perplexity_and_agreement(scores, name):
    max_increase, min_agreement = WEIGHT_ONLY_BOUNDS[name]
    base, ours, _ = perplexity_within(scores, name, max_increase)
    agreement = ours.agreement(base)
    assert min_agreement <= agreement < 0.99, f"{name}: top-1 agreement {agreement:.4f} (above 0.99: not quantized)"


@pytest.mark.parametrize("name", list(KV_ONLY_BOUNDS))
def test_kv_cache_only_perplexity_and_agreement(scores, name):
    """The increase can be a fraction of a percent, so top-1 agreement below 99% is what shows the cache
    really is quantized."""
    max_increase, min_agreement = KV_ONLY_BOUNDS[name]
    base, ours, _ = perplexity_within(scores, name, max_increase)
    agreement = ours.agreement(base)
    assert min_agreement <= agreement < 0.99, f"{name}: top-1 agreement {agreement:.4f} (above 0.99: not quantized)"
