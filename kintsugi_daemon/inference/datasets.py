"""Dataset folders as `kintsugi-sim dataset` writes them (dataset.json + TIFFs), read with clear errors.

Shared by `kintsugi segment` and `kintsugi quantize`: every message names the file at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

__all__ = ["DatasetError", "SliceItem", "dataset_items", "load_manifest", "read_tiff"]


class DatasetError(ValueError):
    """Missing or malformed input data; the message names the file."""


@dataclass(frozen=True)
class SliceItem:
    """One slice to segment: detector image paths, where its labels go, optional ground truth."""

    name: str
    images: dict[str, Path]
    out_name: str
    truth: Path | None


def read_tiff(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    try:
        image = np.asarray(tifffile.imread(path))
    except Exception as exc:  # tifffile raises a variety of types for a damaged file
        raise DatasetError(f"{what} {path} is not a readable TIFF: {exc}") from exc
    if image.ndim != 2:
        raise DatasetError(f"{what} {path} has shape {image.shape}; expected a 2-D image")
    return image


def load_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "dataset.json"
    if not path.is_file():
        raise DatasetError(
            f"{folder} has no dataset.json; give a dataset folder or per-detector --image NAME=FILE"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("slices"), list):
        raise DatasetError(f"{path} lacks a 'slices' list")
    return manifest


def dataset_items(folder: Path, manifest: dict[str, Any]) -> list[SliceItem]:
    items = []
    for n, s in enumerate(manifest["slices"]):
        if not isinstance(s, dict) or not isinstance(s.get("images"), dict):
            raise DatasetError(f"{folder / 'dataset.json'}: slice {n} lacks an 'images' mapping")
        index = s.get("index", n)
        labels = s.get("labels")
        out_name = Path(labels).name if isinstance(labels, str) else f"{int(index):04d}_labels.tif"
        items.append(
            SliceItem(
                name=f"slice {index}",
                images={k: folder / v for k, v in s["images"].items()},
                out_name=out_name,
                truth=folder / labels if isinstance(labels, str) else None,
            )
        )
    return items
