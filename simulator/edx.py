"""EDX element maps of the face (DOMAIN.md: 10 kV, 1.6 nA, 54 nm step; Ni, Al, Pt, C, F).

Counts per element are Poisson with mean rate * current * dwell * concentration, where the
concentration is averaged over the X-ray interaction volume: a few planes along the beam into the face
(weighted by depth) and a lateral Gaussian of ~1 um FWHM at 10 kV (scaled with (kV/10)^1.67).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from simulator import detectors as det
from simulator.materials import Material
from simulator.pore_back import BEAM_TILT_FROM_NORMAL_DEG

if TYPE_CHECKING:
    from simulator.imaging import FaceView

__all__ = ["EDX_RATE_CPS_PER_NA", "render_edx"]

# Counts per second per nA of beam current from a pure phase (est., SDD at 10 kV, typical 0.1-1 sr).
EDX_RATE_CPS_PER_NA: dict[str, float] = {
    "Ni": 9000.0,
    "Mn": 1200.0,
    "Co": 1200.0,
    "O": 5000.0,
    "Al": 12000.0,
    "Pt": 10000.0,
    "C": 4000.0,
    "F": 2500.0,
}

_N = det.N_CODES


def _conc(values: dict[Material, float]) -> np.ndarray:
    lut = np.zeros(_N, dtype=np.float32)
    for m, v in values.items():
        lut[int(m)] = v
    return lut


# Relative concentration (0..1 of the pure-phase rate) per material code, and in Pt-C filled voxels.
_COMPOSITION: dict[str, tuple[np.ndarray, float]] = {
    "Ni": (_conc({Material.NMC: 1.0}), 0.0),
    "Mn": (_conc({Material.NMC: 1.0}), 0.0),
    "Co": (_conc({Material.NMC: 1.0}), 0.0),
    "O": (_conc({Material.NMC: 1.0, Material.AL: 0.05}), 0.0),
    "Al": (_conc({Material.AL: 1.0}), 0.0),
    "Pt": (_conc({}), 1.0),
    "C": (_conc({Material.CBD: 1.0, Material.CBD_CRACK: 1.0}), 0.3),  # Pt-C deposits are carbon-rich
    "F": (_conc({Material.CBD: 1.0, Material.CBD_CRACK: 1.0}), 0.0),
}

INTERACTION_FWHM_10KV_M = 1.0e-6
DEPTH_ATTENUATION_M = 0.4e-6  # weight of deeper planes in the X-ray generation volume
DEPTH_SAMPLES_M = (0.0, 0.2e-6, 0.4e-6, 0.7e-6)
ELECTRODE_THICKNESS_M = 60e-6


def binder_gradient(y_m: np.ndarray) -> np.ndarray:
    """Graded PVDF distribution: F signal 1.4x at the top of the electrode, 0.6x at the collector."""
    return (1.4 - 0.8 * np.clip(y_m / ELECTRODE_THICKNESS_M, 0.0, 1.0)).astype(np.float32)


def render_edx(
    face: FaceView,
    elements: Sequence[str],
    step_m: float,
    width_m: float,
    height_m: float,
    origin_m: tuple[float, float],
    voltage_v: float,
    current_a: float,
    dwell_s: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """float32 Poisson counts per element on a (round(height/step), round(width/step)) grid, sampled with
    the same geometry as the SEM images (foreshortened in cross-section)."""
    unknown = [e for e in elements if e not in _COMPOSITION]
    if unknown:
        raise ValueError(f"no EDX model for elements {unknown}; known: {sorted(_COMPOSITION)}")
    ny, nx = max(1, round(height_m / step_m)), max(1, round(width_m / step_m))
    depth, n_rows, _ = face.materials.shape
    grid = det.sample_grid(
        face.materials.shape[1:], face.voxel_size_m, face.geometry, origin_m, step_m, ny, nx
    )
    inside = grid.row_ok[:, None] & grid.col_ok[None, :]

    # planes along the beam: (code, pt, weight) per depth sample inside the available depth
    tilt = math.radians(BEAM_TILT_FROM_NORMAL_DEG) if face.geometry == "cross_section" else 0.0
    layers: list[tuple[np.ndarray, np.ndarray, float]] = []
    for d in DEPTH_SAMPLES_M:
        d0 = round(d * math.cos(tilt) / face.voxel_size_m)
        d1 = round(d * math.sin(tilt) / face.voxel_size_m)
        if d0 >= depth:
            break
        rows = np.minimum(grid.rows + d1, n_rows - 1)
        codes = face.materials[d0].take(rows, axis=0).take(grid.cols, axis=1)
        pt = face.pt[d0].take(rows, axis=0).take(grid.cols, axis=1)
        layers.append((codes, pt, math.exp(-d / DEPTH_ATTENUATION_M)))
    total_w = sum(w for _, _, w in layers)

    fwhm = INTERACTION_FWHM_10KV_M * (voltage_v / 10e3) ** 1.67
    sigma_px = fwhm / 2.355 / step_m
    dose_nas = current_a * 1e9 * dwell_s
    out: dict[str, np.ndarray] = {}
    for element in elements:
        lut, pt_value = _COMPOSITION[element]
        conc = np.zeros((ny, nx), dtype=np.float32)
        for codes, pt, w in layers:
            layer = lut.take(codes)
            layer[pt] = pt_value
            conc += np.float32(w / total_w) * layer
        conc[~inside] = 0.0
        if element == "F":
            conc *= binder_gradient(grid.y_m)[:, None]
        if sigma_px >= 0.2:
            conc = ndi.gaussian_filter(conc, sigma_px, mode="nearest")
        lam = np.maximum(conc, 0.0).astype(np.float64) * EDX_RATE_CPS_PER_NA[element] * dose_nas
        out[element] = rng.poisson(lam).astype(np.float32)
    return out
