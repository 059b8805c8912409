"""The daemon's one instrument client: `DualBeam` over the instrument API.

Every call has a deadline: it travels to the server (which stops the instrument when it passes) and bounds
the HTTP wait here too, with a grace for the server's own answer. If the server never answers, the client
asks it to stop and raises DeadlineExceeded. Transport failures (and answers that are not the instrument
API's) become CommsLost; a refused token is Unauthorized (configuration, not comms). Destructive verbs are
never retried here: whether a mill happened is for the journal to reconcile, not for a retry loop to guess.
A destructive verb whose caller is cancelled asks the instrument to stop before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from kintsugi_daemon.drivers.base import (
    API_PREFIX,
    DEFAULT_DEADLINES_S,
    MAX_DEADLINE_S,
    AcquireRequest,
    Acquisition,
    AcquisitionMetadata,
    AutoFunctionRequest,
    AutoFunctionResult,
    BeamShift,
    CommsLost,
    DeadlineExceeded,
    DepositRequest,
    DepositResult,
    EdxRequest,
    EdxResult,
    ErrorBody,
    FiducialRequest,
    FiducialResult,
    InstrumentError,
    InstrumentIdentity,
    InstrumentState,
    InvalidRequest,
    IonBeamSettings,
    IonBeamState,
    MillRequest,
    MillResult,
    PolishRequest,
    SafeStateResult,
    StageMove,
    StagePosition,
    StopResult,
    Unauthorized,
    error_from_body,
)
from kintsugi_daemon.drivers.tiff_wire import decode_channels
from kintsugi_daemon.service import profiling

__all__ = ["HttpDualBeam"]

M = TypeVar("M", bound=BaseModel)

GRACE_S = 5.0  # time the server gets beyond the deadline to report its own DeadlineExceeded
STOP_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0
DESTRUCTIVE_VERBS = frozenset({"deposit_pt", "mill", "polish"})


class HttpDualBeam:
    """A DualBeam reached over HTTP. `deadline_scale` shrinks the default deadlines for fast simulators."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        deadline_scale: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not (deadline_scale > 0 and math.isfinite(deadline_scale)):
            raise ValueError("deadline_scale must be a finite number > 0")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, transport=transport)
        self._deadline_scale = deadline_scale
        self.base_url = base_url

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> HttpDualBeam:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _deadline(self, verb: str, deadline_s: float | None) -> float:
        if deadline_s is not None:
            if not (isinstance(deadline_s, int | float) and 0 < deadline_s <= MAX_DEADLINE_S):
                raise InvalidRequest(
                    f"{verb}: deadline_s must be a finite number in (0, {MAX_DEADLINE_S:g}], "
                    f"got {deadline_s!r}",
                    detail={"field": "deadline_s", "verb": verb},
                )
            return float(deadline_s)
        return min(max(DEFAULT_DEADLINES_S[verb] * self._deadline_scale, 5.0), MAX_DEADLINE_S)

    async def _request(
        self, verb: str, method: str, path: str, body: BaseModel | None, deadline_s: float | None
    ) -> httpx.Response:
        limit = self._deadline(verb, deadline_s)
        content = body.model_dump_json().encode() if body is not None else None
        headers = {"X-Deadline-S": repr(limit)}
        if content is not None:
            headers["Content-Type"] = "application/json"
        timeout = httpx.Timeout(limit + GRACE_S, connect=CONNECT_TIMEOUT_S)
        try:
            with profiling.span(f"call:{verb}"):
                resp = await self._http.request(
                    method, API_PREFIX + path, content=content, headers=headers, timeout=timeout
                )
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Never reached the server: nothing is running there that would need a stop.
            raise CommsLost(
                f"{verb}: instrument API at {self.base_url} unreachable: {exc!r}", detail={"verb": verb}
            ) from exc
        except httpx.TimeoutException:
            await self._stop_quietly()
            raise DeadlineExceeded(
                f"{verb}: no answer from {self.base_url} within {limit + GRACE_S:g} s",
                detail={"verb": verb, "deadline_s": limit},
            ) from None
        except httpx.RequestError as exc:
            raise CommsLost(
                f"{verb}: instrument API at {self.base_url} unreachable: {exc!r}", detail={"verb": verb}
            ) from exc
        except asyncio.CancelledError:
            if verb in DESTRUCTIVE_VERBS:
                # Our caller gave up on a step that may be patterning: do not leave it running unattended.
                await asyncio.shield(self._stop_quietly())
            raise
        if resp.status_code >= 400:
            raise self._error(verb, resp)
        return resp

    @staticmethod
    def _error(verb: str, resp: httpx.Response) -> InstrumentError:
        try:
            body = ErrorBody.model_validate(resp.json())
        except (ValueError, ValidationError):
            # Not the instrument API answering (a proxy, a wrong port): the instrument is not reachable.
            return CommsLost(
                f"{verb}: malformed error answer, HTTP {resp.status_code}: {resp.text[:200]}",
                detail={"status": resp.status_code, "verb": verb},
            )
        if body.kind == "unauthorized":
            return Unauthorized(
                f"{verb}: the instrument API refused our token (check the configured token)",
                detail={"status": resp.status_code, "verb": verb},
            )
        return error_from_body(body)

    async def _stop_quietly(self) -> None:
        # The server may be gone or hung; the caller gets DeadlineExceeded either way.
        with contextlib.suppress(httpx.HTTPError, OSError):
            await self._http.post(API_PREFIX + "/stop", timeout=STOP_TIMEOUT_S)

    async def _json(
        self,
        verb: str,
        method: str,
        path: str,
        body: BaseModel | None,
        model: type[M],
        deadline_s: float | None,
    ) -> M:
        resp = await self._request(verb, method, path, body, deadline_s)
        try:
            return model.model_validate_json(resp.content, strict=False)
        except ValidationError as exc:
            raise CommsLost(f"{verb}: malformed answer from the instrument API: {exc}") from exc

    async def _tiff(
        self, verb: str, path: str, body: BaseModel, deadline_s: float | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        resp = await self._request(verb, "POST", path, body, deadline_s)
        try:
            with profiling.span("decode"):
                return decode_channels(resp.content)
        except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            raise CommsLost(f"{verb}: malformed TIFF from the instrument API: {exc!r}") from exc

    # --- DualBeam -----------------------------------------------------------------------------------

    async def identity(self, *, deadline_s: float | None = None) -> InstrumentIdentity:
        return await self._json("identity", "GET", "/identity", None, InstrumentIdentity, deadline_s)

    async def state(self, *, deadline_s: float | None = None) -> InstrumentState:
        return await self._json("state", "GET", "/state", None, InstrumentState, deadline_s)

    async def move_stage(self, move: StageMove, *, deadline_s: float | None = None) -> StagePosition:
        return await self._json("move_stage", "POST", "/stage/move", move, StagePosition, deadline_s)

    async def set_ion_beam(
        self, settings: IonBeamSettings, *, deadline_s: float | None = None
    ) -> IonBeamState:
        return await self._json("set_ion_beam", "POST", "/ion-beam", settings, IonBeamState, deadline_s)

    async def set_beam_shift(self, shift: BeamShift, *, deadline_s: float | None = None) -> BeamShift:
        return await self._json("set_beam_shift", "POST", "/beam-shift", shift, BeamShift, deadline_s)

    async def deposit_pt(self, request: DepositRequest, *, deadline_s: float | None = None) -> DepositResult:
        return await self._json("deposit_pt", "POST", "/deposit", request, DepositResult, deadline_s)

    async def mill(self, request: MillRequest, *, deadline_s: float | None = None) -> MillResult:
        return await self._json("mill", "POST", "/mill", request, MillResult, deadline_s)

    async def polish(self, request: PolishRequest, *, deadline_s: float | None = None) -> MillResult:
        return await self._json("polish", "POST", "/polish", request, MillResult, deadline_s)

    async def mill_fiducial(
        self, request: FiducialRequest, *, deadline_s: float | None = None
    ) -> FiducialResult:
        return await self._json(
            "mill_fiducial", "POST", "/mill-fiducial", request, FiducialResult, deadline_s
        )

    async def acquire(self, request: AcquireRequest, *, deadline_s: float | None = None) -> Acquisition:
        channels, meta = await self._tiff("acquire", "/acquire", request, deadline_s)
        try:
            metadata = AcquisitionMetadata.model_validate(meta, strict=False)
        except ValidationError as exc:
            raise CommsLost(f"acquire: malformed image metadata: {exc}") from exc
        return Acquisition(channels, metadata)

    async def auto_function(
        self, request: AutoFunctionRequest, *, deadline_s: float | None = None
    ) -> AutoFunctionResult:
        return await self._json(
            "auto_function", "POST", "/auto-function", request, AutoFunctionResult, deadline_s
        )

    async def edx_map(self, request: EdxRequest, *, deadline_s: float | None = None) -> EdxResult:
        channels, meta = await self._tiff("edx_map", "/edx", request, deadline_s)
        try:
            step_m, duration_s = float(meta["step_m"]), float(meta["duration_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CommsLost(f"edx_map: malformed map metadata: {exc!r}") from exc
        return EdxResult(channels, step_m, duration_s)

    async def stop(self, *, deadline_s: float | None = None) -> StopResult:
        return await self._json("stop", "POST", "/stop", None, StopResult, deadline_s)

    async def safe_state(self, *, deadline_s: float | None = None) -> SafeStateResult:
        return await self._json("safe_state", "POST", "/safe-state", None, SafeStateResult, deadline_s)
