"""One run on this node: fetch the snapshot, meet the other nodes, start this node's ranks, watch every rank,
ship logs and files.

A run spans one or more nodes. Each node's agent starts, watches and stops only its own ranks; the node of
rank 0 (the master) publishes a ``Rendezvous`` event with ``MASTER_ADDR``/``MASTER_PORT`` and, for MPI jobs, the
address of its PMI-1 server. Every agent follows the run's events, so that a failure anywhere (a rank's non-zero
exit, a node lost, a cancel, the time limit) stops the ranks everywhere within moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.node_agent.cache import NodeCache
from services.node_agent.config import AgentConfig
from services.node_agent.logship import LogShipper
from services.node_agent.rendezvous import Meeting, Place, free_port, interface_of, tf_config
from services.node_agent.runcontext import context_env, new_token
from services.node_agent.runtime import (
    LABEL_NODE,
    LABEL_RANK,
    LABEL_RUN,
    Mount,
    ProcessSpec,
    Runtime,
)
from services.node_agent.shim import PmiSpec, ShimSpec
from services.node_agent.staging import Staging
from services.node_agent.supervision import (
    SHIM_LOST,
    Kept,
    RunShim,
    ShimLauncher,
    acknowledged_lines,
    forward_context,
    shim_folder,
)
from services.node_agent.uploads import FINISH_PATIENCE, Uploads
from shared import bus, lifecycle, schemas, subjects
from shared.errors import CadreError, ConflictError, NotFoundError
from shared.states import PLACED_STATES, Cause, RunState

RENDEZVOUS_TIMEOUT = 120.0
DISK_FULL_BYTES = 1 << 20  # a rank's failure with less than this free in the work dir is the disk's


@dataclass
class Outcome:
    outcome: str  # succeeded | failed | canceled
    exit_codes: dict[int, int]
    error: schemas.ErrorInfo | None = None
    aborted: bool = False


@dataclass
class NodeContext:
    """What one run's execution may use of its agent, and nothing more. Each execution has its own copy: on a bus
    that trusts an operator, ``run_bus`` opens a connection that may write that run alone, and the copy's ``nc``,
    ``js`` and ``events`` become that connection's."""

    config: AgentConfig
    nc: Client
    js: JetStreamContext
    events: bus.RunEventLog
    cache: NodeCache
    runtime: Runtime
    job_python: Path  # the folder first on every rank's PYTHONPATH (the job's cadre package)
    host_id: str  # which machine this is (agents sharing one host share it)
    launcher: ShimLauncher  # forks the runs' shims
    run_bus: Callable[[str], Awaitable[Client]] | None = None  # a run's own connection; None: the agent's


def placed_here(history: list[schemas.RunEvent], node_id: str, attempt: int) -> bool:
    """Whether an assignment of ``attempt`` is still this node's to run: the run is placed, in that attempt, and
    this node has not finished its part of it."""
    if not history or history[-1].state not in PLACED_STATES or lifecycle.attempt_of(history[-1]) != attempt:
        return False
    current = lifecycle.current_attempt(history)
    return not any(isinstance(e, schemas.NodeFinished) and e.node_id == node_id for e in current)


