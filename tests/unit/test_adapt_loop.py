"""The adaptive loop on images: the fiducial's drift becomes the next slice's beam shift, a lost fiducial
is returned as a suspend, decisions wait for their slice, and a Pt deposit is not decided twice."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from kintsugi_daemon.adapt import decide
from kintsugi_daemon.adapt.loop import AdaptLoop
from kintsugi_daemon.inference.contract import CANONICAL_CLASSES
from kintsugi_daemon.inference.metrics import slice_metrics
from kintsugi_daemon.instrument import SIN_SEM_FIB
from tests.support.histories import LIMIT_M, adaptive_recipe

RNG = np.random.default_rng(3)
SCENE = ndi.gaussian_filter(RNG.random((700, 900)), 2.5) * 50_000 + 5_000


def frame(dy: float = 0.0, dx: float = 0.0) -> dict[str, np.ndarray]:
    """A 512 x 768 view of the scene with the field of view displaced by (dy, dx) px (drift)."""
    view = ndi.shift(SCENE, (-dy, -dx), order=3)[50:562, 50:818]
    img = np.clip(view + RNG.normal(0, 300, view.shape), 0, 65535).astype(np.uint16)
    return {"cbs": img, "tld": img}


def labels(unfilled: float) -> np.ndarray:
    lab = np.full((100, 100), CANONICAL_CLASSES["active"], dtype=np.uint8)
    pores = round(2000 * unfilled)
    lab.flat[:2000] = CANONICAL_CLASSES["pore"]
    lab.flat[:pores] = CANONICAL_CLASSES["unfilled_pore"]
    return lab


def test_drift_measured_on_the_fiducial_goes_to_the_next_slice() -> None:
    recipe = adaptive_recipe("[imaging]\nwidth_px = 768\nheight_px = 512\n")
    loop = AdaptLoop(recipe, LIMIT_M)
    assert loop.settings_for(0).deposit_pt  # the first slice starts from a fresh cap
    loop.observe(0, frame(), face_position_m=40e-9, working_distance_m=4e-3)
    assert [d.policy for d in loop.decide()] == []  # on the reference: nothing to correct
    assert not loop.settings_for(1).deposit_pt
    loop.observe(1, frame(dy=-2.0, dx=3.0), face_position_m=80e-9, working_distance_m=4e-3)
    (shift,) = [d for d in loop.decide() if d.policy == "drift"]
    assert shift.action == "beam_shift" and shift.applies_to_slice == 2
    px = recipe.imaging.pixel_size_m
    nxt = loop.settings_for(2)
    # Content moved by -3 px in x: the field of view moved +3 px; the beam shift takes it back.
    assert nxt.beam_shift_offset_x_m == pytest.approx(-3.0 * px, abs=0.2 * px)
    assert nxt.beam_shift_offset_y_m == pytest.approx(2.0 * px / SIN_SEM_FIB, abs=0.2 * px)


def test_a_lost_fiducial_is_a_suspend_not_a_queued_change() -> None:
    recipe = adaptive_recipe("[imaging]\nwidth_px = 768\nheight_px = 512\n")
    loop = AdaptLoop(recipe, LIMIT_M)
    loop.observe(0, frame(), face_position_m=40e-9, working_distance_m=4e-3)
    loop.decide()
    blank = {k: np.full_like(v, 20_000) for k, v in frame().items()}
    loop.observe(1, blank, face_position_m=80e-9, working_distance_m=4e-3)
    (suspend,) = [d for d in loop.decide() if d.action == "suspend"]
    assert "fiducial lost" in suspend.why and all(
        d.action != "suspend" for w in loop.pending.values() for d in w
    )


def test_pt_is_not_decided_twice_for_the_same_front() -> None:
    recipe = adaptive_recipe("[imaging]\nwidth_px = 768\nheight_px = 512\n[adapt.drift]\nenabled = false\n")
    loop = AdaptLoop(recipe, LIMIT_M)
    for i in range(4):
        if loop.settings_for(i).deposit_pt:
            loop.deposited(i, 2e-6)
        loop.observe(i, frame(), face_position_m=(i + 1) * 40e-9, working_distance_m=4e-3)
        if i >= 2:
            loop.attach_segmentation(i - 1, slice_metrics(labels(0.2), 40e-9))
        seen = [d for d in loop.decide() if d.policy == "pt" and "unfilled_pore_share" in d.measured]
        assert len(seen) == (1 if i == 2 else 0)  # slice 2's evidence predates the deposit on slice 3
        loop.settings_for(i + 1)
    assert loop.settings_for(3).deposit_pt
    # Deposit 0 kept one slice filled (slice 1 showed the front): deposit 3 is trusted as far, so slice 4
    # gets the next one from the reach (lag 1), not from the evidence already answered.
    assert loop.settings_for(4).deposit_pt
    assert [d.measured.keys() & {"reach_m"} for d in loop.decided[3] if d.policy == "pt"] == [{"reach_m"}]


def test_fixed_policy_follows_the_schedule_and_decides_nothing() -> None:
    recipe = adaptive_recipe("[pt]\nevery_slices = 3\n").model_copy()
    fixed = recipe.model_copy(update={"adapt": recipe.adapt.model_copy(update={"policy": "fixed"})})
    loop = AdaptLoop(fixed, LIMIT_M)
    assert [loop.settings_for(i).deposit_pt for i in range(7)] == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    loop.observe(0, frame(dx=30), face_position_m=40e-9, working_distance_m=4e-3)
    assert loop.decide() == []


def test_a_waiting_deposit_covers_new_evidence_of_the_same_front() -> None:
    recipe = adaptive_recipe("[imaging]\nwidth_px = 768\nheight_px = 512\n[adapt.drift]\nenabled = false\n")
    loop = AdaptLoop(recipe, LIMIT_M)
    for i in range(4):
        if loop.settings_for(i).deposit_pt:
            loop.deposited(i, 2e-6)
        loop.observe(i, frame(), face_position_m=(i + 1) * 40e-9, working_distance_m=4e-3)
    loop.attach_segmentation(3, slice_metrics(labels(0.2), 40e-9))
    (evidence,) = [d for d in decide(loop.history, recipe) if d.policy == "pt"]
    assert evidence.applies_to_slice == 5
    loop.pending[4] = [evidence.model_copy(update={"applies_to_slice": 4})]  # decided a slice earlier
    assert [d for d in loop.decide() if d.policy == "pt"] == []
