"""How a rank's process is started and stopped. The Docker runtime (issue #6) implements the same interface."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

LINE_LIMIT = 1 << 20
PR_SET_PDEATHSIG = 1  # a single line longer than this is split, not fatal


@dataclass(frozen=True)
class ProcessSpec:
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    name: str = "rank"


class ProcessHandle(Protocol):
    @property
    def pid(self) -> int:
        """The process (and process group) id, recorded so a restarted agent can clean up after a crash."""
        ...

    def lines(self) -> AsyncIterator[tuple[str, str]]:
        """(stream, text) pairs, stream being "o" or "e", until both pipes close."""
        ...

    async def wait(self) -> int: ...

    async def terminate(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds, to the whole process tree."""
        ...

    def kill_leftovers(self) -> None:
        """SIGKILL whatever the rank left behind in its process group once it has exited."""
        ...


class Runtime(Protocol):
    async def start(self, spec: ProcessSpec) -> ProcessHandle: ...


class _Process:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def lines(self) -> AsyncIterator[tuple[str, str]]:
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()

        async def pump(reader: asyncio.StreamReader | None, tag: str) -> None:
            if reader is None:
                return
            while True:
                try:
                    raw = await reader.readline()
                except ValueError:  # over LINE_LIMIT: take what is buffered as one line
                    raw = await reader.read(LINE_LIMIT)
                if not raw:
                    return
                await queue.put((tag, raw.decode("utf-8", "replace").rstrip("\r\n")))

        async def both() -> None:
            await asyncio.gather(pump(self._proc.stdout, "o"), pump(self._proc.stderr, "e"))
            await queue.put(None)

        task = asyncio.create_task(both())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            task.cancel()

    async def wait(self) -> int:
        return await self._proc.wait()

    async def terminate(self, grace: float) -> None:
        if self._proc.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), timeout=grace)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            await self._proc.wait()

    def kill_leftovers(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self._proc.pid, sig)  # the process leads its own group: children go too
        except ProcessLookupError:
            pass


def _die_with_parent() -> None:
    """In the child, before exec: if the agent dies (even by SIGKILL), the kernel kills the rank too."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: a restarted agent still kills what it recorded


class ProcessRuntime:
    """Runs a rank as a plain child process in its own session (for hosts without Docker, and the local cluster)."""

    async def start(self, spec: ProcessSpec) -> ProcessHandle:
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            cwd=spec.cwd,
            env=spec.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=LINE_LIMIT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        return _Process(proc)
