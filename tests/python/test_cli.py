"""The `rtllm` command line: help, build + generate on a tiny checkpoint, the default model."""
import os
import subprocess
import sys

import pytest

from rtllm.cli import build_parser

from hf_reference import hf_greedy, load_hf_model


def run_cli(*args, env=None, check=True):
    result = subprocess.run([sys.executable, "-m", "rtllm.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"rtllm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_help_lists_commands():
    out = run_cli("--help").stdout
    assert "build" in out and "generate" in out


@pytest.mark.parametrize("command,options", [
    ("build", ["--dtype", "--max-batch-size", "--max-input-len", "--max-seq-len", "--max-num-tokens",
               "--no-fuse", "-o"]),
    ("generate", ["--model", "--stream", "--max-tokens", "--temperature", "--top-k", "--top-p", "--min-p",
                  "--seed", "--repetition-penalty", "--presence-penalty", "--frequency-penalty",
                  "--ignore-eos"]),
])
def test_subcommand_help(command, options):
    out = run_cli(command, "--help").stdout
    for option in options:
        assert option in out


def test_missing_command_is_an_error():
    result = run_cli(check=False)
    assert result.returncode != 0 and "COMMAND" in result.stderr


def test_generate_options_parse_into_sampling_params():
    args = build_parser().parse_args(["generate", "--temperature", "0", "--top-k", "5", "--seed", "3",
                                      "--ignore-eos", "hi", "there"])
    assert args.prompts == ["hi", "there"] and args.top_k == 5 and args.seed == 3 and args.ignore_eos


def test_bad_sampling_value_is_reported():
    result = run_cli("generate", "--model", "/nonexistent", "--top-p", "0", "hi", check=False)
    assert result.returncode == 2 and "top_p=0 is invalid: it must be in (0, 1]" in result.stderr


def test_build_then_generate_matches_hf(tiny_model, tmp_path):
    checkpoint = str(tiny_model("llama"))
    engine_dir = str(tmp_path / "engine")
    run_cli("build", checkpoint, "-o", engine_dir, "--max-batch-size", "4", "--max-input-len", "32",
            "--max-seq-len", "64", "--max-num-tokens", "64")
    assert os.path.isfile(os.path.join(engine_dir, "config.json"))
    assert os.path.isfile(os.path.join(engine_dir, "tokenizer.json"))

    from rtllm.llmapi.tokenizer import TokenizerWrapper
    tokenizer = TokenizerWrapper.from_pretrained(checkpoint)
    expected = tokenizer.decode(hf_greedy(load_hf_model(checkpoint), tokenizer.encode("Hello"), 8))
    for stream in ([], ["--stream"]):
        out = run_cli("generate", "--model", engine_dir, "--temperature", "0", "--ignore-eos",
                      "--max-tokens", "8", *stream, "Hello").stdout
        assert out == expected + "\n"


def test_generate_with_default_model(tmp_path):
    # No --model: the shipped demo model continues the prompt, greedy as in HF transformers. Nothing is
    # downloaded (proxies point at a closed port) and nothing is written (no cache, no new package files).
    from rtllm.default_model import default_model_dir
    from rtllm.llmapi.tokenizer import TokenizerWrapper
    model_dir = default_model_dir()
    files = sorted(os.listdir(model_dir))
    env = {"HOME": str(tmp_path / "home"), "RTLLM_CACHE": str(tmp_path / "cache"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    result = run_cli("generate", "--temperature", "0", "--max-tokens", "16", "--ignore-eos",
                     "def fibonacci(n):", env=env)
    tokenizer = TokenizerWrapper.from_pretrained(model_dir)
    expected = tokenizer.decode(hf_greedy(load_hf_model(model_dir), tokenizer.encode("def fibonacci(n):"), 16))
    assert expected.strip() and result.stdout == expected + "\n"
    assert result.stderr == ""
    assert sorted(os.listdir(model_dir)) == files and not os.listdir(tmp_path)


def test_build_quantizes_with_quant_algo_and_refuses_the_unimplemented(tiny_model, tmp_path):
    import json

    checkpoint = str(tiny_model("llama"))
    engine_dir = tmp_path / "fp8"
    out = run_cli("build", checkpoint, "-o", str(engine_dir), "--max-batch-size", "2", "--max-seq-len", "64",
                  "--quant-algo", "FP8_PER_CHANNEL_PER_TOKEN", "--exclude-modules", "lm_head", "*.down_proj").stdout
    config = json.loads((engine_dir / "config.json").read_text())
    ops = [(n["op"], n["inputs"][1]) for n in config["graph"]["nodes"] if n["op"] in ("linear", "fp8_linear")]
    kept = [w for op, w in ops if op == "linear"]
    assert sorted(kept) == sorted(["lm_head.weight"] + [w for _, w in ops if w.endswith("down_proj.weight")])
    quantized = [w for op, w in ops if op == "fp8_linear"]
    assert quantized and f"quantized {len(quantized)} of {len(ops)} linears to FP8_PER_CHANNEL_PER_TOKEN" in out
    assert config["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    generated = run_cli("generate", "--model", str(engine_dir), "--temperature", "0", "--max-tokens", "4",
                        "Hello").stdout
    assert generated.strip() != ""
    refused = run_cli("build", checkpoint, "-o", str(tmp_path / "w4"), "--quant-algo", "W4A8_AWQ", check=False)
    assert refused.returncode == 2 and "quant_algo W4A8_AWQ is not implemented yet" in refused.stderr
    assert not (tmp_path / "w4" / "config.json").exists()
