from rtllm.executor.detokenizer import IncrementalDetokenizer
from rtllm.executor.outputs import CompletionOutput, RequestOutput
from rtllm.llmapi.llm import LLM
from rtllm.llmapi.llm_args import CapacitySchedulerPolicy, KvCacheConfig, SchedulerConfig
from rtllm.llmapi.tokenizer import TokenizerWrapper
from rtllm.sampling_params import SamplingParams

__all__ = ["LLM", "CapacitySchedulerPolicy", "KvCacheConfig", "SchedulerConfig", "CompletionOutput",
           "RequestOutput", "IncrementalDetokenizer", "TokenizerWrapper", "SamplingParams"]
