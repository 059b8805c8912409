"""Instrument idle time on the instrument's own clock, with every gap between operations attributed.

    python -m benchmarks.bench_idle [--slices 10] [--quick]

Two configurations, run one after the other in one command, printed side by side:
- `pt`: 1536 x 1024, CBS + TLD, Pt before every slice, about 5 s of instrument work per slice;
- `fast`: the same frame, fast mills and no Pt, about 2 s of instrument work per slice.
Both with on-the-fly segmentation by the shipped model and the adaptation step on.

The simulator (its own process, `--test-endpoints`) paces every operation to its simulated duration x the
time scale and logs each one on the system's monotonic clock (`/test/busy`). The instrument is busy for
sum(instrument seconds x time scale); idle = 1 - busy / (window - overrun), where the window runs from
the first operation's start to the last one's end and `overrun` is simulator computation that did not fit
its operation's window (the real instrument has none). The daemon's controller runs in this process
with profiling on (`kintsugi_daemon.service.profiling`), so every gap is attributed to what the daemon
was doing then, in this order of precedence: image file writes, journal commits, waiting for
segmentation, state reads, image transfer and decoding, other instrument round trips, decisions; what is
left is the daemon's own
(state machine, logging, event loop). Simulator computation that overran an operation's window is shown
apart: it is the simulator's, not the instrument's or the daemon's.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.readme_tables import Table, publish
from kintsugi_daemon.config import DaemonSettings, parse_recipe
from kintsugi_daemon.demo.simulator_process import start_simulator
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.estimate import estimate_run
from kintsugi_daemon.service import profiling
from kintsugi_daemon.service.journal import Journal
from kintsugi_daemon.service.wiring import configure_logging
from kintsugi_daemon.states.controller import Controller

WIDTH, HEIGHT = 1536, 1024
RECIPES = {
    "pt": {"instrument_s": 5.0, "pt_every": 1, "mill_current_a": 15e-9},
    "fast": {"instrument_s": 2.0, "pt_every": 0, "mill_current_a": 60e-9},
}
RECIPE = """
[run]
name = "bench-idle"
slices = {slices}
slice_thickness_m = 40e-9
[roi]
width_m = 40e-6
height_m = 30e-6
[pt]
every_slices = {pt_every}
[mill]
current_a = {mill_current_a}
[imaging]
detectors = ["cbs", "tld"]
width_px = {width}
height_px = {height}
pixel_size_m = 4.05e-8
[segmentation]
enabled = true
[guards]
min_free_disk_bytes = 0
"""
CAUSES = (
    ("storage", "image files written", lambda k: k == "storage"),
    ("journal", "journal commits", lambda k: k == "journal"),
    ("segmentation", "waiting for segmentation", lambda k: k == "segmentation_wait"),
    ("state", "state reads", lambda k: k == "call:state"),
    ("transfer", "image transfer + decode", lambda k: k in ("call:acquire", "decode")),
    ("calls", "other instrument round trips", lambda k: k.startswith("call:")),
    ("decisions", "decisions", lambda k: k == "decisions"),
)
Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def intersect(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def minus(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in xs:
        cur = a
        for c, d in ys:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def length(xs: Iterable[Interval]) -> float:
    return sum(b - a for a, b in xs)


def idle_fraction(parts: dict[str, float]) -> float:
    """Idle on the instrument's clock; the simulator's overruns are neither the instrument's nor the
    daemon's: out of the window."""
    return 1 - parts["busy"] / (parts["window"] - parts["overrun"])


