"""Stop rules: the target depth reached (measured face, lag 1), the collector reached or the region
exhausted on `confirm_slices` consecutive segmented slices (lag 2)."""

from __future__ import annotations

from collections.abc import Sequence

from kintsugi_daemon.adapt.decisions import Decision, decision
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import Recipe

__all__ = ["decide"]


def decide(history: Sequence[Observation], recipe: Recipe) -> list[Decision]:
    s = recipe.adapt.stop
    if not history:
        return []
    o = history[-1]
    target = recipe.run.target_depth_m
    if target is not None:
        depth = o.face_position_m - history[0].face_position_m + history[0].settings.mill_thickness_m
        if depth >= target:
            return [
                decision(
                    "stop",
                    "stop",
                    o,
                    measured={"depth_m": depth},
                    threshold=target,
                    change={},
                    why=f"{depth * 1e6:.2f} um sectioned: the target depth is reached",
                )
            ]
    segmented = [h for h in history if h.segmentation is not None][-s.confirm_slices :]
    if len(segmented) < s.confirm_slices:
        return []
    fractions = [h.segmentation.fraction_collector for h in segmented if h.segmentation is not None]
    outside = [h.segmentation.outside_fraction for h in segmented if h.segmentation is not None]
    if s.collector_fraction is not None and min(fractions) >= s.collector_fraction:
        return [
            decision(
                "stop",
                "stop",
                segmented[-1],
                measured={"fraction_collector": min(fractions)},
                threshold=s.collector_fraction,
                change={},
                why=f"the current collector fills >= {min(fractions):.0%} of {s.confirm_slices} slices",
            )
        ]
    if s.max_outside_fraction is not None and min(outside) >= s.max_outside_fraction:
        return [
            decision(
                "stop",
                "stop",
                segmented[-1],
                measured={"outside_fraction": min(outside)},
                threshold=s.max_outside_fraction,
                change={},
                why=f"{min(outside):.0%} of the view is outside the specimen: the region is exhausted",
            )
        ]
    return []
