"""`policy = "fixed"`: the baseline (Auto Slice & View) decides nothing; every slice runs the recipe."""

from __future__ import annotations

from typing import Any

from kintsugi_daemon.config import Recipe

__all__ = ["decide"]


def decide(recipe: Recipe) -> dict[str, Any]:
    """The adapt step's result: the policy that ran and what it changed for the next slice (nothing)."""
    return {"policy": recipe.adapt.policy, "decisions": {}}
