"""The instrument's state as last seen, so the critical path needs no round trip to read it again.

Each operation's answer carries the instrument's state as the operation ended (`state` in the results
of deposit, mill, polish and the acquisition metadata). Between two steps only the daemon acts on the
instrument, so that answer is what a `state()` read would return a few milliseconds later: the guards
and a destructive step's `before` readings use it instead of a round trip. A reading older than
`MAX_AGE_S`, or any doubt (a failed step, a new run loop after a pause, a suspend or a restart), means a
real read. The instrument still refuses what it cannot do (vacuum lost meanwhile): that refusal takes
the guards' path, which then reads afresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from kintsugi_daemon.drivers.base import DualBeam, InstrumentState

__all__ = ["MAX_AGE_S", "LatestState"]

MAX_AGE_S = 2.0  # the guards' reaction time when no operation answers in between


class LatestState:
    def __init__(self, instrument: DualBeam, clock: Callable[[], float] = time.monotonic) -> None:
        self._instrument = instrument
        self._clock = clock
        self._seen: tuple[float, InstrumentState] | None = None
        self.reads = 0  # round trips made (the idle-time benchmark reports them)

    def fresh(self) -> InstrumentState | None:
        if self._seen is None or self._clock() - self._seen[0] > MAX_AGE_S:
            return None
        return self._seen[1]

    async def get(self) -> InstrumentState:
        """The fresh state if there is one, else a read (remembered)."""
        state = self.fresh()
        if state is None:
            state = await self._instrument.state()
            self.reads += 1
            self.remember(state)
        return state

    def remember(self, state: InstrumentState | Mapping[str, Any] | None) -> None:
        """An operation's answer: its state (a model, or its JSON form from a result dict), or None."""
        if state is None:
            self._seen = None
            return
        model = state if isinstance(state, InstrumentState) else InstrumentState.model_validate(state)
        self._seen = (self._clock(), model)

    def forget(self) -> None:
        self._seen = None
