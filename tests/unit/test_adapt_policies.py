"""Each next-slice policy on recorded observation histories: what it decides, when, and for which slice."""

from __future__ import annotations

import pytest

from kintsugi_daemon.adapt import (
    curtaining,
    decide,
    drift,
    focus,
    imaging,
    next_settings,
    pt,
    stop,
    thickness,
)
from kintsugi_daemon.adapt.decisions import OutOfBounds, initial_settings
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import parse_recipe
from kintsugi_daemon.instrument import SIN_SEM_FIB
from tests.support.histories import ADAPTIVE, LIMIT_M, adaptive_recipe, clean_history, observation

R = adaptive_recipe()
T = R.run.slice_thickness_m


def test_fixed_policy_decides_nothing() -> None:
    fixed = parse_recipe(ADAPTIVE.replace('policy = "adaptive"', 'policy = "fixed"'))
    history = clean_history(fixed, 5, shift_px=(30.0, 0.0), stripes=0.5, rose=0.1)
    assert decide(history, fixed) == []
    assert decide(history, R) != []  # the same history moves the adaptive policy


# --- Pt ---------------------------------------------------------------------------------------------


def test_pt_deposits_when_unfilled_pores_appear_for_slice_i_plus_2() -> None:
    history = clean_history(R, 6)
    assert pt.decide(history, R) == []
    history.append(observation(R, 6, unfilled=0.08))
    (d,) = pt.decide(history, R)
    assert d.action == "deposit_pt" and d.change == {"deposit_pt": True}
    assert d.basis_slice == 6 and d.applies_to_slice == 8  # lag 2: segmentation overlaps slice 7
    assert d.measured["unfilled_pore_share"] == pytest.approx(0.08) and d.threshold == 0.05


def test_pt_deposits_before_the_next_slice_would_pass_the_trusted_reach() -> None:
    # Deposit on slice 0 reporting 0.5 um; nothing outrun yet: trusted to 0.3 of it, 150 nm. Lag 1: the
    # next slice is imaged one more mill past the deposit's face.
    history = [observation(R, i, unfilled=0.0, infiltration_m=0.5e-6 if i == 0 else None) for i in range(2)]
    assert pt.decide(history, R) == []  # slice 2 would be imaged 120 nm past it
    history.append(observation(R, 2, unfilled=0.0))
    (d,) = pt.decide(history, R)  # slice 3: 160 nm
    assert d.applies_to_slice == 3 and d.threshold == 0.0
    assert d.measured["reach_m"] == pytest.approx(150e-9)
    assert d.measured["reach_ahead_m"] == pytest.approx(-10e-9)


def test_pt_learns_the_reach_from_the_last_clean_slice_of_an_outrun_deposit() -> None:
    # The first deposit claimed 2 um; slice 9 showed unfilled pores, slice 8 (360 nm past the face) was
    # the last imaged clean: the next deposit is trusted that far, not to where the pores showed.
    r = adaptive_recipe("[adapt.pt]\nmax_reach_fraction = 1.0\n")
    history = [observation(r, i, unfilled=0.0, infiltration_m=2e-6 if i == 0 else None) for i in range(9)]
    history.append(observation(r, 9, unfilled=0.2))
    history.append(observation(r, 10, unfilled=0.0, settings={"deposit_pt": True}, infiltration_m=2e-6))
    assert pt.reach_fraction(history, r) == pytest.approx(0.36e-6 / 2e-6)
    history += [observation(r, i, unfilled=0.0) for i in range(11, 18)]
    assert pt.decide(history, r) == []  # slice 18 would be imaged 360 nm past the deposit's face
    history.append(observation(r, 18, unfilled=0.0))
    (d,) = pt.decide(history, r)
    assert d.measured["reach_m"] == pytest.approx(0.36e-6) and d.applies_to_slice == 19


def test_pt_respects_min_and_max_interval() -> None:
    r = adaptive_recipe("[adapt.pt]\nmin_interval_slices = 5\nmax_interval_slices = 8\n")
    history = [observation(r, i, unfilled=0.0, infiltration_m=50e-6 if i == 0 else None) for i in range(2)]
    history.append(observation(r, 2, unfilled=0.5))
    assert pt.decide(history, r) == []  # slice 4 would be 4 after the last deposit: under the minimum
    history = [observation(r, i, unfilled=0.0, infiltration_m=50e-6 if i == 0 else None) for i in range(8)]
    (d,) = pt.decide(history, r)
    assert d.measured == {"slices_since_deposit": 8.0} and d.applies_to_slice == 8


