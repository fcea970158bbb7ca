"""The CPU linear op on BF16 and F16 weights, which it keeps 16-bit and widens as it reads.

Widening is exact, so the op must give the float64 reference's result on the widened weights within a
float32 FMA chain's bound, and the very bits of the same engine holding those widened values as
float32 weights (one summation order whatever the dtype). Few rows widen in registers, more rows widen
a panel at a time into the workspace: rows alone and inside batches on either side of that switch, on
1 or 2 threads, must agree bit for bit. Both layouts: packed panels, and row-major W (the embedding
reads it too, as with tied embeddings).

Where the CPU has AMX-BF16, packed weights run on AMX tiles instead (the cpu_amx fixture runs each test
with and without them): x is split into two bf16 parts there, so the result is checked against
float64 within that split's bound (check_amx_against_float64) instead of against the float32 engine,
and must be as independent of the batch.
"""
import numpy as np
import pytest

from engine_fixture import bf16_bits_to_float, float_to_bf16_bits
from test_cpu_linear import LinearRunner, check_against_float64, write_linear_engine

DTYPES = ["bfloat16", "float16"]
ROWS = [1, 2, 5, 16, 64, 300]
MAX_ROWS = max(ROWS)


def representable(w, dtype):
    """w rounded to dtype (nearest even), back in float32: values the 16-bit weight holds exactly."""
    if dtype == "bfloat16":
        return bf16_bits_to_float(float_to_bf16_bits(w))
    return w.astype(np.float16).astype(np.float32)


def make_weights(rng, K, N, dtype, tied):
    """table [N, K] (x rows) and W [N, K] in dtype's values; F16 W includes subnormals and large values."""
    w = rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K)
    if dtype == "float16":
        w.flat[::7] *= 1e-4   # F16 subnormals (below 6.1e-5)
        w.flat[3::11] *= 3e3  # near F16's top
    w = representable(w, dtype)
    table = w if tied else rng.standard_normal((N, K)).astype(np.float32)
    return table, w


def check_amx_against_float64(y, table, weight, bias, ids, dtype):
    """Elementwise bound of the AMX kernel (cpu/amx_linear.cc). x = hi + lo + e with |e| <= 2^-16 |x|
    (both parts bf16, rounded to nearest); BF16 w is exact, F16 w = whi + wlo exactly (whi w truncated
    to bf16, |wlo| < 2^-7 |w|) and the dropped lo * wlo term is below 2^-8 (1 + 2^-8) 2^-7 |x w|: a
    product is off by at most 2^-16 |x w| (BF16) or 2^-16 + 2^-15 (1 + 2^-8) < 3.02 * 2^-16 (F16).
    The float32 sum of the 2 or 3 passes' products over K, whatever order the tiles add them in, adds
    at most a float32 chain's (passes K + 2) u of the sum of their magnitudes, which is at most
    (1 + 2^-7)^2 sum |x| |w| (|hi| and |lo| within 2^-8 of |x| and of 2^-8 |x|, |wlo| within 2^-7 |w|)."""
    x = table[ids].astype(np.float64)
    w = weight.astype(np.float64)
    ref = x @ w.T + (bias if bias is not None else 0.0)
    scale = np.abs(x) @ np.abs(w).T + (np.abs(bias) if bias is not None else 0.0)
    passes, split = (2, 1.0) if dtype == "bfloat16" else (3, 3.02)
    chain = (passes * x.shape[1] + 2) * 2.0 ** -24 * (1 + 2.0 ** -7) ** 2
    bound = (split * 2.0 ** -16 + chain) * scale + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= bound), f"max error / bound {np.max(err / bound):.3g}"
    assert np.max(np.abs(ref)) > 0


def engines(tmp_path, name, table, weight, bias, dtype):
    """The engine with W stored in dtype, and the same with W stored as its float32 values (with
    `table is weight`, the embedding reads W in that dtype too)."""
    return [write_linear_engine(tmp_path / f"{name}_{stored}", table, weight, bias, max_rows=MAX_ROWS,
                                weight_dtype=stored) for stored in (dtype, "float32")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(7, 5), (17, 31), (100, 33), (333, 129), (576, 70)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tied", [False, True], ids=["packed", "rowmajor"])
def test_matches_float64_and_widened_float32(tmp_path, dtype, K, N, bias, tied, cpu_amx):
    rng = np.random.default_rng(K * 1000 + N)
    table, weight = make_weights(rng, K, N, dtype, tied)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    path16, path32 = engines(tmp_path, "lin", table, weight, b, dtype)
    run16, run32 = LinearRunner(path16, max_rows=MAX_ROWS), LinearRunner(path32, max_rows=MAX_ROWS)
    amx = cpu_amx and not tied  # a row-major W (the embedding reads it too) keeps the FMA kernels
    for M in ROWS:
        ids = rng.integers(0, N, M)
        y = run16(ids)
        assert y.shape == (M, N) and y.dtype == np.float32
        if amx:
            check_amx_against_float64(y, table, weight, b, ids, dtype)
            continue
        check_against_float64(y, table, weight, b, ids)
        np.testing.assert_array_equal(y, run32(ids))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(33, 65), (333, 129)])
@pytest.mark.parametrize("tied", [False, True], ids=["packed", "rowmajor"])
def test_rows_bitwise_independent_of_batch(tmp_path, dtype, K, N, tied, cpu_amx):
    """A row's result is the same alone, at any position of any batch size, on 1 or 2 threads."""
    rng = np.random.default_rng(7)
    table, weight = make_weights(rng, K, N, dtype, tied)
    b = rng.standard_normal(N).astype(np.float32)
    path16, _ = engines(tmp_path, "inv", table, weight, b, dtype)
    one, two = LinearRunner(path16, num_threads=1, max_rows=MAX_ROWS), LinearRunner(path16, num_threads=2,
                                                                                    max_rows=MAX_ROWS)
    ids = rng.integers(0, N, MAX_ROWS)
    full = one(ids)
    if cpu_amx and not tied:
        check_amx_against_float64(full, table, weight, b, ids, dtype)
    else:
        check_against_float64(full, table, weight, b, ids)
    np.testing.assert_array_equal(two(ids), full)
    for M in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64, 65, 299):
        for start in (0, MAX_ROWS - M):
            np.testing.assert_array_equal(one(ids[start:start + M]), full[start:start + M])
            np.testing.assert_array_equal(two(ids[start:start + M]), full[start:start + M])

