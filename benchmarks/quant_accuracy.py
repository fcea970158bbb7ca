"""Accuracy of rtllm's quantized engines on a real model: teacher-forced perplexity over held-out English
text and top-1 agreement with the unquantized engine, one row per QuantConfig, as a markdown table.

Each engine is built with rtllm's builder from the HF checkpoint, then scores the text in windows of
--window tokens (prompt_logprobs: the log-probability of each token given the window's earlier tokens,
the first token of a window unscored). Perplexity = exp(mean negative log-likelihood); top-1 agreement =
the fraction of scored positions whose argmax token equals the unquantized engine's argmax there.
--hf adds a row computed by HF transformers on the same windows, which validates the harness (the
unquantized rtllm engine should be within a fraction of a percent of it).

CHECKPOINT may also be a GGUF file (a machine without the derived HF checkpoint: the file is 98 MB where the
float32 checkpoint is 538 MB): the text is tokenized by the tokenizer the file describes
(rtllm.models.gguf_tokenizer) and every engine, "none" included, starts from the file's weights dequantized
to float32 (its Q4_1 blocks are not kept as they are), the weights the derived HF checkpoint holds. --hf
needs an HF checkpoint.

    python benchmarks/quant_accuracy.py CHECKPOINT_DIR --algos none FP8_PER_CHANNEL_PER_TOKEN \
        FP8_PER_CHANNEL_PER_TOKEN+FP8KV FP8+FP8KV --num-tokens 2560 --window 512 --hf

An algorithm name is a QuantAlgo name ("none" for unquantized), with ":N" for group_size N, ":zp" for
has_zero_point (W4A16:64:zp) and ":desc_act" for GPTQ's desc_act; "+FP8KV" / "+INT8KV" add kv_cache_quant_algo
FP8 / INT8 ("none+INT8KV": the KV cache alone).
"""
import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

HELDOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "heldout_en.txt")
KV_SUFFIX = "+FP8KV"
INT8_KV_SUFFIX = "+INT8KV"


def quant_config_of(name: str):
    """'none' | QuantAlgo name[:GROUP_SIZE][:zp][:desc_act], optionally with '+FP8KV' -> QuantConfig (None:
    unquantized); e.g. 'W4A16:64:zp' is W4A16 with group_size 64 and has_zero_point."""
    from rtllm.quantization import QuantConfig

    algo, kv = (name[:-len(KV_SUFFIX)], "FP8") if name.endswith(KV_SUFFIX) else (name, None)
    if name.endswith(INT8_KV_SUFFIX):
        algo, kv = name[:-len(INT8_KV_SUFFIX)], "INT8"
    algo, *options = algo.split(":")
    algo = None if algo.lower() == "none" else algo
    if algo is None and kv is None:
        return None
    fields = {"has_zero_point": True} if "zp" in options else {}
    if "desc_act" in options:
        fields["desc_act"] = True
    fields.update({"group_size": int(o) for o in options if o not in ("zp", "desc_act")})
    return QuantConfig(quant_algo=algo, kv_cache_quant_algo=kv, **fields)


def gguf_path_of(checkpoint: str):
    """The GGUF file `checkpoint` names (rtllm.models.gguf.resolve_gguf), or None for an HF checkpoint."""
    from rtllm.models.gguf import resolve_gguf

    return resolve_gguf(checkpoint)


def heldout_windows(checkpoint_dir: str, num_tokens: int, window: int, text_path: str = HELDOUT) -> list:
    """The held-out text tokenized by the checkpoint's tokenizer (no special tokens), cut into
    non-overlapping windows of `window` tokens covering the first `num_tokens` (the last may be short)."""
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    gguf_path = gguf_path_of(checkpoint_dir)
    if gguf_path is not None:
        from rtllm.models.gguf_tokenizer import tokenizer_from_gguf

        ids = tokenizer_from_gguf(gguf_path)[0].encode(text, add_special_tokens=False).ids
    else:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(checkpoint_dir)(text, add_special_tokens=False)["input_ids"]
    if len(ids) < num_tokens:
        raise ValueError(f"{text_path} has {len(ids)} tokens, fewer than --num-tokens {num_tokens}")
    ids = ids[:num_tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) > 1]


