"""Training data: folders of image/label pairs described by a `dataset.json` manifest.

The simulator's `kintsugi-sim dataset` writes this layout; real annotations are read by
`training.annotations`, which produces the same `SliceData`. Labels become indices into the training
class order; label values the manifest does not name, and OUTSIDE (255), become IGNORE and do not train.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile

from kintsugi_daemon.inference.contract import CANONICAL_CLASSES, OUTSIDE_LABEL

__all__ = [
    "DEFAULT_CHANNELS",
    "GREY_MAX",
    "IGNORE",
    "TRAIN_CLASSES",
    "FolderInfo",
    "SliceData",
    "class_lut",
    "load_folder",
    "pick_evenly",
    "read_grey",
    "to_unit",
]

TRAIN_CLASSES: tuple[str, ...] = tuple(CANONICAL_CLASSES)
DEFAULT_CHANNELS: tuple[str, ...] = ("cbs", "tld")
IGNORE = OUTSIDE_LABEL  # the loss and the metrics skip it: one value for "not a class"
GREY_MAX = 65535.0

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class SliceData:
    """One slice: raw grey values scaled to [0, 1] (C, H, W) and class indices (H, W), IGNORE = 255."""

    image: FloatArray
    labels: LabelArray
    source: str


@dataclass(frozen=True)
class FolderInfo:
    path: str
    slices: int
    width_px: int
    height_px: int
    preset: str | None
    seed: int | None
    pt_infiltration: bool | None
    pixel_size_m: float | None
    kind: str = "simulated"


def to_unit(arr: npt.NDArray[Any]) -> FloatArray:
    """Grey values scaled to [0, 1]: uint16 and float by 65535, other integers by their range."""
    scale = GREY_MAX if arr.dtype == np.uint16 or arr.dtype.kind == "f" else float(np.iinfo(arr.dtype).max)
    return (arr.astype(np.float32) / np.float32(scale)).astype(np.float32)


def read_grey(path: Path) -> FloatArray:
    """A single-channel image scaled to [0, 1]."""
    arr = np.asarray(tifffile.imread(path))
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel 2-D image, got shape {arr.shape}")
    return to_unit(arr)


def class_lut(value_of: dict[str, int], classes: Sequence[str]) -> LabelArray:
    """256-entry map from stored label values to training class indices (IGNORE where unnamed)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for name, value in value_of.items():
        if name in classes:
            lut[int(value)] = classes.index(name)
    return lut


def pick_evenly(n: int, most: int | None) -> list[int]:
    """`most` indices spread over range(n), first and last included (all of them when most is None)."""
    if most is None or most >= n:
        return list(range(n))
    return [int(i) for i in np.unique(np.linspace(0, n - 1, max(most, 1)).round().astype(int))]


def load_folder(
    folder: Path,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    classes: Sequence[str] = TRAIN_CLASSES,
    max_slices: int | None = None,
) -> tuple[list[SliceData], FolderInfo]:
    """Read a dataset folder (manifest `dataset.json`); labels are remapped to `classes` order.

    `max_slices` takes that many slices spread evenly over the stack (first and last included).
    """
    manifest_path = folder / "dataset.json"
    if not manifest_path.is_file():
        raise ValueError(f"{folder}: no dataset.json manifest (expected the kintsugi-sim dataset layout)")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    missing = [c for c in channels if c not in manifest.get("detectors", [])]
    if missing:
        raise ValueError(
            f"{folder}: manifest lacks detector(s) {missing}; it has {manifest.get('detectors')}"
        )
    lut = class_lut(dict(manifest.get("classes", {})), classes)
    entries: list[dict[str, Any]] = list(manifest["slices"])
    if not entries:
        raise ValueError(f"{folder}: the manifest lists no slices")
    entries = [entries[i] for i in pick_evenly(len(entries), max_slices)]
    out: list[SliceData] = []
    for entry in entries:
        if "labels" not in entry:
            raise ValueError(f"{folder}: slice {entry.get('index')} has no labels")
        image = np.stack([read_grey(folder / entry["images"][c]) for c in channels])
        labels = lut[np.asarray(tifffile.imread(folder / entry["labels"])).astype(np.uint8)]
        if labels.shape != image.shape[1:]:
            raise ValueError(f"{folder}: labels {labels.shape} and images {image.shape[1:]} differ in size")
        out.append(SliceData(image=image, labels=labels, source=f"{folder}#{entry.get('index')}"))
    info = FolderInfo(
        path=str(folder),
        slices=len(out),
        width_px=int(out[0].image.shape[2]),
        height_px=int(out[0].image.shape[1]),
        preset=manifest.get("preset"),
        seed=manifest.get("seed"),
        pt_infiltration=manifest.get("pt_infiltration"),
        pixel_size_m=manifest.get("pixel_size_m"),
    )
    return out, info
