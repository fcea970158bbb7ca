"""Op kinds at engine load: an op or dtype the backend cannot run fails there, naming both; weights are
placed in the dtype the kinds ask for; the KV pool's bytes follow its own dtype.

Engines are written by hand (engine_fixture.write_engine) and then edited, as a newer builder or a
damaged file would make them.
"""
import json

import numpy as np
import pytest

from engine_fixture import RunnerSession, TinyModel, random_tokens, reference_logits, write_engine, write_safetensors
from rtllm import _core


def _rewrite_weight(path, name, dtype, raw):
    """Replaces one weight of rank0.engine (float32 engine) with raw bytes of another dtype."""
    from safetensors.numpy import load_file

    tensors = {k: ("F32", v.shape, v.tobytes()) for k, v in load_file(str(path / "rank0.engine")).items()}
    tensors[name] = (dtype, tensors[name][1], raw)
    write_safetensors(path / "rank0.engine", tensors)


def _load_runner(path, **runtime):
    return _core.ModelRunner(_core.Engine.load(str(path)), _core.RuntimeConfig(num_kv_blocks=64, **runtime))


def test_unknown_op_fails_at_load_naming_op_and_backend(tmp_path):
    path = write_engine(tmp_path / "e", TinyModel())
    config = json.loads((path / "config.json").read_text())
    node = next(n for n in config["graph"]["nodes"] if n["op"] == "silu_mul")
    node["op"] = "gelu_tanh_mul"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(_core.RtllmError, match='op "gelu_tanh_mul" has no CPU implementation'):
        _load_runner(path)


def test_fp8_linear_weight_fails_at_load_on_cpu(tmp_path):
    m = TinyModel()
    path = write_engine(tmp_path / "e", m)
    w = m.weights["lm_head.weight"]
    fp8 = _core.convert_floats(np.ascontiguousarray(w, np.float32).view(np.uint8).ravel(), "F32", "F8_E4M3")
    _rewrite_weight(path, "lm_head.weight", "F8_E4M3", fp8.tobytes())
    with pytest.raises(_core.RtllmError) as err:
        _load_runner(path)
    message = str(err.value)
    assert 'op "linear"' in message and "F8_E4M3" in message and "CPU" in message, message
    assert '"lm_head.weight"' in message


def test_wrong_input_dtype_of_index_fails_at_load(tmp_path):
    path = write_engine(tmp_path / "e", TinyModel())
    config = json.loads((path / "config.json").read_text())
    config["graph"]["inputs"][0]["dtype"] = "float32"  # input_ids must be int32 for the embedding
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(_core.RtllmError, match='op "embedding" on the CPU backend does not support dtype F32'):
        _load_runner(path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_weights_are_placed_as_float32(tmp_path, dtype, cpu_amx):
    """The kinds compute in float32 on the CPU: bf16/fp16 weights are widened exactly (once at load, or
    as the linear reads them). On AMX tiles (cpu_amx) the linear's x keeps about 16 significant bits
    (2^-16 of sum |x w| per product, 3 * 2^-16 with F16 weights; tests/python/test_cpu_amx_linear.py),
    so the logits are held to 1e-4 there."""
    rng = np.random.default_rng(3)
    m = TinyModel(dtype=dtype, qk_norm=True, qkv_bias=True)
    path = write_engine(tmp_path / "e", m)
    tokens = random_tokens(rng, m, 11)
    out = RunnerSession(path).step({0: tokens})[0]
    expected = reference_logits(m, tokens)[-1]
    assert np.max(np.abs(out - expected)) / np.max(np.abs(expected)) < (1e-4 if cpu_amx else 1e-5)


def test_kv_pool_bytes_follow_the_kv_dtype(tmp_path):
    m = TinyModel()
    path = write_engine(tmp_path / "e", m)
    engine = _core.Engine.load(str(path))
    per_block_f32 = m.num_layers * 2 * m.num_kv_heads * 16 * m.head_dim * 4
    assert _core.ModelRunner.kv_bytes_per_block(engine, 16) == per_block_f32
    assert _core.ModelRunner.kv_bytes_per_block(engine, 16, "bfloat16") == per_block_f32 // 2
    assert _core.ModelRunner.kv_bytes_per_block(engine, 16, "F8_E4M3") == per_block_f32 // 4
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=40, tokens_per_block=16))
    assert runner.config.kv_cache_dtype == "F32"
    assert runner.kv_pool_bytes == 40 * per_block_f32


@pytest.mark.parametrize("kv_dtype, name", [("bfloat16", "BF16"), ("F8_E5M2", "F8_E5M2"), ("float16", "F16")])
def test_kv_dtype_the_cpu_attention_cannot_read_fails_at_load(tmp_path, kv_dtype, name):
    path = write_engine(tmp_path / "e", TinyModel())
    with pytest.raises(_core.RtllmError) as err:
        _load_runner(path, kv_cache_dtype=kv_dtype)
    message = str(err.value)
    assert 'op "attention"' in message and "CPU" in message and f"KV cache dtype {name};" in message, message
    assert "supported: F32, F8_E4M3" in message, message


def test_unknown_kv_dtype_name_is_a_value_error():
    config = _core.RuntimeConfig()
    with pytest.raises(ValueError, match='unknown dtype "fp7"'):
        config.kv_cache_dtype = "fp7"


def test_packed_int4_weight_is_stored_as_bytes_and_refused_by_the_cpu_linear(tmp_path):
    """Engine files hold packed int4 as U8 bytes named in the metadata: the safetensors library reads
    them as bytes, rtllm's readers as int4 of the logical shape, and a kind without int4 refuses it."""
    from safetensors.numpy import load_file

    from rtllm.builder.safetensors_io import SafetensorsFile, pack_int4, unpack_int4, write_safetensors as write

    m = TinyModel()
    path = write_engine(tmp_path / "e", m)
    tensors = load_file(str(path / "rank0.engine"))
    rng = np.random.default_rng(0)
    values = rng.integers(-8, 8, size=tensors["lm_head.weight"].shape)
    entries = [(name, "float32", array.shape, lambda array=array: array) for name, array in tensors.items()
               if name != "lm_head.weight"]
    entries.append(("lm_head.weight", "int4", values.shape, lambda: pack_int4(values)))
    write(str(path / "rank0.engine"), entries)

    raw = load_file(str(path / "rank0.engine"))["lm_head.weight"]  # the safetensors library: bytes
    assert raw.dtype == np.uint8 and raw.shape == (values.shape[0], values.shape[1] // 2)
    assert raw[0, 0] == (values[0, 0] & 0xF) | ((values[0, 1] & 0xF) << 4)  # even index: low nibble
    st = SafetensorsFile(str(path / "rank0.engine"))
    assert st.dtype("lm_head.weight") == "int4" and st.shape("lm_head.weight") == values.shape
    assert np.array_equal(unpack_int4(st.get("lm_head.weight")), values)
    with pytest.raises(_core.RtllmError) as err:
        _load_runner(path)
    message = str(err.value)
    assert 'op "linear"' in message and "I4" in message and "CPU" in message, message
