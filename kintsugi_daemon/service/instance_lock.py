"""One daemon per journal: an exclusive lock on `<journal>.lock`, held for the daemon's whole life.

Two daemons on one journal would both drive the instrument and interleave intents, and (with the same MQTT
client id) knock each other off the broker in turn. The second one is refused before it opens the journal,
with the first one's pid in the message. The lock is `flock`: the kernel drops it when the holder dies,
SIGKILL included, so a crash never leaves a stale lock behind; the pid in the file is only for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["AlreadyRunning", "InstanceLock"]


class AlreadyRunning(RuntimeError):
    """Another daemon holds the journal."""


class InstanceLock:
    def __init__(self, journal_file: Path) -> None:
        self.path = journal_file.with_name(journal_file.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> InstanceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            journal = self.path.with_name(self.path.name.removesuffix(".lock"))
            raise AlreadyRunning(
                f"another kintsugi daemon (pid {holder}) is using the journal {journal}; "
                "stop it first (two daemons on one journal would both drive the instrument)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
