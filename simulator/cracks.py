"""Intergranular cracks: bands along the Voronoi faces between grain seeds of a cracked particle."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.spatial import Delaunay, QhullError

from simulator.specimen_grid import (
    CLOSED_LIMIT,
    F64,
    I64,
    SCALE_MAX,
    Cracks,
    Grid,
    Particles,
    grid_shape,
)
from simulator.specimen_params import SpecimenParams

__all__ = ["crack_hits", "make_cracks"]


def make_cracks(p: SpecimenParams, rng: np.random.Generator, parts: Particles) -> Cracks:
    shape = p.shape
    n = len(parts.radii)
    cracked = rng.random(n) < p.crack_fraction
    closed = rng.random(n) < p.closed_crack_fraction
    flats: list[I64] = []
    pids: list[npt.NDArray[np.int32]] = []
    kinds: list[npt.NDArray[np.uint8]] = []
    hi = np.array(shape, dtype=np.float64) - 1
    for pid in range(n):
        # Draw for every particle so the stream does not depend on which ones touch the volume.
        k = int(rng.integers(p.grains_per_particle[0], p.grains_per_particle[1] + 1))
        u = rng.standard_normal((k, 3))
        u *= (0.75 * rng.random(k) ** (1 / 3) / np.linalg.norm(u, axis=1))[:, None]
        draws = rng.random(k * k * 3)
        c, r = parts.centres[pid], parts.radii[pid]
        if not cracked[pid]:
            continue
        reach = r * SCALE_MAX * (CLOSED_LIMIT if closed[pid] else 1.0)
        if np.any(c + reach < 0) or np.any(c - reach > hi):
            continue
        seeds = c + r * u
        for q, (a, b) in enumerate(_grain_neighbours(u)):
            if draws[3 * q] >= p.crack_pair_probability:
                continue
            w = p.crack_width_vox[0] + (p.crack_width_vox[1] - p.crack_width_vox[0]) * draws[3 * q + 1]
            pts = _boundary_band(seeds, a, b, w, c, reach, shape, p.crack_wiggle_vox, pid * 131 + q)
            if len(pts) == 0:
                continue
            kind = 2 if closed[pid] else int(draws[3 * q + 2] < p.cbd_filled_crack_fraction)
            flats.append(pts)
            pids.append(np.full(len(pts), pid, dtype=np.int32))
            kinds.append(np.full(len(pts), kind, dtype=np.uint8))
    if not flats:
        return Cracks(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint8))
    flat = np.concatenate(flats)
    pid_a = np.concatenate(pids)
    kind_a = np.concatenate(kinds)
    # One entry per (voxel, particle); sort by voxel so slabs are contiguous ranges.
    key = flat * (n + 1) + pid_a
    _, first = np.unique(key, return_index=True)
    return Cracks(flat=flat[first], pid=pid_a[first], kind=kind_a[first])


def _grain_neighbours(u: F64) -> list[tuple[int, int]]:
    """Seed pairs that share a Voronoi face (Delaunay edges); all pairs if Qhull cannot triangulate."""
    k = len(u)
    if k >= 5:
        try:
            edges: set[tuple[int, int]] = set()
            for simplex in Delaunay(u).simplices:
                s = sorted(int(v) for v in simplex)
                edges.update((s[i], s[j]) for i in range(4) for j in range(i + 1, 4))
            return sorted(edges)
        except QhullError:
            pass
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def _wiggle(jj: F64, kk: F64, salt: int, cell: float = 10.0) -> F64:
    """Smooth offsets in [-1, 1) over the plane coordinates (bilinear hashed lattice, `cell` voxels)."""
    u, v = jj / cell, kk / cell
    i0, j0 = np.floor(u), np.floor(v)
    fu, fv = u - i0, v - j0
    out = np.zeros_like(jj)
    for di in (0, 1):
        for dj in (0, 1):
            h = ((i0 + di).astype(np.int64) * 73856093) ^ ((j0 + dj).astype(np.int64) * 19349663) ^ salt
            h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFF
            w = (fu if di else 1 - fu) * (fv if dj else 1 - fv)
            out += w * (h / 8388608.0 - 1.0)
    return out


def _boundary_band(
    seeds: F64,
    a: int,
    b: int,
    width: float,
    centre: F64,
    reach: float,
    shape: tuple[int, int, int],
    wiggle: float = 0.0,
    salt: int = 0,
) -> I64:
    """Flat indices of voxels within width/2 of the bisector of seeds a, b whose two nearest seeds are a, b,
    inside the sphere (centre, reach). Built plane-first so the cost scales with the crack area."""
    normal = seeds[b] - seeds[a]
    normal /= np.linalg.norm(normal)
    mid = 0.5 * (seeds[a] + seeds[b])
    i = int(np.argmax(np.abs(normal)))
    j, k = (ax for ax in range(3) if ax != i)
    js = np.arange(max(0, math.ceil(centre[j] - reach)), min(shape[j], math.floor(centre[j] + reach) + 1))
    ks = np.arange(max(0, math.ceil(centre[k] - reach)), min(shape[k], math.floor(centre[k] + reach) + 1))
    if len(js) == 0 or len(ks) == 0:
        return np.zeros(0, np.int64)
    jj, kk = np.meshgrid(js.astype(np.float64), ks.astype(np.float64), indexing="ij")
    t0 = mid[i] - (normal[j] * (jj - mid[j]) + normal[k] * (kk - mid[k])) / normal[i]
    if wiggle > 0:
        t0 = t0 + wiggle * _wiggle(jj, kk, salt)
    inside = (jj - centre[j]) ** 2 + (kk - centre[k]) ** 2 + (t0 - centre[i]) ** 2 < (reach + 3.0) ** 2
    jj, kk, t0 = jj[inside], kk[inside], t0[inside]
    span = 0.5 * width / abs(normal[i])
    steps = np.arange(math.ceil(2 * span) + 1, dtype=np.float64)
    t = np.ceil(t0 - span)[:, None] + steps[None, :]
    pts = np.empty((t.size, 3), dtype=np.float64)
    pts[:, i] = t.ravel()
    pts[:, j] = np.broadcast_to(jj[:, None], t.shape).ravel()
    pts[:, k] = np.broadcast_to(kk[:, None], t.shape).ravel()
    off = (pts - mid) @ normal
    if wiggle > 0:  # measure the band around the meandering surface, not the flat bisector
        off = off - wiggle * normal[i] * _wiggle(pts[:, j], pts[:, k], salt)
    keep = (np.abs(off) < 0.5 * width) & (pts[:, i] >= 0) & (pts[:, i] < shape[i])
    keep &= np.sum((pts - centre) ** 2, axis=1) < reach**2
    pts = pts[keep]
    if len(pts) == 0:
        return np.zeros(0, np.int64)
    d2 = np.sum((pts[:, None, :] - seeds[None, :, :]) ** 2, axis=2)
    pair = np.maximum(d2[:, a], d2[:, b])
    d2[:, [a, b]] = np.inf
    pts = pts[pair <= d2.min(axis=1)]
    ip = pts.astype(np.int64)
    flat: I64 = (ip[:, 0] * shape[1] + ip[:, 1]) * shape[2] + ip[:, 2]
    return flat


def crack_hits(cracks: Cracks, grid: Grid, shape: tuple[int, int, int]) -> tuple[I64, I64]:
    """(entries of cracks on the grid, flat index into the grid array) for a strided or slab grid."""
    lo = grid[0].start * shape[1] * shape[2]
    hi = (grid[0].last + 1) * shape[1] * shape[2]
    sel = np.arange(*np.searchsorted(cracks.flat, [lo, hi]), dtype=np.int64)
    zyx = np.unravel_index(cracks.flat[sel], shape)
    ok = np.ones(len(sel), dtype=bool)
    idx = []
    for ax, c in zip(grid, zyx, strict=True):
        off = c - ax.start
        ok &= (off % ax.step == 0) & (off >= 0) & (off < ax.step * ax.num)
        idx.append(off // ax.step)
    gshape = grid_shape(grid)
    flat = (idx[0] * gshape[1] + idx[1]) * gshape[2] + idx[2]
    return sel[ok], flat[ok]
