"""Run under mpirun: the Communicator's collectives against float64 numpy on every rank's data.

Each rank's data comes from a generator seeded with its rank, so every rank can rebuild all of them.
Exits non-zero (an AssertionError) on a mismatch; prints one "ok rank R of N" line per rank otherwise.
"""
import numpy as np

from rtllm import _core


def rank_data(rank, n):
    return np.random.default_rng(1000 + rank).standard_normal(n).astype(np.float32)


def main():
    comm = _core.mpi_world_communicator()
    assert _core.mpi_world_communicator() is comm  # one communicator per process
    rank, size = comm.rank, comm.size
    assert 0 <= rank < size, (rank, size)

    # all_reduce_sum, in place: the sum of every rank's values (float32 sums of a few values).
    for n in (1, 1000, 4099):
        x = rank_data(rank, n)
        expected = sum(rank_data(r, n).astype(np.float64) for r in range(size))
        comm.all_reduce_sum(x)
        err = np.max(np.abs(x - expected))
        assert err <= 1e-5 * max(1.0, np.max(np.abs(expected))), f"all_reduce_sum n={n}: max error {err}"

    # gather: rank r's array at index r on the root (exactly), None elsewhere; every root in turn.
    for root in range(size):
        x = rank_data(rank, 3 * 5).reshape(3, 5) + root
        out = comm.gather(x, root)
        if rank == root:
            expected = np.stack([rank_data(r, 15).reshape(3, 5) + root for r in range(size)])
            assert out.shape == (size, 3, 5) and np.array_equal(out, expected), f"gather to root {root}: {out}"
        else:
            assert out is None, f"gather to root {root} returned {out!r} on rank {rank}"

    # broadcast: root's bytes on every rank.
    payload = np.random.default_rng(7).integers(0, 256, 70001, dtype=np.uint8).tobytes()
    got = comm.broadcast(payload if rank == size - 1 else None, size - 1)
    assert got == payload, f"broadcast: {len(got)} bytes differ"

    # Bad arguments fail on the caller, before any message.
    for call in (lambda: comm.gather(np.zeros(2, np.float32), size), lambda: comm.all_reduce_sum(np.zeros(2))):
        try:
            call()
        except (_core.RtllmError, ValueError) as e:
            assert "root" in str(e) or "float32" in str(e), str(e)
        else:
            raise AssertionError("a bad argument was accepted")

    comm.barrier()
    print(f"ok rank {rank} of {size}", flush=True)


if __name__ == "__main__":
    main()
