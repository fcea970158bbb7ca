"""The CPU sampler (rtllm::Sampler, what the CPU runtime draws with) on one row of logits, per sampling
setting: microseconds per draw, median over --reps rounds of --draws draws (each draw a new step, so a
new uniform number), and a hash of the drawn ids, equal between two builds that draw the same tokens.

A small C++ program is compiled against the installed rtllm (its headers and librtllm.so), so the times
are the sampler's own, without Python in the loop. Logits: randn · scale (0.05: the flat rows of a
random-weight model; 2.5 and 6: a trained model's spread, most of the vocabulary far below the top).

Usage: python benchmarks/bench_cpu_sampling.py [--vocab 49152] [--reps 5] [--draws 100] [--output results.json]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import rtllm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import report  # noqa: E402

# name: (temperature, top_k, top_p, min_p)
SETTINGS = {"greedy": (0.0, 0, 1.0, 0.0), "temperature 0.8": (0.8, 0, 1.0, 0.0), "top-k 50": (0.8, 50, 1.0, 0.0),
            "top-p 0.95": (0.8, 0, 0.95, 0.0), "top-p 0.9": (0.8, 0, 0.9, 0.0),
            "top-k 50 + top-p 0.95": (0.8, 50, 0.95, 0.0), "min-p 0.05": (0.8, 0, 1.0, 0.05)}
SCALES = [0.05, 2.5, 6.0]

PROGRAM = r"""
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "rtllm/sampler.h"
// argv: logits file (float32), vocab, temperature, top_k, top_p, min_p, draws; prints us per draw and a hash
int main(int argc, char** argv) {
  const int vocab = std::atoi(argv[2]);
  std::vector<float> logits(vocab);
  FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(logits.data(), 4, vocab, f) != static_cast<size_t>(vocab)) return 1;
  std::fclose(f);
  rtllm::SamplingConfig config;
  config.temperature = std::atof(argv[3]);
  config.top_k = std::atoi(argv[4]);
  config.top_p = std::atof(argv[5]);
  config.min_p = std::atof(argv[6]);
  const int draws = std::atoi(argv[7]);
  rtllm::SamplingInput input;
  input.config = &config;
  input.seed = 7;
  rtllm::Sampler sampler;
  unsigned long long hash = 0;
  input.step = draws;  // one untimed draw (a step not timed) sizes the sampler's buffers
  sampler.sample_one(logits.data(), vocab, input);
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < draws; ++step) {
    input.step = step;
    hash = hash * 1000003u + static_cast<unsigned>(sampler.sample_one(logits.data(), vocab, input).token_id);
  }
  const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
  std::printf("%.3f %016llx\n", us / draws, hash);
  return 0;
}
"""


def build(work: str) -> str:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise SystemExit("a C++ compiler is needed to build the sampling benchmark")
    source, binary = os.path.join(work, "bench.cc"), os.path.join(work, "bench")
    with open(source, "w") as f:
        f.write(PROGRAM)
    lib = rtllm.lib_dir()
    subprocess.run([compiler, "-std=c++17", "-O2", f"-I{rtllm.include_dir()}", source, "-o", binary, f"-L{lib}",
                    "-lrtllm", f"-Wl,-rpath,{lib}"], check=True)
    return binary


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152, help="row length (default: SmolLM2's vocabulary)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--output", help="also write the JSON here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        binary = build(work)
        for scale in SCALES:
            path = os.path.join(work, f"logits_{scale}.bin")
            (np.random.default_rng(1).standard_normal(args.vocab) * scale).astype(np.float32).tofile(path)
            for name, (t, k, top_p, min_p) in SETTINGS.items():
                times, hashes = [], set()
                for _ in range(args.reps):
                    out = subprocess.run([binary, path, str(args.vocab), str(t), str(k), str(top_p), str(min_p),
                                          str(args.draws)], check=True, capture_output=True, text=True).stdout.split()
                    times.append(float(out[0]))
                    hashes.add(out[1])
                rows.append(dict(scale=scale, setting=name, us_per_draw=float(np.median(times)),
                                 ids_hash=" ".join(sorted(hashes))))
    report({"vocab": args.vocab, "rows": rows}, rows, ["scale", "setting", "us_per_draw", "ids_hash"], args.output)


if __name__ == "__main__":
    main()
