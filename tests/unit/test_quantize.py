"""`kintsugi quantize`: the int8 twin keeps the model contract, agrees with the float model, and is only
written when it holds its accuracy; bad input names the folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kintsugi_daemon.inference.contract import SHIPPED_MODEL, load_model
from kintsugi_daemon.inference.datasets import dataset_items, load_manifest, read_tiff
from kintsugi_daemon.inference.quantize import calibration_crops, quantize_int8
from kintsugi_daemon.inference.tiling import segment

pytest.importorskip("onnx")


def kintsugi(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kintsugi_daemon.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_int8_twin_keeps_contract_and_agrees(tmp_path: Path, sim_dataset: Path) -> None:
    crops = calibration_crops(SHIPPED_MODEL, [sim_dataset], crop_px=64, per_slice=2)
    assert len(crops) == 6 and crops[0].shape == (1, 2, 64, 64) and crops[0].dtype == np.float32
    out = quantize_int8(SHIPPED_MODEL, tmp_path / "int8.onnx", crops)
    fp32, int8 = load_model(SHIPPED_MODEL, threads=1), load_model(out, threads=1)
    assert int8.spec.classes == fp32.spec.classes and int8.spec.channels == fp32.spec.channels
    assert int8.spec.normalisation == fp32.spec.normalisation and int8.spec.halo == fp32.spec.halo
    assert "int8 static QDQ" in int8.spec.training["quantisation"]
    assert out.stat().st_size < SHIPPED_MODEL.stat().st_size / 2  # int8 weights
    item = dataset_items(sim_dataset, load_manifest(sim_dataset))[0]
    images = {k: read_tiff(v, k) for k, v in item.images.items()}
    agree = (segment(fp32, images).labels == segment(int8, images).labels).mean()
    assert agree > 0.97
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_quantize_cli_keeps_or_refuses(tmp_path: Path, sim_dataset: Path) -> None:
    out = tmp_path / "q.onnx"
    common: list[str | Path] = [
        "--calibration",
        sim_dataset,
        "--check",
        sim_dataset,
        "--out",
        out,
        "--crop-px",
        "64",
    ]
    # Six 64 px crops of tiny slices calibrate coarsely: this checks the mechanism, not the accuracy
    # (benchmarks/bench_inference.py measures that on full-size held-out slices).
    ok = kintsugi("quantize", SHIPPED_MODEL, *common, "--threads", "1", "--max-drop", "0.1")
    assert ok.returncode == 0, ok.stderr
    assert "mean IoU float32" in ok.stdout and out.is_file()
    out.unlink()
    # An accuracy limit no model can meet: nothing written, and the reason printed.
    refused = kintsugi("quantize", SHIPPED_MODEL, *common, "--max-drop", "-1")
    assert refused.returncode == 1 and "not written" in refused.stderr and not out.exists()


def test_quantize_cli_bad_input(tmp_path: Path, sim_dataset: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = kintsugi("quantize", "--calibration", empty, "--check", sim_dataset, "--out", tmp_path / "q.onnx")
    assert proc.returncode == 2 and f"{empty} is not a dataset folder" in proc.stderr
    small = kintsugi(
        "quantize", "--calibration", sim_dataset, "--check", sim_dataset, "--out", tmp_path / "q.onnx"
    )
    assert small.returncode == 2 and "smaller than a 256 px crop" in small.stderr
    same = kintsugi(
        "quantize",
        SHIPPED_MODEL,
        "--calibration",
        sim_dataset,
        "--check",
        sim_dataset,
        "--out",
        SHIPPED_MODEL,
    )
    assert same.returncode == 2 and "--out must differ" in same.stderr
    assert json.loads((sim_dataset / "dataset.json").read_text())["slices"]  # the data is untouched


def test_builtin_int8_is_shipped_and_meets_the_recipe_contract() -> None:
    from kintsugi_daemon.config import ConfigError, parse_recipe
    from kintsugi_daemon.inference.contract import SHIPPED_INT8_MODEL, check_against_recipe, resolve_model

    base = '[run]\nname = "r"\nslices = 1\nslice_thickness_m = 4e-8\n[roi]\nwidth_m = 4e-5\nheight_m = 3e-5\n'
    recipe = parse_recipe(base + '[segmentation]\nmodel = "builtin-int8"\nmemory_budget_mb = 256\n')
    assert resolve_model(recipe.segmentation.model) == SHIPPED_INT8_MODEL
    model = load_model(resolve_model(recipe.segmentation.model), threads=1)
    img = recipe.imaging
    check_against_recipe(model.spec, img.detectors, ["pore", "active"], img.pixel_size_m)
    assert resolve_model("models/mine.onnx") == Path("models/mine.onnx")
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        parse_recipe(base + "[segmentation]\nmemory_budget_mb = 1\n")
