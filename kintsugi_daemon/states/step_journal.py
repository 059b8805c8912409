"""A step's outcome in the journal: failures written at once, completions held back to ride on the next
state change's transaction (one fsync fewer per step; a crash before it is covered by reconciliation)."""

from __future__ import annotations

from typing import Any

from kintsugi_daemon.drivers.base import Aborted
from kintsugi_daemon.service.journal import EventDraft, Journal

__all__ = ["Completions", "record_failure"]


def record_failure(
    journal: Journal, run_id: str, index: int, step: str, step_id: int, exc: Exception
) -> None:
    """A step cut short (`step_aborted`) or failed (`step_failed`), with the error's detail."""
    detail = getattr(exc, "detail", {})
    if isinstance(exc, Aborted):
        result = {"error": "aborted", **detail}
        event = EventDraft("step_aborted", {"slice": index, "step": step, **detail}, run_id=run_id)
    else:
        error = type(exc).__name__
        result = {"error": error, "message": str(exc), **detail}
        data = {"slice": index, "step": step, "error": error, "message": str(exc)}
        event = EventDraft("step_failed", data, run_id=run_id)
    journal.fail_step(step_id, result, events=[event])


class Completions:
    """Completed steps not yet committed, keyed by (slice, step)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._held: dict[tuple[int, str], tuple[int, dict[str, Any], list[EventDraft]]] = {}

    def hold(
        self,
        run_id: str,
        index: int,
        step: str,
        step_id: int,
        result: dict[str, Any],
        extra: list[EventDraft] | None = None,
    ) -> None:
        event = EventDraft(
            "step_completed", {"slice": index, "step": step, **_summary(result)}, run_id=run_id
        )
        self._held[(index, step)] = (step_id, result, [event, *(extra or [])])

    def steps_of(self, index: int) -> set[str]:
        return {step for (i, step) in self._held if i == index}

    def __bool__(self) -> bool:
        return bool(self._held)

    def flush(self) -> None:
        """Write the held completions (call inside the transaction they ride on)."""
        pending, self._held = self._held, {}
        for step_id, result, events in pending.values():
            self._journal.complete_step(step_id, result, events=events)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """Flat scalars of a step result for its event (file lists and arrays stay in the journal)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
