"""`kintsugi train DATA [DATA...] --out MODEL.onnx`: train and export a segmentation model.

Part of the `train` extra: torch is imported inside the handler only, so `kintsugi --help` and the daemon
never need it.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

__all__ = ["register"]

TRAIN_EXTRA_HINT = "install the train extra: pip install -e '.[train]'"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    t = sub.add_parser(
        "train",
        help="train a segmentation model on dataset folder(s) and export ONNX (train extra)",
        description="Train on folders of image/label pairs with a dataset.json manifest (for example "
        "`kintsugi-sim dataset --out D` then D/with-pt) and export an ONNX model with the kintsugi "
        "metadata. Needs the train extra: pip install -e '.[train]'.",
    )
    t.add_argument(
        "data",
        nargs="+",
        type=Path,
        metavar="DATA",
        help="dataset folder(s) with dataset.json, or annotation folder(s) with annotations.toml "
        "(Avizo / napari / Fiji / ilastik label TIFFs and a label-value -> class mapping)",
    )
    t.add_argument("--out", type=Path, required=True, help="output ONNX file")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument(
        "--arch",
        choices=["unet", "resnet18", "vgg16"],
        default="unet",
        help="plain U-Net, or a ResNet18/VGG16-encoder U-Net (needs segmentation-models-pytorch)",
    )
    t.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="resume from this file if it exists; written after every epoch",
    )
    t.add_argument(
        "--quantise",
        action="store_true",
        help="int8 static quantisation, kept only if the mean IoU drops by < 0.01",
    )
    t.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="fine-tune this exported kintsugi U-Net ('builtin': the shipped model) instead of training "
        "from scratch; keeps its architecture and normalisation",
    )
    t.add_argument(
        "--mapping",
        type=Path,
        default=None,
        help="annotations.toml to use for annotation folders that do not hold their own",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="right-most fraction of every slice's columns held out for validation",
    )
    t.add_argument(
        "--logdir", type=Path, default=None, help="TensorBoard log folder (if tensorboard is installed)"
    )
    t.add_argument("--base-channels", type=int, default=16)
    t.add_argument("--depth", type=int, default=3, help="number of 2x downsamplings of the plain U-Net")
    t.add_argument("--crop-px", type=int, default=160)
    t.add_argument("--batch-size", type=int, default=12)
    t.add_argument("--steps-per-epoch", type=int, default=50)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument(
        "--rare-class-fraction",
        type=float,
        default=0.3,
        help="fraction of crops centred on a pixel of a uniformly drawn class (rare classes seen often)",
    )
    t.add_argument(
        "--max-slices-per-folder",
        type=int,
        default=None,
        help="use at most this many slices of each folder, spread over the stack",
    )
    t.add_argument("--time-limit-s", type=float, default=None, help="stop after the epoch that passes it")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--device", default="cpu", help="torch device for training steps, e.g. cuda")
    t.add_argument("--opset", type=int, default=14)
    t.add_argument(
        "--tile",
        type=int,
        default=512,
        help="kintsugi.tile: the network input side the tiler feeds, halos included",
    )
    t.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx") is None:
        raise RuntimeError(f"`kintsugi train` needs torch and onnx; {TRAIN_EXTRA_HINT}")
    from kintsugi_daemon.inference.contract import SHIPPED_MODEL
    from kintsugi_daemon.inference.training import TrainConfig, train

    init = None if args.init is None else SHIPPED_MODEL if args.init == "builtin" else Path(args.init)

    cfg = TrainConfig(
        data=list(args.data),
        out=args.out,
        epochs=args.epochs,
        arch=args.arch,
        base_channels=args.base_channels,
        depth=args.depth,
        crop_px=args.crop_px,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        lr=args.lr,
        seed=args.seed,
        val_fraction=args.val_fraction,
        max_slices_per_folder=args.max_slices_per_folder,
        checkpoint=args.checkpoint,
        init=init,
        mapping=args.mapping,
        quantise=args.quantise,
        logdir=args.logdir,
        threads=args.threads,
        opset=args.opset,
        tile=args.tile,
        rare_class_fraction=args.rare_class_fraction,
        time_limit_s=args.time_limit_s,
        device=args.device,
    )
    result = train(cfg)
    ious = "  ".join(f"{k} {v:.3f}" for k, v in result.val_iou.items() if v is not None)
    val = f"validation mean IoU {result.val_mean_iou:.4f} ({ious})" if ious else "no validation split"
    print(
        f"kintsugi train: done after {result.epochs_run} epochs; {val}; model {result.out}"
        + (" (int8)" if result.quantised else "")
    )
    return 0
