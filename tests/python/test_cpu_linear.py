"""The CPU linear op (packed-panel GEMM) against float64 numpy, through a one-linear engine.

The engine is embedding -> linear -> gather_rows ("logits"): every sequence is one token, so a step of
M sequences runs linear on M rows and returns all of them. Shapes are chosen to leave remainders: K not
a multiple of the SIMD width, N not a multiple of the panel width, M not a multiple of the tile rows.
"""
import json

import numpy as np
import pytest

from engine_fixture import _stored, engine_config, write_safetensors
from rtllm import _core

MAX_ROWS = 80


def write_linear_engine(path, table, weight, bias=None, max_rows=MAX_ROWS, weight_dtype="float32"):
    """table [V, K] embedding rows (the x values), weight [N, K], bias [N]; vocab is N.
    With `table is weight` the embedding reads W too, so the runner keeps W row-major (unpacked).
    W is stored as weight_dtype (float32, bfloat16 or float16: pass values it holds exactly)."""
    (V, K), N = table.shape, weight.shape[0]
    assert V == N, "token ids are < vocab = N, so the table has N rows"
    inputs = ["x", "W"] + (["b"] if bias is not None else [])
    nodes = [{"op": "embedding", "inputs": ["input_ids", "W" if table is weight else "E"], "outputs": ["x"],
              "attrs": {}},
             {"op": "linear", "inputs": inputs, "outputs": ["y"], "attrs": {}},
             {"op": "gather_rows", "inputs": ["y", "last_token_ids"], "outputs": ["logits"], "attrs": {}}]
    tensors = [{"name": "x", "dtype": "float32", "shape": ["num_tokens", K]},
               {"name": "y", "dtype": "float32", "shape": ["num_tokens", N]},
               {"name": "logits", "dtype": "float32", "shape": ["num_seqs", N]}]
    limits = {"max_batch_size": max_rows, "max_input_len": 4, "max_seq_len": 8, "max_num_tokens": max_rows}
    model_config = {
        "architecture": "LlamaForCausalLM", "vocab_size": N, "hidden_size": K, "num_layers": 1,
        "num_heads": 1, "num_kv_heads": 1, "head_dim": 8, "intermediate_size": K,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "attention_bias": False, "qk_norm": False, "dtype": "float32",
        "bos_token_id": 1, "eos_token_id": [2]}
    config = engine_config(model_config, limits, tensors, nodes)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    stored = {"W": weight, **({"E": table} if table is not weight else {}), **({"b": bias} if bias is not None else {})}
    write_safetensors(path / "rank0.engine",
                      {k: _stored(v, weight_dtype if k == "W" else "float32") for k, v in stored.items()})
    return path


class LinearRunner:
    """y = linear(table[ids]) for a list of ids, one token per sequence."""

    def __init__(self, path, num_threads=1, max_rows=MAX_ROWS):
        self.engine = _core.Engine.load(str(path))
        cfg = _core.RuntimeConfig(tokens_per_block=4, num_kv_blocks=max_rows + 1, num_threads=num_threads)
        self.runner = _core.ModelRunner(self.engine, cfg)

    def __call__(self, ids):
        M = len(ids)
        table = np.arange(M, dtype=np.int32)[:, None]  # each one-token sequence owns a block
        return self.runner.forward(list(ids), [1] * M, [0] * M, table)


def make_case(tmp_path, M, K, N, bias, seed=0, tied=False):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((N, K)).astype(np.float32)
    weight = table if tied else (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    path = write_linear_engine(tmp_path / f"lin_{M}_{K}_{N}_{int(bias)}_{int(tied)}", table, weight, b)
    ids = rng.integers(0, N, M)
    return path, table, weight, b, ids


def check_against_float64(y, table, weight, bias, ids):
    """Elementwise bound of a float32 FMA chain over K terms plus the bias: (K + 1) u sum |terms|."""
    x = table[ids].astype(np.float64)
    w = weight.astype(np.float64)
    ref = x @ w.T + (bias if bias is not None else 0.0)
    scale = np.abs(x) @ np.abs(w).T + (np.abs(bias) if bias is not None else 0.0)
    bound = (x.shape[1] + 2) * 2.0 ** -24 * scale + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= bound), f"max error / bound {np.max(err / bound):.3g}"
    # and the result is not trivially exact-zero or garbage
    assert np.max(np.abs(ref)) > 0


@pytest.mark.parametrize("K,N", [(1, 1), (7, 5), (17, 31), (64, 32), (100, 33), (130, 70), (512, 96)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tied", [False, True], ids=["packed", "rowmajor"])
def test_matches_float64(tmp_path, K, N, bias, tied):
    """Packed panels, and W kept row-major because the embedding reads it too (tied weights)."""
    for M in (1, 2, 5, 8, 13, 70):
        path, table, weight, b, ids = make_case(tmp_path, M, K, N, bias, seed=M, tied=tied)
        y = LinearRunner(path)(ids)
        assert y.shape == (M, N)
        check_against_float64(y, table, weight, b, ids)


@pytest.mark.parametrize("K,N", [(17, 31), (100, 70), (333, 129)])
@pytest.mark.parametrize("tied", [False, True], ids=["packed", "rowmajor"])
def test_rows_bitwise_independent_of_batch(tmp_path, K, N, tied):
    """A row's result is the same alone, at any position of any batch size, on 1 or 2 threads."""
    path, table, weight, b, ids = make_case(tmp_path, MAX_ROWS, K, N, bias=True, tied=tied)
    one, two = LinearRunner(path, num_threads=1), LinearRunner(path, num_threads=2)
    full = one(ids)
    check_against_float64(full, table, weight, b, ids)
    np.testing.assert_array_equal(two(ids), full)
    for M in (1, 3, 7, 9, 33, 64, 65):
        for start in (0, MAX_ROWS - M):
            np.testing.assert_array_equal(one(ids[start:start + M]), full[start:start + M])
            np.testing.assert_array_equal(two(ids[start:start + M]), full[start:start + M])
