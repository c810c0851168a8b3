"""How a rank's process is started and stopped, and how a job's environment is made ready.

Two runtimes implement the same interface: :class:`ProcessRuntime` (plain child processes, for hosts without
Docker and the local cluster) and :class:`~services.node_agent.docker_runtime.DockerRuntime` (one container per
rank). The agent picks one by configuration (``--runtime``).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import site
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from shared.environments import Environment
from shared.errors import CadreError
from shared.schemas import RegistryCredential
from shared.states import Cause

if TYPE_CHECKING:
    from services.node_agent.warm import WarmPool

LINE_LIMIT = 1 << 20  # a single line longer than this is split, not fatal
PR_SET_PDEATHSIG = 1
VENV_LAYOUT = "site-2"  # part of a venv's build key: venvs built the old way (no .pth processing) are not reused
# What a rank's container (or other runtime object) is labelled with: how a restarted agent finds its leftovers.
LABEL_NODE, LABEL_RUN, LABEL_RANK = "io.cadre.node", "io.cadre.run", "io.cadre.rank"
# Only these variables of the agent's own environment reach a plain-process job: never its credentials.
PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL", "TERM")


class EnvironmentBuildError(CadreError):
    """The job's environment could not be made ready (missing image, failed package install, no conda)."""

    code = Cause.ENVIRONMENT_BUILD_FAILED


@dataclass(frozen=True)
class Mount:
    path: Path  # mounted at the same path inside a container, so every path the job is told stays valid
    read_only: bool = False


@dataclass(frozen=True)
class Prepared:
    """What a runtime made of an environment: the interpreter to run, and for containers the image."""

    python: str
    image: str | None = None
    key: str | None = None  # the build key, when something was built or reused
    cache_path: Path | None = None  # what the node's cache must keep while the run uses it (a venv)


@dataclass(frozen=True)
class ProcessSpec:
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    name: str = "rank"
    prepared: Prepared | None = None
    labels: dict[str, str] = field(default_factory=dict)  # run, rank and node: how leftovers are found
    mounts: list[Mount] = field(default_factory=list)
    gpu_ids: list[int] = field(default_factory=list)
    shm_size: int | None = None
    cpus: float | None = None
    memory: int | None = None
    share_with: str | None = None  # the run's group on this node (open_group), whose IPC/PID namespaces to join
    python_path: list[Path] = field(default_factory=list)  # first on PYTHONPATH: the job's cadre package

    def pythonpath(self, base: str | None) -> str:
        """``python_path``, then the job's own PYTHONPATH (``base``: the user's, or else the image's)."""
        return os.pathsep.join([*(str(p) for p in self.python_path), *([base] if base else [])])


class ProcessHandle(Protocol):
    @property
    def pid(self) -> int:
        """The process (and process group) id, recorded so a restarted agent can clean up after a crash."""
        ...

    @property
    def death(self) -> str | None:
        """How the process died when its exit code does not say it (``"killed: out of memory"``)."""
        ...

    def lines(self) -> AsyncIterator[tuple[str, list[str]]]:
        """(stream, lines) as they come, stream being "o" or "e", until both pipes close: whole lines only, in
        batches (whatever one read of the pipe held), so no per-line object crosses the event loop."""
        ...

    async def wait(self) -> int: ...

    async def terminate(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds, to the whole process tree."""
        ...

    async def cleanup(self) -> None:
        """Once the rank has exited: kill what it left behind (its process group, or its container)."""
        ...


Say = Callable[[str], None]


class Runtime(Protocol):
    kind: str  # "process" | "docker"

    async def prepare(self, env: Environment, say: Say, auth: RegistryCredential | None = None) -> Prepared:
        """Make the environment ready (build once per hash, reuse after), telling ``say`` what happens.

        ``auth``: the private registry's credential, used for this pull only and never kept or logged.
        """
        ...

    async def start(self, spec: ProcessSpec) -> ProcessHandle: ...

    async def open_group(self, spec: ProcessSpec) -> str | None:
        """Namespaces that the node's ranks of one run share (None where they share the host's anyway)."""
        ...

    async def close_group(self, ident: str) -> None: ...

    async def leftovers(self, node_id: str, keep: set[str]) -> set[str]:
        """Kill what a previous life of this agent left running, but for the runs in ``keep`` (taken over);
        return the run ids it belonged to."""
        ...

    async def remove_run(self, node_id: str, run_id: str) -> None:
        """Kill what is left of a run's ranks on this node once its shim is gone (containers outlive it)."""
        ...

    async def reclaim(self, since: float) -> int:
        """Once a run's ranks on this node are gone: free what they left on the host (shared memory)."""
        ...

    def describe(self) -> str:
        """One line for the agent's start-up log: which runtime, and why."""
        ...


