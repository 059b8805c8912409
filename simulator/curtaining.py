"""Curtaining: vertical stripes left by the ion beam on the milled face (DOMAIN.md).

The ion beam mills from the top of the face (row 0) downwards along axis 1. Where it crosses a density
step (the top surface, a void, a hard particle next to soft binder) the local sputter rate changes and
the step's shadow is carried down the rest of the column as a stripe. So the stripe amplitude at
(row, col) grows with the density contrast met above that row in that column; it is worse at high
current, depends on the ion species, and is reduced by each polish pass. A protective Pt cap removes the
top surface's seeding (it is the first step every column meets) but not the voids below it; Pt-filling
the voids removes theirs, which is why an infiltrated face curtains far less (the kintsugi side benefit;
Schankula et al. 2018 and the plasma-FIB literature: curtaining on porous electrodes is seeded by pores).
Stripes are 0.2-2 um wide (a fine and a coarse band-limited profile) and a few percent strong on an
unfilled porous face at 15 nA Xe; solid/solid (hard/soft) steps seed at a third of a void step's weight.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from simulator.materials import Material

__all__ = ["SPECIES_FACTOR", "curtain_amplitude", "curtain_map"]

Species = Literal["xe", "o", "ar", "n"]

SPECIES_FACTOR: dict[str, float] = {"xe": 1.0, "ar": 1.2, "n": 1.1, "o": 0.8}
REFERENCE_CURRENT_A = 15e-9
BASE_AMPLITUDE = 0.08  # rms stripe modulation at 15 nA Xe, no polish, saturated seeding (est.)
CAP_ATTENUATION_M = 0.5e-6  # the top surface's seeding * exp(-cap / 0.5 um)
POLISH_FACTOR = 0.85  # amplitude * 0.85 per polish pass
SOLID_STEP_WEIGHT = 0.35  # a hard/soft (NMC/CBD) step seeds less than an edge into a void
FINE_WIDTH_M, COARSE_WIDTH_M = 0.1e-6, 0.5e-6  # Gaussian sigma of the two stripe profiles
PERSISTENCE = 0.7  # correlation of the stripe pattern with the previous slice's
SEED_SATURATION = 2.0  # normalised density steps after which a column's stripe is fully developed

# Density (g/cm^3) per material code; Pt-C deposit ~ 9 (est.). Voids are 0.
_DENSITY = np.zeros(8, dtype=np.float32)
_DENSITY[int(Material.NMC)] = 4.7
_DENSITY[int(Material.CBD)] = 1.8
_DENSITY[int(Material.CBD_CRACK)] = 1.8
_DENSITY[int(Material.AL)] = 2.7
_PT_DENSITY = 4.0  # a Pt-C filled pore mills close to its surroundings: filling removes the void step
_DENSITY_SCALE = 4.7  # a vacuum/NMC step counts as 1


def curtain_amplitude(current_a: float, species: Species, polish_passes: int) -> float:
    """Global rms stripe amplitude before the per-column seeding envelope."""
    return (
        BASE_AMPLITUDE
        * math.sqrt(max(current_a, 0.0) / REFERENCE_CURRENT_A)
        * SPECIES_FACTOR[species]
        * POLISH_FACTOR ** max(polish_passes, 0)
    )


def _unit_rms(x: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return x / np.float32(rms) if rms > 0 else np.zeros_like(x)


def curtain_map(
    face_materials: np.ndarray,
    cap_thickness_m: float,
    current_a: float,
    species: Species,
    polish_passes: int,
    rng: np.random.Generator,
    previous: np.ndarray | None = None,
    *,
    pt: np.ndarray | None = None,
    voxel_size_m: float = 40e-9,
) -> np.ndarray:
    """Multiplicative stripe modulation (float32, (rows, cols), ~1 +- amplitude) for one milled face.

    face_materials: (rows, cols) Material codes of the face; pt: optional Pt mask of the face (filled
    voids seed no stripes). previous: the last slice's map; its stripe pattern carries over with
    correlation PERSISTENCE (the beam keeps cutting along the same ridges)."""
    cols = int(face_materials.shape[1])
    density = _DENSITY.take(face_materials)
    void = density == 0
    if pt is not None:
        density[pt] = _PT_DENSITY
        void &= ~pt
    # density steps along the milling direction; an edge into or out of a void counts fully, a
    # solid/solid step by SOLID_STEP_WEIGHT
    steps = np.empty_like(density)
    steps[0] = density[0] * np.float32(math.exp(-max(cap_thickness_m, 0.0) / CAP_ATTENUATION_M))
    np.abs(np.diff(density, axis=0), out=steps[1:])
    solid_pair = ~(void[1:] | void[:-1])
    steps[1:][solid_pair] *= np.float32(SOLID_STEP_WEIGHT)
    seeded = np.cumsum(steps, axis=0, dtype=np.float32) / np.float32(_DENSITY_SCALE * SEED_SATURATION)
    envelope = 1.0 - np.exp(-seeded)

    # stripes of mixed widths (0.2-2 um): a fine and a coarse band-limited random profile across columns
    fine_px = FINE_WIDTH_M / voxel_size_m
    coarse_px = COARSE_WIDTH_M / voxel_size_m
    fine = ndi.gaussian_filter1d(rng.standard_normal((cols,), dtype=np.float32), fine_px, mode="wrap")
    coarse = ndi.gaussian_filter1d(rng.standard_normal((cols,), dtype=np.float32), coarse_px, mode="wrap")
    pattern = _unit_rms(_unit_rms(fine) + _unit_rms(coarse))
    if previous is not None and previous.shape == face_materials.shape:
        carried = _unit_rms((previous.astype(np.float32) - 1.0).mean(axis=0))
        if carried.any():
            pattern = PERSISTENCE * carried + math.sqrt(1.0 - PERSISTENCE**2) * pattern

    amp = curtain_amplitude(current_a, species, polish_passes)
    out = 1.0 + np.float32(amp) * envelope * pattern[None, :]
    result: np.ndarray = np.clip(out, 0.05, 3.0).astype(np.float32)
    return result
