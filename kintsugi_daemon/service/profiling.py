"""Where the daemon's time goes: named spans on the system-wide monotonic clock, off unless asked for.

The idle-time and overhead benchmarks attribute every gap between the instrument's operations to what
the daemon was doing (journal commits, file writes, instrument round trips, waiting for segmentation,
decisions, MQTT). Spans use `time.monotonic()`, the clock the simulator stamps its busy intervals with
(CLOCK_MONOTONIC is system-wide on Linux), so the two logs line up without clock sync.

Off by default (one `None` check per span). In-process callers `enable()` it; `kintsugi serve` records
when `KINTSUGI_PROFILE` names a file, written as JSON lines when the service stops.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

__all__ = ["PROFILE_ENV", "Span", "disable", "dump", "enable", "enable_from_env", "record", "span"]

PROFILE_ENV = "KINTSUGI_PROFILE"
MAX_SPANS = 2_000_000  # ~100 spans a slice: a 12-hour night at 5 s a slice fits; beyond, spans are dropped


class Span(NamedTuple):
    kind: str
    start_s: float
    end_s: float


_spans: list[Span] | None = None


def enable() -> list[Span]:
    """Start recording (again, empty) and return the live list of spans."""
    global _spans
    _spans = []
    return _spans


def disable() -> None:
    global _spans
    _spans = None


def enable_from_env() -> Path | None:
    """Record when $KINTSUGI_PROFILE names a file; return that file."""
    target = os.environ.get(PROFILE_ENV)
    if not target:
        return None
    enable()
    return Path(target)


def record(kind: str, start_s: float, end_s: float) -> None:
    if _spans is not None and len(_spans) < MAX_SPANS:
        _spans.append(Span(kind, start_s, end_s))


@contextmanager
def span(kind: str) -> Iterator[None]:
    if _spans is None:
        yield
        return
    t0 = time.monotonic()
    try:
        yield
    finally:
        record(kind, t0, time.monotonic())


def dump(path: Path) -> int:
    """Write the spans as JSON lines (kind, start_s, end_s); return how many."""
    spans = list(_spans or [])
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for s in spans:
            f.write(json.dumps(s._asdict()) + "\n")
    os.replace(tmp, path)
    return len(spans)
