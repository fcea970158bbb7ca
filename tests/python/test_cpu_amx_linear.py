"""The CPU linear's AMX-BF16 kernel for BF16 and F16 weights (cpu/amx_linear.cc), through one-linear engines.

Its exact parts are checked exactly: every finite F16 value (subnormals included) splits into two bf16
parts that add up to it, every normal BF16 value passes unchanged, and x with at most 16 significant bits
splits exactly. The rest against float64 within the split's bound (check_amx_against_float64), on shapes
whose K and N leave partial tiles and steps (K = 1100: more than one chunk of K steps), and T on both
sides of a 16-row tile, a 32-row pair and a 256-row chunk of x.
"""
import numpy as np
import pytest

from engine_fixture import bf16_bits_to_float
from rtllm import _core
from test_cpu_linear import LinearRunner, write_linear_engine
from test_cpu_linear_16bit import check_amx_against_float64, representable

MAX_ROWS = 300


@pytest.fixture
def amx(monkeypatch):
    monkeypatch.setenv("RTLLM_CPU_AMX", "1")  # F16 weights too
    if not _core.cpu_amx_available():
        pytest.skip("the CPU linear has no AMX-BF16 here")


def one_hot_table(N, K):
    """[N, K] rows e_0 .. e_{K-1}, then zeros: token t < K selects column t of W."""
    table = np.zeros((N, K), np.float32)
    table[np.arange(K), np.arange(K)] = 1.0
    return table


def all_finite_f16(K):
    """Every finite F16 value (both zeros, subnormals, normals) once, as float32 [N, K]."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(np.float16)
    values = values[np.isfinite(values)].astype(np.float32)
    assert values.size % K == 0
    return values.reshape(-1, K)


def all_normal_bf16(K):
    """Every normal BF16 value once (AMX reads bf16 subnormals as zero), as float32 [N, K]."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exponent = (bits >> 7) & 0xFF
    values = bf16_bits_to_float(bits[(exponent > 0) & (exponent < 0xFF)])
    assert values.size % K == 0
    return values.reshape(-1, K)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_weights_reach_the_tiles_exactly(tmp_path, amx, dtype):
    """y = e_k · Wᵀ = W[:, k] bit for bit: x = 1 splits into (1, 0), and w into parts that sum to w."""
    K = 128
    weight = all_finite_f16(K) if dtype == "float16" else all_normal_bf16(K)
    N = weight.shape[0]
    path = write_linear_engine(tmp_path / "exact", one_hot_table(N, K), weight, max_rows=K, weight_dtype=dtype)
    run = LinearRunner(path, num_threads=2, max_rows=K)
    ids = np.arange(K)
    np.testing.assert_array_equal(run(ids), weight.T)
    for M, start in ((1, 0), (3, 5), (17, 100)):
        np.testing.assert_array_equal(run(ids[start:start + M]), weight.T[start:start + M])


def test_x_with_16_significant_bits_splits_exactly(tmp_path, amx):
    """y = x · I = x bit for bit when x has at most 16 significant bits (hi and lo hold 8 each)."""
    rng = np.random.default_rng(3)
    K = N = 96
    table = (rng.standard_normal((N, K)) * 2.0 ** rng.integers(-60, 60, (N, K))).astype(np.float32)
    table = (table.view(np.uint32) & np.uint32(0xFFFFFF00)).view(np.float32)  # 16 significant bits
    path = write_linear_engine(tmp_path / "x16", table, np.eye(N, K, dtype=np.float32), max_rows=N,
                               weight_dtype="bfloat16")
    ids = rng.permutation(N)
    np.testing.assert_array_equal(LinearRunner(path, max_rows=N)(ids), table[ids])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("K,N", [(1, 1), (15, 17), (31, 33), (33, 31), (100, 47), (576, 192), (1100, 40)])
