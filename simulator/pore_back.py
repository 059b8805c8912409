"""Pore-back ("shine-through"): what the detectors see through an unfilled pore of the milled face.

The beam enters the pore, travels in vacuum and lands on the pore's back wall at distance d along the
beam (52 deg geometry: 38 deg from the face normal in cross-section). The wall emits like any surface
hit at its local incidence angle theta, and only what escapes back out through the pore's opening reaches
the detector (DOMAIN.md "Pore-back"):
- backscatter rises steeply with tilt: eta(theta) = (1 + cos theta) ** log2(eta0), eta0 the normal-
  incidence yield (Arnal, Verdier & Vincensini 1969; Reimer, "Scanning Electron Microscopy", 2nd ed.,
  sec. 4.1.2: eta -> 1 at grazing incidence, eta(0) = eta0);
- secondary electrons rise about as 1/cos theta (the secant law; Reimer sec. 4.2.2), capped at 4x;
- collection is the solid angle of the opening seen from the hit point: for an opening of radius a at
  distance d, Omega / 2pi = 1 - d / sqrt(d**2 + a**2); SEs (a few eV) are lost to the pore walls faster
  still (an extra exp(-d / lambda_SE));
- the deeper the hit, the wider the spot the detector integrates: a blend towards a ~0.5 um box blur.
The wall normal is the negated gradient of the solid indicator 2 voxels either side of the hit voxel
(6 samples per pixel, so the cost scales with the unfilled-pore area, not the frame). The opening radius
at a pixel is the largest in-plane distance to a pore wall within ~1 um (a half-resolution distance
transform and maximum filter). Walls of empty pores therefore often reach CBD grey or brighter near the
pore's rim and fade to dark in the middle of large deep pores: the ambiguity the kintsugi method removes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from kintsugi_daemon.instrument import SEM_FIB_ANGLE_DEG

__all__ = [
    "MAX_SE_GAIN",
    "PORE_BACK_MAX_DEPTH_M",
    "PoreBack",
    "beam_direction",
    "beam_steps",
    "march",
    "tilt_law",
]

Geometry = Literal["cross_section", "planar"]

PORE_BACK_MAX_DEPTH_M = 5.0e-6  # march limit along the beam; beyond it (or out of the volume) reads black
BEAM_TILT_FROM_NORMAL_DEG = (
    90.0 - SEM_FIB_ANGLE_DEG
)  # the beam meets a cross-section face 38 deg off its normal
MAX_SE_GAIN = 4.0
NORMAL_REACH_VOX = 2  # the wall normal from solid occupancy 2 voxels either side of the hit, per axis
MIN_COS = 0.15  # walls more grazing than ~81 deg are treated as 81 deg (the normal estimate is coarse)
OPENING_WINDOW_M = 1.0e-6


def tilt_law(eta0: np.ndarray | float, cos_theta: np.ndarray | float) -> np.ndarray:
    """Backscatter yield at incidence theta from the normal-incidence yield eta0 (eta0 in (0, 1))."""
    eta0_a = np.maximum(np.asarray(eta0, np.float32), np.float32(1e-6))
    out: np.ndarray = (np.float32(1.0) + np.asarray(cos_theta, np.float32)) ** np.log2(eta0_a)
    return out.astype(np.float32)


def beam_direction(geometry: Geometry) -> tuple[float, float, float]:
    """Unit vector of the beam in voxel axes (mill axis, rows, cols), pointing into the specimen."""
    if geometry == "planar":
        return (1.0, 0.0, 0.0)
    tilt = math.radians(BEAM_TILT_FROM_NORMAL_DEG)
    return (math.cos(tilt), math.sin(tilt), 0.0)


def beam_steps(geometry: Geometry, n_steps: int) -> list[tuple[int, int]]:
    """Voxel offsets (d_axis0, d_axis1) of 1-voxel steps along the electron beam into the specimen."""
    b0, b1, _ = beam_direction(geometry)
    return [(round(k * b0), round(k * b1)) for k in range(1, n_steps + 1)]


@dataclass(frozen=True)
class PoreBack:
    """First solid voxel seen through each unfilled-void pixel (flat image indices)."""

    pixels: np.ndarray  # intp flat image indices that hit something within the max depth
    distance_m: np.ndarray  # float32 distance along the beam
    codes: np.ndarray  # uint8 material code of the hit voxel
    is_pt: np.ndarray  # bool: the hit voxel is Pt-filled
    cos_incidence: np.ndarray  # float32 cos of the angle between the beam and the wall normal

    def collection(self, opening_m: np.ndarray) -> np.ndarray:
        """Share of the wall's emission leaving through the opening (radius per hit pixel)."""
        d = self.distance_m
        out: np.ndarray = np.float32(1.0) - d / np.sqrt(d * d + opening_m * opening_m)
        return out.astype(np.float32)


