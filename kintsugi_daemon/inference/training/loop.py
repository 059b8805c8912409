"""`kintsugi train`: the training loop, its checkpoints and the contract written into the exported model.

Choices worth knowing:
- Validation is a spatial hold-out: the right-most `val_fraction` of every slice's columns is never
  cropped for training. Consecutive slices are ~40 nm apart and nearly identical, so holding out whole
  slices would leak; a column strip keeps the collector (at the bottom) in both parts.
- `init` starts from an exported kintsugi U-Net (`builtin`: the shipped model) and keeps its
  normalisation, so a handful of annotated slices fine-tune it instead of training from nothing.
- The halo written into the metadata is the receptive-field radius measured from the gradient support of
  one output pixel, rounded up to the network's stride.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch  # type: ignore[import-not-found, unused-ignore]
from torch import nn  # type: ignore[import-not-found, unused-ignore]
from torch.nn import functional as nnf  # type: ignore[import-not-found, unused-ignore]

from kintsugi_daemon.inference.contract import ModelSpec, Normalisation
from kintsugi_daemon.inference.grey_match import class_grey_statistics
from kintsugi_daemon.inference.training.annotations import load_training_data
from kintsugi_daemon.inference.training.data import (
    DEFAULT_CHANNELS,
    IGNORE,
    TRAIN_CLASSES,
    FolderInfo,
    SliceData,
)
from kintsugi_daemon.inference.training.evaluation import validate
from kintsugi_daemon.inference.training.export import Log, export_onnx, quantise
from kintsugi_daemon.inference.training.model import (
    Arch,
    TorchTiled,
    build_model,
    measure_receptive_radius,
    model_stride,
    read_onnx_metadata,
    unet_from_onnx,
)
from kintsugi_daemon.inference.training.sampling import CropSampler, augment, dice_loss

__all__ = ["MODEL_VERSION", "TrainConfig", "TrainResult", "train"]

MODEL_VERSION = "1.0.0"


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
    init: Path | None = None  # fine-tune an exported kintsugi U-Net instead of starting from scratch
    mapping: Path | None = None  # label value -> class mapping for annotation folders without their own
    quantise: bool = False
    logdir: Path | None = None  # TensorBoard scalars, when tensorboard is installed
    threads: int = 2
    opset: int = 14
    tile: int = 512  # network input side incl. halos (the tiler's meaning): 512 - 2*48 keeps 416 px
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    classes: tuple[str, ...] = TRAIN_CLASSES
    augment: bool = True
    rare_class_fraction: float = 0.3
    time_limit_s: float | None = None
    device: str = "cpu"  # torch device for the training steps ("cuda" on a GPU machine); export is on CPU

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


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_data(cfg: TrainConfig) -> tuple[list[SliceData], list[FolderInfo]]:
    slices: list[SliceData] = []
    infos: list[FolderInfo] = []
    for folder in cfg.data:
        s, info = load_training_data(
            folder, cfg.channels, cfg.classes, cfg.max_slices_per_folder, mapping=cfg.mapping
        )
        slices += s
        infos.append(info)
    pixel_sizes = {round(i.pixel_size_m, 12) for i in infos if i.pixel_size_m}
    if len(pixel_sizes) > 1:
        raise ValueError(
            "training data mixes pixel sizes "
            + ", ".join(f"{i.path}: {i.pixel_size_m * 1e9:.1f} nm" for i in infos if i.pixel_size_m)
        )
    return slices, infos


def _initial_model(
    cfg: TrainConfig, slices: list[SliceData], split_cols: list[int]
) -> tuple[nn.Module, list[Normalisation], dict[str, Any]]:
    """(network, normalisation, architecture record): fresh, or the weights and normalisation of `init`."""
    if cfg.init is not None:
        props = read_onnx_metadata(cfg.init)
        if list(props.get("channels", [])) != list(cfg.channels) or list(props.get("classes", [])) != list(
            cfg.classes
        ):
            raise ValueError(
                f"{cfg.init}: channels {props.get('channels')} / classes {props.get('classes')} differ from "
                f"the training's {list(cfg.channels)} / {list(cfg.classes)}"
            )
        net: nn.Module = unet_from_onnx(cfg.init)
        norm = [Normalisation.model_validate(n) for n in props["normalisation"]]
        return net, norm, {**props["architecture"], "initialised_from": cfg.init.name}
    train_px = np.concatenate(
        [s.image[:, :, :c].reshape(s.image.shape[0], -1) for s, c in zip(slices, split_cols, strict=True)],
        axis=1,
    )
    norm = [
        Normalisation(mean=round(float(m), 6), std=round(float(max(sd, 1e-6)), 6))
        for m, sd in zip(train_px.mean(1), train_px.std(1), strict=True)
    ]
    net = build_model(cfg.arch, len(cfg.channels), len(cfg.classes), cfg.base_channels, cfg.depth)
    arch = {"arch": cfg.arch, "base_channels": cfg.base_channels, "depth": cfg.depth}
    return net, norm, arch


@dataclass
class _Session:
    """Everything one training run mutates; a checkpoint is exactly its state."""

    cfg: TrainConfig
    model: nn.Module
    norm: list[Normalisation]
    arch: dict[str, Any]
    sampler: CropSampler
    gen: Any  # torch.Generator
    opt: Any  # torch.optim.Optimizer
    sched: Any  # the one-cycle LR scheduler
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    # the augmentation's per-pixel noise on a GPU (None on the CPU: `gen` draws it there)
    field_gen: Any = None

    @classmethod
    def start(
        cls,
        cfg: TrainConfig,
        model: nn.Module,
        norm: list[Normalisation],
        arch: dict[str, Any],
        sampler: CropSampler,
    ) -> _Session:
        model.to(cfg.device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=cfg.epochs * cfg.steps_per_epoch, pct_start=0.15
        )
        run = cls(cfg, model, norm, arch, sampler, torch.Generator().manual_seed(cfg.seed), opt, sched)
        if torch.device(cfg.device).type != "cpu":
            run.field_gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        return run

    def resume(self, path: Path, log: Log) -> None:
        cfg = self.cfg
        state = torch.load(path, weights_only=False, map_location=cfg.device)
        if state["architecture"] != self.arch:
            raise ValueError(
                f"{path}: checkpoint is a {state['architecture']} model; this run builds {self.arch}"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        done, total = self.epoch * cfg.steps_per_epoch, cfg.epochs * cfg.steps_per_epoch
        if state["scheduler"].get("total_steps") == total:
            self.sched.load_state_dict(state["scheduler"])
        elif done < total:
            # More (or fewer) epochs than the checkpoint was started with: the one-cycle schedule is
            # rebuilt over the new total and fast-forwarded to the steps already taken.
            self.sched = torch.optim.lr_scheduler.OneCycleLR(
                self.opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15, last_epoch=done - 1
            )
        self.norm = [Normalisation.model_validate(n) for n in state["normalisation"]]
        self.gen.set_state(state["torch_rng"])
        if self.field_gen is not None and state.get("field_rng") is not None:
            self.field_gen.set_state(state["field_rng"].cpu())
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        self.history = list(state["history"])
        log(f"kintsugi train: resumed from {path} after epoch {self.epoch}")

    def save(self, path: Path) -> None:
        _save_atomic(
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "epoch": self.epoch,
                "history": self.history,
                "normalisation": [n.model_dump() for n in self.norm],
                "architecture": self.arch,
                "torch_rng": self.gen.get_state(),
                "field_rng": None if self.field_gen is None else self.field_gen.get_state(),
                "sampler_rng": self.sampler.rng.bit_generator.state,
            },
            path,
        )

    def run_epoch(self) -> float:
        """One epoch of steps; the mean loss."""
        cfg = self.cfg
        mean_t = torch.tensor([n.mean for n in self.norm], device=cfg.device).view(1, -1, 1, 1)
        std_t = torch.tensor([n.std for n in self.norm], device=cfg.device).view(1, -1, 1, 1)
        self.model.train()
        losses: list[float] = []
        for _ in range(cfg.steps_per_epoch):
            xb, yb = self.sampler.batch(cfg.batch_size)
            x, y = torch.from_numpy(xb).to(cfg.device), torch.from_numpy(yb).to(cfg.device)
            if cfg.augment:
                x, y = augment(x, y, self.gen, self.field_gen)
            logits = self.model((x - mean_t) / std_t)
            loss = nnf.cross_entropy(logits, y, ignore_index=IGNORE)
            if cfg.dice_weight:
                loss = loss + cfg.dice_weight * dice_loss(logits, y, len(cfg.classes))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call, unused-ignore]
            self.opt.step()
            self.sched.step()
            losses.append(float(loss.detach()))
        self.model.eval()
        self.epoch += 1
        return float(np.mean(losses))


def _training_record(
    cfg: TrainConfig, infos: list[FolderInfo], run: _Session, last: dict[str, Any]
) -> dict[str, Any]:
    """`kintsugi.training`: what the model was trained on and how (the model card's facts)."""
    return {
        "data": [asdict(i) for i in infos],
        "seeds": sorted({i.seed for i in infos if i.seed is not None}),
        "presets": sorted({i.preset for i in infos if i.preset is not None}),
        "pt_infiltration": sorted({i.pt_infiltration for i in infos if i.pt_infiltration is not None}),
        "epochs": run.epoch,
        "steps_per_epoch": cfg.steps_per_epoch,
        "batch_size": cfg.batch_size,
        "crop_px": run.sampler.crop,
        "optimizer": f"AdamW lr {cfg.lr} one-cycle, weight decay {cfg.weight_decay}",
        "loss": "cross-entropy + soft Dice" if cfg.dice_weight else "cross-entropy",
        "augmentation": "x-flip, blur (sigma <= 1.2 px), gamma exp(+-0.3), contrast x0.6-1.6 about the crop "
        "mean or mid-grey, brightness +-0.12, curtaining (<= 6 %), noise (sigma <= 0.03), clipped to 0..1"
        if cfg.augment
        else "none",
        "sampling": f"{cfg.rare_class_fraction:.0%} of crops centred on a pixel of a uniformly drawn class; "
        f"crops reach {run.sampler.pad} px into reflect-padded margins",
        "validation": f"right-most {cfg.val_fraction:.0%} of columns of every slice",
        "initialised_from": cfg.init.name if cfg.init else None,
        "seed": cfg.seed,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "per_class_iou": last.get("val_iou", {}),
        "mean_iou": last.get("val_mean_iou"),
        "framework": f"torch {torch.__version__}",
    }


def _halo(model: nn.Module, cfg: TrainConfig) -> tuple[int, int]:
    """(stride, halo): the measured receptive-field radius rounded up to the stride."""
    stride = model_stride(model)
    halo = measure_receptive_radius(model, len(cfg.channels), stride)
    halo = int(math.ceil(halo / stride) * stride)
    if cfg.tile % stride or cfg.tile <= 2 * halo:
        raise ValueError(
            f"tile {cfg.tile} must be a multiple of the stride {stride} and exceed 2 x halo {halo}"
        )
    return stride, halo


def _tensorboard(cfg: TrainConfig, log: Log) -> Any:
    if cfg.logdir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        log("kintsugi train: tensorboard is not installed; --logdir ignored")
        return None
    return SummaryWriter(str(cfg.logdir))


def train(cfg: TrainConfig, log: Log = print) -> TrainResult:
    """Train, validate per epoch, export ONNX with metadata, verify onnxruntime against torch, and
    optionally quantise. Deterministic for a given seed, data and thread count."""
    torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    slices, infos = _load_data(cfg)
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
    model, norm, arch = _initial_model(cfg, slices, split_cols)
    # The training pixels' per-class grey levels, for the confidence's check that a slice looks like the
    # training data; a fine-tuned model keeps its parent's statistics for classes its data lacks.
    grey_stats = class_grey_statistics(
        [(s.image[:, :, :c], s.labels[:, :c]) for s, c in zip(slices, split_cols, strict=True)], cfg.classes
    )
    if cfg.init is not None:
        grey_stats = {**(read_onnx_metadata(cfg.init).get("grey_statistics") or {}), **grey_stats}
    stride, halo = _halo(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"kintsugi train: {arch['arch']}, {n_params / 1e6:.3f} M parameters, stride {stride}, "
        f"receptive-field halo {halo} px" + (f", initialised from {cfg.init}" if cfg.init else "")
    )
    sampler = CropSampler(
        slices, split_cols, cfg.crop_px, stride, cfg.seed, len(cfg.classes), cfg.rare_class_fraction, pad=halo
    )
    run = _Session.start(cfg, model, norm, arch, sampler)
    ckpt_path = cfg.checkpoint or cfg.out.with_name(cfg.out.name + ".ckpt.pt")
    if cfg.checkpoint is not None and cfg.checkpoint.is_file():
        run.resume(cfg.checkpoint, log)
    pixel = next((i.pixel_size_m for i in infos if i.pixel_size_m), 4.05e-8)

    def spec_with(training: dict[str, Any]) -> ModelSpec:
        return ModelSpec(
            classes=list(cfg.classes),
            channels=list(cfg.channels),
            normalisation=run.norm,
            pixel_size_m=pixel,
            tile=cfg.tile,
            halo=halo,
            stride=stride,
            layout="NCHW",
            training=training,
            version=MODEL_VERSION,
            grey_statistics=grey_stats or None,
        )

    writer = _tensorboard(cfg, log)
    t_start = time.monotonic()
    while run.epoch < cfg.epochs:
        t0 = time.monotonic()
        entry: dict[str, Any] = {
            "epoch": run.epoch + 1,
            "loss": run.run_epoch(),
            "lr": run.sched.get_last_lr()[0],
        }
        if cfg.val_fraction > 0:
            entry["val_iou"], entry["val_mean_iou"] = validate(
                TorchTiled(model, spec_with({})), val_slices, val_cols
            )
        entry["seconds"] = time.monotonic() - t0
        run.history.append(entry)
        ious_txt = " ".join(f"{k}={v:.3f}" for k, v in entry.get("val_iou", {}).items() if v is not None)
        log(
            f"epoch {run.epoch:3d}/{cfg.epochs}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
            f"val mIoU {entry.get('val_mean_iou', float('nan')):.4f}  [{ious_txt}]  {entry['seconds']:.1f} s"
        )
        if writer is not None:
            for key, value in [("loss/train", entry["loss"]), *entry.get("val_iou", {}).items()]:
                if value is not None:
                    writer.add_scalar(key if "/" in key else f"iou/{key}", value, run.epoch)
        run.save(ckpt_path)
        if (
            cfg.time_limit_s is not None
            and time.monotonic() - t_start > cfg.time_limit_s
            and run.epoch < cfg.epochs
        ):
            log(
                f"kintsugi train: time limit {cfg.time_limit_s:.0f} s reached after epoch {run.epoch}; "
                "stopping early"
            )
            break

    if writer is not None:
        writer.close()
    last = run.history[-1] if run.history else {}
    spec = spec_with(_training_record(cfg, infos, run, last))
    architecture = {**arch, "parameters": n_params, "batchnorm_folded": True}
    model.cpu()
    diff = export_onnx(
        model, cfg.out, spec, {"architecture": architecture}, opset=cfg.opset, sample=slices[0].image, log=log
    )
    quantised = quantise(cfg.out, sampler, val_slices, val_cols, cfg.seed, log) if cfg.quantise else False
    return TrainResult(
        out=cfg.out,
        epochs_run=run.epoch,
        val_iou=last.get("val_iou", {}),
        val_mean_iou=float(last.get("val_mean_iou", float("nan"))),
        max_abs_diff_ort_torch=diff,
        quantised=quantised,
        history=run.history,
        metadata={**spec.model_dump(mode="json"), "architecture": architecture},
    )
