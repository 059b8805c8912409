"""The segmentation pipeline beside the instrument: the recipe's model checked once, each slice segmented in
a worker thread while the next slice is milled, and slices a crash or fault cut short segmented again.

The fixed schedule takes no decision from a slice's segmentation, so nothing waits for it but the next
segmentation (a backlog of one), a pause and the end of the run. Adaptive policies that decide
re-deposition or dwell from the metrics wait for it in their adapt step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from kintsugi_daemon.inference.contract import (
    OUTSIDE_LABEL,
    SegmentationModel,
    check_against_recipe,
    resolve_model,
)
from kintsugi_daemon.inference.contract import load_model as load_segmentation_model
from kintsugi_daemon.inference.metrics import slice_metrics
from kintsugi_daemon.inference.overlay import overlay
from kintsugi_daemon.inference.session import inference_threads
from kintsugi_daemon.inference.tiling import segment as run_segmentation
from kintsugi_daemon.service import profiling
from kintsugi_daemon.service.journal import EventDraft, Journal
from kintsugi_daemon.states.adapting import outside_window
from kintsugi_daemon.states.alerts import Alerts
from kintsugi_daemon.states.checkpoint import SliceProducts
from kintsugi_daemon.states.run import ActiveRun

__all__ = ["REQUIRED_CLASSES", "SegmentationPipeline"]

log = structlog.get_logger("kintsugi.controller")

# Classes the adaptive logic reads (unfilled-pore fraction, CBD coverage): a model without them is refused.
REQUIRED_CLASSES = ("pore", "unfilled_pore", "active", "cbd")


class SegmentationPipeline:
    def __init__(
        self, journal: Journal, alerts: Alerts, products: SliceProducts, on_change: Callable[[], None]
    ) -> None:
        self._journal = journal
        self._alerts = alerts
        self._products = products  # told of each slice's metrics, or of its failure
        self._on_change = on_change
        self._model: SegmentationModel | None = None
        self._model_key: tuple[str, str, int | None] | None = None  # what `_model` was loaded from
        self._running: dict[int, asyncio.Task[None]] = {}

    def running(self, index: int) -> bool:
        return index in self._running

    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._running.values())

    async def ensure_model(self, run: ActiveRun) -> SegmentationModel:
        """Load and check the recipe's model (at preflight, or on the first slice after a restart).

        Kept between runs only while the next recipe names the same model: a run that names another
        (or a missing) one loads and checks that one, and every run is checked against its own recipe."""
        seg = run.recipe.segmentation
        path = resolve_model(seg.model)
        key = (str(path), json.dumps(seg.metadata, sort_keys=True), seg.threads)
        if self._model is None or self._model_key != key:
            self._model, self._model_key = None, None
            self._model = await asyncio.to_thread(
                load_segmentation_model,
                path,
                override=seg.metadata,
                threads=seg.threads or inference_threads(),
            )
            self._model_key = key
        img = run.recipe.imaging
        check_against_recipe(self._model.spec, img.detectors, REQUIRED_CLASSES, img.pixel_size_m)
        return self._model

    async def launch(self, run: ActiveRun, index: int, images: dict[str, Any] | None) -> None:
        """Segment a slice in a worker thread (after the one before it); `images` None: read from disk."""
        with profiling.span("segmentation_wait"):  # the instrument waits if the last slice is not done
            await self.drain()
        step_id = self._journal.begin_step(run.run_id, index, "segment", {"slice": index})
        task = asyncio.create_task(
            self._segment(run, index, step_id, images), name=f"kintsugi-segment-{index}"
        )
        self._running[index] = task

    async def wait(self, index: int) -> None:
        """Until slice `index`'s segmentation (if running) has finished, failed or not."""
        task = self._running.get(index)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def drain(self) -> None:
        for task in list(self._running.values()):
            with contextlib.suppress(Exception):
                await task

    async def catch_up(self, run: ActiveRun) -> None:
        """Slices whose segmentation a crash or fault cut short are segmented again from their files."""
        if not run.recipe.segmentation.enabled:
            return
        for index in range(run.next_slice):
            steps = [r for r in self._journal.steps(run.run_id, index) if r.step == "segment"]
            unfinished = steps and not any(r.ok for r in steps)
            if (
                unfinished
                and run.storage.slice_complete(index)
                and not run.storage.segmentation_complete(index)
            ):
                await self.launch(run, index, None)
                await self.drain()

    async def _segment(self, run: ActiveRun, index: int, step_id: int, images: dict[str, Any] | None) -> None:
        storage, recipe = run.storage, run.recipe
        try:
            model = await self.ensure_model(run)
            if images is None:  # a restart: read the slice back from disk
                images = await asyncio.to_thread(_read_images, storage.run_dir, storage.read_slice(index))
            t0 = time.monotonic()
            budget = recipe.segmentation.memory_budget_mb << 20
            result = await asyncio.to_thread(run_segmentation, model, images, memory_budget_bytes=budget)
            infer_s = time.monotonic() - t0
            window = outside_window(recipe)
            if window is not None:  # the drift fiducial's mark: not specimen (drift keeps it there)
                result.labels[window] = OUTSIDE_LABEL
            metrics = await asyncio.to_thread(
                slice_metrics,
                result.labels,
                recipe.imaging.pixel_size_m,
                max_probability=result.max_probability,
                entropy=result.entropy,
                grey_match=result.grey_match,
            )
            first = recipe.imaging.detectors[0]
            preview = await asyncio.to_thread(overlay, images[first], result.labels)
            numeric = metrics.numeric()
            files = await asyncio.to_thread(
                storage.write_segmentation,
                index,
                result.labels,
                preview,
                {"metrics": numeric, "inference_s": round(infer_s, 3)},
            )
        except Exception as exc:  # a failed segmentation never stops sectioning; it is reported
            log.exception("segmentation failed", slice=index)
            self._journal.fail_step(
                step_id,
                {"error": type(exc).__name__, "message": str(exc)},
                events=[
                    EventDraft("segmentation_failed", {"slice": index, "error": str(exc)}, run_id=run.run_id)
                ],
            )
            self._alerts.raise_("segmentation", "warning", f"slice {index}: segmentation failed: {exc}")
            self._products.unsegmented(index)
            self._on_change()
            return
        finally:
            self._running.pop(index, None)
        events = [
            EventDraft(
                "segmented", {"slice": index, "inference_s": round(infer_s, 3), **numeric}, run_id=run.run_id
            )
        ]
        wanted = run.least_confident.offer(index, numeric.get("confidence"))
        if wanted is not None:
            events.append(EventDraft("annotation_wanted", wanted, run_id=run.run_id))
        self._journal.complete_step(
            step_id, {"files": files, "inference_s": round(infer_s, 3)}, events=events
        )
        products = {"segmentation" if k == "record" else k: v for k, v in files.items()}
        self._products.segmented(run, index, numeric, products)
        self._on_change()


def _read_images(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    import tifffile

    return {
        name: tifffile.imread(run_dir / rel)
        for name, rel in record["files"].items()
        if name not in ("labels", "overlay")
    }
