"""Configs of the LLM facade (names follow TensorRT-LLM's LLM API), validated on construction."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


@dataclass
class KvCacheConfig:
    """Size and layout of the paged KV cache.

    max_tokens: pool size in tokens; None sizes the pool from free_gpu_memory_fraction of the device
    memory left after weights and workspace (host memory on the CPU).
    """

    max_tokens: Optional[int] = None
    free_gpu_memory_fraction: float = 0.9
    tokens_per_block: int = 32

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

    def to_core(self):
        from rtllm import _core

        return _core.KvCacheConfig(max_tokens=self.max_tokens,
                                   free_memory_fraction=float(self.free_gpu_memory_fraction),
                                   tokens_per_block=self.tokens_per_block)


class CapacitySchedulerPolicy(str, enum.Enum):
    # Reserve KV blocks for each request's whole length at admission: never preempts.
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    # Admit greedily; preempt (and recompute) when blocks run out.
    MAX_UTILIZATION = "MAX_UTILIZATION"


@dataclass
class SchedulerConfig:
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT

    def __post_init__(self):
        try:
            self.capacity_scheduler_policy = CapacitySchedulerPolicy(self.capacity_scheduler_policy)
        except ValueError:
            names = [p.value for p in CapacitySchedulerPolicy]
            raise ValueError(f"SchedulerConfig.capacity_scheduler_policy="
                             f"{self.capacity_scheduler_policy!r} must be one of {names}") from None
