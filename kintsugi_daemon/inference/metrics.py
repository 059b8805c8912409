"""Per-slice metrics from a label image (and the model's confidence maps), and IoU against ground truth.

Everything here is plain numpy/scipy/scikit-image on canonical label values, so the daemon, `kintsugi
segment`, the training code and the benchmarks measure the same way. Undefined quantities (a CBD
coverage with no particle in view) are None with a reason in `undefined`, never NaN: the values go out as
JSON over MQTT and into Telegraf, where NaN is invalid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage as ndi

from kintsugi_daemon.inference.contract import CANONICAL_CLASSES, OUTSIDE_LABEL

__all__ = [
    "MEAN_IOU_CLASSES",
    "Crack",
    "CrackParams",
    "SliceMetrics",
    "find_cracks",
    "interface_length_px",
    "iou_counts",
    "iou_per_class",
    "mean_iou",
    "phase_fractions",
    "slice_metrics",
]

# The classes the benchmark figures average over (unfilled pores are rare and absent with full Pt).
MEAN_IOU_CLASSES = ("pore", "active", "cbd", "collector")

_PORE, _UNFILLED, _ACTIVE, _CBD, _COLLECTOR = (
    CANONICAL_CLASSES[n] for n in ("pore", "unfilled_pore", "active", "cbd", "collector")
)

ClassSpec = Mapping[str, int] | Sequence[str]


def _values(classes: ClassSpec) -> dict[str, int]:
    if isinstance(classes, Mapping):
        return dict(classes)
    return {name: CANONICAL_CLASSES[name] for name in classes}


# ---------------------------------------------------------------------------------------------- IoU


def iou_counts(pred: np.ndarray, truth: np.ndarray, classes: ClassSpec) -> dict[str, tuple[int, int]]:
    """(intersection, union) pixel counts per class; sum them over slices for a dataset-wide IoU.

    Pixels whose truth is OUTSIDE_LABEL (255: not specimen) count for no class, whatever was predicted.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    inside = truth != OUTSIDE_LABEL
    out: dict[str, tuple[int, int]] = {}
    for name, value in _values(classes).items():
        p, t = (pred == value) & inside, truth == value
        out[name] = (int(np.count_nonzero(p & t)), int(np.count_nonzero(p | t)))
    return out


def iou_per_class(pred: np.ndarray, truth: np.ndarray, classes: ClassSpec) -> dict[str, float | None]:
    """Intersection over union per class (None where the class is in neither image).

    `classes` is a name -> label value mapping (a dataset manifest's) or canonical class names.
    """
    return {n: (i / u if u else None) for n, (i, u) in iou_counts(pred, truth, classes).items()}


def mean_iou(ious: Mapping[str, float | None], over: Sequence[str] = MEAN_IOU_CLASSES) -> float | None:
    """Mean over the classes in `over` that are defined (present in prediction or truth)."""
    vals = [v for n in over if (v := ious.get(n)) is not None]
    return sum(vals) / len(vals) if vals else None


def phase_fractions(labels: np.ndarray, classes: ClassSpec = CANONICAL_CLASSES) -> dict[str, float]:
    total = max(1, int(np.count_nonzero(labels != OUTSIDE_LABEL)))  # a truth image's outside is no phase
    return {n: np.count_nonzero(labels == v) / total for n, v in _values(classes).items()}


# ---------------------------------------------------------------------------------------- interfaces


