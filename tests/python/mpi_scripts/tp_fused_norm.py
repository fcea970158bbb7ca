"""Run under mpirun: all_reduce_add_rms_norm through ModelRunner on the CPU, one shard per rank.

    ids -> embedding (vocab_parallel: this rank's rows of `table`) -> e
    ids -> embedding (the whole `residual` table on every rank)    -> r
    [normed, sum] = all_reduce_add_rms_norm(e, r, norm)  -> gather_rows (the logits rows) -> linear (the whole
    LM head on every rank) -> logits [num_logits, V]

Every rank's logits are checked against float64 numpy on the whole weights:
rms_norm(table[ids] + residual[ids]) · norm · lm_headᵀ. Prints one "ok rank R of N" line per rank; exits
non-zero on a mismatch.
"""
import json
import os
import sys

import numpy as np

from rtllm import _core

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tp_graph, beside this script

from tp_graph import H, graph_engine_config, spec  # noqa: E402 (this folder is on the path: see above)

V_SHARD, EPS = 5, 1e-5


def engine_config(tp_size):
    nodes = [
        {"op": "embedding", "inputs": ["input_ids", "table"], "outputs": ["e"], "attrs": {"vocab_parallel": True}},
        {"op": "embedding", "inputs": ["input_ids", "residual"], "outputs": ["r"], "attrs": {}},
        {"op": "all_reduce_add_rms_norm", "inputs": ["e", "r", "norm"], "outputs": ["normed", "sum"],
         "attrs": {"eps": EPS}},
        {"op": "gather_rows", "inputs": ["normed", "logits_indices"], "outputs": ["last"], "attrs": {}},
        {"op": "linear", "inputs": ["last", "lm_head"], "outputs": ["logits"], "attrs": {}},
    ]
    tensors = [spec("e", "num_tokens", H), spec("r", "num_tokens", H), spec("normed", "num_tokens", H),
               spec("sum", "num_tokens", H), spec("last", "num_logits", H)]
    return graph_engine_config(tp_size, V_SHARD * tp_size, nodes, tensors)


def whole_weights(tp_size):
    """The same whole weights on every rank: table [V, H], residual [V, H], norm [H], lm_head [V, H]."""
    rng = np.random.default_rng(9)
    V = V_SHARD * tp_size
    return (rng.standard_normal((V, H)).astype(np.float32), rng.standard_normal((V, H)).astype(np.float32),
            rng.uniform(0.5, 1.5, H).astype(np.float32), rng.standard_normal((V, H)).astype(np.float32))


def rank_weights(tp_size, rank):
    table, residual, norm, lm_head = whole_weights(tp_size)
    shard = np.ascontiguousarray(table[rank * V_SHARD:(rank + 1) * V_SHARD])
    return [("table", "F32", list(shard.shape), shard), ("residual", "F32", list(residual.shape), residual),
            ("norm", "F32", [H], norm), ("lm_head", "F32", list(lm_head.shape), lm_head)]


def expected_logits(tp_size, ids, indices):
    table, residual, norm, lm_head = (w.astype(np.float64) for w in whole_weights(tp_size))
    s = table[ids] + residual[ids]
    normed = s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + EPS) * norm
    return normed[indices] @ lm_head.T


def main():
    comm = _core.mpi_world_communicator()
    rank, tp = comm.rank, comm.size
    engine = _core.Engine.from_memory(json.dumps(engine_config(tp)), rank_weights(tp, rank), rank=rank)
    cfg = _core.RuntimeConfig(num_kv_blocks=4, tokens_per_block=16, num_threads=2)
    cfg.communicator = comm
    runner = _core.ModelRunner(engine, cfg)
    V = V_SHARD * tp
    ids_rng = np.random.default_rng(13)
    for step in range(3):
        ids = np.concatenate([[0, V - 1, V_SHARD - 1, V_SHARD], ids_rng.integers(0, V, 4 + step)]).astype(np.int32)
        indices = [2, 0, len(ids) - 1, 5]
        logits = runner.forward(ids, [3, len(ids) - 3], [0, 0], np.array([[0], [1]], np.int32), indices)
        expected = expected_logits(tp, ids, indices)
        err = np.max(np.abs(logits - expected)) / np.max(np.abs(expected))
        assert logits.shape == (len(indices), V) and err < 1e-5, f"rank {rank} step {step}: relative error {err}"
    comm.barrier()
    print(f"ok rank {rank} of {tp}", flush=True)


if __name__ == "__main__":
    main()
