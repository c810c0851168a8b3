"""Shared test helpers."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

AGENT_SLOTS = 2  # slots of the session cluster's agent


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
    """A "simple" package index (PEP 503) served over HTTP on loopback, with one wheel written here by hand.

    ``cadre-demo-pkg==1.0`` provides the module ``cadre_demo_pkg`` with ``VALUE = "from the demo package"``.
    """

    NAME, VERSION, VALUE = "cadre-demo-pkg", "1.0", "from the demo package"

    def __init__(self, root: Path) -> None:
        wheel = f"cadre_demo_pkg-{self.VERSION}-py3-none-any.whl"
        (root / "files").mkdir(parents=True)
        self._write_wheel(root / "files" / wheel)
        page = root / "simple" / self.NAME
        page.mkdir(parents=True)
        (page / "index.html").write_text(f'<a href="../../files/{wheel}">{wheel}</a>\n')
        (root / "simple" / "index.html").write_text(f'<a href="{self.NAME}/">{self.NAME}</a>\n')
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/simple/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _write_wheel(self, path: Path) -> None:
        dist = f"cadre_demo_pkg-{self.VERSION}.dist-info"
        files = {
            "cadre_demo_pkg/__init__.py": f"VALUE = {self.VALUE!r}\n",
            f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {self.NAME}\nVersion: {self.VERSION}\n",
            f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: cadre-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        }
        record = []
        for name, body in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(body.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(body.encode())}")
        files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
        with zipfile.ZipFile(path, "w") as zf:
            for name, body in files.items():
                zf.writestr(name, body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass
