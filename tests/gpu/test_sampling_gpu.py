"""The device sampler against the CPU Sampler (same seed and step -> same token, always: both use the
integer-mass rules of kernels/include/rtllm/kernels/sampling.cuh) and against independent references:
the exact rules re-derived in numpy (tests/python/sampling_reference.py) and float64 distributions.
Outputs are poisoned (NaN bytes) before every call, so a row the kernel skips shows.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from sampling_reference import float64_distribution, reference_token  # noqa: E402

POISON = 0x7FC00000  # the bytes of a float32 NaN, as an int32 id


def params_array(kernels, rows):
    """Packs dicts of SamplingParamsDevice fields into device memory with the C++ layout."""
    off = kernels.SAMPLING_PARAMS_OFFSETS
    fields = {"temperature": np.float32, "top_p": np.float32, "min_p": np.float32, "repetition_penalty": np.float32,
              "presence_penalty": np.float32, "frequency_penalty": np.float32, "top_k": np.int32,
              "num_logprobs": np.int32, "seed": np.uint64, "step": np.int64}
    dt = np.dtype({"names": list(fields), "formats": list(fields.values()), "offsets": [off[n] for n in fields],
                   "itemsize": kernels.SAMPLING_PARAMS_SIZE})
    arr = np.zeros(len(rows), dtype=dt)
    defaults = dict(temperature=1.0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                    frequency_penalty=0.0, top_k=0, num_logprobs=-1, seed=0, step=0)
    for i, r in enumerate(rows):
        for k, v in {**defaults, **r}.items():
            arr[i][k] = v
    return torch.from_numpy(arr.view(np.uint8).copy()).cuda()


def csr(lists):
    offsets = np.zeros(len(lists) + 1, np.int32)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    ids = np.concatenate([np.asarray(x, np.int32) for x in lists] + [np.zeros(1, np.int32)])
    return torch.from_numpy(ids).cuda(), torch.from_numpy(offsets).cuda()


def gpu_sample(kernels, logits, rows, prompt=None, output=None, masked=None, max_top=0, bias=None, bitmask=None):
    """logits: [S, V] float32 cuda; bias: a {token id: bias} dict per sequence; bitmask: [S, ceil(V / 32)]
    uint32 numpy. Returns ids, logprobs [S, 1 + max_top], top ids [S, max_top] (numpy)."""
    num_seqs, vocab = logits.shape
    params = params_array(kernels, rows)
    ids = torch.full((num_seqs,), POISON, dtype=torch.int32, device="cuda")
    logprobs = torch.full((num_seqs, 1 + max_top), POISON, dtype=torch.int32, device="cuda").view(torch.float32)
    top_ids = torch.full((num_seqs, max(max_top, 1)), POISON, dtype=torch.int32, device="cuda")
    lists, keep = {}, []
    for name, value in [("prompt", prompt), ("output", output), ("masked", masked)]:
        if value is not None:
            t_ids, t_off = csr(value)
            keep += [t_ids, t_off]
            lists[f"{name}_ids"], lists[f"{name}_offsets"] = t_ids.data_ptr(), t_off.data_ptr()
    if bias is not None:
        t_ids, t_off = csr([sorted(b) for b in bias])  # the kernel wants each sequence's ids ascending
        values = torch.tensor([b[t] for b in bias for t in sorted(b)] + [0.0], dtype=torch.float32, device="cuda")
        keep += [t_ids, t_off, values]
        lists.update(bias_ids=t_ids.data_ptr(), bias_offsets=t_off.data_ptr(), bias_values=values.data_ptr())
    if bitmask is not None:
        t_mask = torch.from_numpy(np.ascontiguousarray(bitmask, np.uint32).view(np.int32)).cuda()
        keep.append(t_mask)
        lists["allowed_bitmask"] = t_mask.data_ptr()
    workspace = torch.empty(kernels.sample_workspace_bytes(num_seqs, vocab), dtype=torch.uint8, device="cuda")
    kernels.sample(ids.data_ptr(), logprobs.data_ptr(), top_ids.data_ptr(), logits.data_ptr(), params.data_ptr(),
                   num_seqs=num_seqs, vocab_size=vocab, max_top=max_top, workspace=workspace.data_ptr(),
                   stream=torch.cuda.current_stream().cuda_stream, **lists)
    torch.cuda.synchronize()
    return ids.cpu().numpy(), logprobs.cpu().numpy(), top_ids.cpu().numpy()


def cpu_token(kernels, logits, row, prompt=(), output=(), masked=(), logit_bias=None):
    """The CPU Sampler's token for one row (settings as in `row`)."""
    return kernels.cpu_sample(np.ascontiguousarray(logits, np.float32), row.get("temperature", 1.0),
                              row.get("top_k", 0), row.get("top_p", 1.0), row.get("min_p", 0.0),
                              row.get("repetition_penalty", 1.0), row.get("presence_penalty", 0.0),
                              row.get("frequency_penalty", 0.0), int(row.get("seed", 0)), int(row.get("step", 0)),
                              list(prompt), list(output), list(masked), -1, logit_bias=logit_bias or {})[0]


