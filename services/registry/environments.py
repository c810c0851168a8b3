"""Named, versioned job environments (Azure ML's ``Environment.register`` / ``get`` / ``list``).

A version is taken with an atomic KV create of ``<name>.v<n>``, so concurrent registrations get consecutive
numbers with no duplicate and no gap; registering the definition the latest version already has returns that
version instead of making a new one.
"""

from __future__ import annotations

import time

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import bus, environments, schemas, subjects
from shared.errors import ConflictError, NotFoundError

MAX_VERSIONS_TRIED = 200


class Environments:
    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv

    async def register(self, req: schemas.EnvironmentRegisterRequest) -> schemas.EnvironmentVersion:
        environments.check_definition(req.definition)
        name = req.definition.name
        digest = environments.definition_digest(req.definition)
        versions = await self._versions(name)
        if versions and versions[-1].digest == digest:
            return versions[-1]
        version = (versions[-1].version if versions else 0) + 1
        for _ in range(MAX_VERSIONS_TRIED):
            stored = schemas.EnvironmentVersion(
                definition=req.definition, version=version, digest=digest, created_at=time.time()
            )
            try:
                await self.kv.create(subjects.environment_version_key(name, version), schemas.encode(stored))
                return stored
            except KeyWrongLastSequenceError:
                version += 1
        raise ConflictError(f"too many concurrent registrations of environment {name}; try again")

    async def get(self, ref: schemas.EnvironmentRef) -> schemas.EnvironmentVersion:
        if ref.version is None:
            versions = await self._versions(ref.name)
            if not versions:
                raise NotFoundError(f"environment {ref.name} is not registered; register it with env.register(ws)")
            return versions[-1]
        try:
            entry = await self.kv.get(subjects.environment_version_key(ref.name, ref.version))
        except KeyNotFoundError:
            have = [v.version for v in await self._versions(ref.name)]
            known = f"its versions are {', '.join(map(str, have))}" if have else "it is not registered at all"
            raise NotFoundError(f"environment {ref.name} has no version {ref.version}: {known}") from None
        return schemas.environment_decoder.decode(entry.value or b"")

    async def list(self, _: schemas.Empty) -> schemas.EnvironmentList:
        latest: dict[str, schemas.EnvironmentVersion] = {}
        for value in (await bus.kv_entries(self.js, subjects.ENVIRONMENTS_BUCKET)).values():
            v = schemas.environment_decoder.decode(value)
            if v.definition.name not in latest or latest[v.definition.name].version < v.version:
                latest[v.definition.name] = v
        return schemas.EnvironmentList(environments=[latest[name] for name in sorted(latest)])

    async def _versions(self, name: str) -> list[schemas.EnvironmentVersion]:
        entries = await bus.kv_entries(self.js, subjects.ENVIRONMENTS_BUCKET, prefix=f"{name}.")
        out = [schemas.environment_decoder.decode(v) for k, v in entries.items() if k.rpartition(".")[0] == name]
        return sorted(out, key=lambda v: v.version)
