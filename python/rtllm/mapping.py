"""Mapping: how a model is split over devices (TensorRT-LLM's tensorrt_llm/mapping.py, tensor parallelism only).

Layers take one to know which shard of each weight their rank holds; see rtllm.nn.linear.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Mapping:
    """world_size ranks, all in one tensor-parallel group of tp_size (no pipeline parallelism, so the two are
    equal); this process is `rank`."""
    world_size: int = 1
    tp_size: int = 1
    rank: int = 0

    def __post_init__(self):
        for name in ("world_size", "tp_size", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "rank" else 1):
                limit = "a non-negative" if name == "rank" else "a positive"
                raise ValueError(f"Mapping.{name}={value!r} must be {limit} integer")
        if self.world_size != self.tp_size:
            raise ValueError(f"Mapping.world_size={self.world_size} must equal tp_size={self.tp_size}: tensor "
                             f"parallelism is the only split")
        if self.rank >= self.world_size:
            raise ValueError(f"Mapping.rank={self.rank} must be less than world_size={self.world_size}")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size
