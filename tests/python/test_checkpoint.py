"""Checkpoint reading (safetensors without torch), config parsing and bad input."""

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_hf_checkpoint
from hf_reference import STACKED_PROJECTIONS, hf_tensor
from rtllm.builder import BuildConfig, build
from rtllm.builder.safetensors_io import SafetensorsFile, cast, float32_to_bf16, to_float32, write_safetensors
from rtllm.models import AutoModelForCausalLM, parse_hf_config


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy, bf16 as its uint16 bit pattern."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("sharded", [False, True])
def test_weights_bit_exact_vs_safetensors(tmp_path, dtype, sharded):
    make_hf_checkpoint(tmp_path, "qwen3", dtype=dtype, sharded=sharded, tie_word_embeddings=True)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == sharded
    expected = {}
    for f in files:
        expected.update(load_file(str(f)))
    model = AutoModelForCausalLM.from_hugging_face(tmp_path)
    params = dict(model.named_parameters())
    del params["rope.inv_freq"]  # computed, not read
    used = set()
    for name, param in params.items():
        assert param.dtype == dtype
        np.testing.assert_array_equal(param.load(), _torch_bits(hf_tensor(expected, name)), err_msg=name)
        parent, module, leaf = name.rsplit(".", 2)
        used.update(f"{parent}.{part}.{leaf}" for part in STACKED_PROJECTIONS.get(module, [module]))
    assert used == set(expected)  # every checkpoint tensor is read


def test_bf16_conversions_match_torch():
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-42, 3.4e38, 1.0 + 2 ** -8,
                        1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, 65504.0, 1e5], np.float32)
    scaled = rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)
    x = np.concatenate([scaled.astype(np.float32), special,
                        rng.integers(0, 2 ** 32, 10000, dtype=np.uint32).view(np.float32)])
    ours = float32_to_bf16(x)
    theirs = _torch_bits(torch.from_numpy(x).to(torch.bfloat16))
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(ours[finite], theirs[finite])
    assert np.isnan(to_float32(ours[~finite], "bfloat16")).all()
    np.testing.assert_array_equal(to_float32(theirs, "bfloat16"), torch.from_numpy(theirs.view(np.int16))
                                  .view(torch.bfloat16).float().numpy())
    half = x[finite & (np.abs(x) < 6e4)].astype(np.float16)
    np.testing.assert_array_equal(cast(half, "float16", "bfloat16"),
                                  _torch_bits(torch.from_numpy(half).to(torch.bfloat16)))
    np.testing.assert_array_equal(cast(theirs, "bfloat16", "float16"),
                                  torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).half().numpy())


def test_write_safetensors_readable_by_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f32": ("float32", rng.standard_normal((3, 5)).astype(np.float32)),
        "bf16": ("bfloat16", float32_to_bf16(rng.standard_normal(7).astype(np.float32))),
        "f16": ("float16", rng.standard_normal((2, 2, 3)).astype(np.float16)),
        "i32": ("int32", rng.integers(-9, 9, 4, dtype=np.int32)),
        "i64": ("int64", rng.integers(-9, 9, 3, dtype=np.int64)),
        "u8": ("uint8", rng.integers(0, 255, 5, dtype=np.uint8)),
        "flag": ("bool", np.array([True, False, True])),
        "empty": ("float32", np.zeros((0, 4), np.float32)),
        "scalar": ("float32", np.array(2.5, np.float32)),
    }
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, [(n, d, a.shape, lambda a=a: a) for n, (d, a) in arrays.items()], {"format": "pt"})
    loaded = load_file(path)
    ours = SafetensorsFile(path)
    assert ours.metadata == {"format": "pt"}
    for name, (dtype, array) in arrays.items():
        np.testing.assert_array_equal(_torch_bits(loaded[name]), array, err_msg=name)
        assert ours.dtype(name) == dtype
        np.testing.assert_array_equal(ours.get(name), array)
    with pytest.raises(ValueError, match="tensor 'x' produced float64\\[2\\], declared float32\\[2\\]"):
        write_safetensors(path, [("x", "float32", (2,), lambda: np.zeros(2))])


def test_config_parsing(tmp_path):
    make_hf_checkpoint(tmp_path, "qwen2", eos_token_id=[2, 7])
    config = parse_hf_config(str(tmp_path))
    shape = (config.architecture, config.num_heads, config.num_kv_heads, config.head_dim)
    assert shape == ("Qwen2ForCausalLM", 4, 2, 16)
    assert config.attention_bias and not config.o_bias and not config.qk_norm
    assert config.eos_token_id == [2, 7] and config.bos_token_id == 1
    # generation_config.json's eos ids win; head_dim defaults to hidden / heads
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = parse_hf_config(str(tmp_path))
    assert config.eos_token_id == [5] and config.head_dim == 16


