"""Run under mpirun: a tensor-parallel graph through ModelRunner on the CPU, one shard per rank.

    ids -> embedding (vocab_parallel: this rank's rows of the table) -> all_reduce -> gather_rows (the
    logits rows) -> linear (this rank's rows of the LM head: its slice of the vocabulary) -> gather (root 0)

The root's logits are checked against float64 numpy on the whole (unsplit) weights: table[ids] · lm_headᵀ.
Also checks that a runner refuses a communicator that does not match the engine. Prints one
"ok rank R of N" line per rank; exits non-zero on a mismatch.
"""
import json

import numpy as np

from rtllm import _core

V_SHARD, H = 6, 8
LIMITS = {"max_batch_size": 4, "max_input_len": 16, "max_seq_len": 16, "max_num_tokens": 16}


def spec(name, *shape, dtype="float32"):
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def graph_engine_config(tp_size, vocab, nodes, tensors):
    """An engine config.json of one hidden size H around `nodes` (and their `tensors`), split over tp_size ranks,
    with logits [num_logits, vocab]."""
    return {
        "format_version": 2, "rtllm_version": "0.1.0", "architecture": "LlamaForCausalLM",
        "model_config": {"architecture": "LlamaForCausalLM", "vocab_size": vocab, "hidden_size": H, "num_layers": 1,
                         "num_heads": tp_size, "num_kv_heads": 1, "head_dim": H, "dtype": "float32"},
        "build_config": LIMITS, "quantization": {"quant_algo": None},
        "mapping": {"world_size": tp_size, "tp_size": tp_size},
        "graph": {
            "inputs": [spec("input_ids", "num_tokens", dtype="int32"), spec("positions", "num_tokens", dtype="int32"),
                       spec("logits_indices", "num_logits", dtype="int32")],
            "outputs": [spec("logits", "num_logits", vocab)],
            "tensors": tensors,
            "nodes": nodes,
        },
    }


def engine_config(tp_size):
    nodes = [
        {"op": "embedding", "inputs": ["input_ids", "embed"], "outputs": ["e"], "attrs": {"vocab_parallel": True}},
        {"op": "all_reduce", "inputs": ["e"], "outputs": ["h"], "attrs": {}},
        {"op": "gather_rows", "inputs": ["h", "logits_indices"], "outputs": ["last"], "attrs": {}},
        {"op": "linear", "inputs": ["last", "lm_head"], "outputs": ["part"], "attrs": {}},
        {"op": "gather", "inputs": ["part"], "outputs": ["logits"], "attrs": {"root": 0}},
    ]
    tensors = [spec("e", "num_tokens", H), spec("h", "num_tokens", H), spec("last", "num_logits", H),
               spec("part", "num_logits", V_SHARD)]
    return graph_engine_config(tp_size, V_SHARD * tp_size, nodes, tensors)


def main():
    comm = _core.mpi_world_communicator()
    rank, tp = comm.rank, comm.size
    V = V_SHARD * tp
    rng = np.random.default_rng(5)  # the same full weights on every rank
    table = rng.standard_normal((V, H)).astype(np.float32)
    lm_head = rng.standard_normal((V, H)).astype(np.float32)
    rows = slice(rank * V_SHARD, (rank + 1) * V_SHARD)
    shards = [np.ascontiguousarray(table[rows]), np.ascontiguousarray(lm_head[rows])]
    weights = [("embed", "F32", [V_SHARD, H], shards[0]), ("lm_head", "F32", [V_SHARD, H], shards[1])]
    config = json.dumps(engine_config(tp))

    engine = _core.Engine.from_memory(config, weights, rank=rank)
    assert (engine.tp_size, engine.rank) == (tp, rank), (engine.tp_size, engine.rank)

    # A runner needs the engine's ranks: no communicator, or this process at another rank, is refused.
    def refused(engine_rank, communicator, words):
        cfg = _core.RuntimeConfig(num_kv_blocks=4, tokens_per_block=16, num_threads=1)
        cfg.communicator = communicator
        try:
            _core.ModelRunner(_core.Engine.from_memory(config, weights, rank=engine_rank), cfg)
        except (_core.RtllmError, ValueError) as e:
            assert all(w in str(e) for w in words), str(e)
        else:
            raise AssertionError(f"a runner for rank {engine_rank} started on rank {rank}")

    refused(rank, None, [f"tp_size {tp}", "communicator"])
    refused((rank + 1) % tp, comm, [f"loaded for rank {(rank + 1) % tp}", f"is rank {rank}"])

    cfg = _core.RuntimeConfig(num_kv_blocks=4, tokens_per_block=16, num_threads=2)
    cfg.communicator = comm
    assert cfg.communicator is not None and cfg.communicator.size == tp
    runner = _core.ModelRunner(engine, cfg)

    # Two sequences whose ids fall in every rank's slice of the vocabulary (and at its edges).
    ids_rng = np.random.default_rng(11)
    for step in range(3):
        ids = np.concatenate([[0, V - 1, V_SHARD - 1, V_SHARD], ids_rng.integers(0, V, 5 + step)]).astype(np.int32)
        lens = [4, len(ids) - 4]
        block_table = np.array([[0], [1]], np.int32)
        indices = [3, 0, len(ids) - 1, 5]  # any order, repeats allowed
        logits = runner.forward(ids, lens, [0, 0], block_table, indices)
        if rank == 0:
            expected = table.astype(np.float64)[ids[indices]] @ lm_head.astype(np.float64).T
            err = np.max(np.abs(logits - expected)) / np.max(np.abs(expected))
            assert logits.shape == (len(indices), V) and err < 1e-5, f"step {step}: relative error {err}"

    # An id outside the whole vocabulary is refused (the runner checks before the step; no rank runs it).
    try:
        runner.forward(np.array([V], np.int32), [1], [0], np.array([[0]], np.int32), None)
    except ValueError as e:
        assert str(V) in str(e), str(e)
    else:
        raise AssertionError("token id V was accepted")

    comm.barrier()
    print(f"ok rank {rank} of {tp}", flush=True)


if __name__ == "__main__":
    main()
