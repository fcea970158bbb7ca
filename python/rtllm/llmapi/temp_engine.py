"""Temporary engines: the directory LLM(model=<HF checkpoint>) builds into and deletes on shutdown.

None is left behind by a process that ends early:
- SIGTERM and SIGHUP (whose default is to end the process without running Python cleanup) delete the
  live temporary engines, then end the process as the default action would;
- SIGINT raises KeyboardInterrupt as usual, and LLM's finalizer deletes them at exit (a handler
  deleting them at once would break a program that catches the interrupt and goes on);
- a SIGKILL runs nothing, so the next temporary engine created removes those of processes that are
  gone. Each directory (rtllm-engine-<pid>-<random>, the pid for people) holds a lock file its process
  keeps flock()ed: the kernel drops the lock when the process ends however it ends, so a lock that
  can be taken marks a stale directory, whatever pid reuse or pid namespaces (containers sharing
  $TMPDIR) say. A directory without the lock file (killed before it was made) falls back on its pid.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import tempfile
import threading

PREFIX = "rtllm-engine-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

LOCK_FILE = ".rtllm-owner.lock"
_live: dict = {}  # this process's temporary engines -> the descriptor holding their lock
_lock = threading.RLock()  # re-entrant: the signal handler may run while the main thread holds it
_installed: set = set()  # signals whose handler is ours


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _owner_gone(path: str, pid: int) -> bool:
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return not _pid_alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # held: its process runs
        return False
    finally:
        os.close(fd)


def sweep_stale(temp_root: str | None = None) -> list:
    """Deletes the temporary engines, owned by this user, of processes that no longer run; returns
    their paths."""
    temp_root = temp_root or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(temp_root))
    except OSError:
        return removed
    for entry in entries:
        match = _NAME.match(entry.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if _owner_gone(entry.path, int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def create() -> str:
    """A new temporary engine directory, registered for deletion on SIGTERM / SIGHUP; stale ones of
    dead processes are swept first."""
    sweep_stale()
    _install_handlers()
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
    with _lock:
        _live[path] = fd
    return path


def remove(path: str) -> None:
    with _lock:
        fd = _live.pop(path, None)
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None:
        os.close(fd)


def _forget_after_fork() -> None:
    # A forked child (a worker pool, say) does not own its parent's engines: its SIGTERM must not
    # delete them. Its copies of the descriptors keep the locks held while it runs, which is safe.
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork
    _live.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _on_signal(signum, frame) -> None:
    with _lock:
        paths = list(_live)
        _live.clear()
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    # Then what the default action does: the process ends, killed by this signal.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """Only in the main thread (where Python lets handlers be set) and only over the default action:
    a program's own handler (or SIG_IGN) decides itself whether the process ends; if it does, the
    LLM's finalizer deletes the engine at exit."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        if signum in _installed:
            continue
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _on_signal)
            _installed.add(signum)
