from rtllm.executor.executor import GenerationExecutor
from rtllm.executor.result import GenerationResult

__all__ = ["GenerationExecutor", "GenerationResult"]
