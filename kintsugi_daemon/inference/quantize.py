"""Static int8 quantisation of a segmentation model (QDQ, per-channel weights), calibrated on real slices.

Why static QDQ: the weights and the activation ranges are fixed at export, so onnxruntime runs the
convolutions as int8 kernels (VNNI on current x86) with no per-call range computation; QDQ keeps the graph
readable by any ONNX runtime, which falls back to float where it has no int8 kernel. Per-channel weight
scales keep the thin 16-channel first layers accurate. Calibration is MinMax on normalised crops of
simulator (or real) slices, cut exactly as the tiler feeds the network, so the ranges are the ones met at
run time. The `kintsugi.*` metadata (the model contract) is carried over and the result records how it
was made. Needs the `onnx` package (dev and train extras); the daemon only loads the result.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kintsugi_daemon.inference.contract import METADATA_PREFIX, load_model
from kintsugi_daemon.inference.datasets import DatasetError, dataset_items, load_manifest, read_tiff
from kintsugi_daemon.inference.tiling import normalise

__all__ = ["calibration_crops", "quantize_int8"]

QUANTISATION_NOTE = "int8 static QDQ, per-channel weights, MinMax calibration"


def calibration_crops(
    model_path: Path, datasets: Sequence[Path], *, crop_px: int = 256, per_slice: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Normalised [1, C, crop, crop] crops of every slice of the dataset folders, at random places."""
    model = load_model(model_path, threads=1)
    rng = np.random.default_rng(seed)
    side = -(-crop_px // model.spec.stride) * model.spec.stride
    crops: list[np.ndarray] = []
    for folder in datasets:
        for item in dataset_items(folder, load_manifest(folder)):
            images = {
                name: read_tiff(path, f"{item.name} {name} image") for name, path in item.images.items()
            }
            x = normalise(model, images)
            h, w = x.shape[1:]
            if h < side or w < side:
                raise DatasetError(f"{folder}: {item.name} is {w} x {h} px, smaller than a {side} px crop")
            for _ in range(per_slice):
                y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                crops.append(np.ascontiguousarray(x[None, :, y0 : y0 + side, x0 : x0 + side]))
    if not crops:
        raise DatasetError(f"no slices to calibrate on in {', '.join(map(str, datasets))}")
    return crops


def quantize_int8(src: Path, dst: Path, crops: Sequence[np.ndarray], *, extra_note: str = "") -> Path:
    """Write the int8 QDQ version of `src` to `dst` (atomically), calibrated on `crops`."""
    import onnx  # type: ignore[import-not-found, unused-ignore]
    from onnxruntime.quantization import (  # type: ignore[import-untyped, unused-ignore]
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = load_model(src, threads=1)
    # The crops are NCHW, as the tiler cuts them; an NHWC graph gets them as `SegmentationModel.run` would.
    nhwc = model.spec.layout == "NHWC"
    feeds = [{model.input_name: c.transpose(0, 2, 3, 1) if nhwc else c} for c in crops]

    class _Reader(CalibrationDataReader):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint on the root logger
    try:
        rewritten = onnx.load(str(src))
        upsamplings = upsampling_as_depth_to_space(rewritten)
        quantize_static(
            rewritten,
            str(tmp),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(tmp))
        rewrite = f"; {upsamplings} ConvTranspose 2x2/2 as Conv 1x1 + DepthToSpace" if upsamplings else ""
        _note(proto, f"{QUANTISATION_NOTE}; {len(crops)} calibration crops{rewrite}{extra_note}")
        onnx.save(proto, str(tmp))
        load_model(tmp, threads=1)  # the contract still holds before it replaces anything
        os.replace(tmp, dst)
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)
    return dst


def upsampling_as_depth_to_space(proto: Any) -> int:
    """Rewrite each U-Net up-sampling (ConvTranspose, kernel 2, stride 2, no padding) as the same
    arithmetic in ops onnxruntime runs as int8: a 1 x 1 Conv to 4 x C_out channels, then DepthToSpace
    (DCR, which profiled faster than CRD here). Exact: with stride = kernel every output pixel is one
    input pixel times one weight tap.
    onnxruntime's CPU provider has no int8 ConvTranspose, so unrewritten these layers run in float between
    a dequantise and a quantise, with layout transposes around them. Returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    nodes, count = [], 0
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not (
            node.op_type == "ConvTranspose"
            and list(attrs.get("kernel_shape", [])) == [2, 2]
            and list(attrs.get("strides", [])) == [2, 2]
            and not any(attrs.get("pads", [0]))
            and attrs.get("group", 1) == 1
            and list(attrs.get("dilations", [1, 1])) == [1, 1]
            and not attrs.get("output_padding")
            and not attrs.get("output_shape")
            and all(name in inits for name in node.input[1:])
        ):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])  # [C_in, C_out, 2, 2]
        c_in, c_out = w.shape[:2]
        # DCR: Conv channel (i * 2 + j) * C_out + c lands on output pixel (2y + i, 2x + j) of channel c.
        w1 = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(c_out * 4, c_in, 1, 1))
        b = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 else np.zeros(c_out, w.dtype)
        prefix = node.name or node.output[0]
        weight, bias, mid = f"{prefix}/as_conv.weight", f"{prefix}/as_conv.bias", f"{prefix}/as_conv_output"
        proto.graph.initializer.extend(
            [numpy_helper.from_array(w1, weight), numpy_helper.from_array(np.tile(b, 4), bias)]
        )
        nodes.append(helper.make_node("Conv", [node.input[0], weight, bias], [mid], name=f"{prefix}/as_conv"))
        nodes.append(
            helper.make_node(
                "DepthToSpace", [mid], list(node.output), name=f"{prefix}/as_d2s", blocksize=2, mode="DCR"
            )
        )
        count += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in proto.graph.node for name in node.input}
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    onnx.checker.check_model(proto)
    return count


def _note(proto: Any, note: str) -> None:
    """Record the quantisation in `kintsugi.training` (the contract's free-form provenance)."""
    key = METADATA_PREFIX + "training"
    for prop in proto.metadata_props:
        if prop.key == key:
            training = json.loads(prop.value)
            training["quantisation"] = note
            prop.value = json.dumps(training)
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, json.dumps({"quantisation": note})
