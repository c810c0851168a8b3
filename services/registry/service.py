"""Registry: the only writer of model versions.

- A version is registered from a run's files (copied server-side) or from local files the client uploaded
  through presigned URLs. Files are stored once per content (``models/<name>/blobs/<sha256>``), so a version's
  files never change and deleting a run never breaks a model.
- Version numbers are taken with an atomic *create* of ``<name>.v<n>`` in the ``cadre_models`` KV, after the
  files are stored: concurrent registrations of one name get consecutive numbers with no duplicate and no gap
  (a registration that fails before the create takes no number).
- Tags may change; properties may only gain keys; archiving hides a version from "latest"; aliases are movable
  names. Every change is an event on ``cadre.models.<name>.events``.
"""

from __future__ import annotations

import hashlib
import posixpath
import time

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.registry.environments import Environments
from shared import bus, files, runs, schemas, subjects
from shared.environments import Environment
from shared.errors import ConflictError, NotFoundError, ValidationError
from shared.service import Service
from shared.settings import BusSettings, StoreSettings
from shared.states import RunState
from shared.storage import ObjectStore

MAX_CAS_ATTEMPTS = 200


def check_name(name: str, what: str = "model name") -> None:
    if not subjects.NAME_RE.match(name):
        raise ValidationError(f"{what} {name!r} is invalid: use letters, digits, '_' or '-' (at most 128)")


