"""`kintsugi quantize`: the int8 twin keeps the model contract, agrees with the float model, and is only
written when it holds its accuracy; bad input names the folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kintsugi_daemon.inference.contract import SHIPPED_INT8_MODEL, SHIPPED_MODEL, load_model
from kintsugi_daemon.inference.datasets import dataset_items, load_manifest, read_tiff
from kintsugi_daemon.inference.quantize import calibration_crops, quantize_int8, upsampling_as_depth_to_space
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


def _up_sampling_graph(kernel: int, stride: int, c_in: int = 3, c_out: int = 5) -> Any:
    """x -> ConvTranspose(kernel, stride) -> Relu: the U-Net's up-sampling, with random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(kernel * 10 + stride)
    w = rng.normal(size=(c_in, c_out, kernel, kernel)).astype(np.float32)
    b = rng.normal(size=c_out).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "ConvTranspose",
                ["x", "w", "b"],
                ["up"],
                name="up",
                kernel_shape=[kernel] * 2,
                strides=[stride] * 2,
            ),
            helper.make_node("Relu", ["up"], ["y"]),
        ],
        "up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 7, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, None, None])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _run(proto: Any) -> np.ndarray:
    import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 3, 7, 9)).astype(np.float32)
    return np.asarray(session.run(None, {"x": x})[0])


def test_up_sampling_rewrite_is_exact() -> None:
    """ConvTranspose 2x2/2 becomes Conv 1x1 + DepthToSpace with the same output (to float rounding)."""
    proto = _up_sampling_graph(2, 2)
    before = _run(proto)
    assert upsampling_as_depth_to_space(proto) == 1
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["Conv", "DepthToSpace", "Relu"]
    after = _run(proto)
    assert after.shape == before.shape == (1, 5, 14, 18)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_up_sampling_rewrite_leaves_overlapping_kernels_alone() -> None:
    """A 3x3 kernel at stride 2 overlaps its neighbours: no 1x1 Conv equals it, so it stays."""
    proto = _up_sampling_graph(3, 2)
    before = _run(proto)
    assert upsampling_as_depth_to_space(proto) == 0
    assert next(n.op_type for n in proto.graph.node) == "ConvTranspose"
    np.testing.assert_array_equal(_run(proto), before)


def test_shipped_int8_twin_has_no_float_up_sampling() -> None:
    """The shipped int8 model was made with the rewrite: no ConvTranspose left to run in float."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(SHIPPED_INT8_MODEL)).graph.node}
    assert "ConvTranspose" not in ops and {"DepthToSpace", "QuantizeLinear"} <= ops
