"""Training and ONNX export of segmentation models (the `train` extra: torch is imported only here).

Built on the inference package: the contract (`ModelSpec`, metadata), the tiler (validation predicts
exactly as the daemon does) and the metrics (IoU). Modules: `data` (simulator datasets), `annotations`
(Avizo / napari / Fiji / ilastik label images with a mapping), `model` (networks, ONNX -> PyTorch),
`sampling` (crops, augmentation, Dice), `evaluation`, `export` (ONNX, int8), `loop` (`train`).
"""

import importlib
from typing import Any

# Imported on first use: reading annotations and datasets (and their errors) needs no torch, so
# `kintsugi train`'s input checks and their tests work without the train extra.
_WHERE = {
    "AnnotationError": "annotations",
    "load_annotations": "annotations",
    "load_training_data": "annotations",
    "SliceData": "data",
    "load_folder": "data",
    "export_onnx": "export",
    "TrainConfig": "loop",
    "TrainResult": "loop",
    "train": "loop",
    "TorchTiled": "model",
    "UNet": "model",
    "build_model": "model",
    "unet_from_onnx": "model",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = [
    "AnnotationError",
    "SliceData",
    "TorchTiled",
    "TrainConfig",
    "TrainResult",
    "UNet",
    "build_model",
    "export_onnx",
    "load_annotations",
    "load_folder",
    "load_training_data",
    "train",
    "unet_from_onnx",
]
