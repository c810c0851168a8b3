"""Named, versioned job environments (Azure ML's ``Environment.register`` / ``get`` / ``list``).

A version is taken with an atomic KV create of ``<name>.v<n>``, so concurrent registrations get consecutive
numbers with no duplicate and no gap; registering the definition the latest version already has returns that
version instead of making a new one.

A private registry's password is stored apart, in the services-only secrets bucket under
``environment.<name>.v<n>``; the stored environment names only that key. Registering the same definition with a
new password replaces the old one (a rotation is not a new environment); a new version made from one fetched
with ``Environment.get`` (no password in hand) carries its credential over.
"""

from __future__ import annotations

import time

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import bus, environments, schemas, subjects
from shared.errors import ConflictError, NotFoundError, ValidationError

MAX_VERSIONS_TRIED = 200


class Environments:
    def __init__(self, js: JetStreamContext, kv: KeyValue, secrets: KeyValue) -> None:
        self.js = js
        self.kv = kv
        self.secrets = secrets

    async def register(self, req: schemas.EnvironmentRegisterRequest) -> schemas.EnvironmentVersion:
        environments.check_definition(req.definition)
        registry = req.definition.registry
        if req.registry_password is not None and registry is None:
            raise ValidationError("a registry password was given, but the environment names no registry")
        carried = registry.secret if registry else None  # from Environment.get: the version it came from
        if carried is not None and not carried.startswith(f"environment.{req.definition.name}.v"):
            raise ValidationError(f"registry credential {carried!r} belongs to another environment")
        has_credential = registry is not None and (req.registry_password is not None or carried is not None)
        plain = req.definition
        if registry is not None:
            plain = msgspec.structs.replace(plain, registry=msgspec.structs.replace(registry, secret=None))
        name = plain.name
        # Whether a credential goes with it is part of what the environment is; the password itself is not.
        marked = plain
        if has_credential:
            assert registry is not None
            marked = msgspec.structs.replace(plain, registry=msgspec.structs.replace(registry, secret="(credential)"))
        digest = environments.definition_digest(marked)
        versions = await self._versions(name)
        if versions and versions[-1].digest == digest:
            if req.registry_password is not None:
                await self._store_secret(versions[-1], req.registry_password)
            return versions[-1]
        version = (versions[-1].version if versions else 0) + 1
        for _ in range(MAX_VERSIONS_TRIED):
            definition = plain
            if has_credential:
                assert registry is not None
                key = subjects.environment_secret_key(name, version)
                definition = msgspec.structs.replace(plain, registry=msgspec.structs.replace(registry, secret=key))
            stored = schemas.EnvironmentVersion(
                definition=definition, version=version, digest=digest, created_at=time.time()
            )
            try:
                await self.kv.create(subjects.environment_version_key(name, version), schemas.encode(stored))
            except KeyWrongLastSequenceError:
                version += 1
                continue
            if req.registry_password is not None:
                await self._store_secret(stored, req.registry_password)
            elif carried is not None:
                await self._copy_secret(carried, stored)
            return stored
        raise ConflictError(f"too many concurrent registrations of environment {name}; try again")

    async def _store_secret(self, stored: schemas.EnvironmentVersion, password: str) -> None:
        registry = stored.definition.registry
        assert registry is not None and registry.secret is not None
        cred = schemas.RegistryCredential(username=registry.username, password=password)
        await self.secrets.put(registry.secret, schemas.encode(cred))

    async def _copy_secret(self, source: str, stored: schemas.EnvironmentVersion) -> None:
        registry = stored.definition.registry
        assert registry is not None and registry.secret is not None
        try:
            entry = await self.secrets.get(source)
        except KeyNotFoundError:
            raise ValidationError(
                f"environment {stored.definition.name}: the registry credential it was made from is gone; "
                "register it with its password"
            ) from None
        await self.secrets.put(registry.secret, entry.value or b"")

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
