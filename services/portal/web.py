"""The portal's HTTP side (Starlette): pages rendered on the server, live parts pushed as server-sent events
straight from JetStream consumers (logs, state changes, metrics); nothing in a page polls.

Every page and stream needs a session: a signed cookie (HttpOnly, SameSite=Strict) naming the user and holding
the CSRF token that every state-changing request must send back in a header. Pages never hold a credential or a
presigned URL: a file is downloaded through the portal, which redirects to a short-lived URL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import nats
from nats.aio.client import RawCredentials
from nats.js import api as js_api
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.portal import pages
from services.portal.fanout import Batch, Fanout
from shared import bus, schemas, subjects
from shared.errors import CadreError, NotFoundError, ValidationError
from shared.runs import LogCursor
from shared.trust import Creds

if TYPE_CHECKING:
    from services.portal.service import PortalService

COOKIE = "cadre_session"
SESSION_SECONDS = 12 * 3600
STATIC = Path(__file__).with_name("static")
_RESUME_RE = re.compile(r"^(\d{1,6}:\d{1,12})(,\d{1,6}:\d{1,12})*$")
QUEUE_BOUND = 64  # messages held for one slow browser; past it the consumer waits (and JetStream holds the rest)


# --- sessions ----------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key: bytes, payload: dict[str, Any]) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    mac = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    return f"{body}.{mac}"


def verify(key: bytes, token: str | None) -> dict[str, Any] | None:
    """The session in a cookie, or None when it is missing, forged, malformed or expired."""
    if not token or token.count(".") != 1:
        return None
    body, mac = token.split(".")
    expected = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(mac, expected):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int | float) or payload["exp"] < time.time():
        return None
    return payload


def _safe_next(target: str | None) -> str:
    """Only a path on this site (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


# --- the app -----------------------------------------------------------------------------------------------
def make_app(portal: PortalService) -> Starlette:
    key = portal.session_key
    fanout = Fanout(portal.js, subjects.LOGS_STREAM)

    def session_of(request: Request) -> dict[str, Any] | None:
        return verify(key, request.cookies.get(COOKIE))

    def page(
        handler: Callable[[Request, dict[str, Any]], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            session = session_of(request)
            if session is None:
                if request.url.path.endswith((".json", "/stream", "/live")) or request.method != "GET":
                    return JSONResponse({"error": "log in first"}, status_code=401)
                target = urllib.parse.quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
                return RedirectResponse(f"/login?next={target}", status_code=303)
            if request.method != "GET" and not hmac.compare_digest(
                request.headers.get("x-csrf-token", ""), session["csrf"]
            ):
                return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
            try:
                return await handler(request, session)
            except NotFoundError as exc:
                return HTMLResponse(pages.error_page(session, "Not found", str(exc)), status_code=404)
            except ValidationError as exc:
                return HTMLResponse(pages.error_page(session, "Bad request", str(exc)), status_code=400)
            except CadreError as exc:
                return HTMLResponse(pages.error_page(session, "Unavailable", str(exc)), status_code=503)

        return wrapped

    async def ask(subject: str, payload: msgspec.Struct, reply_type: type[Any]) -> Any:
        return await bus.request(portal.nc, subject, payload, reply_type, timeout=10)

    # --- login ----------------------------------------------------------------------------------------------
    async def login_form(request: Request) -> Response:
        return HTMLResponse(pages.login_page(_safe_next(request.query_params.get("next")), error=None))

    async def login(request: Request) -> Response:
        form = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
        user = (form.get("user") or [""])[0]
        password = (form.get("password") or [""])[0]
        creds = (form.get("creds") or [""])[0].strip()
        target = _safe_next((form.get("next") or ["/"])[0])
        url = portal.bus_settings.url
        if creds:  # a bus that trusts an operator: the user is the one its JWT names
            try:
                user = Creds.parse(creds).name
            except ValidationError:
                user = ""
            accepted = bool(user) and await _bus_accepts(url, user_credentials=RawCredentials(creds))
        else:
            accepted = bool(user and password) and await _bus_accepts(url, user=user, password=password)
        if not accepted:
            portal.log.info("portal_login_refused", user=user[:64])
            html = pages.login_page(target, error="The bus refused those credentials.")
            return HTMLResponse(html, status_code=401)
        token = sign(key, {"u": user, "exp": int(time.time()) + SESSION_SECONDS, "csrf": secrets.token_urlsafe(24)})
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, max_age=SESSION_SECONDS, httponly=True, samesite="strict", path="/")
        portal.log.info("portal_login", user=user)
        return response

    async def logout(request: Request, session: dict[str, Any]) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # --- pages ----------------------------------------------------------------------------------------------
    async def home(request: Request, session: dict[str, Any]) -> Response:
        return RedirectResponse("/experiments", status_code=303)

    async def experiments(request: Request, session: dict[str, Any]) -> Response:
        runs = (await ask(subjects.Api.RUN_LIST, schemas.RunListRequest(limit=10000), schemas.RunList)).runs
        return HTMLResponse(pages.experiments_page(session, runs))

    async def experiment(request: Request, session: dict[str, Any]) -> Response:
        name = request.path_params["name"]
        if not subjects.NAME_RE.match(name):
            raise ValidationError(f"{name!r} is not an experiment name")
        listing = schemas.RunListRequest(experiment=name, limit=_int(request, "limit", 1000, 1, 10000))
        metrics = [m for m in request.query_params.get("metrics", "").split(",") if m.strip()]
        for metric in metrics:
            if len(metric) > 128 or not metric.isprintable():
                raise ValidationError(f"{metric[:40]!r} is not a metric name")
        runs = (await ask(subjects.Api.RUN_LIST, listing, schemas.RunList)).runs
        return HTMLResponse(pages.experiment_page(session, name, runs, [m.strip() for m in metrics[:8]]))

    async def run_page(request: Request, session: dict[str, Any]) -> Response:
        run_id = _run_id(request)
        details = await ask(subjects.Api.RUN_GET, schemas.RunRef(run_id=run_id), schemas.RunDetails)
        files = await ask(subjects.Api.FILES_LIST, schemas.FilesListRequest(run_id=run_id), schemas.FilesList)
        return HTMLResponse(pages.run_page(session, details, files))

    async def run_file(request: Request, session: dict[str, Any]) -> Response:
        run_id, name = _run_id(request), request.path_params["name"]
        if ".." in name.split("/") or name.startswith("/") or "\x00" in name:
            raise ValidationError(f"{name!r} is not a file of a run")
        listed = await ask(subjects.Api.FILES_LIST, schemas.FilesListRequest(run_id=run_id), schemas.FilesList)
        if name not in {f.name for f in listed.files}:
            raise NotFoundError(f"run {run_id} has no file {name!r}")
        url = await ask(subjects.Api.FILE_URL, schemas.FileUrlRequest(run_id=run_id, name=name), schemas.FileUrl)
        return RedirectResponse(url.url, status_code=302)

    async def cancel(request: Request, session: dict[str, Any]) -> Response:
        run_id = _run_id(request)
        summary = await ask(subjects.Api.RUN_CANCEL, schemas.RunCancelRequest(run_id=run_id), schemas.RunSummary)
        portal.log.info("portal_cancel", run_id=run_id, user=session["u"])
        return JSONResponse({"state": summary.state.value})

    async def metrics_json(request: Request, session: dict[str, Any]) -> Response:
        run_id = _run_id(request)
        await ask(subjects.Api.RUN_GET, schemas.RunRef(run_id=run_id), schemas.RunDetails)
        msgs, _ = await bus.read_subject(portal.js, subjects.METRICS_STREAM, subjects.run_metrics(run_id))
        points = [p for m in msgs for p in schemas.run_data_decoder.decode(m.data).metrics]
        return JSONResponse({"run_id": run_id, "metrics": msgspec.to_builtins(points)})

    async def cluster(request: Request, session: dict[str, Any]) -> Response:
        state = await bus.scheduler_state(portal.nc)
        return HTMLResponse(pages.cluster_page(session, state, time.time()))

    async def models(request: Request, session: dict[str, Any]) -> Response:
        found = await ask(subjects.Api.MODEL_LIST, schemas.ModelListRequest(), schemas.ModelList)
        return HTMLResponse(pages.models_page(session, found.models))

    async def sweep(request: Request, session: dict[str, Any]) -> Response:
        sweep_id = request.path_params["sweep_id"]
        details = await ask(subjects.Api.SWEEP_GET, schemas.SweepRef(sweep_id=sweep_id), schemas.SweepDetails)
        return HTMLResponse(pages.sweep_page(session, details))

    # --- live ---------------------------------------------------------------------------------------------------
    async def logs_stream(request: Request, session: dict[str, Any]) -> Response:
        """One rank's (or every rank's) lines as they are printed. Each event's id is its stream sequence, so a
        browser that reconnects (EventSource sends Last-Event-ID) resumes right after it; ``?from=`` (or an id)
        ``rank:line,...`` resumes each rank at a line number instead."""
        run_id = _run_id(request)
        rank = request.query_params.get("rank", "all")
        if rank != "all" and not (rank.isdigit() and int(rank) < 100000):
            raise ValidationError(f"rank must be a number or 'all', not {rank[:20]!r}")
        after, positions = _resume(request.headers.get("last-event-id") or request.query_params.get("from") or "")
        await ask(subjects.Api.RUN_GET, schemas.RunRef(run_id=run_id), schemas.RunDetails)  # 404 first
        subject = subjects.run_logs(run_id, int(rank)) if rank != "all" else subjects.run_logs_all_ranks(run_id)

        async def lines() -> AsyncIterator[bytes]:
            cursors: dict[int, LogCursor] = {}
            yield b"retry: 1000\n\n"
            async for chunk in fanout.chunks(subject, after=after):  # one consumer per subject, for every browser
                if chunk is None:
                    yield b": keep-alive\n\n"
                    continue
                if chunk.shared and not positions:
                    yield chunk.frame  # rendered once, for every browser that is live
                    continue
                out = []
                for seq, shared in chunk.items:
                    batch = shared.batch
                    cursor = cursors.setdefault(batch.rank, LogCursor(positions.get(batch.rank, 0)))
                    taken = cursor.take(batch)
                    if taken:
                        out.append((shared if len(taken) == len(shared.batch.lines) and shared.first ==
                                    batch.first_line else Batch(batch, taken)).event(seq))  # fmt: skip
                if out:
                    yield "".join(out).encode()  # one write

        return _sse(lines())

    async def live(request: Request, session: dict[str, Any]) -> Response:
        """The run's state changes and metrics, replayed from the start and then as they come."""
        run_id = _run_id(request)
        await ask(subjects.Api.RUN_GET, schemas.RunRef(run_id=run_id), schemas.RunDetails)

        async def events() -> AsyncIterator[str]:
            queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(QUEUE_BOUND)

            async def pump(stream: str, subject: str, kind: str) -> None:
                async for msg in _follow(portal, stream, subject):
                    if msg is not None:
                        await queue.put((kind, msg))

            tasks = [
                asyncio.create_task(pump(subjects.EVENTS_STREAM, subjects.run_events(run_id), "state")),
                asyncio.create_task(pump(subjects.METRICS_STREAM, subjects.run_metrics(run_id), "metrics")),
            ]
            try:
                yield "retry: 1000\n\n"
                while True:
                    try:
                        kind, msg = await asyncio.wait_for(queue.get(), 15)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if kind == "state":
                        ev = schemas.run_event_decoder.decode(msg.data)
                        data: dict[str, Any] = {"state": ev.state.value, "at": ev.at, "kind": type(ev).__name__}
                        if getattr(ev, "error", None) is not None:
                            data["error"] = msgspec.to_builtins(ev.error)
                    else:
                        batch = schemas.run_data_decoder.decode(msg.data)
                        data = {"metrics": msgspec.to_builtins(batch.metrics), "tags": batch.tags,
                                "properties": batch.properties}  # fmt: skip
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            finally:
                for task in tasks:
                    task.cancel()

        return _sse(events())

    routes = [
        Route("/", page(home)),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", page(logout), methods=["POST"]),
        Route("/experiments", page(experiments)),
        Route("/experiments/{name}", page(experiment)),
        Route("/runs/{run_id}", page(run_page)),
        Route("/runs/{run_id}/metrics.json", page(metrics_json)),
        Route("/runs/{run_id}/logs/stream", page(logs_stream)),
        Route("/runs/{run_id}/live", page(live)),
        Route("/runs/{run_id}/files/{name:path}", page(run_file)),
        Route("/runs/{run_id}/cancel", page(cancel), methods=["POST"]),
        Route("/sweeps/{sweep_id}", page(sweep)),
        Route("/cluster", page(cluster)),
        Route("/models", page(models)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return HTMLResponse(pages.error_page(session_of(request), "Not found", "No such page."), status_code=404)

    return Starlette(routes=routes, exception_handlers={404: not_found})


def _sse(body: AsyncIterator[str] | AsyncIterator[bytes]) -> StreamingResponse:
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


def _run_id(request: Request) -> str:
    run_id = request.path_params["run_id"]
    if not subjects.RUN_ID_RE.match(run_id):
        raise ValidationError(f"{run_id[:80]!r} is not a run id")
    return run_id


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ValidationError(f"{name} must be a whole number from {low} to {high}, not {raw[:20]!r}")
    return int(raw)


def _resume(text: str) -> tuple[int, dict[int, int]]:
    """Where a log stream resumes: ``s1234`` (after that stream sequence: the id of the last event a browser got)
    or ``0:120,1:87`` (each rank's next line). Anything else is refused rather than guessed at."""
    if not text:
        return 0, {}
    if re.fullmatch(r"s[0-9]{1,19}", text):
        return int(text[1:]), {}
    if not _RESUME_RE.match(text):
        raise ValidationError(f"a log position is s<sequence> or rank:line[,rank:line...], not {text[:40]!r}")
    return 0, {int(r): int(n) for r, n in (part.split(":") for part in text.split(","))}


async def _follow(portal: PortalService, stream: str, subject: str) -> AsyncIterator[Any]:
    """Every message on ``subject`` from the start, then as they come; None every 15 s of quiet. The consumer's
    buffer is bounded: a browser that reads slowly slows the consumer, nothing piles up in the portal."""
    sub = await portal.js.subscribe(
        subject, stream=stream, ordered_consumer=True, pending_msgs_limit=QUEUE_BOUND,
        deliver_policy=js_api.DeliverPolicy.ALL,
    )  # fmt: skip
    try:
        while True:
            try:
                yield await sub.next_msg(timeout=15)
            except TimeoutError:
                yield None
    finally:
        try:
            await asyncio.shield(bus.unsubscribe_and_drop(portal.js, sub, stream))
        except Exception:  # the connection is going away with the consumer
            pass


async def _bus_accepts(url: str, **auth: Any) -> bool:
    """Whether the bus takes these credentials: the portal knows no password or key, it asks the servers."""
    try:
        nc = await nats.connect(servers=url.split(","), **auth, allow_reconnect=False, connect_timeout=3,
                                max_reconnect_attempts=0)  # fmt: skip
    except Exception:
        return False
    await nc.close()
    return True
