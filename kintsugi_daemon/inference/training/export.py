"""ONNX export with the model contract's metadata, the onnxruntime-vs-PyTorch check, and optional int8.

The exported graph has BatchNorm folded into the convolutions (eval semantics), so the ONNX initializers
are exactly the parameters of a folded torch model (`model.unet_from_onnx` rebuilds it).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx  # type: ignore[import-not-found, unused-ignore]
import torch  # type: ignore[import-not-found, unused-ignore]
from torch import nn  # type: ignore[import-not-found, unused-ignore]

from kintsugi_daemon.inference.contract import METADATA_PREFIX, ModelSpec, load_model
from kintsugi_daemon.inference.quantize import quantize_int8
from kintsugi_daemon.inference.tiling import standardise
from kintsugi_daemon.inference.training.data import FloatArray, SliceData
from kintsugi_daemon.inference.training.evaluation import validate
from kintsugi_daemon.inference.training.model import UNet, fold_batchnorm
from kintsugi_daemon.inference.training.sampling import CropSampler

__all__ = ["export_onnx", "quantise"]

Log = Callable[[str], None]


def _set_metadata(proto: Any, props: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _props(spec: ModelSpec, extra: dict[str, Any]) -> dict[str, str]:
    return {**spec.to_metadata(), **{METADATA_PREFIX + k: json.dumps(v) for k, v in extra.items()}}


def export_onnx(
    model: nn.Module,
    out: Path,
    spec: ModelSpec,
    extra: dict[str, Any],
    *,
    opset: int = 14,
    sample: FloatArray | None = None,
    log: Log = print,
    tolerance: float = 1e-3,
) -> float:
    """Export (BatchNorm folded, dynamic N/H/W) with the contract `spec` plus `extra` metadata (e.g. the
    architecture); returns the max |ort - torch| logit difference on `sample` (a raw [0, 1] image, cropped
    to 256 px) and raises when it exceeds `tolerance`. The file is checked by the daemon's own loader."""
    is_unet = isinstance(model, UNet)
    folded = fold_batchnorm(model) if is_unet else copy.deepcopy(model).eval()
    if not is_unet:
        extra = {**extra, "architecture": {**extra.get("architecture", {}), "batchnorm_folded": False}}
    stride = spec.stride
    c = len(spec.channels)
    dummy = torch.zeros(1, c, 4 * stride, 4 * stride)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # The TorchScript exporter (dynamo=False) is the one that still writes opset 14 for Avizo; its
    # deprecation notice is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            folded,
            (dummy,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N", 2: "H", 3: "W"}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(tmp))
    _set_metadata(proto, _props(spec, extra))
    proto.doc_string = "kintsugi segmentation model: float32 [N,C,H,W] (normalised grey) -> logits [N,K,H,W]"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))

    if sample is None:
        sample = np.random.default_rng(0).random((c, 4 * stride, 4 * stride), dtype=np.float32)
    side_h = min(256, sample.shape[1]) // stride * stride
    side_w = min(256, sample.shape[2]) // stride * stride
    x = standardise(np.array(sample[:, :side_h, :side_w], np.float32), spec.normalisation)[None]
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    got = load_model(tmp, threads=1).run(x)  # the daemon's loader: the contract must check out
    diff = float(np.abs(got - ref).max())
    if not diff <= tolerance:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"onnxruntime and torch disagree after export: max |diff| {diff:.3g} > {tolerance}"
        )
    os.replace(tmp, out)
    log(
        f"kintsugi train: wrote {out} ({out.stat().st_size / 1e6:.2f} MB, opset {opset}); "
        f"onnxruntime vs torch max |diff| {diff:.2e} on a {side_h}x{side_w} sample"
    )
    return diff


def quantise(
    out: Path,
    sampler: CropSampler,
    slices: Sequence[SliceData],
    split_cols: Sequence[int],
    seed: int,
    log: Log,
) -> bool:
    """Static int8 (QDQ, per-channel) quantisation calibrated on training crops; the int8 model replaces
    the float one only if the validation mean IoU drops by less than 0.01."""
    fp32 = load_model(out, threads=1)
    norm = fp32.spec.normalisation
    calib_sampler = copy.copy(sampler)
    calib_sampler.rng = np.random.default_rng(seed + 1)
    batches = [calib_sampler.batch(4)[0] for _ in range(8)]
    crops = [np.stack([standardise(im.copy(), norm) for im in b]) for b in batches]
    q_path = out.with_name(out.stem + ".int8.onnx")
    # The same quantisation as `kintsugi quantize` (one piece of code): QDQ, per-channel, MinMax.
    quantize_int8(out, q_path, crops, extra_note=" on training crops")
    if not any(c < s.image.shape[2] for s, c in zip(slices, split_cols, strict=True)):
        split_cols = [0] * len(slices)  # no held-out strip: compare on the training images themselves
    _, m32 = validate(fp32, slices, split_cols)
    _, m8 = validate(load_model(q_path, threads=1), slices, split_cols)
    keep = (m32 - m8) < 0.01
    log(
        f"kintsugi train: int8 quantisation: validation mean IoU float32 {m32:.4f}, int8 {m8:.4f} "
        f"(drop {m32 - m8:+.4f}) -> {'kept int8' if keep else 'kept float32'}"
    )
    if keep:
        os.replace(q_path, out)
    else:
        q_path.unlink(missing_ok=True)
    return keep