def ref_token(logits, row):
    """The numpy reference of the rules (no penalties, bias or mask)."""
    return reference_token(logits, row.get("temperature", 1.0), int(row.get("seed", 0)), int(row.get("step", 0)),
                           row.get("top_k", 0), row.get("top_p", 1.0), row.get("min_p", 0.0))


def make_logits(rng, num, vocab, scale):
    """[num, vocab] float32: randn · scale; "bf16" rows are randn · 0.05 rounded to bfloat16 (a model's
    flat logits: long runs of equal values, so the top-k / top-p cuts fall inside ties)."""
    x = torch.from_numpy(rng.standard_normal((num, vocab)).astype(np.float32))
    if scale == "bf16":
        return (x * 0.05).to(torch.bfloat16).to(torch.float32).numpy()
    return (x * scale).numpy()


SETTINGS = [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.5, top_k=5),
            dict(temperature=1.0, top_p=0.7), dict(temperature=1.2, min_p=0.2),
            dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05), dict(temperature=0.7, top_k=1),
            dict(temperature=2.0, top_p=0.95), dict(temperature=0.8, top_p=0.95), dict(temperature=0.8, top_k=50),
            dict(temperature=1.0, top_p=1e-6), dict(temperature=1.0, top_p=0.99999994),
            dict(temperature=1.0, top_k=200000, top_p=0.5), dict(temperature=1.0, top_p=0.9, min_p=0.1),
            dict(temperature=0.0)]
SCALES = [1e-3, 0.05, "bf16", 1.0, 4.0]


@pytest.mark.parametrize("vocab", [1000, 32003, 128256])
@pytest.mark.parametrize("scale", SCALES, ids=[str(s) for s in SCALES])
@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_same_token_as_cpu_sampler_and_reference(kernels, vocab, scale, settings):
    rng = np.random.default_rng()
    num = 8 if vocab > 100000 else 48
    logits = make_logits(rng, num, vocab, scale)
    rows = [dict(settings, seed=int(s), step=int(t))
            for s, t in zip(rng.integers(0, 2**63, num, dtype=np.uint64), rng.integers(0, 1000, num))]
    ids, _, _ = gpu_sample(kernels, torch.from_numpy(logits).cuda(), rows)
    for i in range(num):
        assert ids[i] == cpu_token(kernels, logits[i], rows[i]), (i, rows[i])
    for i in range(2):  # the numpy reference is slow: a couple of rows
        assert ids[i] == ref_token(logits[i], rows[i]), (i, rows[i])


@pytest.mark.parametrize("num_seqs", [1, 3, 64, 257, 512])
def test_batches_of_mixed_rows_match_cpu_sampler(kernels, num_seqs):
    """Every batch size (cluster-split rows for small batches, one CTA per row for large ones), each row
    its own logits (flat or peaked) and settings."""
    rng = np.random.default_rng()
    vocab = 128256
    scales = [SCALES[i] for i in rng.integers(0, len(SCALES), num_seqs)]
    logits = np.concatenate([make_logits(rng, 1, vocab, sc) for sc in scales])
    rows = [dict(SETTINGS[int(rng.integers(len(SETTINGS)))], seed=int(rng.integers(2**63)), step=int(rng.integers(500)))
            for _ in range(num_seqs)]
    ids, _, _ = gpu_sample(kernels, torch.from_numpy(logits).cuda(), rows)
    for i in range(num_seqs):
        assert ids[i] == cpu_token(kernels, logits[i], rows[i]), (i, scales[i], rows[i])
    assert ids[0] == ref_token(logits[0], rows[0]), (scales[0], rows[0])


