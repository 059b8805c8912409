"""The run directory (atomic, never rewritten, disk-full safe) and the OME-TIFF export."""

from __future__ import annotations

import errno
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import tifffile

from kintsugi_daemon.service import storage
from kintsugi_daemon.service.export import ExportError, ExportWarning, export_run
from kintsugi_daemon.service.storage import (
    DiskFull,
    RunStorage,
    SliceExistsError,
    StorageError,
)

H, W = 12, 16
PIXEL_M = 40e-9
THICKNESS_M = 30e-9
CLASSES = {"pore": 0, "unfilled_pore": 1, "active": 2, "cbd": 3, "collector": 4}


def images(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {d: rng.integers(0, 65535, (H, W), dtype=np.uint16) for d in ("cbs", "tld")}


def labels(i: int) -> np.ndarray:
    return np.full((H, W), i % 5, np.uint8)


def meta(i: int) -> dict[str, Any]:
    return {"pixel_size_m": PIXEL_M, "face_position_m": 1e-6 + THICKNESS_M * i, "dwell_s": 1e-7}


def temp_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.tmp"))


@pytest.fixture
def run(tmp_path: Path) -> RunStorage:
    st = RunStorage(tmp_path / "data", "run-1", create=True)
    st.write_recipe("[run]\nslices = 3 # as given\n")
    st.write_manifest({"run_id": "run-1", "detectors": ["cbs", "tld"], "classes": CLASSES})
    return st


def test_layout_and_metadata(run: RunStorage) -> None:
    paths = run.write_slice(0, images(0), meta(0), labels=labels(0), summary={"porosity": 0.07})
    assert paths == {
        "cbs": "slices/0000_cbs.tif",
        "tld": "slices/0000_tld.tif",
        "labels": "slices/0000_labels.tif",
        "record": "slices/0000.json",
    }
    assert (run.run_dir / "recipe.toml").read_text() == "[run]\nslices = 3 # as given\n"
    with tifffile.TiffFile(run.run_dir / paths["cbs"]) as tif:
        page = tif.pages.first
        assert page.dtype == np.uint16 and page.shape == (H, W)
        np.testing.assert_array_equal(page.asarray(), images(0)["cbs"])
        desc = json.loads(page.description)
        assert desc["detector"] == "cbs" and desc["slice_index"] == 0 and desc["pixel_size_m"] == PIXEL_M
    assert tifffile.imread(run.run_dir / paths["labels"]).dtype == np.uint8
    record = run.read_slice(0)
    assert record["summary"] == {"porosity": 0.07} and record["metadata"]["dwell_s"] == 1e-7
    assert run.slice_complete(0) and not run.slice_complete(1)
    assert run.completed_slices() == [0]
    assert temp_files(run.run_dir) == []


def test_preview_hook(run: RunStorage) -> None:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = 255
    paths = run.write_slice(0, images(0), meta(0), preview=rgb)
    assert paths["overlay"] == "previews/0000_overlay.png"
    assert (run.run_dir / paths["overlay"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run.run_dir / paths["overlay"]).unlink()
    assert not run.slice_complete(0)  # the record lists it, so it is part of the slice


def test_never_rewritten(run: RunStorage) -> None:
    run.write_slice(0, images(0), meta(0))
    with pytest.raises(SliceExistsError, match="slice 0 is complete"):
        run.write_slice(0, images(1), meta(0))
    with pytest.raises(SliceExistsError, match="slice 0 is complete"):
        run.write_slice(0, images(1), meta(0), replace=True)  # even for recovery
    np.testing.assert_array_equal(tifffile.imread(run.run_dir / "slices/0000_cbs.tif"), images(0)["cbs"])
    with pytest.raises(SliceExistsError, match="written once"):
        run.write_recipe("other")
    # An incomplete slice (files, no record: a crash mid-slice) needs an explicit replace.
    run.write_slice(1, images(1), meta(1))
    run.slice_record_path(1).unlink()
    with pytest.raises(SliceExistsError, match="replace=True"):
        run.write_slice(1, images(2), meta(1))
    run.write_slice(1, images(2), meta(1), replace=True)
    assert run.slice_complete(1)
    np.testing.assert_array_equal(tifffile.imread(run.run_dir / "slices/0001_tld.tif"), images(2)["tld"])
    with pytest.raises(StorageError, match="already exists"):
        RunStorage(run.run_dir.parent, run.run_id, create=True)


def test_bad_inputs_refused_before_any_write(run: RunStorage) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"images": {"cbs": np.zeros((H, W), np.float32)}}, "uint16"),
        (
            {"images": {"cbs": np.zeros((H, W), np.uint16), "tld": np.zeros((H, W + 1), np.uint16)}},
            "the others",
        ),
        ({"images": {"labels": np.zeros((H, W), np.uint16)}}, "detector name"),
        ({"images": {}}, "no images"),
        ({"labels": np.zeros((H, W), np.uint16)}, "labels must be uint8"),
        ({"metadata": {"x": math.nan}}, "NaN"),
    ]
    for kwargs, message in bad:
        args: dict[str, Any] = {"index": 0, "images": images(0), "metadata": meta(0), **kwargs}
        with pytest.raises(ValueError, match=message):
            run.write_slice(**args)
    assert list((run.run_dir / "slices").iterdir()) == []
    with pytest.raises(ValueError, match="NaN"):
        run.write_manifest({"x": math.inf})
    with pytest.raises(StorageError, match="safe folder name"):
        RunStorage(run.run_dir.parent, "../escape", create=True)
    with pytest.raises(StorageError, match="no run directory"):
        RunStorage(run.run_dir.parent, "missing", create=False)