def _pairs(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> int:
    """Neighbour pairs (p, p + (dy, dx)) with one pixel in `a` and the other in `b` (a, b disjoint)."""
    h, w = a.shape
    y0, y1 = slice(0, h - dy), slice(dy, h)
    x0, x1 = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    return int(np.count_nonzero(a[y0, x0] & b[y1, x1]) + np.count_nonzero(b[y0, x0] & a[y1, x1]))


def interface_length_px(a: np.ndarray, b: np.ndarray) -> float:
    """Length (in pixels) of the boundary between masks `a` and `b`, by the Cauchy-Crofton formula.

    Counting pixel edges alone overestimates a diagonal boundary by up to 41%; crossings counted in four
    directions (0, 45, 90, 135 deg; diagonal lines are 1/sqrt 2 apart) are unbiased for isotropic
    boundaries and within ~5% for axis-aligned ones: L = pi/8 * (n0 + n90 + (n45 + n135) / sqrt 2).
    The image border is not an interface.
    """
    axis = _pairs(a, b, 0, 1) + _pairs(a, b, 1, 0)
    diag = _pairs(a, b, 1, 1) + _pairs(a, b, 1, -1)
    return math.pi / 8 * (axis + diag / math.sqrt(2))


# -------------------------------------------------------------------------------------------- cracks


@dataclass(frozen=True)
class CrackParams:
    """Thresholds of the crack heuristic, in physical units so they hold at any pixel size."""

    max_width_m: float = 0.4e-6  # intergranular cracks are tens to hundreds of nm wide
    min_length_m: float = 0.3e-6
    min_aspect: float = 3.0  # length / width: a crack is thin and elongated, a pocket is not
    min_active_surround: float = 0.6  # share of the region's rim that is NMC


CrackFill = Literal["pt_filled", "cbd_filled", "empty"]
_FILL: dict[int, CrackFill] = {_PORE: "pt_filled", _CBD: "cbd_filled", _UNFILLED: "empty"}


@dataclass(frozen=True)
class Crack:
    fill: CrackFill
    area_px: int
    width_px: float
    length_px: float
    centroid_yx: tuple[float, float]


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a disc; the image is edge-extended first so its border does not erode."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    footprint = yy**2 + xx**2 <= radius**2
    padded = np.pad(mask, radius + 1, mode="edge")
    closed = ndi.binary_erosion(ndi.binary_dilation(padded, footprint), footprint, border_value=1)
    return np.asarray(closed[radius + 1 : -radius - 1, radius + 1 : -radius - 1], bool)


def find_cracks(labels: np.ndarray, pixel_size_m: float, params: CrackParams = CrackParams()) -> list[Crack]:
    """Particle cracks: thin, elongated non-NMC regions inside or cut into one NMC particle.

    Heuristic (2-D labels only, no particle instances):
    1. candidates = (closing of the NMC mask with a disc of radius max_width / 2, plus the NMC mask with
       its holes filled) minus NMC: gaps narrower than max_width that cut into a particle, and closed
       cracks fully inside one;
    2. each 8-connected candidate is kept when it is elongated (length = area / width >= min_length and
       >= min_aspect x width; width = the larger of 2 x area / perimeter and the widest inscribed line),
       at most max_width wide, its one-pixel rim is mostly NMC (>= min_active_surround) and that NMC is one
       connected particle (>= 90%): a gap between two separate particles is not a crack;
    3. it is classified by the majority label of its pixels: pore -> Pt-filled, cbd -> CBD-filled,
       unfilled_pore -> empty (a collector majority is not a crack).
    Known limits: a crack that cuts a particle in two in this section is seen as a gap between two
    particles and missed; a narrow neck pocket between touching particles can pass as a short crack.
    """
    active = labels == _ACTIVE
    if not active.any():
        return []
    radius = max(1, math.ceil(params.max_width_m / 2 / pixel_size_m))
    max_width_px = params.max_width_m / pixel_size_m
    min_length_px = params.min_length_m / pixel_size_m
    candidates = (_closing(active, radius) | ndi.binary_fill_holes(active)) & ~active
    eight = np.ones((3, 3), bool)
    regions, _ = ndi.label(candidates, structure=eight)
    particles, _ = ndi.label(active, structure=eight)
    cracks: list[Crack] = []
    for i, box in enumerate(ndi.find_objects(regions), start=1):
        if box is None:
            continue
        # Work in the region's box grown by one pixel so its rim is inside the window.
        ys = slice(max(0, box[0].start - 1), box[0].stop + 1)
        xs = slice(max(0, box[1].start - 1), box[1].stop + 1)
        mask = regions[ys, xs] == i
        area = int(mask.sum())
        # Two width estimates, each exact where the other fails: 2 x area / perimeter for an even-width
        # strip, the widest inscribed line for a round blob (which must not pass as elongated).
        inscribed = 2.0 * float(ndi.distance_transform_edt(np.pad(mask, 1)).max()) - 1.0
        width = max(1.0, inscribed, 2.0 * area / max(1.0, interface_length_px(mask, ~mask)))
        length = area / width
        if width > max_width_px or length < min_length_px or length < params.min_aspect * width:
            continue
        rim = ndi.binary_dilation(mask, structure=eight) & ~mask
        rim_particles = particles[ys, xs][rim]
        on_nmc = rim_particles[rim_particles > 0]
        if on_nmc.size < params.min_active_surround * max(1, rim_particles.size):
            continue
        if np.bincount(on_nmc).max() < 0.9 * on_nmc.size:
            continue
        fill_values = labels[ys, xs][mask]
        majority = int(np.bincount(fill_values).argmax())
        if majority not in _FILL:
            continue
        cy, cx = ndi.center_of_mass(mask)
        cracks.append(
            Crack(
                fill=_FILL[majority],
                area_px=area,
                width_px=width,
                length_px=length,
                centroid_yx=(float(cy) + ys.start, float(cx) + xs.start),
            )
        )
    return cracks


# ------------------------------------------------------------------------------------------ metrics


class SliceMetrics(BaseModel):
    """Flat per-slice metrics (fractions of the imaged area; densities per um^2 of image)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    width_px: int
    height_px: int
    pixel_size_m: float
    fraction_pore: float
    fraction_unfilled_pore: float
    fraction_active: float
    fraction_cbd: float
    fraction_collector: float
    # OUTSIDE_LABEL pixels (no specimen: above the surface, past an edge) of the whole image; the phase
    # fractions above are of the specimen's pixels
    fraction_outside: float = 0.0
    porosity: float  # pore + unfilled_pore, of the whole image
    electrode_porosity: float | None  # of the image minus the collector
    unfilled_pore_share: float | None  # unfilled_pore / (pore + unfilled_pore): Pt not reaching
    interface_active_pore_um_inv: float  # NMC-pore boundary length per image area
    interface_active_cbd_um_inv: float
    active_perimeter_um_inv: float
    cbd_coverage: float | None  # NMC-CBD length / NMC perimeter
    cracks: int
    cracks_pt_filled: int
    cracks_cbd_filled: int
    cracks_empty: int
    crack_length_um: float
    confidence_mean_max_probability: float | None
    confidence_mean_entropy: float | None  # normalised by log K: 0 certain, 1 uniform
    # Overlap (0..1) of the slice's per-class grey levels with the training data's (`grey_match.py`)
    confidence_grey_match: float | None = None
    # The slice's confidence: mean max probability x grey match (the probability alone when the model
    # has no grey statistics). Softmax alone stays high on inputs unlike the training data.
    confidence: float | None = None
    undefined: dict[str, str]  # field -> why it is None

    def numeric(self) -> dict[str, float]:
        """The defined numeric fields, for a flat metrics topic (Telegraf, Grafana)."""
        return {
            k: float(v)
            for k, v in self.model_dump(exclude={"undefined"}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }


def _ratio(num: float, den: float, name: str, why: str, undefined: dict[str, str]) -> float | None:
    if den > 0:
        return num / den
    undefined[name] = why
    return None


def slice_metrics(
    labels: np.ndarray,
    pixel_size_m: float,
    *,
    max_probability: np.ndarray | None = None,
    entropy: np.ndarray | None = None,
    grey_match: float | None = None,
    crack_params: CrackParams = CrackParams(),
) -> SliceMetrics:
    """Metrics of one slice from its canonical label image (and the segmentation's confidence maps)."""
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 2-D image, got shape {labels.shape}")
    if not (math.isfinite(pixel_size_m) and pixel_size_m > 0):
        raise ValueError(f"pixel_size_m must be positive, got {pixel_size_m}")
    undefined: dict[str, str] = {}
    frac = phase_fractions(labels)
    pores = frac["pore"] + frac["unfilled_pore"]
    electrode = 1.0 - frac["collector"]
    px_um = pixel_size_m * 1e6
    area_um2 = labels.size * px_um**2

    active = labels == _ACTIVE
    pore = (labels == _PORE) | (labels == _UNFILLED)
    cbd = labels == _CBD
    l_pore = interface_length_px(active, pore) * px_um
    l_cbd = interface_length_px(active, cbd) * px_um
    l_perimeter = interface_length_px(active, ~active) * px_um

    cracks = find_cracks(labels, pixel_size_m, crack_params)
    if max_probability is not None and entropy is not None:
        # Over the specimen: pixels labelled outside (a fiducial's window) are no phase the model chose.
        specimen = labels != OUTSIDE_LABEL
        if not specimen.any():
            specimen = np.ones_like(specimen)
        mean_p: float | None = float(np.mean(max_probability[specimen]))
        mean_h: float | None = float(np.mean(entropy[specimen]))
    else:
        mean_p = mean_h = None
        undefined["confidence_mean_max_probability"] = "labels only, no probabilities"
        undefined["confidence_mean_entropy"] = "labels only, no probabilities"
    if grey_match is None:
        undefined["confidence_grey_match"] = "the model carries no grey statistics"
    confidence = None if mean_p is None else mean_p * (1.0 if grey_match is None else grey_match)
    if confidence is None:
        undefined["confidence"] = "labels only, no probabilities"
    return SliceMetrics(
        width_px=int(labels.shape[1]),
        height_px=int(labels.shape[0]),
        pixel_size_m=pixel_size_m,
        fraction_pore=frac["pore"],
        fraction_unfilled_pore=frac["unfilled_pore"],
        fraction_active=frac["active"],
        fraction_cbd=frac["cbd"],
        fraction_collector=frac["collector"],
        fraction_outside=int(np.count_nonzero(labels == OUTSIDE_LABEL)) / labels.size,
        porosity=pores,
        electrode_porosity=_ratio(pores, electrode, "electrode_porosity", "all collector", undefined),
        unfilled_pore_share=_ratio(
            frac["unfilled_pore"], pores, "unfilled_pore_share", "no pores in view", undefined
        ),
        interface_active_pore_um_inv=l_pore / area_um2,
        interface_active_cbd_um_inv=l_cbd / area_um2,
        active_perimeter_um_inv=l_perimeter / area_um2,
        cbd_coverage=_ratio(l_cbd, l_perimeter, "cbd_coverage", "no NMC boundary in view", undefined),
        cracks=len(cracks),
        cracks_pt_filled=sum(c.fill == "pt_filled" for c in cracks),
        cracks_cbd_filled=sum(c.fill == "cbd_filled" for c in cracks),
        cracks_empty=sum(c.fill == "empty" for c in cracks),
        crack_length_um=sum(c.length_px for c in cracks) * px_um,
        confidence_mean_max_probability=mean_p,
        confidence_mean_entropy=mean_h,
        confidence_grey_match=grey_match,
        confidence=confidence,
        undefined=undefined,
    )
