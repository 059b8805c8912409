"""Observation histories for the policy tests: a scenario is written as the per-slice values that matter
and the rest is filled with a clean, in-focus, on-target slice."""

from __future__ import annotations

from typing import Any

from kintsugi_daemon.adapt.decisions import initial_settings
from kintsugi_daemon.adapt.observations import (
    FiducialMatch,
    ImageMeasures,
    Observation,
    SegmentationObservation,
    SliceSettings,
)
from kintsugi_daemon.config import Recipe, parse_recipe
from kintsugi_daemon.instrument import SIN_SEM_FIB

ADAPTIVE = """
[run]
name = "adaptive"
slices = 400
[roi]
width_m = 50e-6
height_m = 20e-6
[adapt]
policy = "adaptive"
"""

LIMIT_M = 10e-6


def adaptive_recipe(extra: str = "") -> Recipe:
    return parse_recipe(ADAPTIVE + extra)


def observation(
    recipe: Recipe,
    index: int,
    *,
    face_m: float | None = None,
    settings: dict[str, Any] | None = None,
    shift_px: tuple[float, float] = (0.0, 0.0),
    score: float = 0.98,
    fiducial: bool = True,
    sharpness: float = 1.0,
    stripes: float = 0.01,
    rose: float = 1.5,
    saturation: float = 0.0,
    unfilled: float | None = None,
    collector: float = 0.0,
    outside: float = 0.0,
    infiltration_m: float | None = None,
) -> Observation:
    target = recipe.run.slice_thickness_m
    base = initial_settings(recipe).model_dump() | {"deposit_pt": index == 0}
    dets = recipe.imaging.detectors
    return Observation(
        slice_index=index,
        settings=SliceSettings.model_validate(base | (settings or {})),
        face_position_m=(index + 1) * target if face_m is None else face_m,
        thickness_m=target if index else None,
        target_thickness_m=target,
        working_distance_m=4e-3,
        beam_shift_limit_m=LIMIT_M,
        pixel_size_m=recipe.imaging.pixel_size_m,
        pixel_size_y_m=recipe.imaging.pixel_size_m / SIN_SEM_FIB,
        infiltration_depth_m=infiltration_m,
        fiducial=FiducialMatch(shift_x_px=shift_px[0], shift_y_px=shift_px[1], score=score)
        if fiducial
        else None,
        images=ImageMeasures(
            sharpness=dict.fromkeys(dets, sharpness),
            saturation=dict.fromkeys(dets, saturation),
            stripe_energy=dict.fromkeys(dets, stripes),
            snr=dict.fromkeys(dets, 30.0),
            rose_ratio=dict.fromkeys(dets, rose),
        ),
        segmentation=None
        if unfilled is None
        else SegmentationObservation(
            unfilled_pore_share=unfilled,
            porosity=0.3,
            fraction_collector=collector,
            outside_fraction=outside,
            confidence=0.9,
        ),
    )


def clean_history(recipe: Recipe, n: int, **overrides: Any) -> list[Observation]:
    """n clean slices, Pt deposited on slice 0 reaching 2 um, all segmented with no unfilled pores."""
    return [
        observation(recipe, i, unfilled=0.0, infiltration_m=2e-6 if i == 0 else None, **overrides)
        for i in range(n)
    ]
