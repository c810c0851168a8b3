"""Submitter: the front door for runs.

It owns the run records (KV ``cadre_runs``) and the first events of each run; it hands out upload URLs for
snapshots (bytes go to the object store, never over the bus).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as JsNotFound
from nats.js.kv import KeyValue

from shared import bus, lifecycle, runs, schemas, subjects
from shared.auth import run_permissions
from shared.errors import ConflictError, NotFoundError, NotSupportedError, ValidationError
from shared.service import Service
from shared.settings import BusSettings, Limits, StoreSettings, secret_env
from shared.states import Cause, RunState
from shared.storage import ObjectStore
from shared.trust import Creds, run_creds

EXPERIMENT_CACHE = 100_000


class SubmitterService(Service):
    name = "submitter"

    def __init__(
        self, bus_settings: BusSettings, store: ObjectStore, limits: Limits, run_signing_seed: str | None = None
    ) -> None:
        super().__init__(bus_settings)
        self.store = store
        self.limits = limits
        self.run_signing_seed = run_signing_seed  # signs run credentials, on a bus that trusts an operator
        # The account they are users of: the one that signed this service's own JWT.
        self.account_key = Creds.parse(bus_settings.creds).claims["iss"] if bus_settings.creds else None
        self.runs_kv: KeyValue
        self.targets_kv: KeyValue
        self.nodes_kv: KeyValue
        self.events: bus.RunEventLog
        self.secrets_kv: KeyValue
        # run id -> experiment and submission time: a cache of what the immutable run records say, for listings
        self._experiments: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @classmethod
    def from_env(cls) -> SubmitterService:
        return cls(
            BusSettings.from_env(cls.name),
            ObjectStore(StoreSettings.from_env()),
            Limits.from_env(),
            secret_env("CADRE_RUN_SIGNING_SEED"),
        )

    async def setup(self) -> None:
        await bus.ensure_topology(self.js)
        await self.store.ensure_bucket()
        self.runs_kv = await bus.key_value(self.js, subjects.RUNS_BUCKET)
        self.targets_kv = await bus.key_value(self.js, subjects.TARGETS_BUCKET)
        self.nodes_kv = await bus.key_value(self.js, subjects.NODES_BUCKET)
        self.events = bus.RunEventLog(self.js)
        await self.endpoint(subjects.Api.SNAPSHOT_PREPARE, schemas.SnapshotPrepareRequest, self.prepare_snapshot)
        await self.endpoint(subjects.Api.SUBMIT, schemas.SubmitRequest, self.submit)
        await self.endpoint(subjects.Api.RUN_GET, schemas.RunRef, self.get_run)
        await self.endpoint(subjects.Api.RUN_LIST, schemas.RunListRequest, self.list_runs)
        await self.endpoint(subjects.Api.RUN_CANCEL, schemas.RunCancelRequest, self.cancel)
        await self.endpoint(subjects.Api.TARGETS_LIST, schemas.Empty, self.list_targets)
        await self.endpoint(subjects.Api.RUN_TAG, schemas.RunTagRequest, self.tag)
        self.secrets_kv = await bus.key_value(self.js, subjects.SECRETS_BUCKET)
        await self.endpoint(
            subjects.all_agent_registry_credentials(),
            schemas.RegistryCredentialRequest,
            self.registry_credential,
            with_subject=True,
        )
        await self.endpoint(subjects.all_agent_run_bus(), schemas.RunRef, self.run_bus_credentials, with_subject=True)

    def _check_snapshot_limits(self, snap: schemas.SnapshotRef) -> None:
        if snap.size > self.limits.snapshot_max_bytes:
            raise ValidationError(
                f"snapshot is {snap.size / 1e6:.1f} MB, over the {self.limits.snapshot_max_bytes / 1e6:.0f} MB limit: "
                "move data out of source_directory (use a dataset) or list it in .cadreignore"
            )
        if snap.file_count > self.limits.snapshot_max_files:
            raise ValidationError(
                f"snapshot has {snap.file_count} files, over the {self.limits.snapshot_max_files}-file limit: "
                "list generated or data files in .cadreignore"
            )

    async def prepare_snapshot(self, req: schemas.SnapshotPrepareRequest) -> schemas.SnapshotPrepareReply:
        snap = req.snapshot
        if not runs.HASH_RE.match(snap.content_hash):
            raise ValidationError("snapshot content hash must be a sha256 hex digest")
        self._check_snapshot_limits(snap)
        key = subjects.snapshot_key(snap.content_hash)
        stat = await self.store.stat(key)
        if stat is not None and stat[0] == snap.size:
            return schemas.SnapshotPrepareReply(exists=True)
        return schemas.SnapshotPrepareReply(exists=False, upload_url=await self.store.presign_put(key))

    async def submit(self, req: schemas.SubmitRequest) -> schemas.SubmitReply:
        spec = req.spec
        runs.validate_spec(spec)
        self._check_snapshot_limits(spec.snapshot)
        # Both checks at once: each is a round trip (the store's an HTTP one) on the way to every run's first line.
        snapshot_key = subjects.snapshot_key(spec.snapshot.content_hash)
        target, stat = await asyncio.gather(
            self.targets_kv.get(spec.compute_target), self.store.stat(snapshot_key), return_exceptions=True
        )
        if isinstance(target, KeyNotFoundError):
            known = sorted(await self._target_names())
            raise ValidationError(
                f"unknown compute target {spec.compute_target!r}; known targets: {', '.join(known) or 'none'}"
            ) from None
        for failed in (target, stat):
            if isinstance(failed, BaseException):
                raise failed
        assert not isinstance(stat, BaseException)
        if stat is None:
            raise NotFoundError(
                f"snapshot {spec.snapshot.content_hash[:12]} is not in the store: upload it (the snapshot prepare "
                "request gives the URL) and submit again"
            )
        if stat[0] != spec.snapshot.size or (stat[1] and stat[1] != spec.snapshot.md5):
            raise ValidationError("the stored snapshot does not match its description (size or checksum); submit again")
        if req.parent is not None:
            run_id = await self._child_run_id(req.parent)
            last, _ = await self.events.last(run_id)
            if last is not None and not isinstance(last, schemas.Submitted):
                return schemas.SubmitReply(run_id=run_id, state=last.state)  # submitted again by a restarted sweeper
        else:
            run_id, last = runs.new_run_id(spec.experiment), None
        spec = await self._store_registry_secret(run_id, spec, req.registry_password)
        record = schemas.RunRecord(run_id=run_id, spec=spec, submitted_at=time.time(), parent=req.parent)
        try:
            await self.runs_kv.create(run_id, schemas.encode(record))
        except KeyWrongLastSequenceError:
            if req.parent is None:
                raise
            # A child whose submission was cut short between its record and its events: they follow now.

        def submitted() -> schemas.RunEvent:
            return lifecycle.event(
                schemas.Submitted, run_id, experiment=spec.experiment, compute_target=spec.compute_target,
                entry_script=spec.entry_script,
            )  # fmt: skip

        def queued() -> schemas.RunEvent:
            return lifecycle.event(schemas.Queued, run_id, spec=spec)

        if last is None and req.parent is None:  # a new run id: nobody else writes its events
            await self.events.begin(run_id, [submitted(), queued()])  # (made in order: their times are too)
        else:
            if last is None:
                await self.events.append(run_id, lambda _: submitted())
            await self.events.append(run_id, lambda _: queued())
        self.log.info("run_submitted", run_id=run_id, experiment=spec.experiment, target=spec.compute_target)
        return schemas.SubmitReply(run_id=run_id, state=RunState.QUEUED)

    async def _child_run_id(self, parent: schemas.SweepTrial) -> str:
        """A sweep's child is named by the sweep and its trial, and only a trial the sweep allows is taken."""
        if not subjects.SWEEP_ID_RE.match(parent.sweep_id):
            raise ValidationError(f"{parent.sweep_id!r} is not a sweep id")
        try:
            first = await self.js.get_msg(
                subjects.SWEEPS_STREAM, seq=1, subject=subjects.sweep_events(parent.sweep_id), next=True
            )
        except JsNotFound:
            raise NotFoundError(f"sweep {parent.sweep_id} not found") from None
        assert first.data is not None
        submitted = schemas.sweep_event_decoder.decode(first.data)
        assert isinstance(submitted, schemas.SweepSubmitted)
        if not 0 <= parent.trial < submitted.spec.max_total_runs:
            raise ConflictError(
                f"sweep {parent.sweep_id} allows {submitted.spec.max_total_runs} runs: trial {parent.trial} is not one"
            )
        return subjects.child_run_id(parent.sweep_id, parent.trial)

    async def _store_registry_secret(self, run_id: str, spec: schemas.RunSpec, password: str | None) -> schemas.RunSpec:
        """A private registry's password goes to the secrets bucket; the run record names only where it is."""
        registry = spec.environment.registry if spec.environment else None
        if registry is None:
            if password is not None:
                raise ValidationError("a registry password was given, but the environment names no registry")
            return spec
        assert spec.environment is not None
        if password is not None:
            key = subjects.run_secret_key(run_id)
            cred = schemas.RegistryCredential(username=registry.username, password=password)
            await self.secrets_kv.put(key, schemas.encode(cred))
        elif registry.secret is not None:
            key = registry.secret
            if not key.startswith("environment.") or not await self._secret(key):
                raise ValidationError(
                    f"the environment's registry credential {key!r} is not stored: register the environment "
                    "again with its password, or give the password with this run"
                )
        else:
            return spec  # a registry that needs no password
        env = msgspec.structs.replace(spec.environment, registry=msgspec.structs.replace(registry, secret=key))
        return msgspec.structs.replace(spec, environment=env)

    async def _secret(self, key: str) -> schemas.RegistryCredential | None:
        try:
            entry = await self.secrets_kv.get(key)
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"", type=schemas.RegistryCredential)

    async def _for_a_node_of(
        self, run_id: str, subject: str, what: str
    ) -> tuple[str, schemas.RunRecord, schemas.RunDetails]:
        """The node asking (its id comes off the subject, which only that node may publish on), the run's record and
        details, once it is sure the node has ranks in the run."""
        node_id = subject.rsplit(".", 1)[-1]
        record = await bus.get_record(self.runs_kv, run_id)
        details = lifecycle.fold(record, await self.events.history(run_id))
        if node_id not in {slot.node_id for slot in details.placement}:
            self.log.warning(f"{what}_refused", run_id=run_id, node_id=node_id)
            raise NotFoundError(f"run {run_id} has no rank on node {node_id}")
        return node_id, record, details

    async def registry_credential(
        self, req: schemas.RegistryCredentialRequest, subject: str
    ) -> schemas.RegistryCredential:
        """A run's registry password, for a node that runs one of its ranks, while the run is not decided."""
        node_id, record, details = await self._for_a_node_of(req.run_id, subject, "registry_credential")
        if details.state.is_decided():
            raise ConflictError(f"run {req.run_id} is {details.state.value}: its registry credential is not handed out")
        registry = record.spec.environment.registry if record.spec.environment else None
        cred = await self._secret(registry.secret) if registry and registry.secret else None
        if cred is None:
            raise NotFoundError(f"run {req.run_id} has no stored registry credential")
        self.log.info("registry_credential_given", run_id=req.run_id, node_id=node_id)
        return cred

    async def run_bus_credentials(self, req: schemas.RunRef, subject: str) -> schemas.RunBusCredentials:
        """Credentials that write one run's events, logs and metrics, for a node with ranks in it. An agent's own
        user writes no run."""
        if not self.run_signing_seed or self.account_key is None:
            raise NotSupportedError(
                "this bus signs no run credentials: agents write runs with their own user (a bus with password "
                "users), or the submitter lacks CADRE_RUN_SIGNING_SEED (deploy/render_nats_conf.py sets it)"
            )
        node_id, _, _ = await self._for_a_node_of(req.run_id, subject, "run_bus")
        perms = run_permissions(req.run_id, node_id)
        creds = run_creds(self.run_signing_seed, self.account_key, req.run_id, node_id, perms)
        self.log.info("run_bus_given", run_id=req.run_id, node_id=node_id)
        return schemas.RunBusCredentials(creds=creds)

    async def _target_names(self) -> list[str]:
        return sorted(await bus.kv_entries(self.js, subjects.TARGETS_BUCKET))

    async def get_run(self, req: schemas.RunRef) -> schemas.RunDetails:
        record = await bus.get_record(self.runs_kv, req.run_id)
        return lifecycle.fold(record, await self.events.history(req.run_id))

    async def list_runs(self, req: schemas.RunListRequest) -> schemas.RunList:
        latest = sorted(await self.events.latest_per_run(), key=lambda e: e.at, reverse=True)
        unknown = [ev.run_id for ev in latest if ev.run_id not in self._experiments]
        for start in range(0, len(unknown), 256):  # records are read in parallel, once: they never change
            await asyncio.gather(*(self._experiment_of(run_id) for run_id in unknown[start : start + 256]))
        out: list[schemas.RunSummary] = []
        for ev in latest:
            if len(out) >= req.limit:
                break
            known = self._experiments.get(ev.run_id)
            if known is None or (req.experiment and known[0] != req.experiment):
                continue
            out.append(schemas.RunSummary(run_id=ev.run_id, experiment=known[0], state=ev.state, at=ev.at,
                                          submitted_at=known[1]))  # fmt: skip
        return schemas.RunList(runs=out)

    async def _experiment_of(self, run_id: str) -> None:
        try:
            record = await bus.get_record(self.runs_kv, run_id)
        except NotFoundError:
            return
        self._experiments[run_id] = (record.spec.experiment, record.submitted_at)
        while len(self._experiments) > EXPERIMENT_CACHE:
            self._experiments.popitem(last=False)

    async def cancel(self, req: schemas.RunCancelRequest) -> schemas.RunSummary:
        record = await bus.get_record(self.runs_kv, req.run_id)
        why = req.error or schemas.ErrorInfo(code=Cause.CANCELED, message="canceled on request")

        def build(last: schemas.RunEvent | None) -> schemas.RunEvent | None:
            state = last.state if last else RunState.NOT_STARTED
            if state.is_terminal() or state in (RunState.CANCEL_REQUESTED, RunState.FINALIZING):
                return None  # already ending: cancelling twice is not an error
            if state in (RunState.NOT_STARTED, RunState.QUEUED):
                return lifecycle.event(schemas.Canceled, req.run_id, error=why)
            return lifecycle.event(schemas.CancelRequested, req.run_id, error=why)

        await self.events.append(req.run_id, build)
        last, _ = await self.events.last(req.run_id)
        assert last is not None
        self.log.info("run_cancel_requested", run_id=req.run_id, state=last.state.value)
        return schemas.RunSummary(run_id=req.run_id, experiment=record.spec.experiment, state=last.state, at=last.at)

    async def tag(self, req: schemas.RunTagRequest) -> schemas.RunSummary:
        """Tags and properties set from outside the run (during or after it)."""
        record = await bus.get_record(self.runs_kv, req.run_id)
        data = schemas.RunData(run_id=req.run_id, tags=req.tags, properties=req.properties)
        await self.js.publish(subjects.run_metrics(req.run_id), schemas.encode(data))
        last, _ = await self.events.last(req.run_id)
        assert last is not None
        return schemas.RunSummary(run_id=req.run_id, experiment=record.spec.experiment, state=last.state, at=last.at)

    async def list_targets(self, _: schemas.Empty) -> schemas.TargetList:
        targets = [
            msgspec.json.decode(v, type=schemas.ComputeTargetInfo)
            for v in (await bus.kv_entries(self.js, subjects.TARGETS_BUCKET)).values()
        ]
        now = time.time()
        adverts = [
            schemas.node_decoder.decode(v) for v in (await bus.kv_entries(self.js, subjects.NODES_BUCKET)).values()
        ]
        nodes = [n for n in adverts if n.alive(now)]
        return schemas.TargetList(targets=targets, nodes=nodes)
