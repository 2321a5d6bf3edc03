"""One writer per output directory: an exclusive lock held for the life of the process.

`train` takes `<output_dir>/.eva-repro.lock` and `extract` takes it in its shard directory
before touching anything. A second process (a requeued job beside the old one) stops with one
line naming the directory and the holder (host, pid, start time, command). The lock is an
`flock` on the open file, released by the kernel when the holder exits however it exits, so a
file left by a killed process never blocks the next run. Ranks of one torchrun job are one
writer: rank 0 holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from eva_repro.errors import UserError

LOCK_NAME = ".eva-repro.lock"


class DirectoryLocked(UserError):
    """Another live process writes to this directory (a one-line error)."""


class DirectoryLock:
    def __init__(self, directory: str | os.PathLike, command: str):
        self.path = Path(directory) / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DirectoryLocked(
                f"{self.path.parent}: another process is writing here ({holder}); stop it first, "
                "or use another output directory") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, harmlessly
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"{info.get('command', '?')} on host {info.get('host', '?')}, pid "
                f"{info.get('pid', '?')}, since {info.get('started', '?')}")
    except (OSError, ValueError):
        return "holder unknown"