@dataclass
class Scores:
    """Per scored position (windows concatenated): log-probability of the true next token and the argmax."""
    logprobs: np.ndarray  # float64
    argmax: np.ndarray    # int64

    @property
    def perplexity(self) -> float:
        return math.exp(-float(np.mean(self.logprobs)))

    def agreement(self, reference: "Scores") -> float:
        return float(np.mean(self.argmax == reference.argmax))


def _model_and_build_config(checkpoint_dir: str, max_seq_len: int):
    from rtllm.builder import BuildConfig
    from rtllm.models import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_hugging_face(checkpoint_dir)
    if gguf_path_of(checkpoint_dir) is not None:
        model.prequantized = None  # not the file's blocks: float32 weights for every config, as its HF checkpoint
    # a window is a whole prompt, and generate() wants room for one generated token after it
    return model, BuildConfig(max_batch_size=4, max_seq_len=max_seq_len + 1, max_input_len=max_seq_len,
                              max_num_tokens=max(max_seq_len, 2048))


def build_engine(checkpoint_dir: str, quant_config, engine_dir: str, max_seq_len: int, device: str = "cpu",
                 calibration=None) -> None:
    """Builds (with rtllm's builder) and saves an engine of the checkpoint; `calibration` (calibrate()) replaces
    the one the build would run."""
    from rtllm.builder import build

    model, build_config = _model_and_build_config(checkpoint_dir, max_seq_len)
    build(model, build_config, quant_config, calibration=calibration).save(engine_dir)


def calibrate(checkpoint_dir: str, quant_config, max_seq_len: int):
    """The calibration that build_engine(checkpoint_dir, quant_config, ...) runs, to be shared by builds whose
    configs calibrate alike (AWQ's and GPTQ's input statistics depend only on the calibration data and size)."""
    from rtllm.builder.build import calibrate_whole_model

    model, build_config = _model_and_build_config(checkpoint_dir, max_seq_len)
    return calibrate_whole_model(model, build_config, quant_config)


def rtllm_scores(engine_dir: str, windows: list, device: str = "cpu") -> Scores:
    """Teacher-forced scores of every window with prompt_logprobs (top-1 plus the true token)."""
    from rtllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    max_num_logits = 4 + 256 if device == "cuda" else None  # the CPU default already has scoring rows
    with LLM(engine_dir, skip_tokenizer_init=True, device=device, max_num_logits=max_num_logits) as llm:
        outputs = llm.generate(windows, params, use_tqdm=False)
    logprobs, argmax = [], []
    for out, ids in zip(outputs, windows):
        entries = out.prompt_logprobs
        if len(entries) != len(ids):
            raise RuntimeError(f"prompt_logprobs has {len(entries)} entries for a window of {len(ids)} tokens")
        for token, entry in zip(ids[1:], entries[1:]):
            logprobs.append(entry[token])
            argmax.append(max(entry.items(), key=lambda kv: (kv[1], -kv[0]))[0])
    return Scores(np.asarray(logprobs, np.float64), np.asarray(argmax, np.int64))


def fake_quantize_fp8_per_channel_per_token(model, exclude=("lm_head",)) -> None:
    """Makes an HF transformers model compute as FP8_PER_CHANNEL_PER_TOKEN does (docs/engine_format.md),
    in torch: each linear's weight becomes e4m3(W / s) · s with s = its row amax / 448, and its input
    e4m3(x / s_t) · s_t with s_t = the token's amax / 448 (torch's E4M3 cast rounds to nearest even; the
    clamp saturates). An independent model of the numerics, to tell rtllm's FP8 error from FP8's own."""
    import torch

    def e4m3(x):
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32)

    def quantize_input(module, inputs):
        x = inputs[0]
        s = (x.abs().amax(dim=-1, keepdim=True) / 448).clamp(min=torch.finfo(torch.float32).tiny)
        return (e4m3(x / s) * s,)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(name.endswith(e) for e in exclude):
                w = module.weight.to(torch.float32)
                amax = w.abs().amax(dim=1, keepdim=True)
                s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
                module.weight = torch.nn.Parameter(e4m3(w / s) * s, requires_grad=False)  # unties a shared table
                module.register_forward_pre_hook(quantize_input)


