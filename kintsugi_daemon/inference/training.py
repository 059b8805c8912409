"""Training and ONNX export of segmentation models (the `train` extra: torch is imported only here).

`kintsugi train DATA [DATA...] --out MODEL.onnx` trains on any folder of image/label pairs described by a
`dataset.json` manifest (the simulator's dataset export, or real annotated slices) and writes an ONNX file
carrying the model contract's metadata (DESIGN.md, "Model contract"), so the daemon can check it at
preflight and tile it without knowing how it was trained.

Choices worth knowing:
- Validation is a spatial hold-out: the right-most `val_fraction` of every slice's columns is never
  cropped for training. Consecutive slices are ~40 nm apart and nearly identical, so holding out whole
  slices would leak; a column strip keeps the collector (at the bottom) in both parts.
- Augmentations keep the physics: flips in x only (gravity, the 52 deg foreshortening and the milling
  direction make y and 90 deg rotations meaningful), per-channel gamma, contrast, brightness and noise.
- The exported graph has BatchNorm folded into the convolutions (eval semantics), so the ONNX initializers
  are exactly the parameters of a folded torch model: `unet_from_onnx` rebuilds the eager model from an
  ONNX file (used to compare onnxruntime and PyTorch on the same weights).
- The halo written into the metadata is the receptive-field radius measured from the gradient support of
  one output pixel, rounded up to the network's stride.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx  # type: ignore[import-not-found, unused-ignore]
import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]
import tifffile
import torch  # type: ignore[import-not-found, unused-ignore]
from torch import Tensor, nn  # type: ignore[import-not-found, unused-ignore]
from torch.nn import functional as nnf  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "CANONICAL_CLASSES",
    "DEFAULT_CHANNELS",
    "Arch",
    "SliceData",
    "TrainConfig",
    "TrainResult",
    "UNet",
    "build_model",
    "confusion_matrix",
    "export_onnx",
    "iou_from_confusion",
    "load_folder",
    "measure_receptive_radius",
    "onnx_metadata",
    "onnx_predict",
    "ort_session",
    "train",
    "unet_from_onnx",
]

CANONICAL_CLASSES: tuple[str, ...] = ("pore", "unfilled_pore", "active", "cbd", "collector")
DEFAULT_CHANNELS: tuple[str, ...] = ("cbs", "tld")
IGNORE = 255
GREY_MAX = 65535.0
META_PREFIX = "kintsugi."
MODEL_VERSION = "1.0.0"

Arch = Literal["unet", "resnet18", "vgg16"]
FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint8]
Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class SliceData:
    """One slice: raw grey values scaled to [0, 1] (C, H, W) and canonical class labels (H, W)."""

    image: FloatArray
    labels: LabelArray
    source: str


@dataclass(frozen=True)
class FolderInfo:
    path: str
    slices: int
    width_px: int
    height_px: int
    preset: str | None
    seed: int | None
    pt_infiltration: bool | None
    pixel_size_m: float | None


def _read_grey(path: Path) -> FloatArray:
    arr = np.asarray(tifffile.imread(path))
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel 2-D image, got shape {arr.shape}")
    scale = GREY_MAX if arr.dtype == np.uint16 or arr.dtype.kind == "f" else float(np.iinfo(arr.dtype).max)
    return (arr.astype(np.float32) / np.float32(scale)).astype(np.float32)


def load_folder(
    folder: Path,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    classes: Sequence[str] = CANONICAL_CLASSES,
    max_slices: int | None = None,
) -> tuple[list[SliceData], FolderInfo]:
    """Read a dataset folder (manifest `dataset.json`); labels are remapped to `classes` order.

    Label values not named in the manifest's `classes` become IGNORE (255) and do not train.
    `max_slices` takes that many slices spread evenly over the stack (first and last included).
    """
    manifest_path = folder / "dataset.json"
    if not manifest_path.is_file():
        raise ValueError(f"{folder}: no dataset.json manifest (expected the kintsugi-sim dataset layout)")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    missing = [c for c in channels if c not in manifest.get("detectors", [])]
    if missing:
        raise ValueError(
            f"{folder}: manifest lacks detector(s) {missing}; it has {manifest.get('detectors')}"
        )
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for name, value in dict(manifest.get("classes", {})).items():
        if name in classes:
            lut[int(value)] = classes.index(name)
    entries: list[dict[str, Any]] = list(manifest["slices"])
    if not entries:
        raise ValueError(f"{folder}: the manifest lists no slices")
    if max_slices is not None and max_slices < len(entries):
        picks = np.unique(np.linspace(0, len(entries) - 1, max(max_slices, 1)).round().astype(int))
        entries = [entries[i] for i in picks]
    out: list[SliceData] = []
    for entry in entries:
        if "labels" not in entry:
            raise ValueError(f"{folder}: slice {entry.get('index')} has no labels")
        image = np.stack([_read_grey(folder / entry["images"][c]) for c in channels])
        labels = lut[np.asarray(tifffile.imread(folder / entry["labels"])).astype(np.uint8)]
        if labels.shape != image.shape[1:]:
            raise ValueError(f"{folder}: labels {labels.shape} and images {image.shape[1:]} differ in size")
        out.append(SliceData(image=image, labels=labels, source=f"{folder}#{entry.get('index')}"))
    info = FolderInfo(
        path=str(folder),
        slices=len(out),
        width_px=int(out[0].image.shape[2]),
        height_px=int(out[0].image.shape[1]),
        preset=manifest.get("preset"),
        seed=manifest.get("seed"),
        pt_infiltration=manifest.get("pt_infiltration"),
        pixel_size_m=manifest.get("pixel_size_m"),
    )
    return out, info


# -------------------------------------------------------------------------------------------- model
class _ConvBlock(nn.Sequential):  # type: ignore[misc, unused-ignore]
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):  # type: ignore[misc, unused-ignore]
    """A plain U-Net: `depth` 2x2 max-pool downsamplings, channels base * 2**level, BatchNorm, ReLU."""

    def __init__(self, in_channels: int = 2, n_classes: int = 5, base: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.in_channels, self.n_classes, self.base, self.depth = in_channels, n_classes, base, depth
        self.enc = nn.ModuleList()
        cin = in_channels
        for level in range(depth):
            self.enc.append(_ConvBlock(cin, base << level))
            cin = base << level
        self.bottleneck = _ConvBlock(cin, base << depth)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(base << (level + 1), base << level, 2, stride=2))
            self.dec.append(_ConvBlock(base << (level + 1), base << level))
        self.head = nn.Conv2d(base, n_classes, 1)

    @property
    def stride(self) -> int:
        return 1 << self.depth

    def forward(self, x: Tensor) -> Tensor:
        skips: list[Tensor] = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = nnf.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        out: Tensor = self.head(x)
        return out


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy in eval semantics with every Conv2d+BatchNorm2d pair folded into one biased Conv2d."""
    folded = copy.deepcopy(model).eval()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.Sequential):
                layers = list(child)
                for i in range(len(layers) - 1):
                    conv, bn = layers[i], layers[i + 1]
                    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                        child[i] = nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                        child[i + 1] = nn.Identity()
            visit(child)

    visit(folded)
    return folded


