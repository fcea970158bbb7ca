"""LLM on an HF checkpoint builds its engine in memory (issue "Hardening and conventions", finding 6): no
file is written, and it runs as the engine `rtllm build` writes and the runtime loads from disk.

The C++ Engine built from memory validates its input as Engine.load validates a file.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rtllm import LLM, SamplingParams, _core
from rtllm.builder import BuildConfig, build
from rtllm.cli import main as cli_main
from rtllm.models import AutoModelForCausalLM
from rtllm.quantization import QuantAlgo, QuantConfig

LIMITS = dict(max_seq_len=64, max_batch_size=2)
PROMPTS = [[5, 6, 7, 8, 9], [40, 41]]
TIMEOUT_S = 300

# Greedy tokens and top-3 logprobs of PROMPTS on the model argv[1] (quantized as argv[2] when it is an
# HF checkpoint), the entries of $TMPDIR while the LLM runs, and every file or directory Python created
# or opened for writing under $TMPDIR or the model directory (an audit hook sees them all, even those
# deleted before the listing, such as a calibration engine's): printed as one JSON line.
GENERATE = """
    import json, os, sys, tempfile
    watched = (os.path.realpath(tempfile.gettempdir()), os.path.realpath(sys.argv[1]))
    written = []
    def audit(event, args):
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1] or "", args[2] or 0
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        else:
            writes = event in ("os.mkdir", "os.rename", "shutil.copyfile")
        path = os.path.realpath(os.fsdecode(args[0])) if writes and isinstance(args[0], (str, bytes)) else ""
        if path.startswith(watched):
            written.append(path)
    sys.addaudithook(audit)
    from rtllm import LLM, SamplingParams
    from rtllm.quantization import QuantAlgo, QuantConfig
    algo = sys.argv[2]
    quant = None if algo == "none" else QuantConfig(quant_algo=QuantAlgo[algo])
    with LLM(sys.argv[1], max_seq_len=64, max_batch_size=2, quant_config=quant) as llm:
        outs = llm.generate(json.loads(sys.argv[3]), SamplingParams(max_tokens=8, temperature=0.0,
                            ignore_eos=True, logprobs=3), use_tqdm=False)
        during = sorted(os.listdir(tempfile.gettempdir()))
    print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs],
                      "logprobs": [[{str(k): v for k, v in step.items()} for step in o.outputs[0].logprobs]
                                   for o in outs],
                      "tmp": during, "written": written}))
