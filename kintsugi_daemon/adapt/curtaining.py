"""Curtaining: stripe energy along the mill axis above threshold -> an extra polish pass, then a lower
mill current, then a fresh Pt cap; back to the recipe's values once the face stays clean (lag 1).

The escalation reads only the settings the last slice used, so it needs no memory of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from kintsugi_daemon.adapt.decisions import Decision, decision
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import Recipe

__all__ = ["decide"]


def decide(history: Sequence[Observation], recipe: Recipe) -> list[Decision]:
    s = recipe.adapt.curtaining
    if not history:
        return []
    o = history[-1]
    energy = max(o.images.stripe_energy.values(), default=0.0)
    measured = {"stripe_energy": energy}
    used = o.settings
    if energy > s.max_stripe_energy:
        if used.polish_passes < s.max_polish_passes:
            passes = used.polish_passes + 1
            return [
                decision(
                    "curtaining",
                    "extra_polish",
                    o,
                    measured=measured,
                    threshold=s.max_stripe_energy,
                    change={"polish_passes": passes},
                    why=f"curtains at {energy:.2f} of the grey spread: polish {passes} passes",
                )
            ]
        lowest = min(s.min_mill_current_a, recipe.mill.current_a)
        if used.mill_current_a > lowest:
            current = max(used.mill_current_a * s.current_factor, lowest)
            return [
                decision(
                    "curtaining",
                    "lower_mill_current",
                    o,
                    measured=measured,
                    threshold=s.max_stripe_energy,
                    change={"mill_current_a": current},
                    why=f"curtains at {energy:.2f} at the most polish: mill at {current * 1e9:.1f} nA",
                )
            ]
        return [
            decision(
                "curtaining",
                "fresh_pt_cap",
                o,
                measured=measured,
                threshold=s.max_stripe_energy,
                change={"deposit_pt": True},
                why=f"curtains at {energy:.2f} at the lowest current and most polish: a fresh Pt cap",
            )
        ]
    window = history[-s.relax_after_slices :]
    clean = len(window) == s.relax_after_slices and all(
        max(h.images.stripe_energy.values(), default=0.0) <= s.max_stripe_energy for h in window
    )
    if not clean:
        return []
    if used.mill_current_a < recipe.mill.current_a:
        current = min(used.mill_current_a / s.current_factor, recipe.mill.current_a)
        return [
            decision(
                "curtaining",
                "restore_mill_current",
                o,
                measured=measured,
                threshold=s.max_stripe_energy,
                change={"mill_current_a": current},
                why=f"{s.relax_after_slices} clean slices: mill at {current * 1e9:.1f} nA again",
            )
        ]
    if used.polish_passes > recipe.polish.passes:
        return [
            decision(
                "curtaining",
                "relax_polish",
                o,
                measured=measured,
                threshold=s.max_stripe_energy,
                change={"polish_passes": used.polish_passes - 1},
                why=f"{s.relax_after_slices} clean slices: one polish pass fewer",
            )
        ]
    return []
