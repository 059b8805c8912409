"""SEM image formation of the simulated Helios Hydra: CBS, TLD, ETD and ICE images of the milled face.

The face is sampled with the image grid (nearest voxel, foreshortened by sin 52 deg in cross-section),
then per detector: a yield lookup (backscatter by the tilt law at the face's 38 deg incidence), material
textures (`simulator.textures`), pore-back through unfilled voids (`simulator.pore_back`), blur (probe,
defocus, astigmatism, sub-surface), SE edge brightening and charging, curtaining, shot noise and the
16-bit grey transfer. Above the specimen's top surface a cross-section shows the protective Pt cap (its
thickness from the deposits so far) and vacuum above that; both are labelled 255 (outside), as is any
pixel past the volume's edge. The field of view starts CAP_VIEW_M above the top surface so the cap is in
view, as on the instrument. Numbers and their sources: DOMAIN.md "Image formation per detector".

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
from simulator import pore_back as pb
from simulator.curtaining import curtain_map
from simulator.edx import render_edx
from simulator.materials import BACKSCATTER_YIELD, Material, canonical_labels
from simulator.textures import PlaneTexture

__all__ = [
    "CAP_VIEW_M",
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
CAP_VIEW_M = 0.5e-6  # the field of view starts this far above the top surface (cross-section)
# Texture contrasts per detector: (NMC grain orientation +-, CBD nanopore darkening, Pt texture exponent).
TEXTURE_CONTRAST: dict[str, tuple[float, float, float]] = {
    "cbs": (0.07, 0.45, 1.0),
    "tld": (0.02, 0.25, 0.5),
    "etd": (0.02, 0.25, 0.5),
    "ice": (0.45, 0.3, 0.5),
}
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
    z_m: float = 0.0  # depth of the face along the mill axis (textures are fixed in the specimen)
    cap_m: float = 0.0  # protective Pt cap on the top surface, shown above row 0 in cross-section
    texture_seed: int = 0

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
        if face.geometry == "cross_section" and face.cap_m > 0:
            cap_rows = (self.grid.y_m < 0) & (self.grid.y_m >= -face.cap_m)
            self.codes[np.ix_(cap_rows, self.grid.col_ok)] = np.uint8(Material.PT_CAP)
        self.pt = self.grid.take(face.pt[0], False)
        self.void = det.VOID_LUT.take(self.codes) & ~self.pt
        self.eta_lut = det.eta_face_lut(face.geometry)
        self.texture = PlaneTexture(face.z_m, self.grid.y_m, self.grid.x_m, face.texture_seed)
        self._pore_back: pb.PoreBack | None = None
        self._opening: np.ndarray | None = None
        self._edges: np.ndarray | None = None
        self._conductivity: np.ndarray | None = None
        self._textures: (
            tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
        ) = None

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

    def pore_back(self) -> pb.PoreBack:
        if self._pore_back is None:
            void = self.void
            if not self.grid.all_inside:
                void = void & self.grid.row_ok[:, None] & self.grid.col_ok[None, :]
            self._pore_back = pb.march(
                self.face.materials,
                self.face.pt,
                det.SOLID_LUT,
                self.grid.rows,
                self.grid.cols,
                np.flatnonzero(void),
                self.face.voxel_size_m,
                self.face.geometry,
            )
        return self._pore_back

    def opening(self) -> np.ndarray:
        """Opening radius (m) of the pore each hit pixel looks through."""
        if self._opening is None:
            radius = pb.opening_radius(self.void, self.cond.pixel_size_m, self.y_scale)
            self._opening = radius.reshape(-1).take(self.pore_back().pixels)
        return self._opening

    def back_wall(self, kind: str, lut: np.ndarray, pt_value: float, se_lambda_m: float | None) -> np.ndarray:
        """Signal from the back walls of unfilled pores (module `simulator.pore_back`): `kind` "bse"
        applies the tilt law to normal-incidence yields, "se" the secant law to face-geometry yields."""
        hits = self.pore_back()
        if hits.pixels.size == 0:
            return np.zeros(self.shape, np.float32)
        if kind == "bse":
            eta0 = np.where(hits.is_pt, np.float32(pt_value), lut.take(hits.codes))
            value = pb.tilt_law(eta0, hits.cos_incidence)
        else:
            base = np.where(hits.is_pt, np.float32(pt_value), lut.take(hits.codes))
            face_cos = np.float32(det.FACE_COS[self.face.geometry])
            value = base * np.minimum(face_cos / hits.cos_incidence, np.float32(pb.MAX_SE_GAIN))
        value = value * hits.collection(self.opening())
        if se_lambda_m is not None:
            value = value * np.exp(-hits.distance_m / np.float32(se_lambda_m))
        return pb.spot_blur(value.astype(np.float32), hits, self.shape, self.cond.pixel_size_m)

    def textures(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(NMC mask, grain values, CBD mask, nanopore share, Pt mask, Pt factor), shared by detectors."""
        if self._textures is None:
            nmc = self.codes == Material.NMC
            cbd = (self.codes == Material.CBD) | (self.codes == Material.CBD_CRACK)
            pt = self.pt | (self.codes == Material.PT_CAP)
            tex = self.texture
            grains = tex.grains(1) if nmc.any() else np.zeros(self.shape, np.float32)
            pores = tex.cbd_pores() if cbd.any() else np.zeros(self.shape, np.float32)
            ptf = tex.pt() if pt.any() else np.ones(self.shape, np.float32)
            self._textures = (nmc, grains, cbd, pores, pt, ptf)
        return self._textures

    def textured(self, img: np.ndarray, detector: str) -> np.ndarray:
        nmc, grains, cbd, pores, pt, ptf = self.textures()
        grain_c, pore_c, pt_exp = TEXTURE_CONTRAST[detector]
        img[nmc] *= np.float32(1.0) + np.float32(grain_c) * grains[nmc]
        img[cbd] *= np.float32(1.0) - np.float32(pore_c) * pores[cbd]
        img[pt] *= ptf[pt] ** np.float32(pt_exp)
        return img

    def yield_image(self, lut: np.ndarray, pt_value: float) -> np.ndarray:
        img: np.ndarray = lut.take(self.codes)
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
    has_void = bool(scene.void.any())
    if name == "cbs":
        pt_face = float(pb.tilt_law(face.pt_eta, det.FACE_COS[face.geometry]))
        img = scene.textured(scene.yield_image(scene.eta_lut, pt_face), name)
        if has_void:
            img += scene.back_wall("bse", det.ETA0_LUT, face.pt_eta, None)
        out = det.blur(img, scene.sigma_rc, scene.subsurface_halo_px(), det.SUBSURFACE_FRACTION)
        if cond.charging > 0:
            out = out + det.charging_field(scene.conductivity(), BSE_CHARGING_GAIN * cond.charging)
        return out
    if name in ("tld", "etd"):
        img = scene.textured(scene.yield_image(det.SE_YIELD_LUT, det.SE_YIELD_PT), name)
        if has_void:
            img += scene.back_wall("se", det.SE_YIELD_LUT, det.SE_YIELD_PT, SE_PORE_BACK_LAMBDA_M)
        out = det.blur(img, scene.sigma_rc)
        out += np.float32(SE_EDGE_GAIN) * scene.edges()
        if cond.charging > 0:
            out += det.charging_field(scene.conductivity(), SE_CHARGING_GAIN * cond.charging)
        return out
    if name == "ice":
        img = scene.textured(scene.yield_image(det.ION_YIELD_LUT, det.ION_YIELD_PT), name)
        if has_void:
            img += scene.back_wall("se", det.ION_YIELD_LUT, det.ION_YIELD_PT, ION_PORE_BACK_LAMBDA_M)
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
