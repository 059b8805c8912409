"""Training and ONNX export of segmentation models (the `train` extra: torch is imported only here).

Built on the inference package: the contract (`ModelSpec`, metadata), the tiler (validation predicts
exactly as the daemon does) and the metrics (IoU). Modules: `data` (simulator datasets), `annotations`
(Avizo / napari / Fiji / ilastik label images with a mapping), `model` (networks, ONNX -> PyTorch),
`sampling` (crops, augmentation, Dice), `evaluation`, `export` (ONNX, int8), `loop` (`train`).
"""

from kintsugi_daemon.inference.training.annotations import (
    AnnotationError,
    load_annotations,
    load_training_data,
)
from kintsugi_daemon.inference.training.data import SliceData, load_folder
from kintsugi_daemon.inference.training.export import export_onnx
from kintsugi_daemon.inference.training.loop import TrainConfig, TrainResult, train
from kintsugi_daemon.inference.training.model import TorchTiled, UNet, build_model, unet_from_onnx

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
