"""The agent's side of ``Run.get_context()``: a loopback endpoint per run, guarded by a per-run token.

A job's processes send metrics, tags, properties and files here; the agent writes them to this run's history
only (``cadre.runs.<run>.metrics``) and into this run's directory, so a job needs no bus credentials and cannot
touch another run.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import structlog

from shared import files, schemas
from shared.errors import ValidationError

LINGER = 0.05  # seconds: metrics are batched, and stored within a blink
MAX_LINE = 1 << 20
UPLOAD_DIRS = ("outputs/", "logs/")
JOB_PACKAGE_DIR = "job-python"
# The job's ``cadre`` package: the file in this package that each becomes (see cadre/_jobside.py).
JOB_PACKAGE_FILES = {"__init__.py": "_jobside.py", "_context.py": "_context.py"}


def job_package(work_dir: Path) -> Path:
    """Write (once per content) the folder that goes first on every rank's PYTHONPATH; returns it.

    The folder is named by the content's hash, so an upgraded agent never changes what a running job imports,
    and its files are read-only (a container gets it mounted read-only too).
    """
    sources = {name: (resources.files("cadre") / src).read_bytes() for name, src in JOB_PACKAGE_FILES.items()}
    digest = hashlib.sha256(b"".join(name.encode() + b"\0" + data for name, data in sources.items())).hexdigest()
    root = work_dir / JOB_PACKAGE_DIR / digest[:16]
    if (root / "cadre" / "__init__.py").is_file():
        return root
    tmp = root.with_name(f".{root.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "cadre").mkdir(parents=True)
    for name, data in sources.items():
        (tmp / "cadre" / name).write_bytes(data)
        (tmp / "cadre" / name).chmod(0o444)
    for folder in (tmp / "cadre", tmp):
        folder.chmod(0o555)
    try:
        tmp.rename(root)
    except OSError:  # another agent sharing this work directory wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def context_env(port: int, token: str, host: str = "127.0.0.1") -> dict[str, str]:
    """What a rank is told to find its run's endpoint (the token is the run's alone)."""
    return {"CADRE_RUN_ENDPOINT": f"{host}:{port}", "CADRE_RUN_TOKEN": token}


def new_token() -> str:
    return secrets.token_urlsafe(24)


Publish = Callable[[schemas.RunData], Awaitable[None]]


class RunContextServer:
    """Takes a run's calls; ``publish`` stores each batch (the run's shim appends it to a file the agent ships)."""

    def __init__(
        self, publish: Publish, run_id: str, run_dir: Path, token: str, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._publish = publish
        self.run_id = run_id
        self.run_dir = run_dir
        self.host = host
        self.token = token
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._points: list[schemas.MetricPoint] = []
        self._tags: dict[str, str] = {}
        self._properties: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._images = 0
        self._flusher: asyncio.Task[None] | None = None
        self.log = structlog.get_logger().bind(run_id=run_id, component="run_context")

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        self._flusher = asyncio.create_task(self._flush_loop())
        return self.port

    async def close(self) -> None:
        """Stop taking calls and store everything received."""
        if self._server is not None:
            self._server.close()
        self._closed = True
        self._wake.set()
        if self._flusher is not None:
            await self._flusher

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = self._handle(json.loads(line))
                except (ValidationError, ValueError, TypeError, KeyError, OSError, msgspec.ValidationError) as exc:
                    reply = {"error": str(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        if not hmac.compare_digest(str(msg.get("token", "")), self.token):
            self.log.warning("run_context_refused")
            return {"error": "refused: this endpoint belongs to another run"}
        op = msg.get("op")
        rank, at = int(msg.get("rank", 0)), float(msg.get("at") or time.time())
        if op == "metric":
            name = str(msg["name"])
            if not name or len(name) > 255:
                raise ValidationError("a metric name must have 1 to 255 characters")
            fields = {k: msg[k] for k in ("kind", "value", "values", "row", "table", "step") if k in msg}
            self._points.append(msgspec.convert({"name": name, "at": at, "rank": rank, **fields}, schemas.MetricPoint))
        elif op == "image":
            name = str(msg["name"])
            source = Path(msg["source"])
            if not source.is_file():
                raise ValidationError(f"log_image: {source} is not a file")
            self._images += 1
            rel = f"logs/images/{self._images:05d}_{source.name}"
            self._copy_in(source, rel)
            self._points.append(schemas.MetricPoint(name=name, kind="image", path=rel, at=at, rank=rank))
        elif op == "tags":
            self._tags.update({str(k): str(v) for k, v in dict(msg["tags"]).items()})
        elif op == "properties":
            self._properties.update({str(k): str(v) for k, v in dict(msg["properties"]).items()})
        elif op == "upload":
            name = files.check_relative(str(msg["name"]))
            if not name.startswith(UPLOAD_DIRS):
                raise ValidationError(f"upload_file: {name!r} must be under outputs/ or logs/")
            self._copy_in(Path(msg["source"]), name)
        else:
            raise ValidationError(f"unknown call {op!r}")
        self._wake.set()
        return {"ok": True}

    def _copy_in(self, source: Path, rel: str) -> None:
        dest = files.safe_destination(self.run_dir, rel)
        if source.resolve() == dest:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            if not self._closed:
                await asyncio.sleep(LINGER)
            self._wake.clear()
            if self._points or self._tags or self._properties:
                batch = schemas.RunData(
                    run_id=self.run_id, metrics=self._points, tags=self._tags, properties=self._properties
                )
                self._points, self._tags, self._properties = [], {}, {}
                try:
                    await self._publish(batch)
                except Exception as exc:  # the disk is full: a lost batch is logged, the run goes on
                    self.log.error("run_data_lost", error=str(exc), metrics=len(batch.metrics))
            if self._closed:
                return
