"""Failpoints for the crash drills: stop the daemon dead at a named point so a drill can SIGKILL it there,
and know it did.

Off unless `KINTSUGI_FAILPOINT=<name>[@<n>]` is in the environment (the daemon's unit never sets it): the
n-th pass (1-based, default 1) through `hit(<name>)` creates the file named by `KINTSUGI_FAILPOINT_MARK`
and then blocks its thread for good, as a process stuck in a write or a commit would, until the drill
kills it. The points are where a crash hurts most: inside an atomic file write, after the data and before
the fsync and rename (`file_write`), and inside a journal transaction before COMMIT (`journal_commit`).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

__all__ = ["FAILPOINT_ENV", "MARK_ENV", "hit"]

FAILPOINT_ENV = "KINTSUGI_FAILPOINT"
MARK_ENV = "KINTSUGI_FAILPOINT_MARK"

_lock = threading.Lock()
_passes: dict[str, int] = {}


def hit(name: str) -> None:
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    with _lock:
        _passes[name] = count = _passes.get(name, 0) + 1
    if count != int(nth or 1):
        return
    mark = os.environ.get(MARK_ENV)
    if mark:
        Path(mark).write_text(f"{name}@{count} pid {os.getpid()}\n")
    while True:  # wait here for the drill's SIGKILL
        time.sleep(3600)
