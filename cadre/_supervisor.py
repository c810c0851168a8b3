"""``cadre up``'s supervisor: a process of the cluster that exits (a crash, an OOM kill, a ``kill -9``) is started
again, with backoff, and every restart is an event on ``cadre.services.<name>.events`` (stream
``CADRE_SERVICES``) for operators and ``cadre services``.

    python -m cadre._supervisor CLUSTER_DIR      (started by ``cadre up``, stopped first by ``cadre down``)

It supervises what ``up`` recorded in ``state.json``: nats-server, the S3 server, the services and the agents. A
process that stays up for ``HEALTHY_AFTER`` seconds starts its backoff afresh. ``restart`` (by hand or in a
fault drill) holds the state lock while a process is down, and the supervisor leaves that process alone.
In deployment, systemd (``Restart=always``) and compose (``restart: unless-stopped``) do this job.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from cadre import _local
from shared import bus, schemas, subjects
from shared.errors import CadreError
from shared.settings import BusSettings

POLL = 0.5  # seconds between looks at the processes while one is down (its restart is due soon)
IDLE_POLL = 5.0  # while all are up: an exit wakes the supervisor at once anyway (a pidfd per process)
FIRST_DELAY = 0.5  # before the first restart of a process; doubled each time after, up to MAX_DELAY
MAX_DELAY = 30.0
HEALTHY_AFTER = 60.0  # up this long: the next exit is a new failure, not the same one again


@dataclass
class Track:
    pid: int = 0
    up_since: float = 0.0
    failures: int = 0  # exits in a row without HEALTHY_AFTER seconds up in between
    restarts: int = 0
    down_at: float | None = None  # when it was seen gone
    detail: str = ""


class Supervisor:
    def __init__(self, cluster: Path, settings: BusSettings) -> None:
        self.cluster = cluster
        self.settings = settings
        self.tracks: dict[str, Track] = {}
        self.pending: list[schemas.ServiceEvent] = []
        self.log = structlog.get_logger().bind(component="supervisor")
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # a process exited, or the supervisor is asked to stop
        self._nc = None
        self.pids: set[int] = set()  # what state.json says runs, as of the last look
        self._watched: dict[int, int] = {}  # pid -> its pidfd, readable once the process has exited

    async def run(self) -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            self._stop.set()
            self._wake.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        self.log.info("supervisor_started", cluster=str(self.cluster))
        while True:
            # Looked at first, then waited for: a process that dies just after `cadre up` is seen at once.
            alive = await asyncio.to_thread(self.check)
            if not alive:
                break  # the cluster is gone (`cadre down` removed its state)
            self._watch(loop)
            await self._publish()
            # Nothing watched yet (a restart held the state), or one down: look again soon; else an exit wakes it.
            busy = not self.pids or self.pending or any(t.down_at is not None for t in self.tracks.values())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=POLL if busy else IDLE_POLL)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stop.is_set():
                break
        for pid in list(self._watched):
            self._unwatch(loop, pid)
        if self._nc is not None:
            try:
                await self._nc.drain()
            except Exception:  # the bus may be the thing that is down
                pass
        self.log.info("supervisor_stopped")

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """A pidfd for every process it looks after: an exit wakes the loop, with no polling in between."""
        for pid in list(self._watched):
            if pid not in self.pids:
                self._unwatch(loop, pid)
        for pid in self.pids - self._watched.keys():
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # gone already (or no pidfd here): the next look, soon, sees to it
                self._wake.set()
                continue
            self._watched[pid] = fd
            loop.add_reader(fd, self._exited, loop, pid)

    def _exited(self, loop: asyncio.AbstractEventLoop, pid: int) -> None:
        self._unwatch(loop, pid)
        self._wake.set()

    def _unwatch(self, loop: asyncio.AbstractEventLoop, pid: int) -> None:
        fd = self._watched.pop(pid, None)
        if fd is not None:
            loop.remove_reader(fd)
            os.close(fd)

    # --- looking after the processes (in a thread: it waits on locks and starts processes) ------------------
    def check(self) -> bool:
        with _local.state_lock(self.cluster, wait=False) as held:
            if not held:
                return True  # a restart is under way: that process is not ours to start now
            state = _local.read_state(self.cluster)
            if state is None:
                return False
            now = time.monotonic()
            self.pids = {rec.pid for rec in state.processes if rec.role != _local.SUPERVISOR}
            for rec in state.processes:
                if rec.role == _local.SUPERVISOR:
                    continue
                track = self.tracks.setdefault(rec.name, Track(pid=rec.pid, up_since=now))
                if track.pid != rec.pid:  # started again by someone else (a restart by hand)
                    track.pid, track.up_since, track.down_at = rec.pid, now, None
                child = _local._CHILDREN.get(rec.pid)
                code = child.poll() if child is not None else None
                if _local._is_ours(rec):
                    if now - track.up_since >= HEALTHY_AFTER:
                        track.failures = 0
                    continue
                if track.down_at is None:
                    track.down_at = now
                    track.detail = _how_it_ended(code)
                    self.log.warning("process_exited", process=rec.name, pid=rec.pid, how=track.detail)
                if now - track.down_at < min(MAX_DELAY, FIRST_DELAY * 2**track.failures):
                    continue
                try:
                    new, _ = _local.respawn(self.cluster, state, rec)
                except (OSError, CadreError) as exc:
                    self.log.error("restart_failed", process=rec.name, error=str(exc))
                    track.failures += 1
                    track.down_at = now
                    continue
                track.failures += 1
                track.restarts += 1
                track.pid, track.up_since, track.down_at = new.pid, now, None
                self.pids.discard(rec.pid)
                self.pids.add(new.pid)  # watched from the next turn on
                self.log.warning("process_restarted", process=rec.name, pid=new.pid, restarts=track.restarts)
                self.pending.append(
                    schemas.ServiceEvent(
                        name=rec.name,
                        kind="restarted",
                        at=time.time(),
                        pid=new.pid,
                        restarts=track.restarts,
                        detail=track.detail,
                    )
                )
        return True

    # --- telling operators -----------------------------------------------------------------------------------
    async def _publish(self) -> None:
        if not self.pending:
            return
        try:
            if self._nc is None:
                self._nc = await bus.connect(self.settings)
            js = self._nc.jetstream()
            while self.pending:
                event = self.pending[0]
                await js.publish(subjects.service_events(event.name), schemas.encode(event), timeout=5)
                self.pending.pop(0)
        except Exception as exc:  # the bus itself may be what is being restarted: the next round tries again
            self.log.warning("restart_event_pending", error=str(exc), pending=len(self.pending))


def _how_it_ended(code: int | None) -> str:
    if code is None:
        return "it exited (not a child of this supervisor: no exit code)"
    if code < 0:
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


def main(argv: list[str] | None = None) -> int:
    from shared.logging import configure

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cadre._supervisor CLUSTER_DIR", file=sys.stderr)
        return 2
    configure(_local.SUPERVISOR, os.environ.get("CADRE_LOG_LEVEL", "info"))
    asyncio.run(Supervisor(Path(args[0]), BusSettings.from_env(_local.SUPERVISOR)).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
