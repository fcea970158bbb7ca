"""Pre-quantized FP8 checkpoints: reading the E4M3 weights and scales that compressed-tensors (llm-compressor)
and NVIDIA ModelOpt write, and mapping them onto the engine's fp8_linear (docs/engine_format.md).

Recognised from metadata:
- compressed-tensors: config.json `quantization_config.quant_method == "compressed-tensors"` with config
  groups of float8 weights (num_bits 8, type float, strategy tensor or channel) and input activations that
  are either dynamic per token (strategy token, dynamic true) or static per tensor (strategy tensor,
  dynamic false; `input_scale` tensors); optional kv_cache_scheme (float8, per tensor: k_scale/v_scale).
- ModelOpt: hf_quant_config.json (or config.json `quantization_config.quant_method == "modelopt"`) with
  quant_algo FP8 (per-tensor weights, static per-tensor input scales) or FP8_PER_CHANNEL_PER_TOKEN, and
  kv_cache_quant_algo FP8 or null.
In both, a quantized linear `m` stores `m.weight` (F8_E4M3 [N, K]) and `m.weight_scale` ([N, 1], [N], [1] or
a scalar); static ones also `m.input_scale` (scalar). Linears the checkpoint left unquantized (its ignore /
exclude_modules list) have no `weight_scale` and load as ordinary linears.

Mapping onto the engine:
- dynamic per-token activations -> fp8_linear "per_token": weight_scale [N], the checkpoint's per-channel
  scales as they are, or each part's per-tensor scale repeated over its rows; the codes are kept as stored.
- static per-tensor activations -> fp8_linear "static" (weight_scale [1], input_scale [1]). rtllm fuses
  q/k/v (and gate/up) into one linear with one weight scale: parts with a smaller scale are dequantized with
  their own scale and re-quantized with the largest one (E4M3, round to nearest even, saturating), and the
  fused input scale is the largest of the parts'.
- k_scale / v_scale (`self_attn.k_scale`, `self_attn.k_proj.k_scale` or the older
  `self_attn.k_proj.output_scale`) -> the attention node's k_scale / v_scale attrs.
Every other variant is refused with a ValueError naming the value and what is supported.

Pre-quantized integer weight-only checkpoints (AutoAWQ, AutoGPTQ / GPTQModel) are read by the second half
of this file (WeightOnlyScheme, load_weight_only) and map onto weight_only_linear.
"""
import os
from dataclasses import dataclass

import numpy as np

from .mode import QuantAlgo
from .quant_config import QuantConfig
from .quantize import QuantizationReport

FP8 = "float8_e4m3"
PER_TOKEN, STATIC = "per_token", "static"
_SUPPORTED = ("compressed-tensors FP8 (float8 weights, strategy tensor or channel; input activations dynamic "
              "per token or static per tensor), ModelOpt FP8 / FP8_PER_CHANNEL_PER_TOKEN, AutoAWQ (awq: 4 bits, "
              "GEMM layout) and GPTQ (gptq: 4 or 8 bits, as AutoGPTQ / GPTQModel write it)")


@dataclass
class Fp8Scheme:
    """What a pre-quantized checkpoint says about its linears and KV cache."""
    method: str                       # "compressed-tensors" or "modelopt"
    activation_scaling: str           # PER_TOKEN or STATIC
    kv_cache: bool                    # k_scale / v_scale tensors present
    source: str                       # the file the scheme was read from (for messages)

    @property
    def quant_algo(self) -> QuantAlgo:
        return QuantAlgo.FP8 if self.activation_scaling == STATIC else QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN


def scheme_of(model_dir: str):
    """detect() for a checkpoint directory."""
    from ..models.config import read_hf_config

    hf, path = read_hf_config(str(model_dir))
    return detect(hf, path, str(model_dir))


def detect(hf: dict, path: str, model_dir: str):
    """The scheme of a checkpoint directory (config.json parsed as `hf`, read from `path`): an Fp8Scheme,
    a WeightOnlyScheme (AWQ / GPTQ), or None when it is not quantized. Raises ValueError for any
    quantization rtllm cannot load."""
    from ..models.config import read_json

    quantization = hf.get("quantization_config")
    modelopt_path = os.path.join(model_dir, "hf_quant_config.json")
    if quantization is None:
        if os.path.isfile(modelopt_path):
            return _modelopt(read_json(modelopt_path).get("quantization"), modelopt_path)
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method == "compressed-tensors":
        return _compressed_tensors(quantization, path)
    if method in ("awq", "gptq"):
        return weight_only_scheme(quantization, path)
    if method == "modelopt":
        if os.path.isfile(modelopt_path):
            return _modelopt(read_json(modelopt_path).get("quantization"), modelopt_path)
        return _modelopt(quantization, path)
    raise ValueError(f"{path}: quantization method {method!r} (quantization_config) is not supported: rtllm "
                     f"cannot load pre-quantized checkpoints of that method; supported: {_SUPPORTED}; or use an "
                     f"unquantized checkpoint")


