"""Run under mpirun -n N: each rank loads its shard of a tensor-parallel engine, and the ranks decode a few
sequences greedily in lock step (rank 0 picks each next token from the gathered logits and shares it).
Rank 0 then runs the one-rank engine of the same checkpoint alone on the same steps and prints one JSON line:
the tokens and logits of both, for the test to compare.

    mpirun -n 2 python tp_greedy.py TP_ENGINE_DIR ONE_RANK_ENGINE_DIR NUM_STEPS
"""
import json
import sys

import numpy as np

from rtllm import _core

PROMPTS = [[5, 17, 42, 7, 99, 3, 64], [11, 250, 8], [77, 31, 2, 190, 6]]


def decode(runner, num_steps, share):
    """Greedy decode of PROMPTS (prefill of all, then one token per step); share(tokens) gives every rank
    rank 0's choice. Returns (tokens per prompt, [logits of each step on rank 0])."""
    tpb, blocks_per_seq = 4, 16
    table = np.arange(len(PROMPTS) * blocks_per_seq, dtype=np.int32).reshape(len(PROMPTS), blocks_per_seq)
    cached = [0] * len(PROMPTS)
    new = [list(p) for p in PROMPTS]
    out, steps = [[] for _ in PROMPTS], []
    for _ in range(num_steps):
        ids = [t for n in new for t in n]
        logits = runner.forward(ids, [len(n) for n in new], cached, table)
        chosen = share(np.argmax(logits, axis=1).astype(np.float32))
        steps.append(logits.copy())
        for s, n in enumerate(new):
            cached[s] += len(n)
            out[s].append(int(chosen[s]))
            new[s] = [int(chosen[s])]
    assert tpb * blocks_per_seq > max(map(len, PROMPTS)) + num_steps
    return out, steps


def main():
    tp_dir, one_dir, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    comm = _core.mpi_world_communicator()
    rank = comm.rank

    def share(values):  # rank 0's values on every rank: the others add zeros
        buf = np.ascontiguousarray(values if rank == 0 else np.zeros_like(values), dtype=np.float32)
        comm.all_reduce_sum(buf)
        return buf

    def runner(engine_dir, engine_rank, communicator):
        cfg = _core.RuntimeConfig(tokens_per_block=4, num_kv_blocks=64, num_threads=1)
        cfg.communicator = communicator
        return _core.ModelRunner(_core.Engine.load(engine_dir, engine_rank), cfg)

    tokens, logits = decode(runner(tp_dir, rank, comm), num_steps, share)
    if rank == 0:
        ref_tokens, ref_logits = decode(runner(one_dir, 0, None), num_steps, lambda v: v)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(logits, ref_logits))
        scale = max(float(np.max(np.abs(b))) for b in ref_logits)
        print(json.dumps({"tokens": tokens, "reference_tokens": ref_tokens, "max_abs_diff": diff,
                          "max_abs_logit": scale}))
    comm.barrier()


if __name__ == "__main__":
    main()
