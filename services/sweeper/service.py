"""Sweeper: hyperparameter sweeps (Azure ML's HyperDrive) on the fleet.

A service of its own rather than a part of the scheduler or the client: a sweep outlives the client that submitted
it (a laptop closed mid-sweep), and Optuna's sampling (TPE fits a model per child) must never slow the scheduler's
placement loop. Children are submitted through the submitter like any run, so they are queued, placed, retried
and stored like any run (a sweep of 2x2 MPI children is just that).

State: each sweep's events and its Optuna journal in CADRE_SWEEPS; the children are runs. One driver per sweep
(driver.py), started again from the bus whenever this service starts.
"""

from __future__ import annotations

import time

from nats.js import api as js_api
from nats.js.errors import APIError, KeyNotFoundError
from nats.js.kv import KeyValue

from services.sweeper.driver import SweepDriver, read_events
from shared import bus, schemas, subjects, sweeps
from shared.errors import ConflictError, NotFoundError, ValidationError
from shared.service import Service
from shared.settings import BusSettings


class SweeperService(Service):
    name = "sweeper"

    def __init__(self, bus_settings: BusSettings) -> None:
        super().__init__(bus_settings)
        self.drivers: dict[str, SweepDriver] = {}
        self.targets_kv: KeyValue

    @classmethod
    def from_env(cls) -> SweeperService:
        return cls(BusSettings.from_env(cls.name))

    async def setup(self) -> None:
        await bus.ensure_topology(self.js)
        self.targets_kv = await bus.key_value(self.js, subjects.TARGETS_BUCKET)
        await self.endpoint(subjects.Api.SWEEP_SUBMIT, schemas.SweepSubmitRequest, self.submit)
        await self.endpoint(subjects.Api.SWEEP_GET, schemas.SweepRef, self.get)
        await self.endpoint(subjects.Api.SWEEP_LIST, schemas.SweepListRequest, self.list_sweeps)
        await self.endpoint(subjects.Api.SWEEP_CANCEL, schemas.SweepRef, self.cancel)
        for last in await bus.outlast(self._latest, within=60):  # a new stream may not answer for a moment
            if not isinstance(last, schemas.SweepEnded):
                self._drive(last.sweep_id)

    def _drive(self, sweep_id: str) -> None:
        driver = self.drivers.get(sweep_id)
        if driver is None:
            driver = self.drivers[sweep_id] = SweepDriver(self.nc, self.js, sweep_id)

            async def drive() -> None:
                await driver.run()
                self.drivers.pop(sweep_id, None)

            self.spawn(drive, f"sweep_{sweep_id}")

    async def _latest(self) -> list[schemas.SweepEvent]:
        """The newest event of every sweep."""
        info = await self.js.stream_info(subjects.SWEEPS_STREAM, subjects_filter=subjects.all_sweep_events())
        if not info.state.subjects:
            return []
        msgs = bus.replay(self.js, subjects.SWEEPS_STREAM, subjects.all_sweep_events(), info.state.last_seq,
                          policy=js_api.DeliverPolicy.LAST_PER_SUBJECT)  # fmt: skip
        return [schemas.sweep_event_decoder.decode(m.data) async for m in msgs]

    async def _history(self, sweep_id: str) -> list[schemas.SweepEvent]:
        if not sweeps.is_sweep_id(sweep_id):
            raise ValidationError(f"{sweep_id!r} is not a sweep id (they look like hd_0123456789ab)")
        events, _ = await read_events(self.js, sweep_id)
        if not events:
            raise NotFoundError(f"sweep {sweep_id} not found")
        return events

    async def submit(self, req: schemas.SweepSubmitRequest) -> schemas.SweepSummary:
        spec = req.spec
        sweeps.validate_sweep(spec)
        try:
            await self.targets_kv.get(spec.run.compute_target)
        except KeyNotFoundError:
            raise ValidationError(f"unknown compute target {spec.run.compute_target!r}") from None
        sweep_id = sweeps.new_sweep_id()
        event = schemas.SweepSubmitted(sweep_id=sweep_id, at=time.time(), spec=spec)
        await self.js.publish(subjects.sweep_events(sweep_id), schemas.encode(event),
                              headers={"Nats-Expected-Last-Subject-Sequence": "0"})  # fmt: skip
        self.log.info("sweep_submitted", sweep_id=sweep_id, experiment=spec.experiment, sampling=spec.sampling,
                      max_total_runs=spec.max_total_runs)  # fmt: skip
        self._drive(sweep_id)
        return schemas.SweepSummary(sweep_id=sweep_id, experiment=spec.experiment, state="Running",
                                    submitted_at=event.at)  # fmt: skip

    async def get(self, req: schemas.SweepRef) -> schemas.SweepDetails:
        return sweeps.fold(await self._history(req.sweep_id))

    async def list_sweeps(self, req: schemas.SweepListRequest) -> schemas.SweepList:
        out = []
        for last in sorted(await self._latest(), key=lambda e: e.at, reverse=True):
            details = sweeps.fold(await self._history(last.sweep_id))
            if req.experiment and details.experiment != req.experiment:
                continue
            out.append(schemas.SweepSummary(sweep_id=details.sweep_id, experiment=details.experiment,
                                            state=details.state, submitted_at=details.submitted_at,
                                            children=len(details.children), best_value=details.best_value))  # fmt: skip
            if len(out) >= req.limit:
                break
        return schemas.SweepList(sweeps=out)

    async def cancel(self, req: schemas.SweepRef) -> schemas.SweepSummary:
        """The cancel is stored first (a sweeper restarted before acting on it still does), then the driver stops
        starting children and cancels those that run."""
        for _ in range(20):
            events = await self._history(req.sweep_id)
            details = sweeps.fold(events)
            if details.state != "Running":
                break  # ending already: cancelling twice is not an error
            last = await self.js.get_last_msg(subjects.SWEEPS_STREAM, subjects.sweep_events(req.sweep_id))
            event = schemas.SweepCancelRequested(sweep_id=req.sweep_id, at=time.time())
            try:
                await self.js.publish(subjects.sweep_events(req.sweep_id), schemas.encode(event),
                                      headers={"Nats-Expected-Last-Subject-Sequence": str(last.seq)})  # fmt: skip
            except APIError as exc:
                if exc.err_code not in bus.WRONG_LAST_SEQUENCE:
                    raise
                continue  # the driver wrote in between
            details = sweeps.fold([*events, event])
            if (driver := self.drivers.get(req.sweep_id)) is not None:
                driver.cancel()
            else:
                self._drive(req.sweep_id)
            self.log.info("sweep_cancel_requested", sweep_id=req.sweep_id)
            break
        else:
            raise ConflictError(f"sweep {req.sweep_id}: too much contention to cancel it")
        return schemas.SweepSummary(sweep_id=details.sweep_id, experiment=details.experiment, state=details.state,
                                    submitted_at=details.submitted_at, children=len(details.children))  # fmt: skip
