"""A recording fake of the AutoScript surface (`SdbMicroscopeClient`): the one mock the project allows.

Every method call and every property write is recorded in order, with whether the calling thread held the
bridge's lock at that moment, so a test can assert the exact call sequence of a verb and that each
set-view-then-act pair ran under the lock. Reads return configured values (`values`, or a callable for a
sequence of answers); method results come from `returns` (a value, or a callable given the arguments),
else the call returns its own node, so `gas.get_gis_port("Pt dep").insert()` records as such.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = ["Call", "FakeAutoScript", "FakePattern", "FakeStructures", "RecordingLock"]


class RecordingLock:
    """A re-entrant lock that knows whether the current thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> RecordingLock:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        self._lock.release()

    def held(self) -> bool:
        return self._owner == threading.get_ident()


@dataclass(frozen=True)
class Call:
    path: str  # "imaging.set_active_view", or "detector.type.value =" for a property write
    args: tuple[Any, ...]
    locked: bool


@dataclass
class FakePattern:
    width: float
    height: float


@dataclass(frozen=True)
class FakePoint:
    x: float
    y: float


class FakeStructures:
    """AutoScript's structures as plain records (so the test can compare them)."""

    def GrabFrameSettings(self, **kwargs: Any) -> dict[str, Any]:  # noqa: N802
        return {"GrabFrameSettings": kwargs}

    def Point(self, x: float, y: float) -> FakePoint:  # noqa: N802
        return FakePoint(x, y)


class _Node:
    def __init__(self, root: FakeAutoScript, path: str) -> None:
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str) -> Any:
        root: FakeAutoScript = object.__getattribute__(self, "_root")
        full = f"{object.__getattribute__(self, '_path')}.{name}".lstrip(".")
        if full in root.values:
            value = root.values[full]
            return value() if callable(value) else value
        return root.node(full)

    def __setattr__(self, name: str, value: Any) -> None:
        root: FakeAutoScript = object.__getattribute__(self, "_root")
        full = f"{object.__getattribute__(self, '_path')}.{name}".lstrip(".")
        root.record(f"{full} =", (value,))
        root.values[full] = value  # read back what was written, as the instrument would

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        root: FakeAutoScript = object.__getattribute__(self, "_root")
        path = object.__getattribute__(self, "_path")
        root.record(path, (*args, *(f"{k}={v}" for k, v in kwargs.items())))
        if path not in root.returns:
            return self  # an object the call returned (a GIS port): its calls record under this path
        answer = root.returns[path]
        if callable(answer):
            return answer(*args, **kwargs)
        return answer


@dataclass
class FakeAutoScript:
    lock: RecordingLock
    values: dict[str, Any] = field(default_factory=dict)
    returns: dict[str, Any] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    _nodes: dict[str, _Node] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    on_call: Callable[[str], None] | None = None

    def node(self, path: str) -> _Node:
        if path not in self._nodes:
            self._nodes[path] = _Node(self, path)
        return self._nodes[path]

    @property
    def client(self) -> Any:
        return self.node("")

    def record(self, path: str, args: tuple[Any, ...]) -> None:
        with self._guard:
            self.calls.append(Call(path, args, self.lock.held()))
        if self.on_call is not None:
            self.on_call(path)

    def sequence(self, *, skip: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
        """(path, *args) of every call, without those whose path starts with one of `skip`."""
        return [(c.path, *c.args) for c in self.calls if not c.path.startswith(skip)]
