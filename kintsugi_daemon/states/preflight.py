"""Preflight: before the instrument is touched, the run's checks (vacuum, the segmentation model) and a
record of what it starts on (instrument identity, disk needed and free)."""

from __future__ import annotations

from kintsugi_daemon.drivers.base import DualBeam
from kintsugi_daemon.estimate import slice_bytes
from kintsugi_daemon.inference.contract import ModelError
from kintsugi_daemon.service.journal import EventDraft, Journal
from kintsugi_daemon.states.run import ActiveRun
from kintsugi_daemon.states.segmentation import SegmentationPipeline

__all__ = ["preflight_problem"]


async def preflight_problem(
    instrument: DualBeam, journal: Journal, run: ActiveRun, segmentation: SegmentationPipeline
) -> str | None:
    """Publish the preflight event; the reason to refuse the run, or None to go on."""
    state = await instrument.state()
    identity = await instrument.identity()
    journal.publish(
        [
            EventDraft(
                "preflight",
                {
                    "instrument": identity.model_dump(),
                    "vacuum": state.vacuum,
                    "disk_needed_bytes": slice_bytes(run.recipe) * run.total,
                    "disk_free_bytes": run.storage.free_bytes(),
                },
                run_id=run.run_id,
            )
        ]
    )
    if state.vacuum != "pumped":
        return f"vacuum {state.vacuum}"
    if run.recipe.segmentation.enabled:
        try:
            await segmentation.ensure_model(run)
        except ModelError as exc:
            return f"segmentation model: {exc}"
    return None
