"""Trains rtllm's demo model: a small Llama on the Python standard library's own source, on the CPU.

    nice -n 10 python examples/train_demo_model.py                 # 25-minute budget, writes the package's copy
    python examples/train_demo_model.py --time-budget-min 2 -o /tmp/demo

The whole run (tokenizer, training, final evaluation, saving) fits in --time-budget-min: the learning
rate warms up, then follows a cosine decay over the training time left after the tokenizer, so the
run ends with a fully decayed rate whatever the machine's speed. --steps N fixes the schedule to N
steps instead (the same run, step for step, on any machine). Needs torch and transformers (training
only: rtllm itself never imports them). Output: an HF checkpoint (config.json, model.safetensors in
bfloat16, generation_config.json, tokenizer.json, tokenizer_config.json) and train_log.txt.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

BOS, EOS = "<s>", "</s>"  # ids 0 and 1
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Modules held out of the tokenizer and of training: the validation set (stable across Python 3.x).
VALIDATION_MODULES = ("textwrap.py", "fractions.py", "shlex.py", "heapq.py", "sched.py")
# Tests, site-packages (differs per machine), generated tables (codecs, pydoc topics, build config).
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                 "encodings", "pydoc_data", "lib-dynload"}
MAX_FILE_BYTES = 300_000
SAMPLE_PROMPTS = ("def fibonacci(n):", "import os\n", "class Foo:")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--output", default=os.path.join(REPO, "python", "rtllm", "demo_model"))
    p.add_argument("--time-budget-min", type=float, default=25.0, help="wall-clock budget of the whole run")
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps (overrides the time budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=704)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final rate / peak rate")
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast for matmuls, float32 master weights (default on: 1.6x faster on CPU)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=32, help="validation windows in periodic evaluations")
    return p.parse_args(argv)


class Log:
    def __init__(self, path: str):
        self.file = open(path, "w", encoding="utf-8")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def stdlib_sources() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, validation) lists of (path relative to the stdlib, text), in a fixed order."""
    root = os.path.dirname(os.__file__)
    train, validation = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if (not name.endswith(".py") or name.startswith("_sysconfigdata")
                    or os.path.getsize(path) > MAX_FILE_BYTES):
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            rel = os.path.relpath(path, root)
            (validation if rel in VALIDATION_MODULES else train).append((rel, text))
    return train, validation


def train_tokenizer(texts: list[str], vocab_size: int, max_len: int) -> tuple[Tokenizer, dict]:
    """Byte-level BPE with <s> (0) and </s> (1); encoding a text prepends <s>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0), (EOS, 1)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "chat_template": CHAT_TEMPLATE, "model_max_length": max_len}
    return tokenizer, config


def token_stream(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Every text as <s> text </s>, concatenated: [num_tokens] int64."""
    ids = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += [0, *encoding.ids, 1]
    return torch.tensor(ids, dtype=torch.long)


def make_model(args) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads, head_dim=args.hidden_size // args.num_heads,
        max_position_embeddings=args.seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config)


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and the (tied) embedding
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm weights
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(args, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    warmup = min(1.0, (step + 1) / args.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warmup * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """batch_size windows of seq_len + 1 tokens at random offsets: [B, seq_len + 1]."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def windows(stream: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens (each window's last token starts the next)."""
    n = (len(stream) - 1) // seq_len
    if limit is not None:
        n = min(n, limit)
    return torch.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])


