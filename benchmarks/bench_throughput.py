"""(c) Inference on the daemon's path: tiling overhead, onnxruntime vs PyTorch, float32 vs int8, side by side.

Run through `python -m benchmarks.bench_segmentation --parts c`.

One held-out 1536 x 1024 two-detector slice (preset 94:3:3, seed 102: a specimen the shipped model never
saw), 2 threads, the shipped model (kintsugi_daemon/inference/models/):
- the daemon's path (`inference.tiling.segment` with its default memory budget) against one whole-image
  network call: network pixels / image pixels and seconds (target <= 1.2x the whole-image call), and the
  network's nominal 512 px tiles for comparison (what the daemon did before tiles were planned per frame);
- PyTorch eager on the same weights (when torch is installed: the train extra);
- the int8 twin (`kintsugi-unet-int8.onnx`) against float32: seconds per slice on the daemon's path and
  mean IoU on held-out slices (targets >= 1.8x faster, mean-IoU loss < 0.01).
Every figure is measured in this run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]

from benchmarks.segmentation_common import (
    HELD_OUT_PRESET,
    THREADS,
    ensure_dataset,
    fmt,
    print_table,
    read_slices,
)
from kintsugi_daemon.cli.quantize import held_out_miou
from kintsugi_daemon.inference.contract import (
    SHIPPED_INT8_MODEL,
    SHIPPED_MODEL,
    SegmentationModel,
    load_model,
)
from kintsugi_daemon.inference.tiling import DEFAULT_ACTIVATION_BYTES_PER_PX, normalise, plan_tiles, segment


def conv_flops_per_pixel(model_path: Path, side: int = 256) -> float | None:
    """Multiply-add FLOPs (2 per MAC) of all Conv/ConvTranspose nodes per input pixel, from the graph's
    inferred shapes at a side x side input (a fully convolutional net scales linearly with pixels)."""
    if importlib.util.find_spec("onnx") is None:
        return None
    import onnx  # type: ignore[import-not-found, unused-ignore]

    proto = onnx.load(str(model_path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (1, None, side, side), strict=True):
        if v is not None:
            d.dim_value = v
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    weights = {i.name: list(i.dims) for i in inferred.graph.initializer}
    flops = 0
    for node in inferred.graph.node:
        if node.op_type == "Conv":
            w = weights[node.input[1]]  # [Cout, Cin/groups, kh, kw]
            out = shapes[node.output[0]]
            flops += 2 * math.prod(out) * math.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            w = weights[node.input[1]]  # [Cin, Cout/groups, kh, kw]
            inp = shapes[node.input[0]]
            flops += 2 * math.prod(inp) * math.prod(w[1:])
    return flops / (side * side)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_matmul_gflops(n: int = 2048, repeats: int = 3) -> dict[str, float]:
    """Measured float32 matmul rate 2 n^3 / t on THREADS threads (numpy BLAS, and torch when present)."""
    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    t = _median_time(lambda: a @ b, repeats)
    out["numpy"] = 2 * n**3 / t / 1e9
    if importlib.util.find_spec("torch") is not None:
        import torch  # type: ignore[import-not-found, unused-ignore]

        torch.set_num_threads(THREADS)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        t = _median_time(lambda: torch.mm(ta, tb), repeats)
        out["torch"] = 2 * n**3 / t / 1e9
    return out


class _CountingSession:
    """An onnxruntime session proxy counting the input pixels the tiler feeds (halos included)."""

    def __init__(self, inner: ort.InferenceSession) -> None:
        self.inner = inner
        self.pixels = 0

    def run(self, outputs: Any, feeds: Mapping[str, npt.NDArray[Any]]) -> Any:
        x = next(iter(feeds.values()))
        self.pixels += x.shape[0] * x.shape[2] * x.shape[3]
        return self.inner.run(outputs, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _network_pixels(model: SegmentationModel, images: Mapping[str, npt.NDArray[Any]], **kw: Any) -> int:
    counting = _CountingSession(model.session)
    segment(dataclasses.replace(model, session=counting), images, **kw)
    return counting.pixels


def throughput(model_path: Path, data_dir: Path, repeats: int) -> dict[str, float]:
    root = ensure_dataset(data_dir, seed=102, preset=HELD_OUT_PRESET, slices=1, width=1536, height=1024)
    images, truth = read_slices(root / "with-pt")[0]
    model = load_model(model_path, threads=THREADS)
    spec = model.spec
    h, w = truth.shape
    print(
        f"\ninference of {model_path.name} on a {w}x{h} two-channel slice, {THREADS} threads "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, onnxruntime "
        f"{ort.__version__})"
    )
    plan = plan_tiles(model, h, w)
    per_px = spec.activation_bytes_per_px or DEFAULT_ACTIVATION_BYTES_PER_PX
    nominal_budget = spec.tile * spec.tile * per_px  # admits only the network's nominal tile
    daemon_px = _network_pixels(model, images)
    nominal_px = _network_pixels(model, images, memory_budget_bytes=nominal_budget)
    t_daemon = _median_time(lambda: segment(model, images), repeats)
    t_nominal = _median_time(lambda: segment(model, images, memory_budget_bytes=nominal_budget), repeats)

    # One whole-image call: the reference computation, for onnxruntime and PyTorch alike.
    x = normalise(model, images)
    halo, stride = spec.effective_halo, spec.stride
    ph, pw = (-(h + 2 * halo)) % stride, (-(w + 2 * halo)) % stride
    xp = np.pad(x, ((0, 0), (halo, halo + ph), (halo, halo + pw)), mode="reflect")[None]
    t_whole = _median_time(lambda: model.session.run(None, {model.input_name: xp}), repeats)
    whole_px = xp.shape[2] * xp.shape[3]

    fpp = conv_flops_per_pixel(model_path)
    rows: list[list[str]] = []

    def row(name: str, seconds: float, px: int) -> list[str]:
        gflop = fpp * px / 1e9 if fpp else None
        return [
            name,
            f"{seconds:.3f}",
            f"{seconds / t_whole:.2f}",
            f"{px / (h * w):.2f}",
            fmt(gflop / seconds if gflop else None, ".1f"),
        ]

    rows.append(row(f"daemon path: {plan.tiles} tile(s) of {plan.y.tile}x{plan.x.tile}", t_daemon, daemon_px))
    rows.append(row(f"nominal {spec.tile} px tiles, halo {halo} (before)", t_nominal, nominal_px))
    rows.append(row("whole image, one network call", t_whole, whole_px))
    t_torch: float | None = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        from kintsugi_daemon.inference.training import unet_from_onnx

        torch.set_num_threads(THREADS)
        try:
            net = unet_from_onnx(model_path)
        except ValueError as exc:
            print(f"  PyTorch eager: skipped ({exc})")
        else:
            xt = torch.from_numpy(np.ascontiguousarray(xp))

            def eager() -> object:
                with torch.inference_mode():
                    return net(xt)

            t_torch = _median_time(eager, repeats)
            rows.append(row("PyTorch eager, whole image (same weights)", t_torch, whole_px))
    else:
        print("  PyTorch eager: skipped (needs torch: pip install -e '.[train]')")
    peak = peak_matmul_gflops()
    print_table(
        f"median of {repeats}; model {fpp / 1e3 if fpp else math.nan:.1f} kFLOP per input pixel",
        ["", "s/slice", "x whole", "net px/px", "GFLOP/s"],
        rows,
        [
            f"daemon path: {t_daemon / t_whole:.2f}x the whole-image call (target <= 1.2), "
            f"{daemon_px / (h * w):.2f}x the image's pixels through the network; the nominal tiles "
            f"{t_nominal / t_whole:.2f}x",
            "peak: measured float32 matmul 2n^3/t, n=2048, "
            + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items()),
            f"{w}x{h} slices per minute on the daemon path: {60 / t_daemon:.1f}",
        ],
        key="seg-throughput",
    )
    return {"daemon_s": t_daemon, "whole_s": t_whole}


def int8_vs_float(data_dir: Path, slices: int, repeats: int) -> None:
    if not SHIPPED_INT8_MODEL.is_file():
        print(f"\nint8: skipped ({SHIPPED_INT8_MODEL.name} missing: scripts/quantize_shipped_model.sh)")
        return
    root = ensure_dataset(data_dir, seed=101, preset=HELD_OUT_PRESET, slices=slices, width=1536, height=1024)
    images, _ = read_slices(root / "with-pt")[0]
    rows = []
    times: dict[str, float] = {}
    net: dict[str, float] = {}
    ious: dict[str, float] = {}
    for name, path in (("float32", SHIPPED_MODEL), ("int8 QDQ", SHIPPED_INT8_MODEL)):
        model = load_model(path, threads=THREADS)
        x = normalise(model, images)
        halo = model.spec.effective_halo
        xp = np.pad(x, ((0, 0), (halo, halo), (halo, halo)), mode="reflect")[None]
        # Interleaved, so both see the same machine: the network call alone, then the whole daemon path.
        net[name] = _median_time(lambda m=model, a=xp: m.run(a), repeats)  # type: ignore[misc]
        times[name] = _median_time(lambda m=model: segment(m, images), repeats)  # type: ignore[misc]
        ious[name], _ = held_out_miou(model, [root / "with-pt"])
        size = f"{path.stat().st_size / 1e6:.2f}"
        rows.append([name, f"{net[name]:.3f}", f"{times[name]:.3f}", f"{ious[name]:.4f}", size])
    speed = times["float32"] / times["int8 QDQ"]
    net_speed = net["float32"] / net["int8 QDQ"]
    loss = ious["float32"] - ious["int8 QDQ"]
    print_table(
        f"float32 vs int8, 1536x1024, {THREADS} threads, median of {repeats}; mean IoU "
        f"over {slices} held-out slices (94:3:3, seed 101)",
        ["", "network s", "daemon path s", "mean IoU", "MB"],
        rows,
        [
            f"int8: the network call {net_speed:.2f}x faster (target >= 1.8), the whole daemon path "
            f"(normalisation and per-pixel summaries included, which int8 does not speed up) {speed:.2f}x; "
            f"mean-IoU loss {loss:+.4f} (target < 0.01)"
        ],
        key="seg-int8",
    )


def part_c(model_path: Path, data_dir: Path, quick: bool) -> None:
    repeats = 3 if quick else 7
    throughput(model_path, data_dir, repeats)
    int8_vs_float(data_dir, 2 if quick else 4, repeats)
