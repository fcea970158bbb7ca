"""ModelRunner on CUDA against the float64 numpy transformer of tests/python/engine_fixture.py.

The GPU computes in bf16 (fp16 for fp16 engines) with float32 accumulation, so the bound is
‖logits − reference‖ / ‖reference‖ <= 2e-2 (bf16 has 8 mantissa bits: one rounding is <= 3.9e-3, and a
2-layer model rounds activations a few dozen times). CUDA graphs: a replayed graph runs the same kernels
with the same arguments as the eager step it was captured from, so at batch sizes equal to a bucket the
logits with graphs on and off must be bitwise equal; other sizes are padded to the next bucket and are
held to the bf16 bound.
"""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from engine_fixture import RunnerSession, TinyModel, random_tokens, reference_logits, write_engine  # noqa: E402

from rtllm import _core  # noqa: E402

pytestmark = pytest.mark.skipif(not _core.cuda_available(), reason="no CUDA device or no CUDA backend in this build")

RTOL = 2e-2  # ‖gpu − float64 reference‖ / ‖reference‖ for bf16/fp16 activations


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def assert_close(actual, expected, rtol=RTOL):
    assert np.all(np.isfinite(actual)), "non-finite logits"
    err = relative_error(actual, expected)
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def Session(engine_dir, tokens_per_block=4, num_kv_blocks=512, seed=0, **runtime):
    """A CUDA RunnerSession."""
    return RunnerSession(engine_dir, tokens_per_block, num_kv_blocks, seed, device=_core.DeviceKind.CUDA, **runtime)


@pytest.fixture
def engine(tmp_path):
    """engine(fused=True, limits=None, **TinyModel fields) -> (TinyModel, engine dir)."""
    count = [0]

    def make(fused=True, limits=None, **fields):
        m = TinyModel(**fields)
        count[0] += 1
        return m, write_engine(tmp_path / f"engine{count[0]}", m, fused=fused, limits=limits)

    return make


