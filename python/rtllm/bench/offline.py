"""`rtllm bench throughput` and `latency`: the workload through the LLM API in this process, each
request streamed (generate_async) so its tokens are timed as they arrive."""
from __future__ import annotations

import json
import os
from typing import Optional

from rtllm.bench.dataset import BenchRequest
from rtllm.bench.metrics import RequestRecord
from rtllm.bench.runner import Send, now


def vocab_bound(model_dir: str) -> int:
    """Random prompt ids are drawn below this: the smaller of the tokenizer's vocabulary and the
    model's (a model dir or engine dir), so `throughput` and `serve` on one model draw the same ids
    and every id decodes."""
    sizes = []
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        from rtllm.llmapi.tokenizer import TokenizerWrapper
        sizes.append(TokenizerWrapper.from_pretrained(model_dir).vocab_size)
    config_path = os.path.join(model_dir, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        size = config.get("vocab_size") or config.get("model_config", {}).get("vocab_size")
        if size:
            sizes.append(int(size))
    if not sizes:
        raise ValueError(f"{model_dir!r} has neither tokenizer.json nor a config.json with vocab_size: "
                         "cannot draw random prompt ids for it")
    return min(sizes)


def tokenize_prompts(requests: list, tokenizer_dir: str) -> list:
    """Text prompts become token ids before timing starts (as trtllm-bench does), so prompt
    lengths are known up front and tokenization is not timed."""
    if all(r.prompt_token_ids is not None for r in requests):
        return requests
    from rtllm.llmapi.tokenizer import TokenizerWrapper
    tokenizer = TokenizerWrapper.from_pretrained(tokenizer_dir)
    return [r if r.prompt_token_ids is not None else
            BenchRequest(output_len=r.output_len, prompt_token_ids=tokenizer.encode(r.prompt))
            for r in requests]


def engine_limits(model_dir: str, requests: list, max_input_len: Optional[int],
                  max_seq_len: Optional[int], max_num_tokens: Optional[int]) -> dict:
    """LLM limits. An HF checkpoint is built for the workload unless told otherwise (its longest
    prompt and prompt + output); a built engine keeps its own limits unless lowered."""
    from rtllm.llmapi.llm import is_engine_dir

    if not is_engine_dir(model_dir):
        longest_prompt = max(len(r.prompt_token_ids) for r in requests)
        max_input_len = max_input_len or longest_prompt
        max_seq_len = max_seq_len or max(len(r.prompt_token_ids) + r.output_len for r in requests)
        # A prompt must fit one step (no chunked prefill in a default build).
        max_num_tokens = max_num_tokens or max(8192, max_input_len)
    return dict(max_input_len=max_input_len, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens)


def llm_sender(llm, sampling: dict) -> Send:
    """A `send` that streams one request through `llm` and records its token arrivals."""
    from rtllm import SamplingParams

    async def send(request: BenchRequest) -> RequestRecord:
        record = RequestRecord(sent=now())
        try:
            params = SamplingParams(max_tokens=request.output_len, ignore_eos=True, **sampling)
            output = None
            async for output in llm.generate_async(request.llm_input, params, streaming=True):
                record.deliver(now(), len(output.outputs[0].token_ids_diff))
            record.num_prompt_tokens = len(output.prompt_token_ids)
        except Exception as e:  # one failed request is reported, the others go on
            record.error = f"{type(e).__name__}: {e}"
        record.ended = now()
        return record

    return send
