"""QuantAlgo: the quantization algorithms, with TensorRT-LLM's names (tensorrt_llm/quantization/mode.py).

Names only: which of them an engine can be built with is decided by rtllm.quantization.quantize.
"""
import enum


class QuantAlgo(str, enum.Enum):
    """A str enum: QuantAlgo.FP8 == "FP8", and config files store the name."""
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A16_GPTQ = "W8A16_GPTQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    W8A8_SQ_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN"
    W4A8_QSERVE_PER_GROUP = "W4A8_QSERVE_PER_GROUP"
    W4A8_QSERVE_PER_CHANNEL = "W4A8_QSERVE_PER_CHANNEL"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
    INT8 = "INT8"
    MIXED_PRECISION = "MIXED_PRECISION"
    NVFP4 = "NVFP4"
    W4A8_NVFP4_FP8 = "W4A8_NVFP4_FP8"
    W4A8_MXFP4_FP8 = "W4A8_MXFP4_FP8"
    W4A16_MXFP4 = "W4A16_MXFP4"
    NO_QUANT = "NO_QUANT"

    def __str__(self) -> str:
        return self.value


# The algorithms a KV cache can be stored in (kv_cache_quant_algo), as in TensorRT-LLM.
KV_CACHE_QUANT_ALGO_LIST = (QuantAlgo.FP8, QuantAlgo.INT8, QuantAlgo.NVFP4)
# Weight-only int4 algorithms whose scales are per group of `group_size` input channels.
GROUPWISE_QUANT_ALGOS = (QuantAlgo.W4A16, QuantAlgo.W4A16_AWQ, QuantAlgo.W4A8_AWQ, QuantAlgo.W4A16_GPTQ,
                         QuantAlgo.W8A16_GPTQ)