def loss_of(model, batch: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch[:, :-1]).logits  # [B, S, V]
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, data: torch.Tensor, bf16: bool, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the windows in data."""
    model.eval()
    total = 0.0
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        total += loss_of(model, chunk, bf16).item() * len(chunk)
    model.train()
    return total / len(data)


@torch.no_grad()
def greedy_sample(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=1)
    model.train()
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.time_budget_min * 60
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    log = Log(os.path.join(args.output, "train_log.txt"))
    log(f"rtllm demo model training: {' '.join(sys.argv)}")
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {args.threads}, "
        f"args {json.dumps(vars(args))}")

    train_files, val_files = stdlib_sources()
    train_texts, val_texts = [t for _, t in train_files], [t for _, t in val_files]
    log(f"data: {os.path.dirname(os.__file__)}: {len(train_files)} train files "
        f"({sum(map(len, train_texts)) / 1e6:.2f} M chars), validation {[p for p, _ in val_files]} "
        f"({sum(map(len, val_texts)) / 1e3:.0f} k chars)")
    tokenizer, tokenizer_config = train_tokenizer(train_texts, args.vocab_size, args.seq_len)
    train_stream, val_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, val_texts)
    log(f"tokenizer: byte-level BPE, vocab {tokenizer.get_vocab_size()}; train {len(train_stream)} tokens "
        f"({sum(map(len, train_texts)) / len(train_stream):.2f} chars/token), validation {len(val_stream)} "
        f"tokens; {time.time() - t0:.0f} s")

    model = make_model(args)
    num_params = sum(p.numel() for p in model.parameters())
    num_embedding = model.model.embed_tokens.weight.numel()
    log(f"model: Llama, {args.num_layers} layers, hidden {args.hidden_size}, heads {args.num_heads} "
        f"(kv {args.num_kv_heads}), intermediate {args.intermediate_size}, context {args.seq_len}, tied "
        f"embeddings: {num_params / 1e6:.2f} M parameters ({num_embedding / 1e6:.2f} M in the embedding)")
    optimizer = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    val_data = windows(val_stream, args.seq_len)
    # A fixed train subset of the validation set's size, to compare the two losses on equal terms.
    train_eval = sample_batch(train_stream, len(val_data), args.seq_len, torch.Generator().manual_seed(args.seed + 1))

    # Training gets what is left of the budget after a reserve for the final evaluation and saving.
    loop_start = time.time()
    reserve = 5 + 0.2 * (loop_start - t0) + 2 * len(val_data) * args.seq_len / 20_000
    loop_seconds = deadline - reserve - loop_start
    log(f"training: {args.batch_size} x {args.seq_len} tokens per step, AdamW (0.9, 0.95) wd "
        f"{args.weight_decay}, peak lr {args.lr}, warmup {args.warmup_steps} steps, cosine to "
        f"{args.lr * args.min_lr_ratio:g} over " + (f"{args.steps} steps" if args.steps else f"{loop_seconds:.0f} s"))
    step, tokens_seen, interval_loss, interval_steps = 0, 0, 0.0, 0
    model.train()
    while True:
        elapsed = time.time() - loop_start
        progress = step / args.steps if args.steps else elapsed / loop_seconds
        if progress >= 1.0:
            break
        lr = learning_rate(args, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_of(model, sample_batch(train_stream, args.batch_size, args.seq_len, gen), args.bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += args.batch_size * args.seq_len
        interval_loss, interval_steps = interval_loss + loss.item(), interval_steps + 1
        if step % args.log_every == 0:
            log(f"step {step:5d}  loss {interval_loss / interval_steps:.4f}  lr {lr:.2e}  tokens "
                f"{tokens_seen / 1e6:.2f} M  {time.time() - t0:6.0f} s  "
                f"{tokens_seen / (time.time() - loop_start):.0f} tok/s")
            interval_loss, interval_steps = 0.0, 0
        if step % args.eval_every == 0:
            log(f"step {step:5d}  val loss {evaluate(model, val_data[:args.eval_windows], args.bf16):.4f} "
                f"(first {min(args.eval_windows, len(val_data))} windows)")

    train_loss, val_loss = evaluate(model, train_eval, args.bf16), evaluate(model, val_data, args.bf16)
    log(f"done: {step} steps, {tokens_seen / 1e6:.2f} M tokens ({tokens_seen / len(train_stream):.2f} epochs), "
        f"{time.time() - t0:.0f} s")
    log(f"final (float32 weights, {len(val_data)} windows of {args.seq_len}): train loss {train_loss:.4f} "
        f"(ppl {math.exp(train_loss):.2f}), validation loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}); "
        f"uniform ln({args.vocab_size}) = {math.log(args.vocab_size):.4f}")

    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(args.output, safe_serialization=True)
    tokenizer.save(os.path.join(args.output, "tokenizer.json"))
    with open(os.path.join(args.output, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    for name in os.listdir(args.output):  # save_pretrained leaves model.safetensors private (0600)
        os.chmod(os.path.join(args.output, name), 0o644)
    model = model.float()  # the bfloat16 weights, upcast: what rtllm and the tests run
    log(f"saved (bfloat16): validation loss {evaluate(model, val_data, False):.4f}")
    for prompt in SAMPLE_PROMPTS:
        log(f"greedy sample: {prompt!r} -> {greedy_sample(model, tokenizer, prompt)!r}")
    log(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
