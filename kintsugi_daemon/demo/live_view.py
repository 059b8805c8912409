"""`kintsugi demo`'s live view: what it learns from MQTT while the run goes on (progress bar or lines,
alerts, the last segmentation metrics, the end of the run)."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from kintsugi_daemon.cli.remote import DaemonView

__all__ = ["RunWatch", "duration"]


@dataclass
class RunWatch:
    """What the demo learns from MQTT while the run goes on."""

    total: int
    tty: bool
    run_id: str | None = None
    finished: dict[str, Any] | None = None
    finished_event: asyncio.Event = field(default_factory=asyncio.Event)
    saw_done: bool = False
    faulted: str | None = None
    lost: str | None = None
    stop_on_fault: bool = True
    started: float | None = None  # monotonic time the run was started
    done: int = 0
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    seen: set[int] = field(default_factory=set)
    events: int = 0
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)
    _drawn: str = ""

    def on_update(self, view: DaemonView) -> bool:
        self.subscribed.set()
        status = view.status or {}
        if self.run_id is None and view.progress and view.progress.get("run_id"):
            self.run_id = str(view.progress["run_id"])
        for alert_id, alert in view.alerts.items():
            if alert_id not in self.alerts:
                self.alerts[alert_id] = alert
                self._line(f"ALERT [{alert.get('severity')}] {alert_id}: {alert.get('message')}")
        for event in view.events:
            seq = int(event.get("seq", -1))
            if seq in self.seen:
                continue
            self.seen.add(seq)
            self._event(event, view)
        if self.stop_on_fault and self.run_id is not None and status.get("path") == "faulted":
            self.faulted = str(status.get("reason") or "fault")
            return True
        if status.get("state") in ("lost", "offline"):
            self.lost = str(status.get("state"))
            return True
        if self.tty:
            self._draw(view)
        # run_finished is followed by the `done` state event of the same transaction; wait for it so the
        # count of events seen is whole (a refused run has no `done`; _watch_run bounds the wait anyway).
        return self.finished is not None and (self.saw_done or self.finished.get("how") == "refused")

    def _event(self, event: dict[str, Any], view: DaemonView) -> None:
        kind = str(event.get("type", "")).removeprefix("kintsugi.")
        data = event.get("data") or {}
        if self.run_id is None and event.get("run_id"):
            self.run_id = str(event["run_id"])  # the first event of the run (run_created)
        if event.get("run_id") != self.run_id or self.run_id is None:
            return
        self.events += 1
        if kind == "segmented":
            self.last_metrics = {k: v for k, v in data.items() if isinstance(v, int | float)}
        elif kind == "slice_completed":
            self.done = int(data.get("slice", self.done)) + 1
            if not self.tty:
                width = len(str(self.total))
                print(
                    f"slice {self.done:>{width}}/{self.total}  ETA {self._eta()}{self._metrics_text()}",
                    file=sys.stderr,
                    flush=True,
                )
        elif kind == "run_finished":
            self.finished = data
            self.finished_event.set()
        elif kind == "done":
            self.saw_done = True

    def _eta(self) -> str:
        """From this run's own wall-clock pace: the daemon's first estimate is at the instrument's pace,
        which a time-scaled simulator does not keep."""
        if self.started is None or self.done == 0:
            return "?"
        per_slice = (time.monotonic() - self.started) / self.done
        return duration(per_slice * (self.total - self.done))

    def _metrics_text(self) -> str:
        m = self.last_metrics
        if "porosity" not in m:
            return ""
        text = f"  porosity {m['porosity']:.3f}"
        if "unfilled_pore_share" in m:
            text += f"  unfilled {m['unfilled_pore_share']:.3f}"
        return text

    def _draw(self, view: DaemonView, width: int = 28) -> None:
        p = view.progress or {}
        done = max(self.done, int(p.get("slice") or 0) if p.get("run_id") == self.run_id else 0)
        filled = int(width * done / max(self.total, 1))
        step = p.get("step") or (view.status or {}).get("path") or ""
        line = (
            f"[{'#' * filled}{'-' * (width - filled)}] slice {done}/{self.total}  {step:<12.12}"
            f"  ETA {self._eta()}{self._metrics_text()}"
        )
        if line != self._drawn:
            self._drawn = line
            print("\r\x1b[K" + line, end="", file=sys.stderr, flush=True)

    def _line(self, text: str) -> None:
        """A line that must not be overwritten by the redrawn bar."""
        prefix = "\r\x1b[K" if self.tty and self._drawn else ""
        print(prefix + text, file=sys.stderr, flush=True)
        self._drawn = ""

    def end_bar(self) -> None:
        if self.tty and self._drawn:
            print(file=sys.stderr, flush=True)
            self._drawn = ""


def duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
