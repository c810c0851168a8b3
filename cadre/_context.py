"""``Run.get_context()``: what a training script uses to record metrics, tags and files about its own run.

Inside cadre it talks to its node agent over a loopback connection opened for this run only, with a token only
this run's processes have (``CADRE_RUN_ENDPOINT``, ``CADRE_RUN_TOKEN``): the script holds no bus credentials,
and the agent writes only to this run's history. Outside cadre the same calls make an offline run that prints
and appends to ``./logs/offline_run.jsonl``, so a script runs unchanged on a laptop.

Standard library only, and Python 3.8 or newer: the node agent brings this module into every job's environment
(see ``cadre/_jobside.py``), whatever Python or image the job runs on.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Union

Value = Union[int, float, str, bool, None]  # evaluated at import: Python 3.8 has no `int | str`


class RunContextError(Exception):
    """The agent refused a call (for instance a file outside outputs/ or logs/)."""


class RunContext:
    """Record metrics, tags, properties and files of the current run."""

    def __init__(self) -> None:
        self.id = os.environ.get("CADRE_RUN_ID", "offline")
        self.rank = int(os.environ.get("RANK", "0"))
        endpoint = os.environ.get("CADRE_RUN_ENDPOINT")
        self._token = os.environ.get("CADRE_RUN_TOKEN", "")
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: Any = None
        if endpoint:
            host, _, port = endpoint.rpartition(":")
            self._sock = socket.create_connection((host, int(port)), timeout=30)
            self._reader = self._sock.makefile("rb")

    @property
    def offline(self) -> bool:
        return self._sock is None

    def _send(self, op: str, **fields: Any) -> None:
        message = {"op": op, "token": self._token, "rank": self.rank, "at": time.time(), **fields}
        if self._sock is None:
            print(f"[offline run] {op}: {json.dumps(fields, default=str)}", flush=True)
            Path("logs").mkdir(exist_ok=True)
            with open("logs/offline_run.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({k: v for k, v in message.items() if k != "token"}, default=str) + "\n")
            return
        with self._lock:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
            reply = json.loads(self._reader.readline() or b'{"error": "the node agent closed the connection"}')
        if "error" in reply:
            raise RunContextError(reply["error"])

    # --- metrics -------------------------------------------------------------------------------------------
    def log(self, name: str, value: Value, step: int | None = None, description: str = "") -> None:
        """One value of a metric; several calls make a series."""
        self._send("metric", name=name, kind="scalar", value=value, step=step)

    def log_list(self, name: str, value: list[Value], description: str = "") -> None:
        self._send("metric", name=name, kind="list", values=list(value))

    def log_row(self, name: str, description: str = "", **kwargs: Value) -> None:
        self._send("metric", name=name, kind="row", row=kwargs)

    def log_table(self, name: str, value: dict[str, list[Value]], description: str = "") -> None:
        self._send("metric", name=name, kind="table", table={k: list(v) for k, v in value.items()})

    def log_image(self, name: str, path: str | os.PathLike[str], description: str = "") -> None:
        """Store an image file with the run (under logs/images/) and record it as a metric."""
        self._send("image", name=name, source=str(Path(path).resolve()))

    # --- tags and properties -------------------------------------------------------------------------------
    def tag(self, key: str, value: str = "") -> None:
        self._send("tags", tags={key: str(value)})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send("tags", tags={k: str(v) for k, v in tags.items()})

    def add_properties(self, properties: dict[str, str]) -> None:
        self._send("properties", properties={k: str(v) for k, v in properties.items()})

    # --- files ---------------------------------------------------------------------------------------------
    def upload_file(self, name: str, path_or_stream: str | os.PathLike[str]) -> None:
        """Store a file with the run under ``name`` (which must be under outputs/ or logs/)."""
        self._send("upload", name=name, source=str(Path(path_or_stream).resolve()))

    def upload_folder(self, name: str, path: str | os.PathLike[str]) -> None:
        root = Path(path)
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            self.upload_file(f"{name.rstrip('/')}/{file.relative_to(root).as_posix()}", file)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        return f"RunContext(id={self.id!r}, rank={self.rank}{', offline' if self.offline else ''})"


_current: RunContext | None = None


def get_context() -> RunContext:
    """The current run (one connection per process, opened on first use)."""
    global _current
    if _current is None:
        _current = RunContext()
    return _current
