"""(b) The kintsugi claim: the same training budget on the same specimens rendered with and without Pt,
several training seeds (mean +- sd). Per-class IoU, porosity and CBD-fraction errors, recall on pore-back
pixels, and how many training slices each needs to reach a porosity IoU of 0.85 (needs torch: the train
extra). Without Pt an empty pore's label is `unfilled_pore`, so the comparable "pore IoU" is the IoU of the
porosity union pore + unfilled_pore. Run through `python -m benchmarks.bench_segmentation --parts b`.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from benchmarks.segmentation_common import (
    CLAIM_PORE_IOU,
    HELD_OUT_PRESET,
    HELD_OUT_SEED,
    POROSITY,
    THREADS,
    TRAIN_DEVICE,
    TRAIN_PRESETS,
    Score,
    ensure_dataset,
    fmt,
    pore_back_masks,
    print_table,
    read_slices,
    score,
)
from kintsugi_daemon.inference.contract import (
    load_model,
)


# ---------------------------------------------------------------------------------- (b) the claim
@dataclass(frozen=True)
class ClaimBudget:
    counts: tuple[int, ...]
    epochs: int
    steps_per_epoch: int
    batch_size: int
    crop_px: int
    width: int
    height: int


TRAIN_SEEDS = (0, 1, 2)


def _mean_sd(values: Sequence[float | None]) -> str:
    got = [v for v in values if v is not None and not math.isnan(v)]
    if not got:
        return "-"
    sd = statistics.stdev(got) if len(got) > 1 else 0.0
    return f"{statistics.fmean(got):.3f} +- {sd:.3f}"


def _claim_pool(data_dir: Path, budget: ClaimBudget) -> tuple[list[Path], Path]:
    # One slice per specimen (consecutive slices are 40 nm apart: near-duplicates), alternating presets.
    pool = [
        ensure_dataset(
            data_dir,
            seed=200 + i // 2,
            preset=TRAIN_PRESETS[i % 2],
            slices=1,
            width=budget.width,
            height=budget.height,
        )
        for i in range(max(budget.counts))
    ]
    held = ensure_dataset(
        data_dir,
        seed=HELD_OUT_SEED,
        preset=HELD_OUT_PRESET,
        slices=2,
        width=budget.width,
        height=budget.height,
    )
    return pool, held


def _claim_runs(
    pool: list[Path], held: Path, budget: ClaimBudget, pore_back: Sequence[npt.NDArray[np.bool_]]
) -> dict[tuple[str, int, int], Score]:
    from kintsugi_daemon.inference.training import TrainConfig, train

    results: dict[tuple[str, int, int], Score] = {}
    with tempfile.TemporaryDirectory(prefix="kintsugi-claim-") as tmp:
        for seed in TRAIN_SEEDS:
            for n in budget.counts:
                for variant in ("with-pt", "without-pt"):
                    t0 = time.perf_counter()
                    cfg = TrainConfig(
                        data=[p / variant for p in pool[:n]],
                        out=Path(tmp) / f"{variant}-{n}-{seed}.onnx",
                        epochs=budget.epochs,
                        steps_per_epoch=budget.steps_per_epoch,
                        batch_size=budget.batch_size,
                        crop_px=budget.crop_px,
                        val_fraction=0.0,
                        seed=seed,
                        threads=THREADS,
                        device=TRAIN_DEVICE,
                    )
                    train(cfg, log=lambda _msg: None)
                    s = score(load_model(cfg.out, threads=THREADS), held / variant, pore_back)
                    results[(variant, n, seed)] = s
                    print(
                        f"  seed {seed}: {variant:10s} on {n:2d} slice(s) {time.perf_counter() - t0:5.1f} s: "
                        f"porosity IoU {s.porosity_iou:.3f}, CBD IoU {fmt(s.iou['cbd'])}",
                        flush=True,
                    )
    return results


def part_b(data_dir: Path, quick: bool) -> None:
    if importlib.util.find_spec("torch") is None:
        print("\n(b) kintsugi claim: skipped (needs torch: pip install -e '.[train]')")
        return
    budget = (
        ClaimBudget((1, 2, 4), epochs=3, steps_per_epoch=20, batch_size=8, crop_px=128, width=512, height=384)
        if quick
        else ClaimBudget(
            (2, 4, 8, 16), epochs=8, steps_per_epoch=25, batch_size=8, crop_px=128, width=512, height=384
        )
    )
    n_max = max(budget.counts)
    pool, held = _claim_pool(data_dir, budget)
    steps = budget.epochs * budget.steps_per_epoch
    print(
        f"\n(b) the kintsugi claim: identical training budget ({steps} steps of {budget.batch_size} crops of "
        f"{budget.crop_px} px) on the same specimens rendered with and without Pt, training seeds "
        f"{TRAIN_SEEDS}; scored on {HELD_OUT_PRESET} seed {HELD_OUT_SEED} ({budget.width}x{budget.height}, "
        "preset and seed unseen) in the matching rendering"
    )
    pore_back = pore_back_masks(held / "without-pt")
    n_pb = sum(int(m.sum()) for m in pore_back)
    n_por = sum(int(np.isin(t, POROSITY).sum()) for _, t in read_slices(held / "without-pt"))
    results = _claim_runs(pool, held, budget, pore_back)

    def over_seeds(variant: str, n: int, get: Callable[[Score], float | None]) -> str:
        return _mean_sd([get(results[(variant, n, seed)]) for seed in TRAIN_SEEDS])

    variants = ("with-pt", "without-pt")
    rows = [[f"{n}", *(over_seeds(v, n, lambda r: r.porosity_iou) for v in variants)] for n in budget.counts]
    print_table(
        f"porosity IoU vs training slices (mean +- sd over training seeds {TRAIN_SEEDS})",
        ["training slices", "with Pt", "without Pt"],
        rows,
        ["porosity IoU = IoU of pore + unfilled_pore: without Pt every empty pore is unfilled_pore"],
        key="seg-claim-slices",
    )

    def needed(variant: str, seed: int) -> str:
        hit = [n for n in budget.counts if results[(variant, n, seed)].porosity_iou >= CLAIM_PORE_IOU]
        return str(min(hit)) if hit else f">{n_max}"

    metrics: list[tuple[str, Callable[[Score], float | None]]] = [
        ("porosity IoU (pore + unfilled_pore)", lambda r: r.porosity_iou),
        ("CBD IoU", lambda r: r.iou["cbd"]),
        ("mean IoU (porosity, active, cbd, collector)", lambda r: r.mean4_porosity),
        ("porosity error (pred - true)", lambda r: r.porosity_error),
        ("CBD-fraction error (pred - true)", lambda r: r.cbd_error),
        ("porosity recall on pore-back pixels", lambda r: r.pore_back_recall),
    ]
    rows = [[name, *(over_seeds(v, n_max, get) for v in variants)] for name, get in metrics]
    rows.append(
        [
            f"training slices to porosity IoU >= {CLAIM_PORE_IOU} (per seed)",
            *(", ".join(needed(v, seed) for seed in TRAIN_SEEDS) for v in variants),
        ]
    )
    w = results[("with-pt", n_max, TRAIN_SEEDS[0])]
    print_table(
        f"kintsugi claim, {n_max} training slices each, mean +- sd over {len(TRAIN_SEEDS)} training seeds "
        f"(true porosity {w.porosity_true:.3f}, CBD {w.cbd_true:.3f})",
        ["", "with Pt", "without Pt"],
        rows,
        [
            f"pore-back pixels: {n_pb} of the held-out specimen's {n_por} pore pixels lie in the CBD's CBS",
            "grey range without Pt (above its 5th percentile); recall = share of them labelled porosity",
        ],
        key="seg-claim",
    )