async def busy_log(url: str, token: str, since_s: float) -> dict[str, Any]:
    """The simulator's log of its operations since `since_s` (monotonic clock): `/test/busy`."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as http:
        reply = await http.get("/test/busy", params={"since_s": since_s})
        reply.raise_for_status()
        return dict(reply.json())


def attribute(busy: dict[str, Any], spans: Sequence[profiling.Span]) -> dict[str, float]:
    """Idle fraction, its parts per cause (seconds), and the window, from the two logs."""
    ops = busy["intervals"]
    window = (min(o["start_s"] for o in ops), max(o["end_s"] for o in ops))
    scale = float(busy["time_scale"])
    instrument = sum(o["instrument_s"] for o in ops) * scale
    overrun = sum(o["overrun_s"] for o in ops)
    gaps = minus([window], union((o["start_s"], o["end_s"]) for o in ops))
    parts: dict[str, float] = {"window": window[1] - window[0], "busy": instrument, "overrun": overrun}
    for key, _, match in CAUSES:
        mine = intersect(gaps, union((s.start_s, s.end_s) for s in spans if match(s.kind)))
        parts[key] = length(mine)
        gaps = minus(gaps, mine)
    parts["daemon"] = length(gaps)
    verbs = sorted({s.kind for s in spans if s.kind.startswith("call:")})
    for kind in verbs:  # which round trips the remaining calls were (they overlap operations, so inside)
        parts[kind] = sum(s.end_s - s.start_s for s in spans if s.kind == kind)
    parts["state_reads"] = sum(1 for s in spans if s.kind == "call:state")
    return parts


async def run_one(name: str, slices: int) -> dict[str, float]:
    cfg = RECIPES[name]
    recipe = RECIPE.format(slices=slices, width=WIDTH, height=HEIGHT, **cfg)
    scale = cfg["instrument_s"] / estimate_run(parse_recipe(recipe)).seconds_per_slice
    with tempfile.TemporaryDirectory() as tmp:
        sim_args = ["--time-scale", repr(scale), "--test-endpoints", "--slices", str(slices)]
        sim_args += ["--width-px", str(WIDTH), "--height-px", str(HEIGHT), "--pixel-size-m", "4.05e-8"]
        async with start_simulator(sim_args, log_path=Path(tmp) / "sim.log") as sim:
            settings = DaemonSettings(data_root=Path(tmp) / "runs")
            settings.data_root.mkdir()
            journal = Journal(settings.journal_file, "bench")
            client = HttpDualBeam(sim.url, token=sim.token, deadline_scale=0.05)
            controller = Controller(instrument=client, journal=journal, settings=settings)
            await controller.boot()
            spans = profiling.enable()
            t0 = time.monotonic()
            await controller.command("start", {"recipe": recipe})
            await controller.wait_run()
            profiling.disable()
            await controller.close()
            await client.aclose()
            journal.close()
            busy = await busy_log(sim.url, sim.token, t0)
    parts = attribute(busy, spans)
    parts["scale"] = scale
    parts["slices"] = slices
    return parts


HEADINGS = {
    "pt": "Pt every slice, ~{s:g} s instrument work / slice",
    "fast": "fast mills, no Pt, ~{s:g} s / slice",
}


def report(results: dict[str, dict[str, float]]) -> None:
    names = list(results)
    rs = list(results.values())
    calls = sorted({k for r in rs for k in r if k.startswith("call:")})
    for kind in calls:  # detail for the console: which round trips the remaining calls were
        per_slice = ", ".join(f"{n} {r.get(kind, 0) / r['slices']:.3f}" for n, r in results.items())
        print(f"{kind} (s/slice, including the operation): {per_slice}")
    table = Table(["", *(HEADINGS[n].format(s=RECIPES[n]["instrument_s"]) for n in names)])
    idle = [idle_fraction(r) for r in rs]
    table.add(
        "slices; window on the instrument's clock", *(f"{r['slices']:.0f}; {r['window']:.1f} s" for r in rs)
    )
    table.add(
        "**instrument idle** (target ≤ 5 %, stretch ≤ 1 %)",
        *(f"**{v:.2%}**" + ("" if v <= 0.05 else " (missed)") for v in idle),
    )
    for key, label, _ in (
        *CAUSES,
        ("daemon", "the daemon itself (event loop, logging, state machine)", None),
    ):
        if key == "state":
            reads = " / ".join(f"{r['state_reads'] / r['slices']:.1f}" for r in rs)
            label = f"{label} ({reads} per slice)"
        table.add(label, *(f"{r[key] / r['window']:.2%}" for r in rs))
    table.add(
        "simulator computation past its window (not idle, shown apart)",
        *(f"{r['overrun'] / r['window']:.2%}" for r in rs),
    )
    publish(
        "idle",
        f"{WIDTH} × {HEIGHT}, CBS + TLD, the shipped model segmenting every slice, adaptation on; "
        "simulator, daemon and inference share the machine's cores:",
        table,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_idle", description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=10)
    p.add_argument("--only", choices=list(RECIPES), default=None)
    args = p.parse_args(argv)
    configure_logging("warning", json_output=False)
    results = {}
    for name in [args.only] if args.only else list(RECIPES):
        results[name] = asyncio.run(run_one(name, args.slices))
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
