"""Bounded memory, no lost files, consistent limits (issue "Hardening and conventions", findings 1, 5,
6, 7 and 8), each checked through the entry point a user would take:

1. the CPU KV pool follows free_gpu_memory_fraction of the available host memory, and steady short
   traffic keeps reusing the same warm blocks, so the resident set stays flat;
5. `rtllm build -o DIR` does not overwrite another model's files, and says when its input is an engine;
6. LLM on an HF checkpoint builds its engine in memory: no temporary engine exists to be left behind
   by a process stopped by SIGTERM / SIGINT or killed (tests/python/test_inmem_engine.py: it runs as
   the engine `rtllm build` writes);
7. a built engine carries chat_template.jinja: chat works on it, in the CLI and in the server;
8. an HF checkpoint accepts prompts up to max_seq_len by default; the server shows every limit and its
   errors name the flag that raises one.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.cli import main as cli_main
from rtllm.errors import InvalidArgumentError

from checkpoints import make_hf_checkpoint
from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE
from serve_process import stop, wait_until_healthy
from tokenizer_fixture import CHAT_TEMPLATE, make_tokenizer

TIMEOUT_S = 120
GREEDY = dict(temperature=0.0, ignore_eos=True)


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no MemAvailable in /proc/meminfo")


def kv_bytes_per_block(checkpoint, tokens_per_block: int) -> int:
    """float32 K and V of every layer and kv head, from the checkpoint's own config.json."""
    config = json.loads((checkpoint / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * tokens_per_block * head_dim * 4


def run_python(code: str, *args, env=None, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------- 1. bounded memory


def test_cpu_kv_pool_follows_the_memory_fraction(tiny_model):
    """The CPU pool takes free_gpu_memory_fraction of the available host memory, capped by what
    max_batch_size sequences of max_seq_len can use; a fraction too small for one sequence fails
    naming the numbers. (Before, the CPU pool was always max_batch_size x max_seq_len.)"""
    checkpoint = tiny_model("llama")
    tpb, max_batch_size, max_seq_len = 16, 64, 512
    block_bytes = kv_bytes_per_block(checkpoint, tpb)
    cap = max_batch_size * math.ceil(max_seq_len / tpb)  # 2048 blocks
    limits = dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len)

    target = 200  # blocks the fraction is chosen to give: well below the cap, above one sequence (32)
    fraction = target * block_bytes / mem_available_bytes()
    with LLM(checkpoint, kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=fraction, tokens_per_block=tpb),
             **limits) as llm:
        num_blocks = llm.get_stats()["kv_cache"]["num_total_blocks"]
        # Available memory moves while the test runs (other processes); the pool follows it.
        assert 0.5 * target <= num_blocks <= 1.5 * target, (num_blocks, target)
        out = llm.generate([5, 6, 7], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 4

    with LLM(checkpoint, kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=1.0, tokens_per_block=tpb),
             **limits) as llm:
        assert llm.get_stats()["kv_cache"]["num_total_blocks"] == cap

    with pytest.raises(Exception, match=r"cannot hold one sequence of max_seq_len 512 tokens.*fraction"):
        LLM(checkpoint, kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=1e-12, tokens_per_block=tpb),
            **limits)


