"""Property test (a seeded random loop, no extra dependency): every policy driven by random observation
histories and random recipe bounds never decides a value outside the recipe's bounds, and the closed
loop (each slice done with the settings the last decisions produced) never leaves them either."""

from __future__ import annotations

import random

import pytest

from kintsugi_daemon.adapt import LAG, decide, next_settings
from kintsugi_daemon.adapt.decisions import Decision, initial_settings
from kintsugi_daemon.adapt.observations import (
    FiducialMatch,
    ImageMeasures,
    Observation,
    SegmentationObservation,
    SliceSettings,
)
from kintsugi_daemon.config import ConfigError, Recipe, parse_recipe

SEEDS = range(60)


def random_recipe(rng: random.Random) -> Recipe:
    lo = rng.uniform(2e-9, 30e-9)
    hi = rng.uniform(50e-9, 300e-9)
    dwell = rng.uniform(0.5e-6, 5e-6)
    current = rng.uniform(2e-9, 60e-9)
    passes = rng.randint(0, 3)
    text = f"""
[run]
name = "random"
{"slices = 300" if rng.random() < 0.5 else f"target_depth_m = {rng.uniform(0.5e-6, 20e-6)!r}"}
slice_thickness_m = {rng.uniform(lo, hi)!r}
min_slice_thickness_m = {lo!r}
max_slice_thickness_m = {hi!r}
[roi]
width_m = 50e-6
height_m = 20e-6
[mill]
current_a = {current!r}
[polish]
passes = {passes}
[imaging]
dwell_s = {dwell!r}
line_integration = {rng.randint(1, 2)}
[adapt]
policy = "adaptive"
[adapt.pt]
max_unfilled_share = {rng.uniform(0.01, 0.3)!r}
margin_m = {rng.uniform(0, 1e-6)!r}
max_reach_fraction = {rng.uniform(0.05, 1.0)!r}
min_interval_slices = {rng.randint(1, 3)}
max_interval_slices = {rng.randint(3, 30)}
[adapt.drift]
deadband_px = {rng.uniform(0, 2)!r}
stage_fraction = {rng.uniform(0.2, 1.0)!r}
max_step_px = {rng.uniform(5, 100)!r}
[adapt.focus]
sharpness_drop = {rng.uniform(0.05, 0.6)!r}
min_interval_slices = {rng.randint(1, 5)}
[adapt.thickness]
gain = {rng.uniform(0.05, 1.0)!r}
[adapt.curtaining]
max_polish_passes = {rng.randint(passes, 6)}
min_mill_current_a = {rng.uniform(0.5e-9, current)!r}
current_factor = {rng.uniform(0.2, 0.9)!r}
relax_after_slices = {rng.randint(1, 6)}
[adapt.imaging]
min_dwell_s = {dwell * rng.uniform(0.1, 1.0)!r}
max_dwell_s = {dwell * rng.uniform(1.0, 8.0)!r}
max_line_integration = {rng.randint(2, 8)}
saturation_slices = {rng.randint(1, 4)}
"""
    return parse_recipe(text)


def random_observation(
    rng: random.Random, recipe: Recipe, index: int, face_m: float, settings: SliceSettings, limit_m: float
) -> Observation:
    dets = recipe.imaging.detectors

    def per_detector(lo: float, hi: float) -> dict[str, float]:
        return {d: rng.uniform(lo, hi) for d in dets}

    seg = None
    if rng.random() < 0.7:
        seg = SegmentationObservation(
            unfilled_pore_share=rng.choice([None, rng.random(), rng.uniform(0, 0.05)]),
            porosity=rng.random(),
            fraction_collector=rng.choice([0.0, rng.random()]),
            outside_fraction=rng.choice([0.0, rng.random()]),
            confidence=rng.choice([None, rng.random()]),
        )
    big = rng.random() < 0.1
    return Observation(
        slice_index=index,
        settings=settings,
        face_position_m=face_m,
        thickness_m=None if index == 0 else rng.uniform(0, 3 * settings.mill_thickness_m),
        target_thickness_m=recipe.run.slice_thickness_m,
        working_distance_m=rng.uniform(3e-3, 5e-3),
        beam_shift_limit_m=limit_m,
        pixel_size_m=recipe.imaging.pixel_size_m,
        pixel_size_y_m=recipe.imaging.pixel_size_m * 1.27,
        infiltration_depth_m=rng.choice([None, rng.uniform(0.05e-6, 5e-6)]) if settings.deposit_pt else None,
        fiducial=None
        if rng.random() < 0.03
        else FiducialMatch(
            shift_x_px=rng.uniform(-120, 120) if big else rng.gauss(0, 3),
            shift_y_px=rng.uniform(-120, 120) if big else rng.gauss(0, 3),
            score=rng.choice([rng.random(), rng.uniform(0.8, 1.0)]),
        ),
        images=ImageMeasures(
            sharpness=per_detector(0.01, 5.0),
            saturation=per_detector(0.0, 0.05),
            stripe_energy=per_detector(0.0, 0.4),
            snr=per_detector(1.0, 100.0),
            rose_ratio=per_detector(0.01, 8.0),
        ),
        segmentation=seg,
    )


