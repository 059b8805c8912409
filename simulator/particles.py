"""NMC secondary particles: a polydisperse soft-sphere packing resting on the collector."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from simulator.specimen_grid import F64, Particles
from simulator.specimen_params import SpecimenParams

__all__ = ["add_fines", "collector_floor", "pack_particles", "visible_particles"]


def add_fines(p: SpecimenParams, rng: np.random.Generator, parts: Particles) -> Particles:
    """Append NMC fines (fragments of primary-grain clusters, 0.3-1 um; calendering breaks particles)
    scattered through the electrode: fines_fraction of the NMC volume. Appended after the cracks were
    drawn, so particle indices of cracked particles stay as they were."""
    shape = np.array(p.shape, dtype=np.float64)
    depth_axis, floor_at = collector_floor(p)
    depth_end = shape[depth_axis] if floor_at is None else min(floor_at, shape[depth_axis])
    box = shape.copy()
    box[depth_axis] = depth_end
    want = float(np.prod(box)) * p.targets.nmc * p.fines_fraction
    lo_r, hi_r = (0.5 * d / p.voxel_size_m for d in p.fines_diameter_m)
    radii: list[float] = []
    total = 0.0
    while total < want and len(radii) < 200_000:
        r = float(rng.uniform(lo_r, hi_r))
        radii.append(r)
        total += 4.0 / 3.0 * np.pi * r**3
    if not radii:
        return parts
    r_arr = np.asarray(radii)
    centres = rng.random((len(r_arr), 3)) * (box - 1)
    return Particles(
        centres=np.concatenate([parts.centres, centres]), radii=np.concatenate([parts.radii, r_arr])
    )


def pack_particles(p: SpecimenParams, rng: np.random.Generator, nmc_target: float) -> Particles:
    """Soft-sphere packing whose particle fraction inside the volume is close to the NMC target at
    radius scale 1 (so D50 stays as asked); the exact target is met later by `solve_fields`."""
    density = min(nmc_target * 1.06, 0.74)
    depth_axis, floor_at = collector_floor(p)
    depth_end = p.shape[depth_axis] if floor_at is None else min(floor_at, p.shape[depth_axis])
    probe = rng.random((20000, 3)) * (np.array(p.shape, dtype=np.float64) - 1)
    probe[:, depth_axis] = rng.random(len(probe)) * (depth_end - 1)
    parts = _relax(p, rng, density)
    for _ in range(3):
        tree = cKDTree(parts.centres)
        dist, idx = tree.query(probe, k=min(24, len(parts.radii)))
        dist, idx = dist.reshape(len(probe), -1), idx.reshape(len(probe), -1)
        measured = float(np.mean(np.any(dist < parts.radii[idx], axis=1)))
        if abs(measured - nmc_target * 1.01) < 0.015:
            break
        density = float(np.clip(density * nmc_target * 1.01 / max(measured, 0.05), 0.05, 0.8))
        parts = _relax(p, rng, density)
    return parts


def _relax(p: SpecimenParams, rng: np.random.Generator, density: float) -> Particles:
    """Lognormal spheres at `density` (sum of volumes / box) in a box with a margin around the volume,
    pushed apart until no pair overlaps by more than overlap_tolerance of the smaller radius."""
    shape = np.array(p.shape, dtype=np.float64)
    r50 = 0.5 * p.d50_m / p.voxel_size_m
    rmax = r50 * 2.2
    lo = -np.full(3, rmax)
    hi = shape - 1 + rmax
    depth_axis, floor_at = collector_floor(p)
    if floor_at is not None:
        hi[depth_axis] = min(hi[depth_axis], floor_at)
    want = float(np.prod(hi - lo)) * density
    radii_list: list[F64] = []
    total = 0.0
    while total < want:
        r = np.clip(r50 * np.exp(p.size_sigma * rng.standard_normal(256)), 0.45 * r50, rmax)
        radii_list.append(r)
        total += float(np.sum(4.0 / 3.0 * np.pi * r**3))
    radii = np.concatenate(radii_list)
    vols = np.cumsum(4.0 / 3.0 * np.pi * radii**3)
    radii = radii[: int(np.searchsorted(vols, want)) + 1]
    n = len(radii)
    upper = np.broadcast_to(hi, (n, 3)).copy()
    if floor_at is not None:  # particles rest on the collector instead of sinking into it
        upper[:, depth_axis] = floor_at - 0.85 * radii
    centres = np.clip(lo + rng.random((n, 3)) * (hi - lo), lo, upper)
    vol = radii**3
    for _ in range(400):
        pairs = cKDTree(centres).query_pairs(2.0 * float(radii.max()), output_type="ndarray")
        if len(pairs) == 0:
            break
        i, j = pairs[:, 0], pairs[:, 1]
        delta = centres[j] - centres[i]
        dist = np.maximum(np.linalg.norm(delta, axis=1), 1e-6)
        allowed = radii[i] + radii[j] - p.overlap_tolerance * np.minimum(radii[i], radii[j])
        over = allowed - dist
        sel = over > 0.01 * r50
        if not np.any(sel):
            break
        i, j, delta, dist, over = i[sel], j[sel], delta[sel], dist[sel], over[sel]
        unit = delta / dist[:, None]
        share = vol[j] / (vol[i] + vol[j])  # the smaller particle moves more
        disp = np.zeros_like(centres)
        np.add.at(disp, i, -unit * (over * share)[:, None])
        np.add.at(disp, j, unit * (over * (1.0 - share))[:, None])
        centres = np.clip(centres + 0.9 * disp, lo, upper)
    return Particles(centres=centres, radii=radii)


def collector_floor(p: SpecimenParams) -> tuple[int, float | None]:
    """(depth axis, nominal voxel index where the collector starts or None)."""
    if p.geometry == "cross_section":
        return 1, p.shape[1] - p.collector_thickness_m / p.voxel_size_m
    start = p.electrode_thickness_m / p.voxel_size_m
    return 0, (start if start < p.shape[0] + p.d50_m / p.voxel_size_m else None)


def visible_particles(p: SpecimenParams, parts: Particles, scale: float) -> tuple[F64, F64]:
    radii = parts.radii * scale
    hi = np.array(p.shape, dtype=np.float64) - 1
    vis = np.all((parts.centres + radii[:, None] >= 0) & (parts.centres - radii[:, None] <= hi), axis=1)
    return parts.centres[vis].copy(), radii[vis].copy()
