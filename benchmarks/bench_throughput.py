"""(c) Inference throughput on a 1536 x 1024 two-channel slice with 2 threads: onnxruntime (the daemon's
tiled path, and one whole-image call) next to PyTorch eager on the same weights, the achieved GFLOP/s
(convolution FLOPs counted from the ONNX graph's shapes) and the machine's measured float32 matmul rate.
Run through `python -m benchmarks.bench_segmentation --parts c`.
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
from kintsugi_daemon.inference.contract import (
    load_model,
)
from kintsugi_daemon.inference.tiling import normalise, segment


# ------------------------------------------------------------------------------- (c) throughput
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


def part_c(model_path: Path, data_dir: Path, quick: bool) -> None:
    repeats = 3 if quick else 5
    root = ensure_dataset(data_dir, seed=102, preset=HELD_OUT_PRESET, slices=1, width=1536, height=1024)
    images, truth = read_slices(root / "with-pt")[0]
    model = load_model(model_path, threads=THREADS)
    spec = model.spec
    h, w = truth.shape
    print(
        f"\n(c) inference throughput of {model_path.name} on a {w}x{h} two-channel slice, {THREADS} threads "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, onnxruntime "
        f"{ort.__version__})"
    )
    counting = _CountingSession(model.session)
    counted = dataclasses.replace(model, session=counting)
    segment(counted, images)
    tiled_px = counting.pixels
    t_tiled = _median_time(lambda: segment(model, images), repeats)

    # One whole-image call: the same computation for onnxruntime and PyTorch.
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
        return [name, f"{seconds:.3f}", fmt(gflop, ".1f"), fmt(gflop / seconds if gflop else None, ".1f")]

    rows.append(row(f"onnxruntime, tiled {spec.tile} px, halo {halo} (daemon path)", t_tiled, tiled_px))
    rows.append(row("onnxruntime, whole image (one call)", t_whole, whole_px))
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
            with torch.inference_mode():
                diff = float(
                    np.abs(net(xt).numpy() - model.session.run(None, {model.input_name: xp})[0]).max()
                )
            rows.append(row("PyTorch eager, whole image (same weights)", t_torch, whole_px))
    else:
        print("  PyTorch eager: skipped (needs torch: pip install -e '.[train]')")
    peak = peak_matmul_gflops()
    print_table(
        f"s/image (median of {repeats}) and achieved rate; model {fpp / 1e3 if fpp else math.nan:.1f} kFLOP "
        "per input pixel (convolutions, 2 per multiply-add)",
        ["", "s/image", "GFLOP run", "GFLOP/s"],
        rows,
        [
            f"tiled: {tiled_px / (h * w):.2f}x the image's pixels go through the network "
            "(halos, stride padding)",
            *(
                [
                    f"speedup onnxruntime whole image vs PyTorch eager: {t_torch / t_whole:.2f}x "
                    f"(tiled daemon path {t_torch / t_tiled:.2f}x); max |logit diff| {diff:.1e}"
                ]
                if t_torch
                else []
            ),
            "peak: measured float32 matmul 2n^3/t, n=2048, "
            + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items()),
            *(
                [
                    "onnxruntime whole-image efficiency: "
                    f"{fpp * whole_px / 1e9 / t_whole / max(peak.values()):.0%} of the measured matmul rate"
                ]
                if fpp
                else []
            ),
            f"{w}x{h} slices per minute on the daemon path: {60 / t_tiled:.1f}",
        ],
    )
