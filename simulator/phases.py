"""The phases around the particles: the CBD score field and its threshold, the collector, and the
full-resolution render of the material codes slab by slab."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from simulator.cracks import crack_hits
from simulator.materials import Material
from simulator.particles import collector_floor
from simulator.specimen_grid import (
    CLOSED_LIMIT,
    COARSE,
    F32,
    KIND_CODE,
    SCALE_MAX,
    Axis,
    Cracks,
    Grid,
    Particles,
    grid_shape,
    interp3,
    interp_axis,
    particle_field,
)
from simulator.specimen_params import SpecimenParams

__all__ = ["Fields", "collector_mask", "effective_g2", "render_slabs", "solve_fields"]

log = logging.getLogger(__name__)


@dataclass
class Fields:
    """Everything the full-resolution pass needs besides the particles and cracks."""

    scale: float
    cbd_threshold: float
    score: F32  # coarse CBD score, node j at voxel (j - score_margin) * COARSE
    score_margin: int
    interface: F32  # coarse collector interface height over the two lateral axes
    depth_axis: int
    floor_at: float | None
    bump: F32 | None = None  # coarse surface-roughness field (same nodes as score): g2 * (1 - 2 bump)


def effective_g2(g2: F32, f: Fields, grid: Grid) -> F32:
    """The particle field with rough surfaces: a point is inside when g2 * (1 - 2 bump) < scale^2."""
    if f.bump is None:
        return g2
    out = interp3(f.bump, grid, f.score_margin)
    out *= np.float32(-2.0)
    out += np.float32(1.0)
    out *= g2
    return out


def collector_mask(f: Fields, grid: Grid) -> npt.NDArray[np.bool_]:
    shape = grid_shape(grid)
    if f.floor_at is None:
        return np.zeros(shape, dtype=bool)
    lat = [ax for ax in range(3) if ax != f.depth_axis]
    top = interp_axis(f.interface, grid[lat[0]].coords(), 1, 0)
    top = interp_axis(top, grid[lat[1]].coords(), 1, 1)
    depth = grid[f.depth_axis].coords().astype(np.float32)
    if f.depth_axis == 0:
        return depth[:, None, None] >= top[None, :, :]
    return depth[None, :, None] >= top[:, None, :]


def _coarse_grid_with_roughness(
    p: SpecimenParams, rng: np.random.Generator, fields: Fields
) -> tuple[Grid, Fields]:
    """The coarse grid (with a margin so blurs see particles beyond the volume) and the particles'
    surface-roughness field on it."""
    sig = [
        x / (p.voxel_size_m * COARSE)
        for x in (p.cbd_neck_sigma_m, p.cbd_noise_length_m, p.roughness_length_m)
    ]
    margin = math.ceil(3 * max(sig)) + 1
    cgrid = tuple(Axis(-margin * COARSE, COARSE, (n - 1) // COARSE + 2 + 2 * margin) for n in p.shape)
    assert len(cgrid) == 3
    bump = ndimage.gaussian_filter(rng.standard_normal(grid_shape(cgrid), dtype=np.float32), sig[2])
    bump *= np.float32(p.surface_roughness / max(float(bump.std()), 1e-6))
    return cgrid, dataclasses.replace(fields, bump=bump, score_margin=margin)


def solve_fields(p: SpecimenParams, rng: np.random.Generator, parts: Particles, cracks: Cracks) -> Fields:
    """Pick the radius scale and CBD threshold on a strided sample so the targets are met."""
    target = p.targets
    shape = p.shape
    depth_axis, floor_at = collector_floor(p)
    lat = [ax for ax in range(3) if ax != depth_axis]
    rough = rng.standard_normal(tuple(shape[ax] // COARSE + 3 for ax in lat)).astype(np.float32)
    rough = ndimage.gaussian_filter(rough, 1e-6 / (p.voxel_size_m * COARSE), mode="reflect")
    rough *= p.collector_roughness_m / p.voxel_size_m / max(float(rough.std()), 1e-6)
    interface = (rough + (floor_at if floor_at is not None else 0.0)).astype(np.float32)
    fields = Fields(1.0, 0.0, np.zeros((2, 2, 2), np.float32), 0, interface, depth_axis, floor_at)

    cgrid, fields = _coarse_grid_with_roughness(p, rng, fields)
    margin = fields.score_margin
    sig_neck = p.cbd_neck_sigma_m / (p.voxel_size_m * COARSE)
    sig_noise = p.cbd_noise_length_m / (p.voxel_size_m * COARSE)
    attach2 = np.float32((1.0 + p.cbd_attach) ** 2)

    # Stride: odd (so it beats against COARSE and samples every interpolation phase), ~<= 16M samples.
    stride = 1
    while math.prod(shape) / stride**3 > 16e6:
        stride += 2
    grid = tuple(Axis(0, stride, (n - 1) // stride + 1) for n in shape)
    assert len(grid) == 3
    g2, label = particle_field(grid, parts, SCALE_MAX * (1.0 + p.cbd_attach))
    g2 = effective_g2(g2, fields, grid)
    electrode = ~collector_mask(fields, grid)
    n_el = max(1, int(np.count_nonzero(electrode)))
    g2e = g2[electrode]
    sel, gflat = crack_hits(cracks, grid, shape)
    own = (label.ravel()[gflat] == cracks.pid[sel]) & electrode.ravel()[gflat]
    sel, gflat = sel[own], gflat[own]
    cg2 = g2.ravel()[gflat]
    climit = np.where(cracks.kind[sel] == 2, CLOSED_LIMIT**2, 1.0).astype(np.float32)
    ccbd = cracks.kind[sel] == 1

    def crack_voxels(s2: float) -> tuple[int, int]:
        hit = cg2 < climit * s2
        return len(np.unique(gflat[hit])), len(np.unique(gflat[hit & ccbd]))

    def nmc(s: float) -> float:
        return (np.count_nonzero(g2e < s * s) - crack_voxels(s * s)[0]) / n_el

    lo, hi = 0.3, SCALE_MAX
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if nmc(mid) < target.nmc else (lo, mid)
    scale = 0.5 * (lo + hi)
    if scale > SCALE_MAX * 0.99:
        log.warning("NMC target %.3f not reachable; packing too loose", target.nmc)
    s2 = scale * scale
    cbd_in_cracks = crack_voxels(s2)[1]

    cg, _ = particle_field(cgrid, parts, scale)
    solid = (effective_g2(cg, fields, cgrid) < s2).astype(np.float32)
    solid[collector_mask(fields, cgrid)] = 1.0  # binder also wets the collector
    score = ndimage.gaussian_filter(solid, sig_neck, mode="nearest")
    del cg, solid
    noise = ndimage.gaussian_filter(rng.standard_normal(score.shape, dtype=np.float32), sig_noise)
    noise *= p.cbd_noise_weight / max(float(noise.std()), 1e-6)
    score += noise
    del noise

    free = electrode & (g2 >= s2) & (g2 < s2 * attach2)  # CBD hugs particles: no floating islands
    fscore = interp3(score, grid, margin)[free]
    need = round(target.cbd * n_el) - cbd_in_cracks
    if 0 < need < len(fscore):
        threshold = float(np.partition(fscore, len(fscore) - need)[len(fscore) - need])
        threshold = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    else:
        threshold = math.inf if need <= 0 else -math.inf
    return dataclasses.replace(fields, scale=scale, cbd_threshold=threshold, score=score)


def render_slabs(
    p: SpecimenParams, parts: Particles, cracks: Cracks, f: Fields, slab: int = 8
) -> Iterator[npt.NDArray[np.uint8]]:
    """Full-resolution materials, slab by slab along axis 0 (bounds the temporaries)."""
    n0, n1, n2 = p.shape
    s2 = np.float32(f.scale**2)
    attach2 = np.float32((1.0 + p.cbd_attach) ** 2) * s2
    lim2 = np.array([s2, s2, s2 * CLOSED_LIMIT**2], dtype=np.float32)
    for z0 in range(0, n0, slab):
        grid = (Axis(z0, 1, min(slab, n0 - z0)), Axis(0, 1, n1), Axis(0, 1, n2))
        g2, label = particle_field(grid, parts, f.scale * (1.0 + p.cbd_attach))
        rough = effective_g2(g2, f, grid)
        part = rough < s2
        mat = part.view(np.uint8) + np.uint8(Material.PORE)  # PORE=1, NMC=2
        score = interp3(f.score, grid, f.score_margin)
        cbd = score > f.cbd_threshold
        del score
        cbd &= ~part
        cbd &= rough < attach2
        del rough
        np.copyto(mat, np.uint8(Material.CBD), where=cbd)
        del cbd, part
        sel, gflat = crack_hits(cracks, grid, p.shape)
        ok = (label.ravel()[gflat] == cracks.pid[sel]) & (g2.ravel()[gflat] < lim2[cracks.kind[sel]])
        mat.ravel()[gflat[ok]] = KIND_CODE[cracks.kind[sel[ok]]]
        del g2, label
        np.copyto(mat, np.uint8(Material.AL), where=collector_mask(f, grid))
        yield mat