class RegistryService(Service):
    name = "registry"

    def __init__(self, bus_settings: BusSettings, store: ObjectStore) -> None:
        super().__init__(bus_settings)
        self.store = store
        self.models_kv: KeyValue
        self.runs_kv: KeyValue
        self.events: bus.RunEventLog

    @classmethod
    def from_env(cls) -> RegistryService:
        return cls(BusSettings.from_env(cls.name), ObjectStore(StoreSettings.from_env()))

    async def setup(self) -> None:
        await bus.ensure_topology(self.js)
        await self.store.ensure_bucket()
        self.models_kv = await bus.key_value(self.js, subjects.MODELS_BUCKET)
        self.runs_kv = await bus.key_value(self.js, subjects.RUNS_BUCKET)
        self.events = bus.RunEventLog(self.js)
        await self.endpoint(subjects.Api.MODEL_REGISTER, schemas.ModelRegisterRequest, self.register)
        await self.endpoint(subjects.Api.MODEL_UPLOAD, schemas.ModelUploadRequest, self.upload_urls)
        await self.endpoint(subjects.Api.MODEL_GET, schemas.ModelRef, self.get)
        await self.endpoint(subjects.Api.MODEL_LIST, schemas.ModelListRequest, self.list)
        await self.endpoint(subjects.Api.MODEL_UPDATE, schemas.ModelUpdateRequest, self.update)
        await self.endpoint(subjects.Api.MODEL_ALIAS, schemas.AliasRequest, self.set_alias)
        await self.endpoint(subjects.Api.MODEL_DELETE, schemas.ModelRef, self.delete)
        await self.endpoint(subjects.Api.MODEL_DOWNLOAD, schemas.ModelRef, self.download_urls)
        envs = Environments(
            self.js,
            await bus.key_value(self.js, subjects.ENVIRONMENTS_BUCKET),
            await bus.key_value(self.js, subjects.SECRETS_BUCKET),
        )
        await self.endpoint(subjects.Api.ENVIRONMENT_REGISTER, schemas.EnvironmentRegisterRequest, envs.register)
        await self.endpoint(subjects.Api.ENVIRONMENT_GET, schemas.EnvironmentRef, envs.get)
        await self.endpoint(subjects.Api.ENVIRONMENT_LIST, schemas.Empty, envs.list)

    # --- registering -------------------------------------------------------------------------------------
    async def upload_urls(self, req: schemas.ModelUploadRequest) -> schemas.ModelFiles:
        """Presigned PUT URLs for local files not stored yet (content-addressed: an upload is never duplicated)."""
        check_name(req.model_name)
        urls = {}
        for f in req.files:
            files.check_relative(f.name)
            if not runs.HASH_RE.match(f.sha256):
                raise ValidationError(f"{f.name}: a sha256 digest is required")
            key = subjects.model_blob_key(req.model_name, f.sha256)
            if await self.store.stat(key) is None:
                urls[f.name] = await self.store.presign_put(key)
        return schemas.ModelFiles(urls=urls)

    async def register(self, req: schemas.ModelRegisterRequest) -> schemas.ModelVersion:
        check_name(req.model_name)
        lineage = schemas.Lineage()
        if req.run_id is not None:
            entries, source, lineage = await self._from_run(req)
        elif req.files:
            entries, source = await self._from_upload(req), "local"
        else:
            raise ValidationError("register a model from a run (run_id, model_path) or from local files")
        model = await self._create_version(
            req.model_name,
            lambda version: schemas.ModelVersion(
                name=req.model_name,
                version=version,
                source_path=source,
                files=entries,
                registered_at=time.time(),
                registered_by=req.registered_by,
                lineage=lineage,
                tags=req.tags,
                properties=req.properties,
                description=req.description,
            ),
        )
        registered = schemas.VersionRegistered(
            name=model.name, version=model.version, at=model.registered_at, by=req.registered_by, model=model
        )
        await self._publish(registered)
        self.log.info("model_registered", model=model.name, version=model.version, run_id=lineage.run_id)
        return model

    async def _from_run(
        self, req: schemas.ModelRegisterRequest
    ) -> tuple[list[schemas.FileEntry], str, schemas.Lineage]:
        assert req.run_id is not None
        record = await bus.get_record(self.runs_kv, req.run_id)
        last, _ = await self.events.last(req.run_id)
        if last is None or last.state is not RunState.COMPLETED:
            state = last.state.value if last else "unknown"
            raise ConflictError(f"run {req.run_id} is {state}: models are registered from Completed runs")
        path = files.check_relative((req.model_path or "outputs").strip("/"), "model_path")
        manifest = await self.store.get_bytes(subjects.run_manifest_key(req.run_id))
        run_files = msgspec.json.decode(manifest, type=schemas.FilesList).files
        chosen = [f for f in run_files if f.name == path or f.name.startswith(f"{path}/")]
        if not chosen:
            raise NotFoundError(f"run {req.run_id} has no file or folder {path!r}; see run.get_file_names()")
        base = posixpath.dirname(path)  # a folder keeps its own name, as in Azure ML: model/weights.bin
        entries = []
        for f in chosen:
            rel = posixpath.relpath(f.name, base) if base else f.name
            sha = f.sha256 or await self._sha256_of(subjects.run_file_key(req.run_id, f.name))
            blob = subjects.model_blob_key(req.model_name, sha)
            if await self.store.stat(blob) is None:
                await self.store.copy(subjects.run_file_key(req.run_id, f.name), blob)
            entries.append(schemas.FileEntry(name=rel, size=f.size, md5=f.md5, sha256=sha))
        spec = record.spec
        env = Environment.of(spec)
        environment = {"compute_target": spec.compute_target, "environment_hash": env.digest()}
        if env.image:
            environment["image"] = env.image
        if env.pip_packages:
            environment["pip_packages"] = " ".join(env.pip_packages)
        if env.conda_packages:
            environment["conda_packages"] = " ".join(env.conda_packages)
        lineage = schemas.Lineage(
            run_id=req.run_id,
            experiment=spec.experiment,
            git=spec.git,
            datasets=[f"{d.dataset}:{d.version}" for d in spec.datasets],
            environment=environment,
        )
        return entries, path, lineage

    async def _sha256_of(self, key: str) -> str:
        """For run files stored before digests carried SHA-256 (bounded by the snapshot-era file sizes)."""
        return hashlib.sha256(await self.store.get_bytes(key)).hexdigest()

    async def _from_upload(self, req: schemas.ModelRegisterRequest) -> list[schemas.FileEntry]:
        problems = []
        for f in req.files:
            files.check_relative(f.name)
            stat = await self.store.stat(subjects.model_blob_key(req.model_name, f.sha256))
            if stat is None:
                problems.append(f"{f.name} was not uploaded")
            elif stat[0] != f.size or (stat[1] and "-" not in stat[1] and stat[1] != f.md5):
                problems.append(f"{f.name} does not match its upload")
        if problems:
            raise ValidationError("cannot register: " + "; ".join(problems))
        return list(req.files)

    async def _create_version(self, name: str, make) -> schemas.ModelVersion:
        """Take the next number with an atomic create: whoever creates ``<name>.v<n>`` first owns n."""
        version = await self._latest_number(name) + 1
        for _ in range(MAX_CAS_ATTEMPTS):
            model = make(version)
            try:
                await self.models_kv.create(subjects.model_version_key(name, version), schemas.encode(model))
            except KeyWrongLastSequenceError:
                version += 1  # another registration took it
                continue
            await self._raise_latest(name, version)
            return model
        raise ConflictError(f"too many concurrent registrations of model {name}; try again")

    async def _latest_number(self, name: str) -> int:
        try:
            entry = await self.models_kv.get(subjects.model_latest_key(name))
        except KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    async def _raise_latest(self, name: str, version: int) -> None:
        """``<name>.latest`` is a hint (the highest number taken), moved forward only."""
        key = subjects.model_latest_key(name)
        for _ in range(MAX_CAS_ATTEMPTS):
            try:
                entry = await self.models_kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.models_kv.create(key, str(version).encode())
                    return
                except KeyWrongLastSequenceError:
                    continue
            if int(entry.value or b"0") >= version:
                return
            try:
                await self.models_kv.update(key, str(version).encode(), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue

    # --- reading -----------------------------------------------------------------------------------------
    async def _load(self, name: str, version: int) -> tuple[schemas.ModelVersion, int]:
        try:
            entry = await self.models_kv.get(subjects.model_version_key(name, version))
        except KeyNotFoundError:
            raise NotFoundError(f"model {name} has no version {version}") from None
        assert entry.value is not None and entry.revision is not None
        return schemas.model_decoder.decode(entry.value), entry.revision

    async def _aliases(self, name: str) -> dict[str, int]:
        prefix = f"{name}.alias."
        entries = await bus.kv_entries(self.js, subjects.MODELS_BUCKET, prefix=prefix)
        return {key[len(prefix) :]: int(value or b"0") for key, value in entries.items()}

    def _with_aliases(self, model: schemas.ModelVersion, aliases: dict[str, int]) -> schemas.ModelVersion:
        mine = sorted(a for a, v in aliases.items() if v == model.version)
        return msgspec.structs.replace(model, aliases=mine)

    async def _resolve(self, ref: schemas.ModelRef) -> int:
        check_name(ref.name)
        if ref.alias is not None:
            check_name(ref.alias, "alias")
            try:
                entry = await self.models_kv.get(subjects.model_alias_key(ref.name, ref.alias))
            except KeyNotFoundError:
                raise NotFoundError(f"model {ref.name} has no alias {ref.alias!r}") from None
            return int(entry.value or b"0")
        if ref.version is not None:
            return ref.version
        latest = await self._latest_number(ref.name)
        if latest == 0:
            raise NotFoundError(f"model {ref.name} is not registered")
        for version in range(latest, 0, -1):
            try:
                model, _ = await self._load(ref.name, version)
            except NotFoundError:
                continue  # deleted
            if not model.archived:
                return version
        raise NotFoundError(f"model {ref.name} has no version that is not archived")

    async def get(self, ref: schemas.ModelRef) -> schemas.ModelVersion:
        model, _ = await self._load(ref.name, await self._resolve(ref))
        return self._with_aliases(model, await self._aliases(ref.name))

    async def list(self, req: schemas.ModelListRequest) -> schemas.ModelList:
        if req.name:
            check_name(req.name)
        entries = await bus.kv_entries(self.js, subjects.MODELS_BUCKET, prefix=f"{req.name}." if req.name else "")
        models = []
        alias_cache: dict[str, dict[str, int]] = {}
        for key, value in sorted(entries.items()):
            name, _, suffix = key.rpartition(".")
            if not suffix.startswith("v") or not suffix[1:].isdigit() or (req.name and name != req.name):
                continue
            model = schemas.model_decoder.decode(value)
            if model.archived and not req.include_archived:
                continue
            if any(model.tags.get(k) != v for k, v in req.tags.items()):
                continue
            if any(model.properties.get(k) != v for k, v in req.properties.items()):
                continue
            if name not in alias_cache:
                alias_cache[name] = await self._aliases(name)
            models.append(self._with_aliases(model, alias_cache[name]))
        return schemas.ModelList(models=sorted(models, key=lambda m: (m.name, m.version)))

    async def download_urls(self, ref: schemas.ModelRef) -> schemas.ModelFiles:
        model = await self.get(ref)
        urls = {}
        for f in model.files:
            urls[f.name] = await self.store.presign_get(subjects.model_blob_key(model.name, f.sha256))
        return schemas.ModelFiles(urls=urls)

    # --- changing ----------------------------------------------------------------------------------------
    async def update(self, req: schemas.ModelUpdateRequest) -> schemas.ModelVersion:
        check_name(req.name)
        for _ in range(MAX_CAS_ATTEMPTS):
            model, revision = await self._load(req.name, req.version)
            clash = {k for k, v in req.add_properties.items() if k in model.properties and model.properties[k] != v}
            if clash:
                raise ConflictError(
                    f"properties {', '.join(sorted(clash))} of {req.name}:{req.version} are set already and "
                    "cannot change (add new keys, or use tags for values that change)"
                )
            tags = {k: v for k, v in {**model.tags, **req.add_tags}.items() if k not in req.remove_tags}
            updated = msgspec.structs.replace(
                model,
                tags=tags,
                properties={**model.properties, **req.add_properties},
                description=req.description if req.description is not None else model.description,
                archived=req.archived if req.archived is not None else model.archived,
            )
            try:
                await self.models_kv.update(
                    subjects.model_version_key(req.name, req.version), schemas.encode(updated), last=revision
                )
            except KeyWrongLastSequenceError:
                continue
            await self._publish(schemas.VersionUpdated(
                name=req.name, version=req.version, at=time.time(), tags=updated.tags,
                properties=updated.properties, description=updated.description, archived=updated.archived))  # fmt: skip
            return self._with_aliases(updated, await self._aliases(req.name))
        raise ConflictError(f"too many concurrent changes to {req.name}:{req.version}; try again")

    async def set_alias(self, req: schemas.AliasRequest) -> schemas.ModelVersion:
        check_name(req.alias, "alias")
        model, _ = await self._load(req.name, req.version)
        if model.archived:
            raise ConflictError(f"{req.name}:{req.version} is archived; an alias cannot point at it")
        key = subjects.model_alias_key(req.name, req.alias)
        try:
            previous: int | None = int((await self.models_kv.get(key)).value or b"0")
        except KeyNotFoundError:
            previous = None
        await self.models_kv.put(key, str(req.version).encode())
        await self._publish(schemas.AliasMoved(name=req.name, version=req.version, at=time.time(), by=req.by,
                                               alias=req.alias, previous_version=previous))  # fmt: skip
        self.log.info("model_alias_moved", model=req.name, alias=req.alias, version=req.version, previous=previous)
        return self._with_aliases(model, await self._aliases(req.name))

    async def delete(self, ref: schemas.ModelRef) -> schemas.ModelVersion:
        """Delete one version and the blobs no other version of the name uses; refuse while an alias points at it."""
        if ref.version is None:
            raise ValidationError("say which version to delete")
        model, _ = await self._load(ref.name, ref.version)
        pointing = sorted(a for a, v in (await self._aliases(ref.name)).items() if v == ref.version)
        if pointing:
            raise ConflictError(f"{ref.name}:{ref.version} is aliased as {', '.join(pointing)}; move the alias first")
        await self.models_kv.delete(subjects.model_version_key(ref.name, ref.version))
        still_used = set()
        for other in (await self.list(schemas.ModelListRequest(name=ref.name, include_archived=True))).models:
            still_used.update(f.sha256 for f in other.files)
        for f in model.files:
            if f.sha256 not in still_used:
                await self.store.remove(subjects.model_blob_key(ref.name, f.sha256))
        await self._publish(schemas.VersionDeleted(name=ref.name, version=ref.version, at=time.time()))
        self.log.info("model_deleted", model=ref.name, version=ref.version)
        return model

    async def _publish(self, event: schemas.ModelEventBase) -> None:
        await self.js.publish(subjects.model_events(event.name), schemas.encode(event))
