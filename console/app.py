"""The console's routes. Every page but /login (and /health, which says only "ok") needs a session;
every change is a POST with the session's CSRF token, answered by a redirect to a page that shows
its result (so a reload never repeats it).

    GET  /viewers?q=&sort=&order=&page=   the list            GET  /viewer?id=          one viewer
    POST /viewer/fact/add|edit|delete      a fact (the gate)   GET  /viewer/forget?id=   confirm forgetting
    POST /viewer/forget                    forget the viewer   GET  /viewer/export?id=   their Agent File
    GET  /persona   POST /persona/block   POST /persona/stream  the shared blocks
    GET  /live      POST /live/send-again                       the bridge and its dead letters
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from letta_client import APIConnectionError, APIStatusError
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from console import directory, live
from console.auth import COOKIE, SESSION_TTL_S, Session, Sessions, csrf_ok, same_origin
from console.errors import ConsoleError
from console.memory import ConsoleMemory
from provisioning.stream import STREAM_FIELDS
from vtuber_letta.viewer_ids import InvalidViewerId, check_viewer_id

log = logging.getLogger("vtuber_letta.console")

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 64 * 1024
LOGIN_FAILURE_DELAY_S = 1.0
# No script may run at all (the console has none), styles only from our own file, and no page of
# ours inside another site's frame: what a viewer wrote cannot execute even if escaping failed.
# Expected failures of the services behind the console: a 503 that says which, never a traceback.
UNAVAILABLE = (APIConnectionError, APIStatusError, RedisError, OSError)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make browsers send `Origin: null` on our own forms
    "Cache-Control": "no-store",
}


@dataclass
class Console:
    """What the routes work with (built by console.server, or by the unit tests with fakes)."""

    settings: Any
    redis: Any  # synchronous, decode_responses=True
    redis_async: Any  # asyncio client
    memory: ConsoleMemory
    sessions: Sessions


class _Refused(Exception):
    def __init__(self, response: Response):
        self.response = response


def _when(epoch: float | None) -> str:
    if not epoch:
        return "—"
    return datetime.fromtimestamp(float(epoch), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _when_s(epoch: float | None) -> str:
    """To the second: a live stream's tasks come seconds apart."""
    if not epoch:
        return "—"
    return datetime.fromtimestamp(float(epoch), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = _when
    env.filters["when_s"] = _when_s
    env.globals["query"] = lambda **params: urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return env


def build_app(console: Console) -> Starlette:
    env = _environment()
    sessions = console.sessions
    login_turn = asyncio.Lock()  # one password check at a time: a guess costs a second, in parallel too

    def page(request: Request, name: str, session: Session | None, status: int = 200, **context) -> HTMLResponse:
        flash = sessions.take_flash(session) if session else None
        html = env.get_template(name).render(csrf=session.csrf if session else "", flash=flash,
                                             path=request.url.path, **context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def back(to: str, session: Session, kind: str, text: str) -> RedirectResponse:
        sessions.flash(session, kind, text)
        return RedirectResponse(to, status_code=303, headers=SECURITY_HEADERS)

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    async def form_of(request: Request) -> dict[str, str]:
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
            raise _Refused(plain_refusal(413, "the form is too large"))
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise _Refused(plain_refusal(413, "the form is too large"))
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))

    Handler = Callable[..., Awaitable[Response]]

    def viewing(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = session_of(request)
            if session is None:
                return RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
            try:
                return await handler(request, session)
            except _Refused as refused:
                return refused.response
            except UNAVAILABLE as exc:
                return unavailable(exc)
        return endpoint

    def changing(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = session_of(request)
            if not same_origin(request.headers, request.headers.get("host")):
                return plain_refusal(403, "cross-site request refused")
            if session is None:
                return plain_refusal(403, "log in first")
            try:
                form = await form_of(request)
                if not csrf_ok(session, form.get("csrf")):
                    return plain_refusal(403, "this form is out of date (CSRF check failed): reload the page and try again")
                return await handler(request, session, form)
            except _Refused as refused:
                return refused.response
            except UNAVAILABLE as exc:
                return unavailable(exc)
        return endpoint

    def viewer_id_of(value: str | None) -> str:
        try:
            return check_viewer_id(value or "")
        except InvalidViewerId as exc:
            raise _Refused(plain_refusal(400, f"not a viewer id: {exc}")) from None

    # ---------------- login ----------------
    async def login_page(request: Request) -> Response:
        if session_of(request):
            return RedirectResponse("/viewers", status_code=303, headers=SECURITY_HEADERS)
        return page(request, "login.html", None, error=None)

    async def login(request: Request) -> Response:
        if not same_origin(request.headers, request.headers.get("host")):
            return plain_refusal(403, "cross-site request refused")
        try:
            form = await form_of(request)
        except _Refused as refused:
            return refused.response
        async with login_turn:
            if not sessions.password_matches(form.get("password", "")):
                await asyncio.sleep(LOGIN_FAILURE_DELAY_S)
                log.warning("console: failed login from %s", request.client.host if request.client else "?")
                return page(request, "login.html", None, status=401, error="wrong password")
        session = sessions.open()
        response = RedirectResponse("/viewers", status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(COOKIE, session.token, max_age=SESSION_TTL_S, httponly=True, samesite="strict", path="/")
        return response

    async def logout(request: Request, session: Session, form: dict) -> Response:
        sessions.close(session.token)
        response = RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def home(request: Request, session: Session) -> Response:
        return RedirectResponse("/viewers", status_code=303, headers=SECURITY_HEADERS)

    # ---------------- viewers ----------------
    async def viewers(request: Request, session: Session) -> Response:
        q = request.query_params
        try:
            number = int(q.get("page", "1"))
        except ValueError:
            number = 1
        listing = await run_in_threadpool(
            directory.viewer_page, console.redis, query=q.get("q", "")[:200], sort=q.get("sort", "last_seen"),
            descending=q.get("order", "desc") != "asc", page=number)
        try:
            cards = await run_in_threadpool(console.memory.cards, [row.viewer_id for row in listing.rows])
            cards_error = None
        except Exception as exc:  # the list still answers from Redis when Letta does not
            log.warning("console: viewer cards unavailable: %s", type(exc).__name__)
            cards, cards_error = {}, "Letta did not answer: names and fact counts are missing from this page."
        return page(request, "viewers.html", session, listing=listing, cards=cards, cards_error=cards_error,
                    sorts=directory.SORTS)

    async def viewer(request: Request, session: Session) -> Response:
        viewer_id = viewer_id_of(request.query_params.get("id"))
        memory = await run_in_threadpool(console.memory.viewer, viewer_id)
        if memory is None:
            return page(request, "missing.html", session, status=404, viewer_id=viewer_id)
        row = await run_in_threadpool(directory.viewer_row, console.redis, viewer_id)
        return page(request, "viewer.html", session, memory=memory, row=row)

    def viewer_url(viewer_id: str) -> str:
        return "/viewer?" + urlencode({"id": viewer_id})

    async def fact_change(request: Request, session: Session, form: dict) -> Response:
        viewer_id = viewer_id_of(form.get("id"))
        action = request.path_params["action"]
        if action not in ("add", "edit", "delete"):
            return plain_refusal(404, "no such change")
        memory = await run_in_threadpool(console.memory.viewer, viewer_id)
        if memory is None:
            return back("/viewers", session, "error", "that viewer has no agent (forgotten?)")
        gate = console.memory.gate
        try:
            if action == "add":
                text = await run_in_threadpool(gate, "remember", memory.agent_id,
                                               {"fact": form.get("fact", ""), "category": form.get("category", "")})
            elif action == "delete":
                text = await run_in_threadpool(gate, "forget", memory.agent_id, {"fact": form.get("fact", "")})
            else:  # one read-modify-write in the gate: the fact keeps its place, or stays as it was
                text = await run_in_threadpool(gate, "edit", memory.agent_id,
                                               {"old": form.get("old", ""), "fact": form.get("fact", ""),
                                                "category": form.get("category", "")})
        except ConsoleError as exc:
            return back(viewer_url(viewer_id), session, "error", f"not saved: {exc}")
        log.info("console: fact %s for viewer agent %s", action, memory.agent_id)
        return back(viewer_url(viewer_id), session, "ok", text)

    async def forget_page(request: Request, session: Session) -> Response:
        viewer_id = viewer_id_of(request.query_params.get("id"))
        return page(request, "forget.html", session, viewer_id=viewer_id)

    async def forget(request: Request, session: Session, form: dict) -> Response:
        viewer_id = viewer_id_of(form.get("id"))
        if form.get("confirm", "") != viewer_id:
            return back("/viewer/forget?" + urlencode({"id": viewer_id}), session, "error",
                        "nothing was forgotten: type the viewer id exactly to confirm")
        try:
            report = await run_in_threadpool(console.memory.forget_viewer, viewer_id)
        except ConsoleError as exc:
            return back(viewer_url(viewer_id), session, "error", f"not forgotten: {exc}")
        log.info("console: forgot a viewer (%s)", report[:200])
        return back("/viewers", session, "ok", report)

    async def export(request: Request, session: Session) -> Response:
        viewer_id = viewer_id_of(request.query_params.get("id"))
        try:
            text = await run_in_threadpool(console.memory.export, viewer_id)
        except ConsoleError as exc:
            return back(viewer_url(viewer_id), session, "error", str(exc))
        headers = {**SECURITY_HEADERS, "Content-Disposition": 'attachment; filename="viewer.af"'}
        return Response(text, media_type="application/json", headers=headers)

    # ---------------- persona and stream ----------------
    async def persona(request: Request, session: Session) -> Response:
        blocks = await run_in_threadpool(console.memory.shared_blocks)
        return page(request, "persona.html", session, blocks=blocks, stream_fields=STREAM_FIELDS)

    async def persona_block(request: Request, session: Session, form: dict) -> Response:
        label = form.get("label", "")
        value = form.get("value", "").replace("\r\n", "\n")
        try:
            await run_in_threadpool(console.memory.update_shared, label, value)
        except ConsoleError as exc:
            return back("/persona", session, "error", str(exc))
        log.info("console: shared block %r updated", label)
        return back("/persona", session, "ok", f"{label} updated: every viewer's agent reads it from its next turn")

    async def persona_stream(request: Request, session: Session, form: dict) -> Response:
        changes = {name: form[name] for name in STREAM_FIELDS if name in form}
        try:
            await run_in_threadpool(console.memory.update_stream, changes)
        except ConsoleError as exc:
            return back("/persona", session, "error", str(exc))
        return back("/persona", session, "ok", "stream updated: every viewer's agent reads it from its next turn")

    # ---------------- live ----------------
    async def live_page(request: Request, session: Session) -> Response:
        state = await live.live_state(console.redis_async, console.settings)
        return page(request, "live.html", session, state=state)

    async def send_again(request: Request, session: Session, form: dict) -> Response:
        try:
            text = await live.send_again(console.redis_async, console.settings, form.get("entry", ""))
        except ConsoleError as exc:
            return back("/live", session, "error", str(exc))
        log.info("console: %s", text)
        return back("/live", session, "ok", text)

    routes = [
        Route("/health", health),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", changing(logout), methods=["POST"]),
        Route("/", viewing(home)),
        Route("/viewers", viewing(viewers)),
        Route("/viewer", viewing(viewer)),
        Route("/viewer/fact/{action:str}", changing(fact_change), methods=["POST"]),
        Route("/viewer/forget", viewing(forget_page), methods=["GET"]),
        Route("/viewer/forget", changing(forget), methods=["POST"]),
        Route("/viewer/export", viewing(export)),
        Route("/persona", viewing(persona)),
        Route("/persona/block", changing(persona_block), methods=["POST"]),
        Route("/persona/stream", changing(persona_stream), methods=["POST"]),
        Route("/live", viewing(live_page)),
        Route("/live/send-again", changing(send_again), methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes)


def unavailable(exc: BaseException) -> Response:
    """Letta or Redis did not answer: say so (nothing was changed that the page does not show)."""
    log.warning("console: %s unavailable: %s", "Redis" if isinstance(exc, RedisError) else "Letta", type(exc).__name__)
    what = "Redis" if isinstance(exc, RedisError) else "The Letta server"
    return plain_refusal(503, f"{what} did not answer ({type(exc).__name__}); try again in a moment")


def plain_refusal(status: int, text: str) -> Response:
    return Response(text + "\n", status_code=status, media_type="text/plain; charset=utf-8", headers=SECURITY_HEADERS)

