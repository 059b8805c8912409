"""Real annotations for `kintsugi train`: label images as microscopists make them, with a mapping file.

An annotation folder holds an `annotations.toml` (or the file is named directly):

    format = "napari"                # avizo | napari | fiji | ilastik
    labels = "labels.tif"            # a label stack (Z, Y, X) or one 2-D label image, or a glob
    pixel_size_m = 4.05e-8           # optional when the files carry resolution tags
    slices = [0, 4, 9]               # optional: planes of the stacks to use (default: every annotated one)
    [images]                         # per detector, in any order: a stack, a 2-D image, or a glob
    cbs = "cbs.tif"                  #   (e.g. "slices/*_cbs.tif" from a kintsugi run directory)
    tld = "tld.tif"
    [classes]                        # label value in the file -> canonical class, or "ignore"
    0 = "ignore"
    1 = "pore"

What differs between the tools (and is handled here): Avizo label stacks are multi-page TIFFs whose 0 is
the "Exterior" material (a real label: map it); napari and Fiji label TIFFs use 0 for "not annotated"
(map it to "ignore"), and Fiji writes the pixel size as ImageJ metadata; ilastik's "Simple Segmentation"
TIFF export numbers classes from 1 and may carry a trailing channel axis of length 1; its HDF5 export
(labels, Simple Segmentation, and the raw data as HDF5 too) is read by `ilastik.py` (dataset
"exported_data", axis order from its "axistags"): any file ending .h5/.hdf5 is read that way.
Planes where every pixel is ignored are not annotated and are skipped. Everything is read and checked
before training starts, so a bad file stops `kintsugi train` with its name before anything is written.
"""

from __future__ import annotations

import glob
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile

from kintsugi_daemon.inference.contract import CANONICAL_CLASSES
from kintsugi_daemon.inference.training.data import (
    IGNORE,
    FolderInfo,
    SliceData,
    load_folder,
    pick_evenly,
    to_unit,
)
from kintsugi_daemon.inference.training.ilastik import (
    HDF5_SUFFIXES,
    HDF5Error,
    hdf5_pixel_size,
    read_hdf5_stack,
)

__all__ = ["ANNOTATION_FILE", "FORMATS", "AnnotationError", "load_annotations", "load_training_data"]

ANNOTATION_FILE = "annotations.toml"
FORMATS = ("avizo", "napari", "fiji", "ilastik")
PIXEL_SIZE_TOLERANCE = 0.02  # resolution tags round-trip through inches/centimetres: allow 2 %
_UNIT_M = {"m": 1.0, "cm": 1e-2, "mm": 1e-3, "um": 1e-6, "micron": 1e-6, "\u00b5m": 1e-6, "nm": 1e-9}


class AnnotationError(ValueError):
    """A problem with an annotation or its mapping; the message names the file."""


@dataclass(frozen=True)
class _Spec:
    path: Path  # the annotations.toml
    format: str
    labels: str
    images: dict[str, str]
    classes: dict[int, str]
    pixel_size_m: float | None
    slices: list[int] | None


def _read_spec(path: Path) -> _Spec:
    try:
        doc: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read the annotation file: {exc}") from exc
    unknown = sorted(set(doc) - {"format", "labels", "images", "classes", "pixel_size_m", "slices"})
    if unknown:
        raise AnnotationError(f"{path}: unknown key(s) {unknown}")
    fmt = doc.get("format")
    if fmt not in FORMATS:
        raise AnnotationError(f"{path}: format must be one of {list(FORMATS)}, got {fmt!r}")
    for key in ("labels", "images", "classes"):
        if key not in doc:
            raise AnnotationError(f"{path}: missing {key!r}")
    classes: dict[int, str] = {}
    for raw, name in dict(doc["classes"]).items():
        try:
            value = int(raw)
        except ValueError:
            raise AnnotationError(f"{path}: classes: {raw!r} is not an integer label value") from None
        if name != "ignore" and name not in CANONICAL_CLASSES:
            raise AnnotationError(
                f"{path}: classes.{raw} = {name!r}; use a canonical class "
                f"{list(CANONICAL_CLASSES)} or 'ignore'"
            )
        classes[value] = name
    pixel = doc.get("pixel_size_m")
    if pixel is not None and not (isinstance(pixel, float | int) and 1e-10 < pixel < 1e-5):
        raise AnnotationError(f"{path}: pixel_size_m {pixel!r} is not a pixel size in metres")
    slices = doc.get("slices")
    if slices is not None and not (isinstance(slices, list) and all(isinstance(i, int) for i in slices)):
        raise AnnotationError(f"{path}: slices must be a list of plane indices")
    return _Spec(
        path=path,
        format=str(fmt),
        labels=str(doc["labels"]),
        images={str(k): str(v) for k, v in dict(doc["images"]).items()},
        classes=classes,
        pixel_size_m=None if pixel is None else float(pixel),
        slices=slices,
    )