def test_matches_float64(tmp_path, amx, dtype, K, N):
    rng = np.random.default_rng(K * 7 + N)
    table = rng.standard_normal((N, K)).astype(np.float32)
    weight = representable((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32), dtype)
    bias = rng.standard_normal(N).astype(np.float32)
    path = write_linear_engine(tmp_path / "lin", table, weight, bias, max_rows=MAX_ROWS, weight_dtype=dtype)
    run = LinearRunner(path, num_threads=2, max_rows=MAX_ROWS)
    for M in (1, 3, 16, 17, 128, MAX_ROWS):
        ids = rng.integers(0, N, M)
        check_amx_against_float64(run(ids), table, weight, bias, ids, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_output_is_written_and_rows_stay_apart(tmp_path, amx, dtype):
    """A step whose x is NaN leaves NaN in y's buffer; the next step must overwrite every element (N not a
    multiple of 32: the last block goes through the thread's C buffer). A NaN row poisons its row only."""
    rng = np.random.default_rng(11)
    K, N = 70, 45
    table = rng.standard_normal((N, K)).astype(np.float32)
    table[0] = np.nan
    weight = representable((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32), dtype)
    path = write_linear_engine(tmp_path / "nan", table, weight, max_rows=64, weight_dtype=dtype)
    run = LinearRunner(path, num_threads=2, max_rows=64)
    for M in (64, 40, 17, 1):
        assert np.all(np.isnan(run(np.zeros(64, np.int64))))
        ids = rng.integers(1, N, M)
        check_amx_against_float64(run(ids), table, weight, None, ids, dtype)
    ids = rng.integers(1, N, 40)
    ids[[3, 20, 37]] = 0
    y = run(ids)
    assert np.all(np.isnan(y[ids == 0])) and np.all(np.isfinite(y[ids != 0]))
    check_amx_against_float64(y[ids != 0], table, weight, None, ids[ids != 0], dtype)


def test_infinite_x_gives_infinite_y(tmp_path, amx):
    """x = ±inf splits into (±inf, 0): positive weights give y = ±inf, not inf - inf = NaN."""
    K, N = 40, 20
    table = np.ones((N, K), np.float32)
    table[1, 7], table[2, 30] = np.inf, -np.inf
    weight = np.full((N, K), 0.5, np.float32)
    path = write_linear_engine(tmp_path / "inf", table, weight, max_rows=4, weight_dtype="bfloat16")
    y = LinearRunner(path, max_rows=4)([0, 1, 2])
    np.testing.assert_array_equal(y[0], np.full(N, 20.0, np.float32))
    assert np.all(y[1] == np.inf) and np.all(y[2] == -np.inf)


def test_f16_weight_holding_inf_keeps_the_fma_kernels(tmp_path, monkeypatch, amx):
    """The F16 split cannot carry ±inf (inf - inf): such a weight stays GEMM panels, whose result is the
    one RTLLM_CPU_AMX=0 gives, bit for bit."""
    rng = np.random.default_rng(5)
    K, N = 64, 40
    table = rng.standard_normal((N, K)).astype(np.float32)
    weight = representable(rng.standard_normal((N, K)).astype(np.float32), "float16")
    weight[3, 9] = np.inf
    path = write_linear_engine(tmp_path / "winf", table, weight, max_rows=8, weight_dtype="float16")
    ids = rng.integers(0, N, 8)
    with_amx = LinearRunner(path, max_rows=8)(ids)
    monkeypatch.setenv("RTLLM_CPU_AMX", "0")
    np.testing.assert_array_equal(with_amx, LinearRunner(path, max_rows=8)(ids))
    assert np.isinf(with_amx[:, 3]).any()


@pytest.mark.parametrize("dtype,default_kernel", [("bfloat16", "1"), ("float16", "0")])
def test_by_default_bf16_weights_take_the_tiles_and_f16_ones_the_fma_kernels(tmp_path, monkeypatch, amx, dtype,
                                                                               default_kernel):
    """Unset, RTLLM_CPU_AMX puts BF16 weights on AMX tiles and leaves F16 ones on the FMA kernels (their
    per-call split would slow decode): the default's result equals, bit for bit, the one of the setting
    named, and differs from the other's (x keeps 16 significant bits on the tiles, 24 on the FMAs)."""
    rng = np.random.default_rng(6)
    K, N, T = 96, 48, 8
    table = rng.standard_normal((N, K)).astype(np.float32)
    weight = representable(rng.standard_normal((N, K)).astype(np.float32), dtype)
    path = write_linear_engine(tmp_path / "default", table, weight, max_rows=T, weight_dtype=dtype)
    ids = rng.integers(0, N, T)
    results = {}
    for setting in (None, "0", "1"):
        if setting is None:
            monkeypatch.delenv("RTLLM_CPU_AMX", raising=False)
        else:
            monkeypatch.setenv("RTLLM_CPU_AMX", setting)
        results[setting] = LinearRunner(path, max_rows=T)(ids)
    other = "0" if default_kernel == "1" else "1"
    np.testing.assert_array_equal(results[None], results[default_kernel])
    assert not np.array_equal(results[None], results[other])
