"""Datasets: versioned, content-hashed file sets that runs read.

Files are stored once per content (``datasets/blobs/<sha256>``) across all datasets and versions. A version is
taken with an atomic KV create; uploading the same data again returns the existing latest version instead of
making a new one. Agents get presigned URLs to materialize a version on their node.
"""

from __future__ import annotations

import hashlib
import time

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import bus, files, runs, schemas, subjects
from shared.errors import ConflictError, NotFoundError, ValidationError
from shared.storage import ObjectStore

MAX_VERSIONS_TRIED = 200


def content_hash(entries: list[schemas.FileEntry]) -> str:
    manifest = "\n".join(f"{f.name}\t{f.sha256}\t{f.size}" for f in sorted(entries, key=lambda f: f.name))
    return hashlib.sha256(manifest.encode()).hexdigest()


def check(entries: list[schemas.FileEntry]) -> None:
    if not entries:
        raise ValidationError("a dataset needs at least one file")
    for f in entries:
        files.check_relative(f.name)
        if not runs.HASH_RE.match(f.sha256):
            raise ValidationError(f"{f.name}: a sha256 digest is required")


class Datasets:
    def __init__(self, js: JetStreamContext, kv: KeyValue, runs_kv: KeyValue, store: ObjectStore) -> None:
        self.js = js
        self.kv = kv
        self.runs_kv = runs_kv
        self.store = store

    async def upload_urls(self, req: schemas.DatasetUploadRequest) -> schemas.DatasetFiles:
        if not subjects.NAME_RE.match(req.name):
            raise ValidationError(f"dataset name {req.name!r} is invalid: use letters, digits, '_' or '-'")
        check(req.files)
        urls = {}
        for f in req.files:
            key = subjects.dataset_blob_key(f.sha256)
            stat = await self.store.stat(key)
            if stat is None or stat[0] != f.size:
                urls[f.name] = await self.store.presign_put(key)
        return schemas.DatasetFiles(urls=urls)

    async def register(self, req: schemas.DatasetRegisterRequest) -> schemas.DatasetVersion:
        if not subjects.NAME_RE.match(req.name):
            raise ValidationError(f"dataset name {req.name!r} is invalid: use letters, digits, '_' or '-'")
        check(req.files)
        missing = [f.name for f in req.files if (await self.store.stat(subjects.dataset_blob_key(f.sha256))) is None]
        if missing:
            raise ValidationError(f"dataset files were not uploaded: {', '.join(missing[:10])}")
        digest = content_hash(req.files)
        versions = await self._versions(req.name)
        if versions and versions[-1].content_hash == digest:
            return versions[-1]  # the same data again: no new version
        version = (versions[-1].version if versions else 0) + 1
        for _ in range(MAX_VERSIONS_TRIED):
            ds = schemas.DatasetVersion(
                name=req.name, version=version, content_hash=digest, files=sorted(req.files, key=lambda f: f.name),
                created_at=time.time(), description=req.description,
            )  # fmt: skip
            try:
                await self.kv.create(subjects.dataset_version_key(req.name, version), schemas.encode(ds))
                return ds
            except KeyWrongLastSequenceError:
                version += 1
        raise ConflictError(f"too many concurrent uploads of dataset {req.name}; try again")

    async def _versions(self, name: str) -> list[schemas.DatasetVersion]:
        entries = await bus.kv_entries(self.js, subjects.DATASETS_BUCKET, prefix=f"{name}.")
        out = [schemas.dataset_decoder.decode(v) for k, v in entries.items() if k.rpartition(".")[0] == name]
        return sorted(out, key=lambda d: d.version)

    async def get(self, ref: schemas.DatasetRef) -> schemas.DatasetVersion:
        if ref.version is None:
            versions = await self._versions(ref.name)
            if not versions:
                raise NotFoundError(f"dataset {ref.name} does not exist; upload it with `cadre dataset upload`")
            return versions[-1]
        try:
            entry = await self.kv.get(subjects.dataset_version_key(ref.name, ref.version))
        except KeyNotFoundError:
            raise NotFoundError(f"dataset {ref.name} has no version {ref.version}") from None
        return schemas.dataset_decoder.decode(entry.value or b"")

    async def list(self, _: schemas.Empty) -> schemas.DatasetList:
        out = [
            schemas.dataset_decoder.decode(v)
            for v in (await bus.kv_entries(self.js, subjects.DATASETS_BUCKET)).values()
        ]
        return schemas.DatasetList(datasets=sorted(out, key=lambda d: (d.name, d.version)))

    async def urls_for_run(self, req: schemas.DatasetUrlsRequest) -> schemas.DatasetFiles:
        """Download URLs for a dataset version the run declared (agents may fetch only those)."""
        record = await bus.get_record(self.runs_kv, req.run_id)
        wanted = next((d for d in record.spec.datasets if d.content_hash == req.content_hash), None)
        if wanted is None:
            raise NotFoundError(f"run {req.run_id} reads no dataset with content {req.content_hash[:12]}")
        ds = await self.get(schemas.DatasetRef(name=wanted.dataset, version=wanted.version))
        urls = {f.name: await self.store.presign_get(subjects.dataset_blob_key(f.sha256)) for f in ds.files}
        return schemas.DatasetFiles(urls=urls, version=ds)
