"""TensorBoard on runs, as Azure ML's ``Tensorboard`` does it: the runs' ``logs/`` synced into a local folder,
live while they run, and the ``tensorboard`` package from PyPI started on it.

>>> from cadre.tensorboard import Tensorboard
>>> tb = Tensorboard([run1, run2])  # doctest: +SKIP
>>> tb.start()  # doctest: +SKIP
'http://127.0.0.1:6006/'
>>> tb.stop()  # doctest: +SKIP

The agents upload what changes under ``logs/`` every two seconds while a run goes on; this copies what changed
since the last look. Event files only grow, so only their new bytes are fetched (a ranged GET) and appended:
TensorBoard keeps reading the file it has open.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from cadre import _local
from shared import schemas, subjects
from shared.errors import CadreError, NotSupportedError, ValidationError

if TYPE_CHECKING:
    from cadre._run import Run

SYNC_INTERVAL = 1.0
READY_TIMEOUT = 90.0


class Tensorboard:
    """TensorBoard over ``runs``: each run is a folder named by its id, holding what its ``logs/`` holds."""

    def __init__(self, runs: list[Run], local_root: str | Path | None = None, port: int = 6006) -> None:
        if not runs:
            raise ValidationError("Tensorboard needs at least one run")
        self.runs = list(runs)
        self._own_root = local_root is None
        self.local_root = Path(local_root or tempfile.mkdtemp(prefix="cadre-tensorboard-")).expanduser().resolve()
        self.port = port
        self.url: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._have: dict[tuple[str, str], str] = {}  # (run, file) -> the md5 copied last
        self.errors: list[str] = []  # what a sync could not copy (it tries again on the next one)

    def start(self, start_browser: bool = False) -> str:
        """Copy what the runs logged so far, start TensorBoard on it and keep copying; returns its URL."""
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise NotSupportedError("TensorBoard is not installed here: pip install tensorboard") from None
        if self._proc is not None:
            return self.url or ""
        self.local_root.mkdir(parents=True, exist_ok=True)
        self.sync()
        port = self.port or _local._free_ports(plain=1, with_grpc=0)[0]
        log = open(Path(tempfile.gettempdir()) / f"cadre-tensorboard-{port}.log", "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(self.local_root), "--host", "127.0.0.1",
             "--port", str(port), "--reload_interval", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.url = f"http://127.0.0.1:{port}/"
        self._wait_ready(log.name)
        self._thread = threading.Thread(target=self._loop, name="cadre-tensorboard-sync", daemon=True)
        self._thread.start()
        if start_browser:
            import webbrowser

            webbrowser.open(self.url)
        return self.url

    def stop(self) -> None:
        """Stop copying and stop TensorBoard (a folder this made itself is removed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._own_root:
            shutil.rmtree(self.local_root, ignore_errors=True)

    def __enter__(self) -> Tensorboard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- syncing ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        ended: set[str] = set()
        while not self._stop.wait(SYNC_INTERVAL):
            self.sync(skip=ended)
            for run in self.runs:
                if run.id not in ended and run._details().state.is_terminal():
                    self.sync(only=run.id)  # its last files, then it is left alone
                    ended.add(run.id)

    def sync(self, skip: frozenset[str] | set[str] = frozenset(), only: str | None = None) -> int:
        """Copy what changed under each run's ``logs/``; returns how many files changed."""
        changed = 0
        for run in self.runs:
            if run.id in skip or (only is not None and run.id != only):
                continue
            try:
                request = schemas.FilesListRequest(run_id=run.id, prefix="logs/")
                listed = run._ws._request(subjects.Api.FILES_LIST, request, schemas.FilesList)
                for entry in listed.files:
                    if self._have.get((run.id, entry.name)) != entry.md5:
                        self._copy(run, entry)
                        self._have[(run.id, entry.name)] = entry.md5
                        changed += 1
            except (CadreError, OSError) as exc:
                self.errors.append(f"{run.id}: {exc}")
        return changed

    def _copy(self, run: Run, entry: schemas.FileEntry) -> None:
        relative = entry.name.removeprefix("logs/")
        if relative.startswith("cadre/"):
            return  # cadre's own copies of the ranks' output: not TensorBoard's
        target = self.local_root / run.id / relative
        if not target.resolve().is_relative_to(self.local_root / run.id):
            raise ValidationError(f"{entry.name!r} leaves the run's folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        have = target.stat().st_size if target.exists() else 0
        if have > entry.size:  # rewritten smaller: not an append, copy it whole
            target.unlink()
            have = 0
        if have == entry.size:
            return
        url = run._ws._request(subjects.Api.FILE_URL, schemas.FileUrlRequest(run_id=run.id, name=entry.name),
                               schemas.FileUrl).url  # fmt: skip
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
                partial = response.status == 206
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # nothing past what we have
                return
            raise
        with open(target, "ab" if partial else "wb") as fh:
            fh.write(body)

    def _wait_ready(self, log_path: str) -> None:
        assert self._proc is not None and self.url is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")[-2000:]
                raise CadreError(f"TensorBoard exited with code {self._proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "data/runs", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise CadreError(f"TensorBoard did not answer on {self.url} within {READY_TIMEOUT:.0f}s (log: {log_path})")


__all__ = ["Tensorboard"]
