"""GGUF linears kept quantized: Q8_0, Q4_0 and Q4_1 weights become weight_only_linear nodes
(docs/engine_format.md) holding the file's own codes and scales, with no round trip through float.

A block of 32 weights maps onto one group of group_size 32 (gguf.decode_blocks):
  Q8_0  int8 codes q, scale d (float16)                     W = q · d
  Q4_0  int4 codes u - 8, scale d                            W = (u - 8) · d
  Q4_1  int4 codes u - 8, scale d, offset m + 8·d (float32)  W = u · d + m
A fused linear (q/k/v, gate/up) stacks its parts' rows, so it is kept quantized when every part has the
same one of these types; otherwise, and for every other type, the linear is dequantized to float32 as
before. A tied LM head reads the embedding table: the table stays float for the embedding gather and the
LM head gets its own quantized copy (lm_head.weight), as llama.cpp reads its token_embd blocks.

Attached to the model as `model.prequantized` (the interface build() uses for pre-quantized checkpoints):
quant_config() says what the engine holds; apply() rewrites the traced network. Asking for
QuantConfig(quant_algo=NO_QUANT) builds the dequantized float model instead.
"""
import numpy as np

from ..builder.safetensors_io import pack_int4
from ..builder.tensor import Parameter
from ..quantization.mode import QuantAlgo
from ..quantization.quant_config import QuantConfig
from ..quantization.quantize import QuantizationReport, shared_result
from .gguf import BLOCK, BLOCK_DECODERS

TIED_HEAD = "lm_head"  # the name of a tied LM head's own quantized weight


class GGUFWeightOnly:
    """The linears of one GGUF model that keep their file's Q8_0 / Q4_0 / Q4_1 blocks."""

    def __init__(self, gguf_file):
        self.gguf_file = gguf_file
        self.linears = []  # (Linear module, module name for its weights, [(checkpoint name, type name)])
        self.kept = {}     # module name -> why it stays float
        self.enabled = True

    def quant_config(self, requested: QuantConfig | None) -> QuantConfig:
        if requested is not None and requested.quant_algo == QuantAlgo.NO_QUANT:
            self.enabled = False
            return QuantConfig(kv_cache_quant_algo=requested.kv_cache_quant_algo)
        if requested is not None and (requested.quant_algo is not None or requested.quantizes_kv_cache):
            raise ValueError(f"quant_config={requested.quant_algo and requested.quant_algo.value} was requested, but "
                             f"{self.gguf_file.path} keeps its own {', '.join(self.types())} weights; leave "
                             f"quant_config unset, or pass QuantConfig(quant_algo=NO_QUANT) to dequantize them")
        types = self.types()
        int4 = any(t != "Q8_0" for t in types)
        return QuantConfig(quant_algo=QuantAlgo.W4A16 if int4 else QuantAlgo.W8A16, group_size=BLOCK,
                           has_zero_point="Q4_1" in types, exclude_modules=sorted(self.kept) or [])

    def types(self) -> list:
        return sorted({t for _, _, parts in self.linears for _, t in parts})

    def apply(self, network) -> QuantizationReport:
        """Each kept linear's node -> weight_only_linear (inputs x, codes, scale[, offset][, bias])."""
        if not self.enabled:
            return QuantizationReport(QuantAlgo.NO_QUANT.value)
        report = QuantizationReport(self.quant_config(None).quant_algo.value, kept=dict(self.kept))
        by_weight = {linear.weight.name: (module, parts) for linear, module, parts in self.linears}  # named now
        for node in network.nodes:
            if node.op != "linear" or node.inputs[1] not in by_weight:
                continue
            module, parts = by_weight[node.inputs[1]]
            tied = node.inputs[1] != f"{module}.weight"
            params = self._parameters(module, parts, network.weights[node.inputs[1]].shape)
            for p in params:
                if tied:
                    network.add_weight(p)
                else:
                    network.weights[p.name] = p  # the codes replace the float weight of the same name
            node.op = "weight_only_linear"
            node.attrs["group_size"] = BLOCK
            node.attrs["has_offset"] = len(params) == 3
            node.inputs = [node.inputs[0], *(p.name for p in params), *node.inputs[2:]]
            report.quantized.append(params[0].name)
        return report

    def _parameters(self, module: str, parts: list, shape) -> list:
        """[codes, scale(, offset)] of a linear from its parts' blocks, rows stacked in part order."""
        n, k = (int(d) for d in shape)
        kind = parts[0][1]
        names = [name for name, _ in parts]

        def decode():
            parts = [self.gguf_file.codes(name) for name in names]
            return [None if p[0] is None else np.concatenate(p, axis=0) for p in zip(*parts)]

        def decoded(index):  # codes, scale and offset from one decoding of the blocks
            return shared_result((self, module, "blocks"), decode)[index]

        if kind == "Q8_0":
            codes = Parameter((n, k), "int8", lambda: decoded(0), f"{module}.weight")
        else:
            codes = Parameter((n, k), "int4", lambda: pack_int4(decoded(0)), f"{module}.weight")
        params = [codes, Parameter((n, k // BLOCK), "float16", lambda: decoded(1), f"{module}.weight_scale")]
        if kind == "Q4_1":
            params.append(Parameter((n, k // BLOCK), "float32", lambda: decoded(2), f"{module}.weight_offset"))
        for p in params:
            p.keep_dtype = True
        return params


def keep_quantized(model, gguf_file) -> GGUFWeightOnly | None:
    """The GGUFWeightOnly of a model loaded from `gguf_file`, None when no linear is stored in a type it
    keeps."""
    from ..nn.linear import Linear
    from ..quantization.prequantized import checkpoint_parts

    state = GGUFWeightOnly(gguf_file)
    table = model.model.embed_tokens.weight
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        tied = module.weight is table
        parts = [("model.embed_tokens.weight" if tied else f"{ckpt}.weight")
                 for ckpt, _ in checkpoint_parts(model, name)]
        kinds = [gguf_file.tensors[p].tensor_type.name if p in gguf_file.tensors else None for p in parts]
        k = module.weight.shape[1]
        if kinds[0] not in BLOCK_DECODERS or len(set(kinds)) != 1:
            state.kept[name] = f"stored as {'/'.join(str(t) for t in kinds)}"
        elif k % BLOCK:
            state.kept[name] = f"K={k} is not a multiple of {BLOCK}"
        else:
            state.linears.append((module, TIED_HEAD if tied else name, list(zip(parts, kinds))))
    return state if state.linears else None
