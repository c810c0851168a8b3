"""The agent's side of a run's shim (see ``shim.py``): start it, read what it writes, ask it to stop, and take
over the shim of a previous life of the agent.

Lines, exit codes and the run's metrics are read from the shim's files, so nothing depends on the agent having
been alive while the ranks printed: a restarted agent resumes each rank's log at the first line the bus has not
acknowledged, and the run's metrics at the offset it stored after the last one the bus took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

import services
from services.node_agent.runtime import PASSTHROUGH_ENV, Prepared, die_with_parent
from services.node_agent.shim import LineRecord, ShimFiles, ShimSpec, decode, encode
from shared import bus, schemas, subjects
from shared.errors import CadreError
from shared.procs import is_alive, start_time

READY_TIMEOUT = 60.0  # seconds for a shim to start its ranks (containers may take a while)
STOP_PATIENCE = 15.0  # past the grace, a shim that has not stopped its ranks is killed (its ranks die with it)
ADOPTED_POLL = 0.1  # seconds between looks at the files of a shim this agent did not start (no pipe)
SHIM_LOST = "lost: the run's shim on this node died, and the rank with it"  # how such a rank died
_SHIM_ENV = (*PASSTHROUGH_ENV, "DOCKER_HOST", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY")


class Kept(msgspec.Struct, kw_only=True):
    """What a restarted agent needs to take a run over from its shim (``kept.json``)."""

    assignment: schemas.Assignment
    prepared: Prepared | None = None
    dataset_paths: dict[str, Path] = {}
    held: list[Path] = []  # cache entries the run uses
    started_ns: int = 0
    group: str | None = None  # the sandbox container the node's ranks share
    line_base: dict[int, int] = {}  # each rank's number of the first line in its rank<N>.log
    launched: bool = False


def shim_env() -> dict[str, str]:
    """A shim's environment: never the agent's credentials."""
    env = {k: v for k, v in os.environ.items() if k in _SHIM_ENV}
    root = str(Path(services.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


class ShimLauncher:
    """One per agent: a process that has done the shim's imports and forks a shim per run (milliseconds, where a
    fresh interpreter takes ~80 ms). It dies with the agent; the shims it forked do not."""

    def __init__(self, log: Path, warm: int = 0) -> None:
        """``warm``: interpreters each spare shim starts ahead of its ranks (warm.py): the node's slots, for the
        process runtime."""
        self.log = log
        self.warm = warm
        self._popen: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()

    def _start(self) -> None:
        if self._sock is not None:
            self._sock.close()
        ours, theirs = socket.socketpair()
        with open(self.log, "ab") as out:
            # Not asyncio's subprocess: it kills its children when the loop closes.
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "services.node_agent.shim", "--zygote", str(theirs.fileno()), str(self.warm)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=shim_env(),
                pass_fds=(theirs.fileno(),), start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )  # fmt: skip
        theirs.close()
        self._sock = ours

    async def spawn(self, folder: Path, notify_fd: int, pmi_fd: int | None = None) -> int:
        """A new shim for ``folder`` (``notify_fd``: the write end of its notify pipe; ``pmi_fd``: the listening
        socket of the run's PMI server, bound before the other nodes were told its port); returns its pid."""
        async with self._lock:

            def ask() -> int:
                if self._popen is None or self._popen.poll() is not None:
                    self._start()
                assert self._sock is not None
                passed = [notify_fd] if pmi_fd is None else [notify_fd, pmi_fd]
                socket.send_fds(self._sock, [str(folder).encode()], passed)
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = self._sock.recv(64)
                    if not chunk:
                        raise CadreError("the shim launcher exited; see its log " + str(self.log))
                    reply += chunk
                return int(reply)

            return await asyncio.to_thread(ask)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the launcher reads end-of-file and exits
            self._sock = None


def shim_folder(work_dir: Path, run_id: str) -> Path:
    return work_dir / "runs" / f"{run_id}.shim"


class RunShim:
    def __init__(self, folder: Path) -> None:
        self.files = ShimFiles(folder)
        self.pids: dict[int, int] = {}
        self._proc: tuple[int, int | None] | None = None  # (pid, start time) of a shim this agent started
        self._pipe: int | None = None  # the read end of the shim's notify pipe (only for a shim we started)
        self._tick = asyncio.Event()
        self._stop_asked = False
        self._killer: asyncio.TimerHandle | None = None

    # --- state kept for a restarted agent --------------------------------------------------------------
    def keep(self, kept: Kept) -> None:
        self.files.folder.mkdir(parents=True, exist_ok=True)
        self.files.write(self.files.kept, encode(kept))

    def kept(self) -> Kept | None:
        try:
            return decode(self.files.kept.read_bytes(), Kept)  # type: ignore[no-any-return]
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    # --- waking up when the shim wrote something ---------------------------------------------------------
    def ticket(self) -> asyncio.Event:
        """Take this before looking at the files, then ``wait`` on it: a write in between still wakes you."""
        return self._tick

    async def wait(self, ticket: asyncio.Event) -> None:
        timeout = 1.0 if self._pipe is not None else ADOPTED_POLL
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ticket.wait(), timeout)

    def _woken(self) -> None:
        assert self._pipe is not None
        try:
            data = os.read(self._pipe, 4096)
        except BlockingIOError:
            return
        if not data:  # the shim is gone
            asyncio.get_running_loop().remove_reader(self._pipe)
            os.close(self._pipe)
            self._pipe = None
        self._tick.set()
        self._tick = asyncio.Event()

    # --- life -------------------------------------------------------------------------------------------
    def alive(self) -> bool:
        if self._proc is not None:
            return is_alive(*self._proc)
        return self.files.shim_alive()

    def touch(self) -> None:
        """The agent is alive and reaches the bus: the shim must not fence the ranks."""
        with contextlib.suppress(OSError):
            self.files.alive.touch()

    async def launch(self, spec: ShimSpec, launcher: ShimLauncher, pmi: socket.socket | None = None) -> None:
        """Start the shim and wait until it has started the ranks (CadreError if it could not)."""
        self.files.folder.mkdir(parents=True, exist_ok=True)
        self.files.write(self.files.spec, encode(spec))
        self.touch()
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        try:
            pid = await launcher.spawn(self.files.folder, write, pmi.fileno() if pmi is not None else None)
        finally:
            os.close(write)
        self._proc = (pid, start_time(pid))
        self._pipe = read
        asyncio.get_running_loop().add_reader(read, self._woken)
        ready = await self._ready()
        if ready is None:
            if self.alive():
                self.kill()
                raise CadreError(f"the run's shim (pid {pid}) did not start the ranks within {READY_TIMEOUT:g}s")
            raise CadreError(
                f"the run's shim (pid {pid}) exited before it started the ranks: {self._output_tail()} "
                f"(what it printed before its own log was open is in {launcher.log})"
            )
        if "error" in ready:
            raise CadreError(ready["error"])

    async def adopt(self) -> bool:
        """Take over the shim of a previous life of this agent; False if it never started the ranks."""
        ready = await self._ready()  # it may be starting them now
        if ready is None or "error" in ready:
            return False
        self.touch()
        return True

    async def _ready(self) -> dict[str, Any] | None:
        """``ready.json`` once the shim wrote it (the ranks' pids are then known), or None if the shim died or took
        longer than READY_TIMEOUT."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            ticket = self.ticket()
            ready = self.files.read_json(self.files.ready)
            if ready is not None:
                self.pids = {int(rank): pid for rank, pid in ready.get("pids", {}).items()}
                return ready  # type: ignore[no-any-return]
            if not self.alive() or time.monotonic() > deadline:
                return None
            await self.wait(ticket)

    def _output_tail(self) -> str:
        try:
            lines = self.files.output.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return "\n".join(lines[-15:]) or "its log is empty"

    def stop(self, grace: float) -> None:
        """Ask the shim to stop the ranks (SIGTERM, SIGKILL after ``grace``); one that does not is killed."""
        if self._stop_asked:
            return
        self._stop_asked = True
        with contextlib.suppress(OSError):
            self.files.write(self.files.stop, f"{grace}".encode())
        self._signal(signal.SIGUSR1)
        loop = asyncio.get_running_loop()
        self._killer = loop.call_later(grace + STOP_PATIENCE, self._signal, signal.SIGKILL)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        proc = self.files.shim_process()
        if proc is not None and is_alive(*proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc[0], sig)

    def close(self) -> None:
        """The run is over here: the agent stops listening (the shim has exited or is exiting)."""
        if self._killer is not None:
            self._killer.cancel()
        if self._pipe is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pipe)
            os.close(self._pipe)
            self._pipe = None

    def finished_ranks(self, assignment: schemas.Assignment, node_id: str) -> bool:
        """Whether every rank of this node exited and said so (what a dead shim leaves is then complete)."""
        mine = [slot.rank for slot in assignment.placement if slot.node_id == node_id]
        return all(self.files.exit(rank).exists() for rank in mine)

    def finished(self) -> bool:
        return self.files.done.exists() or not self.alive()

    # --- what the ranks did ------------------------------------------------------------------------------
    async def lines(self, rank: int, skip: int = 0) -> AsyncIterator[list[schemas.LogLine]]:
        """Rank ``rank``'s lines from the ``skip``-th on, in the batches the shim writes them, until the rank has
        exited."""
        path = self.files.log(rank)
        exit_file = self.files.exit(rank)
        partial = b""
        source = None
        try:
            while True:
                ticket = self.ticket()
                over = exit_file.exists() or not self.alive()  # looked at first: what it wrote before is read
                if source is None and path.exists():
                    source = open(path, "rb")
                while source is not None and (chunk := source.read(1 << 16)):
                    *complete, partial = (partial + chunk).split(b"\n")
                    out: list[schemas.LogLine] = []
                    for raw in complete:
                        got = _read_record(raw)
                        if skip:
                            taken = min(skip, len(got))
                            skip -= taken
                            got = got[taken:]
                        out += got
                    if out:
                        yield out
                if over:
                    return
                await self.wait(ticket)
        finally:
            if source is not None:
                source.close()

    def exit_of(self, rank: int) -> tuple[int, str | None]:
        """Rank ``rank``'s exit code and how it died (once ``lines`` ended)."""
        info = self.files.read_json(self.files.exit(rank))
        if info is None:
            return -9, SHIM_LOST
        return int(info["code"]), info.get("death")

    def mpi_abort(self) -> tuple[int, int] | None:
        info = self.files.read_json(self.files.mpi_abort)
        return (int(info["rank"]), int(info["code"])) if info else None

    def fenced(self) -> str | None:
        try:
            return self.files.fenced.read_text()
        except OSError:
            return None


