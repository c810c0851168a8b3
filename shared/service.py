"""The base every service process is built on: connect, serve typed endpoints, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, schemas, subjects
from shared.errors import AuthenticationError, CadreError, InvalidRequestError, ServiceUnavailableError
from shared.settings import BusSettings

Req = TypeVar("Req", bound=msgspec.Struct)


class Service:
    """One deployable process.

    Subclasses set ``name``, register endpoints in :meth:`setup` and may run background tasks with
    :meth:`spawn`. Lifecycle: ``await run()`` until SIGTERM/SIGINT or :meth:`shutdown`; shutdown drains the
    connection so in-flight requests finish, and is idempotent.
    """

    name = "service"
    answers_ping = True  # node agents show liveness by heartbeats instead (and may not subscribe to api subjects)

    def __init__(self, bus_settings: BusSettings) -> None:
        self.bus_settings = bus_settings
        self.instance = uuid.uuid4().hex[:8]
        self.log = structlog.get_logger().bind(service=self.name, instance=self.instance)
        self.nc: NATS
        self.js: JetStreamContext
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._disconnected_at: float | None = None
        self._failed_reconnects = 0
        self.bus_up_since = 0.0  # wall clock of the last (re)connect: what others sent before it may not have arrived
        self.refused: str | None = None  # why the bus cut this process off, once it has

    async def setup(self) -> None:
        """Register endpoints and start background work. Called once connected."""

    async def teardown(self) -> None:
        """Release what setup took, before the connection drains."""

    async def connect(self) -> None:
        self.nc = await bus.connect(
            self.bus_settings,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
        )
        self.js = self.nc.jetstream()
        self.bus_up_since = time.time()

    @property
    def bus_connected(self) -> bool:
        return self._disconnected_at is None and self.nc.is_connected

    async def _on_error(self, exc: Exception) -> None:
        if self._disconnected_at is not None:  # one line per outage, not one per reconnect attempt
            self._failed_reconnects += 1
            return
        self.log.warning("bus_error", error=str(exc))

    async def _on_disconnected(self) -> None:
        if self._disconnected_at is None and not self._stop.is_set():
            self._disconnected_at = asyncio.get_running_loop().time()
            self._failed_reconnects = 0
            self.log.warning("bus_disconnected")

    async def _on_closed(self) -> None:
        """The client gives up on the bus only when the bus revoked this process's credentials: say so and stop
        (a supervisor restarting it would be refused again)."""
        if self._stop.is_set():
            return
        error = self.nc.last_error
        self.refused = (
            f"the bus closed the connection of {self.bus_settings.who!r} ({error}): its credentials were revoked; "
            "this process stops. Ask the bus's admin for new ones (`cadre admin add-agent NAME --rotate` for a host)"
        )
        self.log.error("bus_credentials_revoked", user=self.bus_settings.who, error=str(error))
        self.on_revoked()
        self.shutdown()

    def on_revoked(self) -> None:
        """What to stop at once when the bus has cut this process off (before teardown)."""

    async def _on_reconnected(self) -> None:
        if self._disconnected_at is not None:
            away = asyncio.get_running_loop().time() - self._disconnected_at
            self.log.info("bus_reconnected", seconds_away=round(away, 1), failed_attempts=self._failed_reconnects)
        self._disconnected_at = None
        self.bus_up_since = time.time()

    def endpoint(
        self,
        subject: str,
        request_type: type[Req],
        handler: Callable[..., Awaitable[msgspec.Struct]],
        queue: str | None = None,
        with_subject: bool = False,
    ) -> Awaitable[Any]:
        """Serve ``subject``: decode the request, call the handler, reply with its value or a typed error.

        ``with_subject``: the handler also gets the subject the request came on (a wildcard's token can name the
        caller, when the bus permissions let each caller publish only on its own).
        """
        decoder = msgspec.json.Decoder(request_type)

        async def on_msg(msg: Msg) -> None:
            try:
                req = decoder.decode(msg.data)
                result = await (handler(req, msg.subject) if with_subject else handler(req))
                reply: schemas.Reply[Any] = schemas.Reply(ok=result)
            except msgspec.ValidationError as exc:  # msgspec names the field: "Expected `str`, got `int` - at `$.name`"
                reply = schemas.Reply(error=_invalid(f"malformed request on {msg.subject}: {exc}"))
            except msgspec.DecodeError as exc:
                reply = schemas.Reply(error=_invalid(f"the request on {msg.subject} is not a JSON object: {exc}"))
            except CadreError as exc:
                reply = schemas.Reply(error=schemas.ErrorInfo(code=exc.code, message=exc.message))
            except bus.TRANSIENT_ERRORS as exc:  # JetStream cannot make progress now: the caller may try again
                self.log.warning("jetstream_unavailable", subject=subject, error=repr(exc))
                message = (
                    f"{self.name} cannot write to JetStream now ({exc.__class__.__name__}): the bus is restarting, "
                    "or fewer than a majority of its servers are up; try again once they are"
                )
                reply = schemas.Reply(error=schemas.ErrorInfo(code=ServiceUnavailableError.code, message=message))
            except Exception as exc:  # a bug: log it whole, tell the caller only what happened
                self.log.exception("handler_failed", subject=subject)
                reply = schemas.Reply(
                    error=schemas.ErrorInfo(code="internal", message=f"{self.name} failed: {exc.__class__.__name__}")
                )
            if msg.reply:
                await msg.respond(schemas.encode(reply))

        return self.nc.subscribe(subject, queue=queue or self.name, cb=on_msg)

    def spawn(self, work: Awaitable[None] | Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``work`` in the background. Given a function that makes the coroutine (a long-lived loop), a bus
        outage of any length is waited out: on a transient bus error the loop starts again, with backoff. Any
        other error stops the service, so that its supervisor restarts it rather than leave a zombie."""

        async def guarded() -> None:
            backoff = bus.Backoff()
            while True:
                started = asyncio.get_running_loop().time()
                try:
                    await (work() if callable(work) else work)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self._stop.is_set() or self.nc.is_closed:  # stopping, or cut off (_on_closed says why)
                        return
                    if callable(work) and bus.is_transient(exc):
                        if asyncio.get_running_loop().time() - started > 30:
                            backoff.reset()  # it ran a good while: this is a new outage, not the same one
                        delay = backoff.next_delay()
                        if backoff.attempts in (1, 10) or backoff.attempts % 60 == 0:
                            self.log.warning("task_retrying", task=name, error=repr(exc), attempt=backoff.attempts)
                        await asyncio.sleep(delay)
                        continue
                    self.log.exception("task_crashed", task=name)
                    self.shutdown()
                    return

        task = asyncio.create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)  # short-lived tasks (one per node that left) do not pile up

    async def _ping(self, _: schemas.Empty) -> schemas.Ping:
        return schemas.Ping(service=self.name, instance=self.instance)

    async def run(self) -> None:
        await self.connect()
        await self.setup()
        if self.answers_ping:
            await self.endpoint(subjects.service_ping(self.name), schemas.Empty, self._ping, queue=f"{self.name}-ping")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.shutdown)
            except (NotImplementedError, RuntimeError):
                pass
        self.log.info("service_started")
        await self._stop.wait()
        self.log.info("service_stopping")
        await self.teardown()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=10)
        except Exception:  # draining a broken connection: closing is all that is left
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.log.info("service_stopped")
        if self.refused is not None:
            raise AuthenticationError(self.refused)

    def shutdown(self) -> None:
        self._stop.set()


def _invalid(message: str) -> schemas.ErrorInfo:
    return schemas.ErrorInfo(code=InvalidRequestError.code, message=message)


def main(factory: Callable[[], Service], level: str | None = None, uvloop: bool = False) -> None:
    """Entry point used by every ``services/<name>/__main__.py``; ``uvloop``: run on uvloop's event loop (libuv),
    for a service whose work is mostly socket writes (the portal's log streams, the scheduler's placements: a
    fifth less CPU per placement burst there); CADRE_UVLOOP=0 keeps asyncio's."""
    from shared.logging import configure
    from shared.settings import log_level

    configure(getattr(factory, "name", "cadre"), level or log_level())
    service = factory()
    try:
        if uvloop and os.environ.get("CADRE_UVLOOP", "1") != "0":
            import uvloop as fast

            fast.run(service.run())
        else:
            asyncio.run(service.run())
    except AuthenticationError as exc:  # refused or revoked: one clear line, and no restart would help
        print(f"cadre {service.name}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
