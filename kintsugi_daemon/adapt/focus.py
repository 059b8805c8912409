"""Focus / stigmation when sharpness degrades, and after the face has receded far (lag 1).

The reference is the best sharpness (of the first detector) since the last autofocus: the face changes
from slice to slice, so a single reference slice would be noise. An autofocus followed by a slice still
below the threshold means astigmatism, not defocus: autostigmation next.
"""

from __future__ import annotations

from collections.abc import Sequence

from kintsugi_daemon.adapt.decisions import Decision, decision
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import Recipe

__all__ = ["decide"]


def decide(history: Sequence[Observation], recipe: Recipe) -> list[Decision]:
    s = recipe.adapt.focus
    if not history:
        return []
    o = history[-1]
    focused = [i for i, h in enumerate(history) if h.settings.auto_focus]
    since_index = focused[-1] if focused else 0
    slices_since = o.slice_index - history[since_index].slice_index
    if focused and slices_since + 1 < s.min_interval_slices:
        return []
    detector = recipe.imaging.detectors[0]
    window = history[since_index:]
    values = [h.images.sharpness.get(detector, 0.0) for h in window]
    now, best = values[-1], max(values)
    threshold = (1.0 - s.sharpness_drop) * best
    measured = {"sharpness": now, "best_since_focus": best}
    if now < threshold:
        just_focused = focused and history[-1].settings.auto_focus
        if s.stigmation and just_focused:
            return [
                decision(
                    "focus",
                    "auto_stigmation",
                    o,
                    measured=measured,
                    threshold=threshold,
                    change={"auto_stigmation": True},
                    why="sharpness still low right after an autofocus: correcting astigmatism",
                )
            ]
        return [
            decision(
                "focus",
                "auto_focus",
                o,
                measured=measured,
                threshold=threshold,
                change={"auto_focus": True},
                why=f"{detector} sharpness {now:.3g} fell more than {s.sharpness_drop:.0%} below {best:.3g}",
            )
        ]
    if s.refocus_recession_m is not None:
        receded = o.face_position_m - history[since_index].face_position_m
        if receded >= s.refocus_recession_m:
            return [
                decision(
                    "focus",
                    "auto_focus",
                    o,
                    measured={"receded_m": receded, **measured},
                    threshold=s.refocus_recession_m,
                    change={"auto_focus": True},
                    why=f"the face receded {receded * 1e6:.2f} um since the last focus",
                )
            ]
    return []