def grid_stress_logits(rng, kind, vocab):
    """One row (and its temperature) that drives the top-k / top-p selects down each path of the
    kernel's grid select: "dense" puts 100k logits within 0.008 of each other while two outliers
    stretch the row over x in [-23, 0] (the cut's bucket must be split twice before its elements fit in
    shared memory); "tied" is a run of 60k equal logits where the cut falls; "same_x" gives 100k
    distinct logits one x (a - max rounds to the same float), which no grid separates (the radix select
    takes over)."""
    logits = np.full(vocab, -1e4, np.float32)
    if kind == "dense":
        logits[:] = (rng.standard_normal(vocab) * 1e-3 - 5.0).astype(np.float32)
        logits[rng.choice(vocab, 2, replace=False)] = [0.0, -23.0]
        return logits, 1.0
    if kind == "tied":
        logits[:] = (rng.standard_normal(vocab) - 8.0).astype(np.float32)
        logits[rng.choice(vocab, 60000, replace=False)] = -3.0
        logits[rng.integers(vocab)] = 0.0
        return logits, 1.0
    assert kind == "same_x"
    logits[:] = (rng.standard_normal(vocab) * 1e-2).astype(np.float32)
    logits[rng.integers(vocab)] = 1e6
    return logits, 1e5  # x = -1e6 / 1e5 = -10 for every small logit


@pytest.mark.parametrize("kind", ["dense", "tied", "same_x"])
@pytest.mark.parametrize("num", [1, 140])
def test_grid_select_paths_match_cpu_sampler(kernels, kind, num):
    """Rows whose cuts need the grid's refinements, its tie rule or its fallback, one row per batch
    (clusters of CTAs) and 140 rows (a CTA per row): the same token as the CPU Sampler."""
    rng = np.random.default_rng()
    vocab = 128256
    settings = [dict(top_p=0.5), dict(top_k=5000), dict(top_k=70000, top_p=0.3), dict(top_p=0.999), dict(top_k=3)]
    rows, logits = [], []
    for s in range(num):
        row, temperature = grid_stress_logits(rng, kind, vocab)
        logits.append(row)
        rows.append(dict(settings[s % len(settings)], temperature=temperature, seed=int(rng.integers(2**63)),
                         step=int(rng.integers(500))))
    logits = np.stack(logits)
    ids, _, _ = gpu_sample(kernels, torch.from_numpy(logits).cuda(), rows)
    for s in range(num):
        assert ids[s] == cpu_token(kernels, logits[s], rows[s]), (s, rows[s])
    assert ids[0] == ref_token(logits[0], rows[0]), rows[0]


def test_tied_logits_follow_id_order(kernels):
    """Equal logits: ties are ordered by id; top-p / top-k cuts then fall inside the tie, and the kept
    ones are the lowest ids (checked from first principles, then against the CPU Sampler)."""
    vocab, num = 5003, 200
    logits = np.zeros(vocab, np.float32)
    logits[::7] = 1.0  # 715 tied leaders, the rest tied below
    for settings in [dict(top_p=0.5), dict(top_k=300), dict(top_k=800, top_p=0.9), dict(), dict(top_p=1e-6)]:
        rows = [dict(settings, seed=1000 + i, step=3) for i in range(num)]
        ids, _, _ = gpu_sample(kernels, torch.from_numpy(np.tile(logits, (num, 1))).cuda(), rows)
        for i in range(num):
            assert ids[i] == cpu_token(kernels, logits, rows[i]), (settings, i)
        if settings == dict(top_k=300):
            assert set(ids.tolist()) <= set(range(0, 7 * 300, 7))
        if settings == dict(top_p=1e-6):
            assert set(ids.tolist()) == {0}
    assert ids[0] == ref_token(logits, rows[0])


def test_greedy_is_argmax_lowest_id_on_ties(kernels):
    rng = np.random.default_rng(1)
    num, vocab = 16, 128256
    logits = rng.standard_normal((num, vocab)).astype(np.float32)
    for s in range(num):  # plant a tied maximum at two random ids
        a, b = sorted(rng.choice(vocab, 2, replace=False))
        logits[s, a] = logits[s, b] = 10.0 + s
    ids, _, _ = gpu_sample(kernels, torch.from_numpy(logits).cuda(), [dict(temperature=0.0)] * num)
    assert np.array_equal(ids, np.argmax(logits, axis=1))


def apply_penalties(logits, prompt, output, masked, rep, presence, frequency):
    x = logits.astype(np.float64).copy()
    seen = np.unique(np.concatenate([np.asarray(prompt, np.int64), np.asarray(output, np.int64)]))
    x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
    ids, counts = np.unique(np.asarray(output, np.int64), return_counts=True)
    x[ids] -= presence + frequency * counts
    x[np.asarray(masked, np.int64)] = -np.inf
    return x


