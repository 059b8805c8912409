"""`kintsugi segment [--model M] INPUT --out DIR`: offline segmentation with the daemon's code path.

INPUT is a dataset folder with a `dataset.json` manifest (the simulator's export, or real annotated
slices in the same shape), or per-detector TIFFs given as `--image cbs=a.tif --image tld=b.tif`. Label
TIFFs carry the manifest's class values (the canonical ones otherwise); a dataset's slices keep the
manifest's label file names. Where ground truth exists, per-class IoU over all slices is printed, with
the mean over pore/active/cbd/collector and the porosity error. `segment.json` in DIR records the
per-slice IoU and metrics.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kintsugi_daemon.inference.contract import (
    CANONICAL_CLASSES,
    OUTSIDE_LABEL,
    SHIPPED_MODEL,
    SegmentationModel,
    check_against_recipe,
    load_model,
    resolve_model,
)
from kintsugi_daemon.inference.datasets import (
    DatasetError,
    SliceItem,
    dataset_items,
    load_manifest,
    read_tiff,
)
from kintsugi_daemon.inference.metrics import (
    MEAN_IOU_CLASSES,
    iou_counts,
    iou_per_class,
    mean_iou,
    phase_fractions,
    slice_metrics,
)
from kintsugi_daemon.inference.overlay import overlay, save_overlay
from kintsugi_daemon.inference.tiling import segment
from kintsugi_daemon.service.atomic import write_json_atomic, write_tiff_atomic

__all__ = ["register"]


@dataclass
class _Totals:
    counts: dict[str, list[int]] = field(default_factory=dict)  # class -> [intersection, union]
    pred_pores: int = 0
    true_pores: int = 0
    pixels: int = 0

    def add(self, pred: np.ndarray, truth: np.ndarray, classes: Mapping[str, int]) -> None:
        for name, (i, u) in iou_counts(pred, truth, classes).items():
            acc = self.counts.setdefault(name, [0, 0])
            acc[0] += i
            acc[1] += u
        pores = [v for n, v in classes.items() if n in ("pore", "unfilled_pore")]
        inside = truth != OUTSIDE_LABEL  # the Pt cap and vacuum are no phase: fractions are of the specimen
        self.pred_pores += int((np.isin(pred, pores) & inside).sum())
        self.true_pores += int(np.isin(truth, pores).sum())
        self.pixels += int(inside.sum())


def _parse_image(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path:
        raise argparse.ArgumentTypeError(f"expected DETECTOR=FILE (e.g. cbs=slice_cbs.tif), got {spec!r}")
    return name.strip(), Path(path)


def _open_model(path: Path | None, threads: int | None) -> SegmentationModel:
    if path is None:
        if not SHIPPED_MODEL.is_file():
            raise DatasetError(
                f"the shipped model {SHIPPED_MODEL} is not installed (not trained yet?): pass --model "
                f"FILE.onnx, or train one with `kintsugi train DATA --out {SHIPPED_MODEL}`"
            )
        path = SHIPPED_MODEL
    return load_model(resolve_model(path), threads=threads)


def _progress(done: int, total: int, item: SliceItem, seconds: float, miou: float | None) -> None:
    score = f"  mean IoU {miou:.3f}" if miou is not None else ""
    print(
        f"kintsugi segment: {done}/{total} {item.name}: {seconds:.2f} s{score}", file=sys.stderr, flush=True
    )


def _print_report(totals: _Totals, classes: Mapping[str, int]) -> None:
    ious = {n: (i / u if u else None) for n, (i, u) in totals.counts.items()}
    print("per-class IoU (all slices)")
    for name in classes:
        v = ious.get(name)
        print(f"  {name:14s} {'n/a (absent)' if v is None else f'{v:.4f}'}")
    m = mean_iou(ious)
    print(f"  {'mean IoU':14s} {'n/a' if m is None else f'{m:.4f}'} (over {'/'.join(MEAN_IOU_CLASSES)})")
    pred, true = totals.pred_pores / totals.pixels, totals.true_pores / totals.pixels
    print(f"  {'porosity':14s} {pred:.4f} predicted, {true:.4f} true, error {pred - true:+.4f}")


def run_segment(
    model: SegmentationModel,
    items: list[SliceItem],
    out: Path,
    classes: Mapping[str, int],
    pixel_size_m: float,
    write_overlay: bool,
) -> dict[str, Any]:
    """Segment every item into `out`; returns the summary written as segment.json."""
    missing = [c for c in model.spec.classes if c not in classes]
    if missing:
        raise DatasetError(f"the model's class(es) {missing} have no label value in the manifest")
    # Canonical values (what `segment` returns) -> the manifest's values.
    remap = np.arange(256, dtype=np.uint8)
    for name in model.spec.classes:
        remap[CANONICAL_CLASSES[name]] = classes[name]
    out.mkdir(parents=True, exist_ok=True)
    totals = _Totals()
    summary: dict[str, Any] = {
        "model": str(model.path),
        "model_version": model.spec.version,
        "classes": dict(classes),
        "slices": [],
    }
    for n, item in enumerate(items, start=1):
        images = {k: read_tiff(p, f"{k} image") for k, p in item.images.items()}
        t0 = time.monotonic()
        seg = segment(model, images)
        seconds = time.monotonic() - t0
        labels = remap[seg.labels]
        write_tiff_atomic(
            out / item.out_name,
            labels,
            {"classes": dict(classes), "model": model.path.name, "model_version": model.spec.version},
        )
        record: dict[str, Any] = {"name": item.name, "labels": item.out_name, "seconds": round(seconds, 3)}
        metrics = slice_metrics(
            seg.labels,
            pixel_size_m,
            max_probability=seg.max_probability,
            entropy=seg.entropy,
            grey_match=seg.grey_match,
        )
        record["metrics"] = metrics.model_dump(mode="json")
        miou = None
        if item.truth is not None and item.truth.is_file():
            truth = read_tiff(item.truth, "ground-truth labels")
            if truth.shape != labels.shape:
                raise DatasetError(
                    f"ground truth {item.truth} is {truth.shape}, the images are {labels.shape}"
                )
            totals.add(labels, truth, classes)
            ious = iou_per_class(labels, truth, classes)
            miou = mean_iou(ious)
            record["iou"] = ious
            record["mean_iou"] = miou
            specimen = np.where(truth == OUTSIDE_LABEL, np.uint8(OUTSIDE_LABEL), labels)
            fr_p, fr_t = phase_fractions(specimen, classes), phase_fractions(truth, classes)
            record["porosity_error"] = sum(
                fr_p.get(k, 0.0) - fr_t.get(k, 0.0) for k in ("pore", "unfilled_pore")
            )
        if write_overlay:
            first = next(c for c in images if c.casefold() == model.spec.channels[0].casefold())
            preview = Path(item.out_name).stem + "_overlay.png"
            save_overlay(out / preview, overlay(images[first], seg.labels))
            record["overlay"] = preview
        summary["slices"].append(record)
        _progress(n, len(items), item, seconds, miou)
    if totals.pixels:
        ious_all = {k: (i / u if u else None) for k, (i, u) in totals.counts.items()}
        summary["iou"] = ious_all
        summary["mean_iou"] = mean_iou(ious_all)
        summary["porosity_error"] = (totals.pred_pores - totals.true_pores) / totals.pixels
        _print_report(totals, classes)
    else:
        print("no ground-truth labels found: IoU not computed")
    write_json_atomic(out / "segment.json", summary)
    print(f"labels written to {out.resolve()}")
    return summary


def _main(args: argparse.Namespace) -> int:
    if (args.input is None) == (not args.image):
        raise DatasetError("give either a dataset folder or --image DETECTOR=FILE (one per detector)")
    if args.truth is not None and args.input is not None:
        raise DatasetError("--truth goes with --image; a dataset's manifest names its own labels")
    model = _open_model(args.model, args.threads)
    if args.input is not None:
        folder: Path = args.input
        if not folder.is_dir():
            raise DatasetError(f"dataset folder {folder} does not exist")
        if folder.resolve() == args.out.resolve():
            raise DatasetError(
                f"--out {args.out} is the dataset folder: its ground truth would be overwritten"
            )
        manifest = load_manifest(folder)
        detectors = manifest.get("detectors") or sorted({k for s in manifest["slices"] for k in s["images"]})
        pixel_size = args.pixel_size_m if args.pixel_size_m is not None else manifest.get("pixel_size_m")
        check_against_recipe(model.spec, detectors, (), pixel_size)
        classes = manifest.get("classes") or CANONICAL_CLASSES
        items = dataset_items(folder, manifest)
    else:
        images = dict(args.image)
        if len(images) != len(args.image):
            raise DatasetError("a detector was given twice with --image")
        check_against_recipe(model.spec, list(images), (), args.pixel_size_m)
        # Named after the model's first channel's file, whatever order the flags came in.
        lead = model.spec.channels[0].casefold()
        first = next((p for k, p in args.image if k.casefold() == lead), Path(args.image[0][1]))
        classes = CANONICAL_CLASSES
        items = [
            SliceItem(name=first.name, images=images, out_name=f"{first.stem}_labels.tif", truth=args.truth)
        ]
        pixel_size = args.pixel_size_m
    # Metrics need a pixel size; without one given, the model's training pixel size is the best guess.
    pixel = pixel_size if pixel_size is not None else model.spec.pixel_size_m
    run_segment(model, items, args.out, classes, pixel, args.overlay)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "segment",
        help="segment a dataset folder or per-detector TIFFs with an ONNX model; print IoU vs ground truth",
    )
    p.add_argument("input", type=Path, nargs="?", help="dataset folder with dataset.json")
    p.add_argument(
        "--image",
        type=_parse_image,
        action="append",
        default=[],
        metavar="DETECTOR=FILE",
        help="a detector image instead of a dataset (repeat per detector)",
    )
    p.add_argument("--truth", type=Path, help="ground-truth label TIFF for --image input")
    p.add_argument("--out", type=Path, required=True, help="folder for the label TIFFs")
    p.add_argument(
        "--model",
        type=Path,
        help=f"ONNX model, or builtin / builtin-int8 (default: the shipped {SHIPPED_MODEL.name})",
    )
    p.add_argument("--threads", type=int, help="inference threads (default: the CPUs this process may use)")
    p.add_argument("--pixel-size-m", type=float, help="pixel size, checked against the model's")
    p.add_argument("--overlay", action="store_true", help="also write a colour overlay PNG per slice")
    p.set_defaults(handler=_main)