"""


def generate_in_subprocess(model, algo, temp_root):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(GENERATE), str(model), algo, json.dumps(PROMPTS)],
                            capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**os.environ, "TMPDIR": str(temp_root)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("algo", ["none", "FP8_PER_CHANNEL_PER_TOKEN", "FP8"])
def test_hf_checkpoint_builds_in_memory_as_the_saved_engine_runs(tiny_model, tmp_path, algo):
    checkpoint = tiny_model("llama")
    engine_dir = tmp_path / "engine"
    quant_args = [] if algo == "none" else ["--quant-algo", algo]
    assert cli_main(["build", str(checkpoint), "-o", str(engine_dir), "--max-seq-len", "64",
                     "--max-batch-size", "2", *quant_args]) == 0
    config = json.loads((engine_dir / "config.json").read_text())
    if algo != "none":  # the comparison covers quantized weights and their float32 scales
        assert config["quantization"]["quant_algo"] == algo
        assert any(n["op"] == "fp8_linear" for n in config["graph"]["nodes"])

    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    in_memory = generate_in_subprocess(checkpoint, algo, temp_root)
    assert in_memory["written"] == []  # no file written, not even one deleted before the listing
    assert in_memory["tmp"] == [] and os.listdir(temp_root) == []

    loaded = generate_in_subprocess(engine_dir, "none", temp_root)
    assert in_memory["tokens"] == loaded["tokens"]
    assert all(len(t) == 8 for t in in_memory["tokens"])
    # Same weights, same kernels: the same floats.
    assert in_memory["logprobs"] == loaded["logprobs"]


def test_in_memory_engine_keeps_the_checkpoint_tokenizer_and_chat_template(tiny_model):
    checkpoint = tiny_model("llama")
    messages = [{"role": "user", "content": "Hello"}]
    with LLM(checkpoint, **LIMITS) as llm:
        assert llm.engine_dir is None and llm.tokenizer is not None
        expected = llm.tokenizer.apply_chat_template(messages, tokenize=True)
        out = llm.chat(messages, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)
        assert out[0].prompt_token_ids == expected and len(out[0].outputs[0].token_ids) == 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from checkpoints import make_hf_checkpoint

    path = tmp_path_factory.mktemp("inmem-ckpt")
    make_hf_checkpoint(path, vocab_size=64)
    model = AutoModelForCausalLM.from_hugging_face(str(path))
    return build(model, BuildConfig(max_seq_len=32, max_batch_size=1))


def test_engine_from_memory_matches_the_builder_weights(built):
    engine = built.to_core()
    assert engine.dir == ""
    assert sorted(engine.weight_names()) == sorted(built.weights)
    assert engine.vocab_size == built.model_config["vocab_size"]


def test_engine_from_memory_refuses_bad_weights(built):
    config = json.dumps(built.config)
    weights = built.materialize()
    name, dtype, shape, array = weights[0]

    short = [(name, dtype, shape, array.reshape(-1)[:-1].copy()), *weights[1:]]
    expected_bytes = array.nbytes
    with pytest.raises(ValueError, match=rf'weight "{name}" holds {expected_bytes - array.itemsize} bytes, but '
                                         rf'its shape and dtype F32 need {expected_bytes}'):
        _core.Engine.from_memory(config, short)

    wrong_shape = [(name, dtype, [shape[0] + 1, *shape[1:]], array), *weights[1:]]
    with pytest.raises(ValueError, match=rf'weight "{name}" holds {expected_bytes} bytes'):
        _core.Engine.from_memory(config, wrong_shape)

    unknown = [(name, "float24", shape, array), *weights[1:]]
    with pytest.raises(ValueError, match=rf'weight "{name}": unknown dtype "float24"'):
        _core.Engine.from_memory(config, unknown)

    with pytest.raises(ValueError, match=rf'weight "{name}" is given twice'):
        _core.Engine.from_memory(config, [weights[0], *weights])

    assert array.ndim == 2 and min(array.shape) > 1
    with pytest.raises(ValueError, match=rf'weight "{name}" is not a C-contiguous buffer'):
        _core.Engine.from_memory(config, [(name, dtype, shape, np.asfortranarray(array)), *weights[1:]])

    missing = [w for w in weights if w[0] != name]
    with pytest.raises(Exception, match=rf'reads "{name}", which is neither .* in-memory engine'):
        _core.Engine.from_memory(config, missing)

    with pytest.raises(Exception, match="invalid engine config in-memory engine"):
        _core.Engine.from_memory(json.dumps({**built.config, "build_config": {}}), weights)


def test_engine_from_memory_keeps_its_buffers_alive(built):
    """The engine holds the arrays it was given: dropping every Python reference leaves it runnable."""
    import gc

    engine = _core.Engine.from_memory(json.dumps(built.config), built.materialize())
    gc.collect()
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=4, tokens_per_block=8))
    del engine
    gc.collect()
    logits = runner.forward(np.array([1, 2, 3], np.int32), [3], [0], np.array([[0]], np.int32))
    reference = _core.ModelRunner(built.to_core(), _core.RuntimeConfig(num_kv_blocks=4, tokens_per_block=8))
    again = reference.forward(np.array([1, 2, 3], np.int32), [3], [0], np.array([[0]], np.int32))
    assert np.isfinite(logits).all() and np.array_equal(logits, again)
