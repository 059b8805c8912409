"""The step registry against the state table, and reconciliation reading the journaled request."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kintsugi_daemon.config import Recipe
from kintsugi_daemon.drivers.base import MillRequest
from kintsugi_daemon.instrument import POLISH_REMOVAL_M
from kintsugi_daemon.service.journal import StepRecord
from kintsugi_daemon.states import steps
from kintsugi_daemon.states.recovery import judge
from kintsugi_daemon.states.table import STEPS
from tests.support.instrument_states import state

RECIPE = Recipe.model_validate(
    {
        "run": {"name": "t", "slices": 4, "slice_thickness_m": 40e-9},
        "roi": {"width_m": 10e-6, "height_m": 8e-6},
    }
)


def test_every_step_of_the_table_is_registered() -> None:
    assert tuple(steps.REGISTRY) == STEPS
    for name, spec in steps.REGISTRY.items():
        if spec.runner == "instrument":
            assert spec.perform is not None, name
        destructive = name in ("deposit_pt", "mill", "polish")
        assert spec.destructive is destructive, name
        if destructive:
            assert spec.reconcile is not None and spec.request_model is not None, name
    # Every step a recipe can plan is one the registry knows.
    planned = {s for i in range(4) for s in steps.steps_for_slice(RECIPE, i)}
    assert planned <= set(steps.REGISTRY)


def test_an_unknown_step_is_an_error_naming_it() -> None:
    with pytest.raises(steps.UnknownStep, match="'etch'"):
        steps.spec("etch")


def record(step: str, params: dict[str, Any]) -> StepRecord:
    return StepRecord(1, "r", 0, step, params, 0.0, None, None, None)


def intent(request: Any) -> dict[str, Any]:
    """What the controller journals: the request's JSON dump and the readings before, through JSON."""
    before = {"slice": 0, "face_before_m": 0.0, "cap_before_m": 1e-6}
    params = {**before, "request": request.model_dump(mode="json")}
    through_json: dict[str, Any] = json.loads(json.dumps(params))
    return through_json


def test_the_journaled_request_is_the_request_sent() -> None:
    request = steps.spec("mill").build(RECIPE, 25e-9)  # type: ignore[misc]
    assert isinstance(request, MillRequest) and request.slice_thickness_m == 25e-9
    assert steps.journaled_request(steps.spec("mill"), intent(request)) == request


@pytest.mark.parametrize(
    ("step", "face_m", "cap_m", "happened"),
    [
        ("mill", 15e-9, 1e-6, True),  # most of the 20 nm requested is gone: it was milled
        ("mill", 5e-9, 1e-6, False),
        ("deposit_pt", 0.0, 1.4e-6, True),  # the 0.5 um cap grew by 0.4 um
        ("deposit_pt", 0.0, 1.1e-6, False),
        ("polish", POLISH_REMOVAL_M, 1e-6, True),
        ("polish", 0.1 * POLISH_REMOVAL_M, 1e-6, False),
    ],
)
def test_reconciliation_judges_the_journaled_request(
    step: str, face_m: float, cap_m: float, happened: bool
) -> None:
    spec = steps.spec(step)
    assert spec.build is not None
    recipe = RECIPE.model_copy(update={"pt": RECIPE.pt.model_copy(update={"thickness_m": 0.5e-6})})
    params = intent(spec.build(recipe, 20e-9))  # a mill finishing half a slice
    assert judge(record(step, params), state(face_m=face_m, cap_m=cap_m)).happened is happened


def test_reconciliation_reads_the_figures_of_an_intent_journaled_before_requests() -> None:
    legacy = {"slice": 0, "face_before_m": 0.0, "cap_before_m": 1e-6, "thickness_m": 40e-9}
    assert judge(record("mill", legacy), state(face_m=30e-9)).happened
    assert not judge(record("mill", legacy), state(face_m=10e-9)).happened
    polish = {"slice": 0, "face_before_m": 0.0, "cap_before_m": 1e-6, "passes": 2}
    assert judge(record("polish", polish), state(face_m=2 * POLISH_REMOVAL_M)).happened


def test_a_non_destructive_step_is_repeated() -> None:
    assert not judge(record("image", {"slice": 0}), state(face_m=1e-6)).happened
