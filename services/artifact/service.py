"""Artifact service: upload/download URLs for run files, verification, driver logs, the run manifest.

Agents never hold object-store credentials: they get presigned URLs from here, upload, then ask this service
to commit. Commit verifies every file (size and MD5 against the stored object), persists each rank's log
stream as ``logs/cadre/rank_<n>.log``, writes the manifest and only then ends the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.js import api as js_api
from nats.js.errors import APIError
from nats.js.errors import NotFoundError as JsNotFound
from nats.js.kv import KeyValue

from services.artifact.datasets import Datasets
from shared import bus, files, lifecycle, runs, schemas, subjects
from shared.errors import CadreError, ConflictError, NotFoundError, ValidationError
from shared.service import Service
from shared.settings import BusSettings, StoreSettings
from shared.states import PLACED_STATES, Cause, RunState
from shared.storage import ObjectStore

USER_DIRS = ("outputs/", "logs/")
LOG_HELD_MAX = 1 << 20  # a rank's log up to this size is stored side by side with the manifest
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bigger files go up in parallel parts
PART_SIZE = 16 * 1024 * 1024
MAX_PARTS = 10_000  # S3's limit: parts grow for very large files
DRIVER_LOGS = "logs/cadre/"  # each rank's stdout/stderr, stored from the log stream
HISTORIES_KEPT = 2000  # runs whose events this service remembers having read (a few kB each)
FEW_BATCHES = 16  # a rank log of up to this many stored batches is read without a consumer


def check_file_name(name: str, spec: schemas.RunSpec) -> None:
    files.check_relative(name)
    if not name.startswith((*USER_DIRS, f"{spec.checkpoint_folder}/")):
        raise ValidationError(f"file name {name!r} must be under outputs/, logs/ or {spec.checkpoint_folder}/")


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    outcome: schemas.Outcome
    exit_codes: dict[int, int]
    log_lines: dict[int, int]
    error: schemas.ErrorInfo | None = None
    warnings: list[str] = []


def _same(entry: schemas.FileEntry, stored: schemas.FileEntry) -> bool:
    # A multipart ETag ('<md5 of md5s>-<parts>') says nothing of the content: the size alone decides then.
    return entry.size == stored.size and (not stored.md5 or "-" in stored.md5 or entry.md5 == stored.md5)


def in_doubt(committed: list[schemas.NodeCommitted]) -> set[str]:
    """Names whose stored copy must be looked at once every node has committed: several nodes wrote them
    differently, or a node found its copy replaced when it committed."""
    copies: dict[str, set[tuple[int, str]]] = {}
    for ev in committed:
        for f in ev.files:
            copies.setdefault(f.name, set()).add((f.size, f.md5))
    return {n for n, c in copies.items() if len(c) > 1} | {o.name for ev in committed for o in ev.overwritten}


def resolve(
    committed: list[schemas.NodeCommitted], held: dict[str, schemas.FileEntry | None]
) -> tuple[dict[str, schemas.FileEntry], list[str], list[str]]:
    """(the entry of every stored file, warnings, problems), given what the store holds of the names in doubt.

    A name several nodes wrote differently keeps the copy of whichever PUT came last (the run says whose); a copy
    in doubt that matches no node's is an upload gone wrong."""
    files: dict[str, schemas.FileEntry] = {}
    writers: dict[str, list[tuple[str, schemas.FileEntry]]] = {}
    for ev in committed:
        for f in ev.files:
            files[f.name] = f
            writers.setdefault(f.name, []).append((ev.node_id, f))
    warnings, problems = [], []
    for name in sorted(held):
        copy = held[name]
        match = [(n, f) for n, f in writers.get(name, []) if copy is not None and _same(f, copy)]
        if not match:
            nodes = ", ".join(sorted({n for n, _ in writers.get(name, [])}))
            problems.append(f"files from {nodes} failed verification: {name} does not match what {nodes} uploaded")
            continue
        files[name] = match[-1][1]
        if len({(f.size, f.md5) for _, f in writers[name]}) > 1:
            warnings.append(
                f"{name} differs between nodes {', '.join(sorted({n for n, _ in writers[name]}))} (each wrote its "
                f"own, or changed the snapshot's copy); the run keeps {match[-1][0]}'s: write a shared file from "
                "one rank only"
            )
    return files, warnings, problems


