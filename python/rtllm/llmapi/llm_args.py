"""Configs of the LLM facade (names follow TensorRT-LLM's LLM API), validated on construction."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


@dataclass
class KvCacheConfig:
    """Size and layout of the paged KV cache.

    max_tokens: pool size in tokens; None sizes the pool from free_gpu_memory_fraction (TensorRT-LLM's
    name; `rtllm serve --kv-cache-fraction`) of the memory left free after weights and workspace: device
    memory on CUDA; on the CPU the available host memory (MemAvailable), capped by what max_batch_size
    sequences of max_seq_len can use. CPU pool pages are committed as blocks are first written, and the
    free list hands out recently released blocks first, so resident memory follows the blocks in use.
    enable_block_reuse: requests share the cached K/V of full blocks of a common prompt prefix
    (requests with different cache salts never share).
    event_buffer_max_size: KV-cache events (stored/removed blocks) kept for
    LLM.get_kv_cache_events(); 0 records none.
    enable_partial_reuse: past the shared full blocks, a request also takes the leading tokens of a
    cached block that continues its prefix, copied into a private block (needs enable_block_reuse).
    min_partial_reuse_tokens: fewest shared tokens for which that copy is made.
    """

    max_tokens: Optional[int] = None
    free_gpu_memory_fraction: float = 0.9
    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    min_partial_reuse_tokens: int = 1

    def __post_init__(self):
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or
                                            not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"KvCacheConfig.max_tokens={self.max_tokens!r} must be None or an int >= 1")
        fraction = self.free_gpu_memory_fraction
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"KvCacheConfig.free_gpu_memory_fraction={fraction!r} must be in (0, 1]")
        tpb = self.tokens_per_block
        if isinstance(tpb, bool) or not isinstance(tpb, int) or tpb < 1 or tpb & (tpb - 1):
            raise ValueError(f"KvCacheConfig.tokens_per_block={tpb!r} must be a power of two >= 1")
        if not isinstance(self.enable_block_reuse, bool):
            raise ValueError(f"KvCacheConfig.enable_block_reuse={self.enable_block_reuse!r} must be a bool")
        size = self.event_buffer_max_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"KvCacheConfig.event_buffer_max_size={size!r} must be an int >= 0")
        if not isinstance(self.enable_partial_reuse, bool):
            raise ValueError(f"KvCacheConfig.enable_partial_reuse={self.enable_partial_reuse!r} must be a bool")
        k = self.min_partial_reuse_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"KvCacheConfig.min_partial_reuse_tokens={k!r} must be an int >= 1")

    def to_core(self):
        from rtllm import _core

        return _core.KvCacheConfig(max_tokens=self.max_tokens,
                                   free_memory_fraction=float(self.free_gpu_memory_fraction),
                                   tokens_per_block=self.tokens_per_block,
                                   enable_block_reuse=self.enable_block_reuse,
                                   event_buffer_max_size=self.event_buffer_max_size,
                                   enable_partial_reuse=self.enable_partial_reuse,
                                   min_partial_reuse_tokens=self.min_partial_reuse_tokens)


class CapacitySchedulerPolicy(str, enum.Enum):
    # Reserve KV blocks for each request's whole length at admission: never preempts.
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    # Admit greedily; preempt (and recompute) when blocks run out.
    MAX_UTILIZATION = "MAX_UTILIZATION"


@dataclass
class SchedulerConfig:
    """How the batch manager fills each step.

    enable_chunked_prefill: a prompt longer than the step's token budget advances in chunks that are
    multiples of tokens_per_block while other requests keep generating; prompts longer than
    max_num_tokens become legal (max_input_len still limits them).
    """

    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    enable_chunked_prefill: bool = False

    def __post_init__(self):
        try:
            self.capacity_scheduler_policy = CapacitySchedulerPolicy(self.capacity_scheduler_policy)
        except ValueError:
            names = [p.value for p in CapacitySchedulerPolicy]
            raise ValueError(f"SchedulerConfig.capacity_scheduler_policy="
                             f"{self.capacity_scheduler_policy!r} must be one of {names}") from None
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"SchedulerConfig.enable_chunked_prefill={self.enable_chunked_prefill!r} "
                             "must be a bool")

    def to_core(self):
        from rtllm import _core

        policy = getattr(_core.CapacityPolicy, self.capacity_scheduler_policy.value)
        return _core.SchedulerConfig(policy=policy, enable_chunked_prefill=self.enable_chunked_prefill)


# vLLM's LLM(...) arguments -> (rtllm's LLM argument, or the config and field they set).
VLLM_ALIASES = {
    "max_model_len": "max_seq_len",
    "max_num_seqs": "max_batch_size",
    "gpu_memory_utilization": ("kv_cache_config", "free_gpu_memory_fraction"),
    "enable_prefix_caching": ("kv_cache_config", "enable_block_reuse"),
    "enable_chunked_prefill": ("scheduler_config", "enable_chunked_prefill"),
}


def resolve_vllm_aliases(args: dict, aliases: dict) -> dict:
    """Applies vLLM's argument names to `args` (rtllm's LLM arguments by name) and returns them.

    An alias sets its rtllm argument, or the field of KvCacheConfig / SchedulerConfig it means (on a
    copy of the config given, or a default one). Giving both names with different values, or an
    alias and a config that says otherwise, is an error rather than a silent choice.
    """
    import dataclasses

    if aliases.pop("trust_remote_code", False):
        raise ValueError("trust_remote_code=True is not supported: rtllm runs no code from model "
                         "repositories; its architectures are built in (rtllm.models."
                         "supported_architectures())")
    revision = aliases.pop("revision", None)
    if revision is not None:
        raise ValueError(f"revision={revision!r} is not supported: rtllm loads local directories only; "
                         "check out the revision you want (e.g. huggingface-cli download --revision) "
                         "and pass its directory")
    args = dict(args)
    defaults = {"kv_cache_config": KvCacheConfig, "scheduler_config": SchedulerConfig}
    for alias, value in aliases.items():
        if value is None:
            continue
        target = VLLM_ALIASES[alias]
        if isinstance(target, str):
            if args.get(target) is not None and args[target] != value:
                raise ValueError(f"{alias}={value!r} and {target}={args[target]!r} disagree: {alias} is "
                                 f"vLLM's name for {target}; give one of them")
            args[target] = value
            continue
        config_name, field_name = target
        config = args.get(config_name)
        if config is not None:
            current = getattr(config, field_name)
            if current != value and current != getattr(defaults[config_name](), field_name):
                raise ValueError(f"{alias}={value!r} and {config_name}.{field_name}={current!r} "
                                 f"disagree: {alias} is vLLM's name for {field_name}; give one of them")
        else:
            config = defaults[config_name]()
        args[config_name] = dataclasses.replace(config, **{field_name: value})
    return args
