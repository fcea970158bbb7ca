"""The `rtllm` command: build an engine from an HF checkpoint, or generate text."""
from __future__ import annotations

import argparse
import os
import sys

from rtllm.bench import add_bench_parser
from rtllm.builder import DTYPES
from rtllm.quantization.cli_args import add_quant_args, quant_config_of
from rtllm.serve.cli import add_serve_parser


def _add_build_parser(subparsers) -> None:
    p = subparsers.add_parser("build", help="build an engine from a Hugging Face checkpoint or a GGUF file",
                              description="Build an rtllm engine directory from an HF checkpoint or a GGUF file.")
    p.add_argument("hf_dir", metavar="HF_DIR",
                   help="checkpoint directory (config.json, *.safetensors), or a .gguf file")
    p.add_argument("-o", "--output", metavar="ENGINE_DIR", required=True,
                   help="engine directory to write: new, empty or an rtllm engine (replaced)")
    p.add_argument("--force", action="store_true",
                   help="write into ENGINE_DIR even if it holds files that are not an rtllm engine")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weight dtype (auto: the checkpoint's)")
    p.add_argument("--max-batch-size", type=int, default=64, help="most sequences per step (default 64)")
    p.add_argument("--max-input-len", type=int, default=None, help="longest prompt (default: max-seq-len)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
    p.add_argument("--max-num-tokens", type=int, default=8192, help="most tokens per step (default 8192)")
    p.add_argument("--no-fuse", action="store_true", help="skip the fusion passes")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel ranks: writes rank0.engine ... rank{N-1}.engine, each with its shard of "
                        "the weights (default 1)")
    add_quant_args(p)
    p.set_defaults(func=_run_build)


def _add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete prompts with a model",
                              description="Complete each PROMPT and print the completion.")
    p.add_argument("prompts", metavar="PROMPT", nargs="+", help="prompt text")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="engine or HF checkpoint directory (default: the built-in demo model)")
    p.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens per completion (default: up to the model's context length)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + output (default: the model's; an HF checkpoint is built for it)")
    p.add_argument("--max-input-len", type=int, default=None, help="longest prompt (default: max-seq-len)")
    p.set_defaults(func=_run_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtllm", description="rtllm: build engines and generate text.")
    parser.add_argument("--version", action="version", version=f"rtllm {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_build_parser(subparsers)
    _add_generate_parser(subparsers)
    add_bench_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def _version() -> str:
    from rtllm import __version__
    return __version__


def _check_build_dirs(hf_dir: str, output: str, force: bool) -> None:
    """Refuses an engine as input, and an output directory that holds something else than an engine
    (another model's config and tokenizer would be overwritten) unless --force."""
    from rtllm.llmapi.llm import is_engine_dir

    if os.path.isdir(hf_dir) and is_engine_dir(hf_dir):
        raise ValueError(f"{hf_dir} is already an rtllm engine, not an HF checkpoint: run it as it is "
                         f"(rtllm generate --model {hf_dir}, rtllm serve {hf_dir})")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"-o {output} exists and is not a directory")
    if force or not os.path.isdir(output) or not os.listdir(output):
        return
    try:
        is_engine = is_engine_dir(output)
    except (ValueError, OSError):  # an unreadable config.json is not an engine's
        is_engine = False
    if not is_engine:
        raise ValueError(f"-o {output} is not empty and is not an rtllm engine: writing there would overwrite "
                         "its config.json and tokenizer files; choose a new directory, or pass --force")


def _run_build(args) -> None:
    from rtllm.builder import BuildConfig, build_and_save
    from rtllm.mapping import Mapping
    from rtllm.models import AutoModelForCausalLM
    from rtllm.models.gguf import resolve_gguf

    gguf_path = resolve_gguf(args.hf_dir)  # None: an HF checkpoint directory
    _check_build_dirs(args.hf_dir, args.output, args.force)
    config = BuildConfig(max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                         max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                         fuse=not args.no_fuse)
    Mapping(args.tp_size, args.tp_size)  # a bad --tp-size is refused before any work
    engine = build_and_save(lambda mapping: AutoModelForCausalLM.from_hugging_face(args.hf_dir, dtype=args.dtype,
                                                                                  mapping=mapping),
                            args.output, config, quant_config_of(args), tp_size=args.tp_size)
    if gguf_path is not None:  # the tokenizer a GGUF file describes, as a checkpoint's files
        from rtllm.models.gguf_tokenizer import save_gguf_tokenizer
        try:
            save_gguf_tokenizer(gguf_path, args.output)
        except ValueError as e:  # the engine runs on token ids, or with a tokenizer given at load
            print(f"rtllm build: warning: no tokenizer written: {e}", file=sys.stderr)
    if engine.quantization_report.quantized or engine.quantization_report.kept:
        print(engine.quantization_report.summary())
    print(f"engine written to {args.output}")


def _run_generate(args) -> None:
    from rtllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                            repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, ignore_eos=args.ignore_eos)
    model = args.model
    if model is None:
        from rtllm.default_model import default_model_dir
        model = default_model_dir()
    with LLM(model, tokenizer=args.tokenizer, device=args.device, max_seq_len=args.max_seq_len,
             max_input_len=args.max_input_len) as llm:
        llm._entry_point = "rtllm generate"  # limit errors name this command's flags
        prompts = args.prompts
        if args.chat:
            prompts = [{"prompt_token_ids": llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=True)} for p in prompts]
        for i, prompt in enumerate(prompts):
            if len(prompts) > 1:
                print(f"--- [{i}] {args.prompts[i]}")
            if args.stream:
                for output in llm.generate_async(prompt, params, streaming=True):
                    print(output.outputs[0].text_diff, end="", flush=True)
                print()
            else:
                print(llm.generate(prompt, params, use_tqdm=False).outputs[0].text)


def _runtime_error() -> type:
    try:
        from rtllm import RtllmError
        return RtllmError
    except ImportError:  # the extension is missing: nothing raises RtllmError
        return ValueError


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, _runtime_error()) as e:
        print(f"rtllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C: the LLM's context manager has shut the engine down
        print(f"rtllm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
