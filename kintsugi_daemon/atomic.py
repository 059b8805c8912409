"""Atomic file writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader (or a crash) sees either the old file or the complete new one, never a torn one.
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

__all__ = ["write_atomic", "write_json_atomic", "write_tiff_atomic"]


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)  # reopened by name: tifffile wants a file object with a path
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_tiff_atomic(path: Path, array: np.ndarray, description: dict[str, Any]) -> None:
    write_atomic(
        path, lambda fh: tifffile.imwrite(fh, array, description=json.dumps(description), metadata=None)
    )


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, lambda fh: fh.write(json.dumps(data, indent=2).encode()))
