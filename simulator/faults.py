"""Fault injection for the simulator: off unless asked for, scriptable from a flag or a test endpoint.

A fault is armed for a verb (or any verb) and fires on the Nth matching call from now; it then stays
active for `duration_s` wall-clock seconds (None: until cleared; stage_move_error, hang and crash act
on the one call they fire on). The flag syntax is
`KIND[@VERB][:AFTER][/DURATION]`, e.g. `hang@mill:3` or `vacuum_loss/60`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from kintsugi_daemon.drivers.base import StrictModel

__all__ = ["ONE_SHOT", "FaultKind", "FaultPlan", "FaultSpec", "parse_fault_flag"]

FaultKind = Literal[
    "stage_move_error",
    "beam_current_drop",
    "gis_heater_failure",
    "vacuum_loss",
    "comms_drop",
    "hang",
    "crash",
]
Verb = Literal[
    "any",
    "identity",
    "state",
    "move_stage",
    "set_ion_beam",
    "set_beam_shift",
    "deposit_pt",
    "mill",
    "polish",
    "acquire",
    "auto_function",
    "edx_map",
    "safe_state",
]


# Without a duration these act on the one call they fire on; the others persist until cleared.
ONE_SHOT = frozenset({"stage_move_error", "hang", "crash"})


class FaultSpec(StrictModel):
    kind: FaultKind
    verb: Verb = "any"
    after_calls: int = Field(default=0, ge=0, le=100_000)  # matching calls to let through first
    duration_s: float | None = Field(default=None, gt=0, le=1e6)


_FLAG = re.compile(r"^(?P<kind>[a-z_]+)(@(?P<verb>[a-z_]+))?(:(?P<after>\d+))?(/(?P<dur>[0-9.]+))?$")


def parse_fault_flag(text: str) -> FaultSpec:
    m = _FLAG.match(text.strip())
    if not m:
        raise ValueError(f"bad fault {text!r}: expected KIND[@VERB][:AFTER][/DURATION_S]")
    data: dict[str, object] = {"kind": m["kind"]}
    if m["verb"]:
        data["verb"] = m["verb"]
    if m["after"]:
        data["after_calls"] = int(m["after"])
    if m["dur"]:
        data["duration_s"] = float(m["dur"])
    return FaultSpec.model_validate(data, strict=False)


class FaultPlan:
    """Armed and active faults. `tick(verb, now_s)` is called once per instrument call."""

    def __init__(self) -> None:
        self._armed: list[tuple[FaultSpec, int]] = []
        self._active: dict[str, float | None] = {}  # kind -> instrument time it ends (None: never)

    def arm(self, spec: FaultSpec) -> None:
        self._armed.append((spec, spec.after_calls))

    def clear(self) -> None:
        self._armed.clear()
        self._active.clear()

    def tick(self, verb: str, now_s: float) -> list[FaultSpec]:
        """Count this call against armed faults; return the ones that fire now (and mark them active)."""
        fired: list[FaultSpec] = []
        still: list[tuple[FaultSpec, int]] = []
        for spec, remaining in self._armed:
            if spec.verb not in ("any", verb):
                still.append((spec, remaining))
            elif remaining > 0:
                still.append((spec, remaining - 1))
            else:
                fired.append(spec)
                if spec.duration_s is not None:
                    self._active[spec.kind] = now_s + spec.duration_s
                elif spec.kind not in ONE_SHOT:
                    self._active[spec.kind] = None
        self._armed = still
        return fired

    def active(self, kind: str, now_s: float) -> bool:
        if kind not in self._active:
            return False
        end = self._active[kind]
        if end is not None and now_s >= end:
            del self._active[kind]
            return False
        return True

    def describe(self, now_s: float) -> dict[str, object]:
        return {
            "armed": [s.model_dump() | {"remaining_calls": r} for s, r in self._armed],
            "active": sorted(k for k in list(self._active) if self.active(k, now_s)),
        }