def assert_within_bounds(d: Decision, recipe: Recipe, limit_m: float, latest: int) -> None:
    """The bounds written out from the recipe, independently of the code under test."""
    run, a, img = recipe.run, recipe.adapt, recipe.imaging
    assert d.basis_slice <= latest and d.applies_to_slice - d.basis_slice in (1, LAG[d.policy])
    assert set(d.change) <= set(SliceSettings.model_fields), d
    c = d.change
    if "mill_thickness_m" in c:
        assert run.min_slice_thickness_m <= c["mill_thickness_m"] <= run.max_slice_thickness_m, d
    if "mill_current_a" in c:
        assert a.curtaining.min_mill_current_a <= c["mill_current_a"] <= recipe.mill.current_a, d
    if "polish_passes" in c:
        assert recipe.polish.passes <= c["polish_passes"] <= a.curtaining.max_polish_passes, d
    if "dwell_s" in c:
        assert a.imaging.min_dwell_s <= c["dwell_s"] <= a.imaging.max_dwell_s * (1 + 1e-12), d
    if "line_integration" in c:
        assert 1 <= c["line_integration"] <= a.imaging.max_line_integration, d
    for axis in ("x", "y"):
        if f"beam_shift_offset_{axis}_m" in c:
            assert abs(c[f"beam_shift_offset_{axis}_m"]) <= a.drift.stage_fraction * limit_m, d
        if f"stage_move_{axis}_m" in c:
            step = a.drift.max_step_px * img.pixel_size_m * 1.27
            assert abs(c[f"stage_move_{axis}_m"]) <= a.drift.stage_fraction * limit_m + step, d
    if d.action in ("suspend", "stop"):
        assert c == {}


@pytest.mark.parametrize("seed", SEEDS)
def test_no_decision_leaves_its_bounds_in_a_closed_loop(seed: int) -> None:
    rng = random.Random(seed)
    recipe = random_recipe(rng)
    limit_m = rng.uniform(1e-6, 20e-6)
    settings = initial_settings(recipe)
    history: list[Observation] = []
    face = 0.0
    pending: dict[int, list[Decision]] = {}
    for index in range(60):
        face += rng.choice([settings.mill_thickness_m, rng.uniform(0, 3 * settings.mill_thickness_m), 0.0])
        history.append(random_observation(rng, recipe, index, face, settings, limit_m))
        for d in decide(history, recipe):
            assert_within_bounds(d, recipe, limit_m, index)
            pending.setdefault(max(d.applies_to_slice, index + 1), []).append(d)
        # The next slice gets what was decided for it (lag 1 now, lag 2 a slice ago): never out of bounds.
        settings = next_settings(settings, pending.pop(index + 1, []), recipe, limit_m)


def test_random_recipes_are_accepted_and_contradictions_refused() -> None:
    rng = random.Random(0)
    for _ in range(20):
        recipe = random_recipe(rng)
        assert recipe.adapt.policy == "adaptive"
    with pytest.raises(ConfigError, match=r"adapt\.pt\.min_interval_slices"):
        parse_recipe(
            "[run]\nname='t'\nslices=3\n[roi]\nwidth_m=1e-5\nheight_m=1e-5\n"
            "[adapt.pt]\nmin_interval_slices=9\nmax_interval_slices=3\n"
        )
