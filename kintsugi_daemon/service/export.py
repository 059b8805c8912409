"""`kintsugi export`: a run directory's complete slices as one OME-TIFF volume per detector (and labels),
streamed plane by plane, with the voxel size from the slices' metadata. Slices that are incomplete or
unreadable are left out with an `ExportWarning`; the run directory is only read."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile

from kintsugi_daemon.service.atomic import write_atomic
from kintsugi_daemon.service.storage import (
    SLICES,
    pixel_size,
    read_json,
    resolution_tags,
    slice_index,
)

__all__ = ["ExportError", "ExportWarning", "export_run"]

SLICE_FILE = re.compile(r"(\d{4,})_[a-z0-9_]+\.tif")


class ExportError(ValueError):
    """The folder is not an exportable run (missing, corrupt manifest, no complete slice)."""


class ExportWarning(UserWarning):
    """A slice left out of the export, or a voxel size that could not be determined."""


@dataclass(frozen=True)
class _Plane:
    index: int
    files: dict[str, Path]
    metadata: dict[str, Any]


def export_run(
    run_dir: Path, out_dir: Path | None = None, progress: Callable[[str], None] | None = None
) -> list[Path]:
    """One OME-TIFF volume (ZYX) per detector and one for the labels, with voxel sizes in µm.

    Incomplete or unreadable slices are left out with an ExportWarning. Volumes are streamed plane by
    plane, so a run of hundreds of slices exports in constant memory; each is written atomically."""
    say = progress or (lambda _msg: None)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"no run directory at {run_dir}")
    try:
        manifest = read_json(run_dir / "run.json")
    except FileNotFoundError:
        raise ExportError(f"{run_dir} has no run.json: not a kintsugi run directory") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{run_dir / 'run.json'} is unreadable or corrupt: {exc}") from None
    run_id = str(manifest.get("run_id") or run_dir.name)

    planes = _usable_planes(run_dir, manifest)
    if not planes:
        raise ExportError(f"{run_dir} has no complete slice to export")
    detectors = [n for n in planes[0].files if n != "labels"]
    with_labels = "labels" in planes[0].files
    ome = _ome_metadata(planes, manifest)
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    for channel in [*detectors, *(["labels"] if with_labels else [])]:
        path = out / f"{run_id}_{channel}.ome.tif"
        meta = {**ome, "Name": f"{run_id} {channel}", "Channel": {"Name": [channel]}}
        if channel == "labels" and isinstance(classes := manifest.get("classes"), dict):
            meta["MapAnnotation"] = {
                "Namespace": "kintsugi/classes",
                **{str(k): str(v) for k, v in classes.items()},
            }
        say(f"{channel}: writing {path}")
        write_atomic(path, _volume_writer(planes, channel, meta, say))
        written.append(path)
    return written


def _usable_planes(run_dir: Path, manifest: dict[str, Any]) -> list[_Plane]:
    """Complete, readable slices with the same detectors and shape as the first one."""
    records = sorted((i, p) for p in (run_dir / SLICES).glob("*.json") if (i := slice_index(p)) is not None)
    recorded = {i for i, _ in records}
    orphans = {
        int(m.group(1)) for p in (run_dir / SLICES).glob("*.tif") if (m := SLICE_FILE.fullmatch(p.name))
    }
    for index in sorted(orphans - recorded):
        warnings.warn(
            f"slice {index} left out: incomplete (files without a record)", ExportWarning, stacklevel=3
        )
    planes: list[_Plane] = []
    expected: tuple[frozenset[str], tuple[int, ...]] | None = None
    wanted = manifest.get("detectors")
    for index, record_path in records:
        try:
            record = read_json(record_path)
            files = {str(k): run_dir / str(v) for k, v in record["files"].items() if k != "overlay"}
            seg_path = record_path.with_name(f"{index:04d}.segmentation.json")
            if seg_path.is_file():  # labels written by the segment step after the slice's images
                seg = read_json(seg_path)
                files |= {str(k): run_dir / str(v) for k, v in seg["files"].items() if k == "labels"}
            for name, path in files.items():
                with tifffile.TiffFile(path) as tif:
                    page = tif.pages.first
                    want = np.uint8 if name == "labels" else np.uint16
                    if page.dtype != want or len(page.shape) != 2:
                        raise ValueError(
                            f"{path.name} is {page.dtype} {page.shape}, not 2-D {np.dtype(want)}"
                        )
                    shape = tuple(page.shape)
        except (OSError, ValueError, KeyError, AttributeError, tifffile.TiffFileError) as exc:
            warnings.warn(
                f"slice {index} left out: incomplete or unreadable ({exc})", ExportWarning, stacklevel=3
            )
            continue
        key = (frozenset(files), shape)
        if expected is None:
            if isinstance(wanted, list) and not set(map(str, wanted)) <= key[0]:
                warnings.warn(
                    f"slice {index} left out: lacks detectors {wanted}", ExportWarning, stacklevel=3
                )
                continue
            expected = key
        elif key != expected:
            warnings.warn(
                f"slice {index} left out: files {sorted(key[0])} of shape {shape} differ from the first "
                f"slice's {sorted(expected[0])} {expected[1]}",
                ExportWarning,
                stacklevel=3,
            )
            continue
        metadata = record.get("metadata")
        planes.append(_Plane(index, files, metadata if isinstance(metadata, dict) else {}))
    return planes


def _um(metres: float) -> float:
    return float(f"{metres * 1e6:.12g}")  # 0.04, not 0.04000000000000001, in the OME-XML


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) and value > 0 else None


def _ome_metadata(planes: list[_Plane], manifest: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"axes": "ZYX"}
    pixel_m = _positive(planes[0].metadata.get("pixel_size_m")) or _positive(manifest.get("pixel_size_m"))
    if pixel_m is None:
        warnings.warn(
            "no pixel_size_m in the slices or run.json: volume has no XY scale", ExportWarning, stacklevel=3
        )
    else:
        for axis in "XY":
            meta[f"PhysicalSize{axis}"] = _um(pixel_m)
            meta[f"PhysicalSize{axis}Unit"] = "µm"
    # Z: the measured face positions are the truth (adaptive runs vary the thickness); OME has one
    # PhysicalSizeZ, so it gets their mean spacing and every plane keeps its own PositionZ.
    positions = [p.metadata.get("face_position_m") for p in planes]
    z_m: float | None = None
    if all(isinstance(z, int | float) and math.isfinite(z) for z in positions):
        zs = [float(z) for z in positions]  # type: ignore[arg-type]
        meta["Plane"] = {"PositionZ": [_um(z) for z in zs], "PositionZUnit": ["µm"] * len(zs)}
        if len(zs) > 1:
            z_m = _positive((zs[-1] - zs[0]) / (len(zs) - 1))
    z_m = (
        z_m
        or _positive(manifest.get("slice_thickness_m"))
        or _positive(planes[0].metadata.get("slice_thickness_m"))
    )
    if z_m is None:
        warnings.warn(
            "no slice thickness or face positions: volume has no Z scale", ExportWarning, stacklevel=3
        )
    else:
        meta["PhysicalSizeZ"] = _um(z_m)
        meta["PhysicalSizeZUnit"] = "µm"
    return meta


def _volume_writer(
    planes: list[_Plane], channel: str, metadata: dict[str, Any], say: Callable[[str], None]
) -> Callable[[IO[bytes]], None]:
    dtype = np.uint8 if channel == "labels" else np.uint16
    with tifffile.TiffFile(planes[0].files[channel]) as tif:
        height, width = tif.pages.first.shape

    def stream() -> Iterator[np.ndarray]:
        every = max(1, len(planes) // 10)  # about ten progress lines per volume
        for n, plane in enumerate(planes, 1):
            yield tifffile.imread(plane.files[channel])
            if n % every == 0 or n == len(planes):
                say(f"{channel}: {n}/{len(planes)} slices")

    pixel_size_m = pixel_size(planes[0].metadata)

    def write(fh: IO[bytes]) -> None:
        nbytes = len(planes) * height * width * np.dtype(dtype).itemsize
        tifffile.imwrite(
            fh,
            stream(),
            shape=(len(planes), height, width),
            dtype=dtype,
            ome=True,
            photometric="minisblack",
            metadata=metadata,
            bigtiff=nbytes > 2**32 - 2**26,  # classic TIFF offsets stop at 4 GiB
            **resolution_tags(pixel_size_m),  # readers that ignore the OME-XML still get the scale
        )

    return write
