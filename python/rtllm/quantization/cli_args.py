"""Command-line arguments for QuantConfig's fields, shared by `rtllm build`, `rtllm bench` and the
benchmarks."""
from __future__ import annotations


def add_quant_args(p) -> None:
    """--quant-algo, --group-size, --has-zero-point, --smoothquant-val, --kv-cache-quant-algo,
    --exclude-modules, --calib-data and --calib-size, as
    QuantConfig's fields and quantize()'s calib_data (rtllm build, rtllm bench, benchmarks)."""
    from rtllm.quantization import QuantAlgo

    names = [a.value for a in QuantAlgo]
    g = p.add_argument_group("quantization")
    g.add_argument("--quant-algo", choices=names, default=None, metavar="ALGO", type=str.upper,
                   help="quantize the weights (implemented: FP8, FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16, "
                        "W8A8_SQ_PER_CHANNEL, W4A16_AWQ, W4A16_GPTQ, W8A16_GPTQ; any case; default: none)")
    g.add_argument("--smoothquant-val", type=float, default=None, metavar="ALPHA",
                   help="W8A8_SQ_PER_CHANNEL: SmoothQuant's migration strength alpha in [0, 1] "
                        "(QuantConfig.smoothquant_val, default 0.5)")
    g.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="W4A16, AWQ, GPTQ: input channels per scale, 32, 64 or 128 (GPTQ also -1: per channel; "
                        "QuantConfig.group_size, default 128)")
    g.add_argument("--has-zero-point", action="store_true", default=None,
                   help="W4A16, AWQ, GPTQ: asymmetric groups, with an offset per group (QuantConfig.has_zero_point)")
    g.add_argument("--desc-act", action="store_true", default=None,
                   help="GPTQ: quantize columns in decreasing order of activation energy (QuantConfig.desc_act)")
    g.add_argument("--kv-cache-quant-algo", choices=names, default=None, metavar="ALGO", type=str.upper,
                   help="quantize the KV cache (implemented: FP8 and INT8, E4M3 or int8 codes with calibrated "
                        "scales; default: none)")
    g.add_argument("--exclude-modules", nargs="+", default=None, metavar="GLOB",
                   help="modules left unquantized (default: lm_head)")
    g.add_argument("--calib-data", default=None, metavar="FILE",
                   help="calibration texts for FP8, SmoothQuant, AWQ, GPTQ and an FP8 or INT8 KV cache: a .txt "
                        "file (paragraphs separated by blank lines) or a .jsonl file ({\"text\": ...} a line); "
                        "default: rtllm's own corpus")
    g.add_argument("--calib-size", type=int, default=None, metavar="N",
                   help="calibration samples to run (QuantConfig.calib_size, default 512)")


def quant_config_of(args):
    """The QuantConfig the quantization arguments ask for, or None."""
    if args.quant_algo is None and args.kv_cache_quant_algo is None:
        if args.calib_data is not None or args.calib_size is not None:
            raise ValueError("--calib-data and --calib-size calibrate a quantization: add --quant-algo FP8 or "
                             "--kv-cache-quant-algo FP8")
        if getattr(args, "smoothquant_val", None) is not None:
            raise ValueError("--smoothquant-val shapes a SmoothQuant quantization: add --quant-algo "
                             "W8A8_SQ_PER_CHANNEL")
        if args.group_size is not None or args.has_zero_point or getattr(args, "desc_act", None):
            raise ValueError("--group-size, --has-zero-point and --desc-act shape a weight-only quantization: add "
                             "--quant-algo W4A16, W4A16_AWQ or W4A16_GPTQ")
        return None
    from rtllm.quantization import QuantAlgo, QuantConfig

    fields = dict(quant_algo=args.quant_algo and QuantAlgo(args.quant_algo),
                  kv_cache_quant_algo=args.kv_cache_quant_algo and QuantAlgo(args.kv_cache_quant_algo))
    if args.group_size is not None:
        fields["group_size"] = args.group_size
    if args.has_zero_point:
        fields["has_zero_point"] = True
    if getattr(args, "smoothquant_val", None) is not None:
        fields["smoothquant_val"] = args.smoothquant_val
    if getattr(args, "desc_act", None):
        fields["desc_act"] = True
    if args.exclude_modules is not None:
        fields["exclude_modules"] = list(args.exclude_modules)
    # The calibration file travels as QuantConfig.calib_dataset (recorded in the engine's config.json).
    if args.calib_data is not None:
        fields["calib_dataset"] = args.calib_data
    if args.calib_size is not None:
        fields["calib_size"] = args.calib_size
    return QuantConfig(**fields)
