"""The instrument API: any `DualBeam` served over HTTP/JSON.

One server for the simulator and the AutoScript bridge. Long operations block until they finish or are
stopped; `POST /v1/stop` aborts the running one. Requests carry their deadline in `X-Deadline-S`; past
it the server stops the operation itself, so a hung instrument never leaves a mill running unattended.
Images travel as multi-page TIFF (see tiff_wire). OpenAPI is generated from the same pydantic models.

Every error, including unknown paths and bugs, answers an `ErrorBody`, so a client always gets a typed
error. The bearer token is checked before a request body is read, and bodies are counted as they arrive
(chunked ones included): nothing unauthenticated or oversized is ever parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType
from typing import Annotated, Any, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kintsugi_daemon.drivers.base import (
    API_PREFIX,
    DEFAULT_DEADLINES_S,
    MAX_DEADLINE_S,
    MIN_DEADLINE_S,
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
    FiducialRequest,
    FiducialResult,
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

__all__ = [
    "API_PREFIX",
    "ERROR_RESPONSES",
    "MAX_BODY_BYTES",
    "MAX_DEADLINE_S",
    "build_app",
    "check_bind",
    "listen_socket",
    "serve",
]

MAX_BODY_BYTES = 64 * 1024  # every request is a small JSON document
STOP_TIMEOUT_S = 10.0  # how long the deadline path waits for the instrument to acknowledge a stop
# Served without a token even when one is set: liveness and the API description, nothing instrument.
PUBLIC_PATHS = frozenset(
    {"/healthz", f"{API_PREFIX}/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)

_STATUS = {
    "invalid_request": 422,
    "aborted": 409,
    "busy": 409,
    "unauthorized": 401,
    "instrument_fault": 503,
    "comms_lost": 502,
    "deadline_exceeded": 504,
    "unsupported": 501,
}

T = TypeVar("T")


async def _deadline(
    x_deadline_s: Annotated[
        float | None,
        Header(
            ge=MIN_DEADLINE_S,
            le=MAX_DEADLINE_S,
            description="seconds the call may take; past it the server stops the instrument and answers 504",
        ),
    ] = None,
) -> float | None:
    return x_deadline_s


# Every error an instrument verb really answers, each with the project's error body: documented so that
# clients (and Schemathesis in CI) can hold the server to it.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "unauthorized: missing or wrong bearer token"},
    409: {
        "model": ErrorBody,
        "description": "aborted (by POST /v1/stop) or busy (another verb runs)",
    },
    413: {"model": ErrorBody, "description": f"invalid_request: body larger than {MAX_BODY_BYTES} bytes"},
    422: {"model": ErrorBody, "description": "invalid_request: detail.field names the offending field"},
    501: {
        "model": ErrorBody,
        "description": "unsupported: no such verb on this instrument (EDX on a bridge)",
    },
    502: {"model": ErrorBody, "description": "comms_lost: the server lost its link to the instrument"},
    503: {"model": ErrorBody, "description": "instrument_fault: the instrument refused or failed"},
    504: {
        "model": ErrorBody,
        "description": "deadline_exceeded: past X-Deadline-S; instrument stopped",
    },
}
BEARER = HTTPBearer(
    auto_error=False,  # the guard answers 401 with the project's error body before this runs
    description="the instrument token; required whenever the server listens beyond loopback",
)


DeadlineDep = Annotated[float | None, Depends(_deadline)]


def _error(status: int, kind: str, message: str, detail: dict[str, Any] | None = None) -> JSONResponse:
    body = ErrorBody(kind=kind, message=message, detail=detail or {})
    return JSONResponse(status_code=status, content=body.model_dump())


def _error_message(kind: str, message: str, detail: dict[str, Any] | None = None) -> bytes:
    return ErrorBody(kind=kind, message=message, detail=detail or {}).model_dump_json().encode()


def _field_path(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header")]
    return ".".join(parts) or "body"


def _field_of(error: Any) -> str:
    if error.get("type") == "json_invalid":
        return "body"  # the position in the document is not a field
    return _field_path(error["loc"])


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _resolves_to_loopback(host: str) -> bool:
    if _is_loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(_is_loopback(a) for a in addresses)


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose an instrument beyond loopback without a token (names are resolved, not trusted)."""
    if token:
        return
    if _resolves_to_loopback(host):
        return
    raise ValueError(
        f"refusing to bind {host!r} without a token: only loopback may be served unauthenticated"
    )


def _authorized(token: str | None, authorization: str | None) -> bool:
    if token is None:
        return True
    expected = f"Bearer {token}"
    return authorization is not None and secrets.compare_digest(authorization.encode(), expected.encode())


class _BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"request body larger than {MAX_BODY_BYTES} bytes")