def _modelopt(q, path: str) -> Fp8Scheme:
    if not isinstance(q, dict):
        raise ValueError(f"{path}: expected a \"quantization\" object with quant_algo, got {q!r}")
    algo = q.get("quant_algo")
    modes = {"FP8": STATIC, "FP8_PER_CHANNEL_PER_TOKEN": PER_TOKEN}
    if algo not in modes:
        raise ValueError(f"{path}: ModelOpt quant_algo {algo!r} is not supported; supported: {', '.join(modes)}")
    kv = q.get("kv_cache_quant_algo")
    if kv not in (None, "FP8"):
        raise ValueError(f"{path}: ModelOpt kv_cache_quant_algo {kv!r} is not supported; supported: FP8 or null")
    return Fp8Scheme("modelopt", modes[algo], kv == "FP8", path)


def _float8(args, what: str, path: str) -> None:
    if not isinstance(args, dict):
        raise ValueError(f"{path}: compressed-tensors {what} {args!r} is not a quantization scheme object")
    kind, bits = args.get("type"), args.get("num_bits")
    if kind != "float" or bits != 8:
        raise ValueError(f"{path}: compressed-tensors {what} type {kind!r} with num_bits {bits!r} is not supported; "
                         f"supported: type \"float\", num_bits 8 (FP8 E4M3)")
    if args.get("symmetric", True) is not True:
        raise ValueError(f"{path}: compressed-tensors {what} symmetric={args.get('symmetric')!r} is not supported "
                         f"(FP8 is symmetric)")


def _compressed_tensors(q: dict, path: str) -> Fp8Scheme:
    fmt = q.get("format")
    if fmt not in (None, "float-quantized", "naive-quantized"):
        raise ValueError(f"{path}: compressed-tensors format {fmt!r} is not supported; supported: "
                         f"float-quantized, naive-quantized (FP8 weights stored as float8_e4m3fn)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{path}: compressed-tensors quantization_config has no config_groups")
    modes = set()
    for group_name, group in groups.items():
        where = f"config_groups.{group_name}"
        weights = group.get("weights") if isinstance(group, dict) else None
        _float8(weights, f"{where}.weights", path)
        strategy = weights.get("strategy")
        if strategy not in ("tensor", "channel"):
            raise ValueError(f"{path}: {where}.weights strategy {strategy!r} is not supported; supported: tensor, "
                             f"channel")
        if weights.get("dynamic"):
            raise ValueError(f"{path}: {where}.weights dynamic=true is not supported (weights carry their scales)")
        acts = group.get("input_activations")
        if acts is None:
            raise ValueError(f"{path}: {where} has no input_activations: FP8 weight-only quantization is not "
                             f"supported; supported: input activations dynamic per token or static per tensor")
        _float8(acts, f"{where}.input_activations", path)
        a_strategy, dynamic = acts.get("strategy"), bool(acts.get("dynamic"))
        if a_strategy == "token" and dynamic:
            modes.add(PER_TOKEN)
        elif a_strategy == "tensor" and not dynamic:
            if strategy != "tensor":
                raise ValueError(f"{path}: {where}: weights strategy {strategy!r} with static per-tensor input "
                                 f"activations is not supported; static activations need weights strategy "
                                 f"\"tensor\"")
            modes.add(STATIC)
        else:
            raise ValueError(f"{path}: {where}.input_activations strategy {a_strategy!r} with dynamic={dynamic} is "
                             f"not supported; supported: strategy \"token\" dynamic, or strategy \"tensor\" static")
    if len(modes) > 1:
        raise ValueError(f"{path}: config_groups mix dynamic per-token and static activations; rtllm loads one "
                         f"activation scheme per checkpoint")
    kv = q.get("kv_cache_scheme")
    if kv is not None:
        _float8(kv, "kv_cache_scheme", path)
        if kv.get("strategy", "tensor") != "tensor" or kv.get("dynamic"):
            raise ValueError(f"{path}: kv_cache_scheme strategy {kv.get('strategy')!r} dynamic="
                             f"{kv.get('dynamic')!r} is not supported; supported: static per-tensor k/v scales")
    return Fp8Scheme("compressed-tensors", modes.pop(), kv is not None, path)


