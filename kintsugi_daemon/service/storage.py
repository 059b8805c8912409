"""The run directory (its OME-TIFF export: `kintsugi_daemon.service.export`).

```
<data_root>/<run_id>/
  recipe.toml                 the recipe as the operator wrote it
  run.json                    manifest, atomically rewritten
  slices/NNNN_<detector>.tif  16-bit image, metadata JSON in ImageDescription
  slices/NNNN_labels.tif      uint8 class labels (when segmented)
  slices/NNNN.json            per-slice record, written LAST: its presence marks the slice complete
  previews/NNNN_overlay.png   optional colour overlay
```
Every file is written atomically (temp + fsync + rename, `kintsugi_daemon.service.atomic`) and never
rewritten: an overnight run's data is worth more than any convenience. The one exception is explicit: a slice
whose record is missing (a crash or a full disk mid-slice) may be rewritten with `replace=True`.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile

from kintsugi_daemon.service.atomic import fsync_dir, write_atomic

__all__ = [
    "DiskFull",
    "RunStorage",
    "SliceExistsError",
    "StorageError",
    "estimate_slice_bytes",
    "pixel_size",
    "read_json",
    "resolution_tags",
    "slice_index",
]

SLICES = "slices"
PREVIEWS = "previews"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DETECTOR = re.compile(r"[a-z][a-z0-9_]{0,31}")
_RESERVED_NAMES = frozenset({"labels", "overlay"})
_SLICE_RECORD = re.compile(r"(\d{4,})\.json")
# Header, IFD and the JSON ImageDescription of one TIFF, generously.
_TIFF_OVERHEAD = 16 * 1024
_SLICE_JSON_BYTES = 16 * 1024
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageError(RuntimeError):
    """The run directory cannot be used as asked (missing, already there, bad input)."""


class SliceExistsError(FileExistsError):
    """A slice file is already on disk; files are never rewritten in place."""


class DiskFull(OSError):
    """Not enough free space: before a slice (ensure_space) or during a write (ENOSPC)."""

    def __init__(self, path: Path, needed: int, free: int, reserve: int = 0) -> None:
        super().__init__(
            errno.ENOSPC,
            f"not enough space for the run: {needed / 1e6:.1f} MB needed + {reserve / 1e6:.1f} MB reserve, "
            f"{free / 1e6:.1f} MB free",
            str(path),
        )
        self.needed = needed
        self.free = free
        self.reserve = reserve


def _json_text(value: Any, what: str, indent: int | None = 1) -> str:
    try:
        return json.dumps(value, allow_nan=False, indent=indent)
    except ValueError as exc:
        raise ValueError(f"{what} holds NaN or Infinity, which JSON cannot carry: {exc}") from None
    except TypeError as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from None


def _text_writer(text: str) -> Callable[[IO[bytes]], object]:
    return lambda fh: fh.write(text.encode())


def resolution_tags(pixel_size_m: float | None) -> dict[str, Any]:
    """Baseline XY resolution tags (pixels per cm): Fiji, ImageJ and Avizo show the right scale bar from
    them alone, for a single slice, a label image or an OME volume."""
    if not pixel_size_m:
        return {}
    return {"resolution": (0.01 / pixel_size_m,) * 2, "resolutionunit": "CENTIMETER"}


def _tiff_writer(
    array: np.ndarray, description: str, pixel_size_m: float | None
) -> Callable[[IO[bytes]], None]:
    def write(fh: IO[bytes]) -> None:
        tifffile.imwrite(
            fh,
            array,
            description=description,
            metadata=None,
            photometric="minisblack",
            **resolution_tags(pixel_size_m),
        )

    return write


def pixel_size(metadata: dict[str, Any]) -> float | None:
    value = metadata.get("pixel_size_m")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) and value > 0 else None


def estimate_slice_bytes(
    width: int, height: int, detectors: int, with_labels: bool, with_preview: bool = False
) -> int:
    """Disk one slice takes: uncompressed uint16 per detector, uint8 labels, RGB preview at worst."""
    px = width * height
    total = detectors * (2 * px + _TIFF_OVERHEAD) + _SLICE_JSON_BYTES
    if with_labels:
        total += px + _TIFF_OVERHEAD
    if with_preview:
        total += 3 * px + _TIFF_OVERHEAD
    return total


class RunStorage:
    def __init__(self, data_root: Path, run_id: str, *, create: bool) -> None:
        if not _RUN_ID.fullmatch(run_id):
            raise StorageError(f"run id {run_id!r} is not a safe folder name (letters, digits, . _ -)")
        self.run_id = run_id
        self.run_dir = Path(data_root) / run_id
        if create:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                raise StorageError(f"run directory {self.run_dir} already exists") from None
            for sub in (SLICES, PREVIEWS):
                (self.run_dir / sub).mkdir()
            fsync_dir(self.run_dir.parent)
        else:
            if not (self.run_dir / SLICES).is_dir():
                raise StorageError(f"no run directory at {self.run_dir}")
            (self.run_dir / PREVIEWS).mkdir(exist_ok=True)
            self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        """Temp files a SIGKILL left behind mid-write: never renamed, so never part of the run."""
        for folder in (self.run_dir, self.run_dir / SLICES, self.run_dir / PREVIEWS):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    # --- whole-run files -------------------------------------------------------------------------

    def write_recipe(self, text: str) -> str:
        path = self.run_dir / "recipe.toml"
        if path.exists():
            raise SliceExistsError(errno.EEXIST, "the recipe of a run is written once", str(path))
        self._write(path, _text_writer(text))
        return path.name

    def write_manifest(self, data: dict[str, Any]) -> str:
        """run.json is the one file rewritten during a run, always whole (atomic rename)."""
        path = self.run_dir / "run.json"
        self._write(path, _text_writer(_json_text(data, "run manifest")))
        return path.name

    def read_manifest(self) -> dict[str, Any]:
        return read_json(self.run_dir / "run.json")

    # --- slices ----------------------------------------------------------------------------------

    def slice_record_path(self, index: int) -> Path:
        return self.run_dir / SLICES / f"{index:04d}.json"

    def write_slice(
        self,
        index: int,
        images: dict[str, np.ndarray],
        metadata: dict[str, Any],
        labels: np.ndarray | None = None,
        summary: dict[str, Any] | None = None,
        *,
        preview: np.ndarray | None = None,
        replace: bool = False,
    ) -> dict[str, str]:
        """Write a slice's files, then its record. Returns {name: path relative to the run dir}, with
        names the detectors, "labels", "overlay" and "record".

        On any failure the files this call wrote are removed: a slice is either complete or absent.
        `replace=True` is for recovery only: it rewrites an incomplete slice, never a complete one."""
        shape = self._check_slice_inputs(index, images, labels, preview)
        metadata = _with_run_slice_index(metadata, index)
        meta_text = _json_text(metadata, f"metadata of slice {index}")  # validated before touching disk
        pixel_size_m = pixel_size(metadata)

        stem = f"{SLICES}/{index:04d}"
        plan: list[tuple[str, str, Callable[[IO[bytes]], object]]] = []
        needed = estimate_slice_bytes(
            shape[1], shape[0], len(images), labels is not None, preview is not None
        )
        for name, image in images.items():
            desc = _json_text(
                {**metadata, "detector": name, "slice_index": index, "run_id": self.run_id}, "", None
            )
            plan.append((name, f"{stem}_{name}.tif", _tiff_writer(image, desc, pixel_size_m)))
        if labels is not None:
            desc = _json_text({"kind": "labels", "slice_index": index, "run_id": self.run_id}, "", None)
            plan.append(("labels", f"{stem}_labels.tif", _tiff_writer(labels, desc, pixel_size_m)))
        if preview is not None:
            plan.append(("overlay", f"{PREVIEWS}/{index:04d}_overlay.png", _png_writer(preview)))
        files = {name: rel for name, rel, _ in plan}
        record = {
            "index": index,
            "run_id": self.run_id,
            "shape": list(shape),
            "files": files,
            "metadata": json.loads(meta_text),
            "summary": summary,
        }
        record_text = _json_text(record, f"summary of slice {index}")
        record_path = self.slice_record_path(index)

        if record_path.exists():
            raise SliceExistsError(
                errno.EEXIST, f"slice {index} is complete; it is never rewritten", str(record_path)
            )
        if not replace:
            for rel in files.values():
                if (self.run_dir / rel).exists():
                    raise SliceExistsError(
                        errno.EEXIST,
                        f"slice {index} has files already (pass replace=True to recover an incomplete slice)",
                        str(self.run_dir / rel),
                    )
        written: list[Path] = []
        try:
            # The slice's files are written in parallel (their fsyncs overlap), their folders synced
            # once, and only then the record that declares the slice complete.
            with ThreadPoolExecutor(max_workers=len(plan)) as pool:
                futures = [
                    pool.submit(self._write, self.run_dir / rel, writer, needed, sync_dir=False)
                    for _name, rel, writer in plan
                ]
                for (_name, rel, _w), future in zip(plan, futures, strict=True):
                    future.result()
                    written.append(self.run_dir / rel)
            for folder in {p.parent for p in written}:
                fsync_dir(folder)
            self._write(record_path, _text_writer(record_text), needed)
        except BaseException:
            for _name, rel, _w in plan:
                (self.run_dir / rel).unlink(missing_ok=True)
            raise
        return {**files, "record": record_path.relative_to(self.run_dir).as_posix()}

    def _check_slice_inputs(
        self,
        index: int,
        images: dict[str, np.ndarray],
        labels: np.ndarray | None,
        preview: np.ndarray | None,
    ) -> tuple[int, int]:
        if index < 0:
            raise ValueError(f"slice index must be >= 0, got {index}")
        if not images:
            raise ValueError(f"slice {index}: no images")
        shape: tuple[int, int] | None = None
        for name, image in images.items():
            if not _DETECTOR.fullmatch(name) or name in _RESERVED_NAMES:
                raise ValueError(f"slice {index}: detector name {name!r} is not a plain lower-case name")
            if image.dtype != np.uint16 or image.ndim != 2:
                raise ValueError(
                    f"slice {index}: image {name!r} must be 2-D uint16, got {image.ndim}-D {image.dtype}"
                )
            shape = shape or (int(image.shape[0]), int(image.shape[1]))
            if image.shape != shape:
                raise ValueError(f"slice {index}: image {name!r} is {image.shape}, the others {shape}")
        assert shape is not None
        if labels is not None and (labels.dtype != np.uint8 or labels.shape != shape):
            raise ValueError(
                f"slice {index}: labels must be uint8 {shape}, got {labels.dtype} {labels.shape}"
            )
        if preview is not None and (
            preview.dtype != np.uint8 or preview.shape[:2] != shape or preview.ndim != 3
        ):
            raise ValueError(
                f"slice {index}: preview must be uint8 {shape} x 3, got {preview.dtype} {preview.shape}"
            )
        return shape

    def segmentation_record_path(self, index: int) -> Path:
        return self.run_dir / SLICES / f"{index:04d}.segmentation.json"

    def write_segmentation(
        self, index: int, labels: np.ndarray, preview: np.ndarray | None, metrics: dict[str, Any]
    ) -> dict[str, str]:
        """The segmentation of a complete slice: label TIFF, overlay preview, then its record (last).

        Segmentation runs after the slice's images are safely on disk (and may overlap the next mill),
        so it gets its own record instead of rewriting the slice's."""
        if not self.slice_complete(index):
            raise StorageError(f"slice {index} has no complete images to segment")
        record_path = self.segmentation_record_path(index)
        if record_path.exists():
            raise SliceExistsError(errno.EEXIST, f"slice {index} is already segmented", str(record_path))
        if labels.dtype != np.uint8 or labels.ndim != 2:
            raise ValueError(f"labels must be 2-D uint8, got {labels.dtype} {labels.shape}")
        stem = f"{SLICES}/{index:04d}"
        desc = _json_text({"kind": "labels", "slice_index": index, "run_id": self.run_id}, "", None)
        slice_metadata = self.read_slice(index).get("metadata")
        pixel_size_m = pixel_size(slice_metadata) if isinstance(slice_metadata, dict) else None
        plan: list[tuple[str, str, Callable[[IO[bytes]], object]]] = [
            ("labels", f"{stem}_labels.tif", _tiff_writer(labels, desc, pixel_size_m))
        ]
        if preview is not None:
            plan.append(("overlay", f"{PREVIEWS}/{index:04d}_overlay.png", _png_writer(preview)))
        files = {name: rel for name, rel, _ in plan}
        record_text = _json_text(
            {"index": index, "files": files, "metrics": metrics}, f"metrics of slice {index}"
        )
        for _name, rel, writer in plan:
            self._write(self.run_dir / rel, writer)  # a rerun after a crash overwrites its own partial files
        self._write(record_path, _text_writer(record_text))
        return {**files, "record": record_path.relative_to(self.run_dir).as_posix()}

    def write_adapt(self, index: int, record: dict[str, Any]) -> str:
        """The adapt step's record of a slice (observation, decisions, next settings), beside the slice's
        own: decisions come after its images. A repeat of the step (after a suspension or a crash before
        its completion was journaled) writes the record it journals, atomically in place of the old one."""
        path = self.run_dir / SLICES / f"{index:04d}.adapt.json"
        self._write(path, _text_writer(_json_text(record, f"adaptation of slice {index}")))
        return path.relative_to(self.run_dir).as_posix()

    def segmentation_complete(self, index: int) -> bool:
        try:
            record = read_json(self.segmentation_record_path(index))
        except (OSError, ValueError):
            return False
        files = record.get("files")
        return isinstance(files, dict) and all((self.run_dir / str(rel)).is_file() for rel in files.values())

    def read_slice(self, index: int) -> dict[str, Any]:
        return read_json(self.slice_record_path(index))

    def slice_complete(self, index: int) -> bool:
        """The record exists and every file it names is on disk."""
        try:
            record = self.read_slice(index)
        except (OSError, ValueError):
            return False
        files = record.get("files")
        return isinstance(files, dict) and all((self.run_dir / str(rel)).is_file() for rel in files.values())

    def completed_slices(self) -> list[int]:
        indices = (slice_index(p) for p in (self.run_dir / SLICES).glob("*.json"))
        return sorted(i for i in indices if i is not None and self.slice_complete(i))

    # --- space -----------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.run_dir).free  # f_bavail: what this (non-root) user can write

    def ensure_space(self, needed_bytes: int, reserve_bytes: int) -> None:
        free = self.free_bytes()
        if free - needed_bytes < reserve_bytes:
            raise DiskFull(self.run_dir, needed_bytes, free, reserve_bytes)

    estimate_slice_bytes = staticmethod(estimate_slice_bytes)

    def _write(
        self, path: Path, writer: Callable[[IO[bytes]], object], needed: int = 0, *, sync_dir: bool = True
    ) -> None:
        """Atomic write; a full disk raises DiskFull (write_atomic has already removed its temp file)."""
        try:
            write_atomic(path, writer, sync_dir=sync_dir)
        except OSError as exc:
            if exc.errno in _NO_SPACE and not isinstance(exc, DiskFull):
                raise DiskFull(path, needed, self.free_bytes()) from exc
            raise


def _png_writer(rgb: np.ndarray) -> Callable[[IO[bytes]], None]:
    def write(fh: IO[bytes]) -> None:
        from PIL import Image  # scikit-image's dependency; only needed when previews are written

        Image.fromarray(rgb, mode="RGB").save(fh, format="PNG")

    return write


def _with_run_slice_index(metadata: dict[str, Any], index: int) -> dict[str, Any]:
    """`slice_index` in a slice's record and TIFFs is the run's 0-based index (the file name's number).
    The instrument counts the slices it has milled (1 after the first mill), which is a different number:
    it is kept, under its own name, so neither can be mistaken for the other."""
    out = dict(metadata)
    instrument_count = out.pop("slice_index", None)
    if instrument_count is not None and instrument_count != index:
        out["instrument_slices_milled"] = instrument_count
    out["slice_index"] = index
    return out


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def slice_index(path: Path) -> int | None:
    m = _SLICE_RECORD.fullmatch(path.name)
    return int(m.group(1)) if m else None
