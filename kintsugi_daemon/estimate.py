"""What a recipe will cost: instrument time per slice, the run's ETA and the disk it needs."""

from __future__ import annotations

from dataclasses import dataclass

from kintsugi_daemon import instrument as timing
from kintsugi_daemon.config import Recipe
from kintsugi_daemon.service.storage import estimate_slice_bytes

__all__ = ["RunEstimate", "estimate_run", "slice_bytes"]


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
