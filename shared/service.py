"""The base every service process is built on: connect, serve typed endpoints, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, schemas, subjects
from shared.errors import CadreError
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

    async def setup(self) -> None:
        """Register endpoints and start background work. Called once connected."""

    async def teardown(self) -> None:
        """Release what setup took, before the connection drains."""

    async def connect(self) -> None:
        self.nc = await bus.connect(self.bus_settings, error_cb=self._on_error)
        self.js = self.nc.jetstream()

    async def _on_error(self, exc: Exception) -> None:
        self.log.warning("bus_error", error=str(exc))

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
            except msgspec.ValidationError as exc:
                reply = schemas.Reply(error=schemas.ErrorInfo(code="invalid", message=f"malformed request: {exc}"))
            except CadreError as exc:
                reply = schemas.Reply(error=schemas.ErrorInfo(code=exc.code, message=exc.message))
            except Exception as exc:  # a bug: log it whole, tell the caller only what happened
                self.log.exception("handler_failed", subject=subject)
                reply = schemas.Reply(
                    error=schemas.ErrorInfo(code="internal", message=f"{self.name} failed: {exc.__class__.__name__}")
                )
            if msg.reply:
                await msg.respond(schemas.encode(reply))

        return self.nc.subscribe(subject, queue=queue or self.name, cb=on_msg)

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("task_crashed", task=name)
                self.shutdown()  # a dead loop must not leave a zombie service: exit, let the supervisor restart

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
            await self.nc.close()
        self.log.info("service_stopped")

    def shutdown(self) -> None:
        self._stop.set()


def main(factory: Callable[[], Service], level: str | None = None) -> None:
    """Entry point used by every ``services/<name>/__main__.py``."""
    from shared.logging import configure
    from shared.settings import log_level

    configure(getattr(factory, "name", "cadre"), level or log_level())
    service = factory()
    asyncio.run(service.run())