# --- drift ------------------------------------------------------------------------------------------


def test_drift_goes_to_beam_shift_as_a_whole_point() -> None:
    history = [
        *clean_history(R, 3),
        observation(R, 3, shift_px=(2.0, -1.0), settings={"beam_shift_offset_x_m": 1e-07}),
    ]
    (d,) = drift.decide(history, R)
    px = R.imaging.pixel_size_m
    assert d.action == "beam_shift" and d.applies_to_slice == 4
    py = px / SIN_SEM_FIB  # face-plane metres per row: a cross-section is foreshortened
    assert d.change == pytest.approx({"beam_shift_offset_x_m": 1e-7 - 2 * px, "beam_shift_offset_y_m": py})


def test_drift_within_deadband_changes_nothing() -> None:
    assert drift.decide([observation(R, 0, shift_px=(0.2, 0.1))], R) == []


def test_drift_hands_over_to_the_stage_near_the_limit() -> None:
    near = 0.8 * LIMIT_M
    o = observation(R, 5, shift_px=(-3.0, 0.0), settings={"beam_shift_offset_x_m": near})
    (d,) = drift.decide([o], R)
    x = near + 3 * R.imaging.pixel_size_m
    assert d.action == "stage_move"
    assert d.change == pytest.approx(
        {
            "stage_move_x_m": -x,
            "stage_move_y_m": 0.0,
            "beam_shift_offset_x_m": 0.0,
            "beam_shift_offset_y_m": 0.0,
        }
    )


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"score": 0.5}, "fiducial lost"),
        ({"fiducial": False}, "not imaged"),
        ({"shift_px": (60.0, 0.0)}, "not believed"),
    ],
)
def test_drift_suspends_instead_of_milling_blind(kwargs: dict[str, object], why: str) -> None:
    (d,) = drift.decide([observation(R, 4, **kwargs)], R)  # type: ignore[arg-type]
    assert d.action == "suspend" and why in d.why and d.change == {}


# --- focus ------------------------------------------------------------------------------------------


def test_focus_when_sharpness_degrades_then_stigmation() -> None:
    history = [observation(R, i, sharpness=s) for i, s in enumerate([1.0, 1.1, 1.05, 0.95])]
    assert focus.decide(history, R) == []  # 0.95 > 0.8 x 1.1
    history.append(observation(R, 4, sharpness=0.8))
    (d,) = focus.decide(history, R)
    assert d.action == "auto_focus" and d.threshold == pytest.approx(0.88) and d.applies_to_slice == 5
    # Slice 5 was focused and is sharp again: nothing. Still soft: astigmatism, not defocus.
    assert focus.decide([*history, observation(R, 5, sharpness=1.0, settings={"auto_focus": True})], R) == []
    soft = [*history, observation(R, 5, sharpness=0.7, settings={"auto_focus": True})]
    (d,) = focus.decide(soft, R)
    assert d.action == "auto_stigmation" and d.change == {"auto_stigmation": True}
    # Within min_interval_slices of the focus no new autofocus, however soft.
    assert focus.decide([*soft, observation(R, 6, sharpness=0.3)], R) == []


def test_stigmation_compares_with_the_stretch_that_asked_for_the_focus() -> None:
    """A very sharp face long ago (before an earlier focus) is no reference for the latest one."""
    history = [
        observation(R, 0, sharpness=3.0),
        observation(R, 1, sharpness=1.0, settings={"auto_focus": True}),
    ]
    history += [observation(R, i, sharpness=1.0) for i in range(2, 6)]
    history += [observation(R, 6, sharpness=0.7)]  # degraded: the focus at 7 was asked for against 1.0
    focused = [*history, observation(R, 7, sharpness=0.95, settings={"auto_focus": True})]
    assert focus.decide(focused, R) == []  # sharp again against its own stretch (0.8 x 1.0)
    still_soft = [*history, observation(R, 7, sharpness=0.75, settings={"auto_focus": True})]
    (d,) = focus.decide(still_soft, R)
    assert d.action == "auto_stigmation" and d.measured["best_before_focus"] == pytest.approx(1.0)


