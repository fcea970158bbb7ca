"""rtllm against llama.cpp on the CPU: the same GGUF files, the same threads, in one run.

    python benchmarks/bench_cpu_vs_llamacpp.py [--gguf FILE] [--threads 2] [--prompt-len 128] [--tokens 64]

--gguf is a llama.cpp GGUF file (default: SmolLM2-135M-Instruct Q4_1, the file tests/python/smollm2.py
fetches). From it the script derives, once, into the same directory, an F16 and a Q8_0 file holding the
same (dequantized) weights with the same metadata, so every format below has the same model:
  F16   llama.cpp F16    against rtllm loading the same file with dtype="float16" and "bfloat16" (16-bit weights)
  Q8_0  llama.cpp Q8_0   against rtllm loading it (W8A16: int8 codes, one scale per 32 weights)
  Q4_1  llama.cpp Q4_1   against rtllm loading it (W4A16: int4 codes, scale and offset per 32 weights)
Beside the Q8_0 and Q4_1 rows, rtllm also runs its own quantization of the same model (the HF checkpoint
of --checkpoint, default: the one tests/python/smollm2.py derives from the Q4_1 file, as a bfloat16 engine):
W8A16 with one scale per output channel, and W4A16 with a scale and zero point per 64 weights (the
largest of rtllm's group sizes that divides this model's 576 columns).
For each: the prefill of --prompt-len tokens (ms; best of --reps) and batch-1 greedy decode (ms per token
over --tokens tokens; best of --reps). llama.cpp runs through llama-cpp-python (an optional dependency:
`pip install llama-cpp-python`); without it, only rtllm's rows are printed.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
from timing import now, report  # noqa: E402

FORMATS = ("F16", "Q8_0", "Q4_1")


def derive_gguf(source: str, fmt: str) -> str:
    """`source` rewritten with every 2-D weight in `fmt` (1-D tensors stay F32): same metadata, weights
    dequantized from the source and re-encoded. Cached next to the source."""
    import gguf

    reader = gguf.GGUFReader(source)
    if fmt == _file_format(reader):
        return source
    path = os.path.join(os.path.dirname(source), os.path.basename(source).rsplit(".", 2)[0] + f".{fmt}.gguf")
    if os.path.isfile(path):
        return path
    arch = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(path + ".tmp", bytes(arch.parts[arch.data[0]]).decode())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                                     "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[fmt])
            continue
        _copy_field(writer, name, field)
    qtype = getattr(gguf.GGMLQuantizationType, fmt)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if values.ndim == 2:
            data = values.astype(np.float16) if fmt == "F16" else gguf.quants.quantize(values, qtype)
            writer.add_tensor(t.name, data, raw_shape=data.shape if fmt == "F16" else None,
                              raw_dtype=qtype if fmt != "F16" else None)
        else:
            writer.add_tensor(t.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".tmp", path)
    return path


def _file_format(reader) -> str:
    """The type of most 2-D tensors (a Q4_1 file may keep its embedding in Q8_0)."""
    import collections

    types = collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    return types.most_common(1)[0][0] if types else ""


def _copy_field(writer, name, field):
    import gguf

    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        item = field.types[-1]
        if item == gguf.GGUFValueType.STRING:
            values = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
        else:
            values = [field.parts[i].tolist()[0] for i in field.data]
        writer.add_array(name, values)
    elif kind == gguf.GGUFValueType.STRING:
        writer.add_string(name, bytes(field.parts[field.data[0]]).decode("utf-8", "surrogateescape"))
    else:
        writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], kind)


def prompt_ids(length: int, vocab: int) -> list:
    rng = np.random.default_rng(0)
    return rng.integers(100, min(vocab, 20000), size=length).tolist()


def bench_llamacpp(path, ids, args):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=len(ids) + args.tokens + 1, n_batch=len(ids), verbose=False)

    def last_argmax():  # the logits of the last token evaluated (Llama.scores keeps only n_batch rows)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                   shape=(llm.n_vocab(),))))

    prefill, decode = [], []
    for _ in range(args.reps):
        llm.reset()
        start = now()
        llm.eval(ids)
        prefill.append(now() - start)
        token = last_argmax()
        start = now()
        for _ in range(args.tokens):
            llm.eval([token])
            token = last_argmax()
        decode.append((now() - start) / args.tokens)
    return min(prefill) * 1e3, min(decode) * 1e3


def bench_rtllm(path, ids, args, dtype="auto", quant_config=None):
    from rtllm import LLM, SamplingParams

    # no prefix caching: each repetition prefills the prompt again, as llama.cpp's reset() makes it do
    with LLM(model=path, dtype=dtype, device="cpu", num_threads=args.threads, max_seq_len=len(ids) + args.tokens + 1,
             max_batch_size=1, enable_prefix_caching=False, quant_config=quant_config) as llm:
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        many = SamplingParams(max_tokens=args.tokens + 1, temperature=0.0, ignore_eos=True)
        llm.generate({"prompt_token_ids": ids}, one, use_tqdm=False)  # warm-up
        prefill, total = [], []
        for _ in range(args.reps):
            start = now()
            llm.generate({"prompt_token_ids": ids}, one, use_tqdm=False)
            prefill.append(now() - start)
            start = now()
            llm.generate({"prompt_token_ids": ids}, many, use_tqdm=False)
            total.append(now() - start)
    best_prefill = min(prefill)
    return best_prefill * 1e3, (min(total) - best_prefill) / args.tokens * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--checkpoint", help="the HF checkpoint of the same model, for rtllm's own W8A16 / W4A16")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    source = args.gguf
    if source is None:
        from smollm2 import gguf_path
        source = gguf_path()
    checkpoint = args.checkpoint
    if checkpoint is None and args.gguf is None:
        from smollm2 import checkpoint_dir
        checkpoint = checkpoint_dir()
    from rtllm import QuantAlgo, QuantConfig
    own = {"Q8_0": ("rtllm W8A16", QuantConfig(quant_algo=QuantAlgo.W8A16)),
           "Q4_1": ("rtllm W4A16 g64", QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=64, has_zero_point=True))}
    try:
        import llama_cpp  # noqa: F401
        have_llamacpp = True
    except ImportError:
        have_llamacpp = False
        print("llama-cpp-python is not installed: rtllm rows only", file=sys.stderr)

    import gguf
    vocab = len(gguf.GGUFReader(source).fields["tokenizer.ggml.tokens"].data)
    ids = prompt_ids(args.prompt_len, vocab)
    results = {"gguf": source, "threads": args.threads, "prompt_len": args.prompt_len, "tokens": args.tokens,
               "formats": {}}
    rows = []
    for fmt in args.formats:
        path = derive_gguf(source, fmt)
        entry = {}
        # F16: rtllm's float16 engine (its norms in float16 too; llama.cpp keeps those in float32), and a
        # bfloat16 engine from the same file, the 16-bit format rtllm's CPU linear runs on AMX by default.
        dtype = "float16" if fmt == "F16" else "auto"
        engines = [("rtllm", lambda *a: bench_rtllm(*a, dtype=dtype))] + \
            ([("rtllm bf16", lambda *a: bench_rtllm(*a, dtype="bfloat16"))] if fmt == "F16" else []) + \
            ([(own[fmt][0], lambda _, *a, q=own[fmt][1]: bench_rtllm(checkpoint, *a, dtype="bfloat16", quant_config=q))]
             if fmt in own and checkpoint else []) + \
            ([("llama.cpp", bench_llamacpp)] if have_llamacpp else [])
        for engine, bench in engines:
            prefill_ms, decode_ms = bench(path, ids, args)
            entry[engine] = {"prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms}
            rows.append({"format": fmt, "engine": engine, "prefill ms": prefill_ms, "decode ms/token": decode_ms})
        if have_llamacpp:
            peer = entry["llama.cpp"]
            for engine, prefix in (("rtllm", ""), ("rtllm bf16", "bf16_"), ("rtllm W8A16", "own_"),
                                   ("rtllm W4A16 g64", "own_")):
                if engine in entry:
                    ours = entry[engine]
                    entry[prefix + "decode_speedup"] = peer["decode_ms_per_token"] / ours["decode_ms_per_token"]
                    entry[prefix + "prefill_speedup"] = peer["prefill_ms"] / ours["prefill_ms"]
        results["formats"][fmt] = entry
    report(results, rows, ["format", "engine", "prefill ms", "decode ms/token"], args.output)


if __name__ == "__main__":
    main()
