"""Real annotations for `kintsugi train`: Avizo / napari / Fiji / ilastik label TIFFs with a mapping file,
clear errors naming the file, nothing written on bad input, and `--init builtin` fine-tuning."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from kintsugi_daemon import cli
from kintsugi_daemon.inference.contract import SHIPPED_MODEL, load_model
from kintsugi_daemon.inference.training.annotations import (
    AnnotationError,
    load_annotations,
    load_training_data,
)
from kintsugi_daemon.inference.training.data import IGNORE, TRAIN_CLASSES

CHANNELS = ("cbs", "tld")
PIXEL = 4.05e-8
MAPPING = """
format = "{fmt}"
labels = "{labels}"
[images]
cbs = "cbs.tif"
tld = "tld.tif"
[classes]
{classes}
"""


def _images(folder: Path, shape: tuple[int, ...], *, resolution: bool = True) -> None:
    rng = np.random.default_rng(0)
    kw: dict[str, Any] = (
        {"resolution": (0.01 / PIXEL,) * 2, "resolutionunit": "CENTIMETER"} if resolution else {}
    )
    for name in CHANNELS:
        tifffile.imwrite(folder / f"{name}.tif", rng.integers(0, 65535, shape, dtype=np.uint16), **kw)


def _write(folder: Path, fmt: str, labels: np.ndarray, classes: str, **kw: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "labels.tif", labels, **kw)
    (folder / "annotations.toml").write_text(MAPPING.format(fmt=fmt, labels="labels.tif", classes=classes))
    return folder


def test_napari_stack_skips_unannotated_planes_and_maps_values(tmp_path: Path) -> None:
    labels = np.zeros((3, 40, 50), np.uint8)  # napari: 0 = not annotated
    labels[0, :20] = 1
    labels[0, 20:] = 7
    labels[2, 5:10, 5:10] = 3
    folder = _write(
        tmp_path / "napari", "napari", labels, '0 = "ignore"\n1 = "active"\n3 = "pore"\n7 = "cbd"'
    )
    _images(folder, (3, 40, 50))
    slices, info = load_annotations(folder, CHANNELS, TRAIN_CLASSES)
    assert [s.source.rsplit("#", 1)[1] for s in slices] == ["0", "2"]  # plane 1 carries no annotation
    first = slices[0].labels
    assert np.all(first[:20] == TRAIN_CLASSES.index("active")) and np.all(
        first[20:] == TRAIN_CLASSES.index("cbd")
    )
    assert np.all(slices[1].labels[:5] == IGNORE) and np.all(slices[1].labels[5:10, 5:10] == 0)
    assert slices[0].image.shape == (2, 40, 50) and slices[0].image.min() >= 0 and slices[0].image.max() <= 1
    assert info.pixel_size_m == pytest.approx(PIXEL, rel=1e-3) and info.kind == "annotations (napari)"


def test_avizo_exterior_is_a_real_label_and_ilastik_channel_axis_is_dropped(tmp_path: Path) -> None:
    avizo = _write(
        tmp_path / "avizo", "avizo", np.full((1, 30, 30), 0, np.uint8), '0 = "collector"'
    )  # Avizo's 0 is the "Exterior" material: here mapped to a class
    _images(avizo, (1, 30, 30))
    (s,), _ = load_annotations(avizo, CHANNELS, TRAIN_CLASSES)
    assert np.all(s.labels == TRAIN_CLASSES.index("collector"))
    ilastik = _write(
        tmp_path / "ilastik", "ilastik", np.full((2, 30, 30, 1), 2, np.uint8), '1 = "pore"\n2 = "cbd"'
    )
    _images(ilastik, (2, 30, 30))
    got, _ = load_annotations(ilastik, CHANNELS, TRAIN_CLASSES)
    assert len(got) == 2 and got[0].labels.shape == (30, 30)


def test_fiji_pixel_size_from_imagej_metadata(tmp_path: Path) -> None:
    labels = np.ones((1, 30, 30), np.uint8)
    folder = _write(
        tmp_path / "fiji",
        "fiji",
        labels,
        '1 = "active"',
        imagej=True,
        resolution=(1 / 0.0405, 1 / 0.0405),
        metadata={"unit": "micron"},
    )
    _images(folder, (1, 30, 30))
    _, info = load_annotations(folder, CHANNELS, TRAIN_CLASSES)
    assert info.pixel_size_m == pytest.approx(PIXEL, rel=1e-3)


def test_bad_annotations_name_the_file_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = np.ones((1, 30, 30), np.uint8)
    labels[0, 0, 0] = 9
    unmapped = _write(tmp_path / "unmapped", "napari", labels, '0 = "ignore"\n1 = "active"')
    _images(unmapped, (1, 30, 30))
    with pytest.raises(AnnotationError, match=r"labels\.tif: label value\(s\) \[9\] are not in the mapping"):
        load_annotations(unmapped, CHANNELS, TRAIN_CLASSES)

    small = _write(tmp_path / "size", "napari", np.ones((1, 30, 30), np.uint8), '1 = "active"')
    _images(small, (1, 30, 31))
    with pytest.raises(AnnotationError, match=r"cbs\.tif: detector cbs has shape \(1, 30, 31\)"):
        load_annotations(small, CHANNELS, TRAIN_CLASSES)

    other = _write(
        tmp_path / "pixel",
        "napari",
        np.ones((1, 30, 30), np.uint8),
        '1 = "active"',
        resolution=(0.01 / 8e-8,) * 2,
        resolutionunit="CENTIMETER",
    )
    _images(other, (1, 30, 30))
    with pytest.raises(AnnotationError, match=r"cbs\.tif: pixel size 40\.50 nm differs from 80\.00 nm"):
        load_annotations(other, CHANNELS, TRAIN_CLASSES)

    bad_class = _write(tmp_path / "klass", "napari", np.ones((1, 30, 30), np.uint8), '1 = "particle"')
    with pytest.raises(AnnotationError, match=r"annotations\.toml: classes\.1 = 'particle'"):
        load_annotations(bad_class, CHANNELS, TRAIN_CLASSES)
    with pytest.raises(AnnotationError, match="neither a dataset folder"):
        load_training_data(tmp_path / "nothing", CHANNELS, TRAIN_CLASSES)

    # the CLI reports it as a usage error and no model file appears
    out = tmp_path / "model.onnx"
    if importlib.util.find_spec("torch") is not None:
        assert cli.main(["train", str(unmapped), "--out", str(out), "--epochs", "1"]) != 0
        assert "labels.tif" in capsys.readouterr().err
        assert not out.exists()


def test_init_builtin_fine_tunes_the_shipped_model(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from kintsugi_daemon.inference.training import TrainConfig, train

    labels = np.zeros((2, 96, 96), np.uint8)
    labels[:, :48] = 2
    labels[:, 48:] = 3
    folder = _write(tmp_path / "ann", "napari", labels, '2 = "active"\n3 = "cbd"')
    _images(folder, (2, 96, 96))
    out = tmp_path / "tuned.onnx"
    cfg = TrainConfig(
        data=[folder],
        out=out,
        init=SHIPPED_MODEL,
        epochs=1,
        steps_per_epoch=2,
        batch_size=2,
        crop_px=64,
        val_fraction=0.25,
        threads=1,
        tile=512,
    )
    result = train(cfg, log=lambda _: None)
    tuned, shipped = load_model(out, threads=1), load_model(SHIPPED_MODEL, threads=1)
    assert tuned.spec.normalisation == shipped.spec.normalisation  # the shipped model's input scaling
    assert tuned.spec.training["initialised_from"] == SHIPPED_MODEL.name
    assert result.metadata["architecture"]["initialised_from"] == SHIPPED_MODEL.name
    assert tuned.spec.training["data"][0]["kind"] == "annotations (napari)"
    # grey statistics: the annotated classes' from the new data, the others kept from the shipped model
    tuned_stats, shipped_stats = tuned.spec.grey_statistics or {}, shipped.spec.grey_statistics or {}
    assert tuned_stats["pore"] == shipped_stats["pore"]
    assert tuned_stats["active"].pixels < shipped_stats["active"].pixels
    assert tuned_stats["active"].mean == pytest.approx([0.5, 0.5], abs=0.02)  # uniform noise images


# ------------------------------------------------------------------------------------ ilastik HDF5
def _axistags(keys: str, resolution: float = 0.0, unit: str = "") -> str:
    """The "axistags" attribute as ilastik (vigra's AxisTags.toJSON) writes it."""
    flags = {"t": 8, "z": 2, "y": 2, "x": 2, "c": 1}
    return json.dumps(
        {
            "axes": [
                {
                    "key": k,
                    "typeFlags": flags[k],
                    "resolution": resolution if k in "xy" else 0,
                    "description": "",
                }
                | ({"unit": unit} if unit and k in "xy" else {})
                for k in keys
            ]
        }
    )


def _h5(path: Path, data: np.ndarray, keys: str | None, **tags: Any) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("exported_data", data=data, compression="gzip")
        if keys is not None:
            ds.attrs["axistags"] = _axistags(keys, **tags)


def _ilastik(folder: Path, labels: str, images: str = "tif", classes: str = '1 = "pore"\n2 = "cbd"') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "annotations.toml").write_text(
        f'format = "ilastik"\nlabels = "{labels}"\n[images]\ncbs = "cbs.{images}"\ntld = "tld.{images}"\n'
        f"[classes]\n{classes}\n"
    )
    return folder


