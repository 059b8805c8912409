"""`kintsugi web`: the live page. A FastAPI app over the hub: the page and its script, a server-sent
event stream, overlay images, and operator commands after a login.

Read-only by default: the page's own MQTT user is the `monitor`. An operator logs in with their MQTT
user and password (checked by connecting to the broker with them); each command is then published with
those credentials, so the broker's ACL stays the one authority on who may command, and the browser must
confirm each one (the request carries `confirm: true`). Sessions live in memory: restarting the page
logs everyone out, which is the safe direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Final

import aiomqtt
from fastapi import APIRouter, Cookie, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from kintsugi_daemon.cli.remote import Operator
from kintsugi_daemon.config import DaemonSettings, MqttSettings
from kintsugi_daemon.service.messages import COMMAND_MODELS
from kintsugi_daemon.web.hub import Hub, MqttAccess

__all__ = ["WEB_VERBS", "build_app", "hub_from_settings"]

# `start` needs a recipe and stays with `kintsugi start`; everything that steers a run is here.
WEB_VERBS: Final = ("pause", "resume", "stop", "abort", "halt", "clear")
COOKIE: Final = "kintsugi_session"
REPLY_TIMEOUT_S: Final = 10.0
HEARTBEAT_S: Final = 15.0


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(max_length=1024)


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    confirm: bool = Field(description="the operator confirmed this command in the page")
    now: bool | None = None  # pause
    alert_id: str | None = Field(default=None, max_length=64)  # clear


@dataclass
class Session:
    username: str
    password: str
    expires: float


@dataclass
class WebState:
    """What the routes share: the hub and the operators' sessions (in memory)."""

    hub: Hub
    ttl_s: float
    sessions: dict[str, Session] = field(default_factory=dict)

    def session(self, token: str | None) -> Session | None:
        s = self.sessions.get(token or "")
        if s is None or s.expires < time.time():
            self.sessions.pop(token or "", None)
            return None
        return s


def hub_from_settings(settings: DaemonSettings) -> Hub:
    m, w = settings.mqtt, settings.web
    access = MqttAccess(m.host, m.port, w.username, w.resolved_password(), m.tls, m.ca_file)
    return Hub(access, w.runs_dir or settings.data_root, list(w.instruments))


def _static(name: str) -> str:
    return resources.files("kintsugi_daemon.web").joinpath("static", name).read_text(encoding="utf-8")


def build_app(settings: DaemonSettings, hub: Hub | None = None) -> FastAPI:
    state = WebState(hub or hub_from_settings(settings), settings.web.session_ttl_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(state.hub.run(), name="web-mqtt")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="kintsugi web", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.web = state
    app.include_router(pages)
    app.include_router(operators)
    return app


def _web(request: Request) -> WebState:
    web: WebState = request.app.state.web
    return web


# -- what anyone may see ---------------------------------------------------------------------------

pages = APIRouter()


@pages.get("/", response_class=HTMLResponse)
async def page() -> str:
    return _static("index.html")


@pages.get("/static/{name}")
async def static(name: str) -> Response:
    types = {"app.js": "text/javascript", "plot.js": "text/javascript", "style.css": "text/css"}
    if name not in types:
        raise HTTPException(404, f"no static file {name!r}")
    return Response(_static(name), media_type=types[name], headers={"Cache-Control": "no-cache"})


@pages.get("/api/state")
async def snapshot(request: Request) -> dict[str, Any]:
    return _web(request).hub.snapshot()


@pages.get("/api/stream")
async def stream(request: Request) -> StreamingResponse:
    """Server-sent events: the snapshot, then every update; a comment every HEARTBEAT_S when idle."""
    hub = _web(request).hub

    async def events() -> AsyncIterator[str]:
        updates = hub.updates()
        try:
            while not await request.is_disconnected():
                try:
                    update = await asyncio.wait_for(anext(updates), HEARTBEAT_S)
                except TimeoutError:
                    yield ": heartbeat\n\n"  # keeps proxies from closing an idle stream
                    continue
                yield f"data: {json.dumps(update, separators=(',', ':'), allow_nan=False)}\n\n"
        finally:
            await updates.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@pages.get("/api/instruments/{instrument}/slices/{index}/overlay.png")
async def overlay(request: Request, instrument: str, index: int) -> Response:
    hub = _web(request).hub
    view = hub.views.get(instrument)
    if view is None:
        raise HTTPException(404, f"no instrument {instrument!r} on the broker")
    path = hub.overlay_file(view, index)
    if path is not None:
        return FileResponse(path, media_type="image/png")
    png = view.previews.get((view.run_id or "", index))
    if png is None:
        raise HTTPException(404, f"no overlay of slice {index} of run {view.run_id}")
    return Response(png, media_type="image/png")


# -- operators -------------------------------------------------------------------------------------

operators = APIRouter()
SessionCookie = Annotated[str | None, Cookie(alias=COOKIE)]


@operators.get("/api/session")
async def who(request: Request, token: SessionCookie = None) -> dict[str, Any]:
    s = _web(request).session(token)
    return {"operator": s.username if s else None, "verbs": list(WEB_VERBS)}


@operators.post("/api/login")
async def login(request: Request, body: Login, response: Response) -> dict[str, Any]:
    web = _web(request)
    a = web.hub.access
    access = MqttAccess(a.host, a.port, body.username, body.password, a.tls, a.ca_file)
    try:
        async with access.client(f"kintsugi-web-login-{uuid.uuid4().hex[:8]}", timeout_s=5):
            pass
    except aiomqtt.MqttError as exc:
        raise HTTPException(401, f"the broker refused {body.username!r}: {exc}") from None
    token = secrets.token_urlsafe(32)
    web.sessions[token] = Session(body.username, body.password, time.time() + web.ttl_s)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=int(web.ttl_s))
    return {"operator": body.username}


@operators.post("/api/logout")
async def logout(request: Request, response: Response, token: SessionCookie = None) -> dict[str, Any]:
    _web(request).sessions.pop(token or "", None)
    response.delete_cookie(COOKIE)
    return {"operator": None}


@operators.post("/api/instruments/{instrument}/cmd/{verb}")
async def command(
    request: Request, instrument: str, verb: str, body: CommandRequest, token: SessionCookie = None
) -> dict[str, Any]:
    web = _web(request)
    s = web.session(token)
    if s is None:
        raise HTTPException(401, "log in with operator credentials to send commands")
    if verb not in WEB_VERBS or verb not in COMMAND_MODELS:
        raise HTTPException(404, f"unknown verb {verb!r}; the page sends {', '.join(WEB_VERBS)}")
    if not body.confirm:
        raise HTTPException(400, "commands must be confirmed (confirm: true)")
    if instrument not in web.hub.views:
        raise HTTPException(404, f"no instrument {instrument!r} on the broker")
    fields: dict[str, Any] = {}
    if verb == "pause" and body.now:
        fields["now"] = True
    if verb == "clear" and body.alert_id:
        fields["alert_id"] = body.alert_id
    a = web.hub.access
    mqtt = MqttSettings(
        host=a.host, port=a.port, username=s.username, password=s.password, tls=a.tls, ca_file=a.ca_file
    )
    try:
        return await Operator(mqtt, instrument).command(verb, fields, timeout_s=REPLY_TIMEOUT_S)
    except TimeoutError:
        raise HTTPException(
            504,
            f"no reply to {verb} within {REPLY_TIMEOUT_S:g} s: is the daemon online, and may "
            f"{s.username!r} publish commands (the broker's ACL drops what a user may not send)?",
        ) from None
    except aiomqtt.MqttError as exc:
        raise HTTPException(502, f"broker: {exc}") from None
