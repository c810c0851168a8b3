"""cadre-shim: keeps one run's ranks on one node, so that they outlive the node agent (as slurmstepd does for
slurmd, or containerd-shim for containerd).

The agent writes ``spec.json`` into the run's shim folder and starts ``python -m services.node_agent.shim
FOLDER`` in a session of its own. The shim starts the ranks (plain processes, or containers through the Docker
engine), serves the run's PMI wire-up (on the master node of an MPI run) and its ``Run.get_context()`` endpoint,
and writes all an agent needs into the folder, so that a restarted agent reads on where its previous life stopped.

Written by the shim:
    shim.pid        "<pid> <start time>", first thing
    ready.json      the ranks started ({"pids": {rank: pid}}), or why they did not ({"error": ...})
    rank<N>.log     every line rank N printed, in order: ``<unix time>\\t<o|e>\\t<text>\\n``
    rank<N>.exit    {"code", "death"} once rank N exited and all it printed is in rank<N>.log
    context.jsonl   what the ranks sent through Run.get_context(), one RunData per line
    mpi_abort.json  the first MPI_Abort: {"rank", "code"}
    fenced          why the shim stopped the ranks on its own (no agent in touch for fence_after seconds)
    disk_full       the work dir filled up: the lines after it were dropped (the exit files have their room
                    allocated at the start, so a full disk cannot hide how the ranks ended)
    done            everything is written; the shim exits
Written by the agent:
    spec.json, kept.json (what a restarted agent needs to take the run over)
    alive           touched while the agent reaches the bus
    stop            the grace: stop the ranks now, SIGTERM then SIGKILL (a SIGUSR1 wakes the shim to read it)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from services.node_agent.pmi import PmiServer
from services.node_agent.runcontext import RunContextServer
from services.node_agent.runtime import (
    PDEATHSIG_WRAPPER,
    ProcessHandle,
    ProcessRuntime,
    ProcessSpec,
    Runtime,
    passthrough_env,
)
from services.node_agent.warm import WarmPool, group_nice_reversible, idle_reversible, startup_env
from shared import schemas
from shared.procs import is_alive, start_time

NOTIFY_FD_ENV = "CADRE_SHIM_NOTIFY_FD"  # a pipe the shim writes a byte to whenever it wrote something
PMI_FD_ENV = "CADRE_SHIM_PMI_FD"  # the PMI server's listening socket, bound by the agent (the master node's)
WATCH_INTERVAL = 0.5  # seconds between looks at ``alive`` and ``stop``
PMI_LINGER = 60.0  # seconds the master's PMI server outlives its own ranks, for the others' MPI_Finalize
EXIT_ROOM = 4096  # bytes allocated up front for each rank's exit file
WARM_AFTER = 2.0  # seconds into the runs handed out before a spare starts its interpreters anyway
WARM_NOW = b"warm"  # to a spare: start the interpreters (a run's folder is an absolute path)


class PmiSpec(msgspec.Struct):
    size: int
    ranks_per_node: list[int]
    host: str
    port: int


class ShimSpec(msgspec.Struct):
    run_id: str
    runtime: str  # process | docker
    ranks: dict[int, ProcessSpec]
    run_dir: str
    context_port: int
    context_token: str
    kill_grace: float
    fence_after: float
    docker_host: str | None = None
    gpu_devices: bool = False
    pmi: PmiSpec | None = None


class LineRecord(msgspec.Struct, array_like=True):
    """One read of a rank's pipe in its ``rank<N>.log``: a JSON array on one line, ``[t, stream, [lines...]]``.
    (Older shims wrote a line per line, ``t<TAB>stream<TAB>text``; the agent reads both.)"""

    t: float
    stream: str
    lines: list[str]


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(type(obj))


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is Path:
        return Path(obj)
    raise NotImplementedError(kind)


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj, enc_hook=_enc_hook)


def decode(data: bytes, kind: type[Any]) -> Any:
    return msgspec.json.decode(data, type=kind, dec_hook=_dec_hook)


# Built on import, in the launcher, before it forks the spare shims: a spare that had to work out ShimSpec's
# types itself would take a millisecond of the run's start to do it (measured: 1-1.5 ms of 4 before the ranks).
_SPEC_DECODER = msgspec.json.Decoder(ShimSpec, dec_hook=_dec_hook)


class ShimFiles:
    """The folder one run's shim and agent share (``<work>/runs/<run>.shim``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.spec = folder / "spec.json"
        self.kept = folder / "kept.json"
        self.pid = folder / "shim.pid"
        self.ready = folder / "ready.json"
        self.context = folder / "context.jsonl"
        self.context_offset = folder / "context.offset"
        self.mpi_abort = folder / "mpi_abort.json"
        self.fenced = folder / "fenced"
        self.done = folder / "done"
        self.disk_full = folder / "disk_full"
        self.alive = folder / "alive"
        self.stop = folder / "stop"
        self.output = folder / "shim.log"

    def log(self, rank: int) -> Path:
        return self.folder / f"rank{rank}.log"

    def exit(self, rank: int) -> Path:
        return self.folder / f"rank{rank}.exit"

    def write(self, path: Path, data: bytes) -> None:
        """All or nothing: a reader never sees half a file. Into the room ``make_room`` kept, if it did."""
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # may hold the job's variables
        with os.fdopen(fd, "wb") as out:
            out.write(data)  # over blocks allocated before: no new room needed
            out.truncate(len(data))
        tmp.replace(path)

    def make_room(self, path: Path, size: int) -> None:
        """Allocate ``path``'s room now, while there is some (see ``write``)."""
        tmp = path.with_name(f".{path.name}.tmp")
        with contextlib.suppress(OSError), open(tmp, "wb") as out:
            os.posix_fallocate(out.fileno(), 0, size)

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def shim_process(self) -> tuple[int, int | None] | None:
        try:
            pid, _, started = self.pid.read_text().partition(" ")
            return int(pid), int(started) if started.strip() else None
        except (OSError, ValueError):
            return None

    def shim_alive(self) -> bool:
        proc = self.shim_process()
        return proc is not None and is_alive(*proc)


