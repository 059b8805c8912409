"""Pt re-deposition from the unfilled-pore share and the infiltration estimated ahead of the face (lag 2).

Instead of a deposit every k slices, re-deposit when either
- the latest segmented slice since the last deposit shows more unfilled pores than the threshold (the
  infiltration front has been reached), or
- the infiltration estimated to remain ahead of the face when the decision takes effect is below the
  margin: the depth the last deposit reported (an instrument's estimate, or the recipe's assumption),
  scaled by what recent deposits turned out to reach (`effective_depth_factor`), minus the face advance
  since, minus the slices still to be milled before the decision applies, or
- `max_interval_slices` have passed (a bound for a blind spot), and never within `min_interval_slices`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kintsugi_daemon.adapt.decisions import LAG, Decision, decision
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import Recipe

__all__ = ["decide", "effective_depth_factor"]

_PROBE = 1.1  # growth of the reach estimate per deposit that was not outrun


def _deposits(history: Sequence[Observation]) -> list[int]:
    return [i for i, o in enumerate(history) if o.settings.deposit_pt]


def _face_before(history: Sequence[Observation], i: int) -> float:
    """The face a deposit infiltrated: the one before its slice was milled."""
    if i > 0:
        return history[i - 1].face_position_m
    return history[0].face_position_m - history[0].settings.mill_thickness_m


def effective_depth_factor(history: Sequence[Observation], recipe: Recipe) -> float:
    """How far deposits really reach, as a fraction of their reported depth, from what the last ones did.

    A deposit whose pores went unfilled after an advance `a` reached a / reported: the factor is set to
    that. A deposit that was followed by the next one before any pore went unfilled says only that the
    reach was enough, so the factor grows by `_PROBE` (bands of dense electrode come and go along the
    run: a factor learnt in one must not hold for the rest of the night).
    """
    s = recipe.adapt.pt
    factor = 1.0
    deposits = _deposits(history)
    for n, start in enumerate(deposits):
        end = deposits[n + 1] if n + 1 < len(deposits) else len(history)
        reported = history[start].infiltration_depth_m or s.assumed_infiltration_m
        crossed = False
        for o in history[start + 1 : end]:
            seg = o.segmentation
            if seg is not None and (seg.unfilled_pore_share or 0.0) > s.max_unfilled_share:
                reached = o.face_position_m - _face_before(history, start)
                factor = max(reached, 0.0) / reported
                crossed = True
                break
        if not crossed and n + 1 < len(deposits):
            factor *= _PROBE
    return min(max(factor, 0.1), 1.0)


def decide(history: Sequence[Observation], recipe: Recipe) -> list[Decision]:
    s = recipe.adapt.pt
    deposits = _deposits(history)
    if not deposits:
        return []  # the first slice deposits by itself (the loop's schedule)
    latest, last = history[-1], deposits[-1]

    def deposit(
        basis: Observation, lag: int, measured: dict[str, float], threshold: float, why: str
    ) -> list[Decision]:
        if basis.slice_index + lag - history[last].slice_index < s.min_interval_slices:
            return []
        return [
            decision(
                "pt",
                "deposit_pt",
                basis,
                measured=measured,
                threshold=threshold,
                change={"deposit_pt": True},
                why=why,
                lag=lag,
            )
        ]

    # Segmentation evidence (lag 2: slice i's segmentation overlaps slice i+1's instrument work).
    segmented = [o for o in history[last + 1 :] if o.segmentation is not None]
    if segmented:
        seg = segmented[-1].segmentation
        assert seg is not None
        share = seg.unfilled_pore_share or 0.0
        if share > s.max_unfilled_share:
            return deposit(
                segmented[-1],
                LAG["pt"],
                {"unfilled_pore_share": share},
                s.max_unfilled_share,
                f"slice {segmented[-1].slice_index} shows {share:.1%} of its pores unfilled",
            )
    # The estimate needs no segmentation (lag 1): without a deposit now, the next slice is imaged with
    # what is left after one more mill.
    reported = history[last].infiltration_depth_m or s.assumed_infiltration_m
    depth = reported * effective_depth_factor(history, recipe)
    advanced = latest.face_position_m - _face_before(history, last)
    ahead = depth - advanced - latest.settings.mill_thickness_m
    if ahead < s.margin_m:
        return deposit(
            latest,
            1,
            {"infiltration_ahead_m": ahead, "infiltration_depth_m": depth},
            s.margin_m,
            f"about {ahead * 1e9:.0f} nm of infiltrated pores left ahead of slice {latest.slice_index + 1}",
        )
    since = latest.slice_index + 1 - history[last].slice_index
    if since >= s.max_interval_slices:
        return deposit(
            latest,
            1,
            {"slices_since_deposit": float(since)},
            float(s.max_interval_slices),
            f"{since} slices since the last deposit (the recipe's maximum interval)",
        )
    return []
