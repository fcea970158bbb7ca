"""QuantConfig / QuantAlgo, and the quantization seam: the engine's "quantization" section is written by
build and read by both engine readers (Python and C++), which refuse what rtllm cannot run."""
import json

import pytest

import rtllm
from rtllm import _core
from rtllm.builder import BuildConfig, Engine, build
from rtllm.models import AutoModelForCausalLM
from rtllm.quantization import KV_CACHE_QUANT_ALGO_LIST, QuantAlgo, QuantConfig

# TensorRT-LLM's names, which engine configs and checkpoints written for it use
TRTLLM_NAMES = ["NO_QUANT", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "W8A16", "W4A16",
                "W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ", "W8A16_GPTQ", "W8A8_SQ_PER_CHANNEL", "INT8", "NVFP4"]


def test_quant_algo_is_a_str_enum_with_trtllm_names():
    for name in TRTLLM_NAMES:
        assert QuantAlgo[name] == name and QuantAlgo(name).value == name and str(QuantAlgo[name]) == name
    assert set(KV_CACHE_QUANT_ALGO_LIST) == {QuantAlgo.FP8, QuantAlgo.INT8, QuantAlgo.NVFP4}
    assert rtllm.QuantAlgo is QuantAlgo and rtllm.QuantConfig is QuantConfig


def test_defaults_and_round_trip():
    default = QuantConfig()
    assert default.quant_algo is None and default.kv_cache_quant_algo is None
    assert default.exclude_modules == ["lm_head"] and default.group_size == 128
    config = QuantConfig(quant_algo="W4A16_AWQ", kv_cache_quant_algo=QuantAlgo.FP8, group_size=64,
                         has_zero_point=True, pre_quant_scale=True, exclude_modules=["lm_head", "*.mlp.*"],
                         calib_size=32, calib_max_seq_length=256, calib_dataset="my_data")
    d = config.to_dict()
    assert d["quant_algo"] == "W4A16_AWQ" and d["kv_cache_quant_algo"] == "FP8"
    assert json.loads(json.dumps(d)) == d
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == config
    assert QuantConfig.from_dict(default.to_dict()) == default
    assert QuantConfig.from_dict({"quant_algo": "FP8"}) == QuantConfig(quant_algo=QuantAlgo.FP8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(quant_algo="fp9"), "quant_algo='fp9' is not a QuantAlgo; known: W8A16, "),
    (dict(kv_cache_quant_algo="W4A16"), "kv_cache_quant_algo=W4A16 cannot store a KV cache; use one of FP8, INT8, "
                                        "NVFP4"),
    (dict(group_size=0), "group_size=0 must be a positive integer"),
    (dict(quant_algo="W4A16_AWQ", group_size=96), "group_size=96 is not one of 32, 64, 128 \\(needed by W4A16_AWQ\\)"),
    (dict(smoothquant_val=1.5), "smoothquant_val=1.5 must be in \\[0, 1\\]"),
    (dict(has_zero_point="yes"), "has_zero_point='yes' must be a bool"),
    (dict(exclude_modules="lm_head"), "exclude_modules='lm_head' must be a list of module name globs"),
    (dict(calib_size=-1), "calib_size=-1 must be a positive integer"),
    (dict(calib_dataset=""), "calib_dataset='' must be a dataset name"),
])
def test_bad_quant_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown QuantConfig fields: bits, zero"):
        QuantConfig.from_dict({"quant_algo": None, "zero": 1, "bits": 4})


@pytest.fixture(scope="module")
def llama(tiny_model):
    return AutoModelForCausalLM.from_hugging_face(tiny_model("llama"))


def test_build_writes_the_quantization_section(llama, tmp_path):
    engine = build(llama, BuildConfig(max_seq_len=128), QuantConfig(quant_algo=QuantAlgo.NO_QUANT))
    engine.save(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["quantization"]
    assert QuantConfig.from_dict(written) == QuantConfig(quant_algo=QuantAlgo.NO_QUANT)
    assert build(llama, BuildConfig(max_seq_len=128)).config["quantization"] == QuantConfig().to_dict()
    assert Engine.load(tmp_path).config["quantization"] == written
    assert _core.Engine.load(str(tmp_path)).max_seq_len == 128


@pytest.mark.parametrize("config, message", [
    (QuantConfig(quant_algo=QuantAlgo.FP8_BLOCK_SCALES), "quant_algo FP8_BLOCK_SCALES is not implemented yet"),
    (QuantConfig(quant_algo=QuantAlgo.W4A8_AWQ), "quant_algo W4A8_AWQ is not implemented yet"),
    (QuantConfig(kv_cache_quant_algo=QuantAlgo.NVFP4), "kv_cache_quant_algo NVFP4 is not implemented yet"),
])
def test_build_refuses_quantization(llama, config, message):
    with pytest.raises(ValueError, match=message):
        build(llama, BuildConfig(max_seq_len=128), config)


@pytest.fixture(scope="module")
def engine_dir(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("engine")
    build(llama, BuildConfig(max_seq_len=128)).save(path)
    return path


def _with_quantization(engine_dir, tmp_path, section):
    """A copy of engine_dir whose config.json's quantization section is `section` (absent when None)."""
    config = json.loads((engine_dir / "config.json").read_text())
    config.pop("quantization")
    if section is not None:
        config["quantization"] = section
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "rank0.engine").symlink_to(engine_dir / "rank0.engine")
    return tmp_path


@pytest.mark.parametrize("section, message", [
    ({"quant_algo": "FP8_BLOCK_SCALES"}, "quant_algo FP8_BLOCK_SCALES is not"),
    ({"quant_algo": "W8A8_SQ_PER_TENSOR_PLUGIN", "kv_cache_quant_algo": None},
     "quant_algo W8A8_SQ_PER_TENSOR_PLUGIN is not"),
    ({"quant_algo": None, "kv_cache_quant_algo": "NVFP4"}, "kv_cache_quant_algo NVFP4 is not"),
])
def test_engine_readers_refuse_quantized_engines(engine_dir, tmp_path, section, message):
    path = _with_quantization(engine_dir, tmp_path, section)
    with pytest.raises(ValueError, match=message):
        Engine.load(path)
    with pytest.raises(rtllm.RtllmError, match=f"config.json: .*{message}"):
        _core.Engine.load(str(path))


@pytest.mark.parametrize("section", [None, {"quant_algo": None}, {"quant_algo": "NO_QUANT",
                                                                  "kv_cache_quant_algo": "NO_QUANT"}])
def test_engines_without_quantization_load(engine_dir, tmp_path, section):
    # None: engines written before the section existed
    path = _with_quantization(engine_dir, tmp_path, section)
    assert set(Engine.load(path).weights) == set(Engine.load(engine_dir).weights)
    assert _core.Engine.load(str(path)).max_seq_len == 128