def hf_scores(checkpoint_dir: str, windows: list, fake_fp8: bool = False) -> Scores:
    """The same scores from HF transformers (float32, CPU); fake_fp8: with the FP8_PER_CHANNEL_PER_TOKEN
    numerics simulated in torch."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    model.eval()
    if fake_fp8:
        fake_quantize_fp8_per_channel_per_token(model)
    logprobs, argmax = [], []
    with torch.no_grad():
        for ids in windows:
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            lp = torch.log_softmax(logits, dim=-1)
            logprobs.append(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy())
            argmax.append(torch.argmax(logits, dim=-1).numpy())
    return Scores(np.concatenate(logprobs), np.concatenate(argmax).astype(np.int64))


def evaluate(checkpoint_dir: str, names: list, num_tokens: int = 2560, window: int = 512, device: str = "cpu",
             with_hf: bool = False, work_dir: str | None = None, skip_unbuildable: bool = False) -> dict:
    """name -> Scores for each algorithm name (plus "hf" when with_hf); the first name must be "none"
    (the reference of the agreement). skip_unbuildable: a config the builder refuses maps to its error
    message (a str) instead of raising."""
    windows = heldout_windows(checkpoint_dir, num_tokens, window)
    results = {}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for name in names:
            engine_dir = os.path.join(tmp, name.replace("+", "_"))
            try:
                build_engine(checkpoint_dir, quant_config_of(name), engine_dir, max_seq_len=window, device=device)
            except ValueError as e:
                if not skip_unbuildable or name == "none":
                    raise
                results[name] = str(e)
                continue
            results[name] = rtllm_scores(engine_dir, windows, device)
    if with_hf:
        results["hf"] = hf_scores(checkpoint_dir, windows)
        results["hf-fp8"] = hf_scores(checkpoint_dir, windows, fake_fp8=True)
    return results


def markdown_table(results: dict, reference: str = "none") -> str:
    base = results[reference]
    rows = ["| config | perplexity | vs unquantized | top-1 agreement | positions |",
            "|---|---:|---:|---:|---:|"]
    for name, s in results.items():
        label = {"hf": "HF transformers (float32)",
                 "hf-fp8": "HF transformers, FP8_PER_CHANNEL_PER_TOKEN simulated in torch"}.get(name, name)
        if isinstance(s, str):
            rows.append(f"| {label} | not built: {s} | | | |")
            continue
        rows.append(f"| {label} | {s.perplexity:.4f} | {100 * (s.perplexity / base.perplexity - 1):+.2f}% | "
                    f"{100 * s.agreement(base):.2f}% | {len(s.logprobs)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="HF checkpoint dir or GGUF file (default: SmolLM2-135M-Instruct "
                                                 "from tests/python/smollm2.py)")
    p.add_argument("--algos", nargs="+", default=["none", "FP8_PER_CHANNEL_PER_TOKEN",
                                                  "FP8_PER_CHANNEL_PER_TOKEN" + KV_SUFFIX])
    p.add_argument("--num-tokens", type=int, default=2560)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--hf", action="store_true", help="add HF transformers' scores of the same windows, "
                   "unquantized and with FP8_PER_CHANNEL_PER_TOKEN simulated in torch")
    args = p.parse_args(argv)
    checkpoint = args.checkpoint
    if args.hf and checkpoint is not None and gguf_path_of(checkpoint) is not None:
        p.error(f"--hf needs an HF checkpoint directory, not the GGUF file {checkpoint!r}")
    if checkpoint is None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
        from smollm2 import checkpoint_dir
        checkpoint = checkpoint_dir()
    names = ["none"] + [n for n in args.algos if n.lower() != "none"]
    start = time.time()
    results = evaluate(checkpoint, names, args.num_tokens, args.window, args.device, args.hf,
                       skip_unbuildable=True)
    print(f"{checkpoint}: {len(results['none'].logprobs)} scored tokens in windows of {args.window}, "
          f"{args.device}, {time.time() - start:.0f} s\n")
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