# ---------------------------------------------------------------------------------------------------------
# E4M3 codes


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 E4M3 codes -> float32 values (exact)."""
    from rtllm import _core

    flat = np.ascontiguousarray(codes, np.uint8).ravel()
    return np.asarray(_core.convert_floats(flat, "F8_E4M3", "F32"), np.uint8).view(np.float32).reshape(codes.shape)


def e4m3_encode(values: np.ndarray) -> np.ndarray:
    """float32 values -> uint8 E4M3 codes, rounded to nearest even and saturated to ±448 (rtllm's conversion)."""
    from rtllm import _core

    flat = np.ascontiguousarray(values, np.float32).view(np.uint8).ravel()
    return np.asarray(_core.convert_floats(flat, "F32", "F8_E4M3"), np.uint8).reshape(values.shape)


def requantize(codes: np.ndarray, scale: np.float32, new_scale: np.float32) -> np.ndarray:
    """Codes of e4m3(decode(codes) · scale / new_scale) (float32 arithmetic); unchanged when the scales are
    equal."""
    if scale == new_scale:
        return codes
    return e4m3_encode(e4m3_decode(codes) * np.float32(scale) / np.float32(new_scale))


# ---------------------------------------------------------------------------------------------------------
# loading


def _scalar(checkpoint, name: str) -> np.float32:
    """A scale stored as a scalar, [1] or [1, 1] tensor (any float dtype), as float32."""
    from ..builder.safetensors_io import to_float32

    t = checkpoint.tensor(name)
    if int(np.prod(t.shape)) != 1:
        raise ValueError(f"{name} has shape {list(t.shape)}: a per-tensor scale must hold one value")
    value = np.float32(to_float32(t.load(), t.dtype).reshape(-1)[0])
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} = {value}: a scale must be finite and positive")
    return value


def _row_scales(checkpoint, name: str, rows: int) -> np.ndarray:
    """weight_scale of a part with `rows` output features as float32 [rows]: per-channel ([rows, 1] or
    [rows]) as it is, per-tensor repeated."""
    from ..builder.safetensors_io import to_float32

    t = checkpoint.tensor(name)
    size = int(np.prod(t.shape))
    if size == 1:
        return np.full(rows, _scalar(checkpoint, name), np.float32)
    if tuple(t.shape) not in ((rows,), (rows, 1)):
        raise ValueError(f"{name} has shape {list(t.shape)}; supported: [{rows}, 1] or [{rows}] (per channel) or "
                         f"one value (per tensor); group and block scales are not supported")
    s = to_float32(t.load(), t.dtype).reshape(rows)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"{name}: weight scales must be finite and positive")
    return s.astype(np.float32)


def _fp8_weight(checkpoint, name: str, shape: tuple):
    t = checkpoint.tensor(name)
    if t.dtype != FP8:
        raise ValueError(f"{name} is {t.dtype}, but its module has a weight_scale: rtllm loads pre-quantized "
                         f"weights stored as F8_E4M3 (float8_e4m3fn) only")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {name!r} from the checkpoint has shape {list(t.shape)}, but config.json implies "
                         f"{list(shape)}")
    return t


class PrequantizedModel:
    """The FP8 linears and KV scales of one model loaded from a pre-quantized checkpoint; attached to the
    model (model.prequantized) so that build() writes them as the checkpoint has them."""

    def __init__(self, scheme: Fp8Scheme):
        self.scheme = scheme
        self.linears = []          # Linear modules loaded as FP8
        self.kept = {}             # module name -> why it stayed a plain linear
        self.kv_scales = {}        # layer index -> (k_scale, v_scale)

    def quant_config(self, requested: QuantConfig | None) -> QuantConfig:
        """The engine's QuantConfig: the checkpoint's algorithms. A requested config may repeat them (or
        add an FP8 KV cache to a checkpoint without KV scales); anything else contradicts the checkpoint."""
        kv = QuantAlgo.FP8 if self.scheme.kv_cache else None
        algo = self.scheme.quant_algo
        if requested is not None:
            if requested.quant_algo not in (None, algo):
                raise ValueError(f"quant_algo {requested.quant_algo.value} was requested, but the checkpoint is "
                                 f"pre-quantized as {algo.value} ({self.scheme.source}); leave quant_algo unset")
            if requested.kv_cache_quant_algo not in (None, QuantAlgo.NO_QUANT, QuantAlgo.FP8) or \
                    (self.scheme.kv_cache and requested.kv_cache_quant_algo == QuantAlgo.NO_QUANT):
                raise ValueError(f"kv_cache_quant_algo {requested.kv_cache_quant_algo.value} was requested, but the "
                                 f"checkpoint {self.scheme.source} has "
                                 f"{'FP8 KV scales' if kv else 'no KV cache quantization'}; supported: FP8 or unset")
            kv = kv or (requested.kv_cache_quant_algo if requested.quantizes_kv_cache else None)
        return QuantConfig(quant_algo=algo, kv_cache_quant_algo=kv, exclude_modules=sorted(self.kept))

    def apply(self, network) -> QuantizationReport:
        """Build step (in place of the quantize pass): each FP8-loaded linear's node becomes an fp8_linear
        (inputs x, weight, weight_scale[, input_scale][, bias] as docs/engine_format.md says), and each
        attention node gets its layer's k_scale / v_scale."""
        report = QuantizationReport(self.scheme.quant_algo.value, kept=dict(self.kept))
        by_weight = {linear.weight.name: linear for linear in self.linears}
        for node in network.nodes:
            if node.op == "linear" and node.inputs[1] in by_weight:
                linear = by_weight.pop(node.inputs[1])
                scales = [linear.weight_scale] + ([linear.input_scale] if self.scheme.activation_scaling == STATIC
                                                  else [])
                for p in scales:
                    network.add_weight(p)
                node.op = "fp8_linear"
                node.inputs = [node.inputs[0], node.inputs[1], *(p.name for p in scales), *node.inputs[2:]]
                if self.scheme.activation_scaling == STATIC:  # per_token is the default when absent
                    node.attrs["activation_scaling"] = STATIC
                report.quantized.append(linear.weight.name)
            elif node.op == "attention" and node.attrs["layer_idx"] in self.kv_scales:
                k_scale, v_scale = self.kv_scales[node.attrs["layer_idx"]]
                node.attrs.update(k_scale=float(k_scale), v_scale=float(v_scale))
        if by_weight:
            raise ValueError(f"pre-quantized linears {sorted(by_weight)} are not in the traced network")
        return report


