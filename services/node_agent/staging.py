"""Staging: what one run needs on this node before its ranks start, fetched once per node where it can be.

The snapshot (cached by content hash), the checkpoint a retried attempt resumes from, the datasets (cached and
shared read-only, or a private copy), the registry credential for a private image, and the job's environment.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.node_agent.runtime import Prepared
from shared import bus, files, schemas, subjects
from shared.environments import Environment
from shared.errors import CadreError, StorageError
from shared.settings import Limits

if TYPE_CHECKING:
    from services.node_agent.execution import NodeContext

UPLOAD_DIRS = ("outputs", "logs")


def download(url: str, root: Path, name: str) -> Path:
    """Stream a (presigned) URL to ``root/name``, a relative name that cannot leave ``root``."""
    dest = files.safe_destination(root, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=300) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out, files.CHUNK)
    return dest


class Staging:
    def __init__(self, ctx: NodeContext, assignment: schemas.Assignment, run_dir: Path, log: Any) -> None:
        self.ctx = ctx
        self.a = assignment
        self.spec = assignment.spec
        self.run_id = assignment.run_id
        self.node_id = ctx.config.node_id
        self.run_dir = run_dir
        self.log = log
        self.prepared: Prepared | None = None
        self.dataset_paths: dict[str, Path] = {}
        self.held: list[Path] = []  # cache entries this run uses: never evicted under it

    def hold(self, path: Path) -> None:
        self.ctx.cache.hold(path)
        self.held.append(path)

    def release(self) -> None:
        for path in self.held:
            self.ctx.cache.release(path)

    async def prepare(self, say: Callable[[str], None]) -> None:
        """Everything the ranks need on this node before they start; ``say`` gets the environment build's lines."""
        archive = self.ctx.config.work_dir / "snapshots" / f"{self.spec.snapshot.content_hash}.tar.gz"
        self.ctx.cache.hold(archive)  # the cache may not evict it while it is fetched and unpacked
        snap = None
        try:
            # Cached here already (snapshots are named by their content), and no checkpoint to restore: nothing
            # to ask the services for.
            if self.a.attempt > 1 or not archive.exists():
                snap = await bus.request(
                    self.ctx.nc, subjects.of_node(subjects.AgentApi.SNAPSHOT_URL, self.ctx.config.node_id),
                    schemas.RunRef(run_id=self.run_id), schemas.SnapshotUrl,
                )  # fmt: skip
                await asyncio.to_thread(self._fetch_snapshot, snap, archive)
            await asyncio.to_thread(self._unpack, archive)
        finally:
            self.ctx.cache.release(archive)
        if snap is not None and snap.checkpoint:
            say(await asyncio.to_thread(self._restore_checkpoint, snap.checkpoint))
        entry = self.run_dir / self.spec.entry_script
        if not entry.is_file():
            raise CadreError(f"entry_script {self.spec.entry_script!r} is not in the snapshot")
        for ds in self.spec.datasets:
            urls = await bus.request(
                self.ctx.nc,
                subjects.of_node(subjects.AgentApi.DATASET_URLS, self.ctx.config.node_id),
                schemas.DatasetUrlsRequest(run_id=self.run_id, content_hash=ds.content_hash),
                schemas.DatasetFiles,
                timeout=30,
            )
            self.hold(self.ctx.config.work_dir / "datasets" / ds.content_hash)
            self.dataset_paths[ds.name] = await asyncio.to_thread(self._materialize, ds, urls)
        # Build (or reuse) the job's environment; what the build prints goes to the run's logs as "prepare" lines.
        auth = await self._registry_credential()
        self.prepared = await self.ctx.runtime.prepare(Environment.of(self.spec), say, auth)
        if self.prepared.cache_path is not None:
            self.hold(self.prepared.cache_path)
        self.log.info(
            "environment_ready", environment=self.prepared.key, image=self.prepared.image, python=self.prepared.python
        )

    async def _registry_credential(self) -> schemas.RegistryCredential | None:
        """The private registry's password, asked for on this node's own subject; held only for the pull."""
        registry = self.spec.environment.registry if self.spec.environment else None
        if registry is None or registry.secret is None:
            return None
        return await bus.request(
            self.ctx.nc,
            subjects.agent_registry_credential(self.node_id),
            schemas.RegistryCredentialRequest(run_id=self.run_id),
            schemas.RegistryCredential,
            timeout=30,
        )

    def _materialize(self, ds: schemas.DatasetInput, urls: schemas.DatasetFiles) -> Path:
        """Download a dataset version once per node (cached by content hash, shared read-only by runs); a
        download-mode input gets a private copy in the run's directory."""
        assert urls.version is not None
        cache = self.ctx.config.work_dir / "datasets" / ds.content_hash
        if not cache.is_dir():
            tmp = cache.with_name(f".{ds.content_hash}.{os.getpid()}.{self.run_id}")
            shutil.rmtree(tmp, ignore_errors=True)
            for entry in urls.version.files:
                dest = download(urls.urls[entry.name], tmp, entry.name)
                if files.digest(dest, entry.name).sha256 != entry.sha256:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise StorageError(f"dataset {ds.dataset}:{ds.version} file {entry.name} failed its checksum")
                dest.chmod(0o444)  # the shared copy is read-only: one run cannot change another's data
            for path in [tmp, *tmp.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o555)
            try:
                tmp.rename(cache)
            except OSError:  # another run on this node finished the same download first
                shutil.rmtree(tmp, ignore_errors=True)
        if ds.mode == "mount":
            return cache
        private = self.run_dir / "datasets" / ds.name
        shutil.copytree(cache, private)
        for path in [private, *private.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        return private

    def _restore_checkpoint(self, urls: dict[str, str]) -> str:
        """The checkpoint files the attempts before synced, into this attempt's working directory; says what came."""
        for name, url in sorted(urls.items()):
            download(url, self.run_dir, name)
        size = sum((self.run_dir / name).stat().st_size for name in urls)
        self.log.info("checkpoint_restored", files=len(urls), bytes=size, attempt=self.a.attempt)
        limit = Limits.from_env().snapshot_max_bytes
        over = f", over the {files.human_size(limit)} snapshot limit" if limit and size > limit else ""
        return f"checkpoint restored for attempt {self.a.attempt}: {len(urls)} file(s), {files.human_size(size)}{over}"

    def _fetch_snapshot(self, snap: schemas.SnapshotUrl, path: Path) -> None:
        """Download once per content hash; runs of the same code share the cached archive."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{self.run_id}.part")  # dot: not a cache entry yet
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(snap.url, timeout=60) as resp, open(tmp, "wb") as out:
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except urllib.error.URLError as exc:  # not an HTTP error: the store's host cannot be reached from here
            tmp.unlink(missing_ok=True)
            if isinstance(exc, urllib.error.HTTPError):
                raise
            raise files.unreachable_store(snap.url, exc, f"node {self.node_id}") from exc
        if digest.hexdigest() != snap.snapshot.content_hash:
            tmp.unlink(missing_ok=True)
            raise StorageError("the downloaded snapshot does not match its content hash")
        tmp.replace(path)

    def _unpack(self, archive: Path) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(self.run_dir, filter="data")
        for name in UPLOAD_DIRS:
            (self.run_dir / name).mkdir(exist_ok=True)
