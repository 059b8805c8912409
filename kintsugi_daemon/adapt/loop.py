"""The run's adaptive state between slices: observation history, the fiducial reference, decisions
waiting for their slice, and the settings each slice is done with.

No I/O: the controller feeds it what each slice measured and journals what it returns before anything
takes effect. A run that restarts (crash, resume) rebuilds it from the slice JSON files it wrote.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kintsugi_daemon.adapt import decide
from kintsugi_daemon.adapt.decisions import Decision, initial_settings, next_settings
from kintsugi_daemon.adapt.observations import (
    FiducialMatch,
    ImageMeasures,
    Observation,
    SliceSettings,
    fiducial_match,
    image_measures,
    segmentation_observation,
)
from kintsugi_daemon.config import Recipe
from kintsugi_daemon.inference.metrics import SliceMetrics
from kintsugi_daemon.instrument import SIN_SEM_FIB

__all__ = ["AdaptLoop"]

# One-shot actions that one already done or waiting makes redundant: Pt decided from slice i-1's
# segmentation for slice i+1 covers what slice i's segmentation (taken before that deposit) asks again.
_ONCE = ("deposit_pt", "stop")


class AdaptLoop:
    def __init__(self, recipe: Recipe, beam_shift_limit_m: float) -> None:
        self.recipe = recipe
        self.beam_shift_limit_m = beam_shift_limit_m
        self.history: list[Observation] = []
        self.pending: dict[int, list[Decision]] = {}
        self.applied: dict[int, SliceSettings] = {}
        self.decided: dict[int, list[Decision]] = {}  # slice -> what its adapt step decided
        self.reach: dict[int, float] = {}  # slice -> the infiltration depth its deposit reported
        self.rereference_at: int | None = None  # after a suspension: the next view is the new reference
        self._reference: np.ndarray | None = None
        self.reference_slice: int | None = None

    @property
    def adaptive(self) -> bool:
        return self.recipe.adapt.policy == "adaptive"

    def settings_for(self, index: int) -> SliceSettings:
        """The settings slice `index` is done with: the previous slice's plus the decisions for it.
        Raises `OutOfBounds` if a decision would leave the recipe's bounds (the run suspends)."""
        if index in self.applied:
            return self.applied[index]
        previous = self.applied.get(index - 1) or initial_settings(self.recipe)
        settings = next_settings(previous, self.pending.pop(index, []), self.recipe, self.beam_shift_limit_m)
        if self._scheduled_pt(index):
            settings = settings.model_copy(update={"deposit_pt": True})
        self.applied[index] = settings
        return settings

    def _scheduled_pt(self, index: int) -> bool:
        """Deposits not decided by a policy: the fixed schedule, or only the first slice's cap."""
        if self.adaptive and self.recipe.adapt.pt.enabled:
            return index == 0
        k = self.recipe.pt.every_slices
        return bool(k) and index % k == 0

    def fiducial_window(self, images: Mapping[str, np.ndarray]) -> np.ndarray:
        """The recipe's fiducial window cropped, about its centre, to the square (on the face) the mark
        is milled in: the rest of a wide window is face that changes every slice, not fiducial."""
        d, img = self.recipe.adapt.drift, self.recipe.imaging
        rows_per_col = SIN_SEM_FIB if self.recipe.run.geometry == "cross_section" else 1.0
        side_cols = min(d.fiducial_width_px, d.fiducial_height_px / rows_per_col)
        cols = max(round(side_cols), 16)
        rows = max(round(side_cols * rows_per_col), 16)
        x0 = d.fiducial_x_px + (d.fiducial_width_px - cols) // 2
        y0 = d.fiducial_y_px + (d.fiducial_height_px - rows) // 2
        return images[img.detectors[0]][y0 : y0 + rows, x0 : x0 + cols]

    def deposited(self, index: int, infiltration_depth_m: float) -> None:
        self.reach[index] = infiltration_depth_m

    def stage_target(self, index: int) -> tuple[float, float] | None:
        """Where a decided stage move takes the stage for slice `index`: from where the previous slice
        was imaged, so moving there twice (a repeat after a crash) moves once."""
        s = self.settings_for(index)
        if not (s.stage_move_x_m or s.stage_move_y_m):
            return None
        before = [o for o in self.history if o.slice_index < index and o.stage_x_m is not None]
        if not before:
            return None
        last = before[-1]
        assert last.stage_x_m is not None and last.stage_y_m is not None
        return (last.stage_x_m + s.stage_move_x_m, last.stage_y_m + s.stage_move_y_m)

    def set_reference(self, images: Mapping[str, np.ndarray]) -> None:
        self._reference = np.asarray(self.fiducial_window(images), dtype=np.float64)

    def measure(
        self, index: int, images: Mapping[str, np.ndarray]
    ) -> tuple[ImageMeasures, FiducialMatch | None]:
        """The image measures of slice `index` (the heavy part: run it off the event loop); touches only
        the fiducial reference, never the history."""
        fiducial: FiducialMatch | None = None
        if self.recipe.adapt.drift.enabled:
            if self._reference is None or self.rereference_at == index:
                # The first slice's view is where the run is meant to stay; after a suspension the
                # operator resumed on the view as it is now.
                self.set_reference(images)
                self.reference_slice = index
                self.rereference_at = None
            assert self._reference is not None
            fiducial = fiducial_match(self._reference, self.fiducial_window(images))
        return image_measures(images, self.recipe.adapt.imaging.rose_k), fiducial

    def record(
        self,
        index: int,
        measured: tuple[ImageMeasures, FiducialMatch | None],
        *,
        face_position_m: float,
        working_distance_m: float,
        stage_m: tuple[float, float] | None = None,
    ) -> Observation:
        """Record what slice `index` measured with the instrument's answers; a repeat of the same slice
        (after a suspension) replaces its observation."""
        self.history = [o for o in self.history if o.slice_index < index]
        previous = self.history[-1].face_position_m if self.history else None
        cross = self.recipe.run.geometry == "cross_section"
        obs = Observation(
            slice_index=index,
            settings=self.settings_for(index),
            face_position_m=face_position_m,
            thickness_m=None if previous is None else face_position_m - previous,
            target_thickness_m=self.recipe.run.slice_thickness_m,
            working_distance_m=working_distance_m,
            beam_shift_limit_m=self.beam_shift_limit_m,
            pixel_size_m=self.recipe.imaging.pixel_size_m,
            pixel_size_y_m=self.recipe.imaging.pixel_size_m / (SIN_SEM_FIB if cross else 1.0),
            infiltration_depth_m=self.reach.get(index),
            stage_x_m=None if stage_m is None else stage_m[0],
            stage_y_m=None if stage_m is None else stage_m[1],
            fiducial=measured[1],
            images=measured[0],
        )
        self.history.append(obs)
        return obs

    def observe(
        self,
        index: int,
        images: Mapping[str, np.ndarray],
        *,
        face_position_m: float,
        working_distance_m: float,
        stage_m: tuple[float, float] | None = None,
    ) -> Observation:
        """`measure` then `record`, in one call."""
        return self.record(
            index,
            self.measure(index, images),
            face_position_m=face_position_m,
            working_distance_m=working_distance_m,
            stage_m=stage_m,
        )

    def attach_segmentation(
        self, index: int, metrics: SliceMetrics | Mapping[str, float]
    ) -> Observation | None:
        for n, obs in enumerate(self.history):
            if obs.slice_index == index:
                self.history[n] = obs.model_copy(update={"segmentation": segmentation_observation(metrics)})
                return self.history[n]
        return None

    def decide(self) -> list[Decision]:
        """The policies' decisions on the history so far. Changes are queued for the slices they apply to
        (the caller journals every returned decision before the next slice starts); a `suspend` is only
        returned, for the caller to act on. A policy that raises propagates."""
        if not self.adaptive or not self.history:
            return []
        fresh = []
        now = self.history[-1].slice_index
        for d in decide(self.history, self.recipe):
            if d.applies_to_slice <= now:  # read from a segmentation that came late: as soon as possible
                d = d.model_copy(update={"applies_to_slice": now + 1})
            if self._already_covered(d):
                continue
            if d.action != "suspend":
                self.pending.setdefault(d.applies_to_slice, []).append(d)
            fresh.append(d)
        self.decided[now] = fresh
        return fresh

    def restore(self, observations: list[Observation], decisions: list[Decision], next_slice: int) -> None:
        """A restarted daemon's loop, from what the adapt steps journaled: the history, the settings
        each slice was done with, and the decisions still waiting for their slice."""
        self.history = sorted(observations, key=lambda o: o.slice_index)
        self.applied = {o.slice_index: o.settings for o in self.history}
        self.reach |= {o.slice_index: o.infiltration_depth_m for o in self.history if o.infiltration_depth_m}
        for d in decisions:
            self.decided.setdefault(d.basis_slice, []).append(d)
            if d.applies_to_slice >= next_slice and d.action != "suspend":
                self.pending.setdefault(d.applies_to_slice, []).append(d)

    def _already_covered(self, d: Decision) -> bool:
        """A deposit (or stop) already applied after the evidence was taken, or waiting for a slice up to
        this one, answers the same evidence: a second would only cost time."""
        if d.action not in _ONCE:
            return False
        if d.action == "deposit_pt" and any(
            s.deposit_pt for i, s in self.applied.items() if d.basis_slice < i <= d.applies_to_slice
        ):
            return True
        return any(
            p.action == d.action
            for slice_, waiting in self.pending.items()
            if slice_ <= d.applies_to_slice
            for p in waiting
        )

    def stop_before(self, index: int) -> Decision | None:
        """A stop rule that ends the run before slice `index` is milled, if one was decided."""
        for slice_, waiting in self.pending.items():
            for d in waiting:
                if d.action == "stop" and slice_ <= index:
                    return d
        return None
