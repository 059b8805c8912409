"""What a recipe will cost: instrument time per slice, the run's ETA and the disk it needs."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from kintsugi_daemon import instrument as timing
from kintsugi_daemon.config import Recipe
from kintsugi_daemon.service.storage import estimate_slice_bytes

__all__ = ["RunEstimate", "SlicePace", "estimate_run", "slice_bytes"]


@dataclass(frozen=True)
class RunEstimate:
    slices: int
    seconds_per_slice: float
    total_s: float
    bytes_per_slice: int
    total_bytes: int
    breakdown_s: dict[str, float]


def slice_bytes(recipe: Recipe) -> int:
    """Disk one slice of this recipe takes (storage's own estimate, so validate and the guard agree)."""
    img, seg = recipe.imaging, recipe.segmentation.enabled
    return estimate_slice_bytes(img.width_px, img.height_px, len(img.detectors), seg, with_preview=seg)


def estimate_run(recipe: Recipe) -> RunEstimate:
    run, roi, img = recipe.run, recipe.roi, recipe.imaging
    volume = roi.width_m * roi.height_m * run.slice_thickness_m
    mill = timing.mill_time_s(volume, recipe.mill.current_a, recipe.mill.species, recipe.mill.application)
    polish = 0.0
    if recipe.polish.passes:
        polish_volume = roi.width_m * roi.height_m * timing.POLISH_REMOVAL_M * recipe.polish.passes
        polish = timing.mill_time_s(polish_volume, recipe.polish.current_a, recipe.mill.species, "si")
        polish += 2.0 * recipe.polish.passes
    deposit = 0.0
    if recipe.pt.every_slices:
        warmup = max(recipe.pt.gis_temperature_k - timing.AMBIENT_K, 0.0)
        deposit = timing.deposit_time_s(recipe.pt.thickness_m, recipe.pt.beam, warmup, gis_inserted=False)
        deposit /= recipe.pt.every_slices
    frame = timing.frame_time_s(img.width_px, img.height_px, img.dwell_s, img.line_integration)
    breakdown = {"deposit_pt": deposit, "mill": mill, "polish": polish, "image": frame}
    per_slice = sum(breakdown.values())
    n = run.total_slices
    per_bytes = slice_bytes(recipe)
    return RunEstimate(n, per_slice, per_slice * n, per_bytes, per_bytes * n, breakdown)


@dataclass
class SlicePace:
    """Seconds per slice as the run measures them, for an ETA that holds still and says how sure it is.

    Before the first slice the recipe's estimate is all there is. Then the median of the last `window`
    measured slice periods takes over: one slow slice (an autofocus, a re-deposition) moves a median
    little, where the mean of a few periods jumped by tens of minutes. The spread is the periods'
    median absolute deviation (x 1.4826: a standard deviation for normal scatter), carried to the
    remaining slices as the uncertainty of the pace (shrinking as 1/sqrt(n) with more slices measured)
    plus their own slice-to-slice scatter (growing as sqrt(remaining)). The caller leaves out periods
    that include a pause or a suspend: waiting for the operator is not the instrument's pace."""

    prior_s: float
    window: int = 15
    prior_spread: float = 0.3  # the timing model's own uncertainty before anything is measured
    periods: list[float] = field(default_factory=list)

    def observe(self, period_s: float) -> None:
        if math.isfinite(period_s) and period_s > 0:
            self.periods.append(period_s)
            del self.periods[: -self.window]

    def per_slice_s(self) -> float:
        return statistics.median(self.periods) if self.periods else self.prior_s

    def eta(self, remaining: int) -> tuple[float, float]:
        """(ETA, its one-sigma uncertainty) in seconds for `remaining` slices."""
        pace = self.per_slice_s()
        n = len(self.periods)
        if n >= 3:
            scatter = 1.4826 * statistics.median(abs(p - pace) for p in self.periods)
            pace_sigma = scatter / math.sqrt(n)
        elif n:
            scatter = pace_sigma = self.prior_spread * pace / math.sqrt(n)
        else:
            scatter, pace_sigma = 0.0, self.prior_spread * pace
        sigma = math.hypot(remaining * pace_sigma, math.sqrt(remaining) * scatter)
        return remaining * pace, sigma