def _folded_unet(in_channels: int, n_classes: int, base: int, depth: int) -> UNet:
    """A UNet whose blocks have biased convolutions and no BatchNorm: the shape of `fold_batchnorm`."""
    net = UNet(in_channels, n_classes, base, depth)
    for block in [*net.enc, net.bottleneck, *net.dec]:
        for i, layer in enumerate(list(block)):
            if isinstance(layer, nn.Conv2d):
                block[i] = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1, bias=True)
            elif isinstance(layer, nn.BatchNorm2d):
                block[i] = nn.Identity()
    net.eval()
    return net


def build_model(arch: Arch, in_channels: int, n_classes: int, base: int = 16, depth: int = 3) -> nn.Module:
    """The plain U-Net, or a ResNet18/VGG16-encoder U-Net (Avizo's architectures) via smp."""
    if arch == "unet":
        return UNet(in_channels, n_classes, base, depth)
    try:
        import segmentation_models_pytorch as smp  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise RuntimeError(
            f"--arch {arch} needs segmentation-models-pytorch: pip install segmentation-models-pytorch"
        ) from exc
    net: nn.Module = smp.Unet(
        encoder_name=arch, encoder_weights=None, in_channels=in_channels, classes=n_classes
    )
    return net


def model_stride(model: nn.Module) -> int:
    return model.stride if isinstance(model, UNet) else 32


