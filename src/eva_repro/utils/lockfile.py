"""One writer per output directory: an exclusive lock held for the life of the process.

`train` takes `<output_dir>/.eva-repro.lock` and `extract` takes it in its shard directory
before touching anything. A second process (a requeued job beside the old one) stops with one
line naming the directory and the holder (host, pid, start time, command). The lock is a POSIX
record lock (`fcntl.lockf`): it belongs to the process that took it, is not inherited by the
children it forks (DataLoader workers), and the kernel drops it when that process exits however
it exits, so neither a file left by a killed process nor its still-running workers block the
next run. Ranks of one torchrun job are one writer: rank 0 holds it.

A record lock never conflicts with its own process, and closing *any* descriptor of the file
drops it, so a second lock on the same directory from the same process is refused here, before
the file is opened. On release the holder removes the lock file, and the directories the lock
created if nothing else was written in them: a command that fails leaves no trace. A process
that locked a file just unlinked by its holder sees the inode change and retries on the new one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from eva_repro.utils.errors import UserError

LOCK_NAME = ".eva-repro.lock"

_HELD: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of lock files this process holds -> holder


class DirectoryLocked(UserError):
    """Another live process writes to this directory (a one-line error)."""


def _refusal(directory: Path, holder: str) -> DirectoryLocked:
    return DirectoryLocked(f"{directory}: another process is writing here ({holder}); stop it "
                           "first, or use another output directory")


def refuse_a_file(directory: str | os.PathLike) -> None:
    """An --output_dir that names an existing file: one line, before anything is written."""
    if Path(directory).exists() and not Path(directory).is_dir():
        raise UserError(f"{directory}: is a file, not a directory; choose another --output_dir")


class DirectoryLock:
    def __init__(self, directory: str | os.PathLike, command: str):
        self.path = Path(directory) / LOCK_NAME
        self.command = command
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        self._created: list[Path] = []  # directories this lock made, innermost first

    def acquire(self) -> DirectoryLock:
        directory = self.path.parent
        refuse_a_file(directory)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            pass
        else:
            if (st.st_dev, st.st_ino) in _HELD:  # this process holds it: never open + close it
                raise _refusal(directory, _HELD[(st.st_dev, st.st_ino)])
        self._created = [p for p in (directory, *directory.parents) if not p.exists()]
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_created()
                raise _refusal(directory, holder) from None
            fst = os.fstat(fd)
            try:
                same = os.stat(self.path).st_ino == fst.st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file after we opened it: lock the new one
        info = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd, self._key = fd, (fst.st_dev, fst.st_ino)
        _HELD[self._key] = _describe(info)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # still holding the lock: nobody else can have taken this file
            if os.stat(self.path).st_ino == self._key[1]:
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the record lock
        _HELD.pop(self._key, None)
        self._fd = self._key = None
        self._remove_created()

    def _remove_created(self) -> None:
        """Remove the directories acquire() made, innermost first, while they are empty."""
        for directory in self._created:
            try:
                directory.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(info: dict) -> str:
    return (f"{info.get('command', '?')} on host {info.get('host', '?')}, pid "
            f"{info.get('pid', '?')}, since {info.get('started', '?')}")


def _read_holder(fd: int) -> str:
    try:
        return _describe(json.loads(os.pread(fd, 4096, 0) or b"{}"))
    except (OSError, ValueError):
        return "holder unknown"