def opening_radius(void: np.ndarray, pixel_m: float, y_scale: float) -> np.ndarray:
    """Per pixel of the frame: the radius (m) of the pore opening it looks through (see module doc)."""
    half = void[::2, ::2]
    dist = ndi.distance_transform_edt(half, sampling=(2 * pixel_m / y_scale, 2 * pixel_m))
    size = max(3, round(OPENING_WINDOW_M / (2 * pixel_m)) | 1)
    wide = ndi.maximum_filter(dist.astype(np.float32), size=size, mode="nearest")
    up = np.repeat(np.repeat(wide, 2, axis=0), 2, axis=1)
    out: np.ndarray = up[: void.shape[0], : void.shape[1]]
    return out


def march(
    materials: np.ndarray,
    pt: np.ndarray,
    solid_lut: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    void_pixels: np.ndarray,
    voxel_size_m: float,
    geometry: Geometry,
    max_depth_m: float = PORE_BACK_MAX_DEPTH_M,
) -> PoreBack:
    """March along the beam from each void pixel of the face to the first solid or Pt voxel.

    Works on flat indices: a step along the beam is a constant offset in the C-ordered volume, so each
    step is one gather over the still-unresolved pixels; resolved and escaped ones drop out.
    `rows`/`cols` are the face voxel indices of the image rows and columns."""
    depth, n_rows, n_cols = materials.shape
    width = cols.shape[0]
    flat_m = materials.reshape(-1)
    flat_pt = pt.reshape(-1)
    pix = void_pixels.astype(np.intp, copy=False)
    y = rows[pix // width]
    base = y * n_cols + cols[pix % width]
    hits: list[tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]] = []
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
        hit = solid_lut.take(codes) | is_pt
        if hit.any():
            hits.append((pix[hit], idx[hit], k, codes[hit], is_pt[hit]))
            keep = ~hit
            pix, y, base = pix[keep], y[keep], base[keep]
    if not hits:
        e = np.zeros(0, np.float32)
        return PoreBack(np.zeros(0, np.intp), e, np.zeros(0, np.uint8), np.zeros(0, bool), e)
    pixels = np.concatenate([h[0] for h in hits])
    voxels = np.concatenate([h[1] for h in hits])
    dist = np.concatenate([np.full(len(h[0]), h[2] * voxel_size_m, np.float32) for h in hits])
    return PoreBack(
        pixels=pixels,
        distance_m=dist,
        codes=np.concatenate([h[3] for h in hits]),
        is_pt=np.concatenate([h[4] for h in hits]),
        cos_incidence=_cos_incidence(flat_m, flat_pt, solid_lut, voxels, materials.shape, geometry),
    )


def _cos_incidence(
    flat_m: np.ndarray,
    flat_pt: np.ndarray,
    solid_lut: np.ndarray,
    voxels: np.ndarray,
    shape: tuple[int, int, int],
    geometry: Geometry,
) -> np.ndarray:
    """cos(theta) between the incoming beam and the outward wall normal at each hit voxel."""
    strides = (shape[1] * shape[2], shape[2], 1)
    coords = np.unravel_index(voxels, shape)
    grad = np.zeros((3, voxels.size), np.float32)
    for axis in range(3):
        c = coords[axis]
        for sign in (1, -1):
            nb = np.clip(c + sign * NORMAL_REACH_VOX, 0, shape[axis] - 1)
            idx = voxels + (nb - c) * strides[axis]
            solid = solid_lut.take(flat_m.take(idx)) | flat_pt.take(idx)
            grad[axis] += np.float32(sign) * solid
    norm = np.sqrt((grad * grad).sum(axis=0))
    b = np.asarray(beam_direction(geometry), np.float32)[:, None]
    # the outward normal is -grad; the beam arrives along +b, so cos theta = (grad . b) / |grad|
    cos = (grad * b).sum(axis=0) / np.maximum(norm, np.float32(1e-6))
    cos[norm == 0] = 1.0
    out: np.ndarray = np.clip(cos, MIN_COS, 1.0).astype(np.float32)
    return out


def spot_blur(values: np.ndarray, pb: PoreBack, shape: tuple[int, int], pixel_size_m: float) -> np.ndarray:
    """Place per-hit values into a frame and widen them with depth (blend of the sharp value and a
    ~0.5 um box blur weighted by d / 1 um; the box also takes in the dark surroundings, kept in the void)."""
    out = np.zeros(shape, dtype=np.float32)
    if pb.pixels.size == 0:
        return out
    flat = out.reshape(-1)
    flat[pb.pixels] = values
    # the wide spot at half resolution (2 x 2 means, box, repeat): a quarter of the work, same look
    h, w = (shape[0] + 1) // 2 * 2, (shape[1] + 1) // 2 * 2
    padded = np.pad(out, ((0, h - shape[0]), (0, w - shape[1])), mode="edge")
    half = padded.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    size = max(3, round(0.25e-6 / pixel_size_m) | 1)
    half = ndi.uniform_filter(half, size=size, mode="nearest")
    wide = np.repeat(np.repeat(half, 2, axis=0), 2, axis=1)[: shape[0], : shape[1]].reshape(-1)
    t = np.minimum(pb.distance_m / np.float32(1e-6), np.float32(1.0))
    flat[pb.pixels] = (1 - t) * values + t * wide[pb.pixels]
    return out
