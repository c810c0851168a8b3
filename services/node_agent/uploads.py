"""Uploads: a run's files from this node to object storage, through presigned URLs the artifact service hands out.

While the ranks run, what changes under ``logs/`` and the checkpoint folder is synced every few seconds
(TensorBoard reads it live; a retry restores the checkpoint). Once they are done, everything under ``outputs/``
and ``logs/`` is uploaded, large files in parallel parts, hashed while they upload, then committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from services.node_agent.staging import UPLOAD_DIRS
from shared import bus, files, schemas, subjects
from shared.errors import CadreError, StorageError
from shared.settings import Limits
from shared.states import Cause

if TYPE_CHECKING:
    from services.node_agent.execution import NodeContext

UPLOAD_WORKERS = 4
UPLOAD_ATTEMPTS = 4
LOG_SYNC_INTERVAL = 2.0
FINISH_PATIENCE = 600.0  # seconds an agent keeps trying to hand a finished run's files over
# A node's files up to this much in all go whole in the commit request (well under NATS' 1 MB message, base64
# included): a run that writes a few small outputs ends without a presign round trip and a PUT per file.
INLINE_MAX = 256 << 10
T = TypeVar("T")


class Uploads:
    def __init__(
        self, ctx: NodeContext, assignment: schemas.Assignment, run_dir: Path, is_master: bool, log: Any
    ) -> None:
        self.ctx = ctx
        self.run_id = assignment.run_id
        self.attempt = assignment.attempt
        self.spec = assignment.spec
        self.node_id = ctx.config.node_id
        self.run_dir = run_dir
        self.is_master = is_master  # stores what came with the snapshot too; the others only what changed
        self.log = log
        self._sync_stopped = threading.Event()  # the live sync's threads give up their retries when set
        self.checkpoint_limit = Limits.from_env().snapshot_max_bytes
        self.checkpoint_peak: tuple[int, int] | None = None  # (bytes, files) of the largest oversized checkpoint seen

    async def hand_over(self, started_ns: int) -> None:
        """Upload what the run wrote here and ask the artifact service to commit it (once the ranks are done)."""
        started = time.monotonic()
        stored, inline, unread = await asyncio.to_thread(self._collect_small, started_ns)  # one trip to a thread
        error = None
        parts: dict[str, schemas.MultipartDone] = {}
        try:
            if unread is not None:
                raise unread
            if stored and not inline:
                urls = await self._patiently(
                    subjects.of_node(subjects.AgentApi.UPLOAD_URLS, self.node_id),
                    schemas.UploadUrlsRequest(run_id=self.run_id, node_id=self.node_id, files=stored),
                    schemas.UploadUrls,
                )
                # The ranks are done, so the files are final: hash them while they upload, not before.
                parts, stored = await asyncio.gather(
                    asyncio.to_thread(self._upload, stored, urls),
                    asyncio.to_thread(
                        lambda: [
                            files.digest(self.run_dir / f.name, f.name, with_md5=f.name not in urls.multipart)
                            for f in stored
                        ]
                    ),
                )
        except (CadreError, OSError) as exc:
            self.log.error("upload_failed", error=str(exc))
            stored, parts = [], {}
            error = schemas.ErrorInfo(
                code=Cause.UPLOAD_FAILED, message=f"uploading run files failed on {self.node_id}: {exc}"
            )
        uploaded = time.monotonic()
        await self._patiently(
            subjects.of_node(subjects.AgentApi.COMMIT, self.node_id),
            schemas.CommitRequest(
                run_id=self.run_id,
                node_id=self.node_id,
                attempt=self.attempt,
                files=stored,
                error=error,
                parts=parts,
                inline=inline,
            ),
            schemas.RunSummary,
        )
        size = sum(f.size for f in stored)
        self.log.info(
            "files_committed",
            files=len(stored),
            bytes=size,
            upload_s=round(uploaded - started, 3),
            commit_s=round(time.monotonic() - uploaded, 3),
            mb_per_s=round(size / (1 << 20) / max(uploaded - started, 1e-6), 1),
        )

    def _collect_small(self, started_ns: int) -> tuple[list[schemas.FileEntry], dict[str, bytes], OSError | None]:
        """The files to upload; read whole, with their digests, when all together are small enough to go with the
        commit (else none is read). The error reading them, if any, is returned for the caller to report."""
        stored = self._collect_files(started_ns)
        if not stored or sum(f.size for f in stored) > INLINE_MAX:
            return stored, {}, None
        try:
            return *self._read_whole(stored), None
        except OSError as exc:
            return stored, {}, exc

    def _read_whole(self, entries: list[schemas.FileEntry]) -> tuple[list[schemas.FileEntry], dict[str, bytes]]:
        """The files as collected, read whole (exactly the size seen, like a presigned PUT), with their digests."""
        out, data = [], {}
        for entry in entries:
            with open(self.run_dir / entry.name, "rb") as fh:
                body = fh.read(entry.size)
            data[entry.name] = body
            out.append(files.digest_bytes(entry.name, body))
        return out, data

    async def _patiently(self, subject: str, payload: msgspec.Struct, reply_type: type[T]) -> T:
        """A request the run cannot end without: while the artifact service is down or restarting, wait for it.

        Uploads and commits are idempotent (same names, same content), so a retry never stores a file twice.
        """
        return await bus.outlast(
            lambda: bus.request(self.ctx.nc, subject, payload, reply_type, timeout=120), within=FINISH_PATIENCE
        )

    async def sync_loop(self) -> None:
        """While the ranks run, upload what changed under logs/ every few seconds (TensorBoard reads it live).

        Stopped (``stop_sync``, then cancelled) once the ranks are done; it returns only after its PUTs in flight
        have landed, so none of them can overwrite the final upload of the same file with an older, shorter copy.
        The flag, not the cancel alone, ends it: asyncio.wait_for on Python 3.11 (inside nats' request) drops a
        cancel that comes as its reply does, and the loop went on syncing, its run waiting for it forever.
        """
        seen: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(LOG_SYNC_INTERVAL)
            if self._sync_stopped.is_set():
                return
            try:
                changed = await asyncio.to_thread(self._changed_logs, seen)
                if not changed:
                    continue
                urls = await bus.request(
                    self.ctx.nc,
                    subjects.of_node(subjects.AgentApi.UPLOAD_URLS, self.node_id),
                    schemas.UploadUrlsRequest(
                        run_id=self.run_id, node_id=self.node_id, files=changed, allow_multipart=False
                    ),
                    schemas.UploadUrls,
                    timeout=30,
                )
                upload = asyncio.ensure_future(asyncio.to_thread(self._upload, changed, urls, self._sync_stopped))
                try:
                    await asyncio.shield(upload)
                except asyncio.CancelledError:
                    self._sync_stopped.set()
                    await asyncio.wait([upload])  # a thread cannot be cancelled: let its PUT land first
                    raise
            except (CadreError, OSError) as exc:  # the final upload at the end stores everything anyway
                self.log.warning("logs_sync_failed", error=str(exc))

    def stop_sync(self) -> None:
        """The ranks are done: the live sync starts no new request (and its threads no new PUT)."""
        self._sync_stopped.set()

    def _changed_logs(self, seen: dict[str, tuple[int, int]]) -> list[schemas.FileEntry]:
        """What changed under logs/ and the checkpoint folder (a retry restores the latter)."""
        out = []
        checkpoint = self.run_dir / self.spec.checkpoint_folder
        roots = [self.run_dir / "logs", checkpoint]
        held, count = 0, 0
        for path in sorted(p for root in roots if root.is_dir() for p in root.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            st = path.stat()
            if path.is_relative_to(checkpoint):
                held, count = held + st.st_size, count + 1
            name = path.relative_to(self.run_dir).as_posix()
            if seen.get(name) != (st.st_size, st.st_mtime_ns):
                seen[name] = (st.st_size, st.st_mtime_ns)
                out.append(files.digest(path, name))
        peak = self.checkpoint_peak[0] if self.checkpoint_peak else self.checkpoint_limit
        if self.checkpoint_limit and held > peak:
            if self.checkpoint_peak is None:
                self.log.warning("checkpoint_over_limit", bytes=held, files=count, limit=self.checkpoint_limit)
            self.checkpoint_peak = (held, count)
        return out

    def checkpoint_note(self) -> str | None:
        """A line for the run's log when the checkpoint folder outgrew the snapshot limit (synced anyway)."""
        if self.checkpoint_peak is None:
            return None
        held, count = self.checkpoint_peak
        limit = files.human_size(self.checkpoint_limit)
        return (
            f"cadre: the checkpoint folder {self.spec.checkpoint_folder!r} on node {self.node_id} reached "
            f"{files.human_size(held)} in {count} file(s), over the {limit} snapshot limit: "
            "it was synced all the same, and a retry downloads all of it before it starts"
        )

    def _collect_files(self, started_ns: int) -> list[schemas.FileEntry]:
        """Names and sizes of what the run wrote; the digests are computed while the files upload.

        The master node stores everything under outputs/ and logs/; the other nodes only what changed during the
        run, so files that came with the snapshot are not uploaded once per node (and cannot collide).
        """
        since = 0 if self.is_master else started_ns
        entries = []
        for top in (*UPLOAD_DIRS, self.spec.checkpoint_folder):
            root = self.run_dir / top
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    st = path.stat()
                    if st.st_mtime_ns < since:
                        continue
                    name = path.relative_to(self.run_dir).as_posix()
                    entries.append(schemas.FileEntry(name=name, size=st.st_size, md5=""))
        return entries

    def _upload(
        self, entries: list[schemas.FileEntry], urls: schemas.UploadUrls, stopped: threading.Event | None = None
    ) -> dict[str, schemas.MultipartDone]:
        """PUT every file (large ones in parallel parts), each request retried; returns the parts to complete.

        Once ``stopped`` is set, no new request starts (those in flight finish).

        Memory stays bounded: bodies are streamed from disk, never read whole. Retrying a PUT rewrites the same
        key or part, so a retry can neither corrupt nor duplicate an object.
        """

        def put(url: str, path: Path, offset: int, size: int) -> str:
            last_exc: Exception | None = None
            failures, deadline = 0, time.monotonic() + FINISH_PATIENCE
            while True:
                if stopped is not None and stopped.is_set():
                    raise StorageError(f"{path.name}: the live sync stopped")
                try:
                    # Exactly the bytes that were hashed, even if the script is still appending to the file.
                    return files.put_range(url, path, offset, size)
                except ConnectionRefusedError as exc:  # the store is down or restarting: wait for it
                    last_exc = exc
                    if time.monotonic() > deadline:
                        break
                    time.sleep(min(5.0, 0.25 * 2 ** min(failures, 5)))
                    failures += 1
                except OSError as exc:
                    last_exc = exc
                    failures += 1
                    if failures >= UPLOAD_ATTEMPTS:
                        break
                    time.sleep(0.2 * failures)
            raise StorageError(f"{path.name}: {last_exc}")

        jobs: list[tuple[str, int, concurrent.futures.Future[str]]] = []
        with concurrent.futures.ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
            for entry in entries:
                path = self.run_dir / entry.name
                if entry.name in urls.multipart:
                    mp = urls.multipart[entry.name]
                    for number, url in enumerate(mp.urls, start=1):
                        offset = (number - 1) * mp.part_size
                        size = min(mp.part_size, entry.size - offset)
                        jobs.append((entry.name, number, pool.submit(put, url, path, offset, size)))
                else:
                    jobs.append((entry.name, 0, pool.submit(put, urls.urls[entry.name], path, 0, entry.size)))
            etags: dict[str, list[tuple[int, str]]] = {}
            for name, number, fut in jobs:
                etag = fut.result()
                if number:
                    etags.setdefault(name, []).append((number, etag))
        return {
            name: schemas.MultipartDone(upload_id=urls.multipart[name].upload_id, etags=sorted(tags))
            for name, tags in etags.items()
        }
