"""The portal service: a Starlette app served by uvicorn in the service's own event loop, reading the bus with
the service role. People log in with their bus credentials (the portal checks them by connecting as them), and
their session is a signed cookie whose key is kept in the secrets bucket, so sessions outlive a portal restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Iterator

import uvicorn
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.portal.web import make_app
from shared import bus, subjects
from shared.service import Service
from shared.settings import BusSettings

SESSION_KEY = "portal.session_key"
DEFAULT_PORT = 8265


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (the service stops it: SIGTERM drains the bus connection too) and
    without its 0.1 s tick, which only refreshes the Date header (off) and polls should_exit: an idle portal
    sleeps until :meth:`stop`."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stopping = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        await self.on_tick(0)  # the headers, once
        await self.stopping.wait()

    def stop(self) -> None:
        self.should_exit = True
        self.stopping.set()


class PortalService(Service):
    name = "portal"

    def __init__(self, bus_settings: BusSettings, host: str, port: int) -> None:
        super().__init__(bus_settings)
        self.host, self.port = host, port
        self.session_key = b""
        self.secrets_kv: KeyValue
        self.server: _Server | None = None

    @classmethod
    def from_env(cls) -> PortalService:
        host = os.environ.get("CADRE_PORTAL_HOST", "127.0.0.1")
        return cls(BusSettings.from_env(cls.name), host, int(os.environ.get("CADRE_PORTAL_PORT", DEFAULT_PORT)))

    async def setup(self) -> None:
        await bus.ensure_topology(self.js)
        self.secrets_kv = await bus.key_value(self.js, subjects.SECRETS_BUCKET)
        # A new bucket on a clustered bus may not answer for a moment: waited out.
        self.session_key = await bus.outlast(self._session_key, within=60)
        app = make_app(self)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2, date_header=False)  # fmt: skip
        self.server = _Server(config)
        self.spawn(self.server.serve(), "http")
        self.log.info("portal_listening", url=f"http://{self.host}:{self.port}")

    async def teardown(self) -> None:
        if self.server is not None:
            self.server.stop()

    async def _session_key(self) -> bytes:
        try:
            entry = await self.secrets_kv.get(SESSION_KEY)
            if entry.value:
                return entry.value
        except KeyNotFoundError:
            pass
        key = secrets.token_bytes(32)
        try:
            await self.secrets_kv.create(SESSION_KEY, key)
            return key
        except Exception:  # another portal made it first: use theirs
            entry = await self.secrets_kv.get(SESSION_KEY)
            assert entry.value
            return entry.value
