"""SEM image formation of the simulated Helios Hydra: CBS, TLD, ETD and ICE images of the milled face.

The face is sampled with the image grid (nearest voxel, foreshortened by sin 52 deg in cross-section),
then per detector: a yield lookup, pore-back through unfilled voids, blur (probe, defocus, astigmatism,
sub-surface), SE edge brightening and charging, curtaining, shot noise and the 16-bit grey transfer.
Numbers and their sources: DOMAIN.md "Image formation per detector".

Grey transfer (like the microscope's contrast/brightness knobs, both 0..1):
    s_n  = signal / SIGNAL_REF[detector]          (full scale of a detector ~1)
    grey = clip(65535 * (0.5 + gain(contrast) * (s_n - offset(brightness))), 0, 65535)
    gain(c) = 10 ** (4 * (c - 0.5))               (0.01 .. 100)
    offset(b) = 1.5 - 2 * b                       (signal that lands at mid-grey: 1.5 .. -0.5)
so extreme settings saturate, as on the instrument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from simulator import detectors as det
from simulator.curtaining import curtain_map
from simulator.edx import render_edx
from simulator.materials import BACKSCATTER_YIELD, Material, canonical_labels

__all__ = [
    "SIGNAL_REF",
    "DetectorName",
    "DetectorSetting",
    "FaceView",
    "ImagingConditions",
    "Rendered",
    "auto_contrast_brightness",
    "brightness_offset",
    "contrast_gain",
    "curtain_map",
    "grey_transfer",
    "render",
    "render_edx",
    "signal_to_grey",
]

DetectorName = Literal["cbs", "tld", "etd", "ice"]

# Signal that spans a detector's useful range (its "full scale"), for the grey transfer.
SIGNAL_REF: dict[str, float] = {"cbs": 0.5, "tld": 1.0, "etd": 1.0, "ice": 1.0}

ELECTRONS_PER_PA_US = 6.24  # 1 pA for 1 us = 6.24 electrons
DARK_NOISE = 8e-4  # amplifier noise in yield units: keeps black areas from being noise-free
POISSON_BELOW = 20.0  # detected counts under which the Gaussian approximation of Poisson is poor
SE_EDGE_GAIN = 2.0
SE_PORE_BACK_LAMBDA_M = 1.5e-6  # SEs from a pore's back wall escape the hole less well than BSEs
ION_PORE_BACK_LAMBDA_M = 1.0e-6
SE_CHARGING_GAIN = 0.4
BSE_CHARGING_GAIN = 0.03


MAX_BLUR_SIGMA_PX = 25.0


@dataclass(frozen=True, eq=False)  # holds arrays: identity equality and hash
class FaceView:
    """What the beam can see: the exposed face (plane 0) and the unmilled material behind it."""

    materials: np.ndarray  # uint8 (depth_ahead, rows, cols) Material codes
    pt: np.ndarray  # bool, same shape: voxels filled by Pt
    voxel_size_m: float
    geometry: Literal["cross_section", "planar"]
    pt_source: Literal["electron", "ion"] = "electron"  # Pt-C eta 0.39 vs 0.44

    @property
    def pt_eta(self) -> float:
        return BACKSCATTER_YIELD["pt_ion" if self.pt_source == "ion" else "pt_electron"]


@dataclass(frozen=True)
class DetectorSetting:
    name: DetectorName
    brightness: float  # 0..1 like the microscope UI
    contrast: float  # 0..1


@dataclass(frozen=True)
class ImagingConditions:
    detectors: tuple[DetectorSetting, ...]
    width_px: int
    height_px: int
    pixel_size_m: float
    dwell_s: float
    line_integration: int
    voltage_v: float
    current_a: float
    # field-of-view origin (x along cols, y along rows) in specimen coordinates; the caller adds drift
    # minus beam shift
    origin_m: tuple[float, float] = (0.0, 0.0)
    defocus_m: float = 0.0
    # astigmatic focal difference in metres: > 0 blurs along x (columns), < 0 along y (rows)
    astigmatism: float = 0.0
    charging: float = 0.0  # 0..1 strength of charging on low-conductivity areas (SE detectors mostly)
    # (rows, cols) in face voxel space: multiplicative stripe modulation from curtain_map()
    curtain: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True, eq=False)  # holds arrays: identity equality and hash
class Rendered:
    images: dict[str, np.ndarray]  # uint16 (height_px, width_px) per detector
    labels: np.ndarray  # uint8 canonical classes, pixel-aligned with the images
    signal: dict[str, np.ndarray] | None  # float32 noiseless signal per detector (detector units)


def contrast_gain(contrast: float) -> float:
    return float(10.0 ** (4.0 * (min(max(contrast, 0.0), 1.0) - 0.5)))


def brightness_offset(brightness: float) -> float:
    return 1.5 - 2.0 * min(max(brightness, 0.0), 1.0)


def grey_transfer(detector: str, brightness: float, contrast: float) -> tuple[float, float]:
    """(scale, shift) of the unclipped transfer grey = scale * signal + shift (signal in detector units)."""
    gain = contrast_gain(contrast)
    return (65535.0 * gain / SIGNAL_REF[detector], 65535.0 * (0.5 - gain * brightness_offset(brightness)))


def signal_to_grey(signal: np.ndarray, detector: str, brightness: float, contrast: float) -> np.ndarray:
    """The 16-bit grey transfer of the module docstring (signal in detector units)."""
    scale, shift = grey_transfer(detector, brightness, contrast)
    grey = signal * np.float32(scale)
    grey += np.float32(shift)
    np.clip(grey, 0.0, 65535.0, out=grey)
    grey += np.float32(0.5)  # round half up on the way to integers
    return grey.astype(np.uint16)


class _Scene:
    """Work shared by all detectors of one scan: sampled face, labels, pore-back, edges, blur widths."""

    def __init__(self, face: FaceView, cond: ImagingConditions) -> None:
        self.face = face
        self.cond = cond
        self.shape = (cond.height_px, cond.width_px)
        self.grid = det.sample_grid(
            face.materials.shape[1:],
            face.voxel_size_m,
            face.geometry,
            cond.origin_m,
            cond.pixel_size_m,
            cond.height_px,
            cond.width_px,
        )
        self.codes = self.grid.take(face.materials[0], int(Material.VACUUM))
        self.pt = self.grid.take(face.pt[0], False)
        self.void = det.VOID_LUT.take(self.codes) & ~self.pt
        self._pore_back: det.PoreBack | None = None
        self._edges: np.ndarray | None = None
        self._conductivity: np.ndarray | None = None

        pixel = cond.pixel_size_m
        alpha = det.CONVERGENCE_SEMI_ANGLE_RAD
        focus = alpha * abs(cond.defocus_m)
        astig = alpha * abs(cond.astigmatism)
        var = det.PROBE_SIGMA_M**2 + focus**2
        sig_c = math.sqrt(var + (astig**2 if cond.astigmatism > 0 else 0.0)) / pixel
        sig_r = math.sqrt(var + (astig**2 if cond.astigmatism < 0 else 0.0)) / pixel
        # A grossly defocused frame is mush either way; the cap keeps the filter kernels bounded.
        self.sigma_rc = (min(sig_r, MAX_BLUR_SIGMA_PX), min(sig_c, MAX_BLUR_SIGMA_PX))
        # compression of specimen lengths along y in the image
        self.y_scale = det.SIN_52 if face.geometry == "cross_section" else 1.0

    def labels(self) -> np.ndarray:
        return canonical_labels(self.codes, self.pt)

    def pore_back(self) -> det.PoreBack:
        if self._pore_back is None:
            void = self.void
            if not self.grid.all_inside:
                void = void & self.grid.row_ok[:, None] & self.grid.col_ok[None, :]
            pixels = np.flatnonzero(void)
            self._pore_back = det.pore_back(
                self.face.materials,
                self.face.pt,
                self.grid,
                pixels,
                self.face.voxel_size_m,
                self.face.geometry,
            )
        return self._pore_back

    def yield_image(self, lut: np.ndarray, pt_value: float) -> np.ndarray:
        img = lut.take(self.codes)
        img[self.pt] = pt_value
        return img

    def edges(self) -> np.ndarray:
        if self._edges is None:
            weight = self.yield_image(det.EDGE_WEIGHT_LUT, det.EDGE_WEIGHT_PT)
            sigma = max(1.0, 30e-9 / self.cond.pixel_size_m, *self.sigma_rc)
            self._edges = det.edge_map(weight, sigma)
        return self._edges

    def conductivity(self) -> np.ndarray:
        if self._conductivity is None:
            self._conductivity = self.yield_image(det.CONDUCTIVITY_LUT, 1.0)
        return self._conductivity

    def subsurface_halo_px(self) -> tuple[int, int]:
        """Box size of the sub-surface BSE halo: +-0.3 R of the solid phases in view (range-weighted by
        area), R scaled from 5 kV with (kV/5)^1.67 (Kanaya-Okayama)."""
        counts = np.bincount(self.codes.reshape(-1), minlength=det.N_CODES)[: det.N_CODES].astype(float)
        n_pt = float(np.count_nonzero(self.pt))
        ranges = det.RANGE_5KV_LUT.astype(float)
        solid = counts * (ranges > 0)
        total = solid.sum() + n_pt
        if total <= 0:
            return (1, 1)
        r5 = (float((solid * ranges).sum()) + n_pt * det.RANGE_5KV_PT_M) / total
        r = r5 * (self.cond.voltage_v / 5000.0) ** 1.67
        half_c = 0.3 * r / self.cond.pixel_size_m
        half_r = half_c * self.y_scale
        return (2 * round(half_r) + 1, 2 * round(half_c) + 1)


def _detector_signal(scene: _Scene, name: str) -> np.ndarray:
    """Noiseless signal of one detector (before curtaining)."""
    face, cond = scene.face, scene.cond
    pixel = cond.pixel_size_m
    has_void = bool(scene.void.any())
    if name == "cbs":
        img = scene.yield_image(det.ETA_LUT, face.pt_eta)
        if has_void:
            img += det.pore_back_image(
                scene.pore_back(), scene.shape, det.ETA_LUT, face.pt_eta, det.PORE_BACK_LAMBDA_M, pixel
            )
        out = det.blur(img, scene.sigma_rc, scene.subsurface_halo_px(), det.SUBSURFACE_FRACTION)
        if cond.charging > 0:
            out = out + det.charging_field(scene.conductivity(), BSE_CHARGING_GAIN * cond.charging)
        return out
    if name in ("tld", "etd"):
        img = scene.yield_image(det.SE_YIELD_LUT, det.SE_YIELD_PT)
        if has_void:
            img += det.pore_back_image(
                scene.pore_back(),
                scene.shape,
                det.SE_YIELD_LUT,
                det.SE_YIELD_PT,
                SE_PORE_BACK_LAMBDA_M,
                pixel,
            )
        out = det.blur(img, scene.sigma_rc)
        out += np.float32(SE_EDGE_GAIN) * scene.edges()
        if cond.charging > 0:
            out += det.charging_field(scene.conductivity(), SE_CHARGING_GAIN * cond.charging)
        return out
    if name == "ice":
        img = scene.yield_image(det.ION_YIELD_LUT, det.ION_YIELD_PT)
        nmc = scene.codes == Material.NMC
        grains = det.grain_field(scene.grid.rows, scene.grid.cols, face.voxel_size_m)
        img[nmc] *= grains[nmc]
        if has_void:
            img += det.pore_back_image(
                scene.pore_back(),
                scene.shape,
                det.ION_YIELD_LUT,
                det.ION_YIELD_PT,
                ION_PORE_BACK_LAMBDA_M,
                pixel,
            )
        out = det.blur(img, scene.sigma_rc)
        out += np.float32(0.5 * SE_EDGE_GAIN) * scene.edges()
        return out
    raise ValueError(f"unknown detector {name!r}")


def _apply_curtain(scene: _Scene, signal: np.ndarray, curtain_img: np.ndarray | None) -> np.ndarray:
    if curtain_img is None:
        return signal
    signal *= curtain_img
    return signal


def _curtain_image(scene: _Scene) -> np.ndarray | None:
    curtain = scene.cond.curtain
    if curtain is None:
        return None
    if curtain.shape != scene.face.materials.shape[1:]:
        raise ValueError(f"curtain shape {curtain.shape} != face shape {scene.face.materials.shape[1:]}")
    return scene.grid.take(curtain.astype(np.float32, copy=False), 1.0)


def _add_noise(
    signal: np.ndarray, name: str, cond: ImagingConditions, rng: np.random.Generator
) -> np.ndarray:
    """Shot noise of the detected electrons: k = 6.24 I[pA] dwell[us] LI * efficiency detected counts per
    unit yield, so SNR = sqrt(k * s); Gaussian approximation, exact Poisson where counts are low."""
    k = (
        ELECTRONS_PER_PA_US
        * cond.current_a
        * 1e12
        * cond.dwell_s
        * 1e6
        * max(cond.line_integration, 1)
        * det.DETECTOR_EFFICIENCY[name]
    )
    s = np.maximum(signal, np.float32(0.0))
    z = rng.standard_normal(s.shape, dtype=np.float32)
    if k <= 0:
        dark: np.ndarray = s + np.float32(DARK_NOISE) * z
        return dark
    noisy: np.ndarray = np.sqrt(s * np.float32(1.0 / k) + np.float32(DARK_NOISE**2)) * z
    noisy += s
    low = np.flatnonzero(s < np.float32(POISSON_BELOW / k))
    if low.size:
        flat = noisy.reshape(-1)
        counts = rng.poisson(s.reshape(-1)[low].astype(np.float64) * k)
        flat[low] = (
            counts.astype(np.float32) * np.float32(1.0 / k) + np.float32(DARK_NOISE) * z.reshape(-1)[low]
        )
    return noisy


def render(face: FaceView, cond: ImagingConditions, rng: np.random.Generator) -> Rendered:
    """One scan with all detectors of `cond` (simultaneous, so they share geometry, drift and labels)."""
    scene = _Scene(face, cond)
    curtain_img = _curtain_image(scene)
    images: dict[str, np.ndarray] = {}
    signals: dict[str, np.ndarray] = {}
    for setting in cond.detectors:
        signal = _apply_curtain(scene, _detector_signal(scene, setting.name), curtain_img)
        signals[setting.name] = signal
        noisy = _add_noise(signal, setting.name, cond, rng)
        images[setting.name] = signal_to_grey(noisy, setting.name, setting.brightness, setting.contrast)
    return Rendered(images=images, labels=scene.labels(), signal=signals)


def auto_contrast_brightness(face: FaceView, cond: ImagingConditions, detector: str) -> tuple[float, float]:
    """(brightness, contrast) mapping the noiseless signal's 0.5-99.5 percentiles to ~5-95 % grey."""
    scene = _Scene(face, cond)
    signal = _apply_curtain(scene, _detector_signal(scene, detector), _curtain_image(scene))
    sample = signal[::2, ::2] / np.float32(SIGNAL_REF[detector])
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    spread = max(hi - lo, 1e-6)
    contrast = 0.5 + math.log10(0.9 / spread) / 4.0
    brightness = (1.5 - 0.5 * (lo + hi)) / 2.0
    return (min(max(brightness, 0.0), 1.0), min(max(contrast, 0.0), 1.0))
