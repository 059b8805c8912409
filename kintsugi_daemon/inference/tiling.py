"""Tiled inference: seamless by construction, bounded memory, any image size.

The normalised image is reflect-padded once; tiles of the network's size are cut from it with a halo of
context on every side, and only each tile's centre is kept. Two rules make the stitched result equal the
whole-image result (not just close to it):
- the halo is at least the receptive field (`ModelSpec.halo`), so every kept pixel sees all its context;
- every tile origin and size is a multiple of the network's stride, so pooling groups the same pixels in
  every tile as in the whole image (the halo is rounded up to the stride for this).
The last tile of a row or column is shifted back to end at the image edge rather than padded beyond it,
so little work is wasted on padding.

Tile size. A graph with a fixed input size gets tiles of that size. A graph that accepts any size gets
tiles planned from the frame and a memory budget: the fewest, largest tiles whose activations fit the
budget, choosing the split that pushes the fewest pixels through the network. The halos are the only
waste, so one whole-frame tile (1536 x 1024 plus 48 px halos: 1.16x the frame's pixels) beats the
network's nominal 512 px tiles (2.0x) when memory allows; a tighter budget splits the frame into strips
or a grid, still seamless.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kintsugi_daemon.inference.contract import (
    CANONICAL_CLASSES,
    ModelMismatch,
    ModelSpec,
    Normalisation,
)
from kintsugi_daemon.inference.grey_match import grey_match

__all__ = [
    "DEFAULT_ACTIVATION_BYTES_PER_PX",
    "DEFAULT_BATCH",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "Segmentation",
    "TilePlan",
    "TiledModel",
    "normalise",
    "plan_tiles",
    "segment",
    "segment_array",
    "segment_async",
    "standardise",
]

DEFAULT_BATCH = 4  # tiles per run call when tiles are small: amortises the per-call overhead
DEFAULT_MEMORY_BUDGET_BYTES = 2 << 30  # activations of one run call; a support PC has 16-64 GB
# Peak activation memory per input pixel when a model does not declare `kintsugi.activation_bytes_per_px`:
# the shipped U-Net (16-32-64-128 channels, float32) peaks at 410-530 B/px (RSS growth of one call,
# 512^2 to 1632 x 1120 inputs); 600 leaves a margin for a slightly wider network.
DEFAULT_ACTIVATION_BYTES_PER_PX = 600
_MAX_TILES_PER_AXIS = 64


@dataclass(frozen=True)
class Segmentation:
    labels: np.ndarray  # uint8 [H, W], canonical class values
    classes: tuple[str, ...]  # the model's classes, in output-channel order
    max_probability: np.ndarray  # float32 [H, W], softmax probability of the chosen class
    entropy: np.ndarray  # float32 [H, W], softmax entropy / log K, in [0, 1]
    probabilities: np.ndarray | None  # float32 [K, H, W] when asked for (large: K x the image)
    # Overlap (0..1) of the slice's per-class grey levels with the training data's (`grey_match.py`);
    # None when the model carries no grey statistics.
    grey_match: float | None = None


class TiledModel(Protocol):
    """What the tiler needs of a model: the contract, its tile geometry and a batch runner. An onnxruntime
    `SegmentationModel` is one; training wraps its eager PyTorch network in another, so validation
    predicts exactly as the daemon does."""

    @property
    def spec(self) -> ModelSpec: ...
    @property
    def tile_hw(self) -> tuple[int, int]: ...
    @property
    def fixed_shape(self) -> bool: ...
    @property
    def max_batch(self) -> int | None: ...
    def run(self, batch: np.ndarray) -> np.ndarray: ...


def standardise(x: np.ndarray, normalisation: Sequence[Normalisation]) -> np.ndarray:
    """In place: (grey / 65535 - mean) / std per channel of a float32 [C, H, W] array already in [0, 1]."""
    for c, norm in enumerate(normalisation):
        x[c] -= np.float32(norm.mean)
        x[c] /= np.float32(norm.std)
    return x


def normalise(model: TiledModel, images: Mapping[str, np.ndarray]) -> np.ndarray:
    """The model's input channels [C, H, W] float32, picked from `images` by detector name."""
    by_name = {k.casefold(): v for k, v in images.items()}
    missing = [c for c in model.spec.channels if c.casefold() not in by_name]
    if missing:
        raise ModelMismatch(
            [f"the model needs detector image(s) {', '.join(missing)}; given: {', '.join(images) or 'none'}"]
        )
    planes = [np.asarray(by_name[c.casefold()]) for c in model.spec.channels]
    shapes = {p.shape for p in planes}
    if len(shapes) != 1 or planes[0].ndim != 2 or 0 in planes[0].shape:
        raise ValueError(f"detector images must be 2-D, non-empty and of one shape, got {sorted(shapes)}")
    x = np.empty((len(planes), *planes[0].shape), np.float32)
    for c, plane in enumerate(planes):
        np.multiply(plane, np.float32(1 / 65535), out=x[c], casting="unsafe")
    return standardise(x, model.spec.normalisation)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class _Axis:
    """Tile placement along one axis: cores start at `starts` (image coords), each `core` long."""

    tile: int
    core: int
    starts: tuple[int, ...]
    pad_after: int  # reflect padding past the image end, beyond the halo


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go and how many run in one call; `overhead` = network pixels / image pixels."""

    y: _Axis
    x: _Axis
    batch: int

    @property
    def tiles(self) -> int:
        return len(self.y.starts) * len(self.x.starts)

    def overhead(self, h: int, w: int) -> float:
        return self.tiles * self.y.tile * self.x.tile / (h * w)


def _axis(size: int, tile: int, halo: int, stride: int) -> _Axis:
    core = tile - 2 * halo
    extent = max(_round_up(size, stride), core)  # what the cores must cover, on the stride grid
    n = math.ceil(extent / core)
    last = extent - core  # a multiple of the stride: the shifted last tile stays on the pooling grid
    starts = tuple(sorted({min(i * core, last) for i in range(n)}))
    return _Axis(tile=tile, core=core, starts=starts, pad_after=extent - size)


def _split(extent: int, parts: int, halo: int, stride: int) -> int:
    """Tile side (halos included) that covers `extent` in `parts` cores on the stride grid."""
    return _round_up(-(-extent // parts), stride) + 2 * halo


def plan_tiles(
    model: TiledModel,
    h: int,
    w: int,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    batch_size: int = DEFAULT_BATCH,
) -> TilePlan:
    """Tile an h x w frame for `model` within the memory budget (see the module docstring)."""
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    spec = model.spec
    halo, stride = spec.effective_halo, spec.stride
    per_px = spec.activation_bytes_per_px or DEFAULT_ACTIVATION_BYTES_PER_PX
    if model.fixed_shape:
        ay = _axis(h, model.tile_hw[0], halo, stride)
        ax = _axis(w, model.tile_hw[1], halo, stride)
    else:
        budget_px = memory_budget_bytes // per_px
        ey, ex = _round_up(h, stride), _round_up(w, stride)
        best: tuple[int, int, int, int] | None = None  # (network pixels, tiles, tile_y, tile_x)
        for ny in range(1, min(_MAX_TILES_PER_AXIS, -(-ey // stride)) + 1):
            ty = _split(ey, ny, halo, stride)
            for nx in range(1, min(_MAX_TILES_PER_AXIS, -(-ex // stride)) + 1):
                tx = _split(ex, nx, halo, stride)
                if ty * tx > budget_px:
                    continue  # more columns shrink the tile: keep looking along x
                cost = (ny * nx * ty * tx, ny * nx, ty, tx)
                if best is None or cost < best:
                    best = cost
                break  # more columns than the fewest that fit only add halos
        if best is None:
            # Not even the smallest grid fits: the network's own tile size, whatever the budget says.
            ty = tx = model.tile_hw[0]
        else:
            _, _, ty, tx = best
        ay, ax = _axis(h, ty, halo, stride), _axis(w, tx, halo, stride)
    per_call = max(1, memory_budget_bytes // max(1, ay.tile * ax.tile * per_px))
    batch = max(1, min(batch_size, per_call, model.max_batch or batch_size))
    return TilePlan(y=ay, x=ax, batch=batch)


def _pad(x: np.ndarray, halo: int, ay: _Axis, ax: _Axis) -> np.ndarray:
    widths = ((0, 0), (halo, halo + ay.pad_after), (halo, halo + ax.pad_after))
    # numpy's reflect needs two samples; a 1-px-wide image can only be extended by repetition.
    if min(x.shape[1:]) > 1:
        return np.pad(x, widths, mode="reflect")
    return np.pad(x, widths, mode="edge")


def _batches(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _summaries(
    logits: np.ndarray, log_k: np.float32, out: tuple[np.ndarray, ...], probs: np.ndarray | None
) -> None:
    """Per pixel of [K, H, W] logits, into `out` = (class, its softmax probability, entropy / log K)
    and, when given, the probabilities [K, H, W].

    One exp per class plane and no log over them: with z = logits - max, S = sum exp(z), the chosen
    class's probability is exp(0) / S = 1 / S and the entropy is log S - sum(exp(z) z) / S. Class by
    class on [H, W] planes, in place: the whole-tensor form (argmax over the class axis, [K, H, W]
    temporaries) had cost a third of the network's own call on a 1536 x 1024 slice."""
    best, max_p, ent = out
    k = logits.shape[0]
    m = logits[0].copy()
    best.fill(0)
    above = np.empty(m.shape, bool)
    for c in range(1, k):  # argmax, first maximum wins as in np.argmax
        np.greater(logits[c], m, out=above)
        np.copyto(best, np.uint8(c), where=above)
        np.maximum(m, logits[c], out=m)
    s = np.zeros(m.shape, np.float32)
    weighted = np.zeros(m.shape, np.float32)
    z = np.empty(m.shape, np.float32)
    e = np.empty(m.shape, np.float32)
    for c in range(k):
        np.subtract(logits[c], m, out=z)
        np.exp(z, out=e)
        s += e
        if probs is not None:
            probs[c] = e
        z *= e
        weighted += z
    np.reciprocal(s, out=max_p)
    np.log(s, out=ent)
    weighted *= max_p
    ent -= weighted
    ent /= log_k
    if probs is not None:
        probs *= max_p


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="segment-post")


