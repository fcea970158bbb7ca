"""One configuration of the device sampler, launched a few times, for a kernel profiler to read (the
kernel benchmark runs many configurations; this runs one):

  ncu --kernel-name regex:sample_kernel --launch-skip 2 --launch-count 1 --set full --import-source yes \
      -o sample python benchmarks/profile_sampling.py --batch 256 --temperature 0.8 --top-p 0.95

Logits: randn · --scale (0.05: a random-weight model's flat rows; 4: peaked), --bf16 rounds them to
bfloat16 (tied runs, as a bf16 LM head gives). Prints the mean time of the calls after the first.
"""
import argparse

import torch

from bench_kernels import load_kernels, params_array


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="of the rows (the same rows in every process)")
    args = p.parse_args()
    kernels = load_kernels()
    torch.manual_seed(args.seed)
    logits = torch.randn(args.batch, args.vocab, device="cuda") * args.scale
    if args.bf16:
        logits = logits.to(torch.bfloat16).float()
    settings = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    params = params_array(kernels, [dict(settings, seed=i) for i in range(args.batch)])
    ids = torch.empty(args.batch, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream()
    times = []
    for _ in range(args.calls):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernels.sample(ids.data_ptr(), 0, 0, logits.data_ptr(), params.data_ptr(), num_seqs=args.batch,
                       vocab_size=args.vocab, max_top=0, stream=stream.cuda_stream)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    mean = sum(times[1:]) / max(len(times) - 1, 1)
    print(f"sample {args.batch}x{args.vocab} {settings} scale {args.scale}{' bf16' if args.bf16 else ''}: "
          f"{mean:.1f} us per call (mean of {len(times) - 1} after the first)")


if __name__ == "__main__":
    main()
