"""The instrument API: any `DualBeam` served over HTTP/JSON.

One server for the simulator and the AutoScript bridge. Long operations block until they finish or are
stopped; `POST /v1/stop` aborts the running one. Requests carry their deadline in `X-Deadline-S`; past
it the server stops the operation itself, so a hung instrument never leaves a mill running unattended.
Images travel as multi-page TIFF (see tiff_wire). OpenAPI is generated from the same pydantic models.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from kintsugi_daemon.drivers.base import (
    DEFAULT_DEADLINES_S,
    AcquireRequest,
    AutoFunctionRequest,
    AutoFunctionResult,
    BeamShift,
    DeadlineExceeded,
    DepositRequest,
    DepositResult,
    DualBeam,
    EdxRequest,
    ErrorBody,
    InstrumentError,
    InstrumentIdentity,
    InstrumentState,
    IonBeamSettings,
    IonBeamState,
    MillRequest,
    MillResult,
    PolishRequest,
    SafeStateResult,
    StageMove,
    StagePosition,
    StopResult,
)
from kintsugi_daemon.drivers.tiff_wire import TIFF_MEDIA_TYPE, encode_channels

__all__ = ["API_PREFIX", "MAX_BODY_BYTES", "build_app", "check_bind", "listen_socket", "serve"]

API_PREFIX = "/v1"
MAX_BODY_BYTES = 64 * 1024  # every request is a small JSON document
MAX_DEADLINE_S = 24 * 3600.0

_STATUS = {
    "invalid_request": 422,
    "aborted": 409,
    "instrument_fault": 503,
    "comms_lost": 502,
    "deadline_exceeded": 504,
}

T = TypeVar("T")


async def _deadline(
    x_deadline_s: Annotated[float | None, Header(gt=0, le=MAX_DEADLINE_S)] = None,
) -> float | None:
    return x_deadline_s


DeadlineDep = Annotated[float | None, Depends(_deadline)]


def _error(status: int, kind: str, message: str, detail: dict[str, Any] | None = None) -> JSONResponse:
    body = ErrorBody(kind=kind, message=message, detail=detail or {})
    return JSONResponse(status_code=status, content=body.model_dump())


def _field_path(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header")]
    return ".".join(parts) or "body"


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose an instrument beyond loopback without a token."""
    if token:
        return
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(
        f"refusing to bind {host!r} without a token: only loopback may be served unauthenticated"
    )


