"""One run on this node: fetch the snapshot, meet the other nodes, start this node's ranks, watch every rank,
ship logs and files.

A run spans one or more nodes. Each node's agent starts, watches and stops only its own ranks; the node of
rank 0 (the master) publishes a ``Rendezvous`` event with ``MASTER_ADDR``/``MASTER_PORT`` and, for MPI jobs, the
address of its PMI-1 server. Every agent follows the run's events, so that a failure anywhere (a rank's non-zero
exit, a node lost, a cancel, the time limit) stops the ranks everywhere within moments.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import json
import os
import shutil
import socket
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.node_agent.cache import NodeCache
from services.node_agent.config import AgentConfig
from services.node_agent.logship import LogShipper
from services.node_agent.runcontext import context_env, new_token
from services.node_agent.runtime import (
    LABEL_NODE,
    LABEL_RANK,
    LABEL_RUN,
    Mount,
    Prepared,
    ProcessSpec,
    Runtime,
)
from services.node_agent.shim import PmiSpec, ShimSpec
from services.node_agent.supervision import Kept, RunShim, acknowledged_lines, forward_context, shim_folder
from shared import bus, files, schemas, subjects
from shared.environments import Environment
from shared.errors import CadreError, ConflictError, ServiceUnavailableError, StorageError
from shared.states import FORWARD_ORDER, Cause, RunState

UPLOAD_DIRS = ("outputs", "logs")
UPLOAD_WORKERS = 4
UPLOAD_ATTEMPTS = 4
RENDEZVOUS_TIMEOUT = 120.0
LOG_SYNC_INTERVAL = 2.0
DISK_FULL_BYTES = 1 << 20  # a rank's failure with less than this free in the work dir is the disk's
FINISH_PATIENCE = 600.0  # seconds an agent keeps trying to hand a finished run's files over
T = TypeVar("T")


@dataclass
class Outcome:
    outcome: str  # succeeded | failed | canceled
    exit_codes: dict[int, int]
    error: schemas.ErrorInfo | None = None
    aborted: bool = False


def tf_config(endpoints: dict[int, str], workers: int, rank: int) -> str:
    """TensorFlow's cluster spec for one process: ranks below ``workers`` are workers, the rest parameter servers."""
    ranks = sorted(endpoints)
    cluster = {"worker": [endpoints[r] for r in ranks[:workers]], "ps": [endpoints[r] for r in ranks[workers:]]}
    task = {"type": "worker", "index": rank} if rank < workers else {"type": "ps", "index": rank - workers}
    return json.dumps({"cluster": {k: v for k, v in cluster.items() if v}, "task": task})


def download(url: str, root: Path, name: str) -> Path:
    """Stream a (presigned) URL to ``root/name``, a relative name that cannot leave ``root``."""
    dest = files.safe_destination(root, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=300) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out, files.CHUNK)
    return dest


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class NodeContext:
    """What one run's execution may use of its agent, and nothing more."""

    config: AgentConfig
    nc: Client
    js: JetStreamContext
    events: bus.RunEventLog
    cache: NodeCache
    runtime: Runtime
    job_python: Path  # the folder first on every rank's PYTHONPATH (the job's cadre package)
    host_id: str  # which machine this is (agents sharing one host share it)


