"""One writer per run folder: a lock file that names its holder (pid, host, command, start time).

The lock is an `fcntl.flock` on RUN_DIR/run.lock, so the kernel releases it when its holder dies, however
it dies (SIGKILL included): a lock left by a dead process is taken over, with a message naming it. The file's
JSON content is only the holder's description, for the refusal message and for people (`cat run.lock`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "run.lock"


class RunRefused(RuntimeError):
    """A run folder that cannot be used as asked (locked, damaged checkpoint): `vlmlab` says so in one line."""


class RunLocked(RunRefused):
    """Another live process is writing this run folder."""


def _holder_text(info: dict) -> str:
    if not info:
        return "an unknown process"
    return f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`, started {info.get('started')})"


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


@contextmanager
def run_lock(run_dir: str | Path, command: str | None = None, create: bool = True):
    """Holds RUN_DIR's lock for the `with` block; raises RunLocked naming the holder if a live process has it.

    Creates RUN_DIR (an empty folder changes no run); with create=False a missing folder is not locked (a
    command reading a run that is not there fails on its own). On exit the lock file is removed.
    """
    run_dir = Path(run_dir)
    if not create and not run_dir.is_dir():
        yield {}
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(
                f"{run_dir} is being written by {_holder_text(_read(path))}; wait for it to finish or stop it "
                f"(its lock: {path})"
            ) from None
        # the file may have been removed (its holder finished) between our open and our flock: lock the new one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read(path)
    if previous:  # a holder that ended without removing its file: killed, or crashed hard
        print(f"{run_dir}: taking over the lock left by {_holder_text(previous)}, which is no longer running")
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    try:
        yield info
    finally:
        try:
            path.unlink()  # while still holding it, so nobody locks a file about to vanish unnoticed
        except FileNotFoundError:
            pass
        os.close(fd)
