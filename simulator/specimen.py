"""The simulated specimen: a porous NMC cathode on an Al collector as a uint8 volume of `Material` codes.

Recipe (DOMAIN.md "Sample model"):
- polydisperse NMC spheres (lognormal diameters) packed by a soft-sphere relaxation in a box larger than
  the volume, so the volume reads as a cut-out of a bigger electrode;
- intergranular cracks in a fraction of the particles: bands 1.5-4 voxels wide along the Voronoi faces
  between a few grain seeds; per particle either all open (reaching the surface, some CBD-filled) or all
  closed (kept inside 0.8 R);
- CBD as an excursion set of score = blur(solid indicator) + w * smoothed noise on a coarse grid,
  trilinearly upsampled, so it gathers at necks and on the collector;
- the rest of the electrode is pore; the collector fills the bottom rows (cross-section) or the far end of
  axis 0 (planar) with a slightly rough interface.

Fractions are hit by construction: a strided sample of the very same fields picks the particle radius
scale (NMC target, cracks included) and the CBD threshold (CBD-domain target) before the full-resolution
pass renders the volume slab by slab along axis 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import Delaunay, QhullError, cKDTree

from kintsugi_daemon.service.atomic import write_atomic, write_json_atomic
from simulator.materials import Material

__all__ = [
    "PRESETS",
    "PresetFractions",
    "Specimen",
    "SpecimenParams",
    "build_specimen",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

# Bump whenever the generator changes what a given SpecimenParams renders (invalidates caches).
GENERATOR_VERSION = 1

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PresetFractions:
    """Targets over the electrode region. porosity = resolved pores + cracks + half the CBD domain."""

    porosity: float
    nmc: float
    cbd: float  # CBD domain (solid + ~50% nanopores), CBD-filled cracks included


PRESETS: dict[str, PresetFractions] = {
    "96:2:2": PresetFractions(porosity=0.30, nmc=0.63, cbd=0.14),
    "94:3:3": PresetFractions(porosity=0.35, nmc=0.56, cbd=0.18),
    "90:5:5": PresetFractions(porosity=0.40, nmc=0.47, cbd=0.27),
}

CBD_NANOPOROSITY = 0.5  # share of the CBD domain that is nanopore (counts towards porosity)


@dataclass(frozen=True)
class SpecimenParams:
    """Everything that decides the rendered volume; all of it goes into the cache key."""

    preset: str = "96:2:2"
    seed: int = 0
    shape: tuple[int, int, int] = (200, 1300, 1536)  # (slices along the mill axis, rows, cols)
    voxel_size_m: float = 40e-9
    geometry: Literal["cross_section", "planar"] = "cross_section"
    d50_m: float = 8e-6  # median particle diameter
    size_sigma: float = 0.25  # lognormal log-std of the diameters
    collector_thickness_m: float = 3e-6
    collector_roughness_m: float = 0.1e-6  # std of the interface height
    electrode_thickness_m: float = 60e-6  # planar only: depth along axis 0 where the collector starts
    crack_fraction: float = 0.4  # fraction of particles that carry cracks
    closed_crack_fraction: float = 0.4  # of the cracked particles, those whose cracks are all closed
    cbd_filled_crack_fraction: float = 0.5  # of the open cracks, those filled with CBD
    grains_per_particle: tuple[int, int] = (4, 8)  # grain seeds per cracked particle (min, max)
    crack_pair_probability: float = 0.5  # chance that a grain boundary is cracked
    crack_width_vox: tuple[float, float] = (1.5, 4.0)
    cbd_neck_sigma_m: float = 0.6e-6  # blur of the solid indicator: sets how CBD hugs necks
    cbd_noise_length_m: float = 0.4e-6  # correlation length of the CBD noise
    cbd_noise_weight: float = 0.12
    overlap_tolerance: float = 0.08  # allowed particle overlap as a fraction of the smaller radius

    def __post_init__(self) -> None:
        # Lists (from JSON or a CLI) would make the key differ from the equal tuple: normalise.
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "grains_per_particle", tuple(int(n) for n in self.grains_per_particle))
        object.__setattr__(self, "crack_width_vox", tuple(float(w) for w in self.crack_width_vox))
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; one of {sorted(PRESETS)}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive ints, got {self.shape}")
        if self.geometry not in ("cross_section", "planar"):
            raise ValueError(f"unknown geometry {self.geometry!r}")
        if not (self.voxel_size_m > 0 and self.d50_m > 4 * self.voxel_size_m):
            raise ValueError("need voxel_size_m > 0 and d50_m of at least 4 voxels")

    @property
    def targets(self) -> PresetFractions:
        return PRESETS[self.preset]

    def cache_key(self) -> str:
        blob = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True, eq=False)
class Specimen:
    params: SpecimenParams
    materials: npt.NDArray[np.uint8]  # (slices, rows, cols); a read-only memmap when cached
    counts: dict[str, int]  # voxels per Material name
    particle_centres_vox: F64 = field(repr=False)  # (N, 3), particles that touch the volume
    particle_radii_vox: F64 = field(repr=False)

    def fractions(self) -> dict[str, float]:
        """nmc, cbd (domain incl. CBD-filled cracks), pore (resolved voids incl. empty cracks), crack
        (empty + CBD-filled) and porosity over the electrode (no collector, no vacuum); collector over
        the whole volume."""
        c = self.counts
        total = sum(c.values())
        electrode = max(1, total - c["AL"] - c["VACUUM"])
        cbd = (c["CBD"] + c["CBD_CRACK"]) / electrode
        pore = (c["PORE"] + c["CRACK"]) / electrode
        return {
            "nmc": c["NMC"] / electrode,
            "cbd": cbd,
            "pore": pore,
            "porosity": pore + CBD_NANOPOROSITY * cbd,
            "crack": (c["CRACK"] + c["CBD_CRACK"]) / electrode,
            "collector": c["AL"] / max(1, total),
        }


def default_cache_dir() -> Path:
    env = os.environ.get("KINTSUGI_SIM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kintsugi-sim"


# ----------------------------------------------------------------------------------------------------
# Sampling grids: the same field code evaluates a strided sample, a coarse grid or a full-res slab.


@dataclass(frozen=True)
class _Axis:
    start: int
    step: int
    num: int

    def coords(self) -> F64:
        return self.start + self.step * np.arange(self.num, dtype=np.float64)

    def index_range(self, lo: float, hi: float) -> tuple[int, int]:
        """Indices whose coordinate lies in [lo, hi]."""
        i0 = max(0, math.ceil((lo - self.start) / self.step))
        i1 = min(self.num, math.floor((hi - self.start) / self.step) + 1)
        return i0, max(i0, i1)

    @property
    def last(self) -> int:
        return self.start + self.step * (self.num - 1)


_Grid = tuple[_Axis, _Axis, _Axis]


def _grid_shape(grid: _Grid) -> tuple[int, int, int]:
    return (grid[0].num, grid[1].num, grid[2].num)


@dataclass
class _Particles:
    centres: F64  # (N, 3) voxel coordinates
    radii: F64  # nominal radii in voxels; rendered radius = radii * scale


@dataclass
class _Cracks:
    """Sparse crack voxels: flat index into the full volume, sorted; owning particle; kind."""

    flat: I64
    pid: npt.NDArray[np.int32]
    kind: npt.NDArray[np.uint8]  # 0 open empty, 1 open CBD-filled, 2 closed


_KIND_CODE = np.array([Material.CRACK, Material.CBD_CRACK, Material.CRACK], dtype=np.uint8)
_CLOSED_LIMIT = 0.8  # closed cracks stay inside this fraction of the radius
_SCALE_MAX = 1.3  # the radius scale solved for the NMC target stays below this
_COARSE = 4  # coarse grid spacing (voxels) of the CBD and collector fields


def _particle_field(grid: _Grid, parts: _Particles, extent: float) -> tuple[F32, npt.NDArray[np.int32]]:
    """g2 = min over particles of (|x - c| / r)^2 and its argmin, evaluated within extent * r."""
    shape = _grid_shape(grid)
    g2 = np.full(shape, np.inf, dtype=np.float32)
    label = np.full(shape, -1, dtype=np.int32)
    coords = [a.coords() for a in grid]
    reach = parts.radii * extent
    lo = np.array([a.start for a in grid], dtype=np.float64)
    hi = np.array([a.last for a in grid], dtype=np.float64)
    hit = np.all((parts.centres + reach[:, None] >= lo) & (parts.centres - reach[:, None] <= hi), axis=1)
    for p in np.flatnonzero(hit):
        c, r, e = parts.centres[p], parts.radii[p], reach[p]
        (z0, z1), (y0, y1), (x0, x1) = (grid[k].index_range(c[k] - e, c[k] + e) for k in range(3))
        if z0 == z1 or y0 == y1 or x0 == x1:
            continue
        dz = (((coords[0][z0:z1] - c[0]) / r) ** 2).astype(np.float32)
        dy = (((coords[1][y0:y1] - c[1]) / r) ** 2).astype(np.float32)
        dx = (((coords[2][x0:x1] - c[2]) / r) ** 2).astype(np.float32)
        rel2 = (dz[:, None] + dy[None, :])[:, :, None] + dx[None, None, :]
        gv = g2[z0:z1, y0:y1, x0:x1]
        closer = rel2 < gv
        np.copyto(gv, rel2, where=closer)
        np.copyto(label[z0:z1, y0:y1, x0:x1], np.int32(p), where=closer)
    return g2, label


def _interp_axis(a: F32, coords: F64, margin: int, axis: int) -> F32:
    """Linear interpolation of a coarse-node array (node j at voxel (j - margin) * _COARSE) along axis."""
    u = coords / _COARSE + margin
    i0 = np.clip(np.floor(u).astype(np.intp), 0, a.shape[axis] - 2)
    w = np.clip(u - i0, 0.0, 1.0).astype(np.float32)
    bshape = [1] * a.ndim
    bshape[axis] = len(coords)
    w = w.reshape(bshape)
    lo = np.take(a, i0, axis=axis)
    hi = np.take(a, i0 + 1, axis=axis)
    hi -= lo
    hi *= w
    lo += hi
    return lo


def _interp3(a: F32, grid: _Grid, margin: int) -> F32:
    out = a
    for axis in range(3):
        out = _interp_axis(out, grid[axis].coords(), margin, axis)
    return out


# ----------------------------------------------------------------------------------------------------
# Construction steps


def _pack_particles(p: SpecimenParams, rng: np.random.Generator, nmc_target: float) -> _Particles:
    """Soft-sphere packing whose particle fraction inside the volume is close to the NMC target at
    radius scale 1 (so D50 stays as asked); the exact target is met later by `_solve_fields`."""
    density = min(nmc_target * 1.06, 0.74)
    depth_axis, floor_at = _collector_floor(p)
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


def _relax(p: SpecimenParams, rng: np.random.Generator, density: float) -> _Particles:
    """Lognormal spheres at `density` (sum of volumes / box) in a box with a margin around the volume,
    pushed apart until no pair overlaps by more than overlap_tolerance of the smaller radius."""
    shape = np.array(p.shape, dtype=np.float64)
    r50 = 0.5 * p.d50_m / p.voxel_size_m
    rmax = r50 * 2.2
    lo = -np.full(3, rmax)
    hi = shape - 1 + rmax
    depth_axis, floor_at = _collector_floor(p)
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
    return _Particles(centres=centres, radii=radii)


def _collector_floor(p: SpecimenParams) -> tuple[int, float | None]:
    """(depth axis, nominal voxel index where the collector starts or None)."""
    if p.geometry == "cross_section":
        return 1, p.shape[1] - p.collector_thickness_m / p.voxel_size_m
    start = p.electrode_thickness_m / p.voxel_size_m
    return 0, (start if start < p.shape[0] + p.d50_m / p.voxel_size_m else None)


def _make_cracks(p: SpecimenParams, rng: np.random.Generator, parts: _Particles) -> _Cracks:
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
        reach = r * _SCALE_MAX * (_CLOSED_LIMIT if closed[pid] else 1.0)
        if np.any(c + reach < 0) or np.any(c - reach > hi):
            continue
        seeds = c + r * u
        for q, (a, b) in enumerate(_grain_neighbours(u)):
            if draws[3 * q] >= p.crack_pair_probability:
                continue
            w = p.crack_width_vox[0] + (p.crack_width_vox[1] - p.crack_width_vox[0]) * draws[3 * q + 1]
            pts = _boundary_band(seeds, a, b, w, c, reach, shape)
            if len(pts) == 0:
                continue
            kind = 2 if closed[pid] else int(draws[3 * q + 2] < p.cbd_filled_crack_fraction)
            flats.append(pts)
            pids.append(np.full(len(pts), pid, dtype=np.int32))
            kinds.append(np.full(len(pts), kind, dtype=np.uint8))
    if not flats:
        return _Cracks(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint8))
    flat = np.concatenate(flats)
    pid_a = np.concatenate(pids)
    kind_a = np.concatenate(kinds)
    # One entry per (voxel, particle); sort by voxel so slabs are contiguous ranges.
    key = flat * (n + 1) + pid_a
    _, first = np.unique(key, return_index=True)
    return _Cracks(flat=flat[first], pid=pid_a[first], kind=kind_a[first])


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


def _boundary_band(
    seeds: F64, a: int, b: int, width: float, centre: F64, reach: float, shape: tuple[int, int, int]
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
    inside = (jj - centre[j]) ** 2 + (kk - centre[k]) ** 2 + (t0 - centre[i]) ** 2 < (reach + 3.0) ** 2
    jj, kk, t0 = jj[inside], kk[inside], t0[inside]
    span = 0.5 * width / abs(normal[i])
    steps = np.arange(math.ceil(2 * span) + 1, dtype=np.float64)
    t = np.ceil(t0 - span)[:, None] + steps[None, :]
    pts = np.empty((t.size, 3), dtype=np.float64)
    pts[:, i] = t.ravel()
    pts[:, j] = np.broadcast_to(jj[:, None], t.shape).ravel()
    pts[:, k] = np.broadcast_to(kk[:, None], t.shape).ravel()
    keep = (np.abs((pts - mid) @ normal) < 0.5 * width) & (pts[:, i] >= 0) & (pts[:, i] < shape[i])
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


def _crack_hits(cracks: _Cracks, grid: _Grid, shape: tuple[int, int, int]) -> tuple[I64, I64]:
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
    gshape = _grid_shape(grid)
    flat = (idx[0] * gshape[1] + idx[1]) * gshape[2] + idx[2]
    return sel[ok], flat[ok]


@dataclass
class _Fields:
    """Everything the full-resolution pass needs besides the particles and cracks."""

    scale: float
    cbd_threshold: float
    score: F32  # coarse CBD score, node j at voxel (j - score_margin) * _COARSE
    score_margin: int
    interface: F32  # coarse collector interface height over the two lateral axes
    depth_axis: int
    floor_at: float | None


def _collector_mask(f: _Fields, grid: _Grid) -> npt.NDArray[np.bool_]:
    shape = _grid_shape(grid)
    if f.floor_at is None:
        return np.zeros(shape, dtype=bool)
    lat = [ax for ax in range(3) if ax != f.depth_axis]
    top = _interp_axis(f.interface, grid[lat[0]].coords(), 1, 0)
    top = _interp_axis(top, grid[lat[1]].coords(), 1, 1)
    depth = grid[f.depth_axis].coords().astype(np.float32)
    if f.depth_axis == 0:
        return depth[:, None, None] >= top[None, :, :]
    return depth[None, :, None] >= top[:, None, :]


def _solve_fields(p: SpecimenParams, rng: np.random.Generator, parts: _Particles, cracks: _Cracks) -> _Fields:
    """Pick the radius scale and CBD threshold on a strided sample so the targets are met."""
    target = p.targets
    shape = p.shape
    depth_axis, floor_at = _collector_floor(p)
    lat = [ax for ax in range(3) if ax != depth_axis]
    rough = rng.standard_normal(tuple(shape[ax] // _COARSE + 3 for ax in lat)).astype(np.float32)
    rough = ndimage.gaussian_filter(rough, 1e-6 / (p.voxel_size_m * _COARSE), mode="reflect")
    rough *= p.collector_roughness_m / p.voxel_size_m / max(float(rough.std()), 1e-6)
    interface = (rough + (floor_at if floor_at is not None else 0.0)).astype(np.float32)
    fields = _Fields(1.0, 0.0, np.zeros((2, 2, 2), np.float32), 0, interface, depth_axis, floor_at)

    # Stride: odd (so it beats against _COARSE and samples every interpolation phase), ~<= 16M samples.
    stride = 1
    while math.prod(shape) / stride**3 > 16e6:
        stride += 2
    grid = tuple(_Axis(0, stride, (n - 1) // stride + 1) for n in shape)
    assert len(grid) == 3
    g2, label = _particle_field(grid, parts, _SCALE_MAX)
    electrode = ~_collector_mask(fields, grid)
    n_el = max(1, int(np.count_nonzero(electrode)))
    g2e = g2[electrode]
    sel, gflat = _crack_hits(cracks, grid, shape)
    own = (label.ravel()[gflat] == cracks.pid[sel]) & electrode.ravel()[gflat]
    sel, gflat = sel[own], gflat[own]
    cg2 = g2.ravel()[gflat]
    climit = np.where(cracks.kind[sel] == 2, _CLOSED_LIMIT**2, 1.0).astype(np.float32)
    ccbd = cracks.kind[sel] == 1

    def crack_voxels(s2: float) -> tuple[int, int]:
        hit = cg2 < climit * s2
        return len(np.unique(gflat[hit])), len(np.unique(gflat[hit & ccbd]))

    def nmc(s: float) -> float:
        return (np.count_nonzero(g2e < s * s) - crack_voxels(s * s)[0]) / n_el

    lo, hi = 0.3, _SCALE_MAX
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if nmc(mid) < target.nmc else (lo, mid)
    scale = 0.5 * (lo + hi)
    if scale > _SCALE_MAX * 0.99:
        log.warning("NMC target %.3f not reachable; packing too loose", target.nmc)
    s2 = scale * scale
    cbd_in_cracks = crack_voxels(s2)[1]

    # CBD score on a coarse grid with a margin so the blur sees particles beyond the volume.
    sig_neck = p.cbd_neck_sigma_m / (p.voxel_size_m * _COARSE)
    sig_noise = p.cbd_noise_length_m / (p.voxel_size_m * _COARSE)
    margin = math.ceil(3 * max(sig_neck, sig_noise)) + 1
    cgrid = tuple(_Axis(-margin * _COARSE, _COARSE, (n - 1) // _COARSE + 2 + 2 * margin) for n in shape)
    assert len(cgrid) == 3
    cg, _ = _particle_field(cgrid, parts, scale)
    solid = (cg < s2).astype(np.float32)
    solid[_collector_mask(fields, cgrid)] = 1.0  # binder also wets the collector
    score = ndimage.gaussian_filter(solid, sig_neck, mode="nearest")
    del cg, solid
    noise = ndimage.gaussian_filter(rng.standard_normal(score.shape, dtype=np.float32), sig_noise)
    noise *= p.cbd_noise_weight / max(float(noise.std()), 1e-6)
    score += noise
    del noise

    free = electrode & (g2 >= s2)
    fscore = _interp3(score, grid, margin)[free]
    need = round(target.cbd * n_el) - cbd_in_cracks
    if 0 < need < len(fscore):
        threshold = float(np.partition(fscore, len(fscore) - need)[len(fscore) - need])
        threshold = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    else:
        threshold = math.inf if need <= 0 else -math.inf
    return dataclasses.replace(fields, scale=scale, cbd_threshold=threshold, score=score, score_margin=margin)


def _render_slabs(
    p: SpecimenParams, parts: _Particles, cracks: _Cracks, f: _Fields, slab: int = 8
) -> Iterator[npt.NDArray[np.uint8]]:
    """Full-resolution materials, slab by slab along axis 0 (bounds the temporaries)."""
    n0, n1, n2 = p.shape
    s2 = np.float32(f.scale**2)
    lim2 = np.array([s2, s2, s2 * _CLOSED_LIMIT**2], dtype=np.float32)
    for z0 in range(0, n0, slab):
        grid = (_Axis(z0, 1, min(slab, n0 - z0)), _Axis(0, 1, n1), _Axis(0, 1, n2))
        g2, label = _particle_field(grid, parts, f.scale)
        part = g2 < s2
        mat = part.view(np.uint8) + np.uint8(Material.PORE)  # PORE=1, NMC=2
        score = _interp3(f.score, grid, f.score_margin)
        cbd = score > f.cbd_threshold
        del score
        cbd &= ~part
        np.copyto(mat, np.uint8(Material.CBD), where=cbd)
        del cbd, part
        sel, gflat = _crack_hits(cracks, grid, p.shape)
        ok = (label.ravel()[gflat] == cracks.pid[sel]) & (g2.ravel()[gflat] < lim2[cracks.kind[sel]])
        mat.ravel()[gflat[ok]] = _KIND_CODE[cracks.kind[sel[ok]]]
        del g2, label
        np.copyto(mat, np.uint8(Material.AL), where=_collector_mask(f, grid))
        yield mat


# ----------------------------------------------------------------------------------------------------
# Build + cache


def build_specimen(
    params: SpecimenParams,
    cache_dir: Path | None = None,
    progress: Callable[[float], None] | None = None,
) -> Specimen:
    """Build (or load from `cache_dir`) the specimen for `params`; same params -> identical array.

    With `cache_dir` None nothing touches the disk. A cached volume is checked (shape, dtype, size,
    CRC32 against its sidecar JSON) and rebuilt when anything is off.
    """
    report = progress or (lambda _f: None)
    if cache_dir is not None:
        cached = _load_cached(params, cache_dir)
        if cached is not None:
            report(1.0)
            return cached
    ss = np.random.SeedSequence([params.seed, 0x6B696E74])
    rng_pack, rng_crack, rng_field = (np.random.default_rng(s) for s in ss.spawn(3))
    parts = _pack_particles(params, rng_pack, params.targets.nmc)
    report(0.05)
    cracks = _make_cracks(params, rng_crack, parts)
    report(0.1)
    fields = _solve_fields(params, rng_field, parts, cracks)
    report(0.2)
    centres, radii = _visible_particles(params, parts, fields.scale)
    n0 = params.shape[0]
    counts = np.zeros(len(Material), dtype=np.int64)

    def slabs() -> Iterator[npt.NDArray[np.uint8]]:
        done = 0
        for mat in _render_slabs(params, parts, cracks, fields):
            counts[:] += np.bincount(mat.ravel(), minlength=len(Material))[: len(Material)]
            done += mat.shape[0]
            report(min(0.99, 0.2 + 0.8 * done / n0))
            yield mat

    if cache_dir is None:
        materials = np.empty(params.shape, dtype=np.uint8)
        z = 0
        for mat in slabs():
            materials[z : z + mat.shape[0]] = mat
            z += mat.shape[0]
        report(1.0)
        return Specimen(params, materials, _count_dict(counts), centres, radii)

    cache_dir.mkdir(parents=True, exist_ok=True)
    npy, meta = _cache_paths(params, cache_dir)
    crc = 0

    def write(fh: IO[bytes]) -> None:
        nonlocal crc
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(fh, {**header, "shape": params.shape})
        for mat in slabs():
            crc = zlib.crc32(mat.data, crc)
            fh.write(mat.data)

    write_atomic(npy, write)
    meta_doc: dict[str, Any] = {
        "key": params.cache_key(),
        "params": dataclasses.asdict(params),
        "shape": list(params.shape),
        "crc32": crc,
        "counts": _count_dict(counts),
        "scale": fields.scale,
        "particle_centres_vox": np.round(centres, 3).tolist(),
        "particle_radii_vox": np.round(radii, 3).tolist(),
    }
    write_json_atomic(meta, meta_doc)
    loaded = _load_cached(params, cache_dir, verify_crc=False)  # just written: skip re-reading 400 MB
    if loaded is None:
        raise OSError(f"specimen cache {npy} unreadable right after writing it")
    report(1.0)
    return loaded


def _visible_particles(p: SpecimenParams, parts: _Particles, scale: float) -> tuple[F64, F64]:
    radii = parts.radii * scale
    hi = np.array(p.shape, dtype=np.float64) - 1
    vis = np.all((parts.centres + radii[:, None] >= 0) & (parts.centres - radii[:, None] <= hi), axis=1)
    return parts.centres[vis].copy(), radii[vis].copy()


def _count_dict(counts: I64) -> dict[str, int]:
    return {m.name: int(counts[m.value]) for m in Material}


def _cache_paths(p: SpecimenParams, cache_dir: Path) -> tuple[Path, Path]:
    stem = f"specimen-{p.cache_key()}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def _load_cached(p: SpecimenParams, cache_dir: Path, verify_crc: bool = True) -> Specimen | None:
    npy, meta = _cache_paths(p, cache_dir)
    if not (npy.exists() and meta.exists()):
        return None
    try:
        doc = json.loads(meta.read_text())
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        ok = (
            doc.get("key") == p.cache_key()
            and arr.dtype == np.uint8
            and arr.shape == p.shape
            and arr.flags.c_contiguous
            and npy.stat().st_size == arr.offset + arr.nbytes
            and (not verify_crc or zlib.crc32(arr) == doc["crc32"])
        )
        if ok:
            counts = {str(k): int(v) for k, v in doc["counts"].items()}
            centres = np.asarray(doc["particle_centres_vox"], dtype=np.float64).reshape(-1, 3)
            radii = np.asarray(doc["particle_radii_vox"], dtype=np.float64)
            return Specimen(p, arr, counts, centres, radii)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as exc:
        log.warning("specimen cache %s unreadable (%s); rebuilding", npy, exc)
        return None
    log.warning("specimen cache %s failed its checks; rebuilding", npy)
    return None