def test_legacy_rope_keys_give_same_inv_freq(tmp_path):
    """transformers 4 writes rope_theta + rope_scaling where transformers 5 writes rope_parameters."""
    make_hf_checkpoint(tmp_path, "llama3")
    new = parse_hf_config(str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = {"factor": params["factor"], "low_freq_factor": params["low_freq_factor"],
                          "high_freq_factor": params["high_freq_factor"], "rope_type": "llama3",
                          "original_max_position_embeddings": params["original_max_position_embeddings"]}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    old = parse_hf_config(str(tmp_path))
    assert old.rope_theta == new.rope_theta == 500000.0 and old.rope_scaling == new.rope_scaling
    np.testing.assert_array_equal(old.rope_inv_freq(), new.rope_inv_freq())


# -- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    return make_hf_checkpoint(tmp_path / "ckpt", "llama")


def _rewrite_config(path, **changes):
    hf = json.loads((path / "config.json").read_text())
    hf.update(changes)
    (path / "config.json").write_text(json.dumps(hf))


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json in .*ckpt"):
        AutoModelForCausalLM.from_hugging_face(checkpoint)


def test_no_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights in .*ckpt"):
        AutoModelForCausalLM.from_hugging_face(checkpoint)


def test_missing_shard(tmp_path):
    make_hf_checkpoint(tmp_path, "llama", sharded=True)
    sorted(tmp_path.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(ValueError, match="missing weight file .*model-00002"):
        AutoModelForCausalLM.from_hugging_face(tmp_path)


def test_corrupt_json_files(tmp_path):
    make_hf_checkpoint(tmp_path, "llama", sharded=True)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a valid safetensors index"):
        AutoModelForCausalLM.from_hugging_face(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        AutoModelForCausalLM.from_hugging_face(tmp_path)


def _header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_raw(path, header_bytes, data):
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


@pytest.mark.parametrize("corruption, message", [
    ("truncated_data", "data_offsets end .* past the data size"),
    ("short_file", "truncated safetensors file .* no header"),
    ("header_length", "header length .* but the file has"),
    ("bad_json", "corrupt safetensors header in"),
    ("bad_range", "does not match shape"),
    ("bad_dtype", "unsupported dtype 'X9'"),
])
def test_corrupt_safetensors(checkpoint, corruption, message):
    path = checkpoint / "model.safetensors"
    header, data = _header(path)
    name = next(k for k in header if k != "__metadata__")
    if corruption == "truncated_data":
        path.write_bytes(path.read_bytes()[:-100])
    elif corruption == "short_file":
        path.write_bytes(b"\x10\x00")
    elif corruption == "header_length":
        path.write_bytes(struct.pack("<Q", 10 ** 7) + path.read_bytes()[8:])
    elif corruption == "bad_json":
        _write_raw(path, b"{not json" + b" " * 7, data)
    elif corruption == "bad_range":
        header[name]["data_offsets"][1] -= 2
        _write_raw(path, json.dumps(header).encode(), data)
    elif corruption == "bad_dtype":
        header[name]["dtype"] = "X9"
        _write_raw(path, json.dumps(header).encode(), data)
    with pytest.raises(ValueError, match=message) as info:
        AutoModelForCausalLM.from_hugging_face(checkpoint)
    assert "model.safetensors" in str(info.value)


def test_missing_tensor(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' is missing from the checkpoint"):
        AutoModelForCausalLM.from_hugging_face(checkpoint)


def test_shape_mismatch(checkpoint):
    _rewrite_config(checkpoint, intermediate_size=96)
    with pytest.raises(ValueError, match=r"gate_proj.weight' .* has shape \[128, 64\], but config.json implies "
                                         r"\[96, 64\]"):
        AutoModelForCausalLM.from_hugging_face(checkpoint)


def test_unknown_architecture(checkpoint):
    _rewrite_config(checkpoint, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"\['GPT2LMHeadModel'\] not supported; supported: LlamaForCausalLM, "
                                         r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        AutoModelForCausalLM.from_hugging_face(checkpoint)


def test_unsupported_rope_type(checkpoint):
    _rewrite_config(checkpoint, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        AutoModelForCausalLM.from_hugging_face(checkpoint)


def test_sliding_window(tmp_path):
    make_hf_checkpoint(tmp_path, "mistral", sliding_window=128)
    model = AutoModelForCausalLM.from_hugging_face(tmp_path)
    with pytest.raises(ValueError, match="sliding_window=128 is less than max_seq_len=512"):
        build(model)
    build(model, BuildConfig(max_seq_len=128))  # the window never slides within 128 tokens
    # Qwen2 stores a window but only uses it with use_sliding_window
    qwen = tmp_path / "qwen"
    make_hf_checkpoint(qwen, "qwen2")
    _rewrite_config(qwen, sliding_window=64, use_sliding_window=False)
    build(AutoModelForCausalLM.from_hugging_face(qwen))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_batch_size=0), "max_batch_size=0 must be a positive integer"),
    (dict(max_num_tokens=-5), "max_num_tokens=-5 must be a positive integer"),
    (dict(max_seq_len="long"), "max_seq_len='long' must be a positive integer"),
    (dict(max_input_len=1.5), "max_input_len=1.5 must be a positive integer"),
    (dict(max_input_len=300, max_seq_len=200), "max_input_len=300 exceeds max_seq_len=200"),
    (dict(dtype="int8"), "dtype='int8' is not one of auto, float32, float16, bfloat16"),
    (dict(fuse="yes"), "fuse='yes' must be a bool"),
])
def test_bad_build_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BuildConfig(**kwargs)


def test_build_limits_checked_against_model(checkpoint):
    model = AutoModelForCausalLM.from_hugging_face(checkpoint)
    with pytest.raises(ValueError, match="max_seq_len=1024 exceeds the model's max_position_embeddings=512"):
        build(model, BuildConfig(max_seq_len=1024))
    with pytest.raises(ValueError, match="max_input_len=600 exceeds max_seq_len=512"):
        build(model, BuildConfig(max_input_len=600))
    with pytest.raises(ValueError, match="dtype 'int4' is not supported"):
        AutoModelForCausalLM.from_hugging_face(checkpoint, dtype="int4")


def test_safetensors_file_reads_lazily(checkpoint, tmp_path):
    """Opening reads only the header; data comes from a read-only mapping of the file."""
    copy = tmp_path / "copy.safetensors"
    shutil.copy(checkpoint / "model.safetensors", copy)
    st = SafetensorsFile(str(copy))
    array = st.get("model.norm.weight")
    assert isinstance(array.base, np.memmap) or isinstance(array, np.memmap)
    assert not array.flags.writeable
    np.testing.assert_array_equal(array, load_file(str(copy))["model.norm.weight"].numpy())
