"""Sizing a specimen for a run and building the simulator around it (shared by `serve` and `dataset`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kintsugi_daemon.instrument import SEM_FIB_ANGLE_DEG
from simulator.faults import FaultSpec
from simulator.instrument import SimulatedDualBeam, SimulatorSettings
from simulator.operations import depth_ahead_vox
from simulator.specimen import PRESETS, SpecimenParams, build_specimen, default_cache_dir

__all__ = ["RunSize", "make_simulator", "specimen_params"]

MARGIN_VOX = 16


@dataclass(frozen=True)
class RunSize:
    """What the specimen must cover: the field of view and the number of slices."""

    width_px: int = 1536
    height_px: int = 1024
    pixel_size_m: float = 40e-9
    slices: int = 200
    slice_thickness_m: float = 40e-9
    voxel_size_m: float = 40e-9

    def __post_init__(self) -> None:
        for name in ("width_px", "height_px", "slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("pixel_size_m", "slice_thickness_m", "voxel_size_m"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 1e-9 <= value <= 1e-6):
                raise ValueError(f"{name} must be between 1e-9 and 1e-6 m, got {value!r}")


def specimen_params(
    size: RunSize, *, preset: str, seed: int, geometry: Literal["cross_section", "planar"]
) -> SpecimenParams:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    v = size.voxel_size_m

    def vox(length_m: float) -> int:
        return math.ceil(length_m / v - 1e-6)  # 1536 px of 40 nm is 1536 voxels, not 1537

    cols = vox(size.width_px * size.pixel_size_m)
    rows_m = size.height_px * size.pixel_size_m
    if geometry == "cross_section":
        rows_m /= math.sin(math.radians(SEM_FIB_ANGLE_DEG))  # the face is seen foreshortened
    rows = vox(rows_m) + MARGIN_VOX
    # The run (1.2: thickness scatter) plus what the beam sees behind the last face (pore-back reach).
    slices = vox(size.slices * size.slice_thickness_m * 1.2) + depth_ahead_vox(v) + MARGIN_VOX
    return SpecimenParams(
        preset=preset, seed=seed, shape=(slices, rows, cols), voxel_size_m=v, geometry=geometry
    )


def make_simulator(
    size: RunSize,
    *,
    preset: str = "96:2:2",
    seed: int = 0,
    geometry: Literal["cross_section", "planar"] = "cross_section",
    time_scale: float = 1.0,
    cache_dir: Path | None = None,
    faults: list[FaultSpec] | None = None,
    progress: Callable[[float], None] | None = None,
    infiltration_coverage: float = 1.0,
    thermal_drift: bool = True,
) -> SimulatedDualBeam:
    params = specimen_params(size, preset=preset, seed=seed, geometry=geometry)
    specimen = build_specimen(params, cache_dir=cache_dir or default_cache_dir(), progress=progress)
    settings = SimulatorSettings(
        time_scale=time_scale,
        seed=seed,
        serial=f"SIM-{seed:04d}",
        infiltration_coverage=infiltration_coverage,
        thermal_drift=thermal_drift,
    )
    return SimulatedDualBeam(specimen, settings, faults)
