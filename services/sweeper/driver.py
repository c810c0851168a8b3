"""One sweep, driven by its children's metric and run events.

Everything the driver knows is rebuilt from the bus when it starts: the sweep's events (CADRE_SWEEPS), the Optuna
study (its journal, same stream) and each unfinished child's metrics and events, replayed from their start. So a
sweeper killed at any moment carries on where it was, and never starts a child twice: a child's run id is the
sweep's and its trial's, and a trial is stored before its child is submitted.

The work is one queue, handled in order: the followers of each child only put messages on it.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

import optuna
import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import APIError
from nats.js.errors import NotFoundError as JsNotFound
from optuna.trial import TrialState

from services.sweeper import policies, sampling
from shared import bus, schemas, subjects, sweeps
from shared.errors import CadreError, ConflictError, ServiceUnavailableError
from shared.states import Cause, RunState

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

MISSING_METRIC = "primary_metric_missing"


async def read_events(js: JetStreamContext, sweep_id: str, after: int = 0) -> tuple[list[schemas.SweepEvent], int]:
    """The sweep's events after stream sequence ``after``, and the last sequence (``after`` if none)."""
    subject = subjects.sweep_events(sweep_id)
    if after:  # a few new ones: read one by one, no consumer
        raws = [raw async for raw in bus.messages_after(js, subjects.SWEEPS_STREAM, subject, after)]
        last = raws[-1].seq if raws else None
        return [schemas.sweep_event_decoder.decode(r.data) for r in raws], last or after
    msgs, last = await bus.read_subject(js, subjects.SWEEPS_STREAM, subject)
    return [schemas.sweep_event_decoder.decode(m.data) for m in msgs], last


class Child:
    def __init__(self, trial: int, run_id: str, params: dict[str, schemas.ScalarParam]) -> None:
        self.trial, self.run_id, self.params = trial, run_id, params
        self.optuna: optuna.Trial | None = None
        self.reports: list[float] = []  # rank 0's primary metric values, in order
        self.reports_stored: set[int] = set()  # the intervals the study holds already (replayed after a restart)
        self.metric_names: set[str] = set()
        self.metrics_seq = 0  # the last CADRE_METRICS sequence read for it
        self.ending: schemas.RunEvent | None = None  # its terminal event, once seen
        self.need_seq = 0  # the metrics to read before its end is taken (they may trail the event)
        self.ended = False
        self.terminated: str | None = None
        self.subs: list[Any] = []


