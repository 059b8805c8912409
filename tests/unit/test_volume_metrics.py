"""Volume metrics of a label stack against geometry whose answer is known (sphere, slab, channels)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from kintsugi_daemon.report.volume import OUTSIDE, volume_metrics

PORE, UNFILLED, ACTIVE, CBD, COLLECTOR = 0, 1, 2, 3, 4
HAS_TAUFACTOR = importlib.util.find_spec("taufactor") is not None


def ball(shape: tuple[int, int, int], radius_um: float, voxel_um: tuple[float, float, float]) -> np.ndarray:
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    centre = [(n - 1) / 2 for n in shape]
    d2 = sum(((g - c) * v) ** 2 for g, c, v in zip((zz, yy, xx), centre, voxel_um, strict=True))
    return np.asarray(d2 <= radius_um**2)


def test_porosity_ignores_outside_and_counts_unfilled_pores() -> None:
    stack = np.full((4, 10, 10), ACTIVE, np.uint8)
    stack[:, :5, :] = OUTSIDE  # above the specimen: not part of any fraction
    stack[:, 5, :] = PORE  # 1 of the 5 specimen rows
    stack[:, 6, :5] = UNFILLED  # half a row
    stack[:, 9, :] = COLLECTOR
    m = volume_metrics(stack, (40e-9, 40e-9, 40e-9))
    assert m.porosity == pytest.approx(1.5 / 5)
    assert m.electrode_porosity == pytest.approx(1.5 / 4)


@pytest.mark.parametrize("voxel_um", [(0.05, 0.05, 0.05), (0.1, 0.05, 0.05)])
def test_specific_surface_area_of_a_spherical_pore(voxel_um: tuple[float, float, float]) -> None:
    """A pore ball of radius 0.6 µm in a 2 µm cube: area 4 pi r^2 over 8 µm^3, whatever the z spacing."""
    shape = tuple(round(2.0 / v) for v in voxel_um)
    assert len(shape) == 3
    pores = ball(shape, 0.6, voxel_um)
    stack = np.where(pores, PORE, ACTIVE).astype(np.uint8)
    m = volume_metrics(stack, tuple(v * 1e-6 for v in voxel_um))  # type: ignore[arg-type]
    expected = 4 * math.pi * 0.6**2 / 8.0
    assert m.ssa_pore_um_inv == pytest.approx(expected, rel=0.05)
    # The active phase's surface is the same sphere: the cube's own faces are not a surface.
    assert m.ssa_active_um_inv == pytest.approx(expected, rel=0.05)


def test_pore_size_of_a_slab_is_its_thickness() -> None:
    stack = np.full((20, 60, 60), ACTIVE, np.uint8)
    stack[:, 20:30, :] = PORE  # 10 voxels of 50 nm: a 0.5 µm thick slab through the stack
    m = volume_metrics(stack, (50e-9, 50e-9, 50e-9))
    assert m.pore_sizes is not None
    assert m.pore_sizes.d50_um == pytest.approx(0.5, rel=0.12)
    assert sum(m.pore_sizes.volume_fraction) == pytest.approx(1.0)


def test_pore_sizes_weigh_volume() -> None:
    """Two balls, 0.4 and 1.2 µm across: the large one holds 27x the volume, so d50 is its diameter."""
    voxel = (0.05, 0.05, 0.05)
    small = ball((30, 30, 30), 0.2, voxel)
    large = ball((30, 30, 30), 0.6, voxel)
    stack = np.full((30, 30, 60), ACTIVE, np.uint8)
    stack[:, :, :30][small] = PORE
    stack[:, :, 30:][large] = PORE
    m = volume_metrics(stack, (50e-9, 50e-9, 50e-9))
    assert m.pore_sizes is not None
    assert m.pore_sizes.d50_um == pytest.approx(1.2, rel=0.15)
    big_bins = [
        f for d, f in zip(m.pore_sizes.diameters_um, m.pore_sizes.volume_fraction, strict=True) if d > 0.8
    ]
    assert sum(big_bins) > 0.8


@pytest.mark.skipif(not HAS_TAUFACTOR, reason="the volume extra (taufactor) is not installed")
def test_tortuosity_of_straight_and_blocked_channels() -> None:
    stack = np.full((12, 24, 24), ACTIVE, np.uint8)
    stack[:, 4:10, 4:10] = PORE  # a straight channel through the depth: tau = 1
    straight = volume_metrics(stack, (50e-9, 50e-9, 50e-9))
    assert straight.tortuosity_factor == pytest.approx(1.0, abs=0.05)
    stack[:6, 14:20, 14:20] = PORE  # a dead end does not change the straight channel much
    stack[6, 4:10, 4:10] = ACTIVE  # but a wall across the only through-path stops all transport
    blocked = volume_metrics(stack, (50e-9, 50e-9, 50e-9))
    assert blocked.tortuosity_factor is None
    assert "does not percolate" in blocked.unavailable["tortuosity_factor"]


@pytest.mark.skipif(HAS_TAUFACTOR, reason="taufactor is installed: the metric is computed")
def test_tortuosity_without_taufactor_says_how_to_get_it() -> None:
    stack = np.full((6, 8, 8), ACTIVE, np.uint8)
    stack[:, 2:4, 2:4] = PORE
    m = volume_metrics(stack, (50e-9, 50e-9, 50e-9))
    assert m.tortuosity_factor is None
    assert ".[volume]" in m.unavailable["tortuosity_factor"]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="stack"):
        volume_metrics(np.zeros((4, 4), np.uint8), (1e-8, 1e-8, 1e-8))
    with pytest.raises(ValueError, match="voxel size"):
        volume_metrics(np.zeros((2, 4, 4), np.uint8), (0.0, 1e-8, 1e-8))


def test_large_stacks_are_subsampled_in_xy_only() -> None:
    stack = np.full((3, 1200, 1200), ACTIVE, np.uint8)
    stack[:, :, :300] = PORE
    m = volume_metrics(stack, (40e-9, 40e-9, 40e-9))
    assert m.subsampled_xy > 1 and m.shape_zyx[0] == 3
    assert m.voxel_um[0] == pytest.approx(0.04) and m.voxel_um[1] == pytest.approx(0.04 * m.subsampled_xy)
    assert m.porosity == pytest.approx(0.25, abs=0.01)