def test_penalties_and_masks(kernels):
    rng = np.random.default_rng(5)
    num, vocab = 24, 4096
    logits = (rng.standard_normal((num, vocab)) * 2).astype(np.float32)
    prompt = [rng.integers(0, vocab, rng.integers(0, 300)).tolist() for _ in range(num)]
    output = [rng.integers(0, 200, rng.integers(0, 100)).tolist() for _ in range(num)]  # repeats
    masked = [np.argsort(-logits[s])[:3].tolist() if s % 2 else [] for s in range(num)]  # mask the top 3
    rows = [dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)] * num
    ids, _, _ = gpu_sample(kernels, torch.from_numpy(logits).cuda(), rows, prompt, output, masked)
    for s in range(num):
        ref = apply_penalties(logits[s], prompt[s], output[s], masked[s], 1.3, 0.5, 0.2)
        assert ids[s] == int(np.argmax(ref))
        assert ids[s] not in masked[s]
        cpu = kernels.cpu_sample(logits[s], 0.0, 0, 1.0, 0.0, 1.3, 0.5, 0.2, 0, 0, prompt[s], output[s], masked[s], -1)
        assert ids[s] == cpu[0]
    # Sampled (not greedy) with penalties: the same token as the CPU sampler.
    rows = [dict(temperature=1.0, top_p=0.9, repetition_penalty=1.2, presence_penalty=-0.4, frequency_penalty=0.3,
                 seed=77 + s, step=s) for s in range(num)]
    ids, _, _ = gpu_sample(kernels, torch.from_numpy(logits).cuda(), rows, prompt, output, masked)
    for s in range(num):
        assert ids[s] == cpu_token(kernels, logits[s], rows[s], prompt[s], output[s], masked[s]), s
        assert ids[s] not in masked[s]


def test_everything_masked_gives_minus_one(kernels):
    logits = torch.randn(2, 50, device="cuda")
    ids, _, _ = gpu_sample(kernels, logits, [dict(temperature=0.0), dict(temperature=1.0)],
                           masked=[list(range(50)), list(range(50))])
    assert ids.tolist() == [-1, -1]


@pytest.mark.parametrize("num, vocab", [(6, 32000), (1, 128256), (3, 128256), (70, 128256), (300, 1003)])
def test_logprobs_of_raw_logits(kernels, num, vocab):
    rng = np.random.default_rng()
    max_top = 8
    logits = (rng.standard_normal((num, vocab)) * 4).astype(np.float32)
    logits[0, 100] = logits[0, 50] = logits[0].max() + 1  # a tie among the top: lower id first
    num_logprobs = [[0, 1, 5, 8, 3, -1][s % 6] for s in range(num)]
    rows = [dict(temperature=[0.9, 0.0][s % 2], top_p=0.95, seed=s, num_logprobs=n, repetition_penalty=2.0)
            for s, n in enumerate(num_logprobs)]
    ids, lp, top = gpu_sample(kernels, torch.from_numpy(logits).cuda(), rows, prompt=[[1, 2, 3]] * num, max_top=max_top)
    for s in range(num):
        ref = torch.log_softmax(torch.from_numpy(logits[s]).double(), 0).numpy()
        assert ids[s] == cpu_token(kernels, logits[s], rows[s], prompt=[1, 2, 3]), s
        if num_logprobs[s] < 0:
            assert np.isnan(lp[s]).all() and (top[s] == POISON).all()  # row untouched
            continue
        assert abs(lp[s, 0] - ref[ids[s]]) <= 1e-5  # raw logprob, before the penalty
        order = np.lexsort((np.arange(vocab), -logits[s]))[: num_logprobs[s]]
        n = num_logprobs[s]
        assert top[s, :n].tolist() == order.tolist()
        assert np.allclose(lp[s, 1:1 + n], ref[order], atol=1e-5)
        assert (top[s, n:] == -1).all() and np.isneginf(lp[s, 1 + n:]).all()


