"""The CPU Sampler's exact rules (integer masses, id-order draw) against independent references.

A small C++ program, built here against the installed library and the header-only
rtllm/kernels/sampling_math.h, exposes the shared float32 exp and Sampler::sample; the references are
sampling_reference.py (exact rules re-derived in numpy / Python integers) and float64 distributions.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest

import rtllm

from sampling_reference import F32, MASS_BITS, float64_distribution, prob_exp, reference_token

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HARNESS = r"""
#include <cstdio>
#include <cstring>
#include <vector>

#include "rtllm/kernels/sampling_math.h"
#include "rtllm/sampler.h"

struct Row {
  float temperature;
  int32_t top_k;
  float top_p;
  float min_p;
  uint64_t seed;
  int64_t step;
};

int main(int argc, char** argv) {
  FILE* in = std::fopen(argv[2], "rb");
  FILE* out = std::fopen(argv[3], "wb");
  int32_t header[2];
  if (std::fread(header, sizeof(header), 1, in) != 1) return 1;
  if (std::strcmp(argv[1], "exp") == 0) {  // header: count, unused; then count float32
    std::vector<float> x(header[0]);
    if (std::fread(x.data(), 4, x.size(), in) != x.size()) return 1;
    for (float& v : x) v = rtllm::sampling::prob_exp(v);
    std::fwrite(x.data(), 4, x.size(), out);
  } else if (std::strcmp(argv[1], "mass") == 0) {  // header: count, unused; then count float32
    std::vector<float> x(header[0]);
    if (std::fread(x.data(), 4, x.size(), in) != x.size()) return 1;
    std::vector<uint64_t> m(x.size());
    for (size_t i = 0; i < x.size(); ++i) m[i] = rtllm::sampling::exponent_mass(x[i]);
    std::fwrite(m.data(), 8, m.size(), out);
  } else {  // header: rows, vocab; then per row a Row and vocab float32 logits
    const int32_t num_rows = header[0], vocab = header[1];
    std::vector<Row> rows(num_rows);
    std::vector<float> logits(static_cast<size_t>(num_rows) * vocab);
    for (int32_t r = 0; r < num_rows; ++r)
      if (std::fread(&rows[r], sizeof(Row), 1, in) != 1 ||
          std::fread(logits.data() + static_cast<size_t>(r) * vocab, 4, vocab, in) != static_cast<size_t>(vocab))
        return 1;
    std::vector<rtllm::SamplingConfig> configs(num_rows);
    std::vector<rtllm::SamplingInput> inputs(num_rows);
    for (int32_t r = 0; r < num_rows; ++r) {
      configs[r].temperature = rows[r].temperature;
      configs[r].top_k = rows[r].top_k;
      configs[r].top_p = rows[r].top_p;
      configs[r].min_p = rows[r].min_p;
      inputs[r].config = &configs[r];
      inputs[r].seed = rows[r].seed;
      inputs[r].step = rows[r].step;
    }
    rtllm::Sampler sampler;
    std::vector<rtllm::SampledToken> tokens;
    sampler.sample(logits.data(), vocab, inputs, &tokens);
    for (const auto& t : tokens) std::fwrite(&t.token_id, 4, 1, out);
  }
  std::fclose(out);
  return 0;
}
"""

ROW = np.dtype([("temperature", "<f4"), ("top_k", "<i4"), ("top_p", "<f4"), ("min_p", "<f4"), ("seed", "<u8"),
                ("step", "<i8")])


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler, "a C++ compiler is needed to build the sampler harness"
    work = tmp_path_factory.mktemp("harness")
    source = work / "harness.cc"
    source.write_text(HARNESS)
    binary = work / "harness"
    lib = rtllm.lib_dir()
    result = subprocess.run([compiler, "-std=c++17", "-O2", f"-I{rtllm.include_dir()}",
                             f"-I{os.path.join(REPO, 'kernels', 'include')}", str(source), "-o", str(binary),
                             f"-L{lib}", "-lrtllm", f"-Wl,-rpath,{lib}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]

    def run(mode, header, payload):
        src, dst = work / "in.bin", work / "out.bin"
        src.write_bytes(np.asarray(header, np.int32).tobytes() + payload)
        subprocess.run([str(binary), mode, str(src), str(dst)], check=True)
        return dst.read_bytes()

    return run


def cpp_prob_exp(harness, x):
    x = np.ascontiguousarray(x, F32)
    return np.frombuffer(harness("exp", [len(x), 0], x.tobytes()), F32)


def cpp_exponent_mass(harness, x):
    x = np.ascontiguousarray(x, F32)
    return np.frombuffer(harness("mass", [len(x), 0], x.tobytes()), np.uint64)


def cpp_sample(harness, logits, rows):
    """Sampler::sample over rows of float32 logits [R, V]; rows: dicts of ROW fields."""
    logits = np.ascontiguousarray(logits, F32)
    num_rows, vocab = logits.shape
    payload = b""
    defaults = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0)
    for r in range(num_rows):
        rec = np.zeros(1, ROW)
        for k, v in {**defaults, **rows[r]}.items():
            rec[k] = v
        payload += rec.tobytes() + logits[r].tobytes()
    return np.frombuffer(harness("sample", [num_rows, vocab], payload), np.int32)


def test_prob_exp_matches_float64_exp_and_the_reference_emulation(harness):
    rng = np.random.default_rng()
    x = np.concatenate([-rng.random(200000, dtype=np.float64) * 24, -rng.random(20000) * 1e-3,
                        -np.arange(0, 25, 0.5), [0.0, -24.0, -24.000002, -30.0, -np.inf]]).astype(F32)
    got = cpp_prob_exp(harness, x)
    assert np.array_equal(got.view(np.uint32), prob_exp(x).view(np.uint32)), "C++ and the numpy emulation differ"
    live = x >= -24
    exact = np.exp(x[live].astype(np.float64))
    rel = np.abs(got[live].astype(np.float64) - exact) / exact
    assert rel.max() < 2e-7, f"max relative error {rel.max():.3g}"
    assert (got[~live] == 0).all()
    assert got[x == 0][0] == 1.0  # the maximum weighs exactly 2^33


def test_exponent_mass_is_the_floor_of_prob_exp_times_2_to_the_33(harness):
    # exponent_mass folds the 2^33 into prob_exp's power of two: it must give mass_of(prob_exp(x)) exactly.
    rng = np.random.default_rng()
    x = np.concatenate([-rng.random(200000, dtype=np.float64) * 25, -rng.random(20000) * 1e-3,
                        -np.arange(0, 25, 0.25), [0.0, -0.0, -22.9, -23.0, -24.0, -24.000002, -30.0, -np.inf,
                                                  np.nan]]).astype(F32)
    got = cpp_exponent_mass(harness, x)
    with np.errstate(invalid="ignore"):
        p = prob_exp(np.where(np.isnan(x), F32(-np.inf), x)).astype(np.float64)
    want = np.floor(p * 2.0 ** MASS_BITS).astype(np.uint64)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"x = {x[bad[:5]]}: {got[bad[:5]]} against {want[bad[:5]]}"
    assert got[x == 0].max() == 2 ** MASS_BITS and got[x < -24].max() == 0


# (temperature, top_k, top_p, min_p)
CONFIGS = [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
           (0.7, 5, 0.8, 0.0), (1.3, 0, 0.9, 0.1), (1.3, 8, 0.95, 0.05), (1.0, 1, 1.0, 0.0),
           (1.0, 0, 1e-6, 0.0), (1.0, 0, 0.99999994, 0.0), (1.0, 10**6, 0.5, 0.0), (0.5, 0, 1.0, 1.0),
           (2.0, 3, 1e-6, 0.9), (1e-40, 0, 1.0, 0.0), (1e30, 0, 0.9, 0.0),
           (1.0, 100, 1.0, 0.0), (0.7, 150, 0.9, 0.05)]  # top-k past an eighth of the vocabulary: a linear select


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0], ids=["flat", "normal", "peaked"])
def test_sampler_decisions_equal_the_exact_rules(harness, scale):
    rng = np.random.default_rng()
    vocab, per_config = 301, 40
    rows, logits = [], []
    for t, k, p, m in CONFIGS:
        for _ in range(per_config):
            row = (rng.standard_normal(vocab) * scale).astype(F32)
            if rng.random() < 0.3:  # runs of equal logits, so the cuts fall inside ties
                row = np.round(row * 4) / 4
            if rng.random() < 0.2:
                row[rng.choice(vocab, 50, replace=False)] = -np.inf
            logits.append(row)
            rows.append(dict(temperature=t, top_k=k, top_p=p, min_p=m, seed=int(rng.integers(2**63)),
                             step=int(rng.integers(1000))))
    got = cpp_sample(harness, np.stack(logits), rows)
    for r, row in enumerate(rows):
        want = reference_token(logits[r], row["temperature"], row["seed"], row["step"], row["top_k"], row["top_p"],
                               row["min_p"])
        assert got[r] == want, (r, row)


def test_ties_top_p_extremes_and_all_masked(harness):
    vocab = 64
    tied = np.zeros(vocab, F32)
    tied[::3] = 1.0  # 22 tied leaders, the rest tied below
    masked = np.full(vocab, -np.inf, F32)
    one = masked.copy()
    one[17] = -5.0
    pair = masked.copy()
    pair[[7, 40]] = 0.5  # two equal masses: top_p 0.5's threshold is exactly the first one's
    cases = [(tied, dict(top_k=5)), (tied, dict(top_p=0.3)), (tied, dict(top_k=30, top_p=0.9)),
             (tied, dict(top_p=1e-6)), (tied, dict(top_k=1000)), (one, dict(top_p=0.5)), (one, dict()),
             (pair, dict(top_p=0.5))]
    for logits, settings in cases:
        rows = [dict(settings, seed=s, step=3) for s in range(60)]
        got = cpp_sample(harness, np.tile(logits, (60, 1)), rows)
        want = [reference_token(logits, 1.0, s, 3, settings.get("top_k", 0), settings.get("top_p", 1.0))
                for s in range(60)]
        assert got.tolist() == want, settings
    # Tie semantics from first principles: top_k=5 of 22 tied leaders keeps the 5 lowest ids.
    got = cpp_sample(harness, np.tile(tied, (400, 1)), [dict(top_k=5, seed=s) for s in range(400)])
    assert set(got.tolist()) == {0, 3, 6, 9, 12}
    got = cpp_sample(harness, np.tile(tied, (100, 1)), [dict(top_p=1e-6, seed=s) for s in range(100)])
    assert set(got.tolist()) == {0}
    # A prefix whose mass equals the threshold reaches it: the first of the pair alone is kept.
    got = cpp_sample(harness, np.tile(pair, (100, 1)), [dict(top_p=0.5, seed=s) for s in range(100)])
    assert set(got.tolist()) == {7}
    assert cpp_sample(harness, masked[None], [dict()]).tolist() == [-1]
    assert cpp_sample(harness, one[None], [dict(top_k=3, top_p=0.1, min_p=0.9)]).tolist() == [17]


@pytest.mark.parametrize("config", CONFIGS[:9], ids=[str(c) for c in CONFIGS[:9]])
def test_frequencies_match_the_float64_distribution(harness, config):
    t, k, p, m = config
    rng = np.random.default_rng()
    vocab, num = 24, 20000
    logits = (rng.standard_normal(vocab) * 1.5).astype(F32)
    ids = cpp_sample(harness, np.tile(logits, (num, 1)),
                     [dict(temperature=t, top_k=k, top_p=p, min_p=m, seed=int(s), step=int(s) % 7)
                      for s in rng.integers(0, 2**63, num)])
    expected = float64_distribution(logits, t, k, p, m)
    counts = np.bincount(ids, minlength=vocab)
    # The kept set can differ from float64's only for a token at a boundary within float32 rounding.
    before_top_p = float64_distribution(logits, t, k)
    boundary = p < 1 and np.abs(np.cumsum(np.sort(before_top_p)[::-1]) - p).min() < 1e-5
    if not boundary:
        assert counts[expected == 0].sum() == 0, "sampled a token the settings exclude"
    live = expected > 0
    chi2 = (((counts[live] - num * expected[live]) ** 2) / (num * expected[live])).sum()
    dof = max(int(live.sum()) - 1, 1)
    assert chi2 < dof + 6 * np.sqrt(2 * dof) + 10, f"chi-square {chi2:.1f} with {dof} degrees of freedom"
