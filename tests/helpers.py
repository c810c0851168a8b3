"""Shared test helpers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import functools
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from shared import bus
from shared.settings import BusSettings

T = TypeVar("T")

AGENT_SLOTS = 2  # slots of the session cluster's agent
# Wheels from PyPI for the agents' package index, downloaded by `make test` (the tests themselves have no network).
TEST_WHEELS = Path(__file__).resolve().parent.parent / ".cache" / "test-wheels"


CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000


def private_mounts() -> bool:
    """Give this (still single-threaded) process a mount namespace of its own, so a test can mount a small tmpfs
    (a full disk) that nothing outside sees and that goes away with it."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    return libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0  # mounts made here stay here


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` ("48m") at ``path`` for the block's time."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def eventually(fn: Callable[[], T], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Return fn()'s first truthy value, or fail after ``timeout`` with its last result."""
    deadline = time.monotonic() + timeout
    last: T = fn()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")
        time.sleep(interval)
        last = fn()
    return last


class PackageIndex:
    """A "simple" package index (PEP 503) served over HTTP on loopback, with wheels written here by hand, and every
    wheel in ``wheels`` (a folder `make test` downloaded outside the tests' network namespace) when given.

    ``cadre-demo-pkg==1.0`` provides the module ``cadre_demo_pkg`` with ``VALUE = "from the demo package"``.
    ``cadre==0.0.1`` is another cadre than the one under test (its client has only ``Workspace``): what a job's
    environment may bring of its own.
    """

    NAME, VERSION, VALUE = "cadre-demo-pkg", "1.0", "from the demo package"
    OTHER_CADRE = "0.0.1"

    def __init__(self, root: Path, wheels: Path | None = None) -> None:
        packages = {
            self.NAME: (self.VERSION, {"cadre_demo_pkg/__init__.py": f"VALUE = {self.VALUE!r}\n"}),
            "cadre": (self.OTHER_CADRE, {"cadre/__init__.py": f"VERSION = {self.OTHER_CADRE!r}\nWorkspace = 'old'\n"}),
        }
        (root / "files").mkdir(parents=True)
        links: dict[str, list[str]] = {}  # project (PEP 503 name) -> its files' links, relative to its page
        for name, (version, files) in packages.items():
            wheel = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            self._write_wheel(root / "files" / wheel, name, version, files)
            links.setdefault(normalize(name), []).append(f"../../files/{wheel}")
        if wheels is not None:
            (root / "wheels").symlink_to(wheels.resolve(), target_is_directory=True)
            for wheel in sorted(wheels.glob("*.whl")):
                # A wheel's name starts with its project's name, "-" escaped as "_" (and never holding a "-").
                links.setdefault(normalize(wheel.name.split("-", 1)[0]), []).append(f"../../wheels/{wheel.name}")
        for project, hrefs in links.items():
            page = root / "simple" / project
            page.mkdir(parents=True)
            (page / "index.html").write_text("".join(f'<a href="{h}">{h.rsplit("/", 1)[-1]}</a>\n' for h in hrefs))
        (root / "simple" / "index.html").write_text("".join(f'<a href="{n}/">{n}</a>\n' for n in sorted(links)))
        self.projects = sorted(links)
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/simple/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @staticmethod
    def _write_wheel(path: Path, name: str, version: str, files: dict[str, str]) -> None:
        dist = f"{name.replace('-', '_')}-{version}.dist-info"
        files = {
            **files,
            f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
            f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: cadre-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        }
        record = []
        for file, body in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(body.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{file},sha256={digest},{len(body.encode())}")
        files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
        with zipfile.ZipFile(path, "w") as zf:
            for file, body in files.items():
                zf.writestr(file, body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def normalize(name: str) -> str:
    """A project's name as PEP 503 writes it: lower case, each run of "-", "_" and "." one "-"."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


async def violations(settings: BusSettings, action: Callable[..., Any]) -> list[str]:
    """Run ``action(nc)`` and return the permission violations the server reported meanwhile."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await bus.connect(settings, error_cb=on_error)
    try:
        await action(nc)
        await nc.flush()
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    return [e for e in errors if "permissions violation" in e.lower()]
