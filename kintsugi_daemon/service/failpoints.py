"""Failpoints for the crash drills: stop the daemon dead at a named point so a drill can SIGKILL it there,
and know it did.

Off unless `KINTSUGI_FAILPOINT=<name>[@<n>]` is in the environment (the daemon's unit never sets it): the
n-th pass (1-based, default 1) through `hit(<name>)` creates the file named by `KINTSUGI_FAILPOINT_MARK`
and then blocks its thread for good, as a process stuck in a write or a commit would, until the drill
kills it. The points are where a crash hurts most: inside an atomic file write, half-way through the
first chunk of data (`file_write`: the file is torn), and inside a journal transaction before COMMIT
(`journal_commit`).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import IO, NoReturn

__all__ = ["FAILPOINT_ENV", "MARK_ENV", "armed", "hit", "stop", "tearing"]

FAILPOINT_ENV = "KINTSUGI_FAILPOINT"
MARK_ENV = "KINTSUGI_FAILPOINT_MARK"

_lock = threading.Lock()
_passes: dict[str, int] = {}


def armed(name: str) -> bool:
    """Count a pass through point `name`; True when this is the pass the environment asks to stop at."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec:
        return False
    target, _, nth = spec.partition("@")
    if target != name:
        return False
    with _lock:
        _passes[name] = count = _passes.get(name, 0) + 1
    return count == int(nth or 1)


def stop(name: str) -> NoReturn:
    """Say so (the mark file) and block this thread until the drill's SIGKILL."""
    mark = os.environ.get(MARK_ENV)
    if mark:
        Path(mark).write_text(f"{name} pid {os.getpid()}\n")
    while True:
        time.sleep(3600)


def hit(name: str) -> None:
    if armed(name):
        stop(name)


def tearing(fh: IO[bytes], name: str) -> IO[bytes]:
    """`fh`, or, on the armed pass, a stand-in that writes half of the first chunk and stops: a file
    torn mid-write, as a crash leaves it."""
    return _Torn(fh, name) if armed(name) else fh  # type: ignore[return-value]


class _Torn:
    def __init__(self, fh: IO[bytes], name: str) -> None:
        self._fh = fh
        self._name = name

    def write(self, data: bytes) -> int:
        if len(data) > 1:
            self._fh.write(bytes(data)[: len(data) // 2])
            self._fh.flush()
            stop(self._name)
        return self._fh.write(data)

    def __getattr__(self, attr: str) -> object:
        return getattr(self._fh, attr)