def measure_receptive_radius(model: nn.Module, in_channels: int, stride: int, size: int = 0) -> int:
    """Receptive-field radius in pixels: the farthest input pixel with a non-zero gradient on the centre
    output pixel (eval mode, random input; two probes so that a dead ReLU cannot hide a path)."""
    size = size or max(256, 16 * stride)
    net = copy.deepcopy(model).eval()
    radius = 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(1, in_channels, size, size, generator=gen, requires_grad=True)
        y = net(x)
        c = size // 2
        y[0, :, c, c].sum().backward()
        assert x.grad is not None
        support = (x.grad.abs().sum(dim=(0, 1)) > 0).nonzero()
        if support.numel():
            radius = max(radius, int((support - c).abs().max()))
    if radius >= size // 2 - 1:
        raise RuntimeError("receptive field reaches the probe's border; measure with a larger size")
    return radius


# ----------------------------------------------------------------------------------------- metrics
def confusion_matrix(
    truth: npt.NDArray[Any], pred: npt.NDArray[Any], n_classes: int
) -> npt.NDArray[np.int64]:
    """Rows: truth, columns: prediction; pixels labelled IGNORE (or out of range) are skipped."""
    t = truth.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    keep = t < n_classes
    cm = np.bincount(t[keep] * n_classes + p[keep], minlength=n_classes * n_classes)
    return cm.reshape(n_classes, n_classes).astype(np.int64)


def iou_from_confusion(cm: npt.NDArray[np.int64]) -> list[float | None]:
    """Per-class IoU; None for a class absent from both truth and prediction."""
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1) - tp
    return [float(tp[k] / denom[k]) if denom[k] > 0 else None for k in range(cm.shape[0])]


def _mean_present(ious: Sequence[float | None], cm: npt.NDArray[np.int64]) -> float:
    """Mean IoU over classes present in the ground truth."""
    vals = [v for k, v in enumerate(ious) if v is not None and cm[k].sum() > 0]
    return float(np.mean(vals)) if vals else float("nan")


