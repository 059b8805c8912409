"""The run in progress as the controller and its helpers see it, and the errors they signal each other."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kintsugi_daemon.config import Recipe
from kintsugi_daemon.drivers.base import Acquisition
from kintsugi_daemon.service.storage import RunStorage
from kintsugi_daemon.states.annotation import LeastConfident

__all__ = ["ActiveRun", "CommandRefused", "Interrupted", "Refused"]

# Triggers after which the slice in progress no longer measures the instrument's pace.
INTERRUPTING = frozenset({"pause", "paused", "suspend", "fault", "halt", "recovered"})


class CommandRefused(Exception):
    """A command that the current state does not allow, or whose arguments are wrong; nothing changed."""


class Interrupted(Exception):
    """The current step was cut short on purpose (immediate pause, abort, halt)."""


class Refused(Exception):
    """Preflight refused the run before the instrument was touched."""


@dataclass
class ActiveRun:
    run_id: str
    recipe: Recipe
    storage: RunStorage
    total: int
    next_slice: int = 0
    started: float = field(default_factory=time.time)
    slice_times: list[float] = field(default_factory=list)  # periods of uninterrupted slices (the ETA)
    slice_interrupted: bool = False  # paused, suspended or faulted since the slice began
    acquisition: Acquisition | None = None  # the last image, for segmentation
    face_m: float = 0.0
    least_confident: LeastConfident = field(default_factory=LeastConfident)  # slices to annotate

    def record_period(self, period_s: float) -> None:
        """A finished slice's period, for the ETA, unless waiting for an operator or a guard was in it."""
        if not self.slice_interrupted:
            self.slice_times.append(period_s)
        self.slice_interrupted = False