def test_focus_after_the_face_receded() -> None:
    history = [observation(R, 0, face_m=0.0, settings={"auto_focus": True})]
    history += [observation(R, i, face_m=i * 1.7e-6) for i in (1, 2, 3)]
    assert focus.decide(history[:3], R) == []  # 3.4 um
    (d,) = focus.decide(history, R)
    assert d.action == "auto_focus" and d.measured["receded_m"] == pytest.approx(5.1e-6)


# --- thickness --------------------------------------------------------------------------------------


def test_thickness_corrects_the_accumulated_error_within_bounds() -> None:
    on_plan = clean_history(R, 4)
    (d,) = thickness.decide(on_plan, R)  # on plan: only the polish's 5 nm is taken off the mill
    assert d.change["mill_thickness_m"] == pytest.approx(T - 5e-9)
    behind = [*on_plan[:3], observation(R, 3, face_m=4 * T - 20e-9)]
    (d,) = thickness.decide(behind, R)
    assert d.change["mill_thickness_m"] == pytest.approx(T - 5e-9 + 10e-9)
    far_ahead = [*on_plan[:3], observation(R, 3, face_m=4 * T + 1e-6)]
    (d,) = thickness.decide(far_ahead, R)
    assert d.change["mill_thickness_m"] == R.run.min_slice_thickness_m


# --- curtaining -------------------------------------------------------------------------------------


def test_curtaining_escalates_polish_then_current_then_cap() -> None:
    steps = []
    settings = initial_settings(R).model_dump() | {"deposit_pt": False}
    for i in range(8):
        (d,) = curtaining.decide([observation(R, i, stripes=0.2, settings=settings)], R)
        steps.append(d.action)
        settings |= {k: v for k, v in d.change.items() if k != "deposit_pt"}
    assert steps == ["extra_polish"] * 2 + ["lower_mill_current"] * 3 + ["fresh_pt_cap"] * 3
    assert settings["polish_passes"] == 3 and settings["mill_current_a"] == pytest.approx(3e-9)
    relaxed = [observation(R, i, stripes=0.01, settings=settings) for i in range(10)]
    (d,) = curtaining.decide(relaxed, R)
    assert d.action == "restore_mill_current" and d.change["mill_current_a"] == pytest.approx(6e-9)


# --- imaging ----------------------------------------------------------------------------------------


def test_imaging_raises_dose_below_rose_then_line_integration() -> None:
    (d,) = imaging.decide([observation(R, 0, rose=0.7)], R)
    assert d.action == "dwell" and d.change["dwell_s"] == pytest.approx(3e-6 / 0.49)
    (d,) = imaging.decide([observation(R, 0, rose=0.4)], R)  # needs 18.75 us: 10 us x 2
    assert d.change == pytest.approx({"dwell_s": 10e-6, "line_integration": 2})
    at_max = {"dwell_s": 10e-6, "line_integration": 4}
    assert imaging.decide([observation(R, 0, rose=0.1, settings=at_max)], R) == []
    (d,) = imaging.decide([observation(R, 0, rose=4.0, settings={"dwell_s": 8e-6})], R)
    assert d.change["dwell_s"] == pytest.approx(3e-6) and d.threshold == 2.0  # back to the recipe's dose


def test_imaging_auto_contrast_brightness_on_saturation_that_persists() -> None:
    saturated = [observation(R, i, saturation=0.05) for i in range(3)]
    (d,) = imaging.decide(saturated, R)
    assert d.action == "auto_contrast_brightness" and d.change == {"auto_contrast_brightness": True}
    # One or two saturated slices are the face (unfilled pores charge until the re-deposit), not the
    # detector settings: re-mapping the grey levels would move the model's input for the rest of the run.
    assert imaging.decide([*clean_history(R, 3), *saturated[:2]], R) == []
    # Still saturated on the slice the re-mapping was done for: the count starts again there.
    remapped = observation(R, 3, saturation=0.05, settings={"auto_contrast_brightness": True})
    assert imaging.decide([*saturated, remapped], R) == []
    assert imaging.decide([*saturated, remapped, *[observation(R, i, saturation=0.05) for i in (4, 5)]], R)
    once = adaptive_recipe("[adapt.imaging]\nsaturation_slices = 1\n")
    assert imaging.decide([observation(once, 0, saturation=0.05)], once)