def checkpoint_parts(model, module_name: str) -> list:
    """[(checkpoint module name, shard id)] that a model's linear is loaded from (as load_weights does)."""
    prefix = model.checkpoint_name(f"{module_name}.weight").rsplit(".", 1)[0]
    parent, _, leaf = prefix.rpartition(".")
    parts = [(f"{parent}.{ckpt}" if parent else ckpt, shard)
             for ckpt, (module, shard) in model.packed_modules_mapping.items() if module == leaf]
    return parts or [(prefix, None)]


def quantized_linears(model, checkpoint, kept: dict, marker: str, what: str):
    """Yields (module, [(checkpoint module, shard, rows)], K) for every linear whose checkpoint parts
    all hold `{part}.{marker}` (the quantized ones); records the others in `kept` with the reason (tied to
    the embedding, unquantized in the checkpoint). A fused linear whose parts disagree is refused."""
    from ..nn.linear import Linear, StackedColumnLinear

    table = model.model.embed_tokens.weight
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        if module.weight is table:  # tied embeddings: the table stays unquantized
            kept[name] = "tied to the embedding"
            continue
        parts = checkpoint_parts(model, name)
        present = [f"{ckpt}.{marker}" in checkpoint.files for ckpt, _ in parts]
        if not any(present):
            kept[name] = "unquantized in the checkpoint"
            continue
        if not all(present):
            raise ValueError(f"{name} fuses {[c for c, _ in parts]}, but only some of them have a {marker} in the "
                             f"checkpoint: rtllm needs all of them {what} or none")
        rows, k = module.whole_shape  # the checkpoint's sizes (a rank of a sharded model keeps its slice)
        sizes = module.part_sizes if isinstance(module, StackedColumnLinear) else {None: rows}
        yield module, [(ckpt, shard, sizes[shard]) for ckpt, shard in parts], k


def load_prequantized(model, checkpoint, scheme):
    """Gives every linear the checkpoint stores in FP8 (or, for a WeightOnlyScheme, as AWQ / GPTQ integers)
    its codes and scales (lazily; before load_weights, which then loads the remaining parameters, biases
    included, as usual)."""
    from ..builder.tensor import Parameter

    if isinstance(scheme, WeightOnlyScheme):
        return load_weight_only(model, checkpoint, scheme)
    if _changes_weights(model):
        raise ValueError(f"{model.architecture} folds constants into its weights after loading, which pre-quantized "
                         f"FP8 weights cannot take; pre-quantized checkpoints of it are not supported")
    state = PrequantizedModel(scheme)
    for module, parts, k in quantized_linears(model, checkpoint, state.kept, "weight_scale", "in FP8"):
        loaded = [(ckpt, _fp8_weight(checkpoint, f"{ckpt}.weight", (rows, k)), rows, shard)
                  for ckpt, shard, rows in parts]
        for ckpt, _, rows, _ in loaded:  # shapes now, so that a bad checkpoint fails here, not when it is saved
            _check_scale_shapes(checkpoint, ckpt, rows, scheme.activation_scaling)
        _attach(module, checkpoint, loaded, scheme.activation_scaling, Parameter)
        state.linears.append(module)
    if scheme.kv_cache:
        for i, layer in enumerate(model.model.layers):
            attn = f"model.layers.{i}.self_attn"
            state.kv_scales[layer.self_attn.layer_idx] = tuple(
                _scalar(checkpoint, _kv_scale_name(checkpoint, attn, kv)) for kv in ("k", "v"))
    if not state.linears:
        raise ValueError(f"{scheme.source} declares {scheme.method} FP8 quantization, but no linear of the "
                         f"checkpoint has a weight_scale")
    return state


def _check_scale_shapes(checkpoint, module: str, rows: int, mode: str) -> None:
    size = int(np.prod(checkpoint.tensor(f"{module}.weight_scale").shape))
    if mode == STATIC:
        if size != 1:
            raise ValueError(f"{module}.weight_scale has {size} values: static FP8 activations need a per-tensor "
                             f"weight scale (one value)")
        if f"{module}.input_scale" not in checkpoint.files:
            raise ValueError(f"{module}.input_scale is missing: the checkpoint declares static input activations")
        _scalar(checkpoint, f"{module}.input_scale")
    elif size not in (1, rows):
        raise ValueError(f"{module}.weight_scale has {size} values for {rows} output features; supported: one "
                         f"(per tensor) or {rows} (per channel); group and block scales are not supported")


