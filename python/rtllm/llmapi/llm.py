"""LLM: the user-facing facade. Loads (or builds) an engine, tokenizes, submits requests to the
executor and returns RequestOutputs (names follow TensorRT-LLM's LLM API)."""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
import shutil
import sys
import weakref
from typing import Optional, Sequence, Union

from tqdm import tqdm

from rtllm.errors import InvalidArgumentError
from rtllm.executor import GenerationExecutor, GenerationResult
from rtllm.executor.outputs import RequestOutput
from rtllm.llmapi.llm_args import KvCacheConfig, SchedulerConfig, resolve_vllm_aliases
from rtllm.llmapi.tokenizer import TokenizerWrapper
from rtllm.sampling_params import SamplingParams

PromptInput = Union[str, Sequence[int], dict]


def is_engine_dir(path: str) -> bool:
    """An engine dir's config.json has "format_version"; an HF checkpoint's does not."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return isinstance(config, dict) and "format_version" in config


def _is_int(x) -> bool:
    # numpy integers count; bools do not.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_args(model: str, limits: dict, seed, num_threads, device: str, scheduler_config):
    """Checks LLM's scalar arguments; returns the _core.DeviceKind for `device`."""
    from rtllm import _core

    if not os.path.isdir(model) and not (os.path.isfile(model) and model.lower().endswith(".gguf")):
        raise ValueError(f"model={model!r} is not a directory (an engine or an HF checkpoint) or a .gguf file")
    for name, value in limits.items():
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{name}={value!r} must be None or an int >= 1")
    if not _is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**64)")
    if not _is_int(num_threads) or num_threads < 0:
        raise ValueError(f"num_threads={num_threads!r} must be an int >= 0 (0: all cores)")
    devices = {"cpu": _core.DeviceKind.CPU, "cuda": _core.DeviceKind.CUDA}
    if device not in devices:
        raise ValueError(f"device={device!r} must be one of {sorted(devices)}")
    if scheduler_config is not None and not isinstance(scheduler_config, SchedulerConfig):
        raise ValueError(f"scheduler_config of type {type(scheduler_config).__name__} is invalid: it "
                         "must be a SchedulerConfig")
    return devices[device]