class Execution:
    """This node's part of one attempt of a run. ``kept``: taken over from a previous life of the agent."""

    def __init__(self, ctx: NodeContext, assignment: schemas.Assignment, kept: Kept | None = None) -> None:
        self.ctx = ctx
        self.node_id = ctx.config.node_id
        self.a = assignment
        self.spec = assignment.spec
        self.run_id = assignment.run_id
        self.attempt = assignment.attempt  # events of other attempts are not this execution's business
        self.runtime = ctx.runtime
        self.my_slots = [s for s in assignment.placement if s.node_id == self.node_id]
        first_rank: dict[str, int] = {}
        for slot in assignment.placement:
            first_rank[slot.node_id] = min(first_rank.get(slot.node_id, slot.rank), slot.rank)
        self.nodes = sorted(first_rank, key=first_rank.__getitem__)  # NODE_RANK order; nodes[0] is the master
        self.is_master = self.nodes[0] == self.node_id
        self.run_dir = ctx.config.work_dir / "runs" / self.run_id
        self.spool_dir = ctx.config.work_dir / "runs" / f"{self.run_id}.logspool"  # lines the bus has not taken
        self.shim = RunShim(shim_folder(ctx.config.work_dir, self.run_id))
        self.shippers: dict[int, LogShipper] = {}
        self.deaths: dict[int, str | None] = {}  # how each rank died, when its exit code does not say it
        self.prepared: Prepared | None = None
        self.group: str | None = None  # the namespaces this node's ranks share (a sandbox container)
        self.held: list[Path] = []  # cache entries this run uses: never evicted under it
        self.cancel_requested = asyncio.Event()
        self.abort = asyncio.Event()  # another node failed, was lost, or the run ended
        self.abort_reason: str | None = None
        self.rendezvous: asyncio.Future[schemas.Rendezvous] = asyncio.get_running_loop().create_future()
        self.endpoints: dict[int, str] = {}  # tensorflow: task addresses gathered by the master
        self.endpoints_complete = asyncio.Event()
        self.dataset_paths: dict[str, Path] = {}
        self.mpi_abort: tuple[int, int] | None = None
        self.mpi_aborted = asyncio.Event()
        self.timed_out = False
        self.fenced: str | None = None  # why this node stopped its ranks on its own (cut off from the bus)
        self.first_failure: int | None = None
        self.started_ns = 0
        self.line_base: dict[int, int] = {}  # each rank's number of the first line its shim wrote down
        self.launched = False  # the shim runs the ranks: from here on they outlive this agent
        self.detached = False  # the agent stopped and left the ranks to their shim
        self.finished_here = False  # this node reported NodeFinished for this attempt (a previous life did)
        self.recorded_exits: set[int] = set()  # ranks whose RankExited is in the history already
        self.adopted = kept is not None and kept.launched
        if kept is not None and kept.launched:
            self.prepared, self.group, self.started_ns = kept.prepared, kept.group, kept.started_ns
            self.dataset_paths, self.line_base = dict(kept.dataset_paths), dict(kept.line_base)
            for path in kept.held:
                self._hold(path)
            self.launched = True
        self.log = structlog.get_logger().bind(run_id=self.run_id, node_id=self.node_id)

    # --- the whole life of the run on this node ------------------------------------------------------
    async def run(self) -> None:
        sub = await self.ctx.nc.subscribe(subjects.run_events(self.run_id), cb=self._on_msg)
        try:
            history = await self.ctx.events.history(self.run_id)
            for event in history:  # what happened before we listened
                self._observe(event)
            await self._open_shippers(history)
            if self.adopted:
                self.log.info("run_adopted", ranks=sorted(self.shim.pids), finished_here=self.finished_here)
                outcome, line_counts = await self._supervise()
                await self._report(outcome, line_counts)
                return
            self.shim.keep(Kept(assignment=self.a))  # a restarted agent knows this run was taken here
            try:
                await self._prepare()
            except Exception as exc:  # a failed build, a missing image, the Docker engine gone: the run fails
                code = exc.code if isinstance(exc, CadreError) else Cause.PREPARE_FAILED
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    code = Cause.DISK_FULL
                self.log.warning("prepare_failed", error=str(exc))
                counts = await self._close_shippers()
                await self._report(Outcome("failed", {}, schemas.ErrorInfo(code=code, message=str(exc))), counts)
                return
            outcome, line_counts = await self._execute()
            await self._report(outcome, line_counts)
        except asyncio.CancelledError:
            if self.launched:  # the agent is stopping (an upgrade, a restart): the ranks go on under their shim
                self.detached = True
                self.log.info("run_detached", shim=str(self.shim.files.folder))
            raise
        finally:
            await sub.unsubscribe()
            for shipper in self.shippers.values():
                shipper.cancel()
            self.shim.close()
            if not self.detached:
                await self._clean_up()

    async def _open_shippers(self, history: list[schemas.RunEvent]) -> None:
        """A shipper per rank here, numbering on from where the bus stands (a retried run's attempts, or a previous
        life of this agent, shipped lines before)."""
        retried = next((ev for ev in reversed(history) if isinstance(ev, schemas.Retried)), None)
        if retried is None or bus.attempt_of(retried) != self.attempt:
            retried = None
        for slot in self.my_slots:
            first = retried.log_lines.get(slot.rank, 0) if retried else 0
            if self.adopted:
                rank = slot.rank
                acked = await bus.outlast(lambda r=rank: acknowledged_lines(self.ctx.js, self.run_id, r, self.attempt))
                first = max(first, acked or 0)
            self.shippers[slot.rank] = LogShipper(
                self.ctx.js, self.run_id, slot.rank, self.node_id, first=first, attempt=self.attempt,
                spool=self.spool_dir / f"rank{slot.rank}.jsonl", memory_limit=self.ctx.config.log_memory,
            )  # fmt: skip

    async def _clean_up(self) -> None:
        if self.launched and any(d and d.startswith("lost: the run's shim") for d in self.deaths.values()):
            await self.runtime.remove_run(self.node_id, self.run_id)  # containers outlive a shim killed under us
        if self.group is not None:
            await asyncio.shield(self.runtime.close_group(self.group))
        if self.launched and self.spec.distributed == "mpi":
            freed = await self.runtime.reclaim(self.started_ns / 1e9)
            if freed:
                self.log.info("shared_memory_reclaimed", bytes=freed)
        for path in self.held:
            self.ctx.cache.release(path)
        try:
            await self.ctx.cache.trim()
        except OSError as exc:
            self.log.warning("cache_trim_failed", error=str(exc))
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.spool_dir, ignore_errors=True)
        shutil.rmtree(self.shim.files.folder, ignore_errors=True)

    async def _on_msg(self, msg) -> None:
        self._observe(schemas.run_event_decoder.decode(msg.data))

    def _ours(self, last: schemas.RunEvent | None) -> bool:
        """Whether the run is still at this execution's attempt (a writer of another attempt must not append)."""
        return last is not None and bus.attempt_of(last) == self.attempt

    def _observe(self, event: schemas.RunEvent) -> None:
        if bus.attempt_of(event) != self.attempt:
            if bus.attempt_of(event) > self.attempt and not self.abort.is_set():
                self.abort_reason = "the run was retried as a new attempt"
                self.abort.set()
            return
        if getattr(event, "node_id", None) == self.node_id:
            if isinstance(event, schemas.NodeFinished):
                self.finished_here = True
            elif isinstance(event, schemas.RankExited):
                self.recorded_exits.add(event.rank)
        if isinstance(event, schemas.Rendezvous) and not self.rendezvous.done():
            self.rendezvous.set_result(event)
        if isinstance(event, schemas.Endpoints):
            self._gather(event.endpoints)
        if event.state is RunState.CANCEL_REQUESTED:
            self.cancel_requested.set()
        reason = None
        if event.state.is_terminal():
            reason = f"the run ended ({event.state.value})"
        elif isinstance(event, schemas.NodeLost):
            reason = f"node {event.node_id} was lost"
        elif getattr(event, "node_id", None) == self.node_id:
            return
        elif isinstance(event, schemas.RankExited) and event.exit_code != 0:
            reason = f"rank {event.rank} on node {event.node_id} exited with code {event.exit_code}"
        elif isinstance(event, schemas.NodeFinished) and event.error is not None and not event.aborted:
            reason = f"node {event.node_id} failed: {event.error.message.splitlines()[0]}"
        if reason and not self.abort.is_set():
            self.abort_reason = reason
            self.abort.set()

    async def _prepare(self) -> None:
        snap = await bus.request(
            self.ctx.nc, subjects.AgentApi.SNAPSHOT_URL, schemas.RunRef(run_id=self.run_id), schemas.SnapshotUrl
        )
        archive = self.ctx.config.work_dir / "snapshots" / f"{snap.snapshot.content_hash}.tar.gz"
        self.ctx.cache.hold(archive)  # the cache may not evict it while it is fetched and unpacked
        try:
            await asyncio.to_thread(self._fetch_snapshot, snap, archive)
            await asyncio.to_thread(self._unpack, archive)
        finally:
            self.ctx.cache.release(archive)
        if snap.checkpoint:
            await asyncio.to_thread(self._restore_checkpoint, snap.checkpoint)
        entry = self.run_dir / self.spec.entry_script
        if not entry.is_file():
            raise CadreError(f"entry_script {self.spec.entry_script!r} is not in the snapshot")
        for ds in self.spec.datasets:
            urls = await bus.request(
                self.ctx.nc,
                subjects.AgentApi.DATASET_URLS,
                schemas.DatasetUrlsRequest(run_id=self.run_id, content_hash=ds.content_hash),
                schemas.DatasetFiles,
                timeout=30,
            )
            self._hold(self.ctx.config.work_dir / "datasets" / ds.content_hash)
            self.dataset_paths[ds.name] = await asyncio.to_thread(self._materialize, ds, urls)
        # Build (or reuse) the job's environment; what the build prints goes to the run's logs as "prepare" lines.
        first = self.shippers[min(self.shippers)]
        auth = await self._registry_credential()
        self.prepared = await self.runtime.prepare(Environment.of(self.spec), lambda line: first.add("p", line), auth)
        if self.prepared.cache_path is not None:
            self._hold(self.prepared.cache_path)
        self.log.info(
            "environment_ready", environment=self.prepared.key, image=self.prepared.image, python=self.prepared.python
        )

    async def _registry_credential(self) -> schemas.RegistryCredential | None:
        """The private registry's password, asked for on this node's own subject; held only for the pull."""
        registry = self.spec.environment.registry if self.spec.environment else None
        if registry is None or registry.secret is None:
            return None
        return await bus.request(
            self.ctx.nc,
            subjects.agent_registry_credential(self.node_id),
            schemas.RegistryCredentialRequest(run_id=self.run_id),
            schemas.RegistryCredential,
            timeout=30,
        )

    def _materialize(self, ds: schemas.DatasetInput, urls: schemas.DatasetFiles) -> Path:
        """Download a dataset version once per node (cached by content hash, shared read-only by runs); a
        download-mode input gets a private copy in the run's directory."""
        assert urls.version is not None
        cache = self.ctx.config.work_dir / "datasets" / ds.content_hash
        if not cache.is_dir():
            tmp = cache.with_name(f".{ds.content_hash}.{os.getpid()}.{self.run_id}")
            shutil.rmtree(tmp, ignore_errors=True)
            for entry in urls.version.files:
                dest = download(urls.urls[entry.name], tmp, entry.name)
                if files.digest(dest, entry.name).sha256 != entry.sha256:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise StorageError(f"dataset {ds.dataset}:{ds.version} file {entry.name} failed its checksum")
                dest.chmod(0o444)  # the shared copy is read-only: one run cannot change another's data
            for path in [tmp, *tmp.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o555)
            try:
                tmp.rename(cache)
            except OSError:  # another run on this node finished the same download first
                shutil.rmtree(tmp, ignore_errors=True)
        if ds.mode == "mount":
            return cache
        private = self.run_dir / "datasets" / ds.name
        shutil.copytree(cache, private)
        for path in [private, *private.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        return private

    def _restore_checkpoint(self, urls: dict[str, str]) -> None:
        """The checkpoint files the attempts before synced, into this attempt's working directory."""
        for name, url in sorted(urls.items()):
            download(url, self.run_dir, name)
        self.log.info("checkpoint_restored", files=len(urls), attempt=self.attempt)

    def _fetch_snapshot(self, snap: schemas.SnapshotUrl, path: Path) -> None:
        """Download once per content hash; runs of the same code share the cached archive."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{self.run_id}.part")  # dot: not a cache entry yet
        digest = hashlib.sha256()
        with urllib.request.urlopen(snap.url, timeout=60) as resp, open(tmp, "wb") as out:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != snap.snapshot.content_hash:
            tmp.unlink(missing_ok=True)
            raise StorageError("the downloaded snapshot does not match its content hash")
        tmp.replace(path)

    def _unpack(self, archive: Path) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(self.run_dir, filter="data")
        for name in UPLOAD_DIRS:
            (self.run_dir / name).mkdir(exist_ok=True)

    def _env(self, slot: schemas.RankSlot, rdv: schemas.Rendezvous, co_hosted: bool) -> dict[str, str]:
        env = dict(self.spec.environment_variables)
        if self.spec.distributed == "mpi" and self.runtime.kind == "docker":
            # Ranks in separate containers cannot attach to each other's memory (CMA); ranks of agents that share
            # a host must not try UCX's shared-memory transports across containers either. The job may override.
            env.setdefault("MPIR_CVAR_CH4_CMA_ENABLE", "0")
            if co_hosted:
                env.setdefault("UCX_TLS", "tcp,self")
        world = len(self.a.placement)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",  # lines must reach the log stream as they are printed
                "RANK": str(slot.rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(slot.local_rank),
                "LOCAL_WORLD_SIZE": str(len(self.my_slots)),
                "NODE_RANK": str(self.nodes.index(self.node_id)),
                "MASTER_ADDR": rdv.master_addr,
                "MASTER_PORT": str(rdv.master_port),
                "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in slot.gpu_ids),
                "CADRE_RUN_ID": self.run_id,
                "CADRE_ATTEMPT": str(self.attempt),
                "CADRE_EXPERIMENT": self.spec.experiment,
                "CADRE_OUTPUTS_DIR": str(self.run_dir / "outputs"),
                "CADRE_LOGS_DIR": str(self.run_dir / "logs"),
            }
        )
        if self.spec.communication_backend:
            env["CADRE_COMMUNICATION_BACKEND"] = self.spec.communication_backend
        if self.spec.distributed == "tensorflow":
            env["TF_CONFIG"] = tf_config(rdv.endpoints, world - self.spec.parameter_server_count, slot.rank)
        for name, path in self.dataset_paths.items():
            env[f"CADRE_DATASET_{name.upper().replace('-', '_')}"] = str(path)
        if self.spec.distributed == "mpi" and rdv.pmi_port is not None:
            # PMI-1 "simple" wire-up: MPICH ranks find the job through the master agent's PMI server.
            env.update(
                {
                    "PMI_PORT": f"{rdv.master_addr}:{rdv.pmi_port}",
                    "PMI_ID": str(slot.rank),
                    "PMI_RANK": str(slot.rank),
                    "PMI_SIZE": str(world),
                }
            )
        return env

    def _hold(self, path: Path) -> None:
        self.ctx.cache.hold(path)
        self.held.append(path)

    async def _close_shippers(self) -> dict[int, int]:
        return {rank: await shipper.close() for rank, shipper in self.shippers.items()}

    def _process_spec(
        self, argv: list[str], rank: int | str, env: dict[str, str], slot: schemas.RankSlot | None
    ) -> ProcessSpec:
        labels = {LABEL_NODE: self.node_id, LABEL_RUN: self.run_id, LABEL_RANK: str(rank)}
        mounts = [Mount(self.run_dir), Mount(self.ctx.job_python, read_only=True)]
        mounts += [Mount(p, read_only=True) for p in self.dataset_paths.values() if not p.is_relative_to(self.run_dir)]
        return ProcessSpec(
            argv=argv,
            cwd=self.run_dir,
            env=env,
            name=f"cadre-{self.node_id}-{self.run_id}-{rank}",
            prepared=self.prepared,
            labels=labels,
            mounts=mounts,
            gpu_ids=list(slot.gpu_ids) if slot else [],
            shm_size=self.spec.shm_size,
            cpus=self.spec.cpus_per_process,
            memory=self.spec.memory_per_process,
            share_with=self.group,
            python_path=[self.ctx.job_python],
        )

    def _shares_host_with_other_nodes(self) -> bool:
        """Whether another node of this run runs on this very host (two agents on one machine)."""
        me = self.ctx.host_id
        return any(host == me for node, host in self.a.hosts.items() if node != self.node_id)

    async def _plan(self) -> schemas.Rendezvous | None:
        """Where the nodes meet: the master chooses (and publishes it once its ranks run, see ``_publish``); the
        others wait for it, or for a reason to give up."""
        if self.is_master:
            address = self.ctx.config.address
            endpoints: dict[int, str] = {}
            if self.spec.distributed == "tensorflow":
                self._gather(self._my_endpoints())
                if not await self._until(self.endpoints_complete, "the other nodes' task addresses"):
                    return None
                endpoints = dict(self.endpoints)
            return bus.make_event(
                schemas.Rendezvous,
                self.run_id,
                RunState.STARTING,
                node_id=self.node_id,
                master_addr=address,
                master_port=free_port(address),
                pmi_port=free_port(address) if self.spec.distributed == "mpi" else None,  # the shim serves it
                endpoints=endpoints,
            )
        if self.spec.distributed == "tensorflow":
            mine = self._my_endpoints()

            def announce(last: schemas.RunEvent | None) -> schemas.RunEvent | None:
                if last is None or last.state.is_decided() or not self._ours(last):
                    return None
                return bus.make_event(schemas.Endpoints, self.run_id, last.state, node_id=self.node_id, endpoints=mine)

            await self.ctx.events.append(self.run_id, announce)
        if await self._until(self.rendezvous, f"the master node {self.nodes[0]} to start"):
            return self.rendezvous.result()
        return None

    async def _publish(self, rdv: schemas.Rendezvous) -> bool:
        """The master's ranks (and its PMI server) run: the other nodes may start theirs."""

        def build(last: schemas.RunEvent | None) -> schemas.RunEvent | None:
            if last is None or last.state.is_terminal() or not self._ours(last):
                return None
            return bus.make_event(
                schemas.Rendezvous, self.run_id, last.state, node_id=self.node_id, master_addr=rdv.master_addr,
                master_port=rdv.master_port, pmi_port=rdv.pmi_port, endpoints=rdv.endpoints,
            )  # fmt: skip

        return isinstance(await self.ctx.events.append(self.run_id, build), schemas.Rendezvous)

    async def _until(self, awaitable: asyncio.Future[Any] | asyncio.Event, what: str) -> bool:
        """Wait for ``awaitable`` unless the run stops first; past RENDEZVOUS_TIMEOUT the run is aborted."""
        target = asyncio.ensure_future(awaitable.wait()) if isinstance(awaitable, asyncio.Event) else awaitable
        stop = asyncio.ensure_future(self._stopped())
        try:
            done, _ = await asyncio.wait([target, stop], timeout=RENDEZVOUS_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            stop.cancel()
            if target is not awaitable:
                target.cancel()
        if target.done() and not target.cancelled():
            return True
        if not done:
            self.abort_reason = f"waited {RENDEZVOUS_TIMEOUT:.0f}s for {what}"
            self.abort.set()
        return False

    def _gather(self, endpoints: dict[int, str]) -> None:
        """The master collects every rank's task address; once it has them all, it can publish the Rendezvous."""
        self.endpoints.update(endpoints)
        if len(self.endpoints) >= len(self.a.placement):
            self.endpoints_complete.set()

    def _my_endpoints(self) -> dict[int, str]:
        """A port of its own for each of this node's ranks (tensorflow's task servers), on the node's address."""
        address = self.ctx.config.address
        return {slot.rank: f"{address}:{free_port(address)}" for slot in self.my_slots}

    async def _stopped(self) -> None:
        await asyncio.wait(
            [asyncio.ensure_future(self.cancel_requested.wait()), asyncio.ensure_future(self.abort.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )

    def _on_mpi_abort(self, rank: int, code: int) -> None:
        if self.mpi_abort is None:
            self.mpi_abort = (rank, code)
            self.mpi_aborted.set()

    async def _execute(self) -> tuple[Outcome, dict[int, int]]:
        if self.cancel_requested.is_set() or self.abort.is_set():
            return self._outcome({}), await self._close_shippers()
        await self._move(schemas.Starting, RunState.STARTING)
        rdv = await self._plan()
        if rdv is None:
            return self._outcome({}), await self._close_shippers()
        try:
            await self._launch(rdv)
        except Exception as exc:  # OSError, a port taken, or the Docker API refusing a container
            counts = await self._close_shippers()
            message = f"starting the ranks on {self.node_id} failed: {exc}"
            return Outcome("failed", {}, schemas.ErrorInfo(code=Cause.LAUNCH_FAILED, message=message)), counts
        if self.is_master and not await self._publish(rdv):
            if not self.abort.is_set():
                self.abort_reason = "the run moved on before its nodes met"
                self.abort.set()
        else:
            await self._move(schemas.Running, RunState.RUNNING)
        return await self._supervise()

    async def _launch(self, rdv: schemas.Rendezvous) -> None:
        """Hand this node's ranks to a shim of their own, which starts them and outlives this agent."""
        self.started_ns = time.time_ns()
        arguments = list(self.spec.arguments)
        for ds in self.spec.datasets:
            arguments = [str(self.dataset_paths[ds.name]) if a == ds.placeholder else a for a in arguments]
        assert self.prepared is not None
        argv = [self.prepared.python, self.spec.entry_script, *arguments]
        co_hosted = self._shares_host_with_other_nodes()
        context_port, token = free_port("127.0.0.1"), new_token()
        if len(self.my_slots) > 1:
            self.group = await self.runtime.open_group(self._process_spec(argv, "sandbox", {}, None))
        ranks = {
            slot.rank: self._process_spec(
                argv, slot.rank, {**self._env(slot, rdv, co_hosted), **context_env(context_port, token)}, slot
            )
            for slot in self.my_slots
        }
        pmi = None
        if self.is_master and rdv.pmi_port is not None:
            per_node = [sum(1 for s in self.a.placement if s.node_id == n) for n in self.nodes]
            pmi = PmiSpec(size=len(self.a.placement), ranks_per_node=per_node, host=rdv.master_addr, port=rdv.pmi_port)
        config = self.ctx.config
        spec = ShimSpec(
            run_id=self.run_id, runtime=self.runtime.kind, ranks=ranks, run_dir=str(self.run_dir),
            context_port=context_port, context_token=token, kill_grace=config.kill_grace,
            # The shim fences only for an agent gone for good: a live one cut off from the bus fences first.
            fence_after=config.fence_after + 2 * config.heartbeat_interval + 1, docker_host=config.docker_host,
            gpu_devices=bool(getattr(self.runtime, "gpu_devices", False)), pmi=pmi,
        )  # fmt: skip
        self.line_base = {rank: shipper.count for rank, shipper in self.shippers.items()}
        self.shim.keep(
            Kept(
                assignment=self.a, prepared=self.prepared, dataset_paths=self.dataset_paths, held=self.held,
                started_ns=self.started_ns, group=self.group, line_base=self.line_base, launched=True,
            )
        )  # fmt: skip
        self.launched = True
        await self.shim.launch(spec)

    async def _supervise(self) -> tuple[Outcome, dict[int, int]]:
        """Follow this node's ranks under their shim until all have exited (stopping them when the run must end),
        shipping their lines and the run's metrics as they come."""
        shippers = self.shippers
        self.log.info("ranks_started", ranks=sorted(self.shim.pids), adopted=self.adopted)
        syncer = asyncio.ensure_future(self._sync_logs_dir())
        forwarder = asyncio.ensure_future(
            forward_context(self.shim, self.ctx.js, self.run_id, self.node_id, self.attempt, FINISH_PATIENCE)
        )
        watcher = asyncio.ensure_future(self._watch_shim())
        exit_codes: dict[int, int] = {}
        local_failure = asyncio.Event()

        async def watch(rank: int) -> None:
            skip = max(0, shippers[rank].count - self.line_base.get(rank, 0))  # what a previous life shipped
            async for line in self.shim.lines(rank, skip):
                shippers[rank].add_line(line)
            code, self.deaths[rank] = self.shim.exit_of(rank)
            exit_codes[rank] = code
            if code != 0 and not (self.abort.is_set() or self.cancel_requested.is_set() or local_failure.is_set()):
                self.first_failure = rank  # the cause; ranks stopped because of it fail after
                local_failure.set()
            if rank not in self.recorded_exits:
                await self._annotate(schemas.RankExited, node_id=self.node_id, rank=rank, exit_code=code)

        all_done = asyncio.ensure_future(asyncio.gather(*(watch(slot.rank) for slot in self.my_slots)))
        stoppers = [
            asyncio.ensure_future(e.wait())
            for e in (self.cancel_requested, self.abort, local_failure, self.mpi_aborted)
        ]
        limit = self.spec.max_run_duration_seconds
        left = None if limit is None else max(0.0, limit - (time.time_ns() - self.started_ns) / 1e9)
        try:
            done, _ = await asyncio.wait([all_done, *stoppers], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if all_done not in done:
                if not done:
                    self.timed_out = True
                # A rank failed, another node did, a cancel came, or time ran out: every rank here goes.
                self.shim.stop(self.ctx.config.kill_grace)
                await all_done
            # The ranks are gone; the shim writes what they sent last and exits. One that does not is killed.
            if not (await asyncio.wait([forwarder], timeout=30))[0]:
                self.shim.kill()
                await forwarder
        finally:
            for task in (*stoppers, syncer, watcher):
                task.cancel()
            if not all_done.done():
                all_done.cancel()
            forwarder.cancel()
        counts = await self._close_shippers()
        return self._outcome(exit_codes), counts

    async def _watch_shim(self) -> None:
        """What the shim says besides lines and exits: an MPI_Abort, or that it stopped the ranks on its own."""
        while True:
            ticket = self.shim.ticket()
            if self.mpi_abort is None and (aborted := self.shim.mpi_abort()) is not None:
                self._on_mpi_abort(*aborted)
            if self.fenced is None and (why := self.shim.fenced()) is not None:
                self.fenced = why
            if self.shim.finished():
                return
            await self.shim.wait(ticket)

    def fence(self, reason: str) -> bool:
        """Stop this node's ranks now, whatever the run's state says; False if already done."""
        if self.fenced is not None:
            return False
        self.fenced = reason
        self.abort_reason = reason
        self.abort.set()
        return True

    def _outcome(self, exit_codes: dict[int, int]) -> Outcome:
        if self.fenced is not None:
            message = f"node {self.node_id} stopped its ranks: {self.fenced}"
            return Outcome("failed", exit_codes, schemas.ErrorInfo(code=Cause.FENCED, message=message))
        if self.cancel_requested.is_set():
            return Outcome("canceled", exit_codes)
        if self.timed_out:
            limit = self.spec.max_run_duration_seconds
            return Outcome(
                "failed",
                exit_codes,
                schemas.ErrorInfo(code=Cause.TIMEOUT, message=f"the run exceeded max_run_duration_seconds={limit}"),
            )
        if self.mpi_abort is not None:
            rank, code = self.mpi_abort
            error = schemas.ErrorInfo(code=Cause.MPI_ABORT, message=f"rank {rank} called MPI_Abort with code {code}")
            return Outcome("failed", exit_codes, error)
        if self.first_failure is None and self.abort.is_set():
            message = f"stopped on node {self.node_id} because {self.abort_reason}"
            return Outcome("failed", exit_codes, schemas.ErrorInfo(code=Cause.ABORTED, message=message), aborted=True)
        failed = sorted((r, c) for r, c in exit_codes.items() if c != 0)
        if not failed:
            return Outcome("succeeded", exit_codes)
        if self.first_failure is not None:
            failed.sort(key=lambda rc: rc[0] != self.first_failure)
        rank, code = failed[0]
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        death = self.deaths.get(rank)
        cause = Cause.NONZERO_EXIT
        if death is not None:
            how = f"was {death} (exit code {code})"
            if "out of memory" in death:
                cause = Cause.OUT_OF_MEMORY
            elif death.startswith("lost: the run's shim"):
                cause = Cause.AGENT_RESTARTED  # what kept the rank is gone: the node's infrastructure failed
        tail = "\n".join(self.shippers[rank].tail) if rank in self.shippers else ""
        message = f"rank {rank} on node {self.node_id} {how}; last log lines:\n{tail}"
        full = self._disk_full()
        if cause is Cause.NONZERO_EXIT and full:
            cause = Cause.DISK_FULL
            message = f"{full}; rank {rank} {how}; last log lines:\n{tail}"
        return Outcome("failed", exit_codes, schemas.ErrorInfo(code=cause, message=message))

    def _disk_full(self) -> str | None:
        """Why the node's work dir counts as full (the shim hit ENOSPC, or under DISK_FULL_BYTES are free)."""
        work_dir = self.ctx.config.work_dir
        try:
            free = shutil.disk_usage(work_dir).free
        except OSError:
            return None
        if self.shim.files.disk_full.exists() or free < DISK_FULL_BYTES:
            return f"the work dir {work_dir} on node {self.node_id} is full ({free >> 10} KiB free)"
        return None

    async def _move(self, cls: type[schemas.RunEventBase], state: RunState) -> None:
        """Move the run forward (several nodes race to do it: the first wins, the others see it done)."""

        def build(last: schemas.RunEvent | None) -> schemas.RunEvent | None:
            if last is None or not self._ours(last) or last.state not in FORWARD_ORDER:
                return None
            if FORWARD_ORDER[last.state] >= FORWARD_ORDER[state]:
                return None
            return bus.make_event(cls, self.run_id, state, node_id=self.node_id)

        await self.ctx.events.append(self.run_id, build)

    async def _annotate(self, cls: type[schemas.RunEventBase], **fields: object) -> schemas.RunEvent | None:
        """Append an event that records a fact without moving the run."""

        def build(last: schemas.RunEvent | None) -> schemas.RunEvent | None:
            if last is None or last.state.is_decided() or not self._ours(last):
                return None
            return bus.make_event(cls, self.run_id, last.state, **fields)

        # A fact the run cannot end without (this node finished): a bus outage is waited out.
        return await bus.outlast(lambda: self.ctx.events.append(self.run_id, build), within=FINISH_PATIENCE)

    # --- finishing ------------------------------------------------------------------------------------
    async def _report(self, outcome: Outcome, line_counts: dict[int, int]) -> None:
        """Tell the run this node is done, upload its files, and ask the artifact service to commit them."""
        if not self.finished_here:  # a previous life of this agent may have said so before it stopped
            try:
                finished = await self._annotate(
                    schemas.NodeFinished,
                    node_id=self.node_id,
                    outcome=outcome.outcome,
                    exit_codes=outcome.exit_codes,
                    log_lines=line_counts,
                    error=outcome.error,
                    aborted=outcome.aborted,
                )
            except ConflictError:
                finished = None
            if finished is None:
                self.log.warning("run_already_ended")
                return
            self.finished_here = True
        self.log.info("node_finished", outcome=outcome.outcome, exit_codes=outcome.exit_codes)
        stored = await asyncio.to_thread(self._collect_files)
        error = None
        parts: dict[str, schemas.MultipartDone] = {}
        started = time.monotonic()
        try:
            if stored:
                urls = await self._patiently(
                    subjects.AgentApi.UPLOAD_URLS,
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
            subjects.AgentApi.COMMIT,
            schemas.CommitRequest(
                run_id=self.run_id, node_id=self.node_id, attempt=self.attempt, files=stored, error=error, parts=parts
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

    async def _patiently(self, subject: str, payload: msgspec.Struct, reply_type: type[T]) -> T:
        """A request the run cannot end without: while the artifact service is down or restarting, wait for it.

        Uploads and commits are idempotent (same names, same content), so a retry never stores a file twice.
        """
        delay = 0.5
        deadline = time.monotonic() + FINISH_PATIENCE
        while True:
            try:
                return await bus.request(self.ctx.nc, subject, payload, reply_type, timeout=120)
            except ServiceUnavailableError as exc:
                if time.monotonic() > deadline:
                    raise
                self.log.warning("artifact_service_unavailable", subject=subject, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _sync_logs_dir(self) -> None:
        """While the ranks run, upload what changed under logs/ every few seconds (TensorBoard reads it live)."""
        seen: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(LOG_SYNC_INTERVAL)
            try:
                changed = await asyncio.to_thread(self._changed_logs, seen)
                if not changed:
                    continue
                urls = await bus.request(
                    self.ctx.nc,
                    subjects.AgentApi.UPLOAD_URLS,
                    schemas.UploadUrlsRequest(
                        run_id=self.run_id, node_id=self.node_id, files=changed, allow_multipart=False
                    ),
                    schemas.UploadUrls,
                    timeout=30,
                )
                await asyncio.to_thread(self._upload, changed, urls)
            except (CadreError, OSError) as exc:  # the final upload at the end stores everything anyway
                self.log.warning("logs_sync_failed", error=str(exc))

    def _changed_logs(self, seen: dict[str, tuple[int, int]]) -> list[schemas.FileEntry]:
        """What changed under logs/ and the checkpoint folder (a retry restores the latter)."""
        out = []
        roots = [self.run_dir / "logs", self.run_dir / self.spec.checkpoint_folder]
        for path in sorted(p for root in roots if root.is_dir() for p in root.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            st = path.stat()
            name = path.relative_to(self.run_dir).as_posix()
            if seen.get(name) != (st.st_size, st.st_mtime_ns):
                seen[name] = (st.st_size, st.st_mtime_ns)
                out.append(files.digest(path, name))
        return out

    def _collect_files(self) -> list[schemas.FileEntry]:
        """Names and sizes of what the run wrote; the digests are computed while the files upload.

        The master node stores everything under outputs/ and logs/; the other nodes only what changed during the
        run, so files that came with the snapshot are not uploaded once per node (and cannot collide).
        """
        since = 0 if self.is_master else self.started_ns
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

    def _upload(self, entries: list[schemas.FileEntry], urls: schemas.UploadUrls) -> dict[str, schemas.MultipartDone]:
        """PUT every file (large ones in parallel parts), each request retried; returns the parts to complete.

        Memory stays bounded: bodies are streamed from disk, never read whole. Retrying a PUT rewrites the same
        key or part, so a retry can neither corrupt nor duplicate an object.
        """

        def put(url: str, path: Path, offset: int, size: int) -> str:
            last_exc: Exception | None = None
            failures, deadline = 0, time.monotonic() + FINISH_PATIENCE
            while True:
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
