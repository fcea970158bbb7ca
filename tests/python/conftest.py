"""Shared fixtures: tiny random-weight Hugging Face checkpoints with a trained tokenizer."""
import pytest

from checkpoints import make_hf_checkpoint
from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE
from tokenizer_fixture import make_tokenizer


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch="llama", dtype="float32", tie=False, **overrides) -> checkpoint dir (cached)."""
    cache = {}

    def make(arch="llama", dtype="float32", tie=False, **overrides):
        key = (arch, dtype, tie, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-{dtype}-{'tied' if tie else 'untied'}")
            make_hf_checkpoint(path, arch=arch, dtype=dtype, tie_word_embeddings=tie,
                               vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                               **overrides)
            make_tokenizer(path, vocab_size=VOCAB_SIZE)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(params=["amx", "no_amx"])
def cpu_amx(request, monkeypatch):
    """Runs a test with each kernel of the CPU linear for BF16 / F16 weights: the AMX-BF16 tiles ("amx",
    RTLLM_CPU_AMX=1, which F16 weights need; skipped where the CPU, the OS or the build has no AMX-BF16)
    and, with RTLLM_CPU_AMX=0, the float32 FMA kernels. Engines read the variable when they load. True for
    the AMX run."""
    from rtllm import _core

    monkeypatch.setenv("RTLLM_CPU_AMX", "0" if request.param == "no_amx" else "1")
    if request.param == "no_amx":
        return False
    if not _core.cpu_amx_available():
        pytest.skip("the CPU linear has no AMX-BF16 here")
    return True
