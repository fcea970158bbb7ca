"""Shared by the tensor-parallel tests of both transports (MPI: test_tensor_parallel.py; sockets:
test_tensor_parallel_socket.py)."""
import os
import signal
import threading
import time

import pytest

from rtllm import RtllmError, SamplingParams


def follower_pids():
    """The processes running rtllm.executor.tensor_parallel (the followers of this test's groups)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"rtllm.executor.tensor_parallel" in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def check_a_killed_follower_fails_the_requests(llm, lost: str) -> None:
    """Kills the one follower of `llm` (two ranks) during a long generate: the requests fail with `lost` (a
    regex) within 30 s, every later request fails too, and this process lives on to shut down."""
    followers = follower_pids()
    assert len(followers) == 1
    killed_at = []

    def kill():
        time.sleep(0.3)
        os.kill(followers[0], signal.SIGKILL)
        killed_at.append(time.monotonic())

    many = [[5, 17, 42, i] for i in range(64)]  # far longer than 0.3 s
    threading.Thread(target=kill).start()
    with pytest.raises(RtllmError, match=lost):
        llm.generate(many, SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert killed_at and time.monotonic() - killed_at[0] < 30
    with pytest.raises(RtllmError, match="the tensor-parallel group is lost"):  # and so is every later request
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()