def _changes_weights(model) -> bool:
    from ..models.base import CausalLM

    return type(model).process_weights_after_loading is not CausalLM.process_weights_after_loading


def _kv_scale_name(checkpoint, attn: str, kv: str) -> str:
    names = (f"{attn}.{kv}_scale", f"{attn}.{kv}_proj.{kv}_scale", f"{attn}.{kv}_proj.output_scale")
    for name in names:
        if name in checkpoint.files:
            return name
    raise ValueError(f"the checkpoint declares an FP8 KV cache but has none of {', '.join(names)}")


def _attach(module, checkpoint, loaded: list, mode: str, Parameter) -> None:
    """Makes module.weight load the fused E4M3 codes and adds module.weight_scale (and input_scale). A rank of
    a sharded model keeps its slice of each part's codes (and per-channel scales); per-tensor scales are
    those of the whole parts, so its codes are the whole weight's."""
    rows = module.weight.shape[0]

    def shard(codes, part):
        return module.shard_cols(module.shard_rows(codes, part))

    if mode == PER_TOKEN:
        def codes():
            return np.concatenate([shard(t.load(), part) for _, t, _, part in loaded], axis=0)

        def weight_scale():
            return np.concatenate([module.shard_rows(_row_scales(checkpoint, f"{ckpt}.weight_scale", n), part)
                                   for ckpt, _, n, part in loaded])

        scale_shape = (rows,)
    else:
        def part_scales():
            return [_scalar(checkpoint, f"{ckpt}.weight_scale") for ckpt, _, _, _ in loaded]

        def codes():
            scales = part_scales()
            top = max(scales)
            return np.concatenate([shard(requantize(t.load(), s, top), part)
                                   for (_, t, _, part), s in zip(loaded, scales)], axis=0)

        def weight_scale():
            return np.array([max(part_scales())], np.float32)

        def input_scale():
            return np.array([max(_scalar(checkpoint, f"{ckpt}.input_scale") for ckpt, _, _, _ in loaded)],
                            np.float32)

        scale_shape = (1,)
    weight = module.weight
    weight.dtype, weight.loader, weight.keep_dtype = FP8, codes, True
    module.weight_scale = Parameter(scale_shape, "float32", weight_scale)
    module.weight_scale.keep_dtype = True
    if mode == STATIC:
        module.input_scale = Parameter((1,), "float32", input_scale)
        module.input_scale.keep_dtype = True


# ---------------------------------------------------------------------------------------------------------
# AutoAWQ and GPTQ: integer weight-only checkpoints
#
# Both store, per quantized linear m, m.qweight / m.qzeros (int32 words of packed unsigned codes) and m.scales
# ([K / G, N], float16), with W[n, k] = (u[k, n] - z[g, n]) · s[g, n], g the group of input k:
# - AutoAWQ GEMM (quant_method "awq", bits 4, version "gemm"): qweight [K, N / 8] packs 8 output columns per
#   word in the nibble order [0, 2, 4, 6, 1, 3, 5, 7] (nibble i, bits 4i..4i+3, holds column order[i]);
#   qzeros [K / G, N / 8] likewise; g = k // G.
# - GPTQ (quant_method "gptq", bits 4 or 8): qweight [K · bits / 32, N] packs 32 / bits consecutive input
#   rows per word, the first in the lowest bits; qzeros [K / G, N · bits / 32] packs consecutive output
#   columns the same way; g_idx [K] gives each input's group. AutoGPTQ's format (checkpoint_format "gptq",
#   the default) stores z - 1, GPTQModel's "gptq_v2" stores z. group_size -1 is one group over K.
#   Act-order (desc_act) checkpoints: g_idx is not k // G but still gives every group G inputs. The loader
#   then orders K by group (a stable sort of g_idx, `input_order`), so each group's columns are contiguous
#   as weight_only_linear wants, and a gather_columns node feeds the linear x[:, input_order]: the same sum,
#   exactly the checkpoint's codes. The parts of a fused linear (q/k/v, gate/up) read one input and must
#   share one order (GPTQ orders by the Hessian of that input, so they do); otherwise they are refused.
# Mapping onto weight_only_linear (exact): bits 4 -> I4 codes q = u - 8, bits 8 -> I8 codes q = u - 128;
# scale as stored; offset (mid - z) · s in float32 (mid = 8 or 128), omitted when every z of the linear is
# mid (symmetric). A fused linear (q/k/v, gate/up) stacks its parts' rows; the offset is kept for all of
# them when any part needs it.

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8
_WO_GROUP_SIZES = (32, 64, 128)


