"""The run in progress as the controller and its helpers see it, and the errors they signal each other."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kintsugi_daemon.adapt.loop import AdaptLoop
from kintsugi_daemon.config import Recipe
from kintsugi_daemon.drivers.base import Acquisition
from kintsugi_daemon.instrument import BEAM_SHIFT_LIMIT_M
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
    adapt: AdaptLoop = field(init=False)  # observations, decisions and the settings of each slice

    def __post_init__(self) -> None:
        self.adapt = AdaptLoop(self.recipe, BEAM_SHIFT_LIMIT_M)

    def slice_recipe(self, index: int) -> Recipe:
        """The recipe slice `index` is done with: the adaptive settings in the recipe's own fields (mill
        thickness and current, polish passes, dwell, line integration), so every step builds its request
        the one way. Under the fixed policy it is the recipe itself."""
        if self.recipe.adapt.policy == "fixed":
            return self.recipe
        s = self.adapt.settings_for(index)
        r = self.recipe
        return r.model_copy(
            update={
                "run": r.run.model_copy(update={"slice_thickness_m": s.mill_thickness_m}),
                "mill": r.mill.model_copy(update={"current_a": s.mill_current_a}),
                "polish": r.polish.model_copy(update={"passes": s.polish_passes}),
                "imaging": r.imaging.model_copy(
                    update={"dwell_s": s.dwell_s, "line_integration": s.line_integration}
                ),
            }
        )

    def record_period(self, period_s: float) -> None:
        """A finished slice's period, for the ETA, unless waiting for an operator or a guard was in it."""
        if not self.slice_interrupted:
            self.slice_times.append(period_s)
        self.slice_interrupted = False