def build_app(
    instrument: DualBeam,
    *,
    token: str | None,
    title: str = "kintsugi instrument API",
    extra_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    app = FastAPI(title=title, version="1", openapi_url=f"{API_PREFIX}/openapi.json")

    async def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        expected = f"Bearer {token}"
        if authorization is None or not secrets.compare_digest(authorization.encode(), expected.encode()):
            raise _Unauthorized()

    async def run(verb: str, call: Callable[[float], Awaitable[T]], deadline_s: float | None) -> T:
        limit = deadline_s if deadline_s is not None else DEFAULT_DEADLINES_S[verb]
        try:
            async with asyncio.timeout(limit):
                return await call(limit)
        except TimeoutError:
            # Past its deadline: stop the instrument so nothing keeps patterning behind our back.
            await instrument.stop()
            raise DeadlineExceeded(
                f"{verb} did not finish within {limit:g} s; the instrument was stopped",
                detail={"verb": verb, "deadline_s": limit},
            ) from None

    @app.exception_handler(InstrumentError)
    async def _instrument_error(_: Request, exc: InstrumentError) -> JSONResponse:
        return _error(_STATUS.get(exc.kind, 500), exc.kind, exc.message, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields = [_field_path(e["loc"]) for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, errors, strict=True))
        detail = {"field": fields[0] if fields else "body", "fields": fields}
        return _error(422, "invalid_request", message, detail)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, __: _Unauthorized) -> JSONResponse:
        return _error(401, "unauthorized", "missing or wrong bearer token")

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(
                413, "invalid_request", f"request body larger than {MAX_BODY_BYTES} bytes", {"field": "body"}
            )
        return await call_next(request)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        return {"ok": True}  # liveness only: says nothing about the instrument without a token

    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_token)])

    @api.get("/identity")
    async def identity(d: DeadlineDep) -> InstrumentIdentity:
        return await run("identity", lambda s: instrument.identity(deadline_s=s), d)

    @api.get("/state")
    async def state(d: DeadlineDep) -> InstrumentState:
        return await run("state", lambda s: instrument.state(deadline_s=s), d)

    @api.post("/stage/move")
    async def move_stage(body: StageMove, d: DeadlineDep) -> StagePosition:
        return await run("move_stage", lambda s: instrument.move_stage(body, deadline_s=s), d)

    @api.post("/ion-beam")
    async def set_ion_beam(body: IonBeamSettings, d: DeadlineDep) -> IonBeamState:
        return await run("set_ion_beam", lambda s: instrument.set_ion_beam(body, deadline_s=s), d)

    @api.post("/beam-shift")
    async def set_beam_shift(body: BeamShift, d: DeadlineDep) -> BeamShift:
        return await run("set_beam_shift", lambda s: instrument.set_beam_shift(body, deadline_s=s), d)

    @api.post("/deposit")
    async def deposit_pt(body: DepositRequest, d: DeadlineDep) -> DepositResult:
        return await run("deposit_pt", lambda s: instrument.deposit_pt(body, deadline_s=s), d)

    @api.post("/mill")
    async def mill(body: MillRequest, d: DeadlineDep) -> MillResult:
        return await run("mill", lambda s: instrument.mill(body, deadline_s=s), d)

    @api.post("/polish")
    async def polish(body: PolishRequest, d: DeadlineDep) -> MillResult:
        return await run("polish", lambda s: instrument.polish(body, deadline_s=s), d)

    @api.post(
        "/acquire",
        response_class=Response,
        responses={
            200: {
                "content": {TIFF_MEDIA_TYPE: {}},
                "description": "one TIFF page per detector; metadata JSON on page 0",
            }
        },
    )
    async def acquire(body: AcquireRequest, d: DeadlineDep) -> Response:
        acq = await run("acquire", lambda s: instrument.acquire(body, deadline_s=s), d)
        data = await asyncio.to_thread(encode_channels, acq.images, acq.metadata.model_dump(mode="json"))
        return Response(content=data, media_type=TIFF_MEDIA_TYPE)

    @api.post("/auto-function")
    async def auto_function(body: AutoFunctionRequest, d: DeadlineDep) -> AutoFunctionResult:
        return await run("auto_function", lambda s: instrument.auto_function(body, deadline_s=s), d)

    @api.post(
        "/edx",
        response_class=Response,
        responses={
            200: {
                "content": {TIFF_MEDIA_TYPE: {}},
                "description": "one float32 TIFF page of counts per element",
            }
        },
    )
    async def edx_map(body: EdxRequest, d: DeadlineDep) -> Response:
        res = await run("edx_map", lambda s: instrument.edx_map(body, deadline_s=s), d)
        meta = {"step_m": res.step_m, "duration_s": res.duration_s}
        data = await asyncio.to_thread(encode_channels, res.maps, meta)
        return Response(content=data, media_type=TIFF_MEDIA_TYPE)

    @api.post("/stop")
    async def stop() -> StopResult:
        return await instrument.stop()

    @api.post("/safe-state")
    async def safe_state(d: DeadlineDep) -> SafeStateResult:
        return await run("safe_state", lambda s: instrument.safe_state(deadline_s=s), d)

    app.include_router(api)
    for router in extra_routers:
        app.include_router(router, dependencies=[Depends(require_token)])
    return app


class _Unauthorized(Exception):
    pass


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind and listen before announcing readiness: connections queue in the backlog from here on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


async def serve(app: FastAPI, sock: socket.socket, *, log_level: str = "warning") -> None:
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    await uvicorn.Server(config).serve(sockets=[sock])
