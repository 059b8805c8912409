"""Adaptive next-slice policies against fixed schedules (issue 9 figures), side by side in one run.

Same specimen and seed for every run, a fresh simulator process each (time scale 0: instrument time from
the timing model), the daemon's own controller driving it:
- published: the published schedule, Pt every slice (fixed policy), segmentation on;
- the sweep: Pt every 2, 5, 10, 20 slices (fixed policy, segmentation off: only the Pt figures count);
  "best fixed" is the cheapest interval keeping >= 0.95 of pore pixels Pt-filled over the run, which an
  operator cannot know in advance;
- adaptive: `[adapt] policy = "adaptive"`, segmentation on.
Ground truth comes from the simulator's test endpoints: the field of view's error against an ideal run
(drift residual), face positions (slice thickness), Pt-filled and unfilled pore pixels of every image and
the label image of every image (mIoU of the daemon's segmentation, classes pore/active/cbd/collector).
The idle fraction is measured separately: the adaptive run with segmentation at a time scale that makes
one slice about `--instrument-s` seconds of instrument work, on the instrument's own clock as
bench_idle measures it (the simulator's log of its operations: idle = 1 - busy / window).

    python -m benchmarks.bench_adapt [--slices 200] [--width-px 512 --height-px 384] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tifffile

from benchmarks.bench_idle import attribute, busy_log, idle_fraction
from benchmarks.readme_tables import Table, publish
from kintsugi_daemon.config import DaemonSettings, parse_recipe
from kintsugi_daemon.demo.simulator_process import SimulatorProcess, start_simulator
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.drivers.tiff_wire import decode_channels
from kintsugi_daemon.estimate import estimate_run
from kintsugi_daemon.inference.metrics import MEAN_IOU_CLASSES, iou_counts
from kintsugi_daemon.instrument import SIN_SEM_FIB
from kintsugi_daemon.service.journal import Journal
from kintsugi_daemon.service.wiring import configure_logging
from kintsugi_daemon.states.controller import Controller

PX = 4.05e-8
OUTSIDE = 255  # label of pixels that are no material (above the surface, the fiducial's window)
TARGET_M = 40e-9
SWEEP = (2, 5, 10, 20)

RECIPE = """
[run]
name = "bench-adapt"
slices = {slices}
slice_thickness_m = 40e-9
[roi]
width_m = {width_m!r}
height_m = {height_m!r}
[pt]
every_slices = {every}
[imaging]
detectors = ["cbs", "tld"]
width_px = {width}
height_px = {height}
pixel_size_m = 4.05e-8
[segmentation]
enabled = {segmentation}
[adapt]
policy = "{policy}"
[adapt.drift]
fiducial_x_px = {fx}
fiducial_y_px = {fy}
fiducial_width_px = {fw}
fiducial_height_px = {fh}
[guards]
min_free_disk_bytes = 0
"""


def recipe(slices: int, width: int, height: int, *, every: int, policy: str, segmentation: bool) -> str:
    return RECIPE.format(
        slices=slices,
        width=width,
        height=height,
        width_m=width * PX,
        height_m=height * PX,
        every=every,
        policy=policy,
        segmentation=str(segmentation).lower(),
        fx=width // 32,
        fy=height // 32,
        fw=max(32, min(256, width // 4)),
        fh=max(32, min(128, height // 4)),
    )


class TruthTap:
    """The real client, keeping the simulator's ground-truth labels of every image it acquires."""

    def __init__(self, inner: HttpDualBeam, sim: SimulatorProcess) -> None:
        self.inner = inner
        self.sim = sim
        self.labels: list[np.ndarray] = []

    def __getattr__(self, verb: str) -> Any:
        return getattr(self.inner, verb)

    async def acquire(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self.inner.acquire(*args, **kwargs)
        finally:
            async with httpx.AsyncClient(
                base_url=self.sim.url, headers={"Authorization": f"Bearer {self.sim.token}"}
            ) as http:
                reply = await http.get("/test/ground-truth")
                reply.raise_for_status()
                self.labels.append(decode_channels(reply.content)[0]["labels"])


@dataclass
class Figures:
    name: str
    instrument_s: float
    deposits: int
    filled: float
    worst_window: float
    drift_median_px: float
    drift_max_px: float
    thickness_error: float
    miou: float | None
    miou_clean: float | None  # slices with < 1 % of their pores unfilled
    miou_partly: float | None  # the rest
    partly_slices: int
    decisions: dict[str, int] = field(default_factory=dict)


def _fill(truth: list[dict[str, float]]) -> tuple[float, float]:
    pore = np.array([t["pore_px"] for t in truth])
    unfilled = np.array([t["unfilled_pore_px"] for t in truth])
    overall = float(pore.sum() / max(pore.sum() + unfilled.sum(), 1))
    windows = [
        float(pore[i : i + 10].sum() / max(pore[i : i + 10].sum() + unfilled[i : i + 10].sum(), 1))
        for i in range(0, max(len(truth) - 9, 1))
    ]
    return overall, min(windows)


def _drift(truth: list[dict[str, float]]) -> list[float]:
    ref = truth[0]
    return [
        math.hypot(
            (t["fov_error_x_m"] - ref["fov_error_x_m"]) / PX,
            (t["fov_error_y_m"] - ref["fov_error_y_m"]) / (PX / SIN_SEM_FIB),
        )
        for t in truth
    ]


def _partly(t: dict[str, float]) -> bool:
    """A face with >= 1 % of its pores unfilled (truth)."""
    return t["unfilled_pore_px"] >= 0.01 * max(t["pore_px"] + t["unfilled_pore_px"], 1.0)


def _miou(
    run_dir: Path, truth_labels: list[np.ndarray], truth: list[dict[str, float]], window: tuple[slice, slice]
) -> tuple[float | None, float | None, float | None]:
    """mIoU of the daemon's segmentation over all slices, over the slices with < 1 % of their pores
    unfilled (truth) and over the rest: what partly unfilled faces cost the model. The recipe's fiducial
    window is scored in no run (the adaptive daemon labels it outside: its mark is no specimen), so every
    run is scored on the same pixels."""
    counts = [{c: [0, 0] for c in MEAN_IOU_CLASSES} for _ in range(2)]  # clean faces, the rest
    for index, labels in enumerate(truth_labels):
        path = run_dir / "slices" / f"{index:04d}_labels.tif"
        if not path.exists():
            continue
        pred = tifffile.imread(path)
        labels = labels.copy()
        labels[window] = OUTSIDE
        pred = np.where(labels == OUTSIDE, OUTSIDE, pred)  # not specimen: not scored
        partly = _partly(truth[index])
        for name, (inter, union) in iou_counts(pred, labels, MEAN_IOU_CLASSES).items():
            counts[partly][name][0] += inter
            counts[partly][name][1] += union

    def mean(parts: list[dict[str, list[int]]]) -> float | None:
        ious = [
            sum(p[c][0] for p in parts) / u for c in MEAN_IOU_CLASSES if (u := sum(p[c][1] for p in parts))
        ]
        return sum(ious) / len(ious) if ious else None

    return mean(counts), mean(counts[:1]), mean(counts[1:])


async def one_run(
    name: str, recipe_text: str, sim_args: list[str], tmp: Path, time_scale: float = 0.0
) -> tuple[Figures, float | None]:
    """One run on a fresh simulator; the figures and, at a time scale above 0, the instrument idle
    fraction on the instrument's clock (at 0 the instrument takes no time: None)."""
    log = tmp / f"{name}.sim.log"
    args = [*sim_args, "--time-scale", repr(time_scale), "--test-endpoints"]
    async with start_simulator(args, log_path=log, ready_timeout_s=900) as sim:
        settings = DaemonSettings(data_root=tmp / name)
        settings.data_root.mkdir()
        journal = Journal(settings.journal_file, "bench")
        client = HttpDualBeam(sim.url, token=sim.token, deadline_scale=max(time_scale, 0.05))
        tap = TruthTap(client, sim)
        controller = Controller(instrument=tap, journal=journal, settings=settings)
        await controller.boot()
        t0 = time.monotonic()  # the clock of the simulator's busy log
        await controller.command("start", {"recipe": recipe_text})
        await controller.wait_run()
        idle = idle_fraction(attribute(await busy_log(sim.url, sim.token, t0), [])) if time_scale else None
        state, reason = controller.state, controller.reason
        await controller.close()
        run_id = journal.runs()[-1].run_id
        steps = journal.steps(run_id)
        decisions: dict[str, int] = {}
        for rec in steps:
            for d in (rec.result or {}).get("decisions", []) if rec.step == "adapt" and rec.ok else []:
                key = f"{d['policy']}/{d['action']}"
                decisions[key] = decisions.get(key, 0) + 1
        deposits = sum(1 for r in steps if r.step == "deposit_pt" and r.ok)
        journal.close()
        async with httpx.AsyncClient(
            base_url=sim.url, headers={"Authorization": f"Bearer {sim.token}"}
        ) as http:
            truth: list[dict[str, float]] = (await http.get("/test/truth")).json()
        instrument_s = float((await client.state()).instrument_time_s)
        await client.aclose()
    if state != "done":
        raise SystemExit(f"{name}: the run ended {state} ({reason}); see {log}")
    filled, worst = _fill(truth)
    drift = _drift(truth)
    faces = [t["face_position_m"] for t in truth]
    errors = [abs((b - a) - TARGET_M) / TARGET_M for a, b in itertools.pairwise(faces)]
    window = parse_recipe(recipe_text).adapt.drift.window  # every run's recipe names the same window
    miou = _miou(settings.data_root / run_id, tap.labels, truth, window)
    figures = Figures(
        name=name,
        instrument_s=instrument_s,
        deposits=deposits,
        filled=filled,
        worst_window=worst,
        drift_median_px=statistics.median(drift[1:]),
        drift_max_px=max(drift[1:]),
        thickness_error=statistics.mean(errors),
        miou=miou[0],
        miou_clean=miou[1],
        miou_partly=miou[2],
        partly_slices=sum(1 for t in truth if _partly(t)),
        decisions=decisions,
    )
    return figures, idle


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _row(label: str, values: list[str]) -> str:
    return f"  {label:<34}" + "".join(f"{v:>16}" for v in values)


def report(
    published: Figures, sweep: list[Figures], adaptive: Figures, idle: float, time_scale: float
) -> None:
    ok = [f for f in [*sweep, published] if f.filled >= 0.95]
    best = min(ok, key=lambda f: f.instrument_s) if ok else published
    runs = [published, best, adaptive]
    print("\nPt schedule sweep (fixed policy, segmentation off)")
    for f in [published, *sweep]:
        print(
            f"  {f.name:<14} instrument {f.instrument_s / 3600:6.2f} h   Pt-filled {f.filled:.3f}   "
            f"worst 10-slice window {f.worst_window:.3f}"
        )
    print(f"\nside by side ({published.name}, best fixed = {best.name}, adaptive)")
    print(_row("", [r.name for r in runs]))
    print(_row("instrument time (h)", [f"{r.instrument_s / 3600:.2f}" for r in runs]))
    print(_row("Pt deposits", [str(r.deposits) for r in runs]))
    print(_row("pore pixels Pt-filled", [f"{r.filled:.3f}" for r in runs]))
    print(_row("worst 10-slice window", [f"{r.worst_window:.3f}" for r in runs]))
    print(_row("drift residual median (px)", [f"{r.drift_median_px:.2f}" for r in runs]))
    print(_row("drift residual max (px)", [f"{r.drift_max_px:.2f}" for r in runs]))
    print(_row("slice thickness mean |error|", [f"{r.thickness_error:.1%}" for r in runs]))
    print(_row("segmentation mIoU", [_opt(r.miou) for r in runs]))
    print(
        _row(
            "  slices < 1 % unfilled / the rest",
            [f"{_opt(r.miou_clean)} / {_opt(r.miou_partly)}" for r in runs],
        )
    )
    print(_row("  slices >= 1 % unfilled (truth)", [str(r.partly_slices) for r in runs]))
    saving = 1 - adaptive.instrument_s / published.instrument_s
    over_best = adaptive.instrument_s / best.instrument_s - 1
    print("\ntargets (adaptive)")
    checks = [
        (f"instrument time {saving:.1%} below the published schedule (>= 30 %)", saving >= 0.30),
        (f"instrument time {over_best:+.1%} against the best fixed interval (<= +5 %)", over_best <= 0.05),
        (f"pore pixels Pt-filled {adaptive.filled:.3f} (>= 0.95)", adaptive.filled >= 0.95),
        (f"worst 10-slice window {adaptive.worst_window:.3f} (>= 0.95)", adaptive.worst_window >= 0.95),
        (f"drift residual median {adaptive.drift_median_px:.2f} px (<= 1)", adaptive.drift_median_px <= 1),
        (f"drift residual max {adaptive.drift_max_px:.2f} px (<= 3)", adaptive.drift_max_px <= 3),
        (
            f"thickness mean |error| {adaptive.thickness_error:.1%} (<= 10 %)",
            adaptive.thickness_error <= 0.10,
        ),
        (
            f"mIoU {adaptive.miou} vs the published schedule's {published.miou} (not below)",
            adaptive.miou is not None
            and published.miou is not None
            and adaptive.miou >= published.miou - 1e-3,
        ),
        (f"instrument idle fraction {idle:.1%} at time scale {time_scale:.4f} (<= 5 %)", idle <= 0.05),
    ]
    for text, passed in checks:
        print(f"  {'PASS' if passed else 'FAIL'}  {text}")
    decisions = ", ".join(f"{k} {n}" for k, n in sorted(adaptive.decisions.items()))
    print("\nadaptive decisions: " + decisions)
    publish("adapt", *readme_block(published, sweep, best, adaptive, idle, [p for _, p in checks]), decisions)


def readme_block(
    published: Figures,
    sweep: list[Figures],
    best: Figures,
    adaptive: Figures,
    idle: float,
    passed: list[bool],
) -> tuple[Table, str]:
    """The README's side-by-side table (targets judged for the adaptive run) and the sweep's figures."""

    def verdict(*ok: bool) -> str:
        return ": PASS" if all(ok) else ": **FAIL**"

    t_pub, t_best, t_ad = (r.instrument_s / 3600 for r in (published, best, adaptive))
    fixed = (published, best)
    table = Table(
        ["figure", "target (adaptive)", "published (Pt every slice)", f"best fixed ({best.name})", "adaptive"]
    )
    table.add(
        "instrument time",
        ">= 30 % below published, <= +5 % vs best fixed",
        f"{t_pub:.2f} h",
        f"{t_best:.2f} h",
        f"{t_ad:.2f} h ({t_ad / t_pub - 1:+.1%}, {t_ad / t_best - 1:+.1%}){verdict(*passed[0:2])}",
    )
    table.add("Pt deposits", "", str(published.deposits), str(best.deposits), str(adaptive.deposits))
    table.add(
        "pore pixels Pt-filled, whole run",
        ">= 0.95",
        *(f"{r.filled:.3f}" for r in fixed),
        f"{adaptive.filled:.3f}{verdict(passed[2])}",
    )
    table.add(
        "worst 10-slice window",
        ">= 0.95",
        *(f"{r.worst_window:.3f}" for r in fixed),
        f"{adaptive.worst_window:.3f}{verdict(passed[3])}",
    )
    table.add(
        "drift residual vs truth, median / max",
        "<= 1 px / <= 3 px",
        *(f"{r.drift_median_px:.2f} / {r.drift_max_px:.2f} px" for r in fixed),
        f"{adaptive.drift_median_px:.2f} / {adaptive.drift_max_px:.2f} px{verdict(*passed[4:6])}",
    )
    table.add(
        f"slice thickness mean |error| vs {TARGET_M * 1e9:.0f} nm",
        "<= 10 %",
        *(f"{r.thickness_error:.1%}" for r in fixed),
        f"{adaptive.thickness_error:.1%}{verdict(passed[6])}",
    )
    table.add(
        "segmentation mIoU (pore, active, cbd, collector; the fiducial's window not scored in any run)",
        "not below published",
        *("(off)" if r.miou is None else f"{r.miou:.3f}" for r in fixed),
        ("-" if adaptive.miou is None else f"{adaptive.miou:.3f}") + verdict(passed[7]),
    )
    table.add(
        "the same on slices with < 1 % of their pores unfilled / the others (how many)",
        "",
        *(
            "" if r.miou is None else f"{_opt(r.miou_clean)} / {_opt(r.miou_partly)} ({r.partly_slices})"
            for r in fixed
        ),
        f"{_opt(adaptive.miou_clean)} / {_opt(adaptive.miou_partly)} ({adaptive.partly_slices})",
    )
    table.add(
        "instrument idle fraction on the instrument's clock, segmentation + adaptation on",
        "<= 5 %",
        "",
        "",
        f"{idle:.1%}{verdict(passed[8])}",
    )
    runs = "; ".join(
        f"{f.name}: {f.instrument_s / 3600:.2f} h, Pt-filled {f.filled:.3f}, worst window "
        f"{f.worst_window:.3f}"
        for f in [published, *sweep]
    )
    return table, f"The sweep (fixed policy, segmentation off): {runs}. The adaptive run's decisions:"


async def main_async(a: argparse.Namespace) -> None:
    sim_args = [
        "--slices", str(a.slices), "--width-px", str(a.width_px), "--height-px", str(a.height_px),
        "--pixel-size-m", repr(PX), "--seed", str(a.seed), "--preset", a.preset,
    ]  # fmt: skip
    if a.cache_dir is not None:
        sim_args += ["--cache-dir", str(a.cache_dir)]
    w, h, n = a.width_px, a.height_px, a.slices
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print(f"{n} slices of {w}x{h} px, seed {a.seed}, preset {a.preset}, time scale 0", flush=True)
        published, _ = await one_run(
            "published", recipe(n, w, h, every=1, policy="fixed", segmentation=True), sim_args, tmp
        )
        print(f"  published done: {published.instrument_s / 3600:.2f} h", flush=True)
        sweep = []
        for k in SWEEP:
            f, _ = await one_run(
                f"every {k}", recipe(n, w, h, every=k, policy="fixed", segmentation=False), sim_args, tmp
            )
            sweep.append(f)
            print(f"  every {k} done: {f.instrument_s / 3600:.2f} h, filled {f.filled:.3f}", flush=True)
        adaptive, _ = await one_run(
            "adaptive", recipe(n, w, h, every=1, policy="adaptive", segmentation=True), sim_args, tmp
        )
        print(f"  adaptive done: {adaptive.instrument_s / 3600:.2f} h", flush=True)
        idle_slices = min(n, a.idle_slices)
        text = recipe(idle_slices, w, h, every=1, policy="adaptive", segmentation=True)
        time_scale = a.instrument_s / estimate_run(parse_recipe(text)).seconds_per_slice
        _, idle = await one_run("idle", text, sim_args, tmp, time_scale=time_scale)
    assert idle is not None
    report(published, sweep, adaptive, idle, time_scale)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=200)
    p.add_argument("--width-px", type=int, default=512)
    p.add_argument("--height-px", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="94:3:3")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--idle-slices", type=int, default=20, help="slices of the idle-fraction run")
    p.add_argument("--instrument-s", type=float, default=20.0, help="instrument work per slice (idle run)")
    a = p.parse_args()
    configure_logging("warning", json_output=False)
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