_record_decoder = msgspec.json.Decoder(LineRecord)


def _read_record(raw: bytes) -> list[schemas.LogLine]:
    """One line of a rank's log file: a batch (``LineRecord``), or one line as shims before batches wrote it."""
    if raw.startswith(b"["):
        rec = _record_decoder.decode(raw)
        return [schemas.LogLine(rec.t, rec.stream, text) for text in rec.lines]  # type: ignore[arg-type]
    t, stream, text = raw.decode("utf-8", "replace").split("\t", 2)
    return [schemas.LogLine(float(t), stream, text)]  # type: ignore[arg-type]


async def forward_context(
    shim: RunShim, js: JetStreamContext, run_id: str, node_id: str, attempt: int, patience: float
) -> None:
    """Publish what the ranks sent through Run.get_context() (the shim's ``context.jsonl``) until the shim is done.

    The offset after the last batch the bus took is stored; a batch published again after a crash carries the
    same message id, so the stream keeps it once.
    """
    files = shim.files
    try:
        offset = int(files.context_offset.read_text() or 0)
    except (OSError, ValueError):
        offset = 0
    subject = subjects.run_metrics(run_id)
    log = structlog.get_logger().bind(run_id=run_id, component="run_context")
    source = None  # kept open: a wake-up reads on where the last one stopped
    partial = b""
    try:
        while True:
            ticket = shim.ticket()
            over = shim.finished()
            if source is None and files.context.exists():
                source = open(files.context, "rb")
                source.seek(offset)
            *complete, partial = (partial + (source.read() if source else b"")).split(b"\n")
            for raw in complete:
                headers = {"Nats-Msg-Id": f"{run_id}:ctx:{node_id}:{attempt}:{offset}"}
                try:
                    await bus.outlast(lambda r=raw, h=headers: js.publish(subject, r, timeout=10, headers=h), patience)
                except Exception as exc:  # the bus stayed away past the patience: said, and the run goes on
                    log.error("run_data_lost", error=str(exc))
                offset += len(raw) + 1
                with contextlib.suppress(OSError):
                    files.write(files.context_offset, str(offset).encode())
            if over:
                return
            await shim.wait(ticket)
    finally:
        if source is not None:
            source.close()


async def acknowledged_lines(js: JetStreamContext, run_id: str, rank: int, attempt: int) -> int | None:
    """How many of a rank's lines the log stream holds, by its last batch of ``attempt`` (None: no batch)."""
    try:
        msg = await js.get_last_msg(subjects.LOGS_STREAM, subjects.run_logs(run_id, rank))
    except NotFoundError:  # nothing published for this rank yet
        return None
    batch = schemas.decode(msg.data, schemas.LogBatch)
    if batch.attempt != attempt:
        return None
    return batch.first_line + len(batch.lines)
