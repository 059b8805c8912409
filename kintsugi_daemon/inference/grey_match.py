"""Does a slice look like the model's training data? Class-conditional grey statistics and their overlap.

Why: a network's softmax confidence does not notice inputs unlike its training data. A detector re-tune
(brightness -10 %, contrast -35 %) moves every grey level, the network still lands each pixel deep inside
some class's decision region and reports the same confidence while its accuracy falls (ReLU networks are
provably over-confident far from their training data: Hein, Andriushchenko & Bitterwolf, CVPR 2019,
"Why ReLU networks yield high-confidence predictions far away from the training data and how to mitigate
the problem"). What a microscopist checks instead is whether each phase has the grey level it should.

How:
- At training, `class_grey_statistics` records per class and detector channel the mean and standard
  deviation of the raw grey (0..1, as rendered or acquired, before augmentation) over the training pixels;
  the model carries them as `kintsugi.grey_statistics`.
- At inference, `grey_match` groups the slice's pixels by the class the model chose and compares, per
  class, a Gaussian fit of the slice's greys with the training's through the Bhattacharyya coefficient
  (Bhattacharyya 1943; Kailath 1967), per channel
      BC = sqrt(2 s1 s2 / (s1^2 + s2^2)) * exp(-(m1 - m2)^2 / (4 (s1^2 + s2^2))),
  multiplied over the channels (the coefficient of two diagonal Gaussians is the product of the
  per-channel ones). BC is the overlap of the two distributions: 1 when they coincide, towards 0 as they
  separate, and it needs no threshold. The slice's match is the mean of the per-class BC weighted by the
  classes' pixel shares; classes with fewer than `MIN_CLASS_PX` pixels are left out (their mean and spread
  are noise).
- The daemon's confidence (`metrics.SliceMetrics.confidence`) is the mean softmax probability times this
  match, so a slice unlike the training data ranks among the least confident and asks for annotation.

What it is not: an accuracy estimate. Augmentation makes the network tolerant of moderate shifts, so a
shift can lower the match while the labels stay right (a false alarm, the safe side); a slice whose greys
match the training but whose structures differ (another material) is not noticed. Both are in the
README's robustness table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MIN_CLASS_PX", "class_grey_statistics", "grey_match"]

MIN_CLASS_PX = 256
# Floor on a standard deviation (grey units of 0..1): a flat synthetic region must not divide by zero.
_MIN_STD = 1e-4

# class -> {"mean": [per channel], "std": [per channel], "pixels": n}, as `kintsugi.grey_statistics` holds it
GreyStatistics = Mapping[str, Mapping[str, Any]]


def _moments(
    images: npt.NDArray[np.floating], labels: npt.NDArray[np.integer], n_classes: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per class: pixel count [K], grey sum [K, C] and sum of squares [K, C]; labels >= K are skipped."""
    flat = labels.reshape(-1).astype(np.int64)
    keep = flat < n_classes
    idx = flat[keep]
    count = np.bincount(idx, minlength=n_classes).astype(np.float64)
    c = images.shape[0]
    s1 = np.empty((n_classes, c))
    s2 = np.empty((n_classes, c))
    for ch in range(c):
        g = images[ch].reshape(-1)[keep].astype(np.float64)
        s1[:, ch] = np.bincount(idx, weights=g, minlength=n_classes)
        s2[:, ch] = np.bincount(idx, weights=g * g, minlength=n_classes)
    return count, s1, s2


def class_grey_statistics(
    samples: Sequence[tuple[npt.NDArray[np.floating], npt.NDArray[np.integer]]], classes: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """{class: {"mean": [per channel], "std": [...], "pixels": n}} over (image [C, H, W] in 0..1, class
    indices [H, W]) pairs; label values >= len(classes) (ignored, outside) do not count. Classes with no
    pixel are left out."""
    k = len(classes)
    count = np.zeros(k)
    s1: npt.NDArray[np.float64] | None = None
    s2: npt.NDArray[np.float64] | None = None
    for image, labels in samples:
        n, a, b = _moments(image, labels, k)
        count += n
        s1 = a if s1 is None else s1 + a
        s2 = b if s2 is None else s2 + b
    out: dict[str, dict[str, Any]] = {}
    if s1 is None or s2 is None:
        return out
    for i, name in enumerate(classes):
        if count[i] == 0:
            continue
        mean = s1[i] / count[i]
        std = np.sqrt(np.maximum(s2[i] / count[i] - mean**2, 0.0))
        out[name] = {
            "mean": [round(float(v), 6) for v in mean],
            "std": [round(float(max(v, _MIN_STD)), 6) for v in std],
            "pixels": int(count[i]),
        }
    return out


def grey_match(
    images: npt.NDArray[np.floating],
    labels: npt.NDArray[np.integer],
    classes: Sequence[str],
    statistics: GreyStatistics,
) -> float | None:
    """The pixel-weighted Bhattacharyya overlap (0..1) of the slice's per-class grey distributions with
    the training's. `images` [C, H, W] raw greys in 0..1 in the model's channel order, `labels` [H, W] the
    predicted class indices (into `classes`). None when no predicted class has statistics and enough
    pixels."""
    count, s1, s2 = _moments(images, labels, len(classes))
    weights, overlaps = [], []
    for i, name in enumerate(classes):
        stat = statistics.get(name)
        if stat is None or count[i] < MIN_CLASS_PX:
            continue
        m1 = s1[i] / count[i]
        v1 = np.maximum(s2[i] / count[i] - m1**2, _MIN_STD**2)
        m2 = np.asarray(stat["mean"], np.float64)
        v2 = np.maximum(np.asarray(stat["std"], np.float64), _MIN_STD) ** 2
        bc = np.sqrt(2.0 * np.sqrt(v1 * v2) / (v1 + v2)) * np.exp(-((m1 - m2) ** 2) / (4.0 * (v1 + v2)))
        weights.append(count[i])
        overlaps.append(float(np.prod(bc)))
    if not weights:
        return None
    return float(np.average(overlaps, weights=weights))
