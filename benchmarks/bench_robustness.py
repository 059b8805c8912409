"""(d) Out-of-distribution robustness and (e) fine-tuning on a few annotated slices.

(d) The shipped model on the held-out specimen (94:3:3, seed 101, with Pt) imaged away from its training
    conditions: shorter and longer dwell (noise), other beam voltages (in the simulator the voltage sets
    the electron range and so the sub-surface blur; yields stay those of 5 kV), and brightness/contrast
    shifts applied to the 16-bit images (what a detector re-tune does). Mean IoU next to the model's
    confidence (mean softmax probability of the chosen class x the grey-level match with the training
    data, `grey_match.py`): the confidence must drop where accuracy drops.
(e) Shifted physics (1 us dwell, 3 kV, contrast -35 %, brightness +10 %): the shipped model untouched vs
    fine-tuned with `kintsugi train --init builtin` on 1, 2 and 4 annotated slices of one specimen (written
    as a napari label stack with an annotations.toml, read by the real annotation reader), scored on
    another specimen with the same shifted physics. Needs torch (the train extra).
Run through `python -m benchmarks.bench_segmentation --parts de`.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from benchmarks.segmentation_common import (
    HELD_OUT_PRESET,
    HELD_OUT_SEED,
    THREADS,
    TRAIN_DEVICE,
    Images,
    Score,
    ensure_dataset,
    fmt,
    print_table,
    read_slices,
    score,
)
from kintsugi_daemon.inference.contract import CANONICAL_CLASSES, load_model

PIXEL_M = 4.05e-8
SHIFTED_IMAGING = {"dwell_s": 1e-6, "voltage_v": 3000.0}


def grey_shift(contrast: float, brightness: float) -> Callable[[Images], Images]:
    """A detector re-tune: grey' = (grey - 32768) * contrast + 32768 + brightness * 65535, clipped."""

    def apply(images: Images) -> Images:
        out = {}
        for name, img in images.items():
            g = (img.astype(np.float64) - 32768.0) * contrast + 32768.0 + brightness * 65535.0
            out[name] = np.clip(g, 0, 65535).astype(np.uint16)
        return out

    return apply


SHIFTED_GREY = grey_shift(0.65, 0.10)


def part_d(model_path: Path, data_dir: Path, quick: bool) -> None:
    model = load_model(model_path, threads=THREADS)
    w, h, n = (512, 384, 2) if quick else (1024, 768, 4)

    def held(imaging: dict[str, float] | None = None) -> Path:
        return (
            ensure_dataset(
                data_dir,
                seed=HELD_OUT_SEED,
                preset=HELD_OUT_PRESET,
                slices=n,
                width=w,
                height=h,
                imaging=imaging,
            )
            / "with-pt"
        )

    conditions: list[tuple[str, Path, Callable[[Images], Images] | None]] = [
        ("training conditions (5 kV, 3 us)", held(), None),
        ("dwell 1 us (noisier)", held({"dwell_s": 1e-6}), None),
        ("dwell 0.3 us (much noisier)", held({"dwell_s": 3e-7}), None),
        ("dwell 10 us", held({"dwell_s": 1e-5}), None),
        ("3 kV", held({"voltage_v": 3000.0}), None),
        ("10 kV", held({"voltage_v": 10000.0}), None),
        ("contrast -35 %", held(), grey_shift(0.65, 0.0)),
        ("contrast +50 %", held(), grey_shift(1.5, 0.0)),
        ("brightness +10 %", held(), grey_shift(1.0, 0.10)),
        ("brightness -10 %, contrast -35 %", held(), grey_shift(0.65, -0.10)),
        # beyond the training augmentation (gain x0.6-1.6, offset +-0.12): where accuracy finally drops
        ("brightness +30 %", held(), grey_shift(1.0, 0.30)),
        ("contrast -70 %, brightness +10 %", held(), grey_shift(0.30, 0.10)),
    ]
    print(
        f"\n(d) out-of-distribution robustness of {model_path.name}: {HELD_OUT_PRESET} seed {HELD_OUT_SEED} "
        f"with Pt, {n} slices of {w}x{h}"
    )
    results = [(name, score(model, folder, transform=t)) for name, folder, t in conditions]
    base = results[0][1]
    rows = [
        [
            name,
            fmt(s.mean4),
            f"{s.mean4 - base.mean4:+.3f}",
            fmt(s.softmax),
            fmt(s.grey_match),
            fmt(s.confidence),
            f"{s.confidence - base.confidence:+.3f}",
        ]
        for name, s in results
    ]
    worse = [(s.mean4 - base.mean4, s.confidence - base.confidence) for _, s in results[1:]]
    dropped = [(da, dc) for da, dc in worse if da < -0.02]
    agree = sum(1 for _, dc in dropped if dc < -0.02)
    alarms = sum(1 for da, dc in worse if da >= -0.02 and dc < -0.02)
    print_table(
        "mean IoU (pore, active, cbd, collector) and confidence per imaging condition",
        ["condition", "mIoU", "change", "softmax", "grey match", "confidence", "change"],
        rows,
        [
            f"accuracy dropped by > 0.02 in {len(dropped)} condition(s); confidence dropped by > 0.02 "
            f"in {agree} of them (and in {alarms} where accuracy held: greys unlike the training data)",
            "softmax = mean probability of the chosen class over the specimen pixels; grey match = overlap "
            "of each predicted class's grey levels with the training data's (kintsugi_daemon/inference/"
            "grey_match.py); confidence = softmax x grey match (the daemon's SliceMetrics.confidence)",
        ],
        key="seg-robustness",
    )


