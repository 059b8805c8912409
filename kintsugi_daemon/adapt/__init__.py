"""Next-slice policies: pure functions of the observation history and the recipe's bounds (one module
each). `policy = "fixed"` is the baseline and decides nothing; `"adaptive"` runs the enabled tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kintsugi_daemon.adapt import curtaining, drift, focus, imaging, pt, stop, thickness
from kintsugi_daemon.adapt.decisions import LAG, Decision, OutOfBounds, PolicyName, next_settings
from kintsugi_daemon.adapt.observations import Observation, SliceSettings
from kintsugi_daemon.config import Recipe

__all__ = [
    "LAG",
    "POLICIES",
    "Decision",
    "Observation",
    "OutOfBounds",
    "SliceSettings",
    "decide",
    "enabled",
    "next_settings",
]

Policy = Callable[[Sequence[Observation], Recipe], list[Decision]]

# Order matters only for the journal's readability: safety first (drift may suspend, stop may end).
POLICIES: dict[PolicyName, Policy] = {
    "drift": drift.decide,
    "stop": stop.decide,
    "pt": pt.decide,
    "focus": focus.decide,
    "thickness": thickness.decide,
    "curtaining": curtaining.decide,
    "imaging": imaging.decide,
}


def enabled(recipe: Recipe) -> list[PolicyName]:
    a = recipe.adapt
    if a.policy == "fixed":
        return []
    tables: dict[PolicyName, bool] = {
        "drift": a.drift.enabled,
        "stop": a.stop.enabled,
        "pt": a.pt.enabled,
        "focus": a.focus.enabled,
        "thickness": a.thickness.enabled,
        "curtaining": a.curtaining.enabled,
        "imaging": a.imaging.enabled,
    }
    return [name for name in POLICIES if tables[name]]


def decide(
    history: Sequence[Observation], recipe: Recipe, only: Sequence[PolicyName] | None = None
) -> list[Decision]:
    """Every enabled policy's decisions on this history (a policy that raises propagates: the caller
    suspends the run rather than milling on a guess)."""
    names = enabled(recipe) if only is None else [n for n in enabled(recipe) if n in only]
    return [d for name in names for d in POLICIES[name](history, recipe)]
