"""The simulator's night of drift and its fiducial, in-process: the mark the daemon mills shows up in every
image where drift puts it, the daemon's own measure finds that displacement, and the truth says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kintsugi_daemon.adapt.observations import fiducial_match
from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    DetectorSettings,
    FiducialRequest,
    MillRequest,
    Rectangle,
)
from kintsugi_daemon.instrument import SIN_SEM_FIB
from simulator.drift import THERMAL_NM_PER_MIN
from simulator.factory import RunSize, make_simulator

SIZE = RunSize(width_px=256, height_px=192, slices=12)
PX = 40e-9
WINDOW = (slice(8, 72), slice(8, 136))  # rows, cols of the fiducial window in the image


def request() -> AcquireRequest:
    return AcquireRequest(
        detectors=[DetectorSettings(name="cbs"), DetectorSettings(name="tld")],
        width_px=256,
        height_px=192,
        pixel_size_m=PX,
        dwell_s=3e-6,
        voltage_v=5000.0,
        current_a=5e-9,
    )


def fiducial_here() -> FiducialRequest:
    """The window's centre, from the top centre of the field (rows foreshortened by sin 52 deg)."""
    return FiducialRequest(
        offset_x_m=(72 - 128) * PX,
        offset_y_m=40 * PX / SIN_SEM_FIB,
        size_m=2e-6,
        current_a=1e-9,
        species="xe",
    )


async def test_fiducial_moves_with_drift_and_the_daemon_measures_it(sim_cache: Path) -> None:
    sim = make_simulator(SIZE, time_scale=0.0, cache_dir=sim_cache, seed=5)
    await sim.mill_fiducial(fiducial_here())
    first = await sim.acquire(request())
    assert sim.last_labels is not None and (sim.last_labels[24:56, 40:104] == 255).all()  # not a material
    reference = first.images["cbs"][WINDOW].astype(float)
    sim.inject_drift(3 * PX, -2 * PX / SIN_SEM_FIB)  # 3 px right, 2 rows up (face-plane metres)
    second = await sim.acquire(request())
    m = fiducial_match(reference, second.images["cbs"][WINDOW])
    before, after = sim.truth[-2], sim.truth[-1]
    true_dx = (after["fov_error_x_m"] - before["fov_error_x_m"]) / PX
    true_dy = (after["fov_error_y_m"] - before["fov_error_y_m"]) / (PX / SIN_SEM_FIB)
    # The field moved by -drift: the content moved the other way; the registration shift undoes it.
    assert true_dx == pytest.approx(-3.0, abs=0.05) and true_dy == pytest.approx(2.0, abs=0.05)
    assert m.shift_x_px == pytest.approx(true_dx, abs=0.3) and m.shift_y_px == pytest.approx(true_dy, abs=0.3)
    assert m.score > 0.9


async def test_without_a_fiducial_the_window_does_not_match(sim_cache: Path) -> None:
    sim = make_simulator(SIZE, time_scale=0.0, cache_dir=sim_cache, seed=5)
    await sim.mill_fiducial(fiducial_here())
    reference = (await sim.acquire(request())).images["cbs"][WINDOW]
    sim.fiducial = None  # what the test endpoint DELETE /test/fiducial does
    lost = (await sim.acquire(request())).images["cbs"][WINDOW]
    assert fiducial_match(reference, lost).score < 0.75


async def test_thermal_drift_runs_one_way_over_the_night(sim_cache: Path) -> None:
    sim = make_simulator(SIZE, time_scale=0.0, cache_dir=sim_cache, seed=5)
    area = Rectangle(center_x_m=0.0, center_y_m=0.0, width_m=10e-6, height_m=8e-6)
    await sim.acquire(request())
    for _ in range(5):
        await sim.mill(
            MillRequest(
                pattern="rectangle", area=area, slice_thickness_m=40e-9, current_a=15e-9, species="xe"
            )
        )
    await sim._spend(8 * 3600.0)  # the night passes in instrument time
    await sim.acquire(request())
    t0, t1 = sim.truth[0], sim.truth[-1]
    moved = np.hypot(t1["drift_x_m"] - t0["drift_x_m"], t1["drift_y_m"] - t0["drift_y_m"])
    expected = THERMAL_NM_PER_MIN * 1e-9 * 8 * 60
    assert 0.8 * expected < moved < 1.2 * expected  # the walk and jumps are small beside it
    assert moved / PX > 30  # uncorrected, the region is left by tens of pixels