def _napari_folder(src: Path, out: Path, picks: list[int]) -> Path:
    """Write slices `picks` of a dataset folder as a napari-style annotation: stacks + annotations.toml."""
    out.mkdir(parents=True, exist_ok=True)
    data = read_slices(src)
    res: dict[str, Any] = {"resolution": (0.01 / PIXEL_M,) * 2, "resolutionunit": "CENTIMETER"}
    stacks = [SHIFTED_GREY(data[i][0]) for i in picks]
    for det in ("cbs", "tld"):
        tifffile.imwrite(out / f"{det}.tif", np.stack([s[det] for s in stacks]), **res)
    labels = np.stack([data[i][1] for i in picks]).astype(np.uint16) + 1  # napari: 0 = not annotated
    labels[labels == 256] = 0  # outside (255) -> not annotated
    tifffile.imwrite(out / "labels.tif", labels, **res)
    classes = "\n".join(f'{v + 1} = "{name}"' for name, v in CANONICAL_CLASSES.items())
    (out / "annotations.toml").write_text(
        f'format = "napari"\nlabels = "labels.tif"\n[images]\ncbs = "cbs.tif"\ntld = "tld.tif"\n'
        f'[classes]\n0 = "ignore"\n{classes}\n'
    )
    return out


def part_e(model_path: Path, data_dir: Path, quick: bool) -> None:
    if importlib.util.find_spec("torch") is None:
        print("\n(e) fine-tuning: skipped (needs torch: pip install -e '.[train]')")
        return
    from kintsugi_daemon.inference.training import TrainConfig, train

    w, h = (512, 384) if quick else (1024, 768)
    source = ensure_dataset(
        data_dir, seed=102, preset=HELD_OUT_PRESET, slices=4, width=w, height=h, imaging=SHIFTED_IMAGING
    )
    target = ensure_dataset(
        data_dir, seed=103, preset=HELD_OUT_PRESET, slices=2, width=w, height=h, imaging=SHIFTED_IMAGING
    )
    print(
        f"\n(e) fine-tuning {model_path.name} with --init on annotated slices of shifted physics "
        f"({SHIFTED_IMAGING}, contrast -35 %, brightness +10 %); scored on {HELD_OUT_PRESET} seed 103"
    )
    rows: list[list[str]] = []
    untouched = score(load_model(model_path, threads=THREADS), target / "with-pt", transform=SHIFTED_GREY)

    def row(name: str, s: Score, seconds: float | None) -> list[str]:
        return [
            name,
            fmt(s.mean4),
            fmt(s.iou["pore"]),
            fmt(s.iou["cbd"]),
            fmt(s.confidence),
            "-" if seconds is None else f"{seconds:.0f}",
        ]

    rows.append(row("shipped model, untouched", untouched, None))
    with tempfile.TemporaryDirectory(prefix="kintsugi-finetune-") as tmp:
        for k in (1, 2, 4):
            folder = _napari_folder(source / "with-pt", Path(tmp) / f"ann{k}", list(range(k)))
            t0 = time.perf_counter()
            cfg = TrainConfig(
                data=[folder],
                out=Path(tmp) / f"tuned{k}.onnx",
                init=model_path,
                epochs=3,
                steps_per_epoch=15,
                batch_size=8,
                crop_px=128,
                lr=1e-3,
                val_fraction=0.0,
                seed=0,
                threads=THREADS,
                device=TRAIN_DEVICE,
            )
            train(cfg, log=lambda _msg: None)
            s = score(load_model(cfg.out, threads=THREADS), target / "with-pt", transform=SHIFTED_GREY)
            rows.append(row(f"fine-tuned on {k} annotated slice(s)", s, time.perf_counter() - t0))
            print(f"  {rows[-1][0]}: mIoU {rows[-1][1]}", flush=True)
    print_table(
        "shifted physics: mean IoU (pore, active, cbd, collector) before and after fine-tuning",
        ["model", "mIoU", "pore IoU", "cbd IoU", "confidence", "train s"],
        rows,
        ["fine-tuning: 3 epochs x 15 steps of 8 crops of 128 px, lr 1e-3, from the shipped weights"],
        key="seg-fine-tuning",
    )


__all__ = ["SHIFTED_IMAGING", "grey_shift", "part_d", "part_e"]
