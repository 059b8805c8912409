"""Per-detector signal formation on an already sampled face (pure array functions).

`simulator.imaging` samples the face with the image grid and calls these; `simulator.edx` reuses the
sampling grid. Signals are float32 in detector units: CBS in backscatter yield eta, the SE/ion detectors
in an effective yield of the same order (DOMAIN.md "Image formation per detector").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from kintsugi_daemon.instrument import SEM_FIB_ANGLE_DEG, SIN_SEM_FIB
from simulator.materials import BACKSCATTER_YIELD, ELECTRON_RANGE_5KV_M, Material

__all__ = [
    "BEAM_TILT_FROM_NORMAL_DEG",
    "DETECTOR_EFFICIENCY",
    "PORE_BACK_LAMBDA_M",
    "PORE_BACK_MAX_DEPTH_M",
    "SIN_52",
    "SampleGrid",
    "beam_steps",
    "blur",
    "charging_field",
    "edge_map",
    "grain_field",
    "pore_back",
    "sample_grid",
]

Geometry = Literal["cross_section", "planar"]

# The SEM column is 52 deg from the ion column; in cross-section geometry the electron beam meets the
# (vertical) face 38 deg from its normal, so images are foreshortened along y by sin(52 deg).
SIN_52 = SIN_SEM_FIB
BEAM_TILT_FROM_NORMAL_DEG = 90.0 - SEM_FIB_ANGLE_DEG

# Through an unfilled pore the beam travels in vacuum and lands on the pore's back wall, which emits nearly
# like an exposed surface: the loss with depth is collection (the pore walls shadow the detector), not
# absorption, so it is slow. lambda 2.5 um leaves ~70% at 1 um and ~45% at 2 um (choice; the published
# pore IoU 0.45 without filling vs 0.83 with Pt needs back walls that read as solid).
PORE_BACK_LAMBDA_M = 2.5e-6
PORE_BACK_MAX_DEPTH_M = 5.0e-6  # march limit along the beam; beyond it (or out of the volume) reads black

# Detected fraction of the emitted electrons (DQE times collection). CBS 0.13 gives SNR ~50 on NMC and
# ~30 on CBD at 5 kV, 5 nA, 3 us (DOMAIN.md); TLD collects SEs in-lens and is cleaner than the ETD.
DETECTOR_EFFICIENCY: dict[str, float] = {"cbs": 0.13, "tld": 0.16, "etd": 0.055, "ice": 0.05}

N_CODES = 8  # lookup tables are indexed by material code; room for codes added later

# Unfilled voids: the beam passes into them (pore-back); everything else stops it.
_VOID_CODES = (Material.VACUUM, Material.PORE, Material.CRACK)


def _lut(values: dict[Material, float], default: float = 0.0) -> np.ndarray:
    lut = np.full(N_CODES, default, dtype=np.float32)
    for code, value in values.items():
        lut[int(code)] = value
    return lut


VOID_LUT = np.zeros(N_CODES, dtype=bool)
VOID_LUT[[int(c) for c in _VOID_CODES]] = True
SOLID_LUT = ~VOID_LUT

ETA_LUT = _lut({m: v for m, v in BACKSCATTER_YIELD.items() if isinstance(m, Material)})

# Effective SE yield at 5 kV incl. the SE2 share from backscatter: weak material contrast (est.).
SE_YIELD_LUT = _lut({Material.NMC: 0.32, Material.CBD: 0.24, Material.CBD_CRACK: 0.24, Material.AL: 0.29})
SE_YIELD_PT = 0.34
# How strongly a boundary between two codes lights up in SE: a wall to vacuum is the strongest edge,
# NMC-CBD moderate, NMC-Pt weak (the Pt-C fill has no free surface).
EDGE_WEIGHT_LUT = _lut({Material.NMC: 1.0, Material.CBD: 0.75, Material.CBD_CRACK: 0.75, Material.AL: 0.9})
EDGE_WEIGHT_PT = 0.92
# Ion-induced SE yield (ICE): metals bright, oxide medium (modulated by grain channelling), carbon dim.
ION_YIELD_LUT = _lut({Material.NMC: 0.30, Material.CBD: 0.14, Material.CBD_CRACK: 0.14, Material.AL: 0.5})
ION_YIELD_PT = 0.45
# Electrical conductivity (0 insulating .. 1 metallic) for charging; Pt and CBD bleed charge away.
CONDUCTIVITY_LUT = _lut(
    {Material.NMC: 0.35, Material.CBD: 1.0, Material.CBD_CRACK: 1.0, Material.AL: 1.0}, default=0.5
)

RANGE_5KV_LUT = _lut({m: v for m, v in ELECTRON_RANGE_5KV_M.items() if isinstance(m, Material)})
RANGE_5KV_PT_M = ELECTRON_RANGE_5KV_M["pt"]

PROBE_SIGMA_M = 20e-9  # probe FWHM ~47 nm: ~1 px at 40 nm pixels (DOMAIN.md)
CONVERGENCE_SEMI_ANGLE_RAD = 4e-3  # defocus blur radius = alpha * |defocus| (choice, ~WD 4 mm at 5 nA)
SUBSURFACE_FRACTION = 0.35  # share of BSE that emerge spread over ~0.3 R around the impact point


@dataclass(frozen=True)
class SampleGrid:
    """Nearest-voxel indices of an image grid into a face of shape (rows, cols)."""

    rows: np.ndarray  # intp (height,), clipped into range
    cols: np.ndarray  # intp (width,)
    row_ok: np.ndarray  # bool (height,): False where the pixel lies outside the volume
    col_ok: np.ndarray  # bool (width,)
    y_m: np.ndarray  # float64 (height,) specimen y of each image row

    @property
    def all_inside(self) -> bool:
        return bool(self.row_ok.all() and self.col_ok.all())

    def take(self, plane: np.ndarray, fill: int | float | bool) -> np.ndarray:
        """Sample a (rows, cols) plane with the grid; outside pixels get `fill`."""
        out = plane.take(self.rows, axis=0).take(self.cols, axis=1)
        if not self.all_inside:
            out[~self.row_ok, :] = fill
            out[:, ~self.col_ok] = fill
        return out


def sample_grid(
    shape: tuple[int, int],
    voxel_size_m: float,
    geometry: Geometry,
    origin_m: tuple[float, float],
    pixel_size_m: float,
    height_px: int,
    width_px: int,
) -> SampleGrid:
    """Image pixel (r, c) samples x = ox + c*pixel, y = oy + r*pixel/sin52 (cross-section) or
    y = oy + r*pixel (planar); the voxel with index i spans [i*voxel, (i+1)*voxel)."""
    y_step = pixel_size_m / SIN_52 if geometry == "cross_section" else pixel_size_m
    y_m = origin_m[1] + np.arange(height_px, dtype=np.float64) * y_step
    x_m = origin_m[0] + np.arange(width_px, dtype=np.float64) * pixel_size_m
    # the small epsilon keeps exact voxel multiples from flipping down through rounding error
    rows = np.floor(y_m / voxel_size_m + 1e-9).astype(np.intp)
    cols = np.floor(x_m / voxel_size_m + 1e-9).astype(np.intp)
    row_ok = (rows >= 0) & (rows < shape[0])
    col_ok = (cols >= 0) & (cols < shape[1])
    return SampleGrid(
        rows=np.clip(rows, 0, shape[0] - 1),
        cols=np.clip(cols, 0, shape[1] - 1),
        row_ok=row_ok,
        col_ok=col_ok,
        y_m=y_m,
    )


def beam_steps(geometry: Geometry, n_steps: int) -> list[tuple[int, int]]:
    """Voxel offsets (d_axis0, d_axis1) of 1-voxel steps along the electron beam into the specimen.

    Cross-section: the beam is 38 deg from the face normal and tilted downwards, so it advances along
    +axis0 (into unmilled material) and +axis1 (deeper rows). Planar: straight along +axis0."""
    if geometry == "planar":
        return [(k, 0) for k in range(1, n_steps + 1)]
    tilt = math.radians(BEAM_TILT_FROM_NORMAL_DEG)
    c0, c1 = math.cos(tilt), math.sin(tilt)
    return [(round(k * c0), round(k * c1)) for k in range(1, n_steps + 1)]


@dataclass(frozen=True)
class PoreBack:
    """First solid voxel seen through each unfilled-void pixel (flat image indices)."""

    pixels: np.ndarray  # intp flat image indices that hit something within the max depth
    distance_m: np.ndarray  # float32 distance along the beam
    codes: np.ndarray  # uint8 material code of the hit voxel
    is_pt: np.ndarray  # bool: the hit voxel is Pt-filled


def pore_back(
    materials: np.ndarray,
    pt: np.ndarray,
    grid: SampleGrid,
    void_pixels: np.ndarray,
    voxel_size_m: float,
    geometry: Geometry,
    max_depth_m: float = PORE_BACK_MAX_DEPTH_M,
) -> PoreBack:
    """March along the beam from each void pixel of the face to the first solid or Pt voxel.

    Works on flat indices: a step along the beam is a constant offset in the C-ordered volume, so each
    step is one gather over the still-unresolved pixels; resolved and escaped ones drop out."""
    depth, n_rows, n_cols = materials.shape
    width = grid.cols.shape[0]
    flat_m = materials.reshape(-1)
    flat_pt = pt.reshape(-1)
    pix = void_pixels.astype(np.intp, copy=False)
    y = grid.rows[pix // width]
    base = y * n_cols + grid.cols[pix % width]
    hit_pix: list[np.ndarray] = []
    hit_dist: list[np.ndarray] = []
    hit_code: list[np.ndarray] = []
    hit_pt: list[np.ndarray] = []
    n_steps = max(0, math.ceil(max_depth_m / voxel_size_m))
    plane = n_rows * n_cols
    for k, (d0, d1) in enumerate(beam_steps(geometry, n_steps), start=1):
        if pix.size == 0 or d0 >= depth:
            break
        inside = y < n_rows - d1
        if not inside.all():  # the beam leaves the volume through the bottom: reads black
            pix, y, base = pix[inside], y[inside], base[inside]
        idx = base + (d0 * plane + d1 * n_cols)
        codes = flat_m.take(idx)
        is_pt = flat_pt.take(idx)
        hit = SOLID_LUT.take(codes) | is_pt
        if hit.any():
            hit_pix.append(pix[hit])
            hit_dist.append(np.full(int(hit.sum()), k * voxel_size_m, dtype=np.float32))
            hit_code.append(codes[hit])
            hit_pt.append(is_pt[hit])
            keep = ~hit
            pix, y, base = pix[keep], y[keep], base[keep]
    if not hit_pix:
        empty = np.zeros(0, dtype=np.intp)
        return PoreBack(empty, np.zeros(0, np.float32), np.zeros(0, np.uint8), np.zeros(0, bool))
    return PoreBack(
        pixels=np.concatenate(hit_pix),
        distance_m=np.concatenate(hit_dist),
        codes=np.concatenate(hit_code),
        is_pt=np.concatenate(hit_pt),
    )


def pore_back_image(
    pb: PoreBack,
    shape: tuple[int, int],
    yield_lut: np.ndarray,
    pt_yield: float,
    attenuation_m: float,
    pixel_size_m: float,
) -> np.ndarray:
    """Signal seen through unfilled voids: yield(hit) * exp(-d/lambda), blurred more the deeper the hit
    (blend of the sharp value and a ~0.5 um box blur weighted by d / 1 um; the box also takes in the
    dark surroundings, a mild extra darkening of deep back walls), kept inside the void."""
    out = np.zeros(shape, dtype=np.float32)
    if pb.pixels.size == 0:
        return out
    value = np.where(pb.is_pt, np.float32(pt_yield), yield_lut.take(pb.codes))
    value = value * np.exp(-pb.distance_m / np.float32(attenuation_m))
    flat = out.reshape(-1)
    flat[pb.pixels] = value
    size = max(3, round(0.5e-6 / pixel_size_m) | 1)
    wide = ndi.uniform_filter(out, size=size, mode="nearest").reshape(-1)
    t = np.minimum(pb.distance_m / np.float32(1e-6), np.float32(1.0))
    flat[pb.pixels] = (1 - t) * value + t * wide[pb.pixels]
    return out


def blur(
    image: np.ndarray,
    sigma_rc_px: tuple[float, float],
    halo_size_px: tuple[int, int] = (1, 1),
    halo_fraction: float = 0.0,
) -> np.ndarray:
    """Anisotropic Gaussian (probe, defocus, astigmatism) plus an optional box halo (sub-surface BSE)."""
    out = image
    for axis, sigma in enumerate(sigma_rc_px):
        if sigma >= 0.2:  # narrower kernels are a no-op at pixel sampling
            out = ndi.gaussian_filter1d(out, sigma, axis=axis, truncate=3.0, mode="nearest")
    if halo_fraction > 0 and max(halo_size_px) > 1:
        halo = ndi.uniform_filter(out, size=halo_size_px, mode="nearest")
        out = (1 - halo_fraction) * out + halo_fraction * halo
    return out


def edge_map(edge_weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """SE edge brightening: gradient magnitude of the smoothed edge-weight map, on the solid side.

    Central differences; weighting by the pixel's own (unsmoothed) weight puts the bright rim on the
    wall, while the void side stays dark."""
    s: np.ndarray = ndi.gaussian_filter(edge_weight, max(sigma_px, 0.5), truncate=3.0, mode="nearest")
    gx = np.zeros_like(s)
    gy = np.zeros_like(s)
    np.subtract(s[:, 2:], s[:, :-2], out=gx[:, 1:-1])
    np.subtract(s[2:, :], s[:-2, :], out=gy[1:-1, :])
    gx *= gx
    gy *= gy
    gx += gy
    np.sqrt(gx, out=gx)
    gx *= np.float32(0.5) * (np.float32(0.15) + edge_weight)
    return gx


def _hash01(i: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic pseudo-random float32 in [0, 1) per integer pair."""
    h = (i * 73856093) ^ (j * 19349663) ^ (salt * 83492791)
    h = ((h ^ (h >> 13)) * 1274126177) & 0x7FFFFFFF
    out: np.ndarray = ((h >> 8) & 0xFFFF).astype(np.float32) * np.float32(1.0 / 65536.0)
    return out


