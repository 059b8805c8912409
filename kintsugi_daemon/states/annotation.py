"""Which slices a microscopist should annotate: the run's least confident segmentations.

Fine-tuning on a handful of annotated slices (`kintsugi train --init builtin`) helps most where the model
is least sure, so the daemon keeps the `WANTED` slices with the lowest confidence
(`SliceMetrics.confidence`: the mean softmax probability of the chosen class times the grey-level match
with the training data, so a slice imaged unlike the training data ranks low even where the softmax stays
sure) seen in the run. A slice that enters that list is announced with an `annotation_wanted` event
(journaled with the slice's `segmented` event), and run.json lists them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WANTED", "LeastConfident"]

WANTED = 5


@dataclass
class LeastConfident:
    """The `size` least confident slices so far, lowest confidence first."""

    size: int = WANTED
    _ranked: list[tuple[float, int]] = field(default_factory=list)

    def offer(self, index: int, confidence: float | None) -> dict[str, Any] | None:
        """Record a segmented slice; the `annotation_wanted` payload if it is among the least confident."""
        if confidence is None or any(i == index for _, i in self._ranked):
            return None
        entry = (confidence, index)
        if len(self._ranked) >= self.size and entry >= self._ranked[-1]:
            return None
        bisect.insort(self._ranked, entry)
        del self._ranked[self.size :]
        return {
            "slice": index,
            "confidence": round(confidence, 4),
            "rank": self._ranked.index(entry) + 1,
            "least_confident": self.slices(),
        }

    def slices(self) -> list[dict[str, Any]]:
        """For run.json and the event: [{"slice": i, "confidence": c}, ...], least confident first."""
        return [{"slice": i, "confidence": round(c, 4)} for c, i in self._ranked]
