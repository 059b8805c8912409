"""ilastik's HDF5 exports (labels, "Simple Segmentation", or the raw data it was given) as (Z, Y, X) arrays.

ilastik writes one dataset, by default "exported_data", whose axis order is in its "axistags" attribute
(vigra's JSON: {"axes": [{"key": "z", "resolution": ...}, ..., {"key": "c"}]}); the order follows the
project's input, so (z, y, x, c) and (y, x, c) are common and (t, z, y, x, c) occurs. A channel or time axis
of length 1 is dropped; more than one channel in a label export is a probability map, not labels, and is
refused. A file without axistags (written by another HDF5 tool) is read as (Z,) Y, X with an optional
trailing channel of length 1. Axistags with a resolution and a known unit give the pixel size.
h5py is imported here only, so `kintsugi train` on TIFF annotations does not need it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["HDF5_SUFFIXES", "ILASTIK_DATASET", "HDF5Error", "hdf5_pixel_size", "read_hdf5_stack"]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
ILASTIK_DATASET = "exported_data"  # ilastik's default internal path
_UNIT_M = {"m": 1.0, "cm": 1e-2, "mm": 1e-3, "um": 1e-6, "micron": 1e-6, "\u00b5m": 1e-6, "nm": 1e-9}


class HDF5Error(ValueError):
    """A problem with an HDF5 file; the message names it."""


def _dataset(path: Path, h5: Any) -> Any:
    import h5py  # type: ignore[import-untyped, unused-ignore]

    if ILASTIK_DATASET in h5 and isinstance(h5[ILASTIK_DATASET], h5py.Dataset):
        return h5[ILASTIK_DATASET]
    found: list[str] = []
    h5.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    if len(found) != 1:
        raise HDF5Error(
            f"{path}: no '{ILASTIK_DATASET}' dataset and {len(found)} others ({found[:5]}); "
            "export from ilastik with its default internal path"
        )
    return h5[found[0]]


def _axes(path: Path, ds: Any) -> tuple[list[str], list[dict[str, Any]]]:
    raw = ds.attrs.get("axistags")
    if raw is None:
        order = {2: "yx", 3: "zyx", 4: "zyxc"}.get(ds.ndim)
        if order is None or (ds.ndim == 4 and ds.shape[-1] != 1):
            raise HDF5Error(f"{path}: shape {ds.shape} without 'axistags'; expected (Z,) Y, X (, 1)")
        if ds.ndim == 3 and ds.shape[-1] == 1:
            order = "yxc"
        return list(order), [{} for _ in order]
    try:
        axes = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))["axes"]
        keys = [str(a["key"]).lower() for a in axes]
    except (ValueError, KeyError, TypeError) as exc:
        raise HDF5Error(f"{path}: unreadable 'axistags' attribute ({exc})") from exc
    if len(keys) != ds.ndim or len(set(keys)) != len(keys) or not {"y", "x"} <= set(keys):
        raise HDF5Error(f"{path}: axistags {keys} do not describe the dataset's shape {ds.shape}")
    unknown = set(keys) - set("tzyxc")
    if unknown:
        raise HDF5Error(f"{path}: axistags {keys} hold unknown axes {sorted(unknown)}")
    return keys, axes


def _pixel_size(axes: list[dict[str, Any]], keys: list[str]) -> float | None:
    tag = axes[keys.index("x")]
    res, unit = tag.get("resolution") or 0, str(tag.get("unit", "")).strip().lower()
    if isinstance(res, int | float) and res > 0 and unit in _UNIT_M:
        return float(res) * _UNIT_M[unit]
    return None


def _h5py(path: Path) -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise HDF5Error(
            f"{path}: reading HDF5 (ilastik) needs h5py: pip install 'kintsugi-daemon[train]'"
        ) from exc
    return h5py


def hdf5_pixel_size(path: Path) -> float | None:
    """The pixel size its axistags declare (resolution and unit of x), or None; reads no pixel data."""
    try:
        with _h5py(path).File(path, "r") as h5:
            ds = _dataset(path, h5)
            keys, axes = _axes(path, ds)
    except OSError as exc:
        raise HDF5Error(f"{path}: not a readable HDF5 file ({exc})") from exc
    return _pixel_size(axes, keys)


def read_hdf5_stack(path: Path, *, labels: bool) -> npt.NDArray[Any]:
    """The (Z, Y, X) array of an ilastik-style HDF5 file."""
    try:
        with _h5py(path).File(path, "r") as h5:
            ds = _dataset(path, h5)
            keys, _ = _axes(path, ds)
            arr = np.asarray(ds[()])
    except OSError as exc:
        raise HDF5Error(f"{path}: not a readable HDF5 file ({exc})") from exc
    for axis in ("c", "t"):
        if axis in keys:
            i = keys.index(axis)
            if arr.shape[i] != 1:
                what = "channels (a probability map, not labels?)" if axis == "c" else "time points"
                raise HDF5Error(
                    f"{path}: {arr.shape[i]} {what} along axis '{axis}'; export one"
                    + (" 'Simple Segmentation' or label image" if labels else " channel per detector")
                )
            arr = np.take(arr, 0, axis=i)
            keys.pop(i)
    if "z" not in keys:
        arr, keys = arr[None], ["z", *keys]
    return np.ascontiguousarray(np.transpose(arr, [keys.index(k) for k in "zyx"]))
