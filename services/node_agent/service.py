"""Node agent: advertises capacity and heartbeats, takes the assignments addressed to its node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from nats.aio.client import Client
from nats.js import api as js_api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.node_agent import capacity
from services.node_agent.cache import NodeCache
from services.node_agent.config import AgentConfig
from services.node_agent.execution import Execution, NodeContext
from services.node_agent.runcontext import job_package
from services.node_agent.runtime import ProcessRuntime, Runtime
from services.node_agent.supervision import RunShim, ShimLauncher
from services.node_agent.uploads import FINISH_PATIENCE
from shared import bus, lifecycle, schemas, subjects
from shared.environments import PULL_POLICIES
from shared.errors import CadreError, NotFoundError, NotSupportedError, ValidationError
from shared.service import Service
from shared.settings import BusSettings
from shared.states import Cause


def check_config(config: AgentConfig) -> None:
    if config.heartbeat_interval <= 0:
        raise ValidationError(f"--heartbeat must be a positive number of seconds, not {config.heartbeat_interval}")
    if config.fence_after < 2 * config.heartbeat_interval:
        raise ValidationError(
            f"--fence-after {config.fence_after:g}s is under twice the heartbeat interval "
            f"({config.heartbeat_interval:g}s): one late beat would make the agent stop its ranks"
        )


def make_runtime(config: AgentConfig, real_gpus: bool) -> Runtime:
    """The runtime the configuration asks for; ``auto`` takes Docker when an engine answers, and says why."""
    if config.pull_policy not in PULL_POLICIES:
        raise ValidationError(f"--pull must be one of {', '.join(PULL_POLICIES)}, not {config.pull_policy!r}")
    if config.runtime not in ("process", "docker", "auto"):
        raise ValidationError(f"--runtime must be process, docker or auto, not {config.runtime!r}")
    if config.runtime == "process":
        return ProcessRuntime(config.work_dir, config.pip_options, reason="configured with --runtime process")
    from services.node_agent.docker_runtime import DockerRuntime

    reason = "configured with --runtime docker"
    try:
        runtime = DockerRuntime(
            config.default_image,
            pull_policy=config.pull_policy,
            python=config.container_python,
            base_url=config.docker_host,
            gpu_devices=real_gpus,
            pip_options=config.pip_options,
            reason=reason if config.runtime == "docker" else "--runtime auto, and a Docker engine answered",
        )
        runtime.client.ping()
        return runtime
    except Exception as exc:
        if config.runtime == "docker":
            raise ValidationError(f"--runtime docker, but no Docker engine answers: {exc}") from None
        why = f"--runtime auto, and no Docker engine answers ({str(exc).splitlines()[0][:160]})"
        return ProcessRuntime(config.work_dir, config.pip_options, reason=why)


def host_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


class NodeAgentService(Service):
    name = "node_agent"
    answers_ping = False

    def __init__(self, bus_settings: BusSettings, config: AgentConfig, runtime: Runtime | None = None) -> None:
        if not subjects.NAME_RE.match(config.node_id):
            raise ValidationError(f"node id {config.node_id!r} is invalid: use letters, digits, '_' or '-'")
        check_config(config)
        super().__init__(bus_settings)
        self.config = config
        self.log = self.log.bind(node_id=config.node_id)
        gpus = capacity.gpus_for(config.declared_gpus)
        self.runtime = runtime or make_runtime(config, real_gpus=bool(gpus) and config.declared_gpus is None)
        self.cache = NodeCache(config.work_dir, config.cache_bytes)
        cpus = capacity.cpu_count()
        self.started_at = time.time()
        self.base_advert = dict(
            node_id=config.node_id,
            compute_target=config.compute_target,
            hostname=socket.gethostname(),
            address=config.address,
            cpus=cpus,
            memory_bytes=capacity.memory_bytes(),
            gpus=gpus,
            slots=config.slots or (len(gpus) if gpus else cpus),
            runtime=self.runtime.kind,
            host_id=host_id(),
            started_at=self.started_at,
            heartbeat_interval=config.heartbeat_interval,
        )
        self.executions: dict[str, tuple[Execution, asyncio.Task[None]]] = {}  # run id -> this node's part, running
        self.nodes_kv: KeyValue
        self.events: bus.RunEventLog
        self.ctx: NodeContext  # what an execution may use of this agent

    def _warm_ranks(self) -> int:
        """How many interpreters each spare shim starts ahead of its ranks (warm.py caps them): none for
        containers."""
        if self.runtime.kind != "process":
            return 0
        wanted = self.config.warm_ranks
        return self.base_advert["slots"] if wanted is None else max(0, wanted)

    async def setup(self) -> None:
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self.events = bus.RunEventLog(self.js)
        job_python = await asyncio.to_thread(job_package, self.config.work_dir)
        self.ctx = NodeContext(
            config=self.config, nc=self.nc, js=self.js, events=self.events, cache=self.cache, runtime=self.runtime,
            job_python=job_python, host_id=self.base_advert["host_id"],
            launcher=ShimLauncher(
                self.config.work_dir / "shim-launcher.log",
                warm=self._warm_ranks(),
            ),
            run_bus=self._run_bus if self.bus_settings.creds else None,
        )  # fmt: skip
        if self.bus_settings.creds:
            await self._check_run_bus()
        # The services create the topology; an agent started first waits for it.
        self.nodes_kv = await bus.key_value(self.js, subjects.NODES_BUCKET)
        await self._refuse_a_name_in_use()
        await self._take_over()  # before the cache sweep: what a run taken over uses must stay
        await self.cache.sweep()
        targets = await bus.key_value(self.js, subjects.TARGETS_BUCKET)
        info = schemas.ComputeTargetInfo(name=self.config.compute_target, first_seen_at=time.time())
        try:  # a bucket just created on a clustered bus may still be electing its leader: waited out
            await bus.outlast(lambda: targets.create(self.config.compute_target, schemas.encode(info)), within=60)
        except KeyWrongLastSequenceError:
            pass  # the target is known already
        psub = await bus.retry(
            lambda: self.js.pull_subscribe(
                subjects.node_assignments(self.config.node_id),
                durable=subjects.agent_consumer(self.config.node_id),
                stream=subjects.ASSIGNMENTS_STREAM,
                config=js_api.ConsumerConfig(ack_wait=60, max_deliver=20),
            )
        )
        await bus.outlast(self._heartbeat_once, within=60)  # only now: a node that shows up can take work
        self.spawn(self._heartbeat_loop(), "heartbeat")
        self.spawn(self._take_assignments(psub), "assignments")
        self.log.info(
            "agent_ready",
            slots=self.base_advert["slots"],
            gpus=len(self.base_advert["gpus"]),
            runtime=await asyncio.to_thread(self.runtime.describe),
        )

    async def _refuse_a_name_in_use(self) -> None:
        """Another agent heartbeating under this node id (from another host or address) keeps it: say which."""
        try:
            entry = await bus.outlast(lambda: self.nodes_kv.get(self.config.node_id), within=60)
        except KeyNotFoundError:
            return
        if not entry.value:
            return
        other = schemas.decode(entry.value, schemas.NodeAdvert)
        mine = (self.base_advert["host_id"], self.base_advert["address"])
        if (other.host_id, other.address) == mine or not other.alive(time.time()):
            return  # a previous life of this agent, or an agent gone: the name is free
        raise ValidationError(
            f"node id {self.config.node_id!r} is in use by the agent at {other.address} (host {other.hostname}), "
            f"which heartbeated {max(0.0, time.time() - other.heartbeat_at):.1f}s ago: give this agent another "
            "--node-id, or stop that one first"
        )

    async def _take_over(self) -> None:
        """The runs a previous life of this agent left: those whose shim runs (or ran) their ranks go on under
        this agent; the others (it stopped before their ranks started) end as AgentRestarted."""
        runs_dir = self.config.work_dir / "runs"
        adopted: set[str] = set()
        orphans: dict[str, str] = {}  # run id -> why it cannot go on
        node = self.config.node_id
        for folder in sorted(runs_dir.glob("*.shim")) if runs_dir.is_dir() else []:
            run_id = folder.name.removesuffix(".shim")
            shim = RunShim(folder)
            kept = shim.kept()
            if kept is None or not kept.launched or not await shim.adopt():
                shim.kill()  # it may be starting ranks nobody would watch
                orphans[run_id] = f"node agent {node} restarted before the run's ranks started on it"
            elif not shim.alive() and not shim.finished_ranks(kept.assignment, node):
                orphans[run_id] = f"node agent {node} restarted, and the run's shim on it had died with its ranks"
            else:
                self._start(Execution(self.ctx, kept.assignment, kept))
                adopted.add(run_id)
        for run_id in await self.runtime.leftovers(node, keep=adopted):  # containers of no shim
            orphans.setdefault(run_id, f"node agent {node} restarted")
        for pid_file in sorted(runs_dir.glob("*.pids")) if runs_dir.is_dir() else []:  # agents before shims
            orphans.setdefault(pid_file.stem, f"node agent {node} restarted")
            for pid in json.loads(pid_file.read_text() or "[]"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            pid_file.unlink(missing_ok=True)
        for run_id, why in sorted(orphans.items()):
            await self.runtime.remove_run(node, run_id)
            for leftover in (run_id, f"{run_id}.logspool", f"{run_id}.shim"):
                shutil.rmtree(runs_dir / leftover, ignore_errors=True)
            self.log.warning("orphaned_run_ended", run_id=run_id, reason=why)
            error = schemas.ErrorInfo(code=Cause.AGENT_RESTARTED, message=why)
            build = lifecycle.append_if(
                lifecycle.undecided(), schemas.NodeFinished, run_id, node_id=node, outcome="failed", error=error
            )
            if await self._append_for(run_id, build) is not None:
                await bus.request(
                    self.nc,
                    subjects.of_node(subjects.AgentApi.COMMIT, self.config.node_id),
                    schemas.CommitRequest(run_id=run_id, node_id=self.config.node_id, files=[]),
                    schemas.RunSummary,
                    timeout=60,
                )

    async def _heartbeat_once(self) -> None:
        advert = schemas.NodeAdvert(heartbeat_at=time.time(), **self.base_advert)  # type: ignore[arg-type]
        await self.nodes_kv.put(self.config.node_id, schemas.encode(advert))

    async def _heartbeat_loop(self) -> None:
        failed = 0
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                await asyncio.wait_for(self._heartbeat_once(), timeout=max(1.0, self.config.heartbeat_interval))
            except Exception as exc:  # the bus reconnects by itself; the next beat tries again
                failed += 1
                if failed == 1 or failed % 100 == 0:  # one line per outage, not one per beat
                    self.log.warning("heartbeat_failed", error=repr(exc), failed_in_a_row=failed)
                cut_off = time.monotonic() - last_ok
                if cut_off > self.config.fence_after:
                    self._fence(cut_off)
                continue
            last_ok = time.monotonic()
            for execution, _ in list(self.executions.values()):
                execution.shim.touch()  # the shim fences the ranks when these stop (an agent gone for good)
            if failed:
                self.log.info("heartbeat_resumed", failed_in_a_row=failed)
                failed = 0

    def _fence(self, cut_off: float) -> None:
        """Stop every rank of this node: it has been cut off past --fence-after, and the run is given up."""
        for run_id, (execution, _) in list(self.executions.items()):
            if execution.fence(
                f"it could not reach the bus for {cut_off:.0f}s (--fence-after {self.config.fence_after:g})"
            ):
                self.log.warning("ranks_fenced", run_id=run_id, seconds_cut_off=round(cut_off, 1))

    async def _append_for(self, run_id: str, build: bus.EventBuilder) -> schemas.RunEvent | None:
        """Append to a run's events as this node: through the run's own connection where the agent's user may not."""
        if not self.bus_settings.creds:
            return await self.events.append(run_id, build)
        try:
            nc = await self._run_bus(run_id)
        except NotFoundError:  # the run moved on without this node: nothing of it is this node's to say
            return None
        try:
            return await bus.RunEventLog(nc.jetstream()).append(run_id, build)
        finally:
            await nc.close()

    async def _run_bus(self, run_id: str) -> Client:
        """A connection for one run, with credentials the submitter signs for this node and that run only (this
        agent's own user writes no run's events, logs or metrics)."""
        reply = await bus.outlast(
            lambda: bus.request(self.nc, subjects.agent_run_bus(self.config.node_id), schemas.RunRef(run_id=run_id),
                                schemas.RunBusCredentials, timeout=10),
            within=FINISH_PATIENCE,
        )  # fmt: skip
        name = f"agent-{self.config.node_id}/{run_id}"
        return await bus.connect(BusSettings(url=self.bus_settings.url, creds=reply.creds, name=name))

    async def _check_run_bus(self) -> None:
        """Refuse to start on a bus where no run could be written: the submitter signs no run credentials."""
        probe = schemas.RunRef(run_id="probe_0_0")
        deadline = time.monotonic() + 60
        while True:
            try:
                await bus.request(self.nc, subjects.agent_run_bus(self.config.node_id), probe,
                                  schemas.RunBusCredentials, timeout=5)  # fmt: skip
            except NotSupportedError as exc:
                raise CadreError(f"cannot run anything here: {exc}") from None
            except NotFoundError:
                return  # it signs them (for runs this node has ranks in)
            except (CadreError, *bus.TRANSIENT_ERRORS) as exc:
                if time.monotonic() > deadline:  # the submitter is not up yet: runs will wait for it
                    self.log.warning("run_bus_unchecked", error=str(exc))
                    return
                await asyncio.sleep(1)
            else:
                return

    def on_revoked(self) -> None:
        """This host was cut off for good: its ranks stop now (they could never report again)."""
        for run_id, (execution, _) in list(self.executions.items()):
            execution.fence("the bus revoked this host's credentials")
            if execution.launched:
                execution.shim.stop(self.config.kill_grace)
            self.log.warning("ranks_stopped_revoked", run_id=run_id)

    async def _take_assignments(self, psub) -> None:
        async def handle(msg) -> None:
            await self._accept(schemas.assignment_decoder.decode(msg.data))

        await bus.consume(psub, handle, batch=1)

    async def _accept(self, assignment: schemas.Assignment) -> None:
        run_id = assignment.run_id
        if run_id in self.executions:
            running, task = self.executions[run_id]
            if running.attempt >= assignment.attempt:
                return  # a redelivery of a run we already run
            # The attempt before is ending here (it has reported; it is cleaning up): the next one starts after it.
            await asyncio.wait([task], timeout=60)
        # The execution reads the run's events once it listens to them, and goes no further if the run moved on
        # (or this node finished its part): one read on the way to the first line, not two.
        self._start(Execution(self.ctx, assignment))

    def _start(self, execution: Execution) -> None:
        task = asyncio.create_task(self._execute(execution), name=f"run-{execution.run_id}")
        self.executions[execution.run_id] = (execution, task)

    async def _execute(self, execution: Execution) -> None:
        try:
            await execution.run()
        except Exception:
            self.log.exception("execution_crashed", run_id=execution.run_id)
        finally:
            entry = self.executions.get(execution.run_id)
            if entry is not None and entry[0] is execution:  # not the entry of an attempt started after it
                del self.executions[execution.run_id]

    async def teardown(self) -> None:
        # Runs whose ranks started go on under their shims (an upgrade or a restart must not end them); the
        # node stays registered and ages, and the scheduler's grace covers the time until this agent is back.
        running = list(self.executions.values())
        for _, task in running:
            task.cancel()
        await asyncio.gather(*(task for _, task in running), return_exceptions=True)
        self.ctx.launcher.close()  # the shims it forked go on
        detached = sorted(execution.run_id for execution, _ in running if execution.detached)
        if detached:
            self.log.info("runs_left_to_their_shims", runs=detached)
            return
        # Leaving on purpose with nothing running: say so at once instead of letting the heartbeat time out.
        try:
            await self.nodes_kv.delete(self.config.node_id)
        except Exception as exc:
            self.log.warning("deregister_failed", error=str(exc))
