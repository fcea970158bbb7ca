"""ModelRunner on the CPU against a float64 numpy transformer (engine_fixture.reference_logits).

Engines are written by hand (engine_fixture.write_engine), so these tests exercise the C++ runtime:
Engine::load, the op registry, the CPU ops, the paged KV cache and the workspace plan.
"""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_fixture import (RunnerSession as Session, TinyModel, random_tokens, reference_logits,
                            write_engine, write_safetensors)
from rtllm import _core

RTOL = 1e-5  # max |runtime - reference| / max |reference| for float32 activations


def assert_close(actual, expected, rtol=RTOL):
    err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


@pytest.fixture
def engine(tmp_path):
    """engine(fused=True, limits=None, **TinyModel fields) -> (TinyModel, engine dir)."""
    count = [0]

    def make(fused=True, limits=None, **fields):
        m = TinyModel(**fields)
        count[0] += 1
        return m, write_engine(tmp_path / f"engine{count[0]}", m, fused=fused, limits=limits)

    return make


def test_engine_properties(engine):
    m, path = engine(qkv_bias=True, limits={"max_batch_size": 3, "max_num_tokens": 100})
    e = _core.Engine.load(str(path))
    assert e.dir == str(path)
    assert (e.vocab_size, e.num_layers, e.num_heads, e.num_kv_heads, e.head_dim) == (96, 2, 4, 2, 16)
    assert (e.max_batch_size, e.max_input_len, e.max_seq_len, e.max_num_tokens) == (3, 256, 320, 100)
    assert e.eos_token_ids == [2] and e.bos_token_id == 1
    config = json.loads(e.config_json)
    assert config == json.loads((path / "config.json").read_text())
    names = set(e.weight_names())
    assert "model.layers.1.self_attn.qkv_proj.bias" in names and "rope.inv_freq" in names
    assert _core.ModelRunner.kv_bytes_per_block(e, 16) == 2 * 2 * 2 * 16 * 16 * 4


def test_single_sequence(engine):
    rng = np.random.default_rng(1)
    m, path = engine()
    tokens = random_tokens(rng, m, 23)
    out = Session(path).step({0: tokens})[0]
    assert_close(out, reference_logits(m, tokens)[-1])


@pytest.mark.parametrize("tokens_per_block", [4, 16])
def test_batch_of_different_lengths_matches_each_alone_bitwise(engine, tokens_per_block):
    rng = np.random.default_rng(2)
    m, path = engine()
    prompts = {s: random_tokens(rng, m, n) for s, n in enumerate([5, 1, 13, 40])}
    batched = Session(path, tokens_per_block).step(prompts)
    for s, tokens in prompts.items():
        assert_close(batched[s], reference_logits(m, tokens)[-1])
        alone = Session(path, tokens_per_block, seed=s + 10).step({0: tokens})[0]
        np.testing.assert_array_equal(batched[s], alone)


@pytest.mark.parametrize("tokens_per_block", [4, 16])
def test_prefill_then_decode(engine, tokens_per_block):
    rng = np.random.default_rng(3)
    m, path = engine(num_layers=3)
    session = Session(path, tokens_per_block)
    tokens = random_tokens(rng, m, 37)
    out = session.step({0: tokens})[0]
    for _ in range(12):  # the context spans many blocks, taken in shuffled order
        assert_close(out, reference_logits(m, tokens)[-1])
        tokens.append(int(rng.integers(0, m.vocab_size)))
        out = session.step({0: tokens[-1:]})[0]
    assert_close(out, reference_logits(m, tokens)[-1])


def test_chunked_prefill_is_bitwise_identical(engine):
    rng = np.random.default_rng(4)
    m, path = engine()
    tokens = random_tokens(rng, m, 29)
    whole = Session(path, 4).step({0: tokens})[0]
    chunked = Session(path, 4, seed=7)
    for start in range(0, 29, 8):
        out = chunked.step({0: tokens[start:start + 8]})[0]
    np.testing.assert_array_equal(out, whole)


def test_mixed_context_and_generation_step(engine):
    rng = np.random.default_rng(5)
    m, path = engine()
    session = Session(path, 4)
    history = {"gen": random_tokens(rng, m, 19), "chunk": random_tokens(rng, m, 8)}
    session.step(history)
    step = {"new": random_tokens(rng, m, 7), "chunk": random_tokens(rng, m, 6), "gen": random_tokens(rng, m, 1)}
    out = session.step(step)
    assert_close(out["new"], reference_logits(m, step["new"])[-1])
    assert_close(out["chunk"], reference_logits(m, history["chunk"] + step["chunk"])[-1])
    assert_close(out["gen"], reference_logits(m, history["gen"] + step["gen"])[-1])