def _files(spec: _Spec, pattern: str) -> list[Path]:
    base = spec.path.parent
    if any(ch in pattern for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(base / pattern)))
        if not found:
            raise AnnotationError(f"{spec.path}: {pattern!r} matches no file in {base}")
        return found
    path = base / pattern
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file (named in {spec.path})")
    return [path]


def _tiff_pixel_size(path: Path) -> float | None:
    """Pixel size from ImageJ metadata (unit + XResolution) or baseline resolution tags (cm or inch)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        tag = page.tags.get("XResolution")
        if tag is None:
            return None
        num, den = tag.value
        if not num:
            return None
        per_unit = float(num) / float(den)
        ij = tif.imagej_metadata or {}
        unit = str(ij.get("unit", "")).strip().lower().replace("\\u00b5", "\u00b5")
        if unit in _UNIT_M:
            return _UNIT_M[unit] / per_unit
        res_unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
        if res_unit == 3:
            return 1e-2 / per_unit
        if res_unit == 2 and per_unit > 1e4:  # tiny pixels in dots per inch; 72 dpi means "no scale"
            return 0.0254 / per_unit
        return None


def _stack(spec: _Spec, pattern: str, *, labels: bool) -> tuple[npt.NDArray[Any], list[Path]]:
    """(Z, Y, X) planes from one stack, one 2-D image or a glob of 2-D images."""
    files = _files(spec, pattern)
    planes: list[npt.NDArray[Any]] = []
    for f in files:
        if f.suffix.lower() in HDF5_SUFFIXES:
            try:
                arr = read_hdf5_stack(f, labels=labels)
            except HDF5Error as exc:
                raise AnnotationError(str(exc)) from exc
        else:
            try:
                arr = np.asarray(tifffile.imread(f))
            except (OSError, ValueError, tifffile.TiffFileError) as exc:
                raise AnnotationError(f"{f}: not a readable TIFF ({exc})") from exc
        if labels and spec.format == "ilastik" and arr.ndim >= 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]  # ilastik keeps a channel axis of length 1
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise AnnotationError(f"{f}: expected a 2-D image or a (Z, Y, X) stack, got shape {arr.shape}")
        if labels and arr.dtype.kind not in "ui":
            raise AnnotationError(f"{f}: label images must hold integers, got {arr.dtype}")
        planes.extend(arr)
    return np.stack(planes), files


def _check_pixel_size(spec: _Spec, files: Sequence[Path], expected: float | None) -> float | None:
    found = expected
    for f in files:
        try:
            size = hdf5_pixel_size(f) if f.suffix.lower() in HDF5_SUFFIXES else _tiff_pixel_size(f)
        except HDF5Error as exc:
            raise AnnotationError(str(exc)) from exc
        if size is None:
            continue
        if found is None:
            found = size
        elif abs(size - found) / found > PIXEL_SIZE_TOLERANCE:
            raise AnnotationError(
                f"{f}: pixel size {size * 1e9:.2f} nm differs from {found * 1e9:.2f} nm "
                f"({'declared in ' + str(spec.path) if expected else 'of the other files'}); "
                "annotate at the imaging pixel size or resample first"
            )
    return found


def load_annotations(
    path: Path,
    channels: Sequence[str],
    classes: Sequence[str],
    max_slices: int | None = None,
    mapping: Path | None = None,
) -> tuple[list[SliceData], FolderInfo]:
    """Read an annotation folder (or its annotations.toml); `mapping` names that file when it lives
    elsewhere."""
    spec_path = mapping or (path / ANNOTATION_FILE if path.is_dir() else path)
    spec = _read_spec(spec_path)
    missing = [c for c in channels if c not in spec.images]
    if missing:
        raise AnnotationError(
            f"{spec_path}: [images] lacks detector(s) {missing}; it has {list(spec.images)}"
        )
    label_stack, label_files = _stack(spec, spec.labels, labels=True)
    present = {int(v) for v in np.unique(label_stack)}
    unmapped = sorted(present - set(spec.classes))
    if unmapped:
        raise AnnotationError(
            f"{label_files[0]}: label value(s) {unmapped[:10]} are not in the mapping of {spec_path} "
            f"(mapped: {sorted(spec.classes)}); map them to a class or to 'ignore'"
        )
    if max(present) > 65535:
        raise AnnotationError(f"{label_files[0]}: label values above 65535 are not supported")
    lut = np.full(max(max(present), max(spec.classes)) + 1, IGNORE, dtype=np.uint8)
    for value, name in spec.classes.items():
        if name in classes:
            lut[value] = classes.index(name)
    labels = lut[label_stack]
    images: list[npt.NDArray[np.float32]] = []
    pixel = _check_pixel_size(spec, label_files, spec.pixel_size_m)
    for c in channels:
        stack, files = _stack(spec, spec.images[c], labels=False)
        if stack.shape != labels.shape:
            raise AnnotationError(
                f"{files[0]}: detector {c} has shape {stack.shape} (Z, Y, X) but the labels "
                f"{label_files[0].name} have {labels.shape}"
            )
        pixel = _check_pixel_size(spec, files, pixel)
        images.append(to_unit(stack))
    planes = spec.slices if spec.slices is not None else list(range(labels.shape[0]))
    bad = [i for i in planes if not 0 <= i < labels.shape[0]]
    if bad:
        raise AnnotationError(f"{spec_path}: slices {bad} outside the {labels.shape[0]} planes of the stack")
    annotated = [i for i in planes if np.any(labels[i] != IGNORE)]
    if not annotated:
        raise AnnotationError(
            f"{label_files[0]}: no annotated pixel of a training class in the chosen planes"
        )
    annotated = [annotated[i] for i in pick_evenly(len(annotated), max_slices)]
    out = [
        SliceData(
            image=np.ascontiguousarray(np.stack([im[i] for im in images])),
            labels=np.ascontiguousarray(labels[i]),
            source=f"{spec_path}#{i}",
        )
        for i in annotated
    ]
    info = FolderInfo(
        path=str(spec_path),
        slices=len(out),
        width_px=int(labels.shape[2]),
        height_px=int(labels.shape[1]),
        preset=None,
        seed=None,
        pt_infiltration=None,
        pixel_size_m=pixel,
        kind=f"annotations ({spec.format})",
    )
    return out, info


def load_training_data(
    path: Path,
    channels: Sequence[str],
    classes: Sequence[str],
    max_slices: int | None = None,
    *,
    mapping: Path | None = None,
) -> tuple[list[SliceData], FolderInfo]:
    """A simulator dataset folder (dataset.json) or real annotations (annotations.toml or `mapping`)."""
    if path.is_dir() and (path / "dataset.json").is_file() and mapping is None:
        return load_folder(path, channels, classes, max_slices)
    if mapping is not None or path.suffix == ".toml" or (path / ANNOTATION_FILE).is_file():
        return load_annotations(path, channels, classes, max_slices, mapping)
    raise AnnotationError(
        f"{path}: neither a dataset folder (dataset.json) nor annotations ({ANNOTATION_FILE} or --mapping)"
    )
