"""Artifact service: upload/download URLs for run files, verification, driver logs, the run manifest.

Agents never hold object-store credentials: they get presigned URLs from here, upload, then ask this service
to commit. Commit verifies every file (size and MD5 against the stored object), persists each rank's log
stream as ``driver_logs/rank_<n>.log``, writes the manifest and only then ends the run.
"""

from __future__ import annotations

import hashlib
import posixpath

import msgspec
from nats.js import api as js_api
from nats.js.errors import KeyNotFoundError
from nats.js.errors import NotFoundError as JsNotFound
from nats.js.kv import KeyValue

from shared import bus, schemas, subjects
from shared.errors import ConflictError, NotFoundError, ValidationError
from shared.service import Service
from shared.settings import BusSettings, StoreSettings
from shared.states import RunState
from shared.storage import ObjectStore

USER_DIRS = ("outputs/", "logs/")
DRIVER_LOGS = "driver_logs/"


def check_file_name(name: str) -> None:
    norm = posixpath.normpath(name)
    if norm != name or not name.startswith(USER_DIRS) or name.startswith("/") or ".." in name.split("/"):
        raise ValidationError(f"file name {name!r} must be a clean relative path under outputs/ or logs/")


class ArtifactService(Service):
    name = "artifact"

    def __init__(self, bus_settings: BusSettings, store: ObjectStore) -> None:
        super().__init__(bus_settings)
        self.store = store
        self.runs_kv: KeyValue
        self.events: bus.RunEventLog

    @classmethod
    def from_env(cls) -> ArtifactService:
        return cls(BusSettings.from_env(cls.name), ObjectStore(StoreSettings.from_env()))

    async def setup(self) -> None:
        await bus.ensure_topology(self.js)
        await self.store.ensure_bucket()
        self.runs_kv = await self.js.key_value(subjects.RUNS_BUCKET)
        self.events = bus.RunEventLog(self.js)
        await self.endpoint(subjects.AgentApi.SNAPSHOT_URL, schemas.RunRef, self.snapshot_url)
        await self.endpoint(subjects.AgentApi.UPLOAD_URLS, schemas.UploadUrlsRequest, self.upload_urls)
        await self.endpoint(subjects.AgentApi.COMMIT, schemas.CommitRequest, self.commit)
        await self.endpoint(subjects.Api.FILES_LIST, schemas.FilesListRequest, self.list_files)
        await self.endpoint(subjects.Api.FILE_URL, schemas.FileUrlRequest, self.file_url)

    async def _record(self, run_id: str) -> schemas.RunRecord:
        if not subjects.RUN_ID_RE.match(run_id):
            raise ValidationError(f"{run_id!r} is not a run id")
        try:
            entry = await self.runs_kv.get(run_id)
        except KeyNotFoundError:
            raise NotFoundError(f"run {run_id} not found") from None
        assert entry.value is not None
        return schemas.record_decoder.decode(entry.value)

    # --- agent side -------------------------------------------------------------------------------------
    async def snapshot_url(self, req: schemas.RunRef) -> schemas.SnapshotUrl:
        record = await self._record(req.run_id)
        url = await self.store.presign_get(subjects.snapshot_key(record.spec.snapshot.content_hash))
        return schemas.SnapshotUrl(url=url, snapshot=record.spec.snapshot)

    async def upload_urls(self, req: schemas.UploadUrlsRequest) -> schemas.UploadUrls:
        await self._record(req.run_id)
        last, _ = await self.events.last(req.run_id)
        if last is None or last.state is not RunState.FINALIZING:
            raise ConflictError(f"run {req.run_id} is not finalizing; files are uploaded once its processes end")
        urls = {}
        for f in req.files:
            check_file_name(f.name)
            urls[f.name] = await self.store.presign_put(subjects.run_file_key(req.run_id, f.name))
        return schemas.UploadUrls(urls=urls)

    async def commit(self, req: schemas.CommitRequest) -> schemas.RunSummary:
        record = await self._record(req.run_id)
        events = await self.events.history(req.run_id)
        finalizing = next((e for e in reversed(events) if isinstance(e, schemas.Finalizing)), None)
        last = events[-1] if events else None
        if last is None or finalizing is None or last.state is not RunState.FINALIZING:
            if last is not None and last.state.is_terminal():
                return self._summary(record, last)  # a retried commit: already done
            raise ConflictError(f"run {req.run_id} is not finalizing")
        problems = []
        for f in req.files:
            check_file_name(f.name)
            stat = await self.store.stat(subjects.run_file_key(req.run_id, f.name))
            if stat is None:
                problems.append(f"{f.name} is missing")
            elif stat[0] != f.size or (stat[1] and "-" not in stat[1] and stat[1] != f.md5):
                problems.append(f"{f.name} does not match (size {stat[0]} vs {f.size})")
        files = list(req.files) + await self._persist_logs(req.run_id, finalizing.log_lines)
        manifest = schemas.FilesList(files=sorted(files, key=lambda f: f.name))
        await self.store.put_bytes(
            subjects.run_manifest_key(req.run_id), schemas.encode(manifest), content_type="application/json"
        )
        if problems:
            end: schemas.RunEvent = bus.make_event(
                schemas.Failed,
                req.run_id,
                RunState.FAILED,
                error=schemas.ErrorInfo(
                    code="upload_failed", message="run files failed verification: " + "; ".join(problems)
                ),
            )
        elif finalizing.outcome == "succeeded":
            end = bus.make_event(
                schemas.Completed,
                req.run_id,
                RunState.COMPLETED,
                file_count=len(files),
                total_bytes=sum(f.size for f in files),
            )
        elif finalizing.outcome == "canceled":
            end = bus.make_event(schemas.Canceled, req.run_id, RunState.CANCELED)
        else:
            error = finalizing.error or schemas.ErrorInfo(code="failed", message="the run failed")
            end = bus.make_event(schemas.Failed, req.run_id, RunState.FAILED, error=error)

        def build(current: schemas.RunEvent | None) -> schemas.RunEvent | None:
            return None if current is None or current.state.is_terminal() else end

        await self.events.append(req.run_id, build)
        final, _ = await self.events.last(req.run_id)
        assert final is not None
        self.log.info("run_committed", run_id=req.run_id, files=len(files), state=final.state.value)
        return self._summary(record, final)

    @staticmethod
    def _summary(record: schemas.RunRecord, ev: schemas.RunEvent) -> schemas.RunSummary:
        return schemas.RunSummary(run_id=record.run_id, experiment=record.spec.experiment, state=ev.state, at=ev.at)

    async def _persist_logs(self, run_id: str, line_counts: dict[int, int]) -> list[schemas.FileEntry]:
        """Copy each rank's log stream into one object, so logs outlive the stream's retention."""
        entries = []
        for rank, count in sorted(line_counts.items()):
            if count <= 0:
                continue
            subject = subjects.run_logs(run_id, rank)
            try:
                last = await self.js.get_last_msg(subjects.LOGS_STREAM, subject)
            except JsNotFound:
                continue
            chunks: list[str] = []
            sub = await self.js.subscribe(
                subject,
                stream=subjects.LOGS_STREAM,
                ordered_consumer=True,
                deliver_policy=js_api.DeliverPolicy.ALL,
            )
            try:
                while True:
                    msg = await sub.next_msg(timeout=10)
                    batch = schemas.log_batch_decoder.decode(msg.data)
                    chunks.extend(line.text + "\n" for line in batch.lines)
                    if msg.metadata.sequence.stream >= (last.seq or 0):
                        break
            finally:
                await sub.unsubscribe()
            data = "".join(chunks).encode()
            name = f"{DRIVER_LOGS}rank_{rank}.log"
            await self.store.put_bytes(subjects.run_file_key(run_id, name), data, content_type="text/plain")
            entries.append(
                schemas.FileEntry(name=name, size=len(data), md5=hashlib.md5(data, usedforsecurity=False).hexdigest())
            )
        return entries

    # --- client side ------------------------------------------------------------------------------------
    async def list_files(self, req: schemas.FilesListRequest) -> schemas.FilesList:
        await self._record(req.run_id)
        try:
            raw = await self.store.get_bytes(subjects.run_manifest_key(req.run_id))
            files = msgspec.json.decode(raw, type=schemas.FilesList).files
        except NotFoundError:
            # No manifest yet (the run is still going): list what has been stored so far.
            prefix = subjects.run_file_prefix(req.run_id)
            files = [
                schemas.FileEntry(name=key[len(prefix) :], size=size, md5=etag)
                for key, size, etag in await self.store.list(prefix)
            ]
        return schemas.FilesList(files=[f for f in files if f.name.startswith(req.prefix)])

    async def file_url(self, req: schemas.FileUrlRequest) -> schemas.FileUrl:
        await self._record(req.run_id)
        key = subjects.run_file_key(req.run_id, req.name)
        stat = await self.store.stat(key)
        if stat is None:
            names = [f.name for f in (await self.list_files(schemas.FilesListRequest(run_id=req.run_id))).files]
            raise NotFoundError(
                f"run {req.run_id} has no file {req.name!r}; it has: {', '.join(names[:20]) or 'no files yet'}"
            )
        return schemas.FileUrl(url=await self.store.presign_get(key), size=stat[0], md5=stat[1])