def test_ensure_space(run: RunStorage) -> None:
    free = run.free_bytes()
    assert free > 0
    run.ensure_space(1, 0)
    with pytest.raises(DiskFull) as info:
        run.ensure_space(free * 4, 1 << 20)
    assert info.value.errno == errno.ENOSPC
    assert info.value.needed == free * 4 and info.value.reserve == 1 << 20 and info.value.free > 0
    assert "MB needed" in str(info.value)
    one = run.estimate_slice_bytes(1024, 768, 2, True)
    assert 1024 * 768 * 5 < one < 1024 * 768 * 5 + 200_000
    assert storage.estimate_slice_bytes(1024, 768, 2, True, with_preview=True) > one


def test_enospc_mid_slice_leaves_no_partial_file(run: RunStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    run.write_slice(0, images(0), meta(0), labels=labels(0))
    before = {p: p.read_bytes() for p in (run.run_dir / "slices").iterdir()}
    real_imwrite = tifffile.imwrite
    calls = 0

    def imwrite_then_disk_full(fh: IO[bytes], *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second detector of the slice: half a TIFF, then no space
            fh.write(b"II*\x00" + b"\x00" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_imwrite(fh, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", imwrite_then_disk_full)
    with pytest.raises(DiskFull) as info:
        run.write_slice(1, images(1), meta(1), labels=labels(1))
    assert info.value.needed > 0 and isinstance(info.value.__cause__, OSError)
    # Nothing of slice 1 remains, slice 0 is byte-identical, no temp file anywhere.
    assert {p: p.read_bytes() for p in (run.run_dir / "slices").iterdir()} == before
    assert temp_files(run.run_dir) == []
    assert not run.slice_complete(1) and run.slice_complete(0)
    monkeypatch.undo()  # space freed: the same slice now goes through
    run.write_slice(1, images(1), meta(1), labels=labels(1))
    assert run.completed_slices() == [0, 1]


def test_reopen_removes_stale_temp_files(run: RunStorage) -> None:
    stale = run.run_dir / "slices" / ".0003_cbs.tif.abc123.tmp"
    stale.write_bytes(b"torn")
    reopened = RunStorage(run.run_dir.parent, run.run_id, create=False)
    assert not stale.exists() and reopened.run_dir == run.run_dir


def _pixels_per_cm(path: Path) -> tuple[float, float, int]:
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages.first.tags
        x, y = (tags[name].value for name in ("XResolution", "YResolution"))
        return x[0] / x[1], y[0] / y[1], int(tags["ResolutionUnit"].value)


def test_labels_and_ome_exports_carry_resolution_tags(run: RunStorage, tmp_path: Path) -> None:
    """Fiji shows a scale bar for a label TIFF or an OME volume from the baseline tags alone."""
    expected = 0.01 / PIXEL_M
    for i in range(2):
        run.write_slice(i, images(i), meta(i))
        paths = run.write_segmentation(i, labels(i), None, {"porosity": 0.1})  # the daemon's path
        x, y, unit = _pixels_per_cm(run.run_dir / paths["labels"])
        assert x == pytest.approx(expected) and y == pytest.approx(expected) and unit == 3  # 3 = cm
    for path in export_run(run.run_dir, tmp_path / "vol"):
        x, y, unit = _pixels_per_cm(path)
        assert x == pytest.approx(expected) and y == pytest.approx(expected) and unit == 3, path.name


def test_slice_index_is_the_run_index_in_record_and_tiff(run: RunStorage) -> None:
    """The instrument's milled-slice count (1 after the first mill) must not pass as the slice index."""
    paths = run.write_slice(0, images(0), {**meta(0), "slice_index": 1})
    record = run.read_slice(0)
    with tifffile.TiffFile(run.run_dir / paths["cbs"]) as tif:
        desc = json.loads(tif.pages.first.description)
    assert record["index"] == record["metadata"]["slice_index"] == desc["slice_index"] == 0
    assert record["metadata"]["instrument_slices_milled"] == desc["instrument_slices_milled"] == 1


def _write_run(run: RunStorage, n: int) -> None:
    for i in range(n):
        run.write_slice(i, images(i), meta(i), labels=labels(i), summary={"i": i})


def test_export_round_trip(run: RunStorage, tmp_path: Path) -> None:
    _write_run(run, 4)
    messages: list[str] = []
    paths = export_run(run.run_dir, tmp_path / "vol", progress=messages.append)
    assert [p.name for p in paths] == ["run-1_cbs.ome.tif", "run-1_tld.ome.tif", "run-1_labels.ome.tif"]
    assert any("4/4" in m for m in messages)
    assert temp_files(tmp_path / "vol") == []
    for path, detector in zip(paths, ["cbs", "tld", "labels"], strict=True):
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            series = tif.series[0]
            assert series.axes == "ZYX" and series.shape == (4, H, W)
            assert series.dtype == (np.uint8 if detector == "labels" else np.uint16)
            volume = series.asarray()
            ome = tif.ome_metadata
        expected = labels(2) if detector == "labels" else images(2)[detector]
        np.testing.assert_array_equal(volume[2], expected)
        assert ome is not None
        assert 'PhysicalSizeX="0.04"' in ome and 'PhysicalSizeXUnit="µm"' in ome
        assert 'PhysicalSizeZ="0.03"' in ome and 'PhysicalSizeZUnit="µm"' in ome
        assert f'Name="{detector}"' in ome
        assert 'PositionZ="1.09"' in ome  # slice 3: 1 µm + 3 x 30 nm
    labels_ome = tifffile.TiffFile(paths[2]).ome_metadata
    assert labels_ome is not None and '<M K="unfilled_pore">1</M>' in labels_ome


def test_export_skips_incomplete_slices(run: RunStorage, tmp_path: Path) -> None:
    _write_run(run, 4)
    run.slice_record_path(1).unlink()  # a crash before the record: incomplete, not even listed
    (run.run_dir / "slices/0002_tld.tif").write_bytes(b"not a tiff")  # corrupted by hand
    with pytest.warns(ExportWarning) as caught:
        paths = export_run(run.run_dir, tmp_path / "vol")
    reasons = sorted(str(w.message) for w in caught)
    assert reasons[0].startswith("slice 1 left out: incomplete (files without a record)")
    assert reasons[1].startswith("slice 2 left out: incomplete or unreadable")
    with tifffile.TiffFile(paths[0]) as tif:
        assert tif.series[0].shape == (2, H, W)  # slices 0 and 3
        np.testing.assert_array_equal(tif.series[0].asarray()[1], images(3)["cbs"])
        ome = tif.ome_metadata
    assert ome is not None and 'PhysicalSizeZ="0.09"' in ome  # mean spacing of the planes kept


def test_export_without_positions_uses_manifest_thickness(tmp_path: Path) -> None:
    st = RunStorage(tmp_path, "r", create=True)
    st.write_manifest({"slice_thickness_m": 5e-8, "pixel_size_m": 2e-8})
    for i in range(2):
        st.write_slice(i, {"se": np.zeros((4, 4), np.uint16)}, {})
    (path,) = export_run(st.run_dir)
    assert path.parent == st.run_dir / "export"
    ome = tifffile.TiffFile(path).ome_metadata
    assert ome is not None and 'PhysicalSizeZ="0.05"' in ome and 'PhysicalSizeX="0.02"' in ome


def test_export_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no run directory"):
        export_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"no run\.json"):
        export_run(tmp_path / "empty")
    st = RunStorage(tmp_path, "r", create=True)
    (st.run_dir / "run.json").write_text("{ torn")
    with pytest.raises(ExportError, match="corrupt"):
        export_run(st.run_dir)
    st.write_manifest({})
    with pytest.raises(ExportError, match="no complete slice"):
        export_run(st.run_dir)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kintsugi_daemon.cli", "export", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_export_cli(run: RunStorage, tmp_path: Path) -> None:
    _write_run(run, 3)
    run.slice_record_path(1).unlink()
    (run.run_dir / "slices/0001.json").write_text("{}")  # a record naming no files: left out
    out = tmp_path / "cli-out"
    proc = _cli(str(run.run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    written = [Path(line) for line in proc.stdout.splitlines()]
    assert [p.name for p in written] == ["run-1_cbs.ome.tif", "run-1_tld.ome.tif", "run-1_labels.ome.tif"]
    assert all(p.is_file() and p.parent == out for p in written)
    assert "cbs: 2/2 slices" in proc.stderr and "warning: slice 1 left out" in proc.stderr
    assert tifffile.TiffFile(written[0]).series[0].shape == (2, H, W)

    missing = _cli(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no run directory" in missing.stderr and missing.stdout == ""
