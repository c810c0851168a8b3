"""One run on this node: fetch the snapshot, start the node's ranks, watch them, ship logs and files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from services.node_agent.logship import LogShipper
from services.node_agent.runtime import ProcessHandle, ProcessSpec, Runtime
from shared import bus, schemas, subjects
from shared.errors import CadreError, ConflictError, StorageError
from shared.states import RunState

if TYPE_CHECKING:
    from services.node_agent.service import NodeAgentService

# Only these variables of the agent's own environment reach a job: never its credentials.
PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL", "TERM")
UPLOAD_DIRS = ("outputs", "logs")
UPLOAD_WORKERS = 4


@dataclass
class Outcome:
    outcome: str  # succeeded | failed | canceled
    exit_codes: dict[int, int]
    error: schemas.ErrorInfo | None = None


class Execution:
    def __init__(self, agent: NodeAgentService, assignment: schemas.Assignment, runtime: Runtime) -> None:
        self.agent = agent
        self.a = assignment
        self.spec = assignment.spec
        self.run_id = assignment.run_id
        self.runtime = runtime
        self.my_slots = [s for s in assignment.placement if s.node_id == agent.config.node_id]
        self.run_dir = agent.config.work_dir / "runs" / self.run_id
        self.handles: dict[int, ProcessHandle] = {}
        self.cancel_requested = asyncio.Event()
        self.timed_out = False
        self.log = structlog.get_logger().bind(run_id=self.run_id, node_id=agent.config.node_id)

    # --- the whole life of the run on this node ------------------------------------------------------
    async def run(self) -> None:
        events = self.agent.events
        sub = await self.agent.nc.subscribe(subjects.run_events(self.run_id), cb=self._on_event)
        try:
            last, _ = await events.last(self.run_id)
            if last is not None and last.state is RunState.CANCEL_REQUESTED:
                self.cancel_requested.set()
            try:
                await self._prepare()
            except CadreError as exc:
                await self._finish(Outcome("failed", {}, schemas.ErrorInfo(code=exc.code, message=exc.message)), {})
                return
            outcome, line_counts = await self._execute()
            await self._finish(outcome, line_counts)
        except asyncio.CancelledError:
            # The agent is stopping: the ranks must not outlive it, and the run must not look alive.
            await asyncio.gather(*(h.terminate(1.0) for h in self.handles.values()), return_exceptions=True)
            await self._fail(schemas.ErrorInfo(code="agent_stopped", message="the node agent was stopped"))
            raise
        finally:
            await sub.unsubscribe()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _on_event(self, msg) -> None:
        event = schemas.run_event_decoder.decode(msg.data)
        if event.state is RunState.CANCEL_REQUESTED:
            self.cancel_requested.set()

    async def _prepare(self) -> None:
        snap = await bus.request(
            self.agent.nc, subjects.AgentApi.SNAPSHOT_URL, schemas.RunRef(run_id=self.run_id), schemas.SnapshotUrl
        )
        cache = await asyncio.to_thread(self._fetch_snapshot, snap)
        await asyncio.to_thread(self._unpack, cache)
        entry = self.run_dir / self.spec.entry_script
        if not entry.is_file():
            raise CadreError(f"entry_script {self.spec.entry_script!r} is not in the snapshot")

    def _fetch_snapshot(self, snap: schemas.SnapshotUrl) -> Path:
        """Download once per content hash; runs of the same code share the cached archive."""
        cache_dir = self.agent.config.work_dir / "snapshots"
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / f"{snap.snapshot.content_hash}.tar.gz"
        if path.exists():
            return path
        tmp = path.with_suffix(f".{os.getpid()}.part")
        digest = hashlib.sha256()
        with urllib.request.urlopen(snap.url, timeout=60) as resp, open(tmp, "wb") as out:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != snap.snapshot.content_hash:
            tmp.unlink(missing_ok=True)
            raise StorageError("the downloaded snapshot does not match its content hash")
        tmp.replace(path)
        return path

    def _unpack(self, archive: Path) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(self.run_dir, filter="data")
        for name in UPLOAD_DIRS:
            (self.run_dir / name).mkdir(exist_ok=True)

    def _env(self, slot: schemas.RankSlot) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in PASSTHROUGH_ENV}
        env.update(self.spec.environment_variables)
        nodes = sorted(
            {s.node_id for s in self.a.placement}, key=lambda n: min(s.rank for s in self.a.placement if s.node_id == n)
        )
        env.update(
            {
                "PYTHONUNBUFFERED": "1",  # lines must reach the log stream as they are printed
                "RANK": str(slot.rank),
                "WORLD_SIZE": str(len(self.a.placement)),
                "LOCAL_RANK": str(slot.local_rank),
                "LOCAL_WORLD_SIZE": str(len(self.my_slots)),
                "NODE_RANK": str(nodes.index(slot.node_id)),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(29500 + int(hashlib.sha256(self.run_id.encode()).hexdigest()[:6], 16) % 1000),
                "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in slot.gpu_ids),
                "CADRE_RUN_ID": self.run_id,
                "CADRE_EXPERIMENT": self.spec.experiment,
                "CADRE_OUTPUTS_DIR": str(self.run_dir / "outputs"),
                "CADRE_LOGS_DIR": str(self.run_dir / "logs"),
            }
        )
        return env

    async def _execute(self) -> tuple[Outcome, dict[int, int]]:
        if self.cancel_requested.is_set():
            return Outcome("canceled", {}), {}
        await self._move(schemas.Starting, RunState.STARTING)
        shippers: dict[int, LogShipper] = {}
        argv = [self.agent.python, self.spec.entry_script, *self.spec.arguments]
        try:
            for slot in self.my_slots:
                shippers[slot.rank] = LogShipper(self.agent.js, self.run_id, slot.rank, self.agent.config.node_id)
                self.handles[slot.rank] = await self.runtime.start(
                    ProcessSpec(argv=argv, cwd=self.run_dir, env=self._env(slot), name=f"rank-{slot.rank}")
                )
        except OSError as exc:
            for handle in self.handles.values():
                await handle.terminate(self.agent.config.kill_grace)
            counts = {r: await s.close() for r, s in shippers.items()}
            return Outcome("failed", {}, schemas.ErrorInfo(code="launch_failed", message=str(exc))), counts
        await self._move(schemas.Running, RunState.RUNNING)
        self.log.info("ranks_started", ranks=sorted(self.handles))

        exit_codes: dict[int, int] = {}
        first_failure: asyncio.Event = asyncio.Event()

        async def watch(rank: int, handle: ProcessHandle) -> None:
            async for stream, text in handle.lines():
                shippers[rank].add(stream, text)
            code = await handle.wait()
            handle.kill_leftovers()
            exit_codes[rank] = code
            if code != 0:
                first_failure.set()

        watchers = [asyncio.create_task(watch(r, h)) for r, h in self.handles.items()]
        all_done = asyncio.gather(*watchers)
        stoppers = [
            asyncio.create_task(self.cancel_requested.wait()),
            asyncio.create_task(first_failure.wait()),
        ]
        deadline = self.spec.max_run_duration_seconds
        done, _ = await asyncio.wait([all_done, *stoppers], timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        if all_done not in done:
            if not done:
                self.timed_out = True
            # One rank failed, a cancel came, or time ran out: every rank of the run goes.
            await asyncio.gather(*(h.terminate(self.agent.config.kill_grace) for h in self.handles.values()))
            await all_done
        for task in stoppers:
            task.cancel()
        counts = {r: await s.close() for r, s in shippers.items()}
        return self._outcome(exit_codes, shippers), counts

    def _outcome(self, exit_codes: dict[int, int], shippers: dict[int, LogShipper]) -> Outcome:
        if self.cancel_requested.is_set():
            return Outcome("canceled", exit_codes)
        if self.timed_out:
            return Outcome(
                "failed",
                exit_codes,
                schemas.ErrorInfo(
                    code="timeout",
                    message=f"the run exceeded max_run_duration_seconds={self.spec.max_run_duration_seconds}",
                ),
            )
        failed = sorted((r, c) for r, c in exit_codes.items() if c != 0)
        if not failed:
            return Outcome("succeeded", exit_codes)
        rank, code = failed[0]
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = "\n".join(shippers[rank].tail)
        return Outcome(
            "failed",
            exit_codes,
            schemas.ErrorInfo(code="nonzero_exit", message=f"rank {rank} {how}; last log lines:\n{tail}"),
        )

    async def _move(self, cls: type[schemas.RunEventBase], state: RunState) -> None:
        def build(last: schemas.RunEvent | None) -> schemas.RunEvent | None:
            if last is None or last.state is state or last.state.is_terminal():
                return None
            if last.state is RunState.CANCEL_REQUESTED:
                return None
            return bus.make_event(cls, self.run_id, state, node_id=self.agent.config.node_id)

        await self.agent.events.append(self.run_id, build)

    # --- finishing ------------------------------------------------------------------------------------
    async def _finish(self, outcome: Outcome, line_counts: dict[int, int]) -> None:
        def build(last: schemas.RunEvent | None) -> schemas.RunEvent | None:
            if last is None or last.state.is_terminal() or last.state is RunState.FINALIZING:
                return None
            return bus.make_event(
                schemas.Finalizing,
                self.run_id,
                RunState.FINALIZING,
                node_id=self.agent.config.node_id,
                outcome=outcome.outcome,
                exit_codes=outcome.exit_codes,
                log_lines=line_counts,
                error=outcome.error,
            )

        try:
            if await self.agent.events.append(self.run_id, build) is None:
                self.log.warning("run_already_ended")
                return
        except ConflictError:
            self.log.warning("run_already_ended")
            return
        self.log.info("run_finalizing", outcome=outcome.outcome, exit_codes=outcome.exit_codes)
        files = await asyncio.to_thread(self._collect_files)
        try:
            if files:
                urls = await bus.request(
                    self.agent.nc,
                    subjects.AgentApi.UPLOAD_URLS,
                    schemas.UploadUrlsRequest(run_id=self.run_id, node_id=self.agent.config.node_id, files=files),
                    schemas.UploadUrls,
                    timeout=30,
                )
                await asyncio.to_thread(self._upload, files, urls.urls)
        except (CadreError, OSError) as exc:
            self.log.error("upload_failed", error=str(exc))
            files = []  # commit what is verifiable; the artifact service records the failure
            outcome_error = schemas.ErrorInfo(code="upload_failed", message=f"uploading run files failed: {exc}")
            await self._fail(outcome_error)
            return
        await bus.request(
            self.agent.nc,
            subjects.AgentApi.COMMIT,
            schemas.CommitRequest(run_id=self.run_id, node_id=self.agent.config.node_id, files=files),
            schemas.RunSummary,
            timeout=120,
        )

    async def _fail(self, error: schemas.ErrorInfo) -> None:
        def build(last: schemas.RunEvent | None) -> schemas.RunEvent | None:
            if last is None or last.state.is_terminal():
                return None
            return bus.make_event(schemas.Failed, self.run_id, RunState.FAILED, error=error)

        await self.agent.events.append(self.run_id, build)

    def _collect_files(self) -> list[schemas.FileEntry]:
        entries = []
        for top in UPLOAD_DIRS:
            root = self.run_dir / top
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    md5 = hashlib.md5(usedforsecurity=False)
                    with open(path, "rb") as fh:
                        while chunk := fh.read(1 << 20):
                            md5.update(chunk)
                    name = path.relative_to(self.run_dir).as_posix()
                    entries.append(schemas.FileEntry(name=name, size=path.stat().st_size, md5=md5.hexdigest()))
        return entries

    def _upload(self, files: list[schemas.FileEntry], urls: dict[str, str]) -> None:
        def put(entry: schemas.FileEntry) -> None:
            last_exc: Exception | None = None
            for _ in range(3):
                try:
                    with open(self.run_dir / entry.name, "rb") as fh:
                        req = urllib.request.Request(
                            urls[entry.name], data=fh, method="PUT", headers={"Content-Length": str(entry.size)}
                        )
                        with urllib.request.urlopen(req, timeout=300) as resp:
                            resp.read()
                    return
                except OSError as exc:
                    last_exc = exc
            raise StorageError(f"{entry.name}: {last_exc}")

        with concurrent.futures.ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
            for fut in [pool.submit(put, f) for f in files]:
                fut.result()