# ---------------------------------------------------------------------------------- onnx helpers
def ort_session(model: Path | bytes, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def onnx_metadata(session: ort.InferenceSession) -> dict[str, Any]:
    """The `kintsugi.*` metadata props of a session, JSON-decoded, without the prefix."""
    props = session.get_modelmeta().custom_metadata_map
    return {k.removeprefix(META_PREFIX): json.loads(v) for k, v in props.items() if k.startswith(META_PREFIX)}


def normalise(image: FloatArray, norm: Sequence[dict[str, float]]) -> FloatArray:
    mean = np.array([n["mean"] for n in norm], dtype=np.float32)[:, None, None]
    std = np.array([n["std"] for n in norm], dtype=np.float32)[:, None, None]
    return ((image - mean) / std).astype(np.float32)


def _pad_to(image: FloatArray, stride: int, margin: int) -> tuple[FloatArray, tuple[int, int]]:
    """Reflect-pad (C, H, W) by `margin` on every side and up to a multiple of `stride`."""
    _, h, w = image.shape
    ph = (-(h + 2 * margin)) % stride
    pw = (-(w + 2 * margin)) % stride
    pad = ((0, 0), (margin, margin + ph), (margin, margin + pw))
    mode: Literal["reflect", "symmetric"] = "reflect" if min(h, w) > margin + max(ph, pw) else "symmetric"
    return np.pad(image, pad, mode=mode).astype(np.float32), (margin, margin)


def onnx_predict(session: ort.InferenceSession, image: FloatArray, margin: int | None = None) -> FloatArray:
    """Logits (K, H, W) of one raw [0,1] image (C, H, W), whole-image (no tiling), reflect-padded by the
    model's halo; the evaluation path of training and the benchmarks."""
    meta = onnx_metadata(session)
    stride = int(meta.get("stride", 8))
    margin = int(meta.get("halo", 32)) if margin is None else margin
    x, (top, left) = _pad_to(normalise(image, meta["normalisation"]), stride, margin)
    name = session.get_inputs()[0].name
    (logits,) = session.run(None, {name: x[None]})
    _, h, w = image.shape
    return np.asarray(logits[0, :, top : top + h, left : left + w], dtype=np.float32)


def unet_from_onnx(path: Path) -> UNet:
    """The eager PyTorch model (BatchNorm folded) holding exactly the weights of an exported UNet."""
    model = onnx.load(str(path))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    spec = props.get(META_PREFIX + "architecture", {})
    if spec.get("arch") != "unet":
        raise ValueError(f"{path}: not an exported kintsugi UNet (architecture {spec or 'unknown'})")
    net = _folded_unet(
        len(props[META_PREFIX + "channels"]),
        len(props[META_PREFIX + "classes"]),
        int(spec["base_channels"]),
        int(spec["depth"]),
    )
    weights = {
        init.name: torch.from_numpy(onnx.numpy_helper.to_array(init).copy())
        for init in model.graph.initializer
    }
    state = net.state_dict()
    missing = [k for k in state if k not in weights]
    if missing:
        raise ValueError(f"{path}: initializers missing for {missing[:4]}...")
    net.load_state_dict({k: weights[k] for k in state})
    net.eval()
    return net


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    data: list[Path]
    out: Path
    epochs: int = 20
    arch: Arch = "unet"
    base_channels: int = 16
    depth: int = 3
    crop_px: int = 160
    batch_size: int = 12
    steps_per_epoch: int = 50
    lr: float = 3e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    seed: int = 0
    val_fraction: float = 0.15
    max_slices_per_folder: int | None = None
    max_val_slices: int = 8
    checkpoint: Path | None = None
    quantise: bool = False
    logdir: Path | None = None
    threads: int = 2
    opset: int = 14
    tile: int = 512  # network input side incl. halos (the tiler's meaning): 512 - 2*48 keeps 416 px
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    classes: tuple[str, ...] = CANONICAL_CLASSES
    augment: bool = True
    rare_class_fraction: float = 0.3
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("no training data folders given")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.val_fraction < 0.9:
            raise ValueError(f"--val-fraction must be in [0, 0.9), got {self.val_fraction}")
        if self.crop_px < 32 or self.batch_size < 1 or self.steps_per_epoch < 1:
            raise ValueError("crop_px >= 32, batch_size >= 1 and steps_per_epoch >= 1 are required")
        if not 0.0 <= self.rare_class_fraction <= 1.0:
            raise ValueError(f"rare_class_fraction must be in [0, 1], got {self.rare_class_fraction}")
        if not 7 <= self.opset <= 17:
            raise ValueError(f"opset must be 7..17 for the model contract, got {self.opset}")


@dataclass
class TrainResult:
    out: Path
    epochs_run: int
    val_iou: dict[str, float | None]
    val_mean_iou: float
    max_abs_diff_ort_torch: float
    quantised: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _CropSampler:
    """Random crops from the training part (columns left of the validation strip) of every slice.

    Crops may reach `pad` pixels past the image edges into a reflect-padded margin, because that is what
    the tiler feeds at the borders (it reflect-pads by the halo): a model that never saw a reflected edge
    in training mistakes the doubled collector band at the bottom for an NMC particle.
    A fraction `rare_fraction` of the crops is centred on a pixel of a class drawn uniformly among the
    classes present, so rare classes (unfilled pores with Pt: ~0.2 % of the pixels, but what decides a
    re-deposition) are seen in most batches; the rest are uniform over the area.
    """

    def __init__(
        self,
        slices: Sequence[SliceData],
        split_cols: Sequence[int],
        crop: int,
        stride: int,
        seed: int,
        n_classes: int,
        rare_fraction: float = 0.0,
        pad: int = 0,
    ):
        self.split = split_cols
        h_min = min(s.image.shape[1] for s in slices)
        w_min = min(split_cols)
        self.crop = max(stride, min(crop, h_min, w_min) // stride * stride)
        self.pad = min(pad, h_min - 1, w_min - 1)
        p = self.pad
        self.images = [np.pad(s.image, ((0, 0), (p, p), (p, p)), mode="reflect") for s in slices]
        self.labels = [np.pad(s.labels, p, mode="reflect") for s in slices]
        # a crop's right edge stays left of the validation strip; with no strip it may enter the margin
        self.right = [
            c + (p if c == s.image.shape[2] else 0) for s, c in zip(slices, split_cols, strict=True)
        ]
        areas = np.array(
            [im.shape[1] * r for im, r in zip(self.images, self.right, strict=True)], dtype=float
        )
        self.p = areas / areas.sum()
        self.rng = np.random.default_rng(seed)
        self.rare_fraction = rare_fraction
        # per class: (slice index, row, col) in padded coordinates of up to 4096 pixels per slice
        self.where: list[npt.NDArray[np.int64]] = []
        if rare_fraction > 0:
            pick = np.random.default_rng(seed + 7)
            for k in range(n_classes):
                found = []
                for i, (sl, col) in enumerate(zip(slices, split_cols, strict=True)):
                    rows, cols = np.nonzero(sl.labels[:, :col] == k)
                    if rows.size:
                        sel = pick.choice(rows.size, min(rows.size, 4096), replace=False)
                        found.append(np.stack([np.full(sel.size, i), rows[sel] + p, cols[sel] + p], axis=1))
                if found:
                    self.where.append(np.concatenate(found))

    def batch(self, n: int) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        c = self.crop
        xs = np.empty((n, self.images[0].shape[0], c, c), dtype=np.float32)
        ys = np.empty((n, c, c), dtype=np.int64)
        for i in range(n):
            if self.where and self.rng.random() < self.rare_fraction:
                pool = self.where[int(self.rng.integers(len(self.where)))]
                k, r, q = (int(v) for v in pool[int(self.rng.integers(len(pool)))])
                top = min(max(r - c // 2, 0), self.images[k].shape[1] - c)
                left = min(max(q - c // 2, 0), self.pad + self.right[k] - c)
            else:
                k = int(self.rng.choice(len(self.images), p=self.p))
                top = int(self.rng.integers(0, self.images[k].shape[1] - c + 1))
                left = int(self.rng.integers(0, self.pad + self.right[k] - c + 1))
            xs[i] = self.images[k][:, top : top + c, left : left + c]
            ys[i] = self.labels[k][top : top + c, left : left + c]
        return xs, ys


def _augment(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Physically valid augmentations on raw [0,1] grey values: x-flips, per-channel gamma, contrast,
    brightness, Gaussian noise. No y-flips or rotations (gravity, foreshortening, milling direction)."""
    n, c = x.shape[:2]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None], y.flip(-1), y)
    gamma = torch.exp((torch.rand(n, c, 1, 1, generator=gen) - 0.5) * 0.4)
    x = x.clamp(0.0, 1.0) ** gamma
    mean = x.mean(dim=(2, 3), keepdim=True)
    contrast = 1.0 + (torch.rand(n, c, 1, 1, generator=gen) - 0.5) * 0.2
    bright = (torch.rand(n, c, 1, 1, generator=gen) - 0.5) * 0.04
    x = (x - mean) * contrast + mean + bright
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.02
    x = x + torch.randn(x.shape, generator=gen) * sigma
    return x, y


def _dice_loss(logits: Tensor, target: Tensor, n_classes: int) -> Tensor:
    valid = (target < n_classes).unsqueeze(1)
    probs = logits.softmax(dim=1) * valid
    onehot = nnf.one_hot(target.clamp(max=n_classes - 1), n_classes).permute(0, 3, 1, 2) * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice: Tensor = 1.0 - ((2.0 * inter + 1.0) / (denom + 1.0)).mean()
    return dice


def _torch_predict(
    model: nn.Module, image: FloatArray, norm: Sequence[dict[str, float]], stride: int, margin: int
) -> FloatArray:
    x, (top, left) = _pad_to(normalise(image, norm), stride, margin)
    with torch.inference_mode():
        logits = model(torch.from_numpy(x)[None])[0].numpy()
    _, h, w = image.shape
    return np.asarray(logits[:, top : top + h, left : left + w], dtype=np.float32)


def _validate(
    predict: Callable[[FloatArray], FloatArray],
    slices: Sequence[SliceData],
    split_cols: Sequence[int],
    n_classes: int,
) -> tuple[list[float | None], float]:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for s, col in zip(slices, split_cols, strict=True):
        if col >= s.image.shape[2]:
            continue
        logits = predict(np.ascontiguousarray(s.image[:, :, col:]))
        cm += confusion_matrix(s.labels[:, col:], logits.argmax(0), n_classes)
    ious = iou_from_confusion(cm)
    return ious, _mean_present(ious, cm)


def _checkpoint_state(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    epoch: int,
    history: list[dict[str, Any]],
    cfg: TrainConfig,
    norm: list[dict[str, float]],
    gen: torch.Generator,
    sampler: _CropSampler,
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "history": history,
        "normalisation": norm,
        "arch": cfg.arch,
        "base_channels": cfg.base_channels,
        "depth": cfg.depth,
        "channels": list(cfg.channels),
        "classes": list(cfg.classes),
        "torch_rng": gen.get_state(),
        "sampler_rng": sampler.rng.bit_generator.state,
    }


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig, log: Log = print) -> TrainResult:  # noqa: C901, PLR0912, PLR0915 - split with training/
    """Train, validate per epoch, export ONNX with metadata, verify onnxruntime against torch, and
    optionally quantise. Deterministic for a given seed, data and thread count."""
    torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    n_classes = len(cfg.classes)

    slices: list[SliceData] = []
    infos: list[FolderInfo] = []
    for folder in cfg.data:
        s, info = load_folder(folder, cfg.channels, cfg.classes, cfg.max_slices_per_folder)
        slices += s
        infos.append(info)
    split_cols = [round(s.image.shape[2] * (1.0 - cfg.val_fraction)) for s in slices]
    # Validation strips of at most `max_val_slices` slices spread over the folders keep epochs cheap.
    val_pick = sorted({int(i) for i in np.linspace(0, len(slices) - 1, min(cfg.max_val_slices, len(slices)))})
    val_slices = [slices[i] for i in val_pick]
    val_cols = [split_cols[i] for i in val_pick]
    log(
        f"kintsugi train: {len(slices)} slices from {len(infos)} folder(s); "
        f"{sum(s.image.shape[1] * c for s, c in zip(slices, split_cols, strict=True)) / 1e6:.1f} Mpx for "
        f"training, right-most {cfg.val_fraction:.0%} of columns for validation"
    )

    train_px = np.concatenate(
        [s.image[:, :, :c].reshape(s.image.shape[0], -1) for s, c in zip(slices, split_cols, strict=True)],
        axis=1,
    )
    norm = [
        {"mean": round(float(m), 6), "std": round(float(max(sd, 1e-6)), 6)}
        for m, sd in zip(train_px.mean(1), train_px.std(1), strict=True)
    ]
    del train_px

    model = build_model(cfg.arch, len(cfg.channels), n_classes, cfg.base_channels, cfg.depth)
    stride = model_stride(model)
    halo = measure_receptive_radius(model, len(cfg.channels), stride)
    halo = int(math.ceil(halo / stride) * stride)
    if cfg.tile % stride or cfg.tile <= 2 * halo:
        raise ValueError(
            f"tile {cfg.tile} must be a multiple of the stride {stride} and exceed 2 x halo {halo}"
        )
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"kintsugi train: {cfg.arch}, {n_params / 1e6:.3f} M parameters, stride {stride}, "
        f"receptive-field halo {halo} px"
    )

    sampler = _CropSampler(
        slices, split_cols, cfg.crop_px, stride, cfg.seed, n_classes, cfg.rare_class_fraction, pad=halo
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.15)
    mean_t = torch.tensor([n["mean"] for n in norm]).view(1, -1, 1, 1)
    std_t = torch.tensor([n["std"] for n in norm]).view(1, -1, 1, 1)

    ckpt_path = cfg.checkpoint or cfg.out.with_name(cfg.out.name + ".ckpt.pt")
    start_epoch = 0
    history: list[dict[str, Any]] = []
    if cfg.checkpoint is not None and cfg.checkpoint.is_file():
        state = torch.load(cfg.checkpoint, weights_only=False)
        if (
            state["arch"] != cfg.arch
            or state["base_channels"] != cfg.base_channels
            or state["depth"] != cfg.depth
        ):
            raise ValueError(
                f"{cfg.checkpoint}: checkpoint is a {state['arch']} model; --arch says {cfg.arch}"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        done = start_epoch * cfg.steps_per_epoch
        if state["scheduler"].get("total_steps") == total_steps:
            sched.load_state_dict(state["scheduler"])
        elif done < total_steps:
            # More (or fewer) epochs than the checkpoint was started with: the one-cycle schedule is
            # rebuilt over the new total and fast-forwarded to the steps already taken.
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.15, last_epoch=done - 1
            )
        norm = state["normalisation"]
        mean_t = torch.tensor([n["mean"] for n in norm]).view(1, -1, 1, 1)
        std_t = torch.tensor([n["std"] for n in norm]).view(1, -1, 1, 1)
        gen.set_state(state["torch_rng"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        history = list(state["history"])
        log(f"kintsugi train: resumed from {cfg.checkpoint} after epoch {start_epoch}")

    writer: Any = None
    if cfg.logdir is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore[import-not-found, unused-ignore]

            writer = SummaryWriter(str(cfg.logdir))
        except ImportError:
            log("kintsugi train: tensorboard is not installed; --logdir ignored")

    t_start = time.monotonic()
    epoch = start_epoch
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        model.train()
        t0 = time.monotonic()
        losses: list[float] = []
        for _ in range(cfg.steps_per_epoch):
            xb, yb = sampler.batch(cfg.batch_size)
            x, y = torch.from_numpy(xb), torch.from_numpy(yb)
            if cfg.augment:
                x, y = _augment(x, y, gen)
            x = (x - mean_t) / std_t
            logits = model(x)
            loss = nnf.cross_entropy(logits, y, ignore_index=IGNORE)
            if cfg.dice_weight:
                loss = loss + cfg.dice_weight * _dice_loss(logits, y, n_classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call, unused-ignore]
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
        entry: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0]}
        if cfg.val_fraction > 0:
            ious, miou = _validate(
                lambda im: _torch_predict(model, im, norm, stride, halo), val_slices, val_cols, n_classes
            )
            entry["val_iou"] = dict(zip(cfg.classes, ious, strict=True))
            entry["val_mean_iou"] = miou
        entry["seconds"] = time.monotonic() - t0
        history.append(entry)
        ious_txt = " ".join(f"{k}={v:.3f}" for k, v in entry.get("val_iou", {}).items() if v is not None)
        log(
            f"epoch {epoch:3d}/{cfg.epochs}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
            f"val mIoU {entry.get('val_mean_iou', float('nan')):.4f}  [{ious_txt}]  {entry['seconds']:.1f} s"
        )
        if writer is not None:
            writer.add_scalar("loss/train", entry["loss"], epoch)
            if "val_mean_iou" in entry:
                writer.add_scalar("iou/mean", entry["val_mean_iou"], epoch)
                for k, v in entry["val_iou"].items():
                    if v is not None:
                        writer.add_scalar(f"iou/{k}", v, epoch)
        _save_atomic(_checkpoint_state(model, opt, sched, epoch, history, cfg, norm, gen, sampler), ckpt_path)
        if (
            cfg.time_limit_s is not None
            and time.monotonic() - t_start > cfg.time_limit_s
            and epoch < cfg.epochs
        ):
            log(
                f"kintsugi train: time limit {cfg.time_limit_s:.0f} s reached after epoch {epoch}; "
                "stopping early"
            )
            break
    if writer is not None:
        writer.close()

    model.eval()
    last = history[-1] if history else {}
    val_iou: dict[str, float | None] = last.get("val_iou", {})
    training_meta = {
        "data": [asdict(i) for i in infos],
        "seeds": sorted({i.seed for i in infos if i.seed is not None}),
        "presets": sorted({i.preset for i in infos if i.preset is not None}),
        "pt_infiltration": sorted({i.pt_infiltration for i in infos if i.pt_infiltration is not None}),
        "epochs": epoch,
        "steps_per_epoch": cfg.steps_per_epoch,
        "batch_size": cfg.batch_size,
        "crop_px": sampler.crop,
        "optimizer": f"AdamW lr {cfg.lr} one-cycle, weight decay {cfg.weight_decay}",
        "loss": "cross-entropy + soft Dice" if cfg.dice_weight else "cross-entropy",
        "augmentation": "x-flip, gamma, contrast, brightness, noise" if cfg.augment else "none",
        "sampling": f"{cfg.rare_class_fraction:.0%} of crops centred on a pixel of a uniformly drawn class; "
        f"crops reach {sampler.pad} px into reflect-padded margins",
        "validation": f"right-most {cfg.val_fraction:.0%} of columns of every slice",
        "seed": cfg.seed,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "per_class_iou": val_iou,
        "mean_iou": last.get("val_mean_iou"),
        "framework": f"torch {torch.__version__}",
    }
    pixel = next((i.pixel_size_m for i in infos if i.pixel_size_m), 4.05e-8)
    meta = {
        "classes": list(cfg.classes),
        "channels": list(cfg.channels),
        "normalisation": norm,
        "pixel_size_m": pixel,
        "tile": cfg.tile,
        "halo": halo,
        "stride": stride,
        "layout": "NCHW",
        "training": training_meta,
        "version": MODEL_VERSION,
        "architecture": {
            "arch": cfg.arch,
            "base_channels": cfg.base_channels,
            "depth": cfg.depth,
            "parameters": n_params,
            "batchnorm_folded": True,
        },
    }
    diff = export_onnx(model, cfg.out, meta, opset=cfg.opset, sample=slices[0].image, log=log)
    quantised = False
    if cfg.quantise:
        quantised = _quantise(cfg, sampler, val_slices, val_cols, n_classes, log)
    return TrainResult(
        out=cfg.out,
        epochs_run=epoch,
        val_iou=val_iou,
        val_mean_iou=float(last.get("val_mean_iou", float("nan"))),
        max_abs_diff_ort_torch=diff,
        quantised=quantised,
        history=history,
        metadata=meta,
    )


def export_onnx(
    model: nn.Module,
    out: Path,
    meta: dict[str, Any],
    *,
    opset: int = 14,
    sample: FloatArray | None = None,
    log: Log = print,
    tolerance: float = 1e-3,
) -> float:
    """Export (BatchNorm folded, dynamic N/H/W) with `kintsugi.*` metadata; returns the max |ort - torch|
    logit difference on `sample` (a raw image, cropped to 256 px) and raises when it exceeds `tolerance`."""
    folded = fold_batchnorm(model) if isinstance(model, UNet) else copy.deepcopy(model).eval()
    if not isinstance(model, UNet):
        meta = {**meta, "architecture": {**meta.get("architecture", {}), "batchnorm_folded": False}}
    stride = int(meta["stride"])
    c = len(meta["channels"])
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
    _set_metadata(proto, meta)
    proto.doc_string = "kintsugi segmentation model: float32 [N,C,H,W] (normalised grey) -> logits [N,K,H,W]"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, out)

    if sample is None:
        sample = np.random.default_rng(0).random((c, 4 * stride, 4 * stride), dtype=np.float32)
    crop = sample[
        :, : min(256, sample.shape[1]) // stride * stride, : min(256, sample.shape[2]) // stride * stride
    ]
    x = normalise(np.ascontiguousarray(crop), meta["normalisation"])[None]
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    sess = ort_session(out)
    (got,) = sess.run(None, {"image": x})
    diff = float(np.abs(np.asarray(got) - ref).max())
    log(
        f"kintsugi train: wrote {out} ({out.stat().st_size / 1e6:.2f} MB, opset {opset}); "
        f"onnxruntime vs torch max |diff| {diff:.2e} on a {crop.shape[1]}x{crop.shape[2]} sample"
    )
    if not diff <= tolerance:
        raise RuntimeError(
            f"onnxruntime and torch disagree after export: max |diff| {diff:.3g} > {tolerance}"
        )
    return diff


def _set_metadata(proto: Any, meta: dict[str, Any]) -> None:
    keep = [p for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = json.dumps(value)


def _quantise(
    cfg: TrainConfig,
    sampler: _CropSampler,
    slices: Sequence[SliceData],
    split_cols: Sequence[int],
    n_classes: int,
    log: Log,
) -> bool:
    """Static int8 (QDQ, per-channel) quantisation calibrated on training crops; the int8 model replaces
    the float one only if the validation mean IoU drops by less than 0.01."""
    from onnxruntime.quantization import (  # type: ignore[import-untyped, unused-ignore]
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32 = ort_session(cfg.out)
    meta = onnx_metadata(fp32)
    norm = meta["normalisation"]
    rng = np.random.default_rng(cfg.seed + 1)
    calib_sampler = copy.copy(sampler)
    calib_sampler.rng = rng

    class _Reader(CalibrationDataReader):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            batches = [calib_sampler.batch(4)[0] for _ in range(8)]
            self._it: Iterator[dict[str, FloatArray]] = iter(
                [{"image": np.stack([normalise(im, norm) for im in b])} for b in batches]
            )

        def get_next(self) -> dict[str, FloatArray] | None:
            return next(self._it, None)

    q_path = cfg.out.with_name(cfg.out.stem + ".int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint on the root logger
    try:
        quantize_static(
            str(cfg.out),
            str(q_path),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)
    proto = onnx.load(str(q_path))
    _set_metadata(proto, {**meta, "quantisation": "int8 static QDQ, per-channel weights"})
    onnx.save(proto, str(q_path))
    int8 = ort_session(q_path)
    if cfg.val_fraction > 0:
        eval_slices, eval_cols = slices, split_cols
    else:  # no held-out strip: compare on the training images themselves
        eval_slices, eval_cols = slices, [0] * len(slices)
    _, m32 = _validate(lambda im: onnx_predict(fp32, im), eval_slices, eval_cols, n_classes)
    _, m8 = _validate(lambda im: onnx_predict(int8, im), eval_slices, eval_cols, n_classes)
    keep = (m32 - m8) < 0.01
    log(
        f"kintsugi train: int8 quantisation: validation mean IoU float32 {m32:.4f}, int8 {m8:.4f} "
        f"(drop {m32 - m8:+.4f}) -> {'kept int8' if keep else 'kept float32'}"
    )
    if keep:
        os.replace(q_path, cfg.out)
    else:
        q_path.unlink(missing_ok=True)
    return keep