_WARM: WarmPool | None = None  # a spare shim's warm interpreters (warm.py), started before its run came


def _runtime(spec: ShimSpec) -> Runtime:
    if spec.runtime == "docker":
        from services.node_agent.docker_runtime import DockerRuntime

        return DockerRuntime("", base_url=spec.docker_host, gpu_devices=spec.gpu_devices, reason="shim")
    return ProcessRuntime(Path(spec.run_dir).parent, warm=_WARM)


class Shim:
    def __init__(self, files: ShimFiles, spec: ShimSpec) -> None:
        self.files = files
        self.spec = spec
        self.handles: dict[int, ProcessHandle] = {}
        self.wake = asyncio.Event()
        self.stopping = False
        self._notify_fd = int(os.environ.get(NOTIFY_FD_ENV, "-1"))
        self._context_out = open(files.context, "ab")
        self.mpi_aborted = False
        self.dropped = 0  # lines not written down since the disk is full
        self._stopper: asyncio.Task[None] | None = None

    def notify(self) -> None:
        if self._notify_fd < 0:
            return
        try:
            os.write(self._notify_fd, b".")
        except BlockingIOError:
            pass  # the agent has a byte to read already
        except OSError:  # the agent is gone: a restarted one polls the files
            os.close(self._notify_fd)
            self._notify_fd = -1

    def full(self, exc: OSError) -> bool:
        """On ENOSPC: say so once (an empty file needs no room); the ranks' lines are dropped from here on."""
        if exc.errno != errno.ENOSPC:
            return False
        if not self.files.disk_full.exists():
            with contextlib.suppress(OSError):
                self.files.disk_full.touch()
            self.notify()
        return True

    async def _store_context(self, batch: schemas.RunData) -> None:
        self._context_out.write(schemas.encode(batch) + b"\n")
        self._context_out.flush()
        self.notify()

    def _on_abort(self, rank: int, code: int) -> None:
        if not self.mpi_aborted:
            self.mpi_aborted = True
            self.files.write(self.files.mpi_abort, json.dumps({"rank": rank, "code": code}).encode())
            self.notify()

    async def run(self) -> int:
        spec = self.spec
        for rank in spec.ranks:
            self.files.make_room(self.files.exit(rank), EXIT_ROOM)
        runtime = _runtime(spec)
        context = RunContextServer(
            self._store_context, spec.run_id, Path(spec.run_dir), spec.context_token, port=spec.context_port
        )
        pmi = PmiServer(spec.pmi.size, spec.pmi.ranks_per_node, self._on_abort) if spec.pmi else None
        try:
            await context.start()
            if pmi is not None and spec.pmi is not None:
                bound = int(os.environ.get(PMI_FD_ENV, "-1"))
                await pmi.start(spec.pmi.host, spec.pmi.port, sock=socket.socket(fileno=bound) if bound >= 0 else None)
            for rank, process in sorted(spec.ranks.items()):
                self.handles[rank] = await runtime.start(process)
        except Exception as exc:  # OSError, a port taken, or the Docker API refusing a container
            await self._stop_ranks(0.0)
            self.files.write(self.files.ready, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            self.notify()
            await context.close()
            return 1
        pids = {rank: handle.pid for rank, handle in self.handles.items()}
        self.files.write(self.files.ready, json.dumps({"pids": pids, "at": time.time()}).encode())
        self.notify()
        if _WARM is not None:  # the warm ranks the run did not take exit (and are reaped) while it runs
            released = asyncio.create_task(_WARM.release())
        watcher = asyncio.create_task(self._watch())
        await asyncio.gather(*(self._keep(rank, handle) for rank, handle in self.handles.items()))
        watcher.cancel()
        if _WARM is not None:
            await released
        await context.close()  # what the ranks sent last is in context.jsonl before ``done``
        self._context_out.close()
        self.files.write(self.files.done, b"")
        self.notify()
        if pmi is not None:
            # The other nodes' ranks may still be finalizing through this server: it stays up until they let go
            # (or PMI_LINGER passes). The agent has all it needs by now.
            await pmi.drained(PMI_LINGER)
            await pmi.close()
        return 0

    async def _keep(self, rank: int, handle: ProcessHandle) -> None:
        """Rank ``rank``'s lines into its file as they come (flushed whenever the pipe runs dry), then its exit."""
        loop = asyncio.get_running_loop()
        out = open(self.files.log(rank), "ab")
        pending = False

        def flush() -> None:
            nonlocal pending
            pending = False
            if not out.closed:
                try:
                    out.flush()
                except OSError as exc:
                    self.full(exc)
                self.notify()

        try:
            async for stream, lines in handle.lines():
                if self.files.disk_full.exists():
                    self.dropped += len(lines)
                    continue  # read on all the same: a rank blocked on a full pipe would never end
                try:
                    out.write(msgspec.json.encode(LineRecord(time.time(), stream, lines)) + b"\n")
                except OSError as exc:
                    if not self.full(exc):
                        raise
                if not pending:
                    pending = True
                    loop.call_soon(flush)
            flush()
        finally:
            with contextlib.suppress(OSError):
                out.close()
        code = await handle.wait()
        with contextlib.suppress(Exception):
            await handle.cleanup()
        self.files.write(self.files.exit(rank), json.dumps({"code": code, "death": handle.death}).encode() + b"\n")
        if self.dropped:
            print(f"rank {rank} exited; {self.dropped} lines dropped since the disk is full", flush=True)
        self.notify()

    async def _watch(self) -> None:
        """Stop the ranks when the agent asks, or when no agent has been in touch for fence_after seconds."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=WATCH_INTERVAL)
            self.wake.clear()
            if self.stopping:
                continue
            grace = self._asked_to_stop()
            if grace is None:
                quiet = self._quiet_for()
                if quiet > self.spec.fence_after:
                    reason = f"no node agent in touch for {quiet:.0f}s (--fence-after {self.spec.fence_after:g})"
                    self.files.write(self.files.fenced, reason.encode())
                    grace = self.spec.kill_grace
            if grace is not None:
                self._begin_stop(grace)

    def _asked_to_stop(self) -> float | None:
        try:
            return float(self.files.stop.read_text() or self.spec.kill_grace)
        except (OSError, ValueError):
            return None

    def _quiet_for(self) -> float:
        try:
            return time.time() - self.files.alive.stat().st_mtime
        except OSError:
            return 0.0

    def stop(self) -> None:
        """SIGTERM from outside (``cadre down``): stop the ranks with the kill grace."""
        self._begin_stop(self.spec.kill_grace)

    def _begin_stop(self, grace: float) -> None:
        if self._stopper is None:
            self.stopping = True
            self._stopper = asyncio.get_running_loop().create_task(self._stop_ranks(grace))

    async def _stop_ranks(self, grace: float) -> None:
        self.stopping = True
        handles = list(self.handles.values())
        await asyncio.gather(*(h.terminate(grace) for h in handles), return_exceptions=True)


def zygote(fd: int, warm: int = 0) -> None:
    """Hand each request on the socket ``fd`` (a run's folder, with its notify pipe) to a shim forked ahead of
    time: the imports are paid once per agent, and the fork and the shim's event loop before the run asks. Its
    shims outlive it: they are sessions of their own. ``warm``: how many interpreters each spare starts ahead of
    its ranks (warm.py; 0 for none).

    A spare forked as a run is handed out starts its interpreters once that run (and any other handed out) has
    ended, or after ``WARM_AFTER`` seconds: started at once, their start-up (the next run's) would be paid inside
    this run, whose ranks are starting on the same CPUs."""
    # Whether warm interpreters may start at SCHED_IDLE: tried once, not by every spare (and while a child of
    # this process can still be waited for).
    idle = warm > 0 and idle_reversible()
    group = idle and group_nice_reversible()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps exited shims; the agent follows them by pid
    sock = socket.socket(fileno=fd)
    fork_spare = functools.partial(_spare, sock, warm, idle, group)
    spare = fork_spare()
    cold = warm > 0  # the spare has not been told to start its interpreters
    running: list[int] = []  # pidfds of the shims handed a run, until they exit
    warm_by = 0.0
    try:
        while True:
            if cold and (not running or time.monotonic() >= warm_by):
                _tell(spare[1], WARM_NOW)
                cold = False
            timeout = max(0.0, warm_by - time.monotonic()) if cold else None
            ready, _, _ = select.select([sock, *running], [], [], timeout)
            for ended in [r for r in ready if r in running]:
                running.remove(ended)
                os.close(ended)
            if sock not in ready:
                continue
            try:
                data, fds, _, _ = socket.recv_fds(sock, 4096, 2)
            except OSError:
                return
            if not data:
                return  # the agent is gone
            pid, ctl = spare
            try:
                socket.send_fds(ctl, [data], fds)
            except OSError:  # the spare died (killed by hand, say): a fresh one takes the run
                ctl.close()
                pid, ctl = fork_spare()
                socket.send_fds(ctl, [data], fds)
            ctl.close()
            for passed in fds:
                os.close(passed)
            sock.sendall(f"{pid}\n".encode())
            with contextlib.suppress(OSError):  # (gone already: it ended)
                running.append(os.pidfd_open(pid))
            spare = fork_spare()  # ready for the next run
            cold, warm_by = warm > 0, time.monotonic() + WARM_AFTER
    finally:
        spare[1].close()  # a spare left waiting reads end-of-file and exits
        for ended in running:
            os.close(ended)


def _tell(spare: socket.socket, message: bytes) -> None:
    with contextlib.suppress(OSError):  # it died: the run it would have had goes to a fresh one
        spare.send(message)


def _spare(agent: socket.socket, warm: int, idle: bool, group: bool) -> tuple[int, socket.socket]:
    """A shim forked now that waits for its run, with ``warm`` interpreters started for its ranks (at SCHED_IDLE
    if ``idle``, in niced autogroups if ``group``): (its pid, the socket its run's folder comes through)."""
    global _WARM
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # WARM_NOW is a message of its own
    pid = os.fork()
    if pid != 0:
        theirs.close()
        return pid, ours
    code = 1
    try:
        agent.close()
        ours.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # it waits for its own children (warm ranks, then ranks)
        runner = asyncio.Runner()
        runner.get_loop()  # made while waiting, not once the run is here
        data, fds, _, _ = socket.recv_fds(theirs, 4096, 2)
        if data == WARM_NOW:  # (a run that comes first starts its ranks cold)
            if warm > 0 and PDEATHSIG_WRAPPER:  # (a warm rank must die with its shim, as a cold one does)
                try:
                    env = startup_env(passthrough_env())
                    _WARM = WarmPool(sys.executable, env, warm, PDEATHSIG_WRAPPER, idle=idle, group=group)
                except OSError:  # out of processes or descriptors: its ranks start cold, as they would anyway
                    _WARM = None
            data, fds, _, _ = socket.recv_fds(theirs, 4096, 2)
        theirs.close()
        if data:
            os.setsid()
            folder = Path(data.decode())
            out = os.open(ShimFiles(folder).output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.environ[NOTIFY_FD_ENV] = str(fds[0]) if fds else "-1"
            os.environ[PMI_FD_ENV] = str(fds[1]) if len(fds) > 1 else "-1"
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            with runner:
                code = runner.run(main(folder))
        else:
            code = 0  # the launcher closed: no run came
    finally:
        os._exit(code)


async def main(folder: Path) -> int:
    files = ShimFiles(folder)
    files.write(files.pid, f"{os.getpid()} {start_time(os.getpid()) or ''}".encode())
    spec = _SPEC_DECODER.decode(files.spec.read_bytes())
    shim = Shim(files, spec)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, shim.wake.set)
    loop.add_signal_handler(signal.SIGTERM, shim.stop)
    loop.add_signal_handler(signal.SIGINT, shim.stop)
    return await shim.run()


if __name__ == "__main__":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the agent's terminal going away is not the run's end
    if sys.argv[1] == "--zygote":
        zygote(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    else:
        sys.exit(asyncio.run(main(Path(sys.argv[1]))))
