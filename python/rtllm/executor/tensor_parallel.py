"""Tensor-parallel process groups for LLM(tensor_parallel_size=N): one process per rank, MPI between them.

Two ways to start one:
- from a single process: rank 0 (the caller) spawns N - 1 follower processes running this module
  (`MPI_Comm_spawn`, through rtllm._core; on a host without MPI, or with RTLLM_TP_TRANSPORT=socket, plain
  child processes joined over local TCP sockets);
- inside `mpirun -n N python app.py`: every process runs the application; rank 0's LLM serves it, and the
  other ranks' LLM(...) calls become followers and end their process when rank 0 shuts down.

Rank 0 then broadcasts where the engine is (an HF checkpoint is first built into a temporary engine
directory, one rank at a time), every rank loads its own rank{N}.engine, and the followers run each step
rank 0's executor broadcasts (rtllm._core.run_tensor_parallel_follower) until it stops the group.
"""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

FOLLOWER_COMMAND = [sys.executable, "-m", "rtllm.executor.tensor_parallel"]
# Followers started over sockets, reaped at exit (each ends when rank 0 stops its group, or loses it).
_SOCKET_FOLLOWERS: list = []


def launched_by_mpirun() -> bool:
    return any(name in os.environ for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def world_or_none():
    """The communicator of an `mpirun` launch of more than one process, else None (without initialising MPI
    when no launcher started this process)."""
    from rtllm import _core

    if not _core.mpi_available() or not launched_by_mpirun():
        return None
    world = _core.mpi_world_communicator()
    return world if world.size > 1 else None


def transport() -> str:
    """"mpi" or "socket": RTLLM_TP_TRANSPORT when set, else MPI where this build has it."""
    from rtllm import _core

    chosen = os.environ.get("RTLLM_TP_TRANSPORT", "")
    if chosen not in ("", "mpi", "socket"):
        raise ValueError(f"RTLLM_TP_TRANSPORT={chosen!r} must be 'mpi' or 'socket'")
    if chosen == "mpi" and not _core.mpi_available():
        raise ValueError("RTLLM_TP_TRANSPORT=mpi, and this rtllm was built without MPI (install OpenMPI's "
                         "development files, e.g. libopenmpi-dev, and reinstall rtllm)")
    return chosen or ("mpi" if _core.mpi_available() else "socket")


def start_group(tp_size: int):
    """Rank 0's communicator of a group of tp_size ranks, spawning N - 1 followers (outside an mpirun
    launch): through MPI_Comm_spawn, or as child processes joined over local sockets (transport())."""
    from rtllm import _core

    if transport() == "mpi":
        allow_spawning()
        return _core.mpi_spawn(tp_size - 1, FOLLOWER_COMMAND)
    listen_fd, port = _core.socket_listen()
    followers = []
    try:
        for rank in range(1, tp_size):
            env = dict(os.environ, RTLLM_TP_PORT=str(port), RTLLM_TP_RANK=str(rank), RTLLM_TP_SIZE=str(tp_size))
            followers.append(subprocess.Popen(FOLLOWER_COMMAND, env=env))
        group = _core.socket_accept(listen_fd, tp_size)
    except BaseException:
        for process in followers:
            process.kill()
            process.wait()
        raise
    if not _SOCKET_FOLLOWERS:
        atexit.register(_reap_followers)
    _SOCKET_FOLLOWERS.extend(followers)
    return group


def _reap_followers() -> None:
    for process in _SOCKET_FOLLOWERS:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def allow_spawning() -> None:
    """Open MPI's launcher, which MPI_Comm_spawn starts, refuses to run as root (containers, CI) unless
    told, and refuses more processes than cores: the followers are idle while rank 0 builds, and share the
    cores with it (num_threads splits them). Set before MPI starts; the user's own settings win."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")


def prepare_engine_dir(model: str, is_engine: bool, tp_size: int, build) -> tuple:
    """(engine_dir, temporary): an engine directory of tp_size ranks for `model`. An engine (is_engine) must
    have been built for tp_size ranks; anything else is built by build(output_dir) into a temporary
    directory, which the caller removes at shutdown."""
    from rtllm.builder.engine import CONFIG_FILE, tp_size_of

    if is_engine:
        with open(os.path.join(model, CONFIG_FILE)) as f:
            built_for = tp_size_of(json.load(f))
        if built_for != tp_size:
            raise ValueError(f"the engine {model} was built for tp_size={built_for}, not "
                             f"tensor_parallel_size={tp_size}: rebuild it with rtllm build --tp-size {tp_size}")
        return model, False
    engine_dir = tempfile.mkdtemp(prefix="rtllm-tp-engine-")
    try:
        build(engine_dir)
    except BaseException:
        shutil.rmtree(engine_dir, ignore_errors=True)
        raise
    return engine_dir, True


def send_setup(group, engine_dir: str) -> None:
    """Rank 0: tells the followers which engine to load."""
    group.broadcast(json.dumps({"engine_dir": os.path.abspath(engine_dir)}).encode(), 0)


def send_abort(group, reason: str) -> None:
    """Rank 0, when it cannot start: the followers end instead of waiting for an engine."""
    try:
        group.broadcast(json.dumps({"abort": reason}).encode(), 0)
        group.disconnect()
    except Exception:  # a follower that is gone has nothing to end
        pass


def follow(group) -> None:
    """A follower rank: waits for rank 0's setup (as long as rank 0 lives), loads its shard and runs the steps
    until rank 0 stops the group."""
    from rtllm import _core

    setup = json.loads(group.broadcast_wait(b"", 0).decode())
    if "abort" in setup:
        group.disconnect()
        return
    engine = _core.Engine.load(setup["engine_dir"], group.rank)
    runtime = _core.RuntimeConfig()  # the limits and KV pool come from rank 0 with the first message
    runtime.communicator = group
    _core.run_tensor_parallel_follower(engine, runtime)


def main() -> None:
    """The process rank 0 spawns."""
    from rtllm import _core

    if "RTLLM_TP_PORT" in os.environ:  # started by start_group over sockets
        group = _core.socket_connect(int(os.environ["RTLLM_TP_PORT"]), int(os.environ["RTLLM_TP_RANK"]),
                                     int(os.environ["RTLLM_TP_SIZE"]))
    else:
        group = _core.mpi_parent_communicator()
    if group is None:
        sys.exit("rtllm.executor.tensor_parallel runs as a follower that LLM(tensor_parallel_size=N) spawns")
    try:
        follow(group)
    except Exception as e:  # rank 0 reports the lost group on its side; say why here too
        print(f"rtllm tensor-parallel rank {group.rank}: {e}", file=sys.stderr)
        sys.exit(1)  # (rtllm skips MPI_Finalize at exit once a group is lost: it would wait for the gone)


if __name__ == "__main__":
    main()