def test_ilastik_hdf5_export_in_its_axis_orders(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    # (z, y, x, c): a 3-D project's Simple Segmentation export, classes numbered from 1
    seg = np.ones((2, 30, 40, 1), np.uint8)
    seg[1, :, 20:] = 2
    a = _ilastik(tmp_path / "zyxc", "seg.h5")
    _h5(a / "seg.h5", seg, "zyxc")
    _images(a, (2, 30, 40))
    got, info = load_annotations(a, CHANNELS, TRAIN_CLASSES)
    assert [s.labels.shape for s in got] == [(30, 40), (30, 40)]
    assert np.all(got[0].labels == TRAIN_CLASSES.index("pore"))
    assert np.all(got[1].labels[:, 20:] == TRAIN_CLASSES.index("cbd"))
    assert info.kind == "annotations (ilastik)" and info.pixel_size_m == pytest.approx(PIXEL, rel=1e-3)

    # (y, x, c) labels of one slice, the raw data as ilastik HDF5 too, in (c, y, x) order; the pixel size
    # from the axistags (resolution + unit)
    b = _ilastik(tmp_path / "yxc", "labels.h5", images="h5", classes='0 = "ignore"\n1 = "active"')
    lab = np.zeros((30, 40, 1), np.uint8)
    lab[5:25, 5:35] = 1
    _h5(b / "labels.h5", lab, "yxc", resolution=40.5, unit="nm")
    rng = np.random.default_rng(1)
    for det in CHANNELS:
        _h5(
            b / f"{det}.h5",
            rng.integers(0, 65535, (1, 30, 40), dtype=np.uint16),
            "cyx",
            resolution=40.5,
            unit="nm",
        )
    (s,), info = load_annotations(b, CHANNELS, TRAIN_CLASSES)
    assert s.image.shape == (2, 30, 40) and s.labels[0, 0] == IGNORE
    assert np.all(s.labels[5:25, 5:35] == TRAIN_CLASSES.index("active"))
    assert info.pixel_size_m == pytest.approx(PIXEL, rel=1e-6)

    # without axistags (another HDF5 writer): (Z, Y, X)
    c = _ilastik(tmp_path / "plain", "seg.h5")
    _h5(c / "seg.h5", seg[..., 0], None)
    _images(c, (2, 30, 40))
    assert len(load_annotations(c, CHANNELS, TRAIN_CLASSES)[0]) == 2


def test_bad_ilastik_hdf5_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("h5py")
    seg = np.ones((1, 30, 40, 1), np.uint8)
    seg[0, 0, 0] = 7
    unmapped = _ilastik(tmp_path / "unmapped", "seg.h5")
    _h5(unmapped / "seg.h5", seg, "zyxc")
    _images(unmapped, (1, 30, 40))
    with pytest.raises(AnnotationError, match=r"seg\.h5: label value\(s\) \[7\] are not in the mapping"):
        load_annotations(unmapped, CHANNELS, TRAIN_CLASSES)

    size = _ilastik(tmp_path / "size", "seg.h5")
    _h5(size / "seg.h5", np.ones((1, 30, 40, 1), np.uint8), "zyxc")
    _images(size, (1, 30, 41))
    with pytest.raises(AnnotationError, match=r"cbs\.tif: detector cbs has shape \(1, 30, 41\)"):
        load_annotations(size, CHANNELS, TRAIN_CLASSES)

    pixel = _ilastik(tmp_path / "pixel", "seg.h5")
    _h5(pixel / "seg.h5", np.ones((1, 30, 40, 1), np.uint8), "zyxc", resolution=80.0, unit="nm")
    _images(pixel, (1, 30, 40))  # TIFFs at 40.5 nm
    with pytest.raises(AnnotationError, match=r"cbs\.tif: pixel size 40\.50 nm differs from 80\.00 nm"):
        load_annotations(pixel, CHANNELS, TRAIN_CLASSES)

    probs = _ilastik(tmp_path / "probs", "probs.h5")
    _h5(probs / "probs.h5", np.zeros((1, 30, 40, 3), np.float32), "zyxc")
    _images(probs, (1, 30, 40))
    with pytest.raises(AnnotationError, match=r"probs\.h5: 3 channels \(a probability map"):
        load_annotations(probs, CHANNELS, TRAIN_CLASSES)

    broken = _ilastik(tmp_path / "broken", "seg.h5")
    (broken / "seg.h5").write_bytes(b"not hdf5")
    with pytest.raises(AnnotationError, match=r"seg\.h5: not a readable HDF5 file"):
        load_annotations(broken, CHANNELS, TRAIN_CLASSES)

    # `kintsugi train` stops with the file's name and writes no model
    out = tmp_path / "model.onnx"
    if importlib.util.find_spec("torch") is not None:
        assert cli.main(["train", str(unmapped), "--out", str(out), "--epochs", "1"]) != 0
        assert "seg.h5" in capsys.readouterr().err
        assert not out.exists()
