"""Atomic file writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader (or a crash) sees either the old file or the complete new one, never a torn one. Files get the
usual permissions (0o666 less the umask), not the 0600 of a private temp file. With `no_clobber` an
existing target is never replaced: the write fails with FileExistsError instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile

from kintsugi_daemon.service import failpoints

__all__ = ["fsync_dir", "write_atomic", "write_json_atomic", "write_tiff_atomic"]


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(
    path: Path, write: Callable[[IO[bytes]], object], *, no_clobber: bool = False, sync_dir: bool = True
) -> None:
    """`sync_dir=False` leaves the folder's fsync to the caller (`fsync_dir`), who batches several
    renames into one; until then a crash may lose the rename, never tear the file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)  # reopened by name: tifffile wants a file object with a path
    try:
        with open(tmp, "wb") as fh:
            write(failpoints.tearing(fh, "file_write"))  # drills: torn half-way, then killed
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        if no_clobber:
            os.link(tmp, path)  # atomic and refuses an existing target (FileExistsError)
            Path(tmp).unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the renames in a folder durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_tiff_atomic(
    path: Path, array: np.ndarray, description: dict[str, Any], *, no_clobber: bool = False
) -> None:
    text = json.dumps(description)
    write_atomic(
        path, lambda fh: tifffile.imwrite(fh, array, description=text, metadata=None), no_clobber=no_clobber
    )


def write_json_atomic(path: Path, data: Any, *, no_clobber: bool = False) -> None:
    """Strict JSON: NaN or infinity raise ValueError before anything is written."""
    text = json.dumps(data, indent=2, allow_nan=False).encode()
    write_atomic(path, lambda fh: fh.write(text), no_clobber=no_clobber)