def check_text(name: str, text: str) -> None:
    """ValueError naming `name` for text that is not valid Unicode (a lone surrogate, which JSON's
    \\ud800 escapes and Python strings allow but no tokenizer encodes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"{name} is not valid Unicode: {e.reason} at character {e.start} "
                                   f"({text[e.start:e.end]!a})", name) from None


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: Optional[str] = None) -> list:
    """The token ids of one conversation rendered with the chat template (vLLM's and HF's options).

    add_generation_prompt opens the assistant's turn; continue_final_message instead leaves the last
    message open, so the model continues it (a prefilled answer). ValueError naming `messages` for
    what cannot be rendered.
    """
    if tokenizer is None or tokenizer.chat_template is None and chat_template is None:
        raise InvalidArgumentError("this model has no chat template: pass chat_template or use "
                                   "prompts", "messages")
    if add_generation_prompt and continue_final_message:
        raise InvalidArgumentError("add_generation_prompt and continue_final_message are both set: "
                                   "continuing the final message needs add_generation_prompt=False",
                                   "continue_final_message")
    if not isinstance(messages, (list, tuple)) or not messages or \
            not all(isinstance(m, dict) for m in messages):
        raise InvalidArgumentError(f"messages={messages!r:.80} is invalid: it must be a non-empty list of "
                                   "{'role': ..., 'content': ...} dicts", "messages")
    for message in messages:
        if isinstance(message.get("content"), str):
            check_text("messages", message["content"])
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)
    if continue_final_message:
        # As HF's: cut the rendering after the final message's text (dropping its end-of-turn).
        final = messages[-1].get("content")
        final = final.strip() if isinstance(final, str) else ""
        end = text.rfind(final) if final else -1
        if end < 0:
            raise InvalidArgumentError("continue_final_message needs a final message with text that the "
                                       "chat template renders verbatim", "messages")
        text = text[:end + len(final)]
    return tokenizer.encode(text, add_special_tokens=False)


def _cleanup(executor: Optional[GenerationExecutor], temporary_dir: Optional[str] = None) -> None:
    if executor is not None:
        executor.shutdown()  # a tensor-parallel group's followers stop here
    if temporary_dir is not None:
        shutil.rmtree(temporary_dir, ignore_errors=True)


def _kv_stats_dict(kv) -> dict:
    return {"num_total_blocks": kv.num_total_blocks, "num_free_blocks": kv.num_free_blocks,
            "num_used_blocks": kv.num_used_blocks, "num_reusable_blocks": kv.num_reusable_blocks,
            "tokens_per_block": kv.tokens_per_block, "num_reused_blocks": kv.num_reused_blocks,
            "num_missed_blocks": kv.num_missed_blocks, "num_reused_tokens": kv.num_reused_tokens,
            "num_evicted_blocks": kv.num_evicted_blocks, "num_partial_reused_blocks": kv.num_partial_reused_blocks,
            "num_touched_blocks": kv.num_touched_blocks, "hit_rate": kv.hit_rate}


class LLM:
    """`LLM(model)` with `model` an engine directory, an HF checkpoint directory or a GGUF file (built on
    load; rtllm.models.gguf).

    max_batch_size / max_num_tokens / max_seq_len / max_input_len go into the build of an HF
    checkpoint (max_seq_len defaults to the model's max_position_embeddings, max_input_len to
    max_seq_len, as vLLM's max_model_len); for a built engine they may only lower its limits. quant_config (rtllm.QuantConfig)
    quantizes that build; a built engine is run as it was quantized.

    vLLM's names are accepted with their meaning: max_model_len (max_seq_len), max_num_seqs
    (max_batch_size), gpu_memory_utilization (KvCacheConfig.free_gpu_memory_fraction),
    enable_prefix_caching (KvCacheConfig.enable_block_reuse) and enable_chunked_prefill
    (SchedulerConfig.enable_chunked_prefill). trust_remote_code=True and revision are refused: no
    code from a model repository runs, and models are local directories.
    """

    def __init__(self, model: Union[str, os.PathLike], tokenizer=None, dtype: str = "auto",
                 build_config=None, kv_cache_config: Optional[KvCacheConfig] = None,
                 scheduler_config: Optional[SchedulerConfig] = None,
                 max_batch_size: Optional[int] = None, max_num_tokens: Optional[int] = None,
                 max_seq_len: Optional[int] = None, max_input_len: Optional[int] = None,
                 seed: int = 0, skip_tokenizer_init: bool = False, num_threads: int = 0,
                 device: str = "cpu", max_num_logits: Optional[int] = None, quant_config=None,
                 max_model_len: Optional[int] = None, max_num_seqs: Optional[int] = None,
                 gpu_memory_utilization: Optional[float] = None,
                 enable_prefix_caching: Optional[bool] = None,
                 enable_chunked_prefill: Optional[bool] = None, trust_remote_code: bool = False,
                 revision: Optional[str] = None, tensor_parallel_size: int = 1):
        from rtllm import _core

        aliased = resolve_vllm_aliases(
            dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size, kv_cache_config=kv_cache_config,
                 scheduler_config=scheduler_config),
            dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                 gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                 enable_chunked_prefill=enable_chunked_prefill, trust_remote_code=trust_remote_code,
                 revision=revision))
        max_seq_len, max_batch_size = aliased["max_seq_len"], aliased["max_batch_size"]
        kv_cache_config, scheduler_config = aliased["kv_cache_config"], aliased["scheduler_config"]

        self._executor = None
        self._finalizer = weakref.finalize(self, _cleanup, None)
        if not _is_int(tensor_parallel_size) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r} must be an int >= 1")
        if tensor_parallel_size > 1 and device != "cpu":
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} runs on the CPU only for now (device="
                             f"{device!r}): the CUDA backend's NCCL communicator is not written yet")
        self.tensor_parallel_size = tensor_parallel_size
        model = os.fspath(model)
        from rtllm.models.gguf import resolve_gguf
        model = resolve_gguf(model) or model  # a .gguf file, or a directory holding only one
        limits = dict(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                      max_seq_len=max_seq_len, max_input_len=max_input_len)
        device_kind = _check_args(model, limits, seed, num_threads, device, scheduler_config)
        kv_cache_config = kv_cache_config or KvCacheConfig()
        self._scheduler_config = scheduler_config or SchedulerConfig()

        self.model_dir = model
        self._built_here = not is_engine_dir(model)
        if not self._built_here:
            for name, value in (("build_config", build_config), ("quant_config", quant_config)):
                if value is not None:  # an engine is quantized (or not) when it is built
                    raise ValueError(f"{name} is given but model={model!r} is a built engine")
        group, temporary_dir = None, None
        if tensor_parallel_size > 1:
            group, temporary_dir = self._start_tensor_parallel(model, dtype, build_config, limits, quant_config)
            self.engine_dir = None if temporary_dir else model
            try:
                self._engine = _core.Engine.load(temporary_dir or model, 0)
            except BaseException:
                _core.stop_tensor_parallel_followers(group)
                raise
        elif not self._built_here:
            self.engine_dir = model
            self._engine = _core.Engine.load(model)
            if self._engine.tp_size != 1:
                raise ValueError(f"the engine {model} was built for tp_size={self._engine.tp_size}, not "
                                 f"tensor_parallel_size=1: pass tensor_parallel_size={self._engine.tp_size}")
        else:
            self.engine_dir = None  # built in memory: no engine directory exists
            self._engine = self._build(model, dtype, build_config, limits, quant_config)
        self._model_config = json.loads(self._engine.config_json).get("model_config", {})
        self._set_limits(limits)
        self._tokenizer = None if skip_tokenizer_init else self._load_tokenizer(tokenizer, model)
        self._end_ids = self._resolve_end_ids()

        if group is not None and num_threads == 0 and device == "cpu":  # the ranks share the host's cores
            num_threads = max(1, (os.cpu_count() or 1) // tensor_parallel_size)
        runtime = _core.RuntimeConfig(device=device_kind, max_num_tokens=max_num_tokens or 0,
                                      max_batch_size=max_batch_size or 0,
                                      tokens_per_block=kv_cache_config.tokens_per_block,
                                      num_threads=num_threads)
        runtime.max_num_logits = self._max_num_logits(max_num_logits, max_batch_size, device)
        runtime.communicator = group
        config = _core.ExecutorConfig(runtime=runtime, kv_cache=kv_cache_config.to_core(),
                                      scheduler=self._scheduler_config.to_core(), seed=seed)
        try:
            self._executor = GenerationExecutor(_core.Executor(self._engine, config))
        finally:
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _cleanup, self._executor, temporary_dir)

    # Rows of logits a CPU step computes beyond one per sequence, so prompt_logprobs works there by
    # default; on CUDA they cost device memory (rows x vocab floats, several times) and are opt-in.
    CPU_PROMPT_SCORING_ROWS = 256

    def _max_num_logits(self, max_num_logits: Optional[int], max_batch_size: Optional[int], device: str) -> int:
        """Rows of logits per step: the user's, or on the CPU room to score prompts; 0 on CUDA (one row
        per sequence: prompt_logprobs then needs max_num_logits > max_batch_size)."""
        batch = max_batch_size or self._engine.max_batch_size
        if max_num_logits is None:
            return batch + self.CPU_PROMPT_SCORING_ROWS if device == "cpu" else 0
        if not isinstance(max_num_logits, int) or isinstance(max_num_logits, bool) or max_num_logits < batch:
            raise ValueError(f"max_num_logits={max_num_logits!r} must be an int >= max_batch_size ({batch}): "
                             "one row of logits per sequence, more to score prompts (prompt_logprobs)")
        return max_num_logits

    def _set_limits(self, limits: dict) -> None:
        """Python-side limits: the engine's, lowered by the user's (never raised)."""
        engine = self._engine
        for name in ("max_input_len", "max_seq_len", "max_num_tokens", "max_batch_size"):
            value, limit = limits[name], getattr(engine, name)
            if value is not None and value > limit:
                raise ValueError(f"{name}={value} exceeds the engine's {name}={limit}: "
                                 f"{self._rebuild_hint(name)}")
            setattr(self, "_" + name, limit if value is None else value)

    # How a limit is raised, in the words of the entry point: LLM's arguments, or the flags of the
    # command that created this LLM (it sets _entry_point, e.g. "rtllm serve").
    _entry_point: Optional[str] = None

    def _argument(self, name: str, command: Optional[str] = None) -> str:
        command = command or self._entry_point
        if command is None:
            return f"LLM(..., {name}=...)"
        return f"`{command} --{name.replace('_', '-')}`"

    def _rebuild_hint(self, name: str) -> str:
        return (f"rebuild the engine with a larger BuildConfig.{name} "
                f"({self._argument(name, 'rtllm build')})")

    def limit_hint(self, name: str) -> str:
        """How to raise limit `name` (max_input_len, max_seq_len, ...) from this entry point, for
        error messages: the LLM argument or CLI flag, or a rebuild when the engine's own limit binds."""
        if self._built_here:  # the limits are those of the build this LLM ran
            positions = self._model_config.get("max_position_embeddings")
            if name == "max_seq_len" and positions is not None and self._max_seq_len >= positions:
                return f"it is the model's max_position_embeddings={positions}"
            return f"raise it with {self._argument(name)}"
        engine_limit = getattr(self._engine, name)
        if getattr(self, "_" + name) < engine_limit:
            return f"raise it with {self._argument(name)}, up to the engine's {engine_limit}"
        return f"the engine was built with {name}={engine_limit}: {self._rebuild_hint(name)}"

    @staticmethod
    def _build_config_with(build_config, limits: dict):
        """build_config (default BuildConfig()) with the limits given to LLM."""
        from rtllm.builder import BuildConfig

        build_config = build_config or BuildConfig()
        overrides = {k: v for k, v in limits.items() if v is not None}
        if dataclasses.is_dataclass(build_config):
            return dataclasses.replace(build_config, **overrides)
        for key, value in overrides.items():
            setattr(build_config, key, value)
        return build_config

    def _build(self, hf_dir: str, dtype: str, build_config, limits: dict, quant_config):
        """The C++ engine built from the checkpoint in memory: each weight is read once into a numpy
        array in its engine dtype, which the engine (and the runner, which on the CPU may point into
        it) keeps alive; no engine file is written. The tokenizer is read from the checkpoint."""
        from rtllm.builder import build
        from rtllm.models import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_hugging_face(hf_dir, dtype=dtype)
        return build(model, self._build_config_with(build_config, limits), quant_config).to_core()

    def _start_tensor_parallel(self, model: str, dtype: str, build_config, limits: dict, quant_config):
        """Starts the group of tensor_parallel_size ranks (rtllm.executor.tensor_parallel) and gives the
        followers the engine: model itself when it is an engine built for that many ranks, else a
        temporary engine directory built here one rank at a time. Returns (rank 0's communicator, the
        temporary directory or None)."""
        from rtllm.builder import build_and_save
        from rtllm.executor import tensor_parallel
        from rtllm.models import AutoModelForCausalLM

        tp_size = self.tensor_parallel_size
        world = tensor_parallel.world_or_none()
        if world is not None and world.size != tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size}, but mpirun started {world.size} processes")
        if world is not None and world.rank != 0:  # a follower of an mpirun launch: serve, then end
            tensor_parallel.follow(world)
            sys.exit(0)

        def build_ranks(output: str) -> None:
            build_and_save(lambda mapping: AutoModelForCausalLM.from_hugging_face(model, dtype=dtype,
                                                                                   mapping=mapping),
                           output, self._build_config_with(build_config, limits), quant_config, tp_size)

        try:  # the engine first: a model that does not split is refused before any process starts
            engine_dir, temporary = tensor_parallel.prepare_engine_dir(model, not self._built_here, tp_size,
                                                                     build_ranks)
        except BaseException as e:
            if world is not None:  # the launch's followers wait for it
                tensor_parallel.send_abort(world, str(e))
            raise
        try:
            group = world or tensor_parallel.start_group(tp_size)
            tensor_parallel.send_setup(group, engine_dir)
        except BaseException:
            if temporary:
                shutil.rmtree(engine_dir, ignore_errors=True)
            raise
        return group, engine_dir if temporary else None

    @staticmethod
    def _load_tokenizer(tokenizer, model_dir: str) -> Optional[TokenizerWrapper]:
        if isinstance(tokenizer, TokenizerWrapper):
            return tokenizer
        if tokenizer is not None:
            return TokenizerWrapper.from_pretrained(os.fspath(tokenizer))
        if os.path.isfile(model_dir):  # a GGUF file: the tokenizer its metadata describes
            from rtllm.models.gguf_tokenizer import load_gguf_tokenizer
            return load_gguf_tokenizer(model_dir)
        if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            return TokenizerWrapper.from_pretrained(model_dir)
        return None  # token-id prompts only; outputs carry no text

    def _resolve_end_ids(self) -> list:
        ids = self._model_config.get("eos_token_id") or []
        ids = [ids] if _is_int(ids) else list(ids)
        if self._tokenizer is not None:
            ids += [i for i in self._tokenizer.eos_token_ids if i not in ids]
        return ids

    # Properties.

    @property
    def tokenizer(self) -> Optional[TokenizerWrapper]:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._engine.vocab_size

    @property
    def max_input_len(self) -> int:
        return self._max_input_len

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def max_num_tokens(self) -> int:
        return self._max_num_tokens

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def limits(self) -> dict:
        """Every request limit: max_seq_len (prompt + output, vLLM's max_model_len), max_input_len
        (prompt), max_batch_size (sequences per step), max_num_tokens (tokens per step)."""
        return {"max_seq_len": self._max_seq_len, "max_input_len": self._max_input_len,
                "max_batch_size": self._max_batch_size, "max_num_tokens": self._max_num_tokens}

    @property
    def is_shutdown(self) -> bool:
        """True once shutdown() ran: new requests then raise RuntimeError."""
        return self._executor is None or self._executor.is_shutdown

    # Inputs.

    def _prompt_tokens(self, prompt: PromptInput):
        """Returns (prompt text or None, token ids), checking them against the engine's limits."""
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"a dict prompt needs 'prompt' or 'prompt_token_ids'; got keys "
                                 f"{sorted(prompt)}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: it must hold at least one character")
            if self._tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer (this LLM has none): pass token ids")
            check_text("prompt", prompt)
            text, token_ids = prompt, self._tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
        else:
            raise ValueError(f"prompt of type {type(prompt).__name__} is invalid: it must be a str, "
                             "a list of token ids or a dict with 'prompt' / 'prompt_token_ids'")
        if not token_ids:
            raise ValueError("prompt_token_ids is empty: it must hold at least one token")
        vocab_size = self.vocab_size
        for t in token_ids:
            if not _is_int(t) or not 0 <= t < vocab_size:
                raise InvalidArgumentError(f"prompt token id {t!r} is invalid: it must be an int in "
                                           f"[0, vocab_size={vocab_size})", "prompt")
        if len(token_ids) > self._max_input_len:
            raise InvalidArgumentError(f"prompt length {len(token_ids)} exceeds max_input_len="
                                       f"{self._max_input_len}; {self.limit_hint('max_input_len')}", "prompt")
        if len(token_ids) >= self._max_seq_len:
            raise InvalidArgumentError(f"prompt length {len(token_ids)} leaves no room to generate within "
                                       f"max_seq_len={self._max_seq_len}; {self.limit_hint('max_seq_len')}",
                                       "prompt")
        if len(token_ids) > self._max_num_tokens and not self._scheduler_config.enable_chunked_prefill:
            chunked = ("SchedulerConfig(enable_chunked_prefill=True)" if self._entry_point is None
                       else f"`{self._entry_point} --enable-chunked-prefill`")
            raise InvalidArgumentError(f"prompt length {len(token_ids)} exceeds max_num_tokens="
                                       f"{self._max_num_tokens}; {chunked} allows longer prompts", "prompt")
        return text, token_ids

    @staticmethod
    def _is_single_prompt(inputs) -> bool:
        if isinstance(inputs, (str, dict)):
            return True
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError("inputs is empty: pass a prompt or a non-empty list of prompts")
            # Token ids are numbers; anything else (str, list, dict) makes a list of prompts.
            return not any(isinstance(t, (str, list, tuple, dict)) for t in inputs)
        return True  # rejected by _prompt_tokens with its type

    def _check_params(self, params, num_prompt_tokens: int) -> SamplingParams:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params of type {type(params).__name__} is invalid: it must "
                             "be a SamplingParams")
        vocab_size = self.vocab_size
        for token_id in params.logit_bias or {}:
            if token_id >= vocab_size:
                raise InvalidArgumentError(f"logit_bias token id {token_id} is invalid: it must be "
                                           f"in [0, vocab_size={vocab_size})", "logit_bias")
        if params.stop_strings and (self._tokenizer is None or not params.detokenize):
            raise ValueError(f"stop={params.stop!r} needs detokenized text: a tokenizer and "
                             "detokenize=True")
        # Like the core, generation ends at max_seq_len ("length") rather than failing; None (the
        # default) means exactly that.
        room = self._max_seq_len - num_prompt_tokens
        if params.max_tokens is None or params.max_tokens > room:
            params = dataclasses.replace(params, max_tokens=room,
                                         min_tokens=min(params.min_tokens, room))
        return params

    # Generation.

    def _submit(self, text, token_ids, params: SamplingParams, streaming: bool,
                cache_salt: Optional[str] = None, group_id: Optional[int] = None) -> GenerationResult:
        if self._executor is None or self._executor.is_shutdown:
            raise RuntimeError("this LLM was shut down")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt of type {type(cache_salt).__name__} is invalid: it must be a str")
        return self._executor.submit(token_ids, params, end_ids=self._end_ids, streaming=streaming,
                                     prompt=text, tokenizer=self._tokenizer, cache_salt=cache_salt,
                                     group_id=group_id)

    def generate_async(self, inputs: PromptInput, sampling_params: Optional[SamplingParams] = None,
                       streaming: bool = False, cache_salt: Optional[str] = None,
                       group_id: Optional[int] = None) -> GenerationResult:
        """Submits one prompt. The result is awaitable (final RequestOutput), async-iterable
        (partial RequestOutputs when streaming, then the final one) and has `.result()`.
        Prompts with different `cache_salt`s never share cached KV blocks. Prompts given one
        `group_id` (an int in [0, 2^63)) are scheduled as one client: the engine admits waiting
        sequences of different groups in turn (none: each sample is a group of its own)."""
        text, token_ids = self._prompt_tokens(inputs)
        params = self._check_params(sampling_params, len(token_ids))
        return self._submit(text, token_ids, params, streaming, cache_salt, group_id)

    def generate(self, inputs=None, sampling_params=None, use_tqdm: bool = True,
                 cache_salt: Optional[Union[str, Sequence[str]]] = None, *,
                 prompt_token_ids=None) -> Union[RequestOutput, list]:
        """Completes one prompt (returns a RequestOutput) or a list of prompts (returns a list).

        `sampling_params` is one SamplingParams for all prompts or a list with one per prompt;
        `cache_salt` likewise (prompts with different salts never share cached KV blocks).
        `prompt_token_ids` (vLLM's keyword), a list of ids or a list of such lists, stands for
        `inputs`. Every prompt is checked before any is submitted.
        """
        if prompt_token_ids is not None:
            if inputs is not None:
                raise ValueError("both inputs and prompt_token_ids are given: pass one of them")
            if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
                raise ValueError(f"prompt_token_ids={prompt_token_ids!r:.80} is invalid: it must be a "
                                 "non-empty list of token ids or of token-id lists")
            if all(isinstance(p, (list, tuple)) for p in prompt_token_ids):
                inputs = [{"prompt_token_ids": p} for p in prompt_token_ids]
            else:
                inputs = {"prompt_token_ids": prompt_token_ids}
        single = self._is_single_prompt(inputs)
        prompts = [inputs] if single else list(inputs)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        if isinstance(cache_salt, (list, tuple)):
            if len(cache_salt) != len(prompts):
                raise ValueError(f"got {len(cache_salt)} cache_salt values for {len(prompts)} prompts")
            salts = list(cache_salt)
        else:
            salts = [cache_salt] * len(prompts)
        prepared = []
        for prompt, params, salt in zip(prompts, params_list, salts):
            text, token_ids = self._prompt_tokens(prompt)
            prepared.append((text, token_ids, self._check_params(params, len(token_ids)), salt))
        results = []
        try:
            for text, token_ids, params, salt in prepared:
                results.append(self._submit(text, token_ids, params, streaming=False, cache_salt=salt))
        except BaseException:
            for result in results:
                result.abort()
            raise
        outputs, error = [], None
        for result in tqdm(results, desc="Processed requests", disable=not use_tqdm):
            try:
                outputs.append(result.result())
            except Exception as e:  # the others finish; the first error is raised after them
                error = error or e
        if error is not None:
            raise error
        return outputs[0] if single else outputs

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: Optional[str] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> list:
        """Answers one conversation (a list of {"role", "content"} dicts) or a list of them, rendered
        with the model's chat template (or `chat_template`); returns a list of RequestOutputs, one
        per conversation, as vLLM's LLM.chat. `sampling_params` as in generate()."""
        conversations = [messages] if messages and isinstance(messages, (list, tuple)) and \
            all(isinstance(m, dict) for m in messages) else messages
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise InvalidArgumentError(f"messages={messages!r:.80} is invalid: it must be a conversation "
                                       "(a list of message dicts) or a list of them", "messages")
        prompts = [{"prompt_token_ids": render_chat(self._tokenizer, conversation, add_generation_prompt,
                                                    continue_final_message, chat_template)}
                   for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def get_tokenizer(self) -> Optional[TokenizerWrapper]:
        """The tokenizer (None with skip_tokenizer_init or for a model without one), as vLLM's."""
        return self._tokenizer

    def abort(self, request_id: int) -> None:
        """Cancels a submitted request (no-op if finished); ValueError for an unknown id."""
        self._executor.abort(request_id)

    def get_stats(self) -> dict:
        """Totals since start: steps, requests, generated / computed context tokens, preemptions,
        and the KV cache (blocks free / used / reusable, reused tokens, hit rate)."""
        stats = self._executor.get_stats()
        return {
            "num_steps": stats.num_steps, "num_active_requests": stats.num_active_requests,
            "num_waiting_requests": stats.num_waiting_requests,
            "num_completed_requests": stats.num_completed_requests,
            "num_generated_tokens": stats.num_generated_tokens,
            "num_context_tokens": stats.num_context_tokens,
            "num_preemptions": stats.num_preemptions,
            "kv_cache": _kv_stats_dict(stats.kv_cache),
        }

    def get_iteration_stats(self) -> list:
        """Per-step stats since the last call, oldest first (a bounded queue: the oldest are
        dropped beyond 1000 steps)."""
        return [{
            "iteration": it.iteration, "timestamp_s": it.timestamp_s, "step_time_ms": it.step_time_ms,
            "schedule_time_ms": it.schedule_time_ms, "execute_time_ms": it.execute_time_ms,
            "postprocess_time_ms": it.postprocess_time_ms,
            "num_context_requests": it.num_context_requests,
            "num_generation_requests": it.num_generation_requests,
            "num_context_tokens": it.num_context_tokens,
            "num_generation_tokens": it.num_generation_tokens,
            "num_running_requests": it.num_running_requests,
            "num_waiting_requests": it.num_waiting_requests,
            "num_preempted_requests": it.num_preempted_requests,
            "kv_cache": _kv_stats_dict(it.kv_cache),
        } for it in self._executor.core.get_iteration_stats()]

    def get_kv_cache_events(self) -> list:
        """KV-cache events since the last call, oldest first: one "created" for the pool, then
        "stored" (a full block became reusable) and "removed" (a reusable block was evicted), each
        with the block's hash, parent hash, first token position and tokens. Needs
        KvCacheConfig(event_buffer_max_size > 0)."""
        out = []
        for e in self._executor.core.get_kv_cache_events():
            kind = e.kind.name.lower()
            event = {"event_id": e.event_id, "type": kind}
            if kind == "created":
                event.update(num_blocks=e.num_blocks, tokens_per_block=e.tokens_per_block)
            else:
                event.update(block_id=e.block_id, block_hash=e.block_hash, parent_hash=e.parent_hash,
                             token_offset=e.token_offset, token_ids=list(e.token_ids))
            out.append(event)
        return out

    # Lifetime.

    def shutdown(self) -> None:
        """Stops the executor (unfinished requests end). Idempotent."""
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
