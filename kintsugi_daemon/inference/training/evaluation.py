"""Validation during training: the daemon's tiler and metrics on the held-out strip of every slice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kintsugi_daemon.inference.contract import CANONICAL_CLASSES, OUTSIDE_LABEL
from kintsugi_daemon.inference.metrics import iou_counts, mean_iou
from kintsugi_daemon.inference.tiling import TiledModel, segment_array, standardise
from kintsugi_daemon.inference.training.data import SliceData

__all__ = ["validate"]


def validate(
    model: TiledModel, slices: Sequence[SliceData], split_cols: Sequence[int]
) -> tuple[dict[str, float | None], float]:
    """Per-class IoU and their mean over the columns right of `split_cols` (the validation strips),
    summed over slices. Training labels are class indices; the tiler answers in canonical values."""
    classes = model.spec.classes
    to_canonical = np.full(256, OUTSIDE_LABEL, dtype=np.uint8)
    to_canonical[: len(classes)] = [CANONICAL_CLASSES[c] for c in classes]
    totals = {c: [0, 0] for c in classes}
    for s, col in zip(slices, split_cols, strict=True):
        if col >= s.image.shape[2]:
            continue
        x = standardise(np.array(s.image[:, :, col:], np.float32), model.spec.normalisation)
        pred = segment_array(model, x).labels
        for name, (i, u) in iou_counts(pred, to_canonical[s.labels[:, col:]], classes).items():
            totals[name][0] += i
            totals[name][1] += u
    ious = {c: (i / u if u else None) for c, (i, u) in totals.items()}
    miou = mean_iou(ious, classes)
    return ious, float("nan") if miou is None else miou