def test_short_requests_reuse_the_same_warm_blocks(tiny_model):
    """300 short distinct requests (none fills a block, so none is cached) in waves of 4: the blocks
    ever handed out stay those of one wave, where a FIFO free list walks through the whole pool."""
    checkpoint = tiny_model("llama")
    kv = KvCacheConfig(max_tokens=4096, tokens_per_block=16, event_buffer_max_size=100)
    rng = np.random.default_rng(0)
    with LLM(checkpoint, kv_cache_config=kv, max_batch_size=8, max_seq_len=256) as llm:
        for _ in range(75):
            prompts = [rng.integers(2, VOCAB_SIZE, size=6).tolist() for _ in range(4)]
            llm.generate(prompts, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
        stats = llm.get_stats()["kv_cache"]
        assert stats["num_total_blocks"] == 256 and stats["num_used_blocks"] == 0
        assert stats["num_touched_blocks"] <= 4, stats
        assert [e["type"] for e in llm.get_kv_cache_events()] == ["created"]  # nothing was cached


RSS_SCRIPT = """
    import json, sys
    import numpy as np
    from rtllm import LLM, KvCacheConfig, SamplingParams

    def rss_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(sys.argv[1], kv_cache_config=KvCacheConfig(tokens_per_block=32), max_batch_size=16,
             max_seq_len=1024, num_threads=2) as llm:
        def wave():  # 8 distinct 8-token prompts: 16 tokens each, in one block never cached
            llm.generate([rng.integers(2, 300, size=8).tolist() for _ in range(8)], params, use_tqdm=False)
        for _ in range(10):
            wave()
        start = rss_bytes()
        for _ in range(int(sys.argv[2])):
            wave()
        print(json.dumps({"growth": rss_bytes() - start, "kv": llm.get_stats()["kv_cache"]}))
"""


def test_rss_stays_flat_under_steady_short_traffic(tmp_path):
    """Resident memory of a process serving 400 short requests: with blocks of 512 KiB, a FIFO free
    list would touch a new block per request (about 200 MB over the pool of 512 blocks); reusing warm
    blocks keeps the growth to the allocator's noise."""
    checkpoint = make_hf_checkpoint(tmp_path / "wide", vocab_size=VOCAB_SIZE, num_layers=4, hidden_size=256,
                                    num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                                    intermediate_size=256, max_position_embeddings=1024,
                                    bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    block_bytes = kv_bytes_per_block(checkpoint, 32)
    assert block_bytes == 512 * 1024
    result = run_python(RSS_SCRIPT, checkpoint, 50, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kv"]["num_total_blocks"] == 16 * 1024 // 32  # the cap: this machine has the memory
    # FIFO: a new block per request, half of its pages written (16 of 32 token rows): about 95 MB.
    assert report["growth"] < 40 * block_bytes, report
    assert report["kv"]["num_touched_blocks"] <= 8, report


# ---------------------------------------------------------------- 5. build -o does not overwrite


def test_build_refuses_a_foreign_output_dir_and_an_engine_input(tiny_model, tmp_path, capsys):
    checkpoint = str(tiny_model("llama"))
    other = tmp_path / "other-model"
    other.mkdir()
    foreign = {"config.json": '{"model_type": "gpt2"}', "tokenizer.json": '{"other": true}'}
    for name, text in foreign.items():
        (other / name).write_text(text)
    assert cli_main(["build", checkpoint, "-o", str(other), "--max-seq-len", "64"]) == 2
    err = capsys.readouterr().err
    assert "not empty and is not an rtllm engine" in err and "--force" in err
    assert {p.name: p.read_text() for p in other.iterdir()} == foreign  # untouched

    # A file in the way is refused too; an empty dir, a new one and an engine (rebuilt) are fine.
    (tmp_path / "file").write_text("x")
    assert cli_main(["build", checkpoint, "-o", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    engine = tmp_path / "engine"
    engine.mkdir()
    assert cli_main(["build", checkpoint, "-o", str(engine), "--max-seq-len", "64"]) == 0
    assert cli_main(["build", checkpoint, "-o", str(engine), "--max-seq-len", "32"]) == 0
    assert json.loads((engine / "config.json").read_text())["build_config"]["max_seq_len"] == 32
    capsys.readouterr()

    # An engine given as the checkpoint.
    assert cli_main(["build", str(engine), "-o", str(tmp_path / "again")]) == 2
    assert "is already an rtllm engine, not an HF checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()

    # --force writes into the foreign dir.
    assert cli_main(["build", checkpoint, "-o", str(other), "--max-seq-len", "64", "--force"]) == 0
    assert "format_version" in json.loads((other / "config.json").read_text())


# ---------------------------------------------------------------- 6. no temporary engine left behind


HOLD_SCRIPT = """
    import sys, time
    from rtllm import LLM
    llm = LLM(sys.argv[1], max_seq_len=64, max_batch_size=2)
    print(llm.engine_dir, flush=True)
    time.sleep(120)
"""


def start_holder(checkpoint, temp_root):
    """A process holding an LLM built from `checkpoint` with $TMPDIR at temp_root, once it is built."""
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD_SCRIPT), str(checkpoint)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(temp_root)})
    line = process.stdout.readline().strip()
    assert line, process.communicate(timeout=TIMEOUT_S)[1][-3000:]
    assert line == "None"  # no engine directory
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_no_engine_file_exists_to_be_left_behind(tiny_model, tmp_path, signum):
    checkpoint = tiny_model("llama")
    files = sorted(os.listdir(checkpoint))
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    process = start_holder(checkpoint, temp_root)
    try:
        assert os.listdir(temp_root) == []  # while the LLM runs
        process.send_signal(signum)
        process.communicate(timeout=TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode != 0
    assert os.listdir(temp_root) == [] and sorted(os.listdir(checkpoint)) == files


# ---------------------------------------------------------------- 7 and 8: engine with chat, limits


@pytest.fixture(scope="module")
def jinja_checkpoint(tmp_path_factory):
    """A checkpoint laid out as current transformers saves it: the chat template in chat_template.jinja,
    none in tokenizer_config.json."""
    path = tmp_path_factory.mktemp("jinja-ckpt")
    make_hf_checkpoint(path, vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       max_position_embeddings=2048)
    make_tokenizer(path, vocab_size=VOCAB_SIZE, chat_template=None)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def jinja_engine(jinja_checkpoint, tmp_path_factory):
    engine = tmp_path_factory.mktemp("jinja-engine") / "engine"
    assert cli_main(["build", str(jinja_checkpoint), "-o", str(engine), "--max-batch-size", "4"]) == 0
    return engine


def test_built_engine_carries_the_chat_template_file(jinja_checkpoint, jinja_engine):
    assert (jinja_engine / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hello there"}]
    with LLM(jinja_checkpoint, max_seq_len=128, max_batch_size=2) as source:
        expected = source.tokenizer.apply_chat_template(messages, tokenize=True)
    with LLM(jinja_engine) as llm:
        assert llm.tokenizer.chat_template == CHAT_TEMPLATE
        assert llm.tokenizer.apply_chat_template(messages, tokenize=True) == expected
        reference = llm.generate({"prompt_token_ids": expected}, SamplingParams(max_tokens=6, **GREEDY),
                                 use_tqdm=False).outputs[0].text
    # The CLI's --chat on the engine.
    result = subprocess.run([sys.executable, "-m", "rtllm.cli", "generate", "--model", str(jinja_engine), "--chat",
                             "--temperature", "0", "--ignore-eos", "--max-tokens", "6", "Hello there"],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == reference + "\n"


def test_hf_checkpoint_takes_prompts_up_to_max_seq_len(jinja_checkpoint):
    """No hidden 1024-token prompt limit: max_input_len defaults to max_seq_len (vLLM's max_model_len),
    and an error for a longer prompt says which LLM argument raises the limit."""
    rng = np.random.default_rng(1)
    with LLM(jinja_checkpoint, max_seq_len=2048, max_batch_size=2) as llm:
        assert llm.max_input_len == llm.max_seq_len == 2048
        assert llm.limits == {"max_seq_len": 2048, "max_input_len": 2048, "max_batch_size": 2,
                              "max_num_tokens": 8192}
        prompt = rng.integers(2, VOCAB_SIZE, size=1500).tolist()
        out = llm.generate(prompt, SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 3
        with pytest.raises(InvalidArgumentError, match=r"max_seq_len=2048; it is the model's max_position_embeddings"):
            llm.generate(rng.integers(2, VOCAB_SIZE, size=2048).tolist(), use_tqdm=False)
    with LLM(jinja_checkpoint, max_seq_len=256, max_batch_size=2) as llm:
        with pytest.raises(InvalidArgumentError, match=r"max_seq_len=256; raise it with LLM\(\.\.\., max_seq_len="):
            llm.generate(rng.integers(2, VOCAB_SIZE, size=256).tolist(), use_tqdm=False)
    with LLM(jinja_checkpoint, max_seq_len=256, max_input_len=100, max_batch_size=2) as llm:
        with pytest.raises(InvalidArgumentError,
                           match=r"exceeds max_input_len=100; raise it with LLM\(\.\.\., max_input_len="):
            llm.generate(rng.integers(2, VOCAB_SIZE, size=101).tolist(), use_tqdm=False)


@pytest.fixture(scope="module")
def served_engine(jinja_engine, tmp_path_factory):
    """`rtllm serve` of the built engine with a lowered --max-input-len; yields (base URL, startup line)."""
    log_path = tmp_path_factory.mktemp("serve-limits") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "rtllm.cli", "serve", str(jinja_engine), "--port", "0",
                                    "--served-model-name", "tiny", "--max-input-len", "64", "--max-kv-tokens",
                                    "8192", "--log-level", "warning"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        assert match, line + log_path.read_text()
        url = match.group(1)
        wait_until_healthy(url, process, log_path, TIMEOUT_S)
        yield url, line
    finally:
        stop(process, TIMEOUT_S)


def test_server_shows_every_limit_and_names_the_flag(served_engine, jinja_engine):
    url, line = served_engine
    limits = {"max_seq_len": 2048, "max_input_len": 64, "max_batch_size": 4, "max_num_tokens": 8192}
    for name, value in limits.items():
        assert f"{name} {value}" in line, line
    model = httpx.get(url + "/v1/models", timeout=TIMEOUT_S).json()["data"][0]
    assert model["max_model_len"] == 2048
    assert {k: model[k] for k in limits} == limits

    # Over --max-input-len (lowered below the engine's): the flag, and how far it goes.
    response = httpx.post(url + "/v1/completions", json={"prompt": list(range(2, 72)), "max_tokens": 2},
                          timeout=TIMEOUT_S)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "max_input_len=64" in message and "`rtllm serve --max-input-len`" in message, message
    assert "up to the engine's 2048" in message, message
    # Over the engine's max_seq_len: only a rebuild raises it.
    response = httpx.post(url + "/v1/completions", json={"prompt": [5] * 2048, "max_tokens": 2}, timeout=TIMEOUT_S)
    assert response.status_code == 400
    assert "`rtllm build --max-seq-len`" in response.json()["error"]["message"]


def test_server_chat_on_the_built_engine(served_engine, jinja_engine):
    """/v1/chat/completions works on an engine whose template came from chat_template.jinja, and equals
    LLM.generate on the templated prompt."""
    url, _ = served_engine
    messages = [{"role": "user", "content": "Hello there"}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    with LLM(jinja_engine, max_batch_size=1) as llm:
        ids = llm.tokenizer.apply_chat_template(messages, tokenize=True)
        expected = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=6, **GREEDY),
                                use_tqdm=False).outputs[0].text
    assert response.json()["choices"][0]["message"]["content"] == expected


def test_rebuilding_over_an_engine_leaves_no_file_of_the_old_tokenizer(jinja_checkpoint, tiny_model, tmp_path):
    """An engine rebuilt from another checkpoint into the same directory keeps none of the old
    tokenizer files: a stale special_tokens_map.json could supply special tokens the new
    tokenizer_config.json leaves out, a stale chat_template.jinja the chat format of a model without one."""
    engine = tmp_path / "engine"
    assert cli_main(["build", str(jinja_checkpoint), "-o", str(engine), "--max-seq-len", "64"]) == 0
    (engine / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<s>"}))
    assert (engine / "chat_template.jinja").is_file()
    other = tiny_model("llama")  # tokenizer_config.json holds its template; no .jinja, no special map
    assert cli_main(["build", str(other), "-o", str(engine), "--max-seq-len", "64"]) == 0
    assert not (engine / "chat_template.jinja").exists() and not (engine / "special_tokens_map.json").exists()
    with LLM(engine) as llm:
        assert llm.tokenizer.chat_template == CHAT_TEMPLATE
        assert llm.tokenizer.eos_token == "</s>"
