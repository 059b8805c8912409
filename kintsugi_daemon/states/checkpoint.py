"""A slice's records once it is done: what the latest-slice topic shows (completed by its segmentation,
which usually finishes during the next slice) and the run's manifest (run.json) for readers."""

from __future__ import annotations

import time
from typing import Any

from kintsugi_daemon.estimate import SlicePace, estimate_run
from kintsugi_daemon.service.journal import EventDraft, Journal
from kintsugi_daemon.states.run import ActiveRun

__all__ = [
    "MANIFEST_EVERY",
    "SliceProducts",
    "manifest",
    "manifest_due",
    "progress",
    "record_finish",
    "slice_period_s",
]

MANIFEST_EVERY = 10  # slices between run.json rewrites (each costs two fsyncs)


class SliceProducts:
    """The latest finished slice with its files and metrics, and the last metrics of any slice.

    `latest` changes once per slice: when a segmented run's slice has both its checkpoint and its
    segmentation (or the segmentation failed), when an unsegmented run's slice is checkpointed. Publishing
    at the checkpoint and again with the metrics sent every slice twice, the first time without metrics."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self.latest: dict[str, Any] | None = None
        self.last_metrics: dict[str, Any] = {}
        self._early: dict[int, dict[str, Any]] = {}  # slice -> metrics and files, until its checkpoint
        self._waiting: dict[int, dict[str, Any]] = {}  # checkpointed slice -> summary, until segmented

    def checkpointed(self, run: ActiveRun, index: int) -> None:
        summary: dict[str, Any] = {
            "run_id": run.run_id,
            "slice": index,
            "z_m": run.face_m,
            "thickness_m": run.recipe.run.slice_thickness_m,
            "files": self._image_files(run, index),
        }
        observed = [o for o in run.adapt.history if o.slice_index == index]
        if observed:  # the adaptive policy: what the slice measured and what was decided from it
            obs = observed[-1]
            decided = run.adapt.decided.get(index, [])
            if obs.thickness_m is not None and obs.thickness_m > 0:
                summary["thickness_m"] = obs.thickness_m
            summary["metrics"] = obs.numeric()
            summary["decisions"] = {
                f"{d.policy}/{d.action}": f"slice {d.applies_to_slice}: {d.why}" for d in decided
            }
            self.last_metrics = {"slice": index, **obs.numeric(), "adapt_decisions": len(decided)}
        segmented = self._early.pop(index, None)
        if segmented is not None:  # segmentation beat the checkpoint
            summary["metrics"] = {**summary.get("metrics", {}), **segmented["metrics"]}
            summary["files"] |= segmented["files"]
        elif run.recipe.segmentation.enabled:
            self._waiting[index] = summary  # it usually finishes during the next slice
            return
        self.latest = summary

    def segmented(self, run: ActiveRun, index: int, metrics: dict[str, Any], files: dict[str, str]) -> None:
        run.adapt.attach_segmentation(index, metrics)  # what the Pt and stop policies read (lag 2)
        self.last_metrics = {"slice": index, **metrics}
        summary = self._waiting.pop(index, None)
        if summary is None:  # not checkpointed yet: the checkpoint picks it up
            self._early[index] = {"metrics": metrics, "files": files}
            return
        self.latest = {
            **summary,
            "metrics": {**summary.get("metrics", {}), **metrics},
            "files": {**summary["files"], **files},
        }

    def unsegmented(self, index: int) -> None:
        """The slice's segmentation failed: the slice is still finished, without metrics."""
        summary = self._waiting.pop(index, None)
        if summary is not None:
            self.latest = summary

    def _image_files(self, run: ActiveRun, index: int) -> dict[str, str]:
        for rec in self._journal.steps(run.run_id, index):
            if rec.step == "image" and rec.ok and rec.result:
                return dict(rec.result.get("files", {}))
        return {}


def slice_period_s(journal: Journal, run: ActiveRun, index: int) -> float:
    """From the slice's first step to now."""
    first = journal.steps(run.run_id, index)
    return time.time() - min(r.started for r in first) if first else 0.0


def manifest_due(run: ActiveRun) -> bool:
    return run.next_slice % MANIFEST_EVERY == 0 or run.next_slice == run.total


def manifest(run: ActiveRun, how: str | None) -> dict[str, Any]:
    """run.json: progress for readers (the slice records are the truth); `how` None while running."""
    return {
        "run_id": run.run_id,
        "name": run.recipe.run.name,
        "total_slices": run.total,
        "completed_slices": run.next_slice,
        "state": how or "running",
        "slice_thickness_m": run.recipe.run.slice_thickness_m,
        "pixel_size_m": run.recipe.imaging.pixel_size_m,
        "detectors": list(run.recipe.imaging.detectors),
        "started": run.started,
        "updated": time.time(),
        "annotation_wanted": run.least_confident.slices(),
    }


def record_finish(journal: Journal, run: ActiveRun, journal_state: str, event: dict[str, Any]) -> None:
    """The run's end in the journal (with its `run_finished` event), then in run.json."""
    journal.finish_run(
        run.run_id, journal_state, events=[EventDraft("run_finished", event, run_id=run.run_id)]
    )
    run.storage.write_manifest(manifest(run, event["how"]))


def progress(run: ActiveRun, step: str | None) -> dict[str, Any]:
    """The progress topic: where the run is, its ETA and the ETA's one-sigma uncertainty (`SlicePace`:
    the median of the measured slice periods, the recipe's estimate before the first)."""
    pace = SlicePace(prior_s=estimate_run(run.recipe).seconds_per_slice)
    for period in run.slice_times:
        pace.observe(period)
    eta, sigma = pace.eta(run.total - run.next_slice)
    return {
        "run_id": run.run_id,
        "slice": run.next_slice,
        "total": run.total,
        "step": step,
        "percent": round(100.0 * run.next_slice / run.total, 2),
        "eta_s": round(eta, 1),
        "eta_uncertainty_s": round(sigma, 1),
    }
