"""Node agent: advertises capacity and heartbeats, takes the assignments addressed to its node."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from nats.js import api as js_api
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.node_agent import capacity
from services.node_agent.cache import NodeCache
from services.node_agent.execution import Execution
from services.node_agent.logship import MEMORY_LIMIT
from services.node_agent.runcontext import job_package
from services.node_agent.runtime import ProcessRuntime, Runtime
from shared import bus, schemas, subjects
from shared.environments import PULL_POLICIES
from shared.errors import ValidationError
from shared.service import Service
from shared.settings import FENCE_AFTER_DEFAULT, BusSettings
from shared.states import PLACED_STATES, Cause


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    work_dir: Path
    compute_target: str = "local"
    declared_gpus: int | None = None
    slots: int | None = None
    heartbeat_interval: float = 2.0
    kill_grace: float = 10.0
    address: str = "127.0.0.1"  # how ranks on other nodes reach this one
    runtime: str = "process"  # process | docker | auto (docker when a Docker engine answers)
    default_image: str = "python:3.11-slim"  # for runs that name no custom_docker_image (Docker runtime)
    pull_policy: str = "if-not-present"
    docker_host: str | None = None  # default: DOCKER_HOST, else the local socket
    container_python: str = "python3"
    cache_bytes: int = 100 << 30  # snapshots, datasets and venvs kept on this node, least recently used go first
    # Cut off from the bus this long, the agent stops its ranks itself: by then the scheduler has given the node
    # up (its --node-grace), so no rank writes on after the run was decided. Long enough to outlast a bus restart.
    fence_after: float = FENCE_AFTER_DEFAULT
    log_memory: int = MEMORY_LIMIT  # bytes of log lines per rank held in memory while the bus is away; then disk
    # PIP_INDEX_URL / PIP_FIND_LINKS / PIP_TRUSTED_HOST for environment builds (may hold credentials: never logged)
    pip_options: dict[str, str] = field(default_factory=dict, repr=False)


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
        self.job_python: Path  # the folder first on every rank's PYTHONPATH (the job's cadre package)
        self.nodes_kv: KeyValue
        self.events: bus.RunEventLog

    async def setup(self) -> None:
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self.events = bus.RunEventLog(self.js)
        await self._clean_up_after_crash()
        await self.cache.sweep()
        self.job_python = await asyncio.to_thread(job_package, self.config.work_dir)
        # The services create the topology; an agent started first waits for it.
        self.nodes_kv = await bus.retry(lambda: self.js.key_value(subjects.NODES_BUCKET))
        targets = await bus.retry(lambda: self.js.key_value(subjects.TARGETS_BUCKET))
        info = schemas.ComputeTargetInfo(name=self.config.compute_target, first_seen_at=time.time())
        try:
            await targets.create(self.config.compute_target, schemas.encode(info))
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
        await self._heartbeat_once()  # only now: a node that shows up can take work
        self.spawn(self._heartbeat_loop(), "heartbeat")
        self.spawn(self._take_assignments(psub), "assignments")
        self.log.info(
            "agent_ready",
            slots=self.base_advert["slots"],
            gpus=len(self.base_advert["gpus"]),
            runtime=await asyncio.to_thread(self.runtime.describe),
        )

    async def _clean_up_after_crash(self) -> None:
        """Ranks of a previous life of this agent must not run on unwatched: kill them and report the node done."""
        runs_dir = self.config.work_dir / "runs"
        orphans = await self.runtime.leftovers(self.config.node_id)  # containers left by a previous life
        for pid_file in sorted(runs_dir.glob("*.pids")) if runs_dir.is_dir() else []:
            orphans.add(pid_file.stem)
            if self.runtime.kind == "process":
                for pid in json.loads(pid_file.read_text() or "[]"):
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            pid_file.unlink(missing_ok=True)
        for run_id in sorted(orphans):
            shutil.rmtree(runs_dir / run_id, ignore_errors=True)
            shutil.rmtree(runs_dir / f"{run_id}.logspool", ignore_errors=True)
            self.log.warning("orphaned_ranks_killed", run_id=run_id)
            error = schemas.ErrorInfo(code=Cause.AGENT_RESTARTED, message=f"node agent {self.config.node_id} restarted")

            def build(last: schemas.RunEvent | None, error: schemas.ErrorInfo = error) -> schemas.RunEvent | None:
                if last is None or last.state.is_decided():
                    return None
                return bus.make_event(
                    schemas.NodeFinished, last.run_id, last.state, node_id=self.config.node_id, outcome="failed",
                    error=error,
                )  # fmt: skip

            if await self.events.append(run_id, build) is not None:
                await bus.request(
                    self.nc,
                    subjects.AgentApi.COMMIT,
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
        history = await self.events.history(run_id)
        state = history[-1].state if history else None
        attempt = bus.current_attempt(history)
        done_here = any(isinstance(e, schemas.NodeFinished) and e.node_id == self.config.node_id for e in attempt)
        stale = not history or bus.attempt_of(history[-1]) != assignment.attempt
        if state not in PLACED_STATES or done_here or stale:  # others may have moved it on
            self.log.info("assignment_stale", run_id=run_id, state=state.value if state else None)
            return
        self.log.info("assignment_taken", run_id=run_id)
        execution = Execution(self, assignment, self.runtime)
        self.executions[run_id] = (execution, asyncio.create_task(self._execute(execution), name=f"run-{run_id}"))

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
        # Leaving on purpose: say so at once instead of letting the heartbeat time out.
        tasks = [task for _, task in self.executions.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.nodes_kv.delete(self.config.node_id)
        except Exception as exc:
            self.log.warning("deregister_failed", error=str(exc))
