"""Imaging: dwell / line integration from the Rose criterion; auto contrast-brightness when the
histogram saturates (lag 1).

Shot noise: SNR grows with the square root of the electron dose, so a Rose ratio r < 1 needs the dose
times 1/r^2. Dwell goes up first (to its maximum), then line integration; with ample margin (r > 2) the
dose comes back down towards the recipe's, never below it (the recipe's dose is what the operator asked).
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
    if worst is not None and worst[1] > s.max_saturation:
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
