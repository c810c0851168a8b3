"""Warm interpreters: a spare shim starts its node's Python ranks ahead of time, before any run asks for them.

Starting the interpreter is most of a short rank's start (~20 ms of CPU each; four at once on a busy node took
50-60 ms before a script's first line). A warm rank is that interpreter, started by the spare shim with the
environment every process rank shares, waiting on a pipe. When the run comes, the shim writes the rank's argv, cwd,
environment and PYTHONPATH down the pipe, and the interpreter runs the script the way ``python script.py`` would:
in the real ``__main__``, with the same ``sys.argv``, ``sys.path``, ``__file__`` and exit codes. A rank whose
environment would start the interpreter differently (a PYTHON* variable, the locale) or that runs another Python
(a pip environment's venv) starts cold, as before. Ray's prestarted workers and Android's zygote do the same.

The warm process is the shim's child, in a session of its own, killed by the kernel if the shim dies (as a cold
rank is), so the shim follows it, stops it and reaps it like any other rank.

Interpreters start while the node may be running ranks (a spare is refilled as its run starts), so they start at
low priority where it can be undone when the run comes: SCHED_IDLE, and, where the kernel groups each session
(autogroups), their session's group niced to 19. Without the group's niceness, four refills started beside a 2x2
MPI job took a quarter of its CPUs: its ranks' numpy import took ~55 ms longer. (Where no CPU is idle during
the run, as with four ranks on two CPUs, their work moves to later in it: the job's wall stays the same.)
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from services.node_agent.runtime import LINE_LIMIT, _Process, merged_lines

WARM_MAX = 8  # warm interpreters per spare shim at most, whatever the node's slot count
GROUP_NICE = 19  # a waiting interpreter's autogroup: weighed as 15 against a rank's 1024
_CAP_SYS_ADMIN = 21
# Variables the interpreter reads while it starts: a rank that sets any of them differently starts cold.
# PYTHONPATH is not one: the warm interpreter puts it on sys.path as start-up would.
_STARTUP_PREFIXES = ("PYTHON", "LC_")
_STARTUP_NAMES = ("LANG",)

# Run with ``python -c``: everything it defines is wiped from ``__main__`` before the script runs, and it imports
# only what the interpreter has loaded already (os, sys, marshal), so the script finds the process as it would.
LOADER = r"""
def _cadre_warm():
    import marshal, os, sys
    fd = int(sys.argv[1])
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    if not chunks:  # the shim went, or needed no more ranks
        raise SystemExit(0)
    argv, cwd, env = marshal.loads(b"".join(chunks))
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    script = os.path.abspath(argv[0])
    try:
        with open(script, "rb") as fh:
            source = fh.read()
    except OSError as exc:  # as python reports a script it cannot open
        print(f"{sys.executable}: can't open file {script!r}: [Errno {exc.errno}] {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    # As start-up builds it: the script's real directory, then PYTHONPATH's entries made absolute.
    extra = [os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep)] if env.get("PYTHONPATH") else []
    sys.path[0:1] = [os.path.dirname(os.path.realpath(script)), *extra]
    sys.argv = list(argv)
    sys.orig_argv = [sys.executable, *argv]
    import __main__, builtins
    from importlib.machinery import SourceFileLoader
    scope = __main__.__dict__
    scope.clear()
    scope.update(__name__="__main__", __doc__=None, __package__=None, __spec__=None, __annotations__={},
                 __builtins__=builtins, __file__=script, __cached__=None,
                 __loader__=SourceFileLoader("__main__", script))
    try:
        exec(compile(source, script, "exec", dont_inherit=True), scope)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # as the interpreter reports it: from the script's own frame down
        exc.__traceback__ = exc.__traceback__.tb_next
        sys.excepthook(type(exc), exc, exc.__traceback__)
        raise SystemExit(1) from None
