"""Preemption: SIGTERM or SIGUSR1 asks a long job to stop at its next safe point.

Schedulers warn before they kill: Slurm sends SIGTERM (or the signal of `--signal`, e.g.
`USR1@120`) and SIGKILL after a grace period; Kubernetes sends SIGTERM and SIGKILL after
`terminationGracePeriodSeconds`. `train` finishes the step it is in, writes a checkpoint and
exits with EXIT_PREEMPTED, so a requeued job continues the same trajectory with `--resume auto`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, run it again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The job stopped on a signal after saving its work; the CLI exits with EXIT_PREEMPTED."""


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """For DataLoader workers: a scheduler signals the whole process group, and a worker killed
    by it would fail the main process before it saves. Workers exit with the main process."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Context manager: while inside, SIGTERM / SIGUSR1 set `received` instead of killing.

    Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