@dataclass
class WeightOnlyScheme:
    method: str           # "awq" or "gptq"
    bits: int
    group_size: int       # -1: one group over K (GPTQ)
    zeros_minus_one: bool  # AutoGPTQ's checkpoint_format "gptq": qzeros store z - 1
    source: str
    modules_to_not_convert: tuple = ()

    @property
    def quant_algo(self) -> QuantAlgo:
        if self.method == "awq":
            return QuantAlgo.W4A16_AWQ
        return QuantAlgo.W4A16_GPTQ if self.bits == 4 else QuantAlgo.W8A16_GPTQ


def weight_only_scheme(q: dict, path: str) -> WeightOnlyScheme:
    """The scheme of an AutoAWQ / GPTQ quantization_config; ValueError naming what rtllm does not load."""
    method = q["quant_method"]
    bits = q.get("bits", q.get("w_bit"))
    group_size = q.get("group_size", q.get("q_group_size"))
    if method == "awq":
        if bits != 4:
            raise ValueError(f"{path}: AWQ bits={bits!r} is not supported; supported: 4")
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{path}: AWQ version {version!r} is not supported; supported: gemm (AutoAWQ's GEMM "
                             f"layout)")
        if group_size not in _WO_GROUP_SIZES:
            raise ValueError(f"{path}: AWQ group_size={group_size!r} is not supported; supported: "
                             f"{', '.join(map(str, _WO_GROUP_SIZES))}")
        return WeightOnlyScheme("awq", 4, group_size, False, path, tuple(q.get("modules_to_not_convert") or ()))
    if bits not in (4, 8):
        raise ValueError(f"{path}: GPTQ bits={bits!r} is not supported; supported: 4, 8")
    if group_size not in _WO_GROUP_SIZES + (-1,):
        raise ValueError(f"{path}: GPTQ group_size={group_size!r} is not supported; supported: "
                         f"{', '.join(map(str, _WO_GROUP_SIZES))} or -1 (per channel)")
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported; supported: gptq (AutoGPTQ), "
                         f"gptq_v2 (GPTQModel)")
    return WeightOnlyScheme("gptq", bits, group_size, fmt == "gptq", path,
                            tuple(q.get("modules_to_not_convert") or ()))


def _int_tensor(checkpoint, name: str, shape: tuple):
    t = checkpoint.tensor(name)
    if t.dtype not in ("int32", "uint32"):
        raise ValueError(f"{name} is {t.dtype}: packed AWQ / GPTQ codes are int32 words")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)} for this module's "
                         f"[out_features, in_features] and the checkpoint's bits and group_size")
    return t


