"""Slice thickness: the measured face advance corrects the next mill (lag 1).

The plan is one target thickness per slice from the first slice's face; the next mill request is the
target minus what the polish removes, plus `gain` x the accumulated depth error, clamped to the recipe's
min/max slice thickness. Correcting the accumulated error (not the last slice's) keeps the mean thickness
on target even when each slice scatters.
"""

from __future__ import annotations

from collections.abc import Sequence

from kintsugi_daemon.adapt.decisions import Decision, decision
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import Recipe
from kintsugi_daemon.instrument import POLISH_REMOVAL_M

__all__ = ["decide"]


def decide(history: Sequence[Observation], recipe: Recipe) -> list[Decision]:
    s, run = recipe.adapt.thickness, recipe.run
    if len(history) < 2:
        return []
    first, o = history[0], history[-1]
    target = run.slice_thickness_m
    # Slice 0 starts the volume: the plan counts from its face.
    planned = first.face_position_m + (o.slice_index - first.slice_index) * target
    error = planned - o.face_position_m  # > 0: behind the plan, mill more
    polish = o.settings.polish_passes * POLISH_REMOVAL_M
    request = target - polish + s.gain * error
    request = min(max(request, run.min_slice_thickness_m), run.max_slice_thickness_m)
    if abs(request - o.settings.mill_thickness_m) < 0.01 * target:
        return []
    measured = {"depth_error_m": error, "last_thickness_m": o.thickness_m or 0.0}
    return [
        decision(
            "thickness",
            "mill_thickness",
            o,
            measured=measured,
            threshold=target,
            change={"mill_thickness_m": request},
            why=f"face {error * 1e9:+.1f} nm off the plan; next mill {request * 1e9:.1f} nm",
        )
    ]
