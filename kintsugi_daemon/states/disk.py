"""A full disk is a guard, not a crash: recognise it wherever it surfaces, and keep a reserve so the
journal can still record the suspension.

A full disk shows up as `storage.DiskFull` (the check before an image), as an OSError ENOSPC/EDQUOT from
a file write, or as SQLite's "database or disk is full" from any journal commit. With nothing free the
journal could not even write "suspended", so the daemon keeps a reserve file beside the run folders:
when the disk fills it deletes the reserve, which leaves room to journal the failed step, the suspension
and its alert; the disk guard counts the missing reserve as used, so it stays tripped until the disk has
room for the reserve again, and the reserve is put back before the run resumes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path

from kintsugi_daemon.service.storage import DiskFull

__all__ = ["RESERVE_BYTES", "DiskReserve", "is_disk_full"]

RESERVE_BYTES = 2 * 1024 * 1024  # a few hundred journal transactions: the suspension needs a handful
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_disk_full(cause)


class DiskReserve:
    """`<data_root>/.kintsugi-disk-reserve`: RESERVE_BYTES kept allocated while the disk has room."""

    def __init__(self, data_root: Path) -> None:
        self.path = data_root / ".kintsugi-disk-reserve"

    @property
    def missing_bytes(self) -> int:
        """How much of the reserve is not in place (counted as used by the disk guard)."""
        try:
            return max(RESERVE_BYTES - self.path.stat().st_blocks * 512, 0)
        except FileNotFoundError:
            return RESERVE_BYTES

    def ensure(self) -> bool:
        """Put the reserve in place; False (and nothing left behind) when the disk has no room for it."""
        if self.missing_bytes == 0:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            self.release()
            return False
        return True

    def release_if_full(self, exc: BaseException) -> bool:
        """Whether `exc` means a full disk; if so the reserve is released to make room."""
        if not is_disk_full(exc):
            return False
        self.release()
        return True

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
