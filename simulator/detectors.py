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
from simulator.pore_back import tilt_law

__all__ = [
    "DETECTOR_EFFICIENCY",
    "FACE_COS",
    "SIN_52",
    "SampleGrid",
    "blur",
    "charging_field",
    "edge_map",
    "eta_face_lut",
    "sample_grid",
]

Geometry = Literal["cross_section", "planar"]

# The SEM column is 52 deg from the ion column; in cross-section geometry the electron beam meets the
# (vertical) face 38 deg from its normal, so images are foreshortened along y by sin(52 deg).
SIN_52 = SIN_SEM_FIB
FACE_COS = {"cross_section": math.cos(math.radians(90.0 - SEM_FIB_ANGLE_DEG)), "planar": 1.0}

# Detected fraction of the emitted electrons (DQE times collection). CBS 0.10 with the face's yields at
# 38 deg incidence gives SNR ~50 on NMC and ~30 on CBD at 5 kV, 5 nA, 3 us (DOMAIN.md); TLD collects SEs
# in-lens and is cleaner than the ETD.
DETECTOR_EFFICIENCY: dict[str, float] = {"cbs": 0.10, "tld": 0.16, "etd": 0.055, "ice": 0.05}

N_CODES = 8  # lookup tables are indexed by material code; room for codes added later

# Unfilled voids of the specimen: the beam passes into them (pore-back); solids and Pt stop it. Vacuum
# outside the specimen is neither: nothing behind it is in the volume.
_VOID_CODES = (Material.PORE, Material.CRACK)


def _lut(values: dict[Material, float], default: float = 0.0) -> np.ndarray:
    lut = np.full(N_CODES, default, dtype=np.float32)
    for code, value in values.items():
        lut[int(code)] = value
    return lut


VOID_LUT = np.zeros(N_CODES, dtype=bool)
VOID_LUT[[int(c) for c in _VOID_CODES]] = True
SOLID_LUT = ~VOID_LUT
SOLID_LUT[int(Material.VACUUM)] = False

# Normal-incidence backscatter yields (DOMAIN.md); the face and back walls apply the tilt law to them.
ETA0_LUT = _lut({m: v for m, v in BACKSCATTER_YIELD.items() if isinstance(m, Material)})


def eta_face_lut(geometry: str) -> np.ndarray:
    """Backscatter yield of each code on the exposed face (38 deg incidence in cross-section)."""
    return np.where(ETA0_LUT > 0, tilt_law(ETA0_LUT, FACE_COS[geometry]), 0.0).astype(np.float32)


# Effective SE yield at 5 kV incl. the SE2 share from backscatter: weak material contrast (est.).
# Defined at the cross-section face's 38 deg incidence; back walls scale them by the secant law.
SE_YIELD_LUT = _lut(
    {
        Material.NMC: 0.32,
        Material.CBD: 0.24,
        Material.CBD_CRACK: 0.24,
        Material.AL: 0.29,
        Material.PT_CAP: 0.34,
    }
)
SE_YIELD_PT = 0.34
# How strongly a boundary between two codes lights up in SE: a wall to vacuum is the strongest edge,
# NMC-CBD moderate, NMC-Pt weak (the Pt-C fill has no free surface).
EDGE_WEIGHT_LUT = _lut(
    {Material.NMC: 1.0, Material.CBD: 0.75, Material.CBD_CRACK: 0.75, Material.AL: 0.9, Material.PT_CAP: 0.92}
)
EDGE_WEIGHT_PT = 0.92
# Ion-induced SE yield (ICE): metals bright, oxide medium (modulated by grain channelling), carbon dim.
ION_YIELD_LUT = _lut(
    {
        Material.NMC: 0.30,
        Material.CBD: 0.14,
        Material.CBD_CRACK: 0.14,
        Material.AL: 0.5,
        Material.PT_CAP: 0.45,
    }
)
ION_YIELD_PT = 0.45
# Electrical conductivity (0 insulating .. 1 metallic) for charging; Pt and CBD bleed charge away.
CONDUCTIVITY_LUT = _lut(
    {Material.NMC: 0.35, Material.CBD: 1.0, Material.CBD_CRACK: 1.0, Material.AL: 1.0, Material.PT_CAP: 1.0},
    default=0.5,
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
    x_m: np.ndarray  # float64 (width,) specimen x of each image column

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
        x_m=x_m,
    )


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
