"""The daemon's declared state machine: every state and every allowed transition, in one table.

Built on transitions' HierarchicalAsyncMachine with auto transitions off, so a trigger that is not in
this table raises instead of silently moving the machine. Nested states use "." (`running.mill`), the
same path the MQTT status topic publishes. Work never runs in transition callbacks: the controller runs
steps as supervised tasks and only fires triggers here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transitions.extensions import HierarchicalAsyncGraphMachine
from transitions.extensions.asyncio import HierarchicalAsyncMachine, NestedAsyncState

__all__ = [
    "ACTIVE_RUN_STATES",
    "STATES",
    "STEPS",
    "TRANSITIONS",
    "build_machine",
    "destination",
    "mermaid_diagram",
    "write_diagram",
]

STEPS = ("mill_fiducial", "deposit_pt", "mill", "polish", "image", "segment", "adapt", "checkpoint")

STATES: list[Any] = [
    "booting",
    "recovering",
    "idle",
    "preflight",
    {"name": "running", "children": list(STEPS)},
    "pausing",
    "paused",
    "suspended",
    "resuming",
    "stopping",
    "aborting",
    "faulted",
    "done",
]

# States in which a run exists and holds the instrument.
ACTIVE_RUN_STATES = (
    "preflight",
    "running",
    "pausing",
    "paused",
    "suspended",
    "resuming",
    "stopping",
    "aborting",
)

_INTERRUPTIBLE = ["running", "pausing", "resuming"]

TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "booted", "source": "booting", "dest": "idle"},
    {"trigger": "recover", "source": "booting", "dest": "recovering"},
    {"trigger": "recovered", "source": "recovering", "dest": "paused"},
    {"trigger": "start", "source": ["idle", "done"], "dest": "preflight"},
    {"trigger": "preflight_failed", "source": "preflight", "dest": "idle"},
    # Each step is entered from the previous one, from preflight (first slice) or from resuming.
    *(
        {
            "trigger": f"begin_{step}",
            "source": ["preflight", "resuming", "running", "stopping"],
            "dest": f"running.{step}",
        }
        for step in STEPS
    ),
    {"trigger": "pause", "source": "running", "dest": "pausing"},  # deferred to the next step boundary
    {"trigger": "paused", "source": ["pausing", "running", "resuming"], "dest": "paused"},
    {"trigger": "suspend", "source": ["running", "pausing", "resuming", "preflight"], "dest": "suspended"},
    {"trigger": "resume", "source": ["paused", "suspended"], "dest": "resuming"},
    {
        "trigger": "stop",
        "source": ["running", "pausing", "paused", "suspended", "resuming"],
        "dest": "stopping",
    },
    {
        "trigger": "abort",
        "source": [*_INTERRUPTIBLE, "preflight", "paused", "suspended", "stopping"],
        "dest": "aborting",
    },
    # A faulted run ends in one command (the operator has seen the alert; the instrument is made safe).
    {"trigger": "stop", "source": "faulted", "dest": "stopping", "conditions": "has_active_run"},
    {"trigger": "abort", "source": "faulted", "dest": "aborting", "conditions": "has_active_run"},
    {"trigger": "finish", "source": ["running", "stopping", "aborting"], "dest": "done"},
    {
        "trigger": "fault",
        "source": [*_INTERRUPTIBLE, "preflight", "stopping", "aborting", "recovering"],
        "dest": "faulted",
    },
    {
        "trigger": "halt",
        "source": [*_INTERRUPTIBLE, "preflight", "paused", "suspended", "stopping"],
        "dest": "faulted",
    },
    {"trigger": "clear", "source": "faulted", "dest": "paused", "conditions": "has_active_run"},
    {"trigger": "clear", "source": "faulted", "dest": "idle", "unless": "has_active_run"},
]


class _DotState(NestedAsyncState):
    separator = "."


class _Machine(HierarchicalAsyncMachine):
    state_cls = _DotState


class _GraphMachine(HierarchicalAsyncGraphMachine):
    state_cls = _DotState


def build_machine(model: object, initial: str = "booting") -> HierarchicalAsyncMachine:
    return _Machine(
        model=model,
        states=STATES,
        transitions=TRANSITIONS,
        initial=initial,
        auto_transitions=False,
        queued=False,
        send_event=False,
    )


def destination(machine: HierarchicalAsyncMachine, trigger: str, state: str, *, active_run: bool) -> str:
    """Where `trigger` takes the machine from `state` (journaled before the transition is taken)."""
    for transition in machine.get_transitions(trigger, source=state):
        if transition.dest is not None:
            if trigger == "clear":
                return "paused" if active_run else "idle"
            return str(transition.dest)
    # A child state (running.mill) matches transitions declared on its parent.
    parent = state.split(".")[0]
    for transition in machine.get_transitions(trigger, source=parent):
        if transition.dest is not None:
            return str(transition.dest)
    return state


class _DiagramModel:
    def has_active_run(self) -> bool:
        return False


def mermaid_diagram() -> str:
    """The table as a Mermaid state diagram (rendered by GitHub and most Markdown viewers)."""
    machine = _GraphMachine(
        model=_DiagramModel(),
        states=STATES,
        transitions=TRANSITIONS,
        initial="booting",
        auto_transitions=False,
        graph_engine="mermaid",
        show_conditions=True,
        title="kintsugi daemon",
    )
    return str(machine.get_graph().draw(None))


def write_diagram(path: Path) -> None:
    text = (
        "# The daemon's state machine\n\n"
        "Generated from `kintsugi_daemon/states/table.py` by "
        "`python -m kintsugi_daemon.states.table docs/state-machine.md`; do not edit by hand.\n\n"
        f"```mermaid\n{mermaid_diagram().strip()}\n```\n"
    )
    path.write_text(text)


if __name__ == "__main__":
    import sys

    write_diagram(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/state-machine.md"))
