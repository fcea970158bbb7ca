"""Tensor-parallel groups over local sockets (rtllm._core.socket_listen / socket_accept / socket_connect), the
transport of a host without MPI: the collectives against numpy, two ranks against one, and a killed
follower. Needs no MPI (RTLLM_TP_TRANSPORT=socket picks this transport where MPI is also built in)."""
import subprocess
import sys

import numpy as np
import pytest

from rtllm import LLM, RtllmError, SamplingParams, _core
from tensor_parallel_helpers import check_a_killed_follower_fails_the_requests

PROMPTS = [[5, 17, 42, 7, 99, 3, 64], [11, 250, 8], [77, 31, 2, 190, 6, 140, 21, 9, 33]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
LIMITS = dict(max_seq_len=128, max_batch_size=4)

# Rank `rank` of a group of 3: the same collectives as the test's rank 0, in the same order.
_PEER = """
import sys
import numpy as np
from rtllm import _core
port, rank = int(sys.argv[1]), int(sys.argv[2])
group = _core.socket_connect(port, rank, 3)
x = np.arange(5, dtype=np.float32) * (rank + 1)
group.all_reduce_sum(x)
print("sum", x.tolist(), flush=True)
group.gather(np.full(4, rank, dtype=np.float32), 0)
got = group.gather(np.full(2, 10 * rank, dtype=np.float32), 2)
if rank == 2:
    print("gathered", got.tolist(), flush=True)
print("broadcast", group.broadcast(b"", 0).decode(), flush=True)
print("from 1", group.broadcast(b"one" if rank == 1 else b"", 1).decode(), flush=True)
group.disconnect()
"""


def test_collectives_match_numpy():
    listen_fd, port = _core.socket_listen()
    peers = [subprocess.Popen([sys.executable, "-c", _PEER, str(port), str(r)], stdout=subprocess.PIPE, text=True)
             for r in (1, 2)]
    group = _core.socket_accept(listen_fd, 3, 30.0)
    assert (group.rank, group.size) == (0, 3)
    x = np.arange(5, dtype=np.float32)
    group.all_reduce_sum(x)
    expected = np.arange(5, dtype=np.float64) * (1 + 2 + 3)
    np.testing.assert_array_equal(x, expected)
    stacked = group.gather(np.full(4, 0, dtype=np.float32), 0)
    np.testing.assert_array_equal(stacked, np.repeat(np.arange(3, dtype=np.float32)[:, None], 4, axis=1))
    assert group.gather(np.full(2, 0, dtype=np.float32), 2) is None
    assert group.broadcast(b"hello", 0) == b"hello"
    assert group.broadcast(b"", 1) == b"one"
    group.disconnect()
    outputs = [peer.communicate(timeout=30)[0] for peer in peers]
    for peer, out in zip(peers, outputs):
        assert peer.returncode == 0, out
        assert f"sum {expected.tolist()}" in out and "broadcast hello" in out and "from 1 one" in out
    assert "gathered [[0.0, 0.0], [10.0, 10.0], [20.0, 20.0]]" in outputs[1]  # rank 2 was the root


def test_a_rank_that_never_joins_times_out():
    listen_fd, _ = _core.socket_listen()
    with pytest.raises(RtllmError, match="0 of 1 ranks joined within 300 ms"):
        _core.socket_accept(listen_fd, 2, 0.3)


@pytest.fixture
def socket_transport(monkeypatch):
    monkeypatch.setenv("RTLLM_TP_TRANSPORT", "socket")


def greedy_tokens(llm):
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("arch,tie,overrides", [("llama", False, {}), ("qwen2", True, {"num_key_value_heads": 1})])
def test_two_ranks_over_sockets_give_the_tokens_of_one(tiny_model, socket_transport, arch, tie, overrides):
    checkpoint = str(tiny_model(arch, "float32", tie, **overrides))
    with LLM(checkpoint, **LIMITS) as llm:
        expected = greedy_tokens(llm)
    with LLM(checkpoint, tensor_parallel_size=2, **LIMITS) as llm:
        assert greedy_tokens(llm) == expected


def test_a_killed_follower_fails_the_requests_and_the_parent_lives_on(tiny_model, socket_transport):
    llm = LLM(str(tiny_model("llama")), tensor_parallel_size=2, max_seq_len=512, max_batch_size=4)
    check_a_killed_follower_fails_the_requests(llm, "rank 1 (has exited|is gone).*the group of 2 ranks is lost")