def decide(
    events: list[schemas.RunEvent], lost: list[str], held: dict[str, schemas.FileEntry | None] | None = None
) -> Decision:
    """The run's outcome from every node's report: a cancel wins, then a lost node, then the first real failure
    (the node whose rank failed first, not the nodes stopped because of it), then upload problems. ``held``:
    what the store holds of the names in doubt (``in_doubt``; None for a missing object)."""
    finished = {ev.node_id: ev for ev in events if isinstance(ev, schemas.NodeFinished)}
    exit_codes = {r: c for ev in finished.values() for r, c in ev.exit_codes.items()}
    log_lines = {r: n for ev in finished.values() for r, n in ev.log_lines.items()}

    _, warnings, problems = resolve([ev for ev in events if isinstance(ev, schemas.NodeCommitted)], held or {})

    def result(outcome: schemas.Outcome, error: schemas.ErrorInfo | None = None) -> Decision:
        return Decision(outcome=outcome, exit_codes=exit_codes, log_lines=log_lines, error=error, warnings=warnings)

    if any(isinstance(ev, schemas.CancelRequested) for ev in events):
        return result("canceled")
    if lost:
        message = f"node {', '.join(sorted(lost))} left or stopped heartbeating (node lost)"
        return result("failed", schemas.ErrorInfo(code=Cause.NODE_LOST, message=message))
    causes = [ev for ev in finished.values() if ev.error is not None and not ev.aborted]
    if causes:
        first_bad = [ev.node_id for ev in events if isinstance(ev, schemas.RankExited) and ev.exit_code != 0]
        causes.sort(key=lambda ev: first_bad.index(ev.node_id) if ev.node_id in first_bad else len(first_bad))
        return result("failed", causes[0].error)
    aborted = [ev for ev in finished.values() if ev.error is not None]
    if aborted:
        return result("failed", aborted[0].error)
    upload = [ev.error for ev in events if isinstance(ev, schemas.NodeCommitted) and ev.error is not None]
    if upload:
        return result("failed", upload[0])
    if problems:
        return result("failed", schemas.ErrorInfo(code=Cause.UPLOAD_FAILED, message="; ".join(problems)))
    return result("succeeded")


