"""`kintsugi quantize MODEL --calibration DATA... --check DATA... --out INT8.onnx`: an int8 twin of a model.

The int8 model is kept only if its mean IoU on the `--check` folders (slices the model never saw) is
within `--max-drop` of the float model's; otherwise nothing is written and the command says why.
Needs the `onnx` package (dev or train extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kintsugi_daemon.inference.contract import SHIPPED_MODEL, SegmentationModel, load_model
from kintsugi_daemon.inference.datasets import DatasetError, dataset_items, load_manifest, read_tiff
from kintsugi_daemon.inference.metrics import MEAN_IOU_CLASSES, iou_counts
from kintsugi_daemon.inference.tiling import segment

__all__ = ["held_out_miou", "register"]


def held_out_miou(model: SegmentationModel, folders: Sequence[Path]) -> tuple[float, float]:
    """Mean IoU (pooled over all slices, MEAN_IOU_CLASSES) and mean seconds per slice."""
    totals: dict[str, list[int]] = {}
    seconds: list[float] = []
    for folder in folders:
        manifest = load_manifest(folder)
        classes = manifest.get("classes")
        if not isinstance(classes, dict):
            raise DatasetError(f"{folder / 'dataset.json'} lacks a 'classes' mapping")
        for item in dataset_items(folder, manifest):
            if item.truth is None:
                raise DatasetError(f"{folder / 'dataset.json'}: {item.name} has no labels to check against")
            images = {
                name: read_tiff(path, f"{item.name} {name} image") for name, path in item.images.items()
            }
            truth = read_tiff(item.truth, f"{item.name} labels")
            t0 = time.perf_counter()
            labels = segment(model, images).labels
            seconds.append(time.perf_counter() - t0)
            for name, (i, u) in iou_counts(labels, truth, classes).items():
                acc = totals.setdefault(name, [0, 0])
                acc[0] += i
                acc[1] += u
    ious = [i / u for n, (i, u) in totals.items() if n in MEAN_IOU_CLASSES and u]
    if not ious:
        raise DatasetError("the check folders hold none of the scored classes")
    return float(np.mean(ious)), float(np.mean(seconds))


def _main(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("onnx") is None:
        print(
            "kintsugi quantize: needs the onnx package: pip install -e '.[dev]' (or '.[train]')",
            file=sys.stderr,
        )
        return 2
    from kintsugi_daemon.inference.quantize import calibration_crops, quantize_int8

    if args.out.resolve() == args.model.resolve():
        raise ValueError("--out must differ from MODEL: the float model is the reference for --check")
    for folder in (*args.calibration, *args.check):
        if not (folder / "dataset.json").is_file():
            raise DatasetError(f"{folder} is not a dataset folder (no dataset.json)")
    crops = calibration_crops(args.model, args.calibration, crop_px=args.crop_px, seed=args.seed)
    print(f"kintsugi quantize: calibrating on {len(crops)} crops of {args.crop_px} px", flush=True)
    quantize_int8(args.model, args.out, crops, extra_note=f" from {len(args.calibration)} dataset(s)")
    fp32, int8 = load_model(args.model, threads=args.threads), load_model(args.out, threads=args.threads)
    m32, t32 = held_out_miou(fp32, args.check)
    m8, t8 = held_out_miou(int8, args.check)
    print(
        f"kintsugi quantize: mean IoU float32 {m32:.4f} ({t32:.2f} s/slice), int8 {m8:.4f} "
        f"({t8:.2f} s/slice), drop {m32 - m8:+.4f}, speed-up {t32 / t8:.2f}x",
        flush=True,
    )
    if m32 - m8 >= args.max_drop:
        args.out.unlink(missing_ok=True)
        print(
            f"kintsugi quantize: the int8 model loses {m32 - m8:.4f} mean IoU (limit {args.max_drop}); "
            "not written",
            file=sys.stderr,
        )
        return 1
    print(f"kintsugi quantize: wrote {args.out}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser(
        "quantize",
        help="int8 (static QDQ) twin of a segmentation model, kept only if accuracy holds (needs onnx)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument(
        "model", type=Path, nargs="?", default=SHIPPED_MODEL, help="float model (default: shipped)"
    )
    q.add_argument(
        "--calibration", type=Path, nargs="+", required=True, help="dataset folder(s) to calibrate on"
    )
    q.add_argument("--check", type=Path, nargs="+", required=True, help="held-out dataset folder(s)")
    q.add_argument("--out", type=Path, required=True, help="the int8 ONNX file to write")
    q.add_argument("--max-drop", type=float, default=0.01, help="largest mean-IoU loss accepted")
    q.add_argument("--crop-px", type=int, default=256)
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(handler=_main)
