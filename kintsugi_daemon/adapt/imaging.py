"""Imaging: dwell / line integration from the Rose criterion; auto contrast-brightness when the
histogram saturates on `saturation_slices` slices in a row (lag 1).

Saturation on one slice is usually the face, not the detector settings: a face the Pt did not fill
charges and clips for a slice or two until the re-deposit lands. Re-mapping the grey levels for it would
move every later image away from the conditions the segmentation model was trained at (a 60-slice run of
bench_adapt's recipe: mIoU 0.83 after one such re-mapping, 0.91 without, and 12-20 % of the filled pores
read as unfilled, which the Pt policy then answers with deposits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kintsugi_daemon.adapt.decisions import Action, Decision, decision
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import Recipe

__all__ = ["decide"]

_MARGIN = 2.0  # Rose ratio above which the dose may come down


def _dose_decision(o: Observation, recipe: Recipe) -> Decision | None:
    s, img = recipe.adapt.imaging, recipe.imaging
    detector = img.detectors[0]
    r = o.images.rose_ratio.get(detector)
    if r is None:
        return None
    used = o.settings
    dose = used.dwell_s * used.line_integration
    measured = {"rose_ratio": r, "dose_s": dose}
    max_dwell = max(s.max_dwell_s, img.dwell_s)
    max_li = max(s.max_line_integration, img.line_integration)
    if r < 1.0:
        wanted = dose / max(r, 0.05) ** 2
        dwell = min(wanted / used.line_integration, max_dwell)
        li = used.line_integration
        if dwell * li < wanted and li < max_li:
            li = min(math.ceil(wanted / dwell), max_li)
        if dwell == used.dwell_s and li == used.line_integration:
            return None  # already at the bounds: nothing more to give
        action: Action = "line_integration" if li != used.line_integration else "dwell"
        return decision(
            "imaging",
            action,
            o,
            measured=measured,
            threshold=1.0,
            change={"dwell_s": dwell, "line_integration": li},
            why=f"{detector} phase contrast {r:.2f}x the Rose limit: dwell {dwell * 1e6:.2f} us x {li}",
        )
    base = img.dwell_s * img.line_integration
    if r > _MARGIN and dose > base:
        wanted = max(dose / (r / _MARGIN) ** 2, base)
        li = max(min(used.line_integration, math.ceil(wanted / max_dwell)), img.line_integration)
        dwell = min(max(wanted / li, img.dwell_s), max_dwell)
        if dwell * li >= dose:
            return None
        return decision(
            "imaging",
            "dwell",
            o,
            measured=measured,
            threshold=_MARGIN,
            change={"dwell_s": dwell, "line_integration": li},
            why=f"{detector} contrast {r:.2f}x the Rose limit: less dose ({dwell * 1e6:.2f} us x {li})",
        )
    return None


def _saturated_run(history: Sequence[Observation], recipe: Recipe) -> bool:
    """The last `saturation_slices` slices all saturated, none but the first already re-mapped (a slice
    still saturated after an auto contrast-brightness starts the count again)."""
    s = recipe.adapt.imaging
    run = history[-s.saturation_slices :]
    return (
        len(run) == s.saturation_slices
        and all(max(o.images.saturation.values(), default=0.0) > s.max_saturation for o in run)
        and not any(o.settings.auto_contrast_brightness for o in run[1:])
    )


def decide(history: Sequence[Observation], recipe: Recipe) -> list[Decision]:
    s = recipe.adapt.imaging
    if not history:
        return []
    o = history[-1]
    out: list[Decision] = []
    dose = _dose_decision(o, recipe)
    if dose is not None:
        out.append(dose)
    worst = max(o.images.saturation.items(), key=lambda kv: kv[1], default=None)
    if worst is not None and worst[1] > s.max_saturation and _saturated_run(history, recipe):
        out.append(
            decision(
                "imaging",
                "auto_contrast_brightness",
                o,
                measured={f"saturation_{worst[0]}": worst[1]},
                threshold=s.max_saturation,
                change={"auto_contrast_brightness": True},
                why=f"{worst[1]:.1%} of {worst[0]} pixels at the ends of the range",
            )
        )
    return out
