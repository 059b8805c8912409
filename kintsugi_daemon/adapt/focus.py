"""Focus / stigmation when sharpness degrades, and after the face has receded far (lag 1).

The reference is the best sharpness (of the first detector) since the last autofocus: the face changes
from slice to slice, so a single reference slice would be noise. An autofocus followed by a slice still
below the threshold (against the stretch that asked for it) means astigmatism, not defocus: autostigmation
next.
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
    detector = recipe.imaging.detectors[0]
    focused = [i for i, h in enumerate(history) if h.settings.auto_focus]
    since_index = focused[-1] if focused else 0
    now = o.images.sharpness.get(detector, 0.0)
    if focused and since_index == len(history) - 1:
        # This slice was just focused: still soft against the best of the stretch that asked for the focus
        # (since the focus before it) means astigmatism. Not the best of the whole run: the face's content
        # changes, and a reference from hundreds of slices ago is never reached again (it had asked for a
        # stigmation after every focus of a 200-slice run).
        previous = focused[-2] if len(focused) > 1 else 0
        before = [h.images.sharpness.get(detector, 0.0) for h in history[previous:since_index]]
        if s.stigmation and before and now < (1.0 - s.sharpness_drop) * max(before):
            threshold = (1.0 - s.sharpness_drop) * max(before)
            return [
                decision(
                    "focus",
                    "auto_stigmation",
                    o,
                    measured={"sharpness": now, "best_before_focus": max(before)},
                    threshold=threshold,
                    change={"auto_stigmation": True},
                    why="sharpness still low right after an autofocus: correcting astigmatism",
                )
            ]
        return []
    if focused and o.slice_index - history[since_index].slice_index < s.min_interval_slices:
        return []
    best = max(h.images.sharpness.get(detector, 0.0) for h in history[since_index:])
    threshold = (1.0 - s.sharpness_drop) * best
    measured = {"sharpness": now, "best_since_focus": best}
    if now < threshold:
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