@pytest.mark.parametrize("settings", SETTINGS[:6])
def test_token_frequencies_match_reference(kernels, settings):
    num, vocab = 20000, 64
    logits = (np.random.default_rng(3).standard_normal(vocab) * 2).astype(np.float32)
    rows = [dict(settings, seed=s, step=0) for s in range(num)]
    ids, _, _ = gpu_sample(kernels, torch.from_numpy(np.tile(logits, (num, 1))).cuda(), rows)
    counts = np.bincount(ids, minlength=vocab)
    expected = float64_distribution(logits, **settings)
    assert counts[expected == 0].sum() == 0, "sampled a token the settings exclude"
    # Five standard deviations of a binomial frequency, plus slack for float32 rounding.
    bound = 5 * np.sqrt(expected * (1 - expected) / num) + 1e-3
    assert np.all(np.abs(counts / num - expected) <= bound)


def bitmask_of(allowed, vocab):
    """[S, ceil(V / 32)] uint32 rows from boolean [S, V] rows (bit i % 32 of word i // 32 is token i)."""
    padded = np.zeros((allowed.shape[0], -(-vocab // 32) * 32), bool)
    padded[:, :vocab] = allowed
    bits = padded.reshape(allowed.shape[0], -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return bits.sum(axis=2).astype(np.uint32)


def test_logit_bias_and_bitmask_match_float64_reference(kernels):
    """Fresh random logits, penalties, biases and bitmasks each run (the seed is in the message):
    greedy ids are the argmax of the float64 stages 1-2, sampled ids the CPU Sampler's, never a
    disallowed token; outputs start poisoned so a row the kernel skips shows."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    num, vocab = 32, 32003  # a partial last bitmask word
    logits = (rng.standard_normal((num, vocab)) * 3).astype(np.float32)
    prompt = [rng.integers(0, vocab, rng.integers(0, 50)).tolist() for _ in range(num)]
    output = [rng.integers(0, 300, rng.integers(0, 40)).tolist() for _ in range(num)]
    masked = [rng.integers(0, vocab, 3).tolist() for _ in range(num)]
    bias = []
    for s in range(num):
        ids = rng.choice(vocab, size=int(rng.integers(0, 200)), replace=False)
        values = rng.uniform(-100, 100, size=len(ids)).astype(np.float32)
        values[:3] = [100.0, -100.0, 7.5][:len(values[:3])]
        bias.append({int(t): float(v) for t, v in zip(ids, values)})
    allowed = np.ones((num, vocab), bool)
    allowed[::2] = rng.random((num // 2, vocab)) < 0.3  # every other sequence has a processor's mask
    penalties = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)

    def reference(s):
        x = apply_penalties(logits[s], prompt[s], output[s], masked[s], 1.3, 0.4, 0.2)
        for t, b in bias[s].items():
            x[t] = np.float64(np.float32(np.float32(x[t]) + np.float32(b)))  # one float32 add, as both samplers
        x[~allowed[s]] = -np.inf
        return x

    greedy, _, _ = gpu_sample(kernels, torch.from_numpy(logits).cuda(), [dict(temperature=0.0, **penalties)] * num,
                              prompt, output, masked, bias=bias, bitmask=bitmask_of(allowed, vocab))
    for s in range(num):
        ref = reference(s)
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 1e-4:
            assert greedy[s] == int(np.argmax(ref)), f"seed {seed} sequence {s}"
        assert allowed[s, greedy[s]] and greedy[s] not in masked[s], f"seed {seed} sequence {s}"

    rows = [dict(temperature=0.8, top_p=0.95, seed=int(rng.integers(2**62)), step=s, **penalties) for s in range(num)]
    sampled, _, _ = gpu_sample(kernels, torch.from_numpy(logits).cuda(), rows, prompt, output, masked, bias=bias,
                               bitmask=bitmask_of(allowed, vocab))
    for s in range(num):
        assert allowed[s, sampled[s]] and sampled[s] not in masked[s], f"seed {seed} sequence {s}"
        # A disallowed id is a masked id for the CPU Sampler too (both -inf in stage 2).
        disallowed = masked[s] + np.nonzero(~allowed[s])[0].tolist()
        cpu = cpu_token(kernels, logits[s], rows[s], prompt[s], output[s], disallowed, logit_bias=bias[s])
        assert sampled[s] == cpu, f"seed {seed} sequence {s}"


def test_logit_bias_frequencies_match_reference(kernels):
    num, vocab = 20000, 64
    rng = np.random.default_rng()
    logits = (rng.standard_normal(vocab) * 2).astype(np.float32)
    bias = {int(t): float(b) for t, b in zip(rng.choice(vocab, 10, replace=False), rng.uniform(-4, 4, 10))}
    settings = dict(temperature=0.9, top_p=0.9)
    ids, _, _ = gpu_sample(kernels, torch.from_numpy(np.tile(logits, (num, 1))).cuda(),
                           [dict(settings, seed=s, step=1) for s in range(num)], bias=[bias] * num)
    biased = logits.astype(np.float64)
    for t, b in bias.items():
        biased[t] = np.float32(logits[t]) + np.float32(b)
    expected = float64_distribution(biased, **settings)
    counts = np.bincount(ids, minlength=vocab)
    assert counts[expected == 0].sum() == 0, "sampled a token the settings exclude"
    bound = 5 * np.sqrt(expected * (1 - expected) / num) + 1e-3
    assert np.all(np.abs(counts / num - expected) <= bound), (logits.tolist(), bias)


def test_bias_only_and_everything_disallowed(kernels):
    """A bias with no other list still needs the workspace path; an all-zero bitmask row gives -1."""
    logits = torch.zeros(3, 100, device="cuda")
    allowed = np.ones((3, 100), bool)
    allowed[2] = False
    ids, _, _ = gpu_sample(kernels, logits, [dict(temperature=0.0)] * 3, bias=[{42: 1.0}, {7: -1.0}, {}],
                           bitmask=bitmask_of(allowed, 100))
    assert ids.tolist() == [42, 0, -1]
    ids, _, _ = gpu_sample(kernels, logits[:2], [dict(temperature=0.0)] * 2, bias=[{42: 1.0}, {0: -1.0}])
    assert ids.tolist() == [42, 1]


def window_miss_logits(rng, vocab, kind):
    """A flat row (randn · 0.05) with some logits raised, placed against the window select's sample (every 8th
    element of a 128,256-row, at one CTA per row and at 8 CTAs of 16,032):
    - "heavy_unsampled": 300 logits +8 (nine tenths of the mass at temperature 1) off the sampled ids: the
      sample sees a flat row and puts the cut far below the real one (the cut lies above the window);
    - "heavy_sampled": the same on sampled ids: the sample's spread is large, the window is refused or
      reaches the top of the row;
    - "lifted_sampled": 5,000 logits +1 on sampled ids: the sample holds them 8 times too often and puts the
      cut above the real one, with a small spread (the cut lies below the window)."""
    logits = (rng.standard_normal(vocab) * 0.05).astype(np.float32)
    count, lift = (5000, 1.0) if kind == "lifted_sampled" else (300, 8.0)
    raised = rng.choice(vocab // 8, count, replace=False) * 8 + (3 if kind == "heavy_unsampled" else 0)
    logits[raised] += lift
    return logits


@pytest.mark.parametrize("kind", ["heavy_unsampled", "heavy_sampled", "lifted_sampled"])
@pytest.mark.parametrize("num", [1, 140])
def test_window_misses_fall_back(kernels, kind, num):
    """Rows on which the window select's estimate misses the cut or cannot place a window: the grid select
    takes over, same token as the CPU Sampler."""
    rng = np.random.default_rng()
    vocab = 128256
    logits = np.stack([window_miss_logits(rng, vocab, kind) for _ in range(num)])
    settings = [dict(top_p=0.5), dict(top_p=0.97), dict(top_p=0.9, min_p=0.01), dict(top_k=400, top_p=0.99)]
    rows = [dict(settings[s % len(settings)], temperature=1.0, seed=int(rng.integers(2**63)),
                 step=int(rng.integers(500))) for s in range(num)]
    ids, _, _ = gpu_sample(kernels, torch.from_numpy(logits).cuda(), rows)
    for s in range(num):
        assert ids[s] == cpu_token(kernels, logits[s], rows[s]), (s, rows[s])


@pytest.mark.parametrize("window", ["1", "0"])
def test_every_select_setting_matches_cpu_sampler(window):
    """RTLLM_SAMPLING_WINDOW (read once per process) moves the top-k / top-p cuts between the selects: by
    default the window select serves the rows of one-CTA clusters and the grid select the others; "1" lets
    the window select serve every row first, "0" none. The comparisons against the CPU Sampler again, in a
    child under each setting."""
    env = dict(os.environ, RTLLM_SAMPLING_WINDOW=window)
    selection = "same_token or mixed_rows or grid_select or tied or window_misses or penalties or bias"
    child = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", selection],
                           env=env, capture_output=True, text=True, timeout=1200)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and " failed" not in child.stdout, child.stdout[-2000:]
