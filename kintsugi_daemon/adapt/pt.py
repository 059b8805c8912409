"""Pt re-deposition before the face reaches the infiltration front (lag 1), or when unfilled pores appear
(lag 2).

A slice cannot be imaged again once it is milled away, so the policy is built to deposit before the front,
not after it shows:
- the reach: how far past a deposit's face slices were imaged with their pores filled. It is learnt
  from the deposits the face outran: the advance of the last slice imaged clean before pores went
  unfilled (the lower end of where the front lies; the slice that showed them is already past it). A
  deposit that was imaged clean as far as it was trusted grows the estimate by one slice only, so a
  probe that finds the front costs one partly unfilled slice, not a band of them;
- never past `max_reach_fraction` of the reported depth (the instrument reports the nominal reach; in
  dense electrode the precursor gets a third as far). Dense bands come back along the run and the face
  enters one with no warning: the front goes from no pore to most pores unfilled within a slice or two,
  and the segmentation that shows it arrives two slices late. A reach learnt in an open stretch would
  image a pair of unfilled slices at each dense band; the ceiling is what keeps every 10-slice window
  filled, at the price of more deposits where the electrode is open (README, "Adaptive policies");
- deposit for the next slice when it would be imaged less than `margin_m` short of that reach (lag 1:
  no segmentation needed), or
- when the latest segmented slice since the last deposit shows more unfilled pores than the threshold
  (the front came sooner than learnt: lag 2, since slice i's segmentation overlaps slice i+1's work), or
- when `max_interval_slices` have passed (a bound for a blind spot), and never within
  `min_interval_slices`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kintsugi_daemon.adapt.decisions import LAG, Decision, decision
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import Recipe

__all__ = ["decide", "reach_fraction"]


def _deposits(history: Sequence[Observation]) -> list[int]:
    return [i for i, o in enumerate(history) if o.settings.deposit_pt]


def _face_before(history: Sequence[Observation], i: int) -> float:
    """The face a deposit infiltrated: the one before its slice was milled."""
    if i > 0:
        return history[i - 1].face_position_m
    return history[0].face_position_m - history[0].settings.mill_thickness_m


def _unfilled(o: Observation, recipe: Recipe) -> bool:
    seg = o.segmentation
    return seg is not None and (seg.unfilled_pore_share or 0.0) > recipe.adapt.pt.max_unfilled_share


def _reported(o: Observation, recipe: Recipe) -> float:
    return o.infiltration_depth_m or recipe.adapt.pt.assumed_infiltration_m


def reach_fraction(history: Sequence[Observation], recipe: Recipe) -> float:
    """How far past its face the next deposit is expected to keep pores filled, as a fraction of its
    reported depth, from what the deposits so far did (see the module docstring)."""
    s = recipe.adapt.pt
    step = recipe.run.slice_thickness_m
    fraction = s.max_reach_fraction
    deposits = _deposits(history)
    for n, start in enumerate(deposits):
        end = deposits[n + 1] if n + 1 < len(deposits) else len(history)
        reported, face = _reported(history[start], recipe), _face_before(history, start)
        crossing = next((i for i in range(start, end) if _unfilled(history[i], recipe)), None)
        if crossing is not None:
            clean = history[crossing - 1].face_position_m if crossing > start else face
            fraction = max(clean - face, 0.0) / reported
        elif n + 1 < len(deposits):
            imaged = history[end - 1].face_position_m - face
            if imaged + step > fraction * reported - s.margin_m:
                # Imaged clean as far as it was trusted: one slice further next time (a deposit
                # followed early by the next says nothing about its reach).
                fraction += step / reported
        fraction = min(fraction, s.max_reach_fraction)
    return max(fraction, 0.0)


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
    seen = next((o for o in reversed(history[last:]) if o.segmentation is not None), None)
    if seen is not None and seen.segmentation is not None and _unfilled(seen, recipe):
        share = seen.segmentation.unfilled_pore_share or 0.0
        return deposit(
            seen,
            LAG["pt"],
            {"unfilled_pore_share": share},
            s.max_unfilled_share,
            f"slice {seen.slice_index} shows {share:.1%} of its pores unfilled",
        )
    # The reach needs no segmentation (lag 1): without a deposit now, the next slice is imaged one more
    # mill past the last deposit's face.
    reach = _reported(history[last], recipe) * reach_fraction(history, recipe)
    advanced = latest.face_position_m - _face_before(history, last) + latest.settings.mill_thickness_m
    ahead = reach - advanced
    if ahead < s.margin_m:
        return deposit(
            latest,
            1,
            {"reach_ahead_m": ahead, "reach_m": reach},
            s.margin_m,
            f"slice {latest.slice_index + 1} would be imaged {advanced * 1e9:.0f} nm past the last deposit, "
            f"{ahead * 1e9:.0f} nm short of its expected reach ({reach * 1e9:.0f} nm)",
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
