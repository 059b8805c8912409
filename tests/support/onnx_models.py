"""Tiny real ONNX graphs for tests, built with onnx.helper: model metadata and a grey-level classifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["CLASSES", "PX", "build_threshold_model", "save", "spec_dict"]

CLASSES = ["pore", "unfilled_pore", "active", "cbd", "collector"]
PX = 4.05e-8


def spec_dict(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "classes": CLASSES,
        "channels": ["cbs", "tld"],
        "normalisation": [{"mean": 0.4, "std": 0.2}, {"mean": 0.5, "std": 0.25}],
        "pixel_size_m": PX,
        "tile": 96,
        "halo": 24,
        "stride": 4,
        "layout": "NCHW",
        "training": {"data": "unit test"},
        "version": "1.0.0",
    }
    return {**base, **changes}


def save(graph: onnx.GraphProto, path: Path, metadata: dict[str, Any] | None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    if metadata is not None:
        helper.set_model_props(model, {f"kintsugi.{k}": json.dumps(v) for k, v in metadata.items()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_threshold_model(path: Path, centres: dict[str, float]) -> Path:
    """Per-pixel classes by nearest CBS grey level (logit_k = -(x - c_k)^2 / s): enough for the CLI."""
    names = list(centres)
    c = np.array([centres[n] for n in names], np.float32).reshape(1, -1, 1, 1)
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["cbs"]),
        helper.make_node("Sub", ["cbs", "centres"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("Mul", ["d2", "scale"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([1], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(c, "centres"),
        numpy_helper.from_array(np.array(-400.0, np.float32), "scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "threshold",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(names), "H", "W"])],
        initializer=inits,
    )
    meta = spec_dict(
        classes=names,
        normalisation=[{"mean": 0.0, "std": 1.0}, {"mean": 0.0, "std": 1.0}],
        tile=64,
        halo=0,
        stride=1,
        training={"data": "CBS grey-level thresholds, for tests"},
    )
    return save(graph, path, meta)