def grain_field(
    rows: np.ndarray, cols: np.ndarray, voxel_size_m: float, grain_m: float = 0.5e-6
) -> np.ndarray:
    """Deterministic channelling contrast in [0.55, 1.45] per primary grain: a Voronoi tessellation with
    one jittered seed per grain-sized cell, hashed from specimen coordinates so grains stay put between
    frames and slices. Only the ICE image pays for it."""
    g = max(1.0, grain_m / voxel_size_m)
    y = (rows.astype(np.float32) / np.float32(g))[:, None]
    x = (cols.astype(np.float32) / np.float32(g))[None, :]
    iy, ix = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    best = np.full((rows.size, cols.size), np.inf, dtype=np.float32)
    value = np.zeros((rows.size, cols.size), dtype=np.float32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            ci, cj = iy + di, ix + dj
            sy = ci.astype(np.float32) + _hash01(ci, cj, 1)
            sx = cj.astype(np.float32) + _hash01(ci, cj, 2)
            d = (y - sy) ** 2 + (x - sx) ** 2
            closer = d < best
            best = np.where(closer, d, best)
            value = np.where(closer, _hash01(ci, cj, 3), value)
    return np.float32(0.55) + np.float32(0.9) * value


def charging_field(conductivity: np.ndarray, strength: float) -> np.ndarray:
    """Low-frequency charging: insulating area fraction smoothed over ~1/8 of the field, times a ramp
    along the scan (charge builds up as the line is scanned). Computed on a coarse grid and upsampled."""
    h, w = conductivity.shape
    f = max(1, min(h, w) // 16)
    hh, ww = h // f * f, w // f * f
    insul = 1.0 - conductivity[:hh, :ww].reshape(hh // f, f, ww // f, f).mean(axis=(1, 3))
    insul = ndi.gaussian_filter(insul.astype(np.float32), 2.0, mode="nearest")
    ramp = np.linspace(0.4, 1.0, insul.shape[1], dtype=np.float32)[None, :]
    coarse = (strength * insul * ramp).astype(np.float32)
    zoom = (h / coarse.shape[0], w / coarse.shape[1])
    out: np.ndarray = ndi.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
    return out[:h, :w]
