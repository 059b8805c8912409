"""A decision record, the lag each policy uses, and the next slice's settings built from decisions.

Every decision says which policy took it, what was measured, the threshold it was held against, what
changes and why; the daemon journals it before it takes effect. `next_settings` applies a slice's
decisions to the settings the last slice used and refuses (raises `OutOfBounds`) a result outside the
recipe's bounds, so a policy bug suspends the run instead of milling on a bad value.

Lags (the slice a decision applies to, counted from the slice whose observation it read):
image-based decisions (drift, focus, thickness, curtaining, imaging, the Pt estimate of the infiltration
left, the target depth) apply to the next slice (lag 1); decisions that read the segmentation (Pt from the
unfilled-pore share, the collector/region stop rules) apply to slice i+2 (lag 2), so that segmenting
slice i keeps overlapping slice i+1's milling and imaging. The daemon's adapt step of slice i+1 waits for
slice i's segmentation, so a lag-2 decision is never late; one that would be (segmentation off the
overlap) applies to the next slice instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kintsugi_daemon.adapt.observations import Observation, SliceSettings
from kintsugi_daemon.config import Recipe

__all__ = [
    "LAG",
    "Action",
    "Decision",
    "OutOfBounds",
    "PolicyName",
    "check_bounds",
    "decision",
    "initial_settings",
    "next_settings",
]

PolicyName = Literal["pt", "drift", "focus", "thickness", "curtaining", "imaging", "stop"]
Action = Literal[
    "deposit_pt",
    "beam_shift",
    "stage_move",
    "suspend",
    "auto_focus",
    "auto_stigmation",
    "mill_thickness",
    "extra_polish",
    "relax_polish",
    "lower_mill_current",
    "restore_mill_current",
    "fresh_pt_cap",
    "dwell",
    "line_integration",
    "auto_contrast_brightness",
    "stop",
]
LAG: dict[PolicyName, int] = {
    "pt": 2,
    "drift": 1,
    "focus": 1,
    "thickness": 1,
    "curtaining": 1,
    "imaging": 1,
    "stop": 2,
}

ChangeValue = float | int | bool


class OutOfBounds(ValueError):
    """A decision would take a setting outside the recipe's bounds (a policy bug: the run suspends)."""


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    policy: PolicyName
    action: Action
    basis_slice: int = Field(ge=0)  # the observation it read
    applies_to_slice: int = Field(ge=0)
    measured: dict[str, float]
    threshold: float | None
    change: dict[str, ChangeValue]  # SliceSettings field -> new value ({} for suspend/stop)
    why: str


def decision(
    policy: PolicyName,
    action: Action,
    basis: Observation,
    *,
    measured: dict[str, float],
    threshold: float | None,
    change: dict[str, ChangeValue],
    why: str,
    lag: int | None = None,
) -> Decision:
    """A decision read from `basis`, applying `lag` slices later (the policy's usual lag by default)."""
    return Decision(
        policy=policy,
        action=action,
        basis_slice=basis.slice_index,
        applies_to_slice=basis.slice_index + (LAG[policy] if lag is None else lag),
        measured=measured,
        threshold=threshold,
        change=change,
        why=why,
    )


def initial_settings(recipe: Recipe) -> SliceSettings:
    return SliceSettings(
        mill_thickness_m=recipe.run.slice_thickness_m,
        mill_current_a=recipe.mill.current_a,
        polish_passes=recipe.polish.passes,
        dwell_s=recipe.imaging.dwell_s,
        line_integration=recipe.imaging.line_integration,
        deposit_pt=True,  # the first slice always starts from a fresh cap
    )


# One-shot actions (true for the slice they are decided for, false again after).
_ONE_SHOT = ("deposit_pt", "auto_focus", "auto_stigmation", "auto_contrast_brightness")
_ONE_SHOT_ZERO = ("stage_move_x_m", "stage_move_y_m")


def check_bounds(settings: SliceSettings, recipe: Recipe, beam_shift_limit_m: float) -> None:
    """Raise `OutOfBounds` naming the setting and its bound when one is outside the recipe's limits."""
    run, a = recipe.run, recipe.adapt
    problems = []
    values = settings.model_dump()
    for name, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{name} = {v}")
    if not run.min_slice_thickness_m <= settings.mill_thickness_m <= run.max_slice_thickness_m:
        problems.append(
            f"mill_thickness_m {settings.mill_thickness_m:g} outside run.min/max_slice_thickness_m"
        )
    low_current = min(a.curtaining.min_mill_current_a, recipe.mill.current_a)
    if not low_current <= settings.mill_current_a <= recipe.mill.current_a:
        problems.append(
            f"mill_current_a {settings.mill_current_a:g} outside [{low_current:g}, mill.current_a]"
        )
    max_passes = max(a.curtaining.max_polish_passes, recipe.polish.passes)
    if not recipe.polish.passes <= settings.polish_passes <= max_passes:
        problems.append(f"polish_passes {settings.polish_passes} outside [polish.passes, {max_passes}]")
    lo_dwell = min(a.imaging.min_dwell_s, recipe.imaging.dwell_s)
    hi_dwell = max(a.imaging.max_dwell_s, recipe.imaging.dwell_s)
    if not lo_dwell <= settings.dwell_s <= hi_dwell:
        problems.append(f"dwell_s {settings.dwell_s:g} outside adapt.imaging.min/max_dwell_s")
    hi_li = max(a.imaging.max_line_integration, recipe.imaging.line_integration)
    if not 1 <= settings.line_integration <= hi_li:
        problems.append(f"line_integration {settings.line_integration} above {hi_li}")
    for axis in ("x", "y"):
        off = values[f"beam_shift_offset_{axis}_m"]
        if abs(off) > beam_shift_limit_m:
            problems.append(
                f"beam_shift_offset_{axis}_m {off:g} beyond the beam-shift limit {beam_shift_limit_m:g}"
            )
    if problems:
        raise OutOfBounds("; ".join(problems))


def next_settings(
    previous: SliceSettings, decisions: Iterable[Decision], recipe: Recipe, beam_shift_limit_m: float
) -> SliceSettings:
    """The settings for the next slice: the last slice's, one-shot actions cleared, decisions applied."""
    update: dict[str, ChangeValue] = dict.fromkeys(_ONE_SHOT, False)
    update.update(dict.fromkeys(_ONE_SHOT_ZERO, 0.0))
    fields = SliceSettings.model_fields
    for d in decisions:
        for key, value in d.change.items():
            if key not in fields:
                raise OutOfBounds(f"decision of policy {d.policy} changes unknown setting {key!r}")
            update[key] = value
    settings = SliceSettings.model_validate({**previous.model_dump(), **update})
    check_bounds(settings, recipe, beam_shift_limit_m)
    return settings
