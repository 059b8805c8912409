"""Segmentation benchmark: every segmentation figure of the README from one command.

Run from the repository root: `python -m benchmarks.bench_segmentation [--quick] [--parts abcde]`.

(a) Held-out accuracy of the shipped model (kintsugi_daemon/inference/models/kintsugi-unet.onnx) on
    simulated specimens it never saw: preset 94:3:3 (not trained on) and seed 101 (not trained on), plus
    unseen seeds of the two training presets; with Pt (per-class IoU, mean IoU over pore/active/cbd/
    collector, porosity and CBD-fraction errors; target mean >= 0.95) and with failed infiltration (partial
    Pt and no Pt: unfilled-pore recall, target >= 0.9).
(b) The kintsugi claim, several training seeds (`benchmarks/bench_claim.py`; needs the train extra).
(c) Inference throughput (`benchmarks/bench_throughput.py`).
(d) Out-of-distribution robustness: dwell, voltage, brightness/contrast (`benchmarks/bench_robustness.py`).
(e) Fine-tuning with `--init builtin` on 1, 2, 4 annotated slices of shifted physics (train extra).

Everything printed is measured in this run; nothing is hard-coded. Generated specimens are kept under
`--data-dir` (default build/bench-segmentation) and reused.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.segmentation_common import (
    CANONICAL_CLASSES,
    HELD_OUT_PRESET,
    HELD_OUT_SEED,
    TARGET_MEAN_IOU,
    THREADS,
    TRAIN_PRESETS,
    Score,
    ensure_dataset,
    fmt,
    print_table,
    score,
)
from kintsugi_daemon.inference.contract import SHIPPED_MODEL, load_model
from simulator.dataset import PARTIAL_VARIANT


# ------------------------------------------------------------------------------------ (a) held out
def part_a(model_path: Path, data_dir: Path, quick: bool) -> None:
    model = load_model(model_path, threads=THREADS)
    training = model.spec.training
    print(
        f"\n(a) held-out accuracy of {model_path.name} (trained on presets {training.get('presets')}, "
        f"seeds {training.get('seeds')}; Pt {training.get('pt_infiltration')})"
    )
    specimens = [(HELD_OUT_PRESET, HELD_OUT_SEED)]
    if not quick:
        specimens += [(p, HELD_OUT_SEED) for p in TRAIN_PRESETS]
    size = (512, 384, 2) if quick else (1024, 768, 4)
    rows, fail_rows = [], []
    headline: tuple[Score, Score, Score] | None = None
    for preset, seed in specimens:
        root = ensure_dataset(
            data_dir, seed=seed, preset=preset, slices=size[2], width=size[0], height=size[1]
        )
        s, part, bare = (score(model, root / v) for v in ("with-pt", PARTIAL_VARIANT, "without-pt"))
        headline = headline or (s, part, bare)
        unseen = "preset+seed" if preset not in training.get("presets", TRAIN_PRESETS) else "seed"
        name = f"{preset} seed {seed} ({unseen} unseen)"
        rows.append(
            [
                name,
                *(fmt(s.iou[c]) for c in CANONICAL_CLASSES),
                fmt(s.mean4),
                f"{s.porosity_true:.3f}/{s.porosity_pred:.3f} ({s.porosity_error:+.3f})",
                f"{s.cbd_true:.3f}/{s.cbd_pred:.3f} ({s.cbd_error:+.3f})",
            ]
        )
        fail_rows.append(
            [
                name,
                fmt(part.unfilled_recall),
                fmt(part.iou["unfilled_pore"]),
                fmt(part.mean4),
                fmt(bare.unfilled_recall),
                fmt(bare.porosity_iou),
                fmt(bare.mean4_porosity),
                f"{bare.porosity_error:+.3f}",
            ]
        )
    print_table(
        f"held-out IoU with Pt, {size[2]} slices of {size[0]}x{size[1]} px per specimen",
        ["specimen", *CANONICAL_CLASSES, "mean4", "porosity true/pred (err)", "CBD true/pred (err)"],
        rows,
        [
            "mean4 = mean IoU over pore, active, cbd, collector",
            "porosity = pore + unfilled_pore share of the specimen pixels; CBD = cbd share",
            "pixels outside the specimen (Pt cap, vacuum; label 255) are not scored",
        ],
        key="seg-held-out",
    )
    print_table(
        "the same specimens with failed infiltration: partial Pt (half the face area without Pt) and no Pt",
        [
            "specimen",
            "partial: unfilled recall",
            "unfilled IoU",
            "mean4",
            "no Pt: unfilled recall",
            "porosity IoU",
            "mean (porosity)",
            "porosity err",
        ],
        fail_rows,
        [
            "unfilled recall = share of the unfilled-pore pixels labelled unfilled_pore",
            "(the fraction a Pt re-deposition decision reads)",
        ],
        key="seg-failed",
    )
    assert headline is not None
    s, part, bare = headline
    ok = s.mean4 >= TARGET_MEAN_IOU and min(part.unfilled_recall or 0, bare.unfilled_recall or 0) >= 0.9
    print(
        f"  targets on {HELD_OUT_PRESET} seed {HELD_OUT_SEED}: mean4 with Pt >= {TARGET_MEAN_IOU} "
        f"({s.mean4:.3f}); unfilled recall >= 0.9 with partial ({fmt(part.unfilled_recall)}) and no Pt "
        f"({fmt(bare.unfilled_recall)}) -> {'PASS' if ok else 'FAIL'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_segmentation", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="smaller held-out set and claim sweep (~10 min)")
    p.add_argument("--parts", default="abcde", help="which parts to run, e.g. 'ac'")
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    p.add_argument("--data-dir", type=Path, default=Path("build/bench-segmentation"))
    args = p.parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if "a" in args.parts:
        part_a(args.model, args.data_dir, args.quick)
    if "b" in args.parts:
        from benchmarks.bench_claim import part_b

        part_b(args.data_dir, args.quick)
    if "c" in args.parts:
        from benchmarks.bench_throughput import part_c

        part_c(args.model, args.data_dir, args.quick)
    if "d" in args.parts or "e" in args.parts:
        from benchmarks.bench_robustness import part_d, part_e

        if "d" in args.parts:
            part_d(args.model, args.data_dir, args.quick)
        if "e" in args.parts:
            part_e(args.model, args.data_dir, args.quick)
    print(f"\nbench_segmentation: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
