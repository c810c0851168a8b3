"""Workspace: a connection to one cadre cluster, and the typed calls every client object makes through it."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from cadre._bridge import LoopThread
from cadre._profile import Profile, load_profile
from shared import bus, files, schemas
from shared.errors import NotSupportedError

T = TypeVar("T")


class Workspace:
    """Where runs, files and models live. Use :meth:`from_config` to find the running cluster."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.name = profile.name
        self._loop = LoopThread()
        settings = profile.bus("cadre-client")
        try:
            self._nc: NATS = self._loop.call(bus.connect(settings), timeout=15)
        except BaseException:
            self._loop.stop()
            raise
        self._js: JetStreamContext = self._nc.jetstream()
        self._stored_snapshots: set[str] = set()  # content hashes the store had, as this workspace last saw

    @classmethod
    def from_config(cls, path: str | Path | None = None) -> Workspace:
        """Connect to the cluster named by a profile file (default: the one ``cadre up`` wrote)."""
        return cls(load_profile(Path(path) if path else None))

    def _request(self, subject: str, payload: msgspec.Struct, reply_type: type[T], timeout: float = 30.0) -> T:
        return self._loop.call(bus.request(self._nc, subject, payload, reply_type, timeout=timeout))

    def _scheduler_state(self) -> schemas.SchedulerState:
        """Nodes and queue, every page of them."""
        return self._loop.call(bus.scheduler_state(self._nc), timeout=60)

    def get_default_datastore(self) -> None:
        """Azure's datastores have no counterpart: data goes up as a dataset."""
        from cadre._dataset import DATASET_INSTEAD

        raise NotSupportedError(f"datastores are not supported: {DATASET_INSTEAD}")

    def close(self) -> None:
        if not self._nc.is_closed:
            try:
                self._loop.call(self._nc.close(), timeout=5)
            except Exception:  # closing a broken connection: nothing more to do
                pass
        self._loop.stop()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Workspace(name={self.name!r}, url={self.profile.nats_url!r})"


def http_put_file(url: str, path: Path, size: int, timeout: float = 300) -> None:
    """Stream a file to a presigned URL (never all in memory)."""
    with open(path, "rb") as fh:
        req = urllib.request.Request(url, data=fh, method="PUT", headers={"Content-Length": str(size)})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
        except urllib.error.URLError as exc:
            if isinstance(exc, urllib.error.HTTPError):
                raise
            raise files.unreachable_store(url, exc, "this client") from exc


def http_put(url: str, data: bytes, timeout: float = 300) -> None:
    req = urllib.request.Request(url, data=data, method="PUT", headers={"Content-Length": str(len(data))})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