class Execution:
    """This node's part of one attempt of a run. ``kept``: taken over from a previous life of the agent."""

    def __init__(self, ctx: NodeContext, assignment: schemas.Assignment, kept: Kept | None = None) -> None:
        ctx = self.ctx = dataclasses.replace(ctx)  # its own copy: the run's connection replaces the agent's in it
        self.node_id = ctx.config.node_id
        self.a = assignment
        self.spec = assignment.spec
        self.run_id = assignment.run_id
        self.attempt = assignment.attempt  # events of other attempts are not this execution's business
        # The run's last event as this node last saw it (what it appended last), and its stream sequence.
        self._appended: tuple[schemas.RunEvent | None, int] | None = None
        self.runtime = ctx.runtime
        self.my_slots = [s for s in assignment.placement if s.node_id == self.node_id]
        first_rank: dict[str, int] = {}
        for slot in assignment.placement:
            first_rank[slot.node_id] = min(first_rank.get(slot.node_id, slot.rank), slot.rank)
        self.nodes = sorted(first_rank, key=first_rank.__getitem__)  # NODE_RANK order; nodes[0] is the master
        self.is_master = self.nodes[0] == self.node_id
        self.run_dir = ctx.config.work_dir / "runs" / self.run_id
        self.spool_dir = ctx.config.work_dir / "runs" / f"{self.run_id}.logspool"  # lines the bus has not taken
        self.log = structlog.get_logger().bind(run_id=self.run_id, node_id=self.node_id)
        self.shim = RunShim(shim_folder(ctx.config.work_dir, self.run_id))
        self.staging = Staging(ctx, assignment, self.run_dir, self.log)
        self.uploads = Uploads(ctx, assignment, self.run_dir, self.is_master, self.log)
        self.meeting = Meeting(ctx, assignment, self.nodes, self._stopped, self._give_up, self._append)
        self.shippers: dict[int, LogShipper] = {}
        self.deaths: dict[int, str | None] = {}  # how each rank died, when its exit code does not say it
        self.group: str | None = None  # the namespaces this node's ranks share (a sandbox container)
        self.cancel_requested = asyncio.Event()
        self.abort = asyncio.Event()  # another node failed, was lost, or the run ended
        self.abort_reason: str | None = None
        self.mpi_abort: tuple[int, int] | None = None
        self.mpi_aborted = asyncio.Event()
        self.timed_out = False
        self.fenced: str | None = None  # why this node stopped its ranks on its own (cut off from the bus)
        self.first_failure: int | None = None
        self.started_ns = 0
        self.line_base: dict[int, int] = {}  # each rank's number of the first line its shim wrote down
        self.launched = False  # the shim runs the ranks: from here on they outlive this agent
        self.detached = False  # the agent stopped and left the ranks to their shim
        self.stale = False  # the assignment was out of date when this execution read the run's events
        self.finished_here = False  # this node reported NodeFinished for this attempt (a previous life did)
        self.recorded_exits: set[int] = set()  # ranks whose RankExited is in the history already
        self.adopted = kept is not None and kept.launched
        if kept is not None and self.adopted:
            self.group, self.started_ns, self.line_base = kept.group, kept.started_ns, dict(kept.line_base)
            self.staging.prepared, self.staging.dataset_paths = kept.prepared, dict(kept.dataset_paths)
            for path in kept.held:
                self.staging.hold(path)
            self.launched = True

    # --- the whole life of the run on this node ------------------------------------------------------
    async def run(self) -> None:
        own = None
        if self.ctx.run_bus is not None:
            try:
                own = await self.ctx.run_bus(self.run_id)
            except NotFoundError:  # the submitter signs for runs placed on this node only: it moved on
                self.log.info("assignment_stale", state=None)
                return
            self.ctx.nc, self.ctx.js = own, own.jetstream()
            self.ctx.events = bus.RunEventLog(self.ctx.js)
        try:
            await self._run()
        finally:
            if own is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(own.drain(), timeout=10)  # what the shippers sent last goes out first

    async def _run(self) -> None:
        sub = await self.ctx.nc.subscribe(subjects.run_events(self.run_id), cb=self._on_msg)
        try:
            history = await self._history()
            if not self.adopted and not placed_here(history, self.node_id, self.attempt):
                self.stale = True  # others moved the run on (or this node finished it): nothing to do or clean
                self.log.info("assignment_stale", state=history[-1].state.value if history else None)
                return
            if not self.adopted:
                self.log.info("assignment_taken")
            for event in history:  # what happened before we listened
                self._observe(event)
            await self._open_shippers(history)
            if self.adopted:
                self.log.info("run_adopted", ranks=sorted(self.shim.pids), finished_here=self.finished_here)
                if self.finished_here and history and history[-1].state.is_decided():
                    return  # a previous life reported it, and the run has ended: only the clean-up is left
                outcome, line_counts = await self._supervise()
                await self._report(outcome, line_counts)
                return
            self.shim.keep(Kept(assignment=self.a))  # a restarted agent knows this run was taken here
            try:
                await self.staging.prepare(lambda line: self.shippers[min(self.shippers)].add("p", line))
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
            if not self.detached and not self.stale:
                await self._clean_up()

    async def _history(self) -> list[schemas.RunEvent]:
        """What happened to the run before this execution listened. A first attempt whose last event is still
        its Assigned has nothing in its past that the execution acts on (no retry, no cancel, no other node
        started yet): one read instead of one per event, on every run's way to its first line."""
        if self.attempt == 1 and not self.adopted:
            last, seq = await self.ctx.events.last(self.run_id)
            if isinstance(last, schemas.Assigned) and lifecycle.attempt_of(last) == 1:
                self._appended = (last, seq)  # what this node's first append (Starting) goes after, most likely
                return [last]
        return await self.ctx.events.history(self.run_id)

    async def _open_shippers(self, history: list[schemas.RunEvent]) -> None:
        """A shipper per rank here, numbering on from where the bus stands (a retried run's attempts, or a previous
        life of this agent, shipped lines before)."""
        retried = next((ev for ev in reversed(history) if isinstance(ev, schemas.Retried)), None)
        if retried is None or lifecycle.attempt_of(retried) != self.attempt:
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
        if self.launched and SHIM_LOST in self.deaths.values():
            await self.runtime.remove_run(self.node_id, self.run_id)  # containers outlive a shim killed under us
        if self.group is not None:
            await asyncio.shield(self.runtime.close_group(self.group))
        if self.launched and self.spec.distributed == "mpi":
            freed = await self.runtime.reclaim(self.started_ns / 1e9)
            if freed:
                self.log.info("shared_memory_reclaimed", bytes=freed)
        self.staging.release()
        try:
            await self.ctx.cache.trim()
        except OSError as exc:
            self.log.warning("cache_trim_failed", error=str(exc))
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.spool_dir, ignore_errors=True)
        shutil.rmtree(self.shim.files.folder, ignore_errors=True)

    async def _on_msg(self, msg) -> None:
        self._observe(schemas.run_event_decoder.decode(msg.data))

    def _observe(self, event: schemas.RunEvent) -> None:
        if lifecycle.attempt_of(event) != self.attempt:
            if lifecycle.attempt_of(event) > self.attempt:
                self._give_up("the run was retried as a new attempt")
            return
        if getattr(event, "node_id", None) == self.node_id:
            if isinstance(event, schemas.NodeFinished):
                self.finished_here = True
            elif isinstance(event, schemas.RankExited):
                self.recorded_exits.add(event.rank)
        self.meeting.observe(event)
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
        if reason:
            self._give_up(reason)

    def _env(self, slot: schemas.RankSlot, rdv: Place, co_hosted: bool) -> dict[str, str]:
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
        if (iface := interface_of(self.ctx.config.address)) is not None:
            # torch.distributed's transports talk over the interface other nodes reach this one at (the job may
            # name another).
            for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                env.setdefault(name, iface)
        if self.spec.distributed == "tensorflow":
            env["TF_CONFIG"] = tf_config(rdv.endpoints, world - self.spec.parameter_server_count, slot.rank)
        for name, path in self.staging.dataset_paths.items():
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

    async def _close_shippers(self) -> dict[int, int]:
        return {rank: await shipper.close() for rank, shipper in self.shippers.items()}

    def _process_spec(
        self, argv: list[str], rank: int | str, env: dict[str, str], slot: schemas.RankSlot | None
    ) -> ProcessSpec:
        labels = {LABEL_NODE: self.node_id, LABEL_RUN: self.run_id, LABEL_RANK: str(rank)}
        mounts = [Mount(self.run_dir), Mount(self.ctx.job_python, read_only=True)]
        datasets = self.staging.dataset_paths.values()
        mounts += [Mount(p, read_only=True) for p in datasets if not p.is_relative_to(self.run_dir)]
        return ProcessSpec(
            argv=argv,
            cwd=self.run_dir,
            env=env,
            name=f"cadre-{self.node_id}-{self.run_id}-{rank}",
            prepared=self.staging.prepared,
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

    def _give_up(self, reason: str) -> None:
        if not self.abort.is_set():
            self.abort_reason = reason
            self.abort.set()

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
        await self._move(schemas.Starting)
        place = await self.meeting.plan()
        if place is None:
            return self._outcome({}), await self._close_shippers()
        try:
            if self.is_master and len(self.nodes) > 1 and not await self.meeting.publish(place):
                self._give_up("the run moved on before its nodes met")
                return self._outcome({}), await self._close_shippers()
            await self._launch(place)
        except Exception as exc:  # OSError, a port taken, or the Docker API refusing a container
            counts = await self._close_shippers()
            message = f"starting the ranks on {self.node_id} failed: {exc}"
            return Outcome("failed", {}, schemas.ErrorInfo(code=Cause.LAUNCH_FAILED, message=message)), counts
        finally:
            if self.meeting.pmi_socket is not None:  # the shim has its own copy now (or there is no shim)
                self.meeting.pmi_socket.close()
        # A lone node waits for nobody: its rendezvous goes out while its ranks start, off the first line's path.
        if self.is_master and len(self.nodes) == 1 and not await self.meeting.publish(place):
            self._give_up("the run moved on before its nodes met")
        else:
            await self._move(schemas.Running)
        return await self._supervise()

    async def _launch(self, rdv: Place) -> None:
        """Hand this node's ranks to a shim of their own, which starts them and outlives this agent."""
        self.started_ns = time.time_ns()
        arguments = list(self.spec.arguments)
        for ds in self.spec.datasets:
            arguments = [str(self.staging.dataset_paths[ds.name]) if a == ds.placeholder else a for a in arguments]
        assert self.staging.prepared is not None
        argv = [self.staging.prepared.python, self.spec.entry_script, *arguments]
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
        staged = self.staging
        self.shim.keep(
            Kept(
                assignment=self.a, prepared=staged.prepared, dataset_paths=staged.dataset_paths, held=staged.held,
                started_ns=self.started_ns, group=self.group, line_base=self.line_base, launched=True,
            )
        )  # fmt: skip
        self.launched = True
        await self.shim.launch(spec, self.ctx.launcher, self.meeting.pmi_socket)

    async def _supervise(self) -> tuple[Outcome, dict[int, int]]:
        """Follow this node's ranks under their shim until all have exited (stopping them when the run must end),
        shipping their lines and the run's metrics as they come."""
        shippers = self.shippers
        self.log.info("ranks_started", ranks=sorted(self.shim.pids), adopted=self.adopted)
        syncer = asyncio.ensure_future(self.uploads.sync_loop())
        forwarder = asyncio.ensure_future(
            forward_context(self.shim, self.ctx.js, self.run_id, self.node_id, self.attempt, FINISH_PATIENCE)
        )
        watcher = asyncio.ensure_future(self._watch_shim())
        exit_codes: dict[int, int] = {}
        local_failure = asyncio.Event()

        async def watch(rank: int) -> None:
            skip = max(0, shippers[rank].count - self.line_base.get(rank, 0))  # what a previous life shipped
            async for lines in self.shim.lines(rank, skip):
                shippers[rank].add_lines(lines)
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
            self.uploads.stop_sync()
            for task in (*stoppers, syncer, watcher):
                task.cancel()
            if not all_done.done():
                all_done.cancel()
            forwarder.cancel()
            await asyncio.wait([syncer])  # its last PUTs land before the final upload of the same files
        if (note := self.uploads.checkpoint_note()) is not None:  # the ranks are done: no shim line follows it
            shippers[min(shippers)].add("e", note, tail=False)
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
            elif death == SHIM_LOST:
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

    async def _append(self, build: bus.EventBuilder) -> schemas.RunEvent | None:
        """Append; on a run of one node, taking the event this node saw or appended last as the run's last one (no
        read of the subject first: wrong only when a service wrote since, a cancel say, and then the compare-and-set
        fails and it is read). The nodes of a bigger run write in between each other, so they read first."""
        known = self._appended if len(self.nodes) == 1 else None
        stored = await self.ctx.events.append_at(self.run_id, build, known=known)
        if stored is None:
            return None
        event, _, seq = stored
        self._appended = (event, seq)
        return event

    async def _move(self, cls: type[schemas.RunEventBase]) -> None:
        """Move the run forward (several nodes race to do it: the first wins, the others see it done)."""
        guard = lifecycle.before(lifecycle.MOVES_TO[cls], self.attempt)
        await self._append(lifecycle.append_if(guard, cls, self.run_id, node_id=self.node_id))

    async def _annotate(self, cls: type[schemas.RunEventBase], **fields: object) -> schemas.RunEvent | None:
        """Append an event that records a fact without moving the run."""
        build = lifecycle.append_if(lifecycle.undecided(self.attempt), cls, self.run_id, **fields)
        # A fact the run cannot end without (this node finished): a bus outage is waited out.
        return await bus.outlast(lambda: self._append(build), within=FINISH_PATIENCE)

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
        await self.uploads.hand_over(self.started_ns)