_cadre_warm()
"""


def idle_reversible() -> bool:
    """Whether a process here may move a child of its own back from SCHED_IDLE to normal scheduling (root, or an
    RLIMIT_NICE that allows it): then warm interpreters start in the CPU's idle time only, not in that of the run
    that is starting as they do (measured: four started beside a 2x2 MPI job slowed its imports by ~100 ms). Tried
    in a child, never in the caller: one that could not get back would stay idle."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            code = 0
        except OSError:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def group_nice_reversible() -> bool:
    """Whether the kernel puts each session in an autogroup of its own and this process may set an autogroup's
    niceness and set it back at once: CAP_SYS_ADMIN, as the kernel lets others do it once every 100 ms only, and
    a rank must never wait for that (nor stay niced)."""
    try:
        if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
            return False
        if not Path("/proc/self/autogroup").exists():
            return False
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    effective = next((line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0")
    return bool(int(effective, 16) >> _CAP_SYS_ADMIN & 1)


def _set_group_nice(pid: int, nice: int) -> bool:
    """Sets the niceness of the autogroup of ``pid``'s session (autogroup(7)); False if refused."""
    try:
        fd = os.open(f"/proc/{pid}/autogroup", os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, str(nice).encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def startup_env(base: dict[str, str]) -> dict[str, str]:
    """What a warm interpreter starts with: the variables every process rank gets (``base``: the runtime's
    pass-through ones), and unbuffered output as every rank has it."""
    return {**base, "PYTHONUNBUFFERED": "1"}


def starts_alike(warm: dict[str, str], rank: dict[str, str]) -> bool:
    """Whether an interpreter started with ``warm`` behaves as one started with ``rank`` would."""
    for name in warm.keys() | rank.keys():
        if name != "PYTHONPATH" and (name.startswith(_STARTUP_PREFIXES) or name in _STARTUP_NAMES):
            if warm.get(name) != rank.get(name):
                return False
    return True


class WarmRank:
    """One started interpreter, waiting for its script."""

    def __init__(
        self, python: str, env: dict[str, str], wrapper: list[str], idle: bool = False, group: bool = False
    ) -> None:
        """``idle``: it starts at SCHED_IDLE; ``group``: its session's autogroup too (see ``group_nice_reversible``)."""
        read, self._ctl = os.pipe()
        self.idle = idle
        self.grouped = False
        try:
            self.proc = subprocess.Popen(
                [*wrapper, python, "-c", LOADER, str(read)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
                pass_fds=(read,), start_new_session=True,
            )  # fmt: skip
        except BaseException:
            os.close(self._ctl)
            raise
        finally:
            os.close(read)
        if idle:  # (a lower priority is always allowed; the first microseconds of its start are not idle)
            try:
                os.sched_setscheduler(self.proc.pid, os.SCHED_IDLE, os.sched_param(0))
            except OSError:
                self.idle = False
        # Its own session is its own autogroup, which the kernel weighs as one task of nice 0 whatever the
        # priority of the tasks in it: SCHED_IDLE alone would leave it a full share beside the ranks it waits for.
        self.grouped = self.idle and group and _set_group_nice(self.proc.pid, GROUP_NICE)

    def wake(self) -> bool:
        """Back to normal scheduling, as a cold rank runs (before it is handed its script); False if refused."""
        if not self.idle:
            return True
        if self.grouped and not _set_group_nice(self.proc.pid, 0):
            return False
        self.grouped = False
        try:
            os.sched_setscheduler(self.proc.pid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            return False
        self.idle = False
        return True

    def release(self) -> None:
        """No run for it: it reads end-of-file and exits."""
        if self._ctl >= 0:
            os.close(self._ctl)
            self._ctl = -1

    def hand(self, argv: list[str], cwd: str, env: dict[str, str]) -> None:
        data = marshal.dumps((list(argv), cwd, dict(env)))
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._ctl, view) :]
        finally:
            self.release()


class WarmPool:
    """The spare shim's warm ranks, all of one interpreter and one start-up environment."""

    def __init__(
        self, python: str, env: dict[str, str], count: int, wrapper: list[str], idle: bool = False, group: bool = False
    ) -> None:
        """``idle``: start them at SCHED_IDLE (see ``idle_reversible``); ``group``: their autogroups niced too."""
        self.python = python
        self.env = env
        self.ranks = [WarmRank(python, env, wrapper, idle, group) for _ in range(min(count, WARM_MAX))]

    def take(self, argv: list[str], cwd: str, env: dict[str, str]) -> WarmProcess | None:
        """A warm rank running ``argv`` (``python script args...``), or None: none is left, or this rank must start
        cold (another interpreter, an option before the script, a start-up variable of its own)."""
        if not self.ranks or len(argv) < 2 or argv[0] != self.python or argv[1].startswith("-"):
            return None
        if not starts_alike(self.env, env):
            return None
        rank = self.ranks.pop()
        if rank.proc.poll() is not None or not rank.wake():  # killed while it waited, or it would stay idle
            rank.release()
            return self.take(argv, cwd, env)
        rank.hand(argv[1:], cwd, env)
        return WarmProcess(rank.proc)

    async def release(self) -> None:
        """The ranks no run took are killed and reaped, not left as zombies for the run's whole length. Killed, not
        told to exit: one still starting at SCHED_IDLE on a node the run keeps busy would take its time to get to
        end-of-file, and the shim waits for it before it is done."""
        left, self.ranks = self.ranks, []
        for rank in left:
            rank.release()
            with contextlib.suppress(ProcessLookupError):
                rank.proc.kill()
        await asyncio.gather(*(WarmProcess(rank.proc).wait() for rank in left), return_exceptions=True)


class WarmProcess(_Process):
    """A started rank that came from the warm pool: a plain process rank, but the shim's own child rather than
    asyncio's, so its pipes and its exit are watched here."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(proc)
        self._popen = proc
        self._exit: asyncio.Future[int] | None = None

    async def lines(self) -> AsyncIterator[tuple[str, list[str]]]:
        loop = asyncio.get_running_loop()
        readers = []
        for pipe in (self._popen.stdout, self._popen.stderr):
            reader = asyncio.StreamReader(limit=LINE_LIMIT, loop=loop)
            await loop.connect_read_pipe(lambda reader=reader: asyncio.StreamReaderProtocol(reader), pipe)
            readers.append(reader)
        async for item in merged_lines(readers[0], readers[1]):
            yield item

    def _exited(self) -> asyncio.Future[int]:
        """The exit code (negative: the signal), from a pidfd: no thread per rank, no SIGCHLD handler."""
        if self._exit is None:
            loop = asyncio.get_running_loop()
            self._exit = exit_ = loop.create_future()
            try:
                fd = os.pidfd_open(self._popen.pid)
            except OSError:  # a kernel before 5.3: a thread waits instead
                task = asyncio.ensure_future(asyncio.to_thread(self._popen.wait))
                task.add_done_callback(lambda t: exit_.done() or exit_.set_result(t.result()))
                return exit_

            def reap() -> None:
                loop.remove_reader(fd)
                os.close(fd)
                _, status = os.waitpid(self._popen.pid, 0)
                self._popen.returncode = code = os.waitstatus_to_exitcode(status)
                if not exit_.done():
                    exit_.set_result(code)

            loop.add_reader(fd, reap)
        return self._exit

    async def wait(self) -> int:
        return await asyncio.shield(self._exited())