READ_SIZE = 1 << 16
# A read that comes right after the last one (the process prints without pause) waits this long before the next:
# a flood is then read in hundreds of large pieces, not tens of thousands of small ones (each a record, a write and
# a wake-up down the line), while a line after a quiet spell is read at once. A pipe's 64 KiB last longer at 1M
# lines/s.
READ_COALESCE = 0.002


class LineSplitter:
    """Bytes as they come from a pipe -> whole lines, decoded once per chunk rather than once per line. A line
    longer than LINE_LIMIT is split, not held forever; a trailing "\r" goes (CRLF output)."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        buf = self._partial + data if self._partial else data
        end = buf.rfind(b"\n")
        if end < 0:
            self._partial = buf
            complete: list[str] = []
        else:
            self._partial = buf[end + 1 :]
            complete = _lines(buf[:end])
        while len(self._partial) > LINE_LIMIT:
            complete += _lines(self._partial[:LINE_LIMIT])
            self._partial = self._partial[LINE_LIMIT:]
        return complete

    def rest(self) -> list[str]:
        """What is left after the stream closed, without its newline."""
        rest, self._partial = self._partial, b""
        return _lines(rest) if rest else []


def _lines(raw: bytes) -> list[str]:
    text = raw.decode("utf-8", "replace")
    lines = text.split("\n")
    return [line.rstrip("\r") for line in lines] if "\r" in text else lines


async def _linger(reader: asyncio.StreamReader) -> None:
    """READ_COALESCE with the pipe not read meanwhile: what the process writes piles up in the pipe, to be read in
    one go (the reader's transport would otherwise take each small write as it comes, which cost the shim ~1 s of
    CPU per million lines where it now costs ~0.15). The transport is the one StreamReader.set_transport was given;
    a reader without one, or one the reader's own flow control paused (its buffer is full), just waits."""
    transport = getattr(reader, "_transport", None)
    if transport is None or not transport.is_reading():
        await asyncio.sleep(READ_COALESCE)
        return
    transport.pause_reading()
    try:
        await asyncio.sleep(READ_COALESCE)
    finally:
        if not transport.is_closing():
            transport.resume_reading()


async def merged_lines(
    stdout: asyncio.StreamReader | None, stderr: asyncio.StreamReader | None
) -> AsyncIterator[tuple[str, list[str]]]:
    """A process's output as it comes: ("o" or "e", the whole lines of one read), until both pipes close."""
    queue: asyncio.Queue[tuple[str, list[str]] | None] = asyncio.Queue(64)

    async def pump(reader: asyncio.StreamReader | None, tag: str) -> None:
        if reader is None:
            return
        split = LineSplitter()
        loop = asyncio.get_running_loop()
        last = -1.0
        while chunk := await reader.read(READ_SIZE):
            if got := split.feed(chunk):
                await queue.put((tag, got))
            now = loop.time()
            if now - last < READ_COALESCE:
                await _linger(reader)
            last = now
        if rest := split.rest():
            await queue.put((tag, rest))

    async def both() -> None:
        await asyncio.gather(pump(stdout, "o"), pump(stderr, "e"))
        await queue.put(None)

    task = asyncio.create_task(both())
    try:
        while (item := await queue.get()) is not None:
            yield item
    finally:
        task.cancel()


class _Process:
    def __init__(self, proc: asyncio.subprocess.Process | subprocess.Popen[bytes]) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def death(self) -> str | None:
        return None

    async def lines(self) -> AsyncIterator[tuple[str, list[str]]]:
        assert isinstance(self._proc, asyncio.subprocess.Process)
        async for item in merged_lines(self._proc.stdout, self._proc.stderr):
            yield item

    async def wait(self) -> int:
        assert isinstance(self._proc, asyncio.subprocess.Process)
        return await self._proc.wait()

    async def terminate(self, grace: float) -> None:
        if self._proc.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), timeout=grace)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            await self.wait()

    async def cleanup(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self._proc.pid, sig)  # the process leads its own group: children go too
        except ProcessLookupError:
            pass