def test_long_context(engine):
    rng = np.random.default_rng(9)
    m, path = engine(rope_theta=500000.0)
    session = Session(path, 16)
    tokens = random_tokens(rng, m, 300)
    expected = reference_logits(m, tokens)
    assert_close(session.step({0: tokens[:290]})[0], expected[289])
    for t in range(290, 300):
        assert_close(session.step({0: tokens[t:t + 1]})[0], expected[t])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_schedules(engine, data):
    """Random steps of context chunks and generation tokens over several sequences, as a scheduler
    might pack them; every sequence's logits follow the reference at every step."""
    m, path = engine(num_layers=1, num_heads=4, num_kv_heads=1, head_dim=8, hidden_size=32, intermediate_size=40)
    session = Session(path, data.draw(st.sampled_from([1, 2, 4, 8])), num_kv_blocks=200,
                      seed=data.draw(st.integers(0, 100)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    prompts = {s: random_tokens(rng, m, data.draw(st.integers(1, 30))) for s in range(4)}
    full = {s: list(p) for s, p in prompts.items()}
    for _ in range(data.draw(st.integers(1, 6))):
        step = {}
        for s in data.draw(st.permutations(list(prompts)))[:data.draw(st.integers(1, 4))]:
            done = len(session.tokens.get(s, []))
            if done < len(prompts[s]):  # a context chunk
                n = data.draw(st.integers(1, len(prompts[s]) - done))
                step[s] = prompts[s][done:done + n]
            else:  # a generation token
                full[s].append(int(rng.integers(0, m.vocab_size)))
                step[s] = full[s][-1:]
        order = sorted(step, key=lambda s: len(session.tokens.get(s, [])) >= len(prompts[s]))
        out = session.step({s: step[s] for s in order})
        for s in step:
            seen = session.tokens[s]
            assert_close(out[s], reference_logits(m, seen)[-1])


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_gqa_and_head_dims(engine, num_kv_heads, head_dim):
    rng = np.random.default_rng(head_dim + num_kv_heads)
    m, path = engine(num_heads=4, num_kv_heads=num_kv_heads, head_dim=head_dim)
    session = Session(path, 4)
    a, b = random_tokens(rng, m, 11), random_tokens(rng, m, 6)
    out = session.step({"a": a, "b": b})
    assert_close(out["a"], reference_logits(m, a)[-1])
    assert_close(out["b"], reference_logits(m, b)[-1])
    for _ in range(3):
        a.append(int(rng.integers(0, m.vocab_size)))
        b.append(int(rng.integers(0, m.vocab_size)))
        out = session.step({"a": a[-1:], "b": b[-1:]})
        assert_close(out["a"], reference_logits(m, a)[-1])
        assert_close(out["b"], reference_logits(m, b)[-1])


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_and_unfused_graphs(engine, qk_norm, qkv_bias):
    rng = np.random.default_rng(6)
    m, fused = engine(fused=True, qk_norm=qk_norm, qkv_bias=qkv_bias)
    _, unfused = engine(fused=False, qk_norm=qk_norm, qkv_bias=qkv_bias)
    tokens = random_tokens(rng, m, 14)
    expected = reference_logits(m, tokens)
    outs = []
    for path in (fused, unfused):
        session = Session(path, 4)
        out = session.step({0: tokens[:10]})[0]
        assert_close(out, expected[9])
        for t in range(10, 14):
            out = session.step({0: tokens[t:t + 1]})[0]
            assert_close(out, expected[t])
        outs.append(out)
    assert_close(outs[0], outs[1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights(engine, dtype):
    rng = np.random.default_rng(7)
    m, path = engine(dtype=dtype, tie_word_embeddings=True)
    tokens = random_tokens(rng, m, 17)
    assert_close(Session(path).step({0: tokens})[0], reference_logits(m, tokens)[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_written_by_the_safetensors_library(engine, dtype):
    """The engine file as the safetensors library writes it (its own ordering and padding)."""
    torch_io = pytest.importorskip("safetensors.torch")
    rng = np.random.default_rng(10)
    m, path = engine(dtype=dtype)
    tensors = torch_io.load_file(str(path / "rank0.engine"))
    torch_io.save_file(tensors, str(path / "rank0.engine"), metadata={"format": "rtllm"})
    tokens = random_tokens(rng, m, 12)
    assert_close(Session(path).step({0: tokens})[0], reference_logits(m, tokens)[-1])


def test_unaligned_float32_weights(engine):
    """A 2-byte tensor first leaves every float32 weight at an offset that is not a multiple of 4."""
    torch_io = pytest.importorskip("safetensors.torch")
    rng = np.random.default_rng(11)
    m, path = engine()
    tensors = torch_io.load_file(str(path / "rank0.engine"))
    stored = {"unused.pad": ("BF16", [1], b"\x80\x3f")}
    stored.update({k: ("F32", list(v.shape), v.numpy().tobytes()) for k, v in tensors.items()})
    write_safetensors(path / "rank0.engine", stored)
    tokens = random_tokens(rng, m, 12)
    assert_close(Session(path).step({0: tokens})[0], reference_logits(m, tokens)[-1])


def test_thread_counts_give_identical_logits(engine):
    rng = np.random.default_rng(8)
    m, path = engine(hidden_size=96, intermediate_size=136)  # sizes that leave tile remainders
    prompts = {s: random_tokens(rng, m, n) for s, n in enumerate([9, 3, 30])}
    one = Session(path, num_threads=1).step(prompts)
    two = Session(path, num_threads=2).step(prompts)
    for s in prompts:
        np.testing.assert_array_equal(one[s], two[s])
        assert_close(one[s], reference_logits(m, prompts[s])[-1])


# ---------------------------------------------------------------- errors


def test_wrong_format_version(engine, tmp_path):
    m = TinyModel()
    path = write_engine(tmp_path / "v3", m, format_version=3)
    with pytest.raises(_core.RtllmError, match="engine format version 3 is not readable; this rtllm reads versions 1 to 2"):
        _core.Engine.load(str(path))


def test_missing_files(engine, tmp_path):
    with pytest.raises(_core.RtllmError, match="config.json"):
        _core.Engine.load(str(tmp_path / "nowhere"))
    _, path = engine()
    (path / "rank0.engine").unlink()
    with pytest.raises(_core.RtllmError, match="rank0.engine"):
        _core.Engine.load(str(path))


@pytest.mark.parametrize("keep", [4, 100, -8])
def test_truncated_weights(engine, keep):
    _, path = engine()
    data = (path / "rank0.engine").read_bytes()
    (path / "rank0.engine").write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(_core.RtllmError, match="rank0.engine"):
        _core.Engine.load(str(path))


def test_corrupt_header(engine):
    _, path = engine()
    data = bytearray((path / "rank0.engine").read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"][0] += 1  # shape no longer matches the byte range
    text = json.dumps(header).encode().ljust(header_len)
    assert len(text) == header_len
    (path / "rank0.engine").write_bytes(bytes(data[:8]) + text + bytes(data[8 + header_len:]))
    with pytest.raises(_core.RtllmError, match=f"rank0.engine.*{name}"):
        _core.Engine.load(str(path))


def test_missing_weight_is_named(engine):
    _, path = engine()
    config = json.loads((path / "config.json").read_text())
    config["graph"]["nodes"][0]["inputs"][1] = "model.no_such.weight"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(_core.RtllmError, match="model.no_such.weight"):
        _core.Engine.load(str(path))


def test_bad_step_inputs(engine):
    m, path = engine(limits={"max_num_tokens": 16, "max_batch_size": 2, "max_seq_len": 40})
    session = Session(path, 4, num_kv_blocks=32)
    forward = session.runner.forward
    table = np.arange(10, dtype=np.int32)[None, :]
    with pytest.raises(ValueError, match=f"token id {m.vocab_size} .*vocab_size {m.vocab_size}"):
        forward([1, m.vocab_size], [2], [0], table)
    with pytest.raises(ValueError, match="token id -1"):
        forward([-1], [1], [0], table)
    with pytest.raises(ValueError, match="num_tokens 17 .*max_num_tokens 16"):
        forward([1] * 17, [17], [0], table)
    with pytest.raises(ValueError, match="num_seqs 3 .*max_batch_size 2"):
        forward([1, 2, 3], [1, 1, 1], [0, 0, 0], np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="block id 32 outside"):
        forward([1, 2], [2], [0], np.array([[32]], np.int32))
    with pytest.raises(ValueError, match="need 2 blocks"):
        forward([1] * 5, [5], [0], np.array([[0]], np.int32))
    with pytest.raises(ValueError, match="41 tokens exceed max_seq_len 40"):
        forward([1], [1], [40], table)
    with pytest.raises(ValueError, match="sum to 3"):
        forward([1, 2], [3], [0], table)
    # The runner still works after rejected steps.
    tokens = [3, 4, 5]
    assert_close(session.step({0: tokens})[0], reference_logits(m, tokens)[-1])


def test_runtime_config_over_engine_limits(engine):
    _, path = engine(limits={"max_num_tokens": 64, "max_batch_size": 4})
    e = _core.Engine.load(str(path))
    with pytest.raises(ValueError, match="max_num_tokens 65 exceeds the engine's limit 64"):
        _core.ModelRunner(e, _core.RuntimeConfig(max_num_tokens=65))
    with pytest.raises(ValueError, match="max_batch_size 5 exceeds the engine's limit 4"):
        _core.ModelRunner(e, _core.RuntimeConfig(max_batch_size=5))
    runner = _core.ModelRunner(e, _core.RuntimeConfig(max_num_tokens=8, num_kv_blocks=4, tokens_per_block=8))
    assert (runner.config.max_num_tokens, runner.config.max_batch_size) == (8, 4)
    with pytest.raises(ValueError, match="num_tokens 9 .*max_num_tokens 8"):
        runner.forward([1] * 9, [9], [0], np.arange(4, dtype=np.int32)[None, :])