def _unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> unsigned codes (int64), the 32 / bits codes of a word consecutive along `axis`, the
    first in the lowest bits."""
    w = np.ascontiguousarray(words).view(np.uint32).astype(np.int64)
    per = 32 // bits
    codes = np.stack([(w >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], axis=axis + 1)
    shape = list(w.shape)
    shape[axis] *= per
    return codes.reshape(shape)


def _unpack_awq(words: np.ndarray) -> np.ndarray:
    """AWQ [R, C / 8] int32 -> [R, C] nibbles in column order."""
    nibbles = _unpack_words(words, 4, 1).reshape(words.shape[0], -1, 8)
    out = np.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles
    return out.reshape(words.shape[0], -1)


class WeightOnlyPart:
    """One checkpoint module's packed tensors (shapes checked at load, data read when saved)."""

    def __init__(self, checkpoint, scheme: WeightOnlyScheme, module: str, n: int, k: int, linear=None,
                 shard_id=None):
        from ..builder.safetensors_io import to_float32

        self.scheme, self.module, self.n, self.k = scheme, module, n, k
        self.linear, self.shard_id = linear, shard_id  # the rtllm Linear (and its part) that loads this one
        self.input_order = None  # [K] int64 when the checkpoint's groups are permuted (act-order)
        bits = scheme.bits
        g = k if scheme.group_size == -1 else scheme.group_size
        if k % g:
            raise ValueError(f"{module}: K={k} input features is not a multiple of the checkpoint's group_size={g}")
        self.group_size, groups, per = g, k // g, 32 // bits
        if scheme.method == "awq":
            if n % 8:
                raise ValueError(f"{module}: N={n} output features is not a multiple of 8 (AWQ packing)")
            self.qweight = _int_tensor(checkpoint, f"{module}.qweight", (k, n // 8))
            self.qzeros = _int_tensor(checkpoint, f"{module}.qzeros", (groups, n // 8))
        else:
            if k % per or n % per:
                raise ValueError(f"{module}: K={k} and N={n} must be multiples of {per} (GPTQ {bits}-bit packing)")
            self.qweight = _int_tensor(checkpoint, f"{module}.qweight", (k // per, n))
            self.qzeros = _int_tensor(checkpoint, f"{module}.qzeros", (groups, n // per))
            self.input_order = _input_order(checkpoint, module, k, g)
        self.scales = checkpoint.tensor(f"{module}.scales")
        if tuple(self.scales.shape) != (groups, n):
            raise ValueError(f"{module}.scales has shape {list(self.scales.shape)}, expected [{groups}, {n}]")
        if self.scales.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"{module}.scales is {self.scales.dtype}; supported: float16, bfloat16, float32")
        self._to_float32 = to_float32
        tp = linear.mapping.tp_size if linear is not None else 1
        if tp > 1 and linear.tp_dim == 1:  # a row-parallel shard: whole groups of its own inputs
            if g == k:  # per channel: the rank's inputs share the row's scale
                self.group_size = k // tp
            elif (k // tp) % g:
                raise ValueError(f"{module}: the {k // tp} input features of each of {tp} ranks do not hold whole "
                                 f"groups of the checkpoint's group_size={g}")
            if self.input_order is not None:
                raise ValueError(f"{module}: an act-order (desc_act) g_idx spreads each group over every rank's "
                                 f"inputs of a row-parallel linear; such checkpoints do not build with tensor "
                                 f"parallelism (tp_size={tp})")

    def rank_decode(self) -> tuple:
        """decode() cut to the rank's slice of the linear (rows of a column-parallel one, input features and
        their groups of a row-parallel one); decode() itself on one rank."""
        u, z, s = self.decode()
        if self.linear is None:
            return u, z, s
        u, z, s = (self.linear.shard_rows(a, self.shard_id) for a in (u, z, s))
        u = self.linear.shard_cols(u)
        if z.shape[1] > 1:  # groups along K (one group per row: every rank keeps it)
            z, s = self.linear.shard_cols(z), self.linear.shard_cols(s)
        return u, z, s

    def decode(self) -> tuple:
        """(u [N, K] unsigned codes, z [N, K / G] zero points, s [N, K / G] float32), exactly as stored; with an
        input_order, u's columns are in that order (column j is input input_order[j], of group j // G)."""
        bits = self.scheme.bits
        if self.scheme.method == "awq":
            u = _unpack_awq(self.qweight.load()).T
            z = _unpack_awq(self.qzeros.load()).T
        else:
            u = _unpack_words(self.qweight.load(), bits, 0).T
            if self.input_order is not None:
                u = u[:, self.input_order]
            z = _unpack_words(self.qzeros.load(), bits, 1).T
            if self.scheme.zeros_minus_one:
                z = z + 1
        s = self._to_float32(self.scales.load(), self.scales.dtype).T
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{self.module}.scales holds non-finite values")
        return u, z, np.ascontiguousarray(s, np.float32)


def _input_order(checkpoint, module: str, k: int, group_size: int):
    """None when the module's g_idx is absent or k // G; else the stable order of K by group (act-order), after
    checking that every group holds group_size inputs."""
    name = f"{module}.g_idx"
    if name not in checkpoint.files:
        return None
    t = checkpoint.tensor(name)
    if tuple(t.shape) != (k,):
        raise ValueError(f"{name} has shape {list(t.shape)}, expected [{k}]")
    g_idx = np.asarray(t.load()).astype(np.int64)
    if np.array_equal(g_idx, np.arange(k) // group_size):
        return None
    groups = k // group_size
    counts = np.bincount(g_idx, minlength=groups) if g_idx.min() >= 0 else None
    if counts is None or len(counts) != groups or np.any(counts != group_size):
        found = "values outside [0, groups)" if counts is None or len(counts) != groups else \
            f"group sizes {sorted(set(counts.tolist()))}"
        raise ValueError(f"{name} assigns its {k} inputs to {groups} groups unevenly ({found}); every group must "
                         f"hold group_size={group_size} inputs")
    return np.argsort(g_idx, kind="stable")


class WeightOnlyPrequantized:
    """The AWQ / GPTQ linears of one model (model.prequantized, as GGUF's weight-only linears)."""

    def __init__(self, scheme: WeightOnlyScheme):
        self.scheme = scheme
        self.linears = []   # (Linear module, [WeightOnlyPart])
        self.kept = {}      # module name -> why it stays a plain linear
        self.has_offset = False

    def quant_config(self, requested: QuantConfig | None) -> QuantConfig:
        algo = self.scheme.quant_algo
        if requested is not None and (requested.quant_algo not in (None, algo) or requested.quantizes_kv_cache):
            raise ValueError(f"quant_config {requested.quant_algo and requested.quant_algo.value} was requested, but "
                             f"the checkpoint is pre-quantized as {algo.value} ({self.scheme.source}); leave "
                             f"quant_config unset")
        return QuantConfig(quant_algo=algo, group_size=self.scheme.group_size, has_zero_point=self.has_offset,
                           exclude_modules=sorted(self.kept))

    def apply(self, network) -> QuantizationReport:
        from .quantize import weight_only_parameters

        report = QuantizationReport(self.scheme.quant_algo.value, kept=dict(self.kept))
        by_weight = {linear.weight.name: (linear, parts) for linear, parts in self.linears}
        bits = self.scheme.bits
        for node in network.nodes:
            if node.op != "linear" or node.inputs[1] not in by_weight:
                continue
            linear, parts = by_weight.pop(node.inputs[1])
            weight = network.weights[node.inputs[1]]
            if parts[0].input_order is not None:
                _gather_input(network, node, weight.name, parts)
            fp16 = all(p.scales.dtype == "float16" for p in parts)  # else float32: bf16 widens exactly
            params = weight_only_parameters(weight, bits, parts[0].group_size, self.has_offset,
                                            lambda parts=parts: _codes(parts, bits, self.has_offset),
                                            "float16" if fp16 else "float32")
            for p in params:
                network.weights[p.name] = p
            node.op = "weight_only_linear"
            node.attrs["group_size"] = parts[0].group_size
            node.attrs["has_offset"] = self.has_offset
            node.inputs = [node.inputs[0], *(p.name for p in params), *node.inputs[2:]]
            report.quantized.append(weight.name)
        if by_weight:
            raise ValueError(f"pre-quantized linears {sorted(by_weight)} are not in the traced network")
        return report


def _gather_input(network, node, weight_name: str, parts: list) -> None:
    """Feeds `node` x[:, input_order] through a gather_columns node (act-order; see the layout notes)."""
    from ..builder.tensor import Parameter

    order = parts[0].input_order
    for p in parts[1:]:
        if p.input_order is None or not np.array_equal(p.input_order, order):
            raise ValueError(f"{p.module}.g_idx orders the inputs unlike {parts[0].module}.g_idx, but the two are "
                             f"one fused linear reading one input: they must share one act-order permutation")
    index = Parameter((len(order),), "int32", lambda: order.astype(np.int32),
                      weight_name.rsplit(".", 1)[0] + ".input_order")
    index.keep_dtype = True
    network.add_weight(index)
    x = node.inputs[0]
    gathered, = network.add_node("gather_columns", [x, index], [("float32", network.shape_of(x))],
                                 index=network.nodes.index(node))
    node.inputs[0] = gathered.name


def _codes(parts: list, bits: int, has_offset: bool) -> tuple:
    """(codes int8 [N, K], scale [N, K / G] (float16 when every part's is, else float32), offset float32 or
    None) of a linear's parts, rows stacked."""
    mid = 1 << (bits - 1)
    decoded = [p.rank_decode() for p in parts]
    u = np.concatenate([d[0] for d in decoded], axis=0)
    z = np.concatenate([d[1] for d in decoded], axis=0)
    s = np.concatenate([d[2] for d in decoded], axis=0)
    scale_dtype = np.float16 if all(p.scales.dtype == "float16" for p in parts) else np.float32  # exact
    offset = ((mid - z) * s.astype(np.float64)).astype(np.float32) if has_offset else None
    if not has_offset and np.any(z != mid):
        raise ValueError(f"{parts[0].module}: zero points other than {mid} in a linear loaded without offsets")
    return (u - mid).astype(np.int8), s.astype(scale_dtype), offset


def _dequantized(parts: list) -> np.ndarray:
    """float32 W = (u - z) · s of a linear's parts (the float weight, for builds that do not keep the codes)."""
    rows = []
    for p in parts:
        u, z, s = p.rank_decode()
        g = p.group_size
        w = ((u - np.repeat(z, g, axis=1)) * np.repeat(s.astype(np.float64), g, axis=1)).astype(np.float32)
        if p.input_order is not None:  # back to the checkpoint's input order
            w[:, p.input_order] = w.copy()
        rows.append(w)
    return np.concatenate(rows, axis=0)


def load_weight_only(model, checkpoint, scheme: WeightOnlyScheme) -> WeightOnlyPrequantized:
    """Marks every linear the checkpoint stores as AWQ / GPTQ codes (its weight loads the dequantized float
    weight until apply() replaces it with the codes); the rest load as usual."""
    if _changes_weights(model):
        raise ValueError(f"{model.architecture} folds constants into its weights after loading, which pre-quantized "
                         f"integer weights cannot take; pre-quantized checkpoints of it are not supported")
    state = WeightOnlyPrequantized(scheme)
    for module, parts, k in quantized_linears(model, checkpoint, state.kept, "qweight", "quantized"):
        loaded = [WeightOnlyPart(checkpoint, scheme, ckpt, rows, k, module, shard) for ckpt, shard, rows in parts]
        module.weight.dtype, module.weight.loader = "float32", (lambda loaded=loaded: _dequantized(loaded))
        state.linears.append((module, loaded))
    if not state.linears:
        raise ValueError(f"{scheme.source} declares {scheme.method} quantization, but no linear of the checkpoint "
                         f"has a qweight")
    # offsets unless every zero point is the symmetric one (read now: qzeros are small)
    mid = 1 << (scheme.bits - 1)
    for _, parts in state.linears:
        for p in parts:
            words = p.qzeros.load()
            z = _unpack_awq(words) if scheme.method == "awq" else _unpack_words(words, scheme.bits, 1)
            if scheme.zeros_minus_one:
                z = z + 1
            if np.any(z != mid):
                state.has_offset = True
    return state
