"""Registry: registers a model from a run's files, assigns versions 1, 2, 3... per name.

Versions are reserved with compare-and-set on ``<name>.latest`` in the ``cadre_models`` bucket, so concurrent
registrations of one name never get the same number; the files are copied server-side into the model's own
prefix, so deleting a run never breaks a model.
"""

from __future__ import annotations

import posixpath
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from shared import bus, schemas, subjects
from shared.errors import ConflictError, NotFoundError, ValidationError
from shared.service import Service
from shared.settings import BusSettings, StoreSettings
from shared.states import RunState
from shared.storage import ObjectStore


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
        self.models_kv = await self.js.key_value(subjects.MODELS_BUCKET)
        self.runs_kv = await self.js.key_value(subjects.RUNS_BUCKET)
        self.events = bus.RunEventLog(self.js)
        await self.endpoint(subjects.Api.MODEL_REGISTER, schemas.ModelRegisterRequest, self.register)
        await self.endpoint(subjects.Api.MODEL_GET, schemas.ModelGetRequest, self.get)
        await self.endpoint(subjects.Api.MODEL_LIST, schemas.ModelListRequest, self.list)

    async def register(self, req: schemas.ModelRegisterRequest) -> schemas.ModelVersion:
        if not subjects.NAME_RE.match(req.model_name):
            raise ValidationError(
                f"model name {req.model_name!r} is invalid: use letters, digits, '_' or '-' (at most 128)"
            )
        record = await bus.get_record(self.runs_kv, req.run_id)
        last, _ = await self.events.last(req.run_id)
        if last is None or last.state is not RunState.COMPLETED:
            state = last.state.value if last else "unknown"
            raise ConflictError(f"run {req.run_id} is {state}: models are registered from Completed runs")
        path = req.model_path.strip("/")
        prefix = subjects.run_file_prefix(req.run_id)
        stored = await self.store.list(f"{prefix}{path}")
        files = [
            (key, size, etag)
            for key, size, etag in stored
            if key == f"{prefix}{path}" or key.startswith(f"{prefix}{path}/")
        ]
        if not files:
            raise NotFoundError(f"run {req.run_id} has no file or folder {req.model_path!r}; see run.get_file_names()")
        version = await self._reserve_version(req.model_name)
        base = posixpath.dirname(path)
        entries = []
        for key, size, etag in files:
            rel = posixpath.relpath(key[len(prefix) :], base) if base else key[len(prefix) :]
            await self.store.copy(key, subjects.model_file_key(req.model_name, version, rel))
            entries.append(schemas.FileEntry(name=rel, size=size, md5=etag))
        model = schemas.ModelVersion(
            name=req.model_name,
            version=version,
            run_id=req.run_id,
            experiment=record.spec.experiment,
            source_path=path,
            files=entries,
            registered_at=time.time(),
            tags=req.tags,
            description=req.description,
        )
        await self.models_kv.put(subjects.model_version_key(req.model_name, version), schemas.encode(model))
        await self.js.publish(
            subjects.model_events(req.model_name), schemas.encode(schemas.ModelRegistered(model=model))
        )
        self.log.info("model_registered", model=req.model_name, version=version, run_id=req.run_id)
        return model

    async def _reserve_version(self, name: str) -> int:
        key = subjects.model_latest_key(name)
        for _ in range(100):
            try:
                entry = await self.models_kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.models_kv.create(key, b"1")
                    return 1
                except KeyWrongLastSequenceError:
                    continue
            assert entry.value is not None and entry.revision is not None
            version = int(entry.value) + 1
            try:
                await self.models_kv.update(key, str(version).encode(), last=entry.revision)
                return version
            except KeyWrongLastSequenceError:
                continue  # another registration took this number: take the next
        raise ConflictError(f"too many concurrent registrations of model {name}; try again")

    async def get(self, req: schemas.ModelGetRequest) -> schemas.ModelVersion:
        if not subjects.NAME_RE.match(req.name):
            raise ValidationError(f"model name {req.name!r} is invalid")
        version = req.version
        if version is None:
            try:
                entry = await self.models_kv.get(subjects.model_latest_key(req.name))
            except KeyNotFoundError:
                raise NotFoundError(f"model {req.name} is not registered") from None
            assert entry.value is not None
            version = int(entry.value)
            # A reserved number whose registration did not finish is skipped.
            for v in range(version, 0, -1):
                try:
                    return await self._version(req.name, v)
                except NotFoundError:
                    continue
            raise NotFoundError(f"model {req.name} has no finished version")
        return await self._version(req.name, version)

    async def _version(self, name: str, version: int) -> schemas.ModelVersion:
        try:
            entry = await self.models_kv.get(subjects.model_version_key(name, version))
        except KeyNotFoundError:
            raise NotFoundError(f"model {name} has no version {version}") from None
        assert entry.value is not None
        return schemas.model_decoder.decode(entry.value)

    async def list(self, req: schemas.ModelListRequest) -> schemas.ModelList:
        try:
            keys = await self.models_kv.keys()
        except NoKeysError:
            keys = []
        models = []
        for key in keys:
            name, _, suffix = key.rpartition(".")
            if not suffix.startswith("v") or (req.name and name != req.name):
                continue
            try:
                models.append(await self._version(name, int(suffix[1:])))
            except (NotFoundError, ValueError):
                continue
        return schemas.ModelList(models=sorted(models, key=lambda m: (m.name, m.version)))