def _summarise_bands(
    logits: np.ndarray, log_k: np.float32, out: tuple[np.ndarray, ...], probs: np.ndarray | None, workers: int
) -> None:
    """`_summaries` over horizontal bands in `workers` threads (numpy releases the GIL in ufuncs): the
    post-processing uses the same thread budget as the network call before it."""
    h = logits.shape[1]
    bands = min(workers, max(1, h // 64))
    if bands == 1:
        _summaries(logits, log_k, out, probs)
        return
    edges = [h * i // bands for i in range(bands + 1)]

    def band(i: int) -> None:
        ys = slice(edges[i], edges[i + 1])
        _summaries(logits[:, ys], log_k, tuple(o[ys] for o in out), None if probs is None else probs[:, ys])

    for future in [_pool(bands).submit(band, i) for i in range(bands)]:
        future.result()


def segment(
    model: TiledModel,
    images: Mapping[str, np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH,
    keep_probabilities: bool = False,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> Segmentation:
    """Segment one slice from its detector images (uint16 greys, keyed by detector name).

    Synchronous and CPU-bound: the daemon calls `segment_async`, which runs it in a worker thread.
    """
    return segment_array(
        model,
        normalise(model, images),
        batch_size=batch_size,
        keep_probabilities=keep_probabilities,
        memory_budget_bytes=memory_budget_bytes,
    )


def segment_array(
    model: TiledModel,
    x: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH,
    keep_probabilities: bool = False,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> Segmentation:
    """Segment a normalised float32 [C, H, W] input (the model's channels in order)."""
    spec = model.spec
    _, h, w = x.shape
    halo = spec.effective_halo
    plan = plan_tiles(model, h, w, memory_budget_bytes=memory_budget_bytes, batch_size=batch_size)
    ay, ax = plan.y, plan.x
    padded = _pad(x, halo, ay, ax)
    k = len(spec.classes)
    hp, wp = h + ay.pad_after, w + ax.pad_after
    # Per-pixel summaries are stitched instead of the [K, H, W] probabilities: a 6144 x 4096 slice
    # would otherwise hold half a gigabyte of floats per slice.
    best = np.empty((hp, wp), np.uint8)
    max_p = np.empty((hp, wp), np.float32)
    ent = np.empty((hp, wp), np.float32)
    probs = np.empty((k, hp, wp), np.float32) if keep_probabilities else None
    log_k = np.float32(math.log(k)) if k > 1 else np.float32(1)
    tiles = [(y0, x0) for y0 in ay.starts for x0 in ax.starts]
    workers = getattr(model, "threads", 1)
    for group in _batches(tiles, plan.batch):
        batch = np.stack([padded[:, y0 : y0 + ay.tile, x0 : x0 + ax.tile] for y0, x0 in group])
        logits = np.asarray(model.run(batch), np.float32)
        for i, (y0, x0) in enumerate(group):
            # Overlapping cores (the shifted last tile) hold identical values: the later write is harmless.
            # Entropy in units of log K, so 1 means "uniform over the classes" whatever K is.
            ys, xs = slice(y0, y0 + ay.core), slice(x0, x0 + ax.core)
            core = logits[i, :, halo : halo + ay.core, halo : halo + ax.core]
            out = (best[ys, xs], max_p[ys, xs], ent[ys, xs])
            _summarise_bands(core, log_k, out, None if probs is None else probs[:, ys, xs], workers)
    lut = np.array([CANONICAL_CLASSES[c] for c in spec.classes], np.uint8)
    match = None
    if spec.grey_statistics:
        mean = np.array([n.mean for n in spec.normalisation], np.float32)[:, None, None]
        std = np.array([n.std for n in spec.normalisation], np.float32)[:, None, None]
        stats = {k: v.model_dump() for k, v in spec.grey_statistics.items()}
        # Every second pixel each way: a class's mean and spread need far fewer than a frame's 1.5 M
        # pixels, and the full frame would add ~10 % to the slice's inference time.
        sub = x[:, ::2, ::2] * std + mean  # raw greys, as the statistics were taken in training
        match = grey_match(sub, best[:h:2, :w:2], spec.classes, stats)
    return Segmentation(
        labels=lut[best[:h, :w]],
        classes=tuple(spec.classes),
        max_probability=np.ascontiguousarray(max_p[:h, :w]),
        entropy=np.clip(ent[:h, :w], 0, 1),
        probabilities=None if probs is None else np.ascontiguousarray(probs[:, :h, :w]),
        grey_match=match,
    )


async def segment_async(
    model: TiledModel,
    images: Mapping[str, np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH,
    keep_probabilities: bool = False,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> Segmentation:
    """`segment` off the event loop (onnxruntime releases the GIL while it computes)."""
    return await asyncio.to_thread(
        segment,
        model,
        images,
        batch_size=batch_size,
        keep_probabilities=keep_probabilities,
        memory_budget_bytes=memory_budget_bytes,
    )
