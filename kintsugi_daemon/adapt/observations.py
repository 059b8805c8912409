"""What one slice measured, computed from its images, the instrument's answers and its segmentation.

The record is what every policy reads (the history is a list of them) and what goes into the slice JSON,
`slices/latest` and `metrics`. Image measures are computed with numpy / scikit-image so that the daemon,
the tests and the benchmark measure the same way:

- fiducial shift and match score: `skimage.registration.phase_cross_correlation` against the fiducial's
  window on the first slice (absolute, so errors do not accumulate slice to slice); the score is the
  Pearson correlation of the registered windows, 1 for a perfect match, ~0 for a lost fiducial.
- sharpness: band-pass (difference of Gaussians, 1.5-4 px) energy over the low-pass energy, so it does not
  move with brightness/contrast and mostly ignores pixel noise.
- saturation: the fraction of pixels at the ends of the detector's range.
- stripe energy: the rms amplitude of stripes running along the mill axis (image columns: the ion beam
  comes from the top), coherent down the columns, as a fraction of the image's grey-level spread.
- Rose ratio: the smallest step between the phases' grey levels (multi-Otsu classes) over k x noise; the
  noise is the robust (MAD) estimate from a Laplacian-like residual. Below 1 a phase boundary is not
  reliably visible (Rose: contrast >= 5 x noise).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from skimage import filters as _filters
from skimage import registration as _registration

from kintsugi_daemon.inference.metrics import SliceMetrics

__all__ = [
    "FiducialMatch",
    "ImageMeasures",
    "Observation",
    "SegmentationObservation",
    "SliceSettings",
    "fiducial_match",
    "image_measures",
    "noise_sigma",
    "rose_ratio",
    "saturation",
    "segmentation_observation",
    "sharpness",
    "stripe_energy",
]

_FULL_SCALE = 65535.0

# scikit-image ships no type hints: typed wrappers keep the untyped calls in one place.


def _gaussian(img: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(_filters.gaussian(img, sigma=sigma, preserve_range=True))  # type: ignore[no-untyped-call]


def _band(img: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.asarray(_filters.difference_of_gaussians(img, low, high))  # type: ignore[no-untyped-call]


def _multiotsu(img: np.ndarray, classes: int) -> np.ndarray:
    return np.asarray(_filters.threshold_multiotsu(img, classes=classes))  # type: ignore[no-untyped-call]


def _hann(shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(_filters.window("hann", shape))  # type: ignore[no-untyped-call]


def _tapered_shift(ref: np.ndarray, cur: np.ndarray, upsample: int) -> tuple[float, float]:
    taper = _hann(ref.shape)
    return _phase_shift((ref - ref.mean()) * taper, (cur - cur.mean()) * taper, upsample)


def _phase_shift(ref: np.ndarray, cur: np.ndarray, upsample: int) -> tuple[float, float]:
    shift, _, _ = _registration.phase_cross_correlation(  # type: ignore[no-untyped-call]
        ref, cur, upsample_factor=upsample, normalization=None
    )
    return float(shift[0]), float(shift[1])


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class SliceSettings(_Record):
    """What the instrument was asked to do for one slice: the values a policy adjusts."""

    mill_thickness_m: float = Field(gt=0)
    mill_current_a: float = Field(gt=0)
    polish_passes: int = Field(ge=0)
    dwell_s: float = Field(gt=0)
    line_integration: int = Field(ge=1)
    beam_shift_offset_x_m: float = 0.0  # drift correction on top of the y-correction
    beam_shift_offset_y_m: float = 0.0
    deposit_pt: bool = False
    auto_focus: bool = False
    auto_stigmation: bool = False
    auto_contrast_brightness: bool = False
    stage_move_x_m: float = 0.0  # relative stage move before this slice's mill
    stage_move_y_m: float = 0.0


class FiducialMatch(_Record):
    shift_x_px: float  # what moves the current fiducial onto the reference (skimage's convention)
    shift_y_px: float
    score: float = Field(ge=-1.0, le=1.0)


class ImageMeasures(_Record):
    """Per detector measures of one acquisition."""

    sharpness: dict[str, float]
    saturation: dict[str, float]
    stripe_energy: dict[str, float]
    snr: dict[str, float]  # mean signal over noise
    rose_ratio: dict[str, float]


class SegmentationObservation(_Record):
    """The segmentation metrics the policies read (arrive a slice or two after the images)."""

    unfilled_pore_share: float | None
    porosity: float
    fraction_collector: float
    outside_fraction: float  # pixels that are no material class (above the surface, past an edge)
    confidence: float | None  # mean max probability


class Observation(_Record):
    slice_index: int = Field(ge=0)
    settings: SliceSettings  # what this slice was done with
    face_position_m: float
    thickness_m: float | None  # measured face advance since the previous slice (None on the first)
    target_thickness_m: float = Field(gt=0)
    working_distance_m: float
    beam_shift_limit_m: float = Field(gt=0)
    pixel_size_m: float = Field(gt=0)
    # Face-plane metres per image row: a cross-section face is foreshortened by sin 52 deg (DOMAIN.md).
    pixel_size_y_m: float = Field(gt=0)
    infiltration_depth_m: float | None = None  # what this slice's deposit reported, if it deposited
    stage_x_m: float | None = None  # where the stage was when the slice was imaged
    stage_y_m: float | None = None
    fiducial: FiducialMatch | None  # None: not imaged (drift correction off)
    images: ImageMeasures
    segmentation: SegmentationObservation | None = None  # attached when the segmentation finishes

    def numeric(self) -> dict[str, float]:
        """Flat numbers for the metrics topic (prefixed `obs_`)."""
        out: dict[str, float] = {"obs_face_position_m": self.face_position_m}
        if self.thickness_m is not None:
            out["obs_thickness_m"] = self.thickness_m
        out["obs_working_distance_m"] = self.working_distance_m
        if self.fiducial is not None:
            out["obs_fiducial_shift_x_px"] = self.fiducial.shift_x_px
            out["obs_fiducial_shift_y_px"] = self.fiducial.shift_y_px
            out["obs_fiducial_score"] = self.fiducial.score
        for name, values in self.images.model_dump().items():
            for det, v in values.items():
                out[f"obs_{name}_{det}"] = float(v)
        return out


# --- image measures ---------------------------------------------------------------------------------


def _as_float(image: np.ndarray) -> np.ndarray:
    if image.ndim != 2 or min(image.shape) < 8:
        raise ValueError(f"expected a 2-D image of at least 8x8 pixels, got shape {image.shape}")
    return np.asarray(image, dtype=np.float64)


def fiducial_match(reference: np.ndarray, current: np.ndarray, upsample: int = 20) -> FiducialMatch:
    """Sub-pixel shift of the fiducial window against the reference window, and how well they match."""
    ref, cur = _as_float(reference), _as_float(current)
    if ref.shape != cur.shape:
        raise ValueError(f"fiducial windows differ in shape: {ref.shape} vs {cur.shape}")
    if float(ref.std()) == 0.0 or float(cur.std()) == 0.0:
        return FiducialMatch(shift_x_px=0.0, shift_y_px=0.0, score=0.0)  # a blank window matches nothing
    # Mean removed and a Hann window: otherwise the windows' own edges (the same in both) dominate the
    # correlation and pull the shift towards 0. The taper itself biases large shifts a little, so a second
    # pass matches the overlap after undoing the first estimate and adds the (small) residual.
    dy, dx = _tapered_shift(ref, cur, upsample)
    h, w = ref.shape
    for _ in range(2):
        my, mx = math.ceil(abs(dy)), math.ceil(abs(dx))
        if 2 * my >= h - 16 or 2 * mx >= w - 16:
            return FiducialMatch(shift_x_px=dx, shift_y_px=dy, score=0.0)  # no overlap left to compare
        registered = ndi.shift(cur, (dy, dx), order=1, mode="nearest")
        a2 = ref[my : h - my, mx : w - mx]
        b2 = registered[my : h - my, mx : w - mx]
        ry, rx = _tapered_shift(a2, b2, upsample)
        if abs(ry) > 2 or abs(rx) > 2:
            break  # the overlap does not agree with the first estimate: keep it, the score will say
        dy, dx = dy + ry, dx + rx
    my, mx = math.ceil(abs(dy)), math.ceil(abs(dx))
    if 2 * my >= h - 16 or 2 * mx >= w - 16:
        return FiducialMatch(shift_x_px=dx, shift_y_px=dy, score=0.0)
    registered = ndi.shift(cur, (dy, dx), order=1, mode="nearest")
    a = ref[my : h - my, mx : w - mx].ravel()
    b = registered[my : h - my, mx : w - mx].ravel()
    sa, sb = float(a.std()), float(b.std())
    score = float(np.dot(a - a.mean(), b - b.mean()) / (a.size * sa * sb)) if sa > 0 and sb > 0 else 0.0
    return FiducialMatch(shift_x_px=dx, shift_y_px=dy, score=max(-1.0, min(1.0, score)))


def sharpness(image: np.ndarray) -> float:
    img = _as_float(image)
    band = _band(img, 1.5, 4.0)
    low = _gaussian(img, 4.0)
    low_var = float(np.var(low))
    return float(np.mean(band**2) / low_var) if low_var > 0 else 0.0


def saturation(image: np.ndarray, full_scale: float = _FULL_SCALE) -> float:
    img = np.asarray(image)
    return float(np.count_nonzero((img <= 0) | (img >= full_scale)) / img.size)


def stripe_energy(image: np.ndarray, smooth_px: float = 4.0) -> float:
    """Curtain amplitude: the rms of the fine column-to-column variation that runs the height of the
    face, as a fraction of the image's grey-level spread.

    The image is high-passed across (x, the mill axis runs down the columns: the ion beam comes from the
    top); each column's median over all rows keeps what runs down the column (curtains, which cross every
    phase) and drops what occupies only some rows of it (particle and pore edges, cracks, noise), whose
    leftover in the median is subtracted. ~0 on a face without curtains."""
    img = _as_float(image)
    spread = float(np.std(img))
    if spread == 0.0:
        return 0.0
    high = img - ndi.gaussian_filter1d(img, smooth_px, axis=1)
    margin = math.ceil(4 * smooth_px)  # the filter's edge effects and the specimen's side edges
    high = high[:, margin:-margin]
    profile = np.median(high, axis=0)
    # What incoherent content leaves in a median of that many rows: pi/2 x its robust variance over the
    # number of independent rows (fewer when the content is correlated down the columns over a few rows).
    robust_var = (1.4826 * float(np.median(np.abs(high - np.median(high))))) ** 2
    incoherent = 0.5 * math.pi * robust_var / _independent_rows(high)
    return math.sqrt(max(float(np.var(profile)) - incoherent, 0.0)) / spread


def _independent_rows(high: np.ndarray, max_lag: int = 32) -> float:
    """Rows / (1 + 2 x the summed autocorrelation down the columns, to where it fades)."""
    centred = high - high.mean(axis=0)
    energy = float(np.mean(centred**2))
    if energy == 0.0:
        return float(high.shape[0])
    total = 0.0
    for lag in range(1, min(max_lag, high.shape[0] // 4)):
        rho = float(np.mean(centred[lag:] * centred[:-lag])) / energy
        if rho < 0.05:
            break
        total += rho
    return float(high.shape[0]) / (1.0 + 2.0 * total)


def noise_sigma(image: np.ndarray) -> float:
    """Pixel noise from a Laplacian-like residual (Immerkaer's kernel), robust to edges via the MAD."""
    img = _as_float(image)
    kernel = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
    residual = ndi.convolve(img, kernel, mode="reflect")[1:-1, 1:-1]
    mad = float(np.median(np.abs(residual - np.median(residual))))
    return 1.4826 * mad / 6.0  # the kernel's gain on white noise is sqrt(36) = 6


def rose_ratio(image: np.ndarray, k: float = 5.0, classes: int = 3) -> float:
    """Smallest step between the phases' mean grey levels over k x noise (>= 1: visible by Rose)."""
    img = _as_float(image)
    sigma = noise_sigma(img)
    smooth = _gaussian(img, 1.0)
    try:
        thresholds = _multiotsu(smooth, classes)
    except ValueError:  # a flat image: no phases to tell apart
        return 0.0
    labels = np.digitize(smooth, bins=thresholds)
    means = [float(img[labels == c].mean()) for c in range(classes) if np.any(labels == c)]
    if len(means) < 2:
        return 0.0
    step = min(abs(b - a) for a, b in itertools.pairwise(means))
    return step / (k * sigma) if sigma > 0 else float("1e9")


def image_measures(images: Mapping[str, np.ndarray], rose_k: float = 5.0) -> ImageMeasures:
    sharp, sat, stripes, snr, rose = {}, {}, {}, {}, {}
    for det, image in images.items():
        sharp[det] = sharpness(image)
        sat[det] = saturation(image)
        stripes[det] = stripe_energy(image)
        sigma = noise_sigma(image)
        snr[det] = float(np.mean(image)) / sigma if sigma > 0 else 1e9
        rose[det] = rose_ratio(image, rose_k)
    return ImageMeasures(sharpness=sharp, saturation=sat, stripe_energy=stripes, snr=snr, rose_ratio=rose)


def segmentation_observation(metrics: SliceMetrics | Mapping[str, float]) -> SegmentationObservation:
    """From a slice's metrics, or their flat numeric form (`SliceMetrics.numeric()`, where an undefined
    ratio such as the unfilled share of a view without pores is simply absent)."""
    m = metrics.numeric() if isinstance(metrics, SliceMetrics) else metrics
    material = sum(
        float(m.get(f"fraction_{c}", 0.0)) for c in ("pore", "unfilled_pore", "active", "cbd", "collector")
    )
    share = m.get("unfilled_pore_share")
    confidence = m.get("confidence_mean_max_probability")
    return SegmentationObservation(
        unfilled_pore_share=None if share is None else float(share),
        porosity=float(m.get("porosity", 0.0)),
        fraction_collector=float(m.get("fraction_collector", 0.0)),
        # Metrics since the issue-8 merge say it (their phase fractions are of the specimen's pixels);
        # older records' fractions are of the whole image, so the rest is outside.
        outside_fraction=float(m["fraction_outside"])
        if "fraction_outside" in m
        else max(0.0, 1.0 - material),
        confidence=None if confidence is None else float(confidence),
    )
