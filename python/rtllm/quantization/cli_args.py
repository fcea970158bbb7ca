"""Command-line arguments for QuantConfig's fields, shared by `rtllm build`, `rtllm bench` and the
benchmarks."""
from __future__ import annotations


def add_quant_args(p) -> None:
    """--quant-algo, --kv-cache-quant-algo and --exclude-modules, as QuantConfig's fields (rtllm build,
    rtllm bench, benchmarks)."""
    from rtllm.quantization import QuantAlgo

    names = [a.value for a in QuantAlgo]
    g = p.add_argument_group("quantization")
    g.add_argument("--quant-algo", choices=names, default=None, metavar="ALGO",
                   help="quantize the weights (implemented: FP8_PER_CHANNEL_PER_TOKEN; default: none)")
    g.add_argument("--kv-cache-quant-algo", choices=names, default=None, metavar="ALGO",
                   help="quantize the KV cache (implemented: FP8, an E4M3 cache; default: none)")
    g.add_argument("--exclude-modules", nargs="+", default=None, metavar="GLOB",
                   help="modules left unquantized (default: lm_head)")


def quant_config_of(args):
    """The QuantConfig the quantization arguments ask for, or None."""
    if args.quant_algo is None and args.kv_cache_quant_algo is None:
        return None
    from rtllm.quantization import QuantAlgo, QuantConfig

    fields = dict(quant_algo=args.quant_algo and QuantAlgo(args.quant_algo),
                  kv_cache_quant_algo=args.kv_cache_quant_algo and QuantAlgo(args.kv_cache_quant_algo))
    if args.exclude_modules is not None:
        fields["exclude_modules"] = list(args.exclude_modules)
    return QuantConfig(**fields)
