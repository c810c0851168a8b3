"""The node's caches under its work directory: snapshots, datasets and venvs, shared by runs and found again by
content hash. They are kept within a size budget: after each run, the least recently used entries go first, and
an entry a run holds is never removed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from collections import Counter
from pathlib import Path

import structlog

KINDS = ("snapshots", "datasets", "envs")


class NodeCache:
    def __init__(self, work_dir: Path, max_bytes: int) -> None:
        self.roots = [work_dir / kind for kind in KINDS]
        self.max_bytes = max_bytes
        self._held: Counter[Path] = Counter()
        self._sizes: dict[Path, int] = {}  # entries never change once complete: walk each one once
        self._trimming = asyncio.Lock()
        self.log = structlog.get_logger().bind(component="cache")

    def hold(self, path: Path) -> None:
        """Keep ``path`` (which may not exist yet) until :meth:`release`; it counts as used now."""
        self._held[path] += 1
        try:
            os.utime(path)
        except OSError:
            pass  # not there yet: it is being downloaded or built

    def release(self, path: Path) -> None:
        self._held[path] -= 1
        if self._held[path] <= 0:
            del self._held[path]

    async def sweep(self) -> None:
        """At start-up, before any run: what a previous life left half-written or half-removed goes."""

        def sweep() -> None:
            for root in self.roots:
                for path in root.glob(".*") if root.is_dir() else []:
                    _remove(path)

        await asyncio.to_thread(sweep)

    async def trim(self) -> int:
        """Remove least recently used entries until the caches fit the budget; returns the bytes freed."""
        async with self._trimming:
            entries = await asyncio.to_thread(self._entries)
            total = sum(size for _, size, _ in entries)
            freed = 0
            for path, size, _ in sorted(entries, key=lambda e: e[2]):
                if total - freed <= self.max_bytes:
                    break
                if path in self._held:
                    continue
                # Renamed first (atomic, on the event loop), so no run can pick it up while it is being removed.
                doomed = path.with_name(f".evicted-{path.name}-{time.monotonic_ns()}")
                try:
                    path.rename(doomed)
                except OSError:
                    continue
                self._sizes.pop(path, None)
                await asyncio.to_thread(_remove, doomed)
                freed += size
                self.log.info("cache_evicted", path=str(path), bytes=size)
            return freed

    def _entries(self) -> list[tuple[Path, int, float]]:
        out = []
        for root in self.roots:
            if not root.is_dir():
                continue
            for path in root.iterdir():
                if path.name.startswith("."):  # being written, or being removed
                    continue
                if root.name == "envs" and not (path / ".ready").exists():  # a venv still being built
                    continue
                try:
                    if path not in self._sizes:
                        self._sizes[path] = _size(path)
                    out.append((path, self._sizes[path], path.lstat().st_mtime))
                except OSError:
                    continue
        return out


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _remove(path: Path) -> None:
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return

    def writable_and_retry(func, name, _exc) -> None:  # type: ignore[no-untyped-def]
        # Shared dataset copies are read-only on purpose; make the parent writable, then try again.
        parent = os.path.dirname(name)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        func(name)

    shutil.rmtree(path, onerror=writable_and_retry)