class SweepDriver:
    def __init__(self, nc: NATS, js: JetStreamContext, sweep_id: str) -> None:
        self.nc, self.js, self.sweep_id = nc, js, sweep_id
        self.log = structlog.get_logger().bind(service="sweeper", sweep_id=sweep_id)
        self.queue: asyncio.Queue[tuple[str, int | None, Msg | None]] = asyncio.Queue()
        self.children: dict[int, Child] = {}

    def cancel(self) -> None:
        self.queue.put_nowait(("cancel", None, None))

    async def run(self) -> None:
        self.queue = asyncio.Queue()  # what a previous life queued is replayed from the bus instead
        self.children = {}
        try:
            await self._run()
        finally:
            for child in self.children.values():
                await self._unfollow(child)

    # --- rebuilding -------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        events, self.seq = await read_events(self.js, self.sweep_id)
        details = sweeps.fold(events)
        if details.state in sweeps.ENDED:
            return
        spec = self.spec = details.spec
        self.total = sampling.total_runs(spec)
        self.deadline = details.submitted_at + spec.max_duration_minutes * 60
        self.stopping: str | None = "canceled" if details.state == "CancelRequested" else None
        self.error: schemas.ErrorInfo | None = None
        self.reason = ""
        self.journal = await sampling.BusJournal.load(self.js, self.sweep_id)
        self.study = sampling.open_study(spec, self.sweep_id, self.journal)
        await self.journal.flush()
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        self.asked = len(trials)
        self.told = {n for n, t in trials.items() if t.state.is_finished()}
        for known in details.children:
            child = self.children[known.trial] = Child(known.trial, known.run_id, known.params)
            child.terminated = known.terminated
            child.ended = known.state != "Submitted"
            if child.ended and known.state == RunState.COMPLETED.value and known.value is None and not known.terminated:
                self._missing_metric(child.run_id, [])
        for number, frozen in sorted(trials.items()):
            if number not in self.children:  # stored, and the sweeper stopped before its child was announced
                if self.stopping:
                    self._tell(number, state=TrialState.FAIL)
                    continue
                await self._announce(number, sampling.params_of(frozen, spec))
            child = self.children[number]
            if not child.ended and number not in self.told:
                child.optuna = optuna.trial.Trial(self.study, frozen._trial_id)
                child.reports_stored = set(frozen.intermediate_values)
        await self.journal.flush()
        for child in self.children.values():
            if not child.ended:
                await self._submit(child)
                await self._follow(child)
        if self.stopping:
            await self._cancel_children()
        await self._loop()

    # --- the loop ---------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self.stopping:
                await self._fill()
            if all(c.ended for c in self.children.values()) and (self.stopping or self.asked >= self.total):
                await self._end()
                return
            timeout = None if self.stopping else self.deadline - time.time()
            if timeout is not None and timeout <= 0:
                minutes = f"{self.spec.max_duration_minutes:g}"
                await self._stop("duration", reason=f"max_duration_minutes ({minutes}) passed")
                continue
            try:
                kind, trial, msg = await asyncio.wait_for(self.queue.get(), timeout)
            except TimeoutError:
                continue
            if kind == "cancel":
                await self._stop("canceled")
            elif trial is not None and msg is not None and not self.children[trial].ended:
                started = time.perf_counter()
                await (self._on_metrics if kind == "metric" else self._on_event)(self.children[trial], msg)
                if kind == "metric":
                    self.log.debug("metrics_handled", trial=trial, ms=round((time.perf_counter() - started) * 1e3, 2))
            await self.journal.flush()

    def _active(self) -> int:
        return sum(1 for c in self.children.values() if not c.ended)

    async def _fill(self) -> None:
        while self.asked < self.total and self._active() < self.spec.max_concurrent_runs:
            trial, params = sampling.ask(self.study, self.spec)
            self.asked += 1
            await self.journal.flush()  # the trial is stored before its child exists
            child = await self._announce(trial.number, params)
            child.optuna = trial
            await self._submit(child)
            await self._follow(child)

    # --- children ---------------------------------------------------------------------------------------------
    async def _announce(self, trial: int, params: dict[str, schemas.ScalarParam]) -> Child:
        run_id = subjects.child_run_id(self.sweep_id, trial)
        await self._append(schemas.ChildCreated(sweep_id=self.sweep_id, at=time.time(), trial=trial, run_id=run_id,
                                                params=params))  # fmt: skip
        child = self.children[trial] = Child(trial, run_id, params)
        self.log.info("child_created", run_id=run_id, params=params)
        return child

    async def _submit(self, child: Child) -> None:
        spec = sweeps.child_spec(self.spec.run, child.params)
        parent = schemas.SweepTrial(sweep_id=self.sweep_id, trial=child.trial, params=child.params)
        try:
            await bus.request(self.nc, subjects.Api.SUBMIT, schemas.SubmitRequest(spec=spec, parent=parent),
                              schemas.SubmitReply, timeout=30)  # fmt: skip
        except ServiceUnavailableError:
            raise  # waited out: the driver starts again
        except CadreError as exc:  # the child cannot run at all (its target was removed, ...): nor can the rest
            self.log.warning("child_refused", run_id=child.run_id, error=exc.message)
            child.ended = True
            self._tell(child.trial, state=TrialState.FAIL)
            error = schemas.ErrorInfo(code=exc.code, message=f"child {child.run_id} could not be submitted: {exc}")
            await self._stop("failed", error=error)

    async def _follow(self, child: Child) -> None:
        async def on_metric(msg: Msg) -> None:
            self.queue.put_nowait(("metric", child.trial, msg))

        async def on_event(msg: Msg) -> None:
            self.queue.put_nowait(("event", child.trial, msg))

        child.subs = [
            await self.js.subscribe(subjects.run_metrics(child.run_id), stream=subjects.METRICS_STREAM,
                                    ordered_consumer=True, cb=on_metric),
            await self.js.subscribe(subjects.run_events(child.run_id), stream=subjects.EVENTS_STREAM,
                                    ordered_consumer=True, cb=on_event),
        ]  # fmt: skip

    async def _unfollow(self, child: Child) -> None:
        subs, child.subs = child.subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except (NatsError, *bus.TRANSIENT_ERRORS):
                pass  # the connection is gone: so is the consumer

    async def _on_metrics(self, child: Child, msg: Msg) -> None:
        child.metrics_seq = msg.metadata.sequence.stream
        data = schemas.run_data_decoder.decode(msg.data)
        primary = self.spec.primary_metric_name
        for point in data.metrics:
            child.metric_names.add(point.name)
            value = point.value
            if point.name != primary or point.rank != 0 or point.kind != "scalar" or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                await self._report(child, float(value))
        await self._maybe_finish(child)

    async def _on_event(self, child: Child, msg: Msg) -> None:
        event = schemas.run_event_decoder.decode(msg.data)
        if not event.state.is_terminal():
            return
        child.ending = event
        try:  # its last metrics may come after the event on the other consumer: they are waited for
            last = await self.js.get_last_msg(subjects.METRICS_STREAM, subjects.run_metrics(child.run_id))
            child.need_seq = last.seq or 0
        except JsNotFound:
            child.need_seq = 0
        await self._maybe_finish(child)

    async def _report(self, child: Child, value: float) -> None:
        child.reports.append(value)
        interval = len(child.reports)
        if child.terminated is not None or child.optuna is None:
            return
        if interval not in child.reports_stored:
            child.optuna.report(value, interval)
            child.reports_stored.add(interval)
        policy, goal, metric = self.spec.policy, self.spec.primary_metric_goal, self.spec.primary_metric_name
        if self.stopping or not policies.evaluated_at(policy, interval):
            return
        reason = None
        if policy.kind == "bandit":
            at_interval = [c.reports[interval - 1] for c in self.children.values() if len(c.reports) >= interval]
            best = sweeps.best_of(at_interval, goal)  # the child's own value is among them
            assert best is not None
            reason = policies.bandit(policy, goal, metric, interval, value, best)
        elif child.optuna.should_prune():
            best_so_far = sweeps.best_of(child.reports, goal)
            assert best_so_far is not None
            threshold = sampling.percentile_threshold(self.study, self.spec, interval)
            reason = policies.percentile(policy, goal, metric, interval, best_so_far, threshold)
        if reason is not None:
            await self._terminate(child, reason)

    async def _terminate(self, child: Child, reason: str) -> None:
        child.terminated = reason
        await self._append(schemas.ChildTerminated(sweep_id=self.sweep_id, at=time.time(), trial=child.trial,
                                                   run_id=child.run_id, reason=reason))  # fmt: skip
        error = schemas.ErrorInfo(code=Cause.EARLY_TERMINATED, message=reason)
        await bus.request(self.nc, subjects.Api.RUN_CANCEL, schemas.RunCancelRequest(run_id=child.run_id, error=error),
                          schemas.RunSummary)  # fmt: skip
        self.log.info("child_terminated", run_id=child.run_id, reason=reason)

    async def _maybe_finish(self, child: Child) -> None:
        if child.ending is None or child.metrics_seq < child.need_seq:
            return
        state = child.ending.state
        goal = self.spec.primary_metric_goal
        value = sweeps.best_of(child.reports, goal)
        if child.terminated is not None:
            self._tell(child.trial, state=TrialState.PRUNED)
        elif state is RunState.COMPLETED and value is not None:
            self._tell(child.trial, value=value)
        else:
            self._tell(child.trial, state=TrialState.FAIL)
        await self.journal.flush()
        await self._append(schemas.ChildEnded(sweep_id=self.sweep_id, at=time.time(), trial=child.trial,
                                              run_id=child.run_id, state=state, value=value,
                                              reports=len(child.reports)))  # fmt: skip
        child.ended = True
        await self._unfollow(child)
        self.log.info("child_ended", run_id=child.run_id, state=state.value, value=value)
        if state is RunState.COMPLETED and value is None and child.terminated is None and not self.stopping:
            self._missing_metric(child.run_id, sorted(child.metric_names))
            await self._cancel_children()

    def _missing_metric(self, run_id: str, logged: list[str]) -> None:
        primary = self.spec.primary_metric_name
        message = (
            f"child {run_id} completed without logging the primary metric {primary!r} (it logged "
            f"{', '.join(repr(n) for n in logged) if logged else 'no metrics'}): no more children are started; "
            f"check primary_metric_name, and that the script calls run.log({primary!r}, value)"
        )
        self.stopping, self.error = "failed", schemas.ErrorInfo(code=MISSING_METRIC, message=message)
        self.log.warning("primary_metric_missing", run_id=run_id, logged=logged)

    def _tell(self, trial: int, value: float | None = None, state: TrialState | None = None) -> None:
        if trial in self.told:
            return  # told before a restart
        self.study.tell(trial, value, state=state)
        self.told.add(trial)

    # --- ending -----------------------------------------------------------------------------------------------
    async def _stop(self, kind: str, error: schemas.ErrorInfo | None = None, reason: str = "") -> None:
        if self.stopping:
            return
        self.stopping, self.error, self.reason = kind, error, reason
        self.log.info("sweep_stopping", why=kind, reason=reason or (error.message if error else ""))
        await self._cancel_children()

    async def _cancel_children(self) -> None:
        error = None
        if self.stopping == "duration":
            error = schemas.ErrorInfo(code=Cause.TIMEOUT, message=f"the sweep's {self.reason}")
        for child in self.children.values():
            if not child.ended and child.terminated is None:
                request = schemas.RunCancelRequest(run_id=child.run_id, error=error)
                await bus.request(self.nc, subjects.Api.RUN_CANCEL, request, schemas.RunSummary)

    async def _end(self) -> None:
        kids = list(self.children.values())
        counts = {
            "ran": len(kids),
            "stopped early": sum(1 for c in kids if c.terminated is not None),
        }
        summary = f"{counts['ran']} children ran, {counts['stopped early']} stopped early"
        if self.stopping == "canceled":
            state, reason = "Canceled", f"canceled: {summary}"
        elif self.stopping == "failed":
            state, reason = "Failed", summary
        else:
            state, reason = "Completed", f"{self.reason}: {summary}" if self.reason else summary
        await self._append(schemas.SweepEnded(sweep_id=self.sweep_id, at=time.time(), state=state, reason=reason,
                                              error=self.error))  # fmt: skip
        self.log.info("sweep_ended", state=state, reason=reason)

    async def _append(self, event: schemas.SweepEvent) -> None:
        """Compare-and-set on the sweep's subject: only a cancel comes from elsewhere (the API), and it is read
        and acted on when it gets in between."""
        subject = subjects.sweep_events(self.sweep_id)
        for _ in range(20):
            try:
                ack = await self.js.publish(subject, schemas.encode(event),
                                            headers={"Nats-Expected-Last-Subject-Sequence": str(self.seq)})  # fmt: skip
                self.seq = ack.seq
                return
            except APIError as exc:
                if exc.err_code not in bus.WRONG_LAST_SEQUENCE:
                    raise
            newer, self.seq = await read_events(self.js, self.sweep_id, after=self.seq)
            if any(isinstance(e, schemas.SweepCancelRequested) for e in newer):
                self.cancel()
        raise ConflictError(f"sweep {self.sweep_id}: too much contention appending an event")
