"""The shipped model (no torch needed: CI runs these) and the training/export path (torch: skipped without).

- The shipped ONNX model carries the DESIGN.md contract and segments a freshly simulated slice it never saw.
- A tiny training run exports a valid ONNX with the metadata; onnxruntime and torch agree on it; training is
  deterministic and resumes from its checkpoint; int8 quantisation is kept or dropped by the IoU rule.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]
import pytest
import tifffile

from kintsugi_daemon import cli
from kintsugi_daemon.inference.contract import CANONICAL_CLASSES, SHIPPED_MODEL, load_model
from kintsugi_daemon.inference.metrics import MEAN_IOU_CLASSES, iou_per_class, mean_iou
from kintsugi_daemon.inference.tiling import segment
from simulator.dataset import export_dataset

CLASS_ORDER = ["pore", "unfilled_pore", "active", "cbd", "collector"]


def _meta(path: Path) -> dict[str, Any]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = sess.get_modelmeta().custom_metadata_map
    return {k.removeprefix("kintsugi."): json.loads(v) for k, v in props.items() if k.startswith("kintsugi.")}


def _check_contract(path: Path) -> dict[str, Any]:
    meta = _meta(path)
    assert meta["classes"] == CLASS_ORDER
    assert meta["channels"] == ["cbs", "tld"]
    assert len(meta["normalisation"]) == 2 and all(n["std"] > 0 for n in meta["normalisation"])
    assert meta["pixel_size_m"] == pytest.approx(4.05e-8)
    assert meta["layout"] == "NCHW"
    assert meta["stride"] >= 1 and meta["tile"] % meta["stride"] == 0
    assert meta["halo"] % meta["stride"] == 0 and meta["tile"] > 2 * meta["halo"]
    assert meta["version"] == "1.0.0"
    for key in ("data", "seeds", "presets", "epochs", "loss", "date", "per_class_iou"):
        assert key in meta["training"], key
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.type == "tensor(float)" and inp.shape[1] == 2 and out.shape[1] == 5
    assert all(isinstance(d, str) for d in (inp.shape[0], inp.shape[2], inp.shape[3])), "dynamic N/H/W axes"
    if importlib.util.find_spec("onnx") is not None:
        import onnx  # type: ignore[import-not-found, unused-ignore]

        proto = onnx.load(str(path))
        opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        assert opset <= 17
    return meta


def _simulated(tmp: Path, cache: Path, *, seed: int, preset: str, w: int, h: int, slices: int = 1) -> Path:
    export_dataset(tmp, slices=slices, seed=seed, preset=preset, width_px=w, height_px=h, cache_dir=cache)
    return tmp


# ------------------------------------------------------------------------------ shipped model, no torch
def test_shipped_model_meets_the_contract() -> None:
    assert SHIPPED_MODEL.is_file(), "the shipped model is part of the package"
    assert SHIPPED_MODEL.stat().st_size < 10e6
    meta = _check_contract(SHIPPED_MODEL)
    assert meta["training"]["presets"] and meta["training"]["seeds"]
    model = load_model(SHIPPED_MODEL, threads=1)  # the daemon's own loader accepts it
    assert model.spec.classes == CLASS_ORDER
    assert (SHIPPED_MODEL.parent / "MODEL_CARD.md").is_file()


def test_shipped_model_segments_a_fresh_simulated_slice(tmp_path: Path, sim_cache: Path) -> None:
    # seed and preset outside the shipped model's training data
    root = _simulated(tmp_path / "ds", sim_cache, seed=57, preset="94:3:3", w=256, h=192)
    folder = root / "with-pt"
    manifest = json.loads((folder / "dataset.json").read_text())
    entry = manifest["slices"][0]
    images = {d: tifffile.imread(folder / f) for d, f in entry["images"].items()}
    truth = tifffile.imread(folder / entry["labels"])
    result = segment(load_model(SHIPPED_MODEL, threads=1), images)
    assert result.labels.shape == truth.shape
    ious = iou_per_class(result.labels, truth, manifest["classes"])
    miou = mean_iou(ious, MEAN_IOU_CLASSES)
    assert miou is not None and miou > 0.7, ious
    assert (ious["pore"] or 0) > 0.7, ious


def test_train_without_torch_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    assert cli.main(["train", str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "pip install -e '.[train]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ training, torch
@pytest.fixture
def torch_mod() -> ModuleType:
    pytest.importorskip("onnx")
    mod: ModuleType = pytest.importorskip("torch")
    return mod


@pytest.fixture
def tiny_data(tmp_path: Path, sim_cache: Path) -> Path:
    return _simulated(tmp_path / "tiny", sim_cache, seed=5, preset="90:5:5", w=160, h=128, slices=2)


def _tiny_config(data: Path, out: Path, **kw: Any) -> Any:
    from kintsugi_daemon.inference.training import TrainConfig

    base: dict[str, Any] = {
        "data": [data / "with-pt"],
        "out": out,
        "epochs": 1,
        "steps_per_epoch": 2,
        "batch_size": 2,
        "crop_px": 64,
        "base_channels": 4,
        "depth": 2,
        "val_fraction": 0.25,
        "threads": 1,
        "seed": 3,
    }
    return TrainConfig(**{**base, **kw})


def test_tiny_training_exports_a_valid_onnx(torch_mod: ModuleType, tiny_data: Path, tmp_path: Path) -> None:
    from kintsugi_daemon.inference.training import train, unet_from_onnx

    out = tmp_path / "tiny.onnx"
    lines: list[str] = []
    result = train(_tiny_config(tiny_data, out), log=lines.append)
    assert out.is_file() and result.epochs_run == 1
    assert any(line.startswith("epoch   1/1") and "val mIoU" in line for line in lines)
    meta = _check_contract(out)
    assert meta["training"]["seeds"] == [5] and meta["training"]["presets"] == ["90:5:5"]
    assert meta["stride"] == 4 and meta["halo"] >= 4
    assert result.max_abs_diff_ort_torch < 1e-3
    # the training pixels' per-class grey levels travel with the model (the confidence's grey match)
    stats = meta["grey_statistics"]
    assert {"pore", "active", "cbd"} <= set(stats)
    assert all(len(v["mean"]) == len(v["std"]) == 2 and v["pixels"] > 0 for v in stats.values())
    assert stats["pore"]["mean"][0] > stats["active"]["mean"][0]  # Pt-filled pores: brightest in CBS

    # the daemon's loader and tiler accept it; eager torch rebuilt from the file agrees with onnxruntime
    model = load_model(out, threads=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 64, 96), dtype=np.float32)
    ort_logits = model.run(x)
    net = unet_from_onnx(out)
    with torch_mod.inference_mode():
        eager = net(torch_mod.from_numpy(x)).numpy()
    assert np.abs(eager - ort_logits).max() < 1e-3
    images = {
        "cbs": rng.integers(0, 65535, (100, 130)).astype(np.uint16),
        "tld": rng.integers(0, 65535, (100, 130)).astype(np.uint16),
    }
    assert segment(model, images).labels.shape == (100, 130)


def test_training_is_deterministic_and_resumes(
    torch_mod: ModuleType, tiny_data: Path, tmp_path: Path
) -> None:
    from kintsugi_daemon.inference.training import train

    a = train(_tiny_config(tiny_data, tmp_path / "a.onnx"), log=lambda _: None)
    b = train(_tiny_config(tiny_data, tmp_path / "b.onnx"), log=lambda _: None)
    assert a.history[0]["loss"] == b.history[0]["loss"]

    ckpt = tmp_path / "run.ckpt.pt"
    two = train(_tiny_config(tiny_data, tmp_path / "c.onnx", epochs=2, checkpoint=ckpt), log=lambda _: None)
    lines: list[str] = []
    resumed = train(_tiny_config(tiny_data, tmp_path / "d.onnx", epochs=3, checkpoint=ckpt), log=lines.append)
    assert any("resumed" in line and "epoch 2" in line for line in lines)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == two.history


def test_quantisation_follows_the_iou_rule(torch_mod: ModuleType, tiny_data: Path, tmp_path: Path) -> None:
    from kintsugi_daemon.inference.training import train

    out = tmp_path / "q.onnx"
    lines: list[str] = []
    result = train(_tiny_config(tiny_data, out, quantise=True), log=lines.append)
    (line,) = [x for x in lines if "int8 quantisation" in x]
    assert "float32" in line and "int8" in line
    assert result.quantised == ("kept int8" in line)
    _check_contract(out)
    assert load_model(out, threads=1).spec.classes == list(CANONICAL_CLASSES)