class _Guard:
    """Pure ASGI: check the token before anything reads the body, and count body bytes as they arrive."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] not in PUBLIC_PATHS and not _authorized(self.token, headers.get("authorization")):
            await _send_error(send, 401, "unauthorized", "missing or wrong bearer token")
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _send_error(send, 413, "invalid_request", str(_BodyTooLarge().detail), {"field": "body"})
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge as exc:
            if started:
                raise
            await _send_error(send, 413, "invalid_request", str(exc.detail), {"field": "body"})


async def _send_error(
    send: Send, status: int, kind: str, message: str, detail: dict[str, Any] | None = None
) -> None:
    body = _error_message(kind, message, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def build_app(  # noqa: C901 - the route table: mccabe adds up its small nested handlers
    instrument: DualBeam,
    *,
    token: str | None,
    title: str = "kintsugi instrument API",
    extra_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    app = FastAPI(title=title, version="1", openapi_url=f"{API_PREFIX}/openapi.json")
    app.state.token_required = token is not None  # serve() refuses a non-loopback socket without one
    app.state.instrument = instrument  # serve() stops it when shutdown begins

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        # The guard already checked the header; this declares the scheme in OpenAPI and covers extra routers.
        if token is not None and (
            credentials is None
            or not secrets.compare_digest(credentials.credentials.encode(), token.encode())
        ):
            raise _Unauthorized()

    async def run(verb: str, call: Callable[[float], Awaitable[T]], deadline_s: float | None) -> T:
        limit = deadline_s if deadline_s is not None else DEFAULT_DEADLINES_S[verb]
        try:
            async with asyncio.timeout(limit):
                return await call(limit)
        except TimeoutError:
            # Past its deadline: stop the instrument so nothing keeps patterning behind our back. A stop
            # that fails or hangs too must not hide the deadline from the caller.
            with contextlib.suppress(InstrumentError, TimeoutError):
                await asyncio.wait_for(instrument.stop(), STOP_TIMEOUT_S)
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
        fields = [_field_of(e) for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, errors, strict=True))
        detail = {"field": fields[0] if fields else "body", "fields": fields}
        return _error(422, "invalid_request", message, detail)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, __: _Unauthorized) -> JSONResponse:
        return _error(401, "unauthorized", "missing or wrong bearer token")

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (bytes that are not JSON text)
            return _error(
                422, "invalid_request", "body: not a JSON document", {"field": "body", "fields": ["body"]}
            )
        if exc.status_code == 413:
            return _error(413, "invalid_request", str(exc.detail), {"field": "body"})
        if exc.status_code == 404:
            return _error(404, "invalid_request", "no such endpoint", {"field": "path"})
        if exc.status_code == 405:
            response = _error(
                405, "invalid_request", "method not allowed on this endpoint", {"field": "method"}
            )
            response.headers.update(exc.headers or {})  # Allow: the methods this endpoint takes (RFC 9110)
            return response
        kind = "instrument_fault" if exc.status_code >= 500 else "invalid_request"
        return _error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        # A bug in the server or the instrument driver: still a typed answer, never a bare 500 page.
        return _error(
            500, "instrument_fault", f"internal error in the instrument API: {type(exc).__name__}: {exc}"
        )

    app.add_middleware(_Guard, token=token)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        return {"ok": True}  # liveness only: says nothing about the instrument without a token

    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)

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

    @api.post("/mill-fiducial")
    async def mill_fiducial(body: FiducialRequest, d: DeadlineDep) -> FiducialResult:
        return await run("mill_fiducial", lambda s: instrument.mill_fiducial(body, deadline_s=s), d)

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
        app.include_router(router, dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)
    return app


class _Unauthorized(Exception):
    pass


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind and listen before announcing readiness: connections queue in the backlog from here on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: without it a keep-alive answer's body waits for the client's
        # delayed ACK (~40 ms a call on Linux), which was most of the instrument's idle time between verbs.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn, but shutdown first stops the instrument, so nothing patterns through the graceful wait."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], Awaitable[object]] | None) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await super().serve(sockets=sockets)
        finally:
            if self._shutdown_task is not None:
                with contextlib.suppress(Exception):
                    await self._shutdown_task

    def request_exit(self) -> None:
        """Begin shutdown from the event loop's thread: stop the instrument, then let uvicorn drain."""
        if self._shutdown_task is None and self._on_shutdown is not None and self._loop is not None:
            self._shutdown_task = self._loop.create_task(self._stop_instrument())
        self.should_exit = True

    async def _stop_instrument(self) -> None:
        assert self._on_shutdown is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._on_shutdown(), STOP_TIMEOUT_S)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: runs in the loop's thread between bytecodes, so schedule rather than await.
        if self._shutdown_task is None and self._on_shutdown is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._begin_stop)
        super().handle_exit(sig, frame)

    def _begin_stop(self) -> None:
        if self._shutdown_task is None and self._on_shutdown is not None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self._stop_instrument())


def _watch_stdin(server: _Server, loop: asyncio.AbstractEventLoop) -> None:
    """Shut down when stdin reaches EOF: the parent that started us (and holds the pipe) has gone."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    with contextlib.suppress(RuntimeError):  # the loop already closed: nothing left to stop
        loop.call_soon_threadsafe(server.request_exit)


async def serve(
    app: FastAPI,
    sock: socket.socket,
    *,
    log_level: str = "warning",
    on_shutdown: Callable[[], Awaitable[object]] | None = None,
    exit_on_stdin_eof: bool = False,
) -> None:
    """Serve `app` on a listening socket until SIGTERM/SIGINT (or stdin EOF with `exit_on_stdin_eof`).

    Shutdown first calls `on_shutdown` (default: stop the app's instrument), then drains requests.
    A socket bound beyond loopback is refused unless the app requires a token.
    """
    address = str(sock.getsockname()[0])
    if not getattr(app.state, "token_required", False) and not _is_loopback(address):
        raise ValueError(
            f"refusing to serve on {address!r} without a token: only loopback may be served unauthenticated"
        )
    if on_shutdown is None:
        instrument = getattr(app.state, "instrument", None)
        if instrument is not None:
            on_shutdown = instrument.stop
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    server = _Server(config, on_shutdown)
    if exit_on_stdin_eof:
        loop = asyncio.get_running_loop()
        threading.Thread(target=_watch_stdin, args=(server, loop), name="stdin-eof", daemon=True).start()
    await server.serve(sockets=[sock])