VARIANTS = [
    dict(fused=True), dict(fused=False), dict(fused=True, qk_norm=True, qkv_bias=True),
    dict(fused=False, qk_norm=True, qkv_bias=True), dict(fused=True, dtype="bfloat16"),
    dict(fused=True, dtype="float16", tie_word_embeddings=True), dict(fused=True, num_kv_heads=1),
    dict(fused=True, num_kv_heads=4),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_batch_of_prompts_matches_reference(engine, variant):
    rng = np.random.default_rng(1)
    m, path = engine(**variant)
    prompts = {s: random_tokens(rng, m, n) for s, n in enumerate([1, 5, 13, 40, 77])}
    out = Session(path).step(prompts)
    for s, tokens in prompts.items():
        assert_close(out[s], reference_logits(m, tokens)[-1])


@pytest.mark.parametrize("tokens_per_block", [4, 16, 32])
@pytest.mark.parametrize("graphs", [True, False])
def test_prefill_then_decode(engine, tokens_per_block, graphs):
    rng = np.random.default_rng(3)
    m, path = engine(num_layers=3)
    session = Session(path, tokens_per_block, enable_cuda_graphs=graphs)
    tokens = random_tokens(rng, m, 37)
    out = session.step({0: tokens})[0]
    for _ in range(12):  # the context spans many blocks, taken in shuffled order
        assert_close(out, reference_logits(m, tokens)[-1])
        tokens.append(int(rng.integers(0, m.vocab_size)))
        out = session.step({0: tokens[-1:]})[0]
    assert_close(out, reference_logits(m, tokens)[-1])


def test_long_context_decode_uses_many_blocks(engine):
    rng = np.random.default_rng(9)
    m, path = engine(rope_theta=500000.0, limits={"max_seq_len": 1024, "max_input_len": 900, "max_num_tokens": 1024})
    session = Session(path, 16, num_kv_blocks=128)
    tokens = random_tokens(rng, m, 900)
    session.step({0: tokens})
    for _ in range(3):
        tokens.append(int(rng.integers(0, m.vocab_size)))
        out = session.step({0: tokens[-1:]})[0]
    assert_close(out, reference_logits(m, tokens)[-1])


def test_chunked_prefill_matches_reference(engine):
    rng = np.random.default_rng(4)
    m, path = engine()
    tokens = random_tokens(rng, m, 29)
    session = Session(path, 4, seed=7)
    for start in range(0, 29, 8):
        out = session.step({0: tokens[start:start + 8]})[0]
        assert_close(out, reference_logits(m, tokens[:start + 8])[-1])


def test_mixed_context_and_generation_step(engine):
    rng = np.random.default_rng(5)
    m, path = engine(qk_norm=True)
    session = Session(path, 4)
    history = {"gen": random_tokens(rng, m, 19), "gen2": random_tokens(rng, m, 3), "chunk": random_tokens(rng, m, 8)}
    session.step(history)
    step = {"new": random_tokens(rng, m, 7), "chunk": random_tokens(rng, m, 6), "gen": random_tokens(rng, m, 1),
            "gen2": random_tokens(rng, m, 1)}
    out = session.step(step)
    assert_close(out["new"], reference_logits(m, step["new"])[-1])
    assert_close(out["chunk"], reference_logits(m, history["chunk"] + step["chunk"])[-1])
    assert_close(out["gen"], reference_logits(m, history["gen"] + step["gen"])[-1])
    assert_close(out["gen2"], reference_logits(m, history["gen2"] + step["gen2"])[-1])


@pytest.mark.parametrize("buckets", ["1", "0"])
def test_prompt_steps_of_many_row_counts(engine, monkeypatch, buckets):
    """Steps of 129 to 700 tokens: with RTLLM_CUBLASLT_BUCKETS=1 most of them reuse the cuBLASLt algorithm
    of another row count in their bucket (heuristic_rows in cublaslt_gemm.cc); each step's logits match the
    float64 reference either way."""
    monkeypatch.setenv("RTLLM_CUBLASLT_BUCKETS", buckets)
    rng = np.random.default_rng(11)
    m, path = engine(limits={"max_seq_len": 1024, "max_input_len": 1024, "max_num_tokens": 1024})
    session = Session(path, 16, num_kv_blocks=256)
    for s, n in enumerate([129, 150, 200, 255, 256, 257, 300, 511, 700, 140]):
        tokens = random_tokens(rng, m, n)
        assert_close(session.step({s: tokens})[s], reference_logits(m, tokens)[-1])


BUCKETS = [1, 2, 4, 8, 16, 20]  # of max_batch_size 20


def test_decode_batches_of_every_size_with_and_without_graphs(engine, monkeypatch):
    """Every batch size 1..20 decodes 3 steps with graphs on and off (same blocks, same tokens). Bit-equal
    where a bucket's graph replays the eager kernels: the linears' timed GEMV-or-cuBLASLt choice, which the
    graphs' warm-up makes and an eager backend does not, is off (RTLLM_LINEAR_TUNING=0)."""
    monkeypatch.setenv("RTLLM_LINEAR_TUNING", "0")
    rng = np.random.default_rng(6)
    m, path = engine(limits={"max_batch_size": 20})
    on = Session(path, 4, num_kv_blocks=1200, seed=1, enable_cuda_graphs=True)
    off = Session(path, 4, num_kv_blocks=1200, seed=1, enable_cuda_graphs=False)
    for batch in range(1, 21):
        prompts = {(batch, s): random_tokens(rng, m, int(rng.integers(1, 12))) for s in range(batch)}
        on.step(prompts)
        off.step(prompts)
        for _ in range(3):  # the first decode step of a bucket captures its graph, the next ones replay it
            step = {seq: random_tokens(rng, m, 1) for seq in prompts}
            out_on, out_off = on.step(step), off.step(step)
            for seq in prompts:
                assert_close(out_on[seq], reference_logits(m, on.tokens[seq])[-1])
                assert_close(out_off[seq], reference_logits(m, off.tokens[seq])[-1])
                if batch in BUCKETS:
                    np.testing.assert_array_equal(out_on[seq], out_off[seq])


def test_graph_replay_sees_new_block_tables(engine):
    """Replays of one bucket with different sequences (other blocks, other lengths) stay correct."""
    rng = np.random.default_rng(8)
    m, path = engine()
    session = Session(path, 4, enable_cuda_graphs=True)
    for round_ in range(4):
        prompts = {(round_, s): random_tokens(rng, m, int(rng.integers(1, 30))) for s in range(2)}
        session.step(prompts)
        for _ in range(2):
            out = session.step({seq: random_tokens(rng, m, 1) for seq in prompts})
            for seq in prompts:
                assert_close(out[seq], reference_logits(m, session.tokens[seq])[-1])


def test_kv_pool_sized_from_free_memory(engine):
    m, path = engine()
    e = _core.Engine.load(str(path))
    cfg = _core.RuntimeConfig(device=_core.DeviceKind.CUDA, tokens_per_block=16, kv_free_memory_fraction=0.01)
    runner = _core.ModelRunner(e, cfg)
    per_seq = -(-e.max_seq_len // 16)
    assert runner.config.num_kv_blocks >= per_seq
    with pytest.raises(_core.RtllmError, match="cannot hold one sequence of max_seq_len"):
        _core.ModelRunner(e, _core.RuntimeConfig(device=_core.DeviceKind.CUDA, tokens_per_block=16,
                                                 kv_free_memory_fraction=1e-12))


def test_bad_block_id_is_rejected(engine):
    m, path = engine()
    session = Session(path, 4, num_kv_blocks=8)
    with pytest.raises(ValueError, match="block id 8 outside"):
        session.runner.forward([1, 2], [2], [0], np.array([[8]], dtype=np.int32))


def test_copy_blocks_copies_every_layer(engine):
    """copy_blocks on the runner's stream: a sequence sharing 6 tokens (one full block and 2 tokens
    of the next) with a cached one reads its own copy of the partial block; the source is unchanged."""
    rng = np.random.default_rng(13)
    m, path = engine(num_layers=3)
    runner = Session(path, 4, num_kv_blocks=16).runner
    a = random_tokens(rng, m, 10)
    b = a[:6] + random_tokens(rng, m, 5)
    table = lambda *ids: np.array([ids], dtype=np.int32)
    runner.forward(a, [10], [0], table(3, 7, 11))
    runner.copy_blocks([(7, 5)])
    assert_close(runner.forward(b[6:], [5], [6], table(3, 5, 9))[0], reference_logits(m, b)[-1])
    assert_close(runner.forward([a[-1]], [1], [10], table(3, 7, 11))[0], reference_logits(m, a + [a[-1]])[-1])
    with pytest.raises(ValueError, match="outside"):
        runner.copy_blocks([(16, 0)])