def die_with_parent() -> None:
    """In the child, before exec: if the agent dies (even by SIGKILL), the kernel kills the rank too."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: a restarted agent still kills what it recorded


def _pdeathsig_wrapper() -> list[str] | None:
    """util-linux's setpriv, which sets PR_SET_PDEATHSIG and execs the rank: with it the rank is spawned without
    a Python preexec_fn, which would make every spawn a full fork of the shim (~2 ms, against ~0.3)."""
    path = shutil.which("setpriv") if sys.platform == "linux" else None
    if path is None:
        return None
    try:
        usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [path, "--pdeathsig", "KILL", "--"] if "--pdeathsig" in usage else None


PDEATHSIG_WRAPPER = _pdeathsig_wrapper()  # once per agent: the shims it forks inherit it


class ProcessRuntime:
    """Runs a rank as a plain child process in its own session (for hosts without Docker, and the local cluster).

    pip packages go into a venv per environment hash under ``<work_dir>/envs``, layered over the agent's own
    Python (so mpi4py and the like stay importable) and reused by every later run with the same packages.
    """

    kind = "process"

    def __init__(
        self, work_dir: Path, pip_options: dict[str, str] | None = None, reason: str = "", warm: WarmPool | None = None
    ) -> None:
        self.envs_dir = work_dir / "envs"
        self.pip_options = dict(pip_options or {})
        self.reason = reason or "configured with --runtime process"
        self._locks: dict[str, asyncio.Lock] = {}
        self.warm = warm  # in a shim forked by the launcher: its warm interpreters

    def describe(self) -> str:
        return f"process runtime ({self.reason}): ranks run as child processes of the agent, with its Python"

    async def prepare(self, env: Environment, say: Say, auth: RegistryCredential | None = None) -> Prepared:
        if env.image is not None:
            raise EnvironmentBuildError(
                f"custom_docker_image {env.image!r} needs the Docker runtime; this node runs plain processes"
            )
        if env.conda_packages:
            raise EnvironmentBuildError(
                "conda_packages need the Docker runtime and an image with conda; this node runs plain processes "
                "(use pip_packages, or a compute target whose agents run --runtime docker)"
            )
        if not env.pip_packages:
            return Prepared(python=sys.executable)
        key = env.build_key(f"{sys.executable} {sys.version} {VENV_LAYOUT}", _index_fingerprint(self.pip_options))
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            return await self._venv(env, key, say)

    async def _venv(self, env: Environment, key: str, say: Say) -> Prepared:
        home = self.envs_dir / key
        python = home / "bin" / "python"
        if (home / ".ready").exists():
            say(f"environment {key}: reusing the venv built earlier ({env.describe()})")
            return Prepared(python=str(python), key=key, cache_path=home)
        shutil.rmtree(home, ignore_errors=True)  # a build that died half-way
        started = time.monotonic()
        say(f"environment {key}: building a venv ({env.describe()})")
        code, tail = await _stream([sys.executable, "-m", "venv", "--without-pip", str(home)], say, {})
        if code != 0:
            shutil.rmtree(home, ignore_errors=True)
            raise EnvironmentBuildError(f"creating the venv failed (exit code {code}):\n" + "\n".join(tail))
        # Layer the venv over the agent's packages: what the job installs comes first on sys.path. addsitedir, not
        # plain path lines, so the .pth files there run too (an editable install's import hook, for one).
        bases = [p for p in site.getsitepackages() if Path(p).is_dir()]
        layer = f"import site; list(map(site.addsitedir, {bases!r}))\n"
        (Path(_site_packages(python)) / "_cadre_base.pth").write_text(layer)
        pip_env = {**passthrough_env(), **self.pip_options}
        pip_env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        argv = [sys.executable, "-m", "pip", "--python", str(python), "install", "--progress-bar", "off"]
        code, tail = await _stream([*argv, *env.pip_packages], say, pip_env)
        if code != 0:
            shutil.rmtree(home, ignore_errors=True)
            raise EnvironmentBuildError(f"pip install failed (exit code {code}):\n" + "\n".join(tail))
        (home / ".ready").write_text(f"{time.time()}\n")
        say(f"environment {key}: built in {time.monotonic() - started:.1f}s")
        return Prepared(python=str(python), key=key, cache_path=home)

    async def start(self, spec: ProcessSpec) -> ProcessHandle:
        env = {**passthrough_env(), **spec.env}
        if spec.python_path:
            env["PYTHONPATH"] = spec.pythonpath(spec.env.get("PYTHONPATH"))
        if self.warm is not None and (started := self.warm.take(spec.argv, str(spec.cwd), env)) is not None:
            return started  # an interpreter the spare shim started before the run came (warm.py)
        # If the shim dies (even by SIGKILL), the kernel kills the rank too.
        wrapper = PDEATHSIG_WRAPPER or []
        proc = await asyncio.create_subprocess_exec(
            *wrapper,
            *spec.argv,
            cwd=spec.cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=LINE_LIMIT,
            preexec_fn=die_with_parent if sys.platform == "linux" and not wrapper else None,
        )
        return _Process(proc)

    async def open_group(self, spec: ProcessSpec) -> str | None:
        return None  # processes on one host share IPC and PIDs already

    async def close_group(self, ident: str) -> None:
        return None

    async def reclaim(self, since: float) -> int:
        return await asyncio.to_thread(reclaim_shared_memory, since)

    async def remove_run(self, node_id: str, run_id: str) -> None:
        return None  # a plain-process rank dies with its shim (PR_SET_PDEATHSIG)

    async def leftovers(self, node_id: str, keep: set[str]) -> set[str]:
        return set()  # ranks die with their shim (PR_SET_PDEATHSIG), and a shim is found by its folder


SHM_DIR = Path("/dev/shm")
SHM_PATTERNS = ("mpich_shm_*",)  # MPICH's intra-node segments; a job that is killed never unlinks them
SHM_SETTLE = 0.2  # seconds between the two looks: a segment just created is mapped by its creator by then


def reclaim_shared_memory(since: float) -> int:
    """Unlink the MPI shared-memory segments, written since ``since``, that no live process maps.

    They live in RAM (tmpfs) until the host reboots: without this, every killed MPI job leaks a few MB. A segment
    must be unmapped at two looks ``SHM_SETTLE`` apart, so one that a starting job has just created is left alone.
    Returns how many bytes were freed.
    """
    if not SHM_DIR.is_dir():
        return 0
    # A job that ended cleanly unlinked its segments: then there is nothing to look for in every process's maps
    # (reading them all cost the agent a third of its CPU per MPI run, while the next run was starting).
    recent = _written_since({p for pattern in SHM_PATTERNS for p in SHM_DIR.glob(pattern)}, since)
    candidates = _unmapped(recent) if recent else set()
    if not candidates:
        return 0
    time.sleep(SHM_SETTLE)
    freed = 0
    for path in _unmapped(_written_since(candidates, since)):
        try:
            size = path.stat().st_size
            path.unlink()
            freed += size
        except OSError:
            continue
    return freed


def _written_since(paths: set[Path], since: float) -> set[Path]:
    out = set()
    for path in paths:
        try:
            if path.stat().st_mtime >= since:
                out.add(path)
        except OSError:
            continue  # unlinked meanwhile
    return out


def _unmapped(paths: set[Path]) -> set[Path]:
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = [line for line in maps.read_text().splitlines() if "/dev/shm/" in line]
            mapped.update(line.split(None, 5)[5].strip() for line in lines)
        except (OSError, IndexError):
            continue  # the process went away, or is not ours to read
    return {path for path in paths if str(path) not in mapped}


def _site_packages(python: Path) -> str:
    lib = python.parent.parent / "lib"
    return str(next(lib.glob("python3*/site-packages")))


def _index_fingerprint(options: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(options.items()))


async def _stream(argv: list[str], say: Say, env: dict[str, str], keep: int = 40) -> tuple[int, list[str]]:
    """Run a build step, passing each output line to ``say``; returns the exit code and the last lines."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env or None,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        limit=LINE_LIMIT,
    )
    tail: deque[str] = deque(maxlen=keep)
    assert proc.stdout is not None
    async for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip()
        say(line)
        tail.append(line)
    return await proc.wait(), list(tail)


def passthrough_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in PASSTHROUGH_ENV}