class ArtifactService(Service):
    name = "artifact"

    def __init__(self, bus_settings: BusSettings, store: ObjectStore) -> None:
        super().__init__(bus_settings)
        self.store = store
        self.runs_kv: KeyValue
        self.events: bus.RunEventLog
        self._locks: dict[str, _RunLock] = {}
        # Run histories read before, with the stream sequence read up to: events never change once stored, so a
        # later read asks only for what came after (the last commit of a run re-read it all, one get an event).
        self._read: OrderedDict[str, tuple[list[schemas.RunEvent], int]] = OrderedDict()

    @classmethod
    def from_env(cls) -> ArtifactService:
        return cls(BusSettings.from_env(cls.name), ObjectStore(StoreSettings.from_env()))

    async def setup(self) -> None:
        await bus.ensure_topology(self.js)
        await self.store.ensure_bucket()
        self.runs_kv = await bus.key_value(self.js, subjects.RUNS_BUCKET)
        self.events = bus.RunEventLog(self.js)
        datasets = Datasets(self.js, await bus.key_value(self.js, subjects.DATASETS_BUCKET), self.runs_kv, self.store)
        await self.endpoint(subjects.Api.DATASET_UPLOAD, schemas.DatasetUploadRequest, datasets.upload_urls)
        await self.endpoint(subjects.Api.DATASET_REGISTER, schemas.DatasetRegisterRequest, datasets.register)
        await self.endpoint(subjects.Api.DATASET_GET, schemas.DatasetRef, datasets.get)
        await self.endpoint(subjects.Api.DATASET_LIST, schemas.Empty, datasets.list)
        self.datasets = datasets
        await self.endpoint(
            subjects.any_node(subjects.AgentApi.DATASET_URLS), schemas.DatasetUrlsRequest, self.dataset_urls,
            with_subject=True,
        )  # fmt: skip
        psub = await self.js.pull_subscribe(
            subjects.all_run_events(),
            durable="artifact",
            stream=subjects.EVENTS_STREAM,
            config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.NEW, ack_wait=300),
        )
        self.spawn(self._watch_run_events(psub), "watch_run_events")
        # A node asks as itself: only it may publish on its own subject, which names it.
        agent_api = [
            (subjects.AgentApi.SNAPSHOT_URL, schemas.RunRef, self.snapshot_url),
            (subjects.AgentApi.UPLOAD_URLS, schemas.UploadUrlsRequest, self.upload_urls),
            (subjects.AgentApi.COMMIT, schemas.CommitRequest, self.commit),
        ]
        for api, request_type, handler in agent_api:
            await self.endpoint(subjects.any_node(api), request_type, handler, with_subject=True)
        await self.endpoint(subjects.Api.FILES_LIST, schemas.FilesListRequest, self.list_files)
        await self.endpoint(subjects.Api.FILE_URL, schemas.FileUrlRequest, self.file_url)

    async def snapshot_url(self, req: schemas.RunRef, subject: str) -> schemas.SnapshotUrl:
        """What a node fetches to start the run: the snapshot, and for a retried run the checkpoint files that
        the attempts before it synced (restored into the next attempt's working directory). Only for a node the
        run is placed on: a run's code and checkpoints are its own."""
        record = await bus.get_record(self.runs_kv, req.run_id)
        last = await self._placed_on(req.run_id, subjects.node_of(subject), what="fetched")
        url = await self.store.presign_get(subjects.snapshot_key(record.spec.snapshot.content_hash))
        checkpoint: dict[str, str] = {}
        if lifecycle.attempt_of(last) > 1:
            prefix = subjects.run_file_prefix(req.run_id)
            for key, _size, _etag in await self.store.list(f"{prefix}{record.spec.checkpoint_folder}/"):
                checkpoint[key[len(prefix) :]] = await self.store.presign_get(key)
        return schemas.SnapshotUrl(url=url, snapshot=record.spec.snapshot, checkpoint=checkpoint)

    async def _history(self, run_id: str) -> list[schemas.RunEvent]:
        """Every event of the run, as ``RunEventLog.history`` reads them, the ones read before taken from memory."""
        events, seq = self._read.pop(run_id, ([], 0))
        events = list(events)
        async for raw in bus.messages_after(self.js, subjects.EVENTS_STREAM, subjects.run_events(run_id), seq):
            events.append(schemas.run_event_decoder.decode(raw.data))
            seq = raw.seq
        self._remember(run_id, events, seq)
        return events

    def _remember(self, run_id: str, events: list[schemas.RunEvent], seq: int) -> None:
        """The run's history up to stream sequence ``seq``, as the most recently used of at most HISTORIES_KEPT."""
        self._read[run_id] = (events, seq)
        self._read.move_to_end(run_id)
        while len(self._read) > HISTORIES_KEPT:
            self._read.popitem(last=False)

    def _follow(self, event: schemas.RunEvent, msg: Any) -> None:
        """Extend the run's remembered history with an event the consumer brought, when it is the very one stored
        next: every append says which message it must follow on the run's subject (JetStream refused it
        otherwise), so a chain that holds is the whole history, however the consumer's messages are shared out
        among instances or redelivered. A later read then asks only for what came after (one request, not one per
        event). An event that does not follow on is left to that read."""
        after = (msg.headers or {}).get(bus.EXPECTED_LAST_SUBJECT_SEQ)
        run_id = event.run_id
        events, seq = self._read.get(run_id, ([], 0))
        if after is None or int(after) != seq:
            return
        if event.state.is_terminal():
            self._read.pop(run_id, None)  # nothing more to read of it here
            return
        self._remember(run_id, [*events, event], msg.metadata.sequence.stream)

    async def _append(self, run_id: str, build: bus.EventBuilder) -> schemas.RunEvent | None:
        """Append with the history read before as the known last event (no read of the subject first); the event,
        stored right after it, extends that history."""
        events, seq = self._read.get(run_id, ([], 0))
        stored = await self.events.append_at(run_id, build, known=(events[-1], seq) if events else None)
        if stored is None:
            return None
        event, after, at = stored
        if events and after == seq and self._read.get(run_id, (None, 0))[1] == seq:
            self._read[run_id] = ([*events, event], at)
        return event

    @staticmethod
    def _placement_nodes(history: list[schemas.RunEvent]) -> set[str]:
        for ev in reversed(history):
            if isinstance(ev, schemas.Assigned):
                return {slot.node_id for slot in ev.placement}
        return set()

    async def _placed_on(
        self,
        run_id: str,
        node_id: str,
        attempt: int | None = None,
        what: str = "uploaded",
        history: list[schemas.RunEvent] | None = None,
    ) -> schemas.RunEvent:
        """The run's last event; ConflictError unless ``node_id`` holds ranks of the run, which is placed and
        (given) at ``attempt``. ``what`` the node may do with the run's files then: they are no longer ``what``.
        ``history``: the run's, read just now (else it is read)."""
        history = history if history is not None else await self._history(run_id)
        last = history[-1] if history else None
        if last is None or last.state not in PLACED_STATES:
            state = last.state.value if last else "unknown"
            raise ConflictError(f"run {run_id} is {state}: its files can no longer be {what}")
        if attempt is not None and lifecycle.attempt_of(last) != attempt:
            raise ConflictError(f"run {run_id} moved on from attempt {attempt}: its files can no longer be {what}")
        if node_id not in self._placement_nodes(history):
            self.log.warning("node_refused", run_id=run_id, node_id=node_id, files=what)
            raise ConflictError(f"node {node_id} has no ranks of run {run_id}")
        return last

    @staticmethod
    def _as_caller(req_node: str, subject: str) -> str:
        """The node a request came from: the one its subject names (only that node may publish there). A request
        that names another node in its body is refused, not trusted."""
        node_id = subjects.node_of(subject)
        if req_node != node_id:
            raise ValidationError(f"node {node_id} asked on behalf of node {req_node}: a node asks only as itself")
        return node_id

    async def dataset_urls(self, req: schemas.DatasetUrlsRequest, subject: str) -> schemas.DatasetFiles:
        """Download URLs of a dataset the run reads, for a node the run is placed on."""
        await self._placed_on(req.run_id, subjects.node_of(subject), what="fetched")
        return await self.datasets.urls_for_run(req)

    async def upload_urls(self, req: schemas.UploadUrlsRequest, subject: str) -> schemas.UploadUrls:
        record = await bus.get_record(self.runs_kv, req.run_id)
        await self._placed_on(req.run_id, self._as_caller(req.node_id, subject))
        urls, multipart = {}, {}
        for f in req.files:
            check_file_name(f.name, record.spec)
            key = subjects.run_file_key(req.run_id, f.name)
            if req.allow_multipart and f.size > MULTIPART_THRESHOLD:
                part_size = max(PART_SIZE, -(-f.size // MAX_PARTS))
                count = -(-f.size // part_size)
                upload_id = await self.store.start_multipart(key)
                part_urls = [await self.store.presign_part(key, upload_id, n) for n in range(1, count + 1)]
                multipart[f.name] = schemas.MultipartUpload(upload_id=upload_id, part_size=part_size, urls=part_urls)
            else:
                urls[f.name] = await self.store.presign_put(key)
        return schemas.UploadUrls(urls=urls, multipart=multipart)

    async def commit(self, req: schemas.CommitRequest, subject: str) -> schemas.RunSummary:
        """Verify one node's files and record them; the last node's commit finalizes the run."""
        self._as_caller(req.node_id, subject)
        record, history = await asyncio.gather(bus.get_record(self.runs_kv, req.run_id), self._history(req.run_id))
        problems, overwritten = [], []
        for name, done in req.parts.items():
            check_file_name(name, record.spec)
            try:
                await self.store.complete_multipart(subjects.run_file_key(req.run_id, name), done.upload_id, done.etags)
            except (CadreError, ValueError) as exc:
                # A retried commit finds the upload completed already: the stat below decides.
                self.log.info("multipart_complete_skipped", run_id=req.run_id, file=name, error=str(exc))
        for f in req.files:
            check_file_name(f.name, record.spec)
        if req.inline:
            await self._store_inline(req, history)
        # Stored by the node through presigned URLs: look at each (side by side). An inline file was stored just
        # now by this service; another node's copy of the name, if any, is settled once all have committed.
        presigned = [f for f in req.files if f.name not in req.inline]
        stats = await asyncio.gather(*(self.store.stat(subjects.run_file_key(req.run_id, f.name)) for f in presigned))
        for f, stat in zip(presigned, stats, strict=True):
            if stat is None:
                problems.append(f"{f.name} is missing")
            elif not _same(f, stored := schemas.FileEntry(name=f.name, size=stat[0], md5=stat[1] or "")):
                overwritten.append(stored)  # by another node, or broken: finalize tells, once all have committed
        error = req.error
        if problems:
            error = schemas.ErrorInfo(
                code=Cause.UPLOAD_FAILED,
                message=f"files from {req.node_id} failed verification: " + "; ".join(problems),
            )

        # Not once decided, nor for an attempt the run has moved on from.
        build = lifecycle.append_if(
            lifecycle.undecided(req.attempt), schemas.NodeCommitted, req.run_id, node_id=req.node_id,
            files=list(req.files), error=error, overwritten=overwritten,
        )  # fmt: skip
        await self._append(req.run_id, build)  # (the history read above saves it a read of the subject)
        final = await self.finalize(req.run_id)
        if final is None:  # not ended here: what it is now
            final, _ = await self.events.last(req.run_id)
        assert final is not None
        return self._summary(record, final)

    async def _store_inline(self, req: schemas.CommitRequest, history: list[schemas.RunEvent]) -> None:
        """Store the files a node sent whole with its commit, checked against their entries first. Not for a run
        that is decided or moved on to another attempt (a commit retried after its reply was lost): the files
        are stored already, and a stale attempt must not overwrite a newer one's. Each is one of ``files``,
        whose names the commit checked; ``history`` is the run's, read by the commit."""
        entries = {f.name: f for f in req.files}
        for name, data in req.inline.items():
            entry = entries.get(name)
            if entry is None or not _same(entry, files.digest_bytes(name, data)):
                raise ValidationError(f"the inline file {name} does not match its entry in files")
        try:
            await self._placed_on(req.run_id, req.node_id, req.attempt, history=history)
        except ConflictError as exc:
            self.log.info("inline_files_not_stored", run_id=req.run_id, node_id=req.node_id, reason=str(exc))
            return
        await asyncio.gather(
            *(self.store.put_bytes(subjects.run_file_key(req.run_id, n), d) for n, d in req.inline.items())
        )

    @contextlib.asynccontextmanager
    async def _exclusive(self, run_id: str) -> AsyncIterator[None]:
        """One finalization of a run at a time in this process; the run's lock goes once nobody holds or waits
        for it (whichever way they leave: a return, a retry, an error)."""
        entry = self._locks.get(run_id)
        if entry is None:
            entry = self._locks[run_id] = _RunLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users and self._locks.get(run_id) is entry:
                del self._locks[run_id]

    async def finalize(self, run_id: str) -> schemas.RunEvent | None:
        """Once every node of the run has committed (or was lost): decide the outcome, store logs, end the run.
        Returns the run's end when it ended here."""
        async with self._exclusive(run_id):
            events = lifecycle.current_attempt(await self._history(run_id))  # an earlier attempt's nodes are done
            placement = next((ev.placement for ev in reversed(events) if isinstance(ev, schemas.Assigned)), [])
            nodes = {s.node_id for s in placement}
            committed = {ev.node_id for ev in events if isinstance(ev, schemas.NodeCommitted)}
            lost = [ev.node_id for ev in events if isinstance(ev, schemas.NodeLost)]
            if not nodes or not nodes <= committed | set(lost):
                return None
            held = await self._held(run_id, events)
            decided = decide(events, lost, held)
            if decided.outcome == "failed" and await self._retry(
                run_id, lifecycle.attempt_of(events[-1]), decided, placement
            ):
                return None

            to_finalizing = lifecycle.append_if(
                lifecycle.undecided(), schemas.Finalizing, run_id, outcome=decided.outcome,
                exit_codes=decided.exit_codes, log_lines=decided.log_lines, error=decided.error,
                warnings=decided.warnings,
            )  # fmt: skip

            # Every node has committed or is lost: the logs are what they will be, whatever is decided. They are
            # read while the decision is stored.
            reading = asyncio.ensure_future(self._read_logs(run_id, decided.log_lines))
            try:
                finalizing = await self._append(run_id, to_finalizing)
            except BaseException:
                reading.cancel()
                raise
            if isinstance(finalizing, schemas.Finalizing):
                return await self._complete(run_id, finalizing, events, held, reading)
            reading.cancel()
            return None

    async def _held(self, run_id: str, events: list[schemas.RunEvent]) -> dict[str, schemas.FileEntry | None]:
        """What the store holds of the run's names in doubt (usually none: no request then)."""
        names = sorted(in_doubt([ev for ev in events if isinstance(ev, schemas.NodeCommitted)]))
        stats = await asyncio.gather(*(self.store.stat(subjects.run_file_key(run_id, n)) for n in names))
        return {
            n: None if st is None else schemas.FileEntry(name=n, size=st[0], md5=st[1] or "")
            for n, st in zip(names, stats, strict=True)
        }

    async def _retry(self, run_id: str, attempt: int, decided: Decision, placement: list[schemas.RankSlot]) -> bool:
        """A failed attempt with retries left and a cause the run retries is queued again, after a backoff, as the
        next attempt (it may land on other nodes); the cause and the nodes stay in its history."""
        record = await bus.get_record(self.runs_kv, run_id)
        cause = runs.retry_cause(decided.error, decided.exit_codes)
        if not runs.should_retry(record.spec, cause, attempt):
            return False
        assert decided.error is not None and cause is not None
        delay = runs.retry_delay(attempt)
        lines = {slot.rank: await self._close_log(run_id, slot.rank, attempt + 1) for slot in placement}

        to_retry = lifecycle.append_if(
            lifecycle.undecided(attempt), schemas.Retried, run_id, attempt=attempt + 1, cause=cause,
            error=decided.error, nodes=sorted({s.node_id for s in placement}), not_before=time.time() + delay,
            log_lines=lines,
        )  # fmt: skip

        if await self.events.append(run_id, to_retry) is None:
            return False
        self.log.warning(
            "run_retried", run_id=run_id, attempt=attempt + 1, of=record.spec.max_retries + 1, cause=cause, delay=delay
        )
        return True

    async def _close_log(self, run_id: str, rank: int, attempt: int) -> int:
        """Close a rank's log subject to the attempt that failed: an empty batch of the next ``attempt``, written
        only if no line came in since the count was read (readers drop the old attempt's batches after it).
        Returns the rank's line count: where the next attempt numbers on."""
        subject = subjects.run_logs(run_id, rank)
        for _ in range(50):
            try:
                last = await self.js.get_last_msg(subjects.LOGS_STREAM, subject)
                batch = schemas.log_batch_decoder.decode(last.data or b"")
                count, seq = batch.first_line + len(batch.lines), last.seq or 0
            except JsNotFound:
                count, seq = 0, 0
            fence = schemas.LogBatch(run_id=run_id, rank=rank, node_id="", first_line=count, lines=[], attempt=attempt)
            try:
                await self.js.publish(
                    subject, schemas.encode(fence), headers={"Nats-Expected-Last-Subject-Sequence": str(seq)}
                )
                return count
            except APIError as exc:
                if exc.err_code not in bus.WRONG_LAST_SEQUENCE:
                    raise
        raise ConflictError(f"run {run_id}: rank {rank}'s log would not settle; try again")

    async def _complete(
        self,
        run_id: str,
        decided: schemas.Finalizing,
        events: list[schemas.RunEvent] | None = None,
        held: dict[str, schemas.FileEntry | None] | None = None,
        reading: asyncio.Future[list[tuple[schemas.FileEntry, bytes | None]]] | None = None,
    ) -> schemas.RunEvent | None:
        """Store the logs and the manifest, then end the run. Idempotent: rerun after a crash, it writes the same.
        Returns the end it stored (None: the run had ended already). ``reading``: the logs, being read already."""
        events = lifecycle.current_attempt(events if events is not None else await self._history(run_id))
        held = held if held is not None else await self._held(run_id, events)
        committed = [ev for ev in events if isinstance(ev, schemas.NodeCommitted)]
        stored = list(resolve(committed, held)[0].values())  # a name several nodes wrote: the copy the store holds
        logs = await (reading if reading is not None else self._read_logs(run_id, decided.log_lines))
        stored += [entry for entry, _ in logs]
        unique = {f.name: f for f in stored}
        manifest = schemas.FilesList(
            files=sorted(unique.values(), key=lambda f: f.name), partial=decided.outcome != "succeeded"
        )
        # The logs and the manifest side by side: the run ends only once all are stored, and a rerun after a crash
        # stores the same again.
        await asyncio.gather(
            *(self.store.put_bytes(subjects.run_file_key(run_id, entry.name), data, content_type="text/plain")
              for entry, data in logs if data is not None),
            self.store.put_bytes(subjects.run_manifest_key(run_id), schemas.encode(manifest),
                                 content_type="application/json"),
        )  # fmt: skip
        if decided.outcome == "succeeded":
            end: schemas.RunEvent = lifecycle.event(
                schemas.Completed,
                run_id,
                file_count=len(manifest.files),
                total_bytes=sum(f.size for f in manifest.files),
            )
        elif decided.outcome == "canceled":
            end = lifecycle.event(schemas.Canceled, run_id)
        else:
            error = decided.error or schemas.ErrorInfo(
                code=Cause.INTERNAL, message="the run failed, and no node said why"
            )
            end = lifecycle.event(schemas.Failed, run_id, error=error)

        def to_end(current: schemas.RunEvent | None) -> schemas.RunEvent | None:
            return None if current is None or current.state.is_terminal() else end

        ended = await self._append(run_id, to_end)
        self._read.pop(run_id, None)  # ended: nothing more to read of it here
        self.log.info("run_finalized", run_id=run_id, files=len(manifest.files), state=end.state.value)
        return ended

    async def _watch_run_events(self, psub) -> None:
        """Finishing work the commit path cannot do alone.

        A lost node never commits: when it was the last one missing, its loss is what finalizes the run. And a
        ``Finalizing`` event is acknowledged only once the run has ended, so if this service dies half-way
        through storing logs and the manifest, the redelivered event completes the run after the restart.
        """

        async def handle(msg) -> None:
            event = schemas.run_event_decoder.decode(msg.data)
            self._follow(event, msg)
            if isinstance(event, schemas.NodeLost):
                await self.finalize(event.run_id)
            elif isinstance(event, schemas.Finalizing):
                async with self._exclusive(event.run_id):  # a commit in this process may be finishing it now
                    last, _ = await self.events.last(event.run_id)
                    if last is not None and last.state is RunState.FINALIZING:
                        await self._complete(event.run_id, event)
                # Every node has committed or is lost: an upload still open under the run is one that failed or
                # whose agent died half-way, and its parts would sit in the store, unlisted, forever. Looked for
                # here, once the run has ended (its end does not wait for the listing), before the event is acked.
                await self._abort_incomplete(event.run_id)

        await bus.consume(psub, handle, batch=256)  # every run event passes here: fewer, bigger fetches

    @staticmethod
    def _summary(record: schemas.RunRecord, ev: schemas.RunEvent) -> schemas.RunSummary:
        return schemas.RunSummary(run_id=record.run_id, experiment=record.spec.experiment, state=ev.state, at=ev.at)

    async def _abort_incomplete(self, run_id: str) -> None:
        try:
            if aborted := await self.store.abort_incomplete(subjects.run_file_prefix(run_id)):
                self.log.info("incomplete_uploads_aborted", run_id=run_id, count=aborted)
        except CadreError as exc:
            self.log.warning("incomplete_uploads_not_aborted", run_id=run_id, error=str(exc))

    async def _read_logs(
        self, run_id: str, line_counts: dict[int, int]
    ) -> list[tuple[schemas.FileEntry, bytes | None]]:
        """Each rank's log stream as one object (``logs/cadre/rank_<n>.log``), so logs outlive the stream's
        retention (the ranks four at a time: a run's end waits for the slowest, not for the sum). A log of up to
        LOG_HELD_MAX comes back with its text, for the caller to store beside the manifest; a longer one is
        stored here at once (None), so memory stays bounded."""
        room = asyncio.Semaphore(4)
        ranks = [rank for rank, count in sorted(line_counts.items()) if count > 0]
        if not ranks:
            return []
        # How many batches each rank's subject holds (one request for all): a few are read one by one, with no
        # consumer to create and delete; many, with a replay consumer.
        info = await self.js.stream_info(subjects.LOGS_STREAM, subjects_filter=subjects.run_logs_all_ranks(run_id))
        batches = info.state.subjects or {}

        async def one(rank: int) -> tuple[schemas.FileEntry, bytes | None] | None:
            async with room:
                log = await self._read_log(run_id, rank, batches.get(subjects.run_logs(run_id, rank), 0))
                if log is None:
                    return None
                name, data = log
                entry = files.digest_bytes(name, data)
                if len(data) <= LOG_HELD_MAX:
                    return entry, data
                await self.store.put_bytes(subjects.run_file_key(run_id, name), data, content_type="text/plain")
                return entry, None

        return [log for log in await asyncio.gather(*(one(rank) for rank in ranks)) if log is not None]

    async def _read_log(self, run_id: str, rank: int, batches: int) -> tuple[str, bytes] | None:
        """One rank's log stream: its object's name and text (None: it never printed)."""
        subject = subjects.run_logs(run_id, rank)
        if batches <= 0:
            return None
        if batches <= FEW_BATCHES:
            msgs: AsyncIterator[Any] = bus.messages_after(self.js, subjects.LOGS_STREAM, subject, 0)
        else:
            try:
                last = await self.js.get_last_msg(subjects.LOGS_STREAM, subject)
            except JsNotFound:
                return None
            msgs = bus.replay(self.js, subjects.LOGS_STREAM, subject, last.seq or 0)
        chunks: list[str] = []
        cursor = runs.LogCursor()
        read = 0
        async for msg in msgs:
            lines = cursor.take(schemas.log_batch_decoder.decode(msg.data))
            chunks.extend(line.text + "\n" for line in lines)
            read += 1
            if read == batches and batches <= FEW_BATCHES:  # all it held when counted: no request to learn that
                break
        return f"{DRIVER_LOGS}rank_{rank}.log", "".join(chunks).encode()

    # --- client side ------------------------------------------------------------------------------------
    async def list_files(self, req: schemas.FilesListRequest) -> schemas.FilesList:
        await bus.get_record(self.runs_kv, req.run_id)
        try:
            raw = await self.store.get_bytes(subjects.run_manifest_key(req.run_id))
            entries = msgspec.json.decode(raw, type=schemas.FilesList).files
        except NotFoundError:
            # No manifest yet (the run is still going): list what has been stored so far.
            prefix = subjects.run_file_prefix(req.run_id)
            entries = [
                schemas.FileEntry(name=key[len(prefix) :], size=size, md5=etag)
                for key, size, etag in await self.store.list(prefix)
            ]
        return schemas.FilesList(files=[f for f in entries if f.name.startswith(req.prefix)])

    async def file_url(self, req: schemas.FileUrlRequest) -> schemas.FileUrl:
        await bus.get_record(self.runs_kv, req.run_id)
        key = subjects.run_file_key(req.run_id, req.name)
        stat = await self.store.stat(key)
        if stat is None:
            names = [f.name for f in (await self.list_files(schemas.FilesListRequest(run_id=req.run_id))).files]
            raise NotFoundError(
                f"run {req.run_id} has no file {req.name!r}; it has: {', '.join(names[:20]) or 'no files yet'}"
            )
        sha256 = ""
        try:
            raw = await self.store.get_bytes(subjects.run_manifest_key(req.run_id))
            listed = msgspec.json.decode(raw, type=schemas.FilesList).files
            sha256 = next((f.sha256 for f in listed if f.name == req.name), "")
        except NotFoundError:
            pass  # still running: no manifest yet
        return schemas.FileUrl(url=await self.store.presign_get(key), size=stat[0], md5=stat[1], sha256=sha256)


class _RunLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holding it or waiting for it
