"""The simulated instrument in-process: geometry, timing, Pt, curtaining and drift bookkeeping."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from kintsugi_daemon import instrument as timing
from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    DepositRequest,
    DetectorSettings,
    IonBeamSettings,
    MillRequest,
    PolishRequest,
    Rectangle,
)
from simulator.factory import RunSize, make_simulator, specimen_params
from simulator.imaging import CAP_VIEW_M
from simulator.instrument import SimulatedDualBeam
from simulator.materials import CANONICAL_CLASSES, OUTSIDE_LABEL, canonical_labels

AREA = Rectangle(center_x_m=0.0, center_y_m=0.0, width_m=10e-6, height_m=8e-6)
SIZE = RunSize(width_px=192, height_px=128, slices=8)


def request(width: int = 192, height: int = 128) -> AcquireRequest:
    return AcquireRequest(
        detectors=[DetectorSettings(name="cbs")],
        width_px=width,
        height_px=height,
        pixel_size_m=40e-9,
        dwell_s=3e-6,
        voltage_v=5000.0,
        current_a=5e-9,
    )


def mill_request(thickness: float = 40e-9, current: float = 15e-9) -> MillRequest:
    return MillRequest(
        pattern="rectangle", area=AREA, slice_thickness_m=thickness, current_a=current, species="xe"
    )


@pytest.mark.parametrize("geometry", ["cross_section", "planar"])
async def test_labels_follow_the_face_geometry(geometry: str, sim_cache: Path) -> None:
    sim = make_simulator(SIZE, geometry=geometry, time_scale=0.0, cache_dir=sim_cache, seed=11)  # type: ignore[arg-type]
    await sim.acquire(request())
    assert sim.last_labels is not None
    face = sim.specimen.materials[sim.face_index]
    rows = np.arange(128) * (1 / math.sin(math.radians(52)) if geometry == "cross_section" else 1.0)
    if geometry == "cross_section":
        rows -= CAP_VIEW_M / 40e-9  # the frame starts above the top surface: the Pt cap is in view
    idx = np.floor(rows).astype(int)
    expected = canonical_labels(face[np.clip(idx, 0, None)][:, :192], None)
    expected[idx < 0] = OUTSIDE_LABEL  # cap and vacuum above the specimen are not a material class
    agreement = float((sim.last_labels == expected).mean())
    assert agreement > 0.9  # drift moves the field by well under a pixel on a fresh instrument
    if geometry == "cross_section":
        # Foreshortening: the ground truth reaches further down the face than the pixel rows alone would.
        plain = canonical_labels(face[:128, :192], None)
        assert np.all(sim.last_labels[: int(np.count_nonzero(idx < -1))] == OUTSIDE_LABEL)
        assert agreement > float((sim.last_labels == plain).mean())


async def test_time_scale_charges_instrument_time(sim_cache: Path) -> None:
    sim = make_simulator(SIZE, time_scale=0.002, cache_dir=sim_cache, seed=11)
    t0 = time.monotonic()
    result = await sim.mill(mill_request())
    wall = time.monotonic() - t0
    expected = timing.mill_time_s(AREA.width_m * AREA.height_m * result.removed_m, 15e-9, "xe", "si")
    assert result.duration_s == pytest.approx(expected)
    assert (await sim.state()).instrument_time_s == pytest.approx(expected)
    assert wall >= expected * 0.002 * 0.9


async def test_ion_species_and_current_change_mill_time(sim_cache: Path) -> None:
    sim = make_simulator(SIZE, time_scale=0.0, cache_dir=sim_cache, seed=11)
    fast = await sim.mill(mill_request(current=30e-9))
    slow = await sim.mill(mill_request(current=3e-9))
    assert slow.duration_s / slow.removed_m > 5 * fast.duration_s / fast.removed_m
    with pytest.raises(Exception, match="switch with set_ion_beam"):
        await sim.mill(
            MillRequest(pattern="rectangle", area=AREA, slice_thickness_m=40e-9, current_a=1e-9, species="o")
        )
    switched = await sim.set_ion_beam(IonBeamSettings(species="o", current_a=15e-9, voltage_v=30000.0))
    assert switched.switch_time_s >= timing.GAS_SWITCH_S  # a plasma gas change takes minutes


async def test_pt_fills_pores_ahead_and_brightens_them(sim_cache: Path) -> None:
    sim = make_simulator(SIZE, time_scale=0.0, cache_dir=sim_cache, seed=11)
    without = await _pore_fraction_after_one_slice(sim, deposit=False)
    sim2 = make_simulator(SIZE, time_scale=0.0, cache_dir=sim_cache, seed=11)
    with_pt = await _pore_fraction_after_one_slice(sim2, deposit=True)
    assert without == 0.0 and with_pt > 0.05
    # Pt stays in voids: never in NMC, CBD or collector voxels.
    solid = np.isin(sim2.specimen.materials, [2, 3, 4, 6])
    assert not (sim2.pt & solid).any()


async def _pore_fraction_after_one_slice(sim: SimulatedDualBeam, *, deposit: bool) -> float:
    if deposit:
        await sim.deposit_pt(DepositRequest(area=AREA, thickness_m=100e-9, beam="electron"))
    await sim.mill(mill_request())
    await sim.acquire(request())
    assert sim.last_labels is not None
    return float((sim.last_labels == CANONICAL_CLASSES["pore"]).mean())


async def test_polish_weakens_curtaining(sim_cache: Path) -> None:
    sim = make_simulator(SIZE, time_scale=0.0, cache_dir=sim_cache, seed=11)
    await sim.mill(mill_request(current=60e-9))
    assert sim._face.curtain is not None
    rough = float(np.std(sim._face.curtain))
    await sim.polish(PolishRequest(area=AREA, current_a=1e-9, species="xe", passes=3))
    assert float(np.std(sim._face.curtain)) < rough


def test_specimen_sized_for_the_run() -> None:
    cross = specimen_params(
        RunSize(width_px=1536, height_px=1024, slices=200), preset="96:2:2", seed=0, geometry="cross_section"
    )
    assert cross.shape[2] == 1536
    assert cross.shape[1] >= math.ceil(1024 / math.sin(math.radians(52)))  # foreshortened rows
    assert cross.shape[0] >= 200
    planar = specimen_params(
        RunSize(width_px=512, height_px=256, slices=10), preset="90:5:5", seed=0, geometry="planar"
    )
    assert planar.shape[1] >= 256 and planar.shape[1] < 300
    with pytest.raises(ValueError, match="preset"):
        specimen_params(SIZE, preset="99:1:0", seed=0, geometry="planar")
    with pytest.raises(ValueError, match="pixel_size_m"):
        RunSize(pixel_size_m=float("nan"))