# --- stop -------------------------------------------------------------------------------------------


def test_stop_rules() -> None:
    assert stop.decide(clean_history(R, 5), R) == []
    collector = clean_history(R, 3) + [observation(R, i, unfilled=0.0, collector=0.6) for i in range(3, 6)]
    (d,) = stop.decide(collector, R)
    assert d.action == "stop" and d.applies_to_slice == 7 and "collector" in d.why
    assert stop.decide(collector[:-1], R) == []  # two slices are not yet confirmed
    exhausted = [observation(R, i, unfilled=0.0, outside=0.7) for i in range(3)]
    assert "exhausted" in stop.decide(exhausted, R)[0].why
    deep = parse_recipe(ADAPTIVE.replace("slices = 400", "target_depth_m = 2e-6"))
    (d,) = stop.decide([observation(deep, i) for i in range(50)], deep)
    assert d.measured["depth_m"] == pytest.approx(2e-6)


# --- applying decisions -----------------------------------------------------------------------------


def test_next_settings_applies_and_clears_one_shot_actions() -> None:
    history = [
        *clean_history(R, 1),
        *[observation(R, i, unfilled=0.0, saturation=0.2) for i in (1, 2)],
        observation(R, 3, shift_px=(1.0, 0.0), saturation=0.2),
    ]
    decisions = decide(history, R)
    first = next_settings(history[-1].settings, decisions, R, LIMIT_M)
    assert first.auto_contrast_brightness and first.beam_shift_offset_x_m < 0
    second = next_settings(first, [], R, LIMIT_M)
    assert not second.auto_contrast_brightness and second.beam_shift_offset_x_m == first.beam_shift_offset_x_m


def test_next_settings_refuses_out_of_bounds() -> None:
    (d,) = thickness.decide(clean_history(R, 4), R)
    bad = d.model_copy(update={"change": {"mill_thickness_m": 1e-6}})
    with pytest.raises(OutOfBounds, match="mill_thickness_m"):
        next_settings(initial_settings(R), [bad], R, LIMIT_M)
    with pytest.raises(OutOfBounds, match="unknown setting 'speed'"):
        next_settings(initial_settings(R), [d.model_copy(update={"change": {"speed": 2}})], R, LIMIT_M)


def test_pt_reach_grows_a_slice_per_deposit_used_clean_as_far_as_trusted_up_to_the_ceiling() -> None:
    # Deposit 0 (reports 2 um) was outrun at slice 4: trusted as far as slice 3 was imaged, 4 slices
    # (160 nm). Deposit 5 imaged clean through its fourth slice: one more slice of trust. A deposit
    # followed by the next before it was used up says nothing about its reach.
    def deposits_at(*at: int) -> list[Observation]:
        return [
            observation(
                R,
                i,
                unfilled=0.2 if i == 4 else 0.0,
                settings={"deposit_pt": i in at},
                infiltration_m=2e-6 if i in at else None,
            )
            for i in range(max(at) + 1)
        ]

    step = T / 2e-6
    assert pt.reach_fraction(deposits_at(0, 5), R) == pytest.approx(4 * step)
    assert pt.reach_fraction(deposits_at(0, 5, 9), R) == pytest.approx(5 * step)
    assert pt.reach_fraction(deposits_at(0, 5, 8), R) == pytest.approx(4 * step)  # 3 of 4 slices used
    assert pt.reach_fraction(deposits_at(0, 5, 9, 10), R) == pytest.approx(5 * step)
    # Never past the ceiling, however many deposits went clean: a dense band may come next.
    clean = [
        observation(R, i, unfilled=0.0, settings={"deposit_pt": i % 4 == 0}, infiltration_m=0.5e-6)
        for i in range(60)
    ]
    assert pt.reach_fraction(clean, R) == pytest.approx(R.adapt.pt.max_reach_fraction)
