"""`rtllm serve` as a subprocess for the server tests: a free loopback port, waiting for /health, and
stopping the process (terminate, then kill)."""
import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:  # the tiny race with another process is acceptable in tests
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, log_path, timeout_s: float) -> None:
    """Returns once GET url/health answers 200; fails with the server's log if the process exits or
    timeout_s passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"rtllm serve exited:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"rtllm serve did not start:\n{log_path.read_text()}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)


def stop(process: subprocess.Popen, timeout_s: float) -> None:
    """Terminates the process (if still running), killing it after timeout_s; reads its pipes to the end."""
    if process.poll() is None:
        process.terminate()
    try:
        process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
